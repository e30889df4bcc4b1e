"""Layer offload (docs/design.md, "Larger-than-memory models").

The frozen base weights of the decoder layers over the memory budget live off the compute
device, in host memory ("cpu") or in safetensors files ("disk"), and are fetched just before a
layer runs and released right after. LoRA parameters, their gradients and the optimizer state
never move; nor do the embeddings, the final norm and the head. The layer walk decides when a
layer is fetched: one fetch can serve an inference pass and a training micro-step's forward
together (heterogeneous batching); a micro-step's backward fetches again what it needs, and
the weights its forward saved for the backward are kept as references (saved_tensors_hooks),
not as copies. Every fetch is counted: bytes and seconds, by source and by kind of work.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from .storage import atomic_write

MODES = ("none", "cpu", "disk")


@dataclass
class Fetch:
    layer: int
    kind: str  # what needed it: prefill, decode, train, or a combination "decode+train"
    bytes: int
    seconds: float
    source: str  # cpu or disk


@dataclass
class OffloadedLayer:
    params: list[torch.nn.Parameter]  # the layer's base weights (same objects PEFT wraps)
    names: list[str]  # their names within the layer
    host: list[torch.Tensor] = field(default_factory=list)  # "cpu": the weights, off device
    file: Path | None = None  # "disk": the weights' safetensors file
    resident: bool = True
    nbytes: int = 0


class LayerOffload:
    def __init__(
        self,
        layers: torch.nn.ModuleList,
        *,
        mode: str,
        budget: int,
        device: torch.device,
        folder: Path | None = None,
        cold: bool = False,
    ):
        assert mode in ("cpu", "disk"), mode
        self.mode, self.device, self.cold = mode, device, cold
        self.layers: dict[int, OffloadedLayer] = {}  # the offloaded ones, by index
        self.fetches: list[Fetch] = []  # since the last take()
        self.shared = 0  # bytes a training unit did not fetch: an inference pass had (take)
        self.fetch_seconds = 0.0  # spent fetching since start (units subtract theirs)
        self._storages: dict[int, tuple[int, int]] = {}  # storage pointer -> (layer, param)
        sizes = [sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in layers]
        self.layer_bytes = max(sizes, default=0)
        used = 0
        for i, (layer, size) in enumerate(zip(layers, sizes, strict=True)):
            if used + size <= budget:
                used += size
                continue
            named = [(n, p) for n, p in layer.named_parameters() if "lora_" not in n]
            params, names = [p for _, p in named], [n for n, _ in named]
            self.layers[i] = OffloadedLayer(params, names, nbytes=size)
        self.resident_bytes = used  # the layers kept on the device
        if mode == "disk":
            self._write_files(folder, layers)
        for entry in self.layers.values():
            if mode == "cpu":
                pin = device.type == "cuda"
                entry.host = [p.detach().to("cpu").contiguous() for p in entry.params]
                entry.host = [t.pin_memory() if pin else t.clone() for t in entry.host]
            self._release(entry)
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._prefetched: dict[int, tuple[list[torch.Tensor], object]] = {}  # CUDA: in flight

    @property
    def offloaded(self) -> list[int]:
        return sorted(self.layers)

    def describe(self) -> dict:
        return {
            "mode": self.mode,
            "layers": len(self.layers),
            "resident_bytes": self.resident_bytes,
            "offloaded_bytes": sum(e.nbytes for e in self.layers.values()),
            "cold": self.cold,
        }

    # -- fetch and release ----------------------------------------------------------------------

    @contextmanager
    def resident(self, i: int, kind: str) -> Iterator[None]:
        """Layer i's weights on the device for the block (fetched if offloaded, then released)."""
        entry = self.layers.get(i)
        if entry is None or entry.resident:
            yield
            return
        self.fetch(i, kind)
        try:
            yield
        finally:
            self._release(entry)

    def prefetch(self, i: int) -> None:
        """On CUDA, start copying layer i from pinned host memory on a side stream, so the copy
        overlaps the layer before it (on a CPU there is nothing to overlap: fetch copies)."""
        entry = self.layers.get(i)
        if self._stream is None or self.mode != "cpu" or entry is None or entry.resident:
            return
        if i in self._prefetched:
            return
        with torch.cuda.stream(self._stream):
            tensors = [t.to(self.device, non_blocking=True) for t in entry.host]
            done = torch.cuda.Event()
            done.record(self._stream)
        self._prefetched[i] = (tensors, done)

    def fetch(self, i: int, kind: str) -> None:
        entry = self.layers[i]
        start = time.perf_counter()
        if i in self._prefetched:
            tensors, done = self._prefetched.pop(i)
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(done)
            for t in tensors:
                t.record_stream(stream)  # the allocator must not reuse it before the layer ran
        elif self.mode == "cpu" and self.device.type == "cpu":
            tensors = [t.clone() for t in entry.host]  # a real copy, as to a device
        elif self.mode == "cpu":
            tensors = [t.to(self.device, non_blocking=True) for t in entry.host]
        else:
            if self.cold:
                drop_from_page_cache(entry.file)
            with safe_open(str(entry.file), framework="pt", device=str(self.device)) as f:
                tensors = [f.get_tensor(name) for name in entry.names]
        for index, (p, t) in enumerate(zip(entry.params, tensors, strict=True)):
            p.data = t
            self._storages[t.untyped_storage().data_ptr()] = (i, index)
        entry.resident = True
        seconds = time.perf_counter() - start
        self.fetches.append(Fetch(i, kind, entry.nbytes, seconds, self.mode))
        self.fetch_seconds += seconds

    def _release(self, entry: OffloadedLayer) -> None:
        for p in entry.params:
            self._storages.pop(p.untyped_storage().data_ptr(), None)
            p.data = torch.empty(0, dtype=p.dtype, device=self.device)
        entry.resident = False

    def take(self) -> list[Fetch]:
        """The fetches since the last take (for the metrics and the cost model)."""
        fetches, self.fetches = self.fetches, []
        return fetches

    def shared_use(self, i: int) -> None:
        """A training unit ran on layer i while an inference pass had it fetched."""
        if i in self.layers:
            self.shared += self.layers[i].nbytes

    def take_shared(self) -> int:
        shared, self.shared = self.shared, 0
        return shared

    # -- the backward's references to offloaded weights -----------------------------------------

    def saved_tensors(self):
        """Hooks for a training forward: a saved tensor that is (a view of) an offloaded weight
        is kept as a reference, and rebuilt from the weight fetched again for the backward."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        where = self._storages.get(t.untyped_storage().data_ptr()) if t.numel() else None
        if where is None:
            return t
        return ("weight", *where, tuple(t.shape), t.stride(), t.storage_offset())

    def _unpack(self, packed):
        if not isinstance(packed, tuple):
            return packed
        _, layer, index, shape, stride, offset = packed
        entry = self.layers[layer]
        if not entry.resident:
            raise RuntimeError(f"layer {layer}'s weights are needed but not fetched")
        return entry.params[index].detach().as_strided(shape, stride, offset)

    # -- disk -----------------------------------------------------------------------------------

    def _write_files(self, folder: Path, layers) -> None:
        """One safetensors file per offloaded layer, written once (its name carries a hash of
        the weights' shapes and a sample of values, so another model's files are not reused)."""
        folder.mkdir(parents=True, exist_ok=True)
        for i, entry in self.layers.items():
            tensors = {
                n: p.detach().to("cpu").contiguous()
                for n, p in zip(entry.names, entry.params, strict=True)
            }
            digest = hashlib.sha1()
            for n, t in tensors.items():
                digest.update(f"{n}{tuple(t.shape)}{t.dtype}".encode())
                digest.update(t.flatten()[:64].numpy().tobytes())
            file = folder / f"layer-{i:03d}-{digest.hexdigest()[:12]}.safetensors"
            if not file.is_file():
                atomic_write(file, save(tensors))
            entry.file = file


def drop_from_page_cache(path: Path) -> None:
    """Ask the OS to forget a file's cached pages, so the next read comes from the disk (as on
    a machine without spare memory). Linux and other POSIX systems; elsewhere a no-op."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
