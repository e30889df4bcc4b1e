"""Layer offload (docs/design.md, "Layer offload").

The frozen base weights of the decoder layers over the memory budget live off the compute
device, in host memory ("cpu") or in safetensors files ("disk"), and are fetched just before a
layer runs and released right after. LoRA parameters, their gradients and the optimizer state
never move; nor do the embeddings, the final norm and the head. The layer walk decides when a
layer is fetched: one fetch can serve an inference pass and a training micro-step's forward
together (heterogeneous batching); a micro-step's backward fetches again what it needs, and
the weights its forward saved for the backward are kept as references (saved_tensors_hooks),
not as copies. Every fetch is counted: bytes and seconds, by source and by kind of work; so are
the offloaded bytes on the device at any moment (`held`, `peak_held`).

The weights reach their home from wherever they are: the parameters of a model already in host
memory, or, when the model was loaded with these layers on the meta device (models.py), the
checkpoint's files, one layer at a time (`source`): they are never on the device, nor all in host
memory at once.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from .storage import atomic_write

MODES = ("none", "cpu", "disk")

Weights = Callable[[int, list[str]], list[torch.Tensor]]  # (layer, names) -> CPU tensors


def over_budget(sizes: list[int], budget: int) -> list[int]:
    """The layers that go off the device: in order, each layer that still fits in the budget
    stays, the others go."""
    offloaded, used = [], 0
    for i, size in enumerate(sizes):
        if used + size <= budget:
            used += size
        else:
            offloaded.append(i)
    return offloaded


def base_weights(layer: torch.nn.Module) -> list[tuple[torch.nn.Module, str, str]]:
    """(module, attribute, name within the layer) of a layer's base weights (no LoRA)."""
    found = []
    for path, module in layer.named_modules():
        for attr, p in module._parameters.items():
            name = f"{path}.{attr}" if path else attr
            if p is not None and "lora_" not in name:
                found.append((module, attr, name))
    return found


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
        source: Weights | None = None,
    ):
        """`source(i, names)`: layer i's base weights as new CPU tensors in the model's dtype (by
        default copied from the parameters; a model loaded with these layers on the meta device
        reads them from its checkpoint)."""
        assert mode in ("cpu", "disk"), mode
        self.mode, self.device, self.cold = mode, device, cold
        self.layers: dict[int, OffloadedLayer] = {}  # the offloaded ones, by index
        self.fetches: list[Fetch] = []  # since the last take()
        self.shared = 0  # bytes a training unit did not fetch: an inference pass had (take)
        self.fetch_seconds = 0.0  # spent fetching since start (units subtract theirs)
        self.held = self.peak_held = 0  # offloaded bytes on the device now / at most since start
        self.prefetch_hits = 0  # fetches whose copy a prefetch had started
        self._storages: dict[int, tuple[int, int]] = {}  # storage pointer -> (layer, param)
        # (from the shapes: a parameter on the meta device has them, a released one does not)
        weights = [[getattr(m, a) for m, a, _ in base_weights(layer)] for layer in layers]
        self.numel = [sum(p.numel() for p in ps) for ps in weights]  # base parameters per layer
        sizes = [sum(p.numel() * p.element_size() for p in ps) for ps in weights]
        self.layer_bytes = max(sizes, default=0)
        offloaded = over_budget(sizes, budget)
        self.resident_bytes = sum(sizes) - sum(sizes[i] for i in offloaded)  # kept on the device
        if mode == "disk":
            folder.mkdir(parents=True, exist_ok=True)
        read = source or _from_parameters(layers)
        for i in offloaded:  # one layer at a time: read, put in its home, release
            found = base_weights(layers[i])
            names = [n for _, _, n in found]
            tensors = [t.contiguous() for t in read(i, names)]
            entry = OffloadedLayer([], names, nbytes=sizes[i], resident=False)
            if mode == "disk":
                entry.file = self._write_file(folder, i, names, tensors)
            elif device.type == "cuda":
                entry.host = [t.pin_memory() for t in tensors]  # non_blocking copies need it
            else:
                entry.host = tensors  # (fresh copies: the source's contract)
            del tensors
            for module, attr, _ in found:  # same Parameter objects, for PEFT; meta ones replaced
                p = module._parameters[attr]
                if p.is_meta:
                    p = torch.nn.Parameter(p.new_empty(0, device=device), p.requires_grad)
                    module._parameters[attr] = p
                entry.params.append(p)
            self.layers[i] = entry
            self._release(entry)
        self.prefetching = device.type == "cuda" and mode == "cpu"  # a copy that can overlap
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._prefetched: dict[int, tuple[list[torch.Tensor], object]] = {}  # copies in flight

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
        """Layer i's weights on the device for the block (fetched if offloaded, then released).
        If the block fails, a copy started for the next layer is dropped too."""
        entry = self.layers.get(i)
        fetched = entry is not None and not entry.resident
        if fetched:
            self.fetch(i, kind)
        try:
            yield
        except BaseException:
            self.drop_prefetched()
            raise
        finally:
            if fetched:
                self._release(entry)

    def prefetch(self, i: int) -> None:
        """Start copying layer i to the device, so the copy overlaps the layer before it: on
        CUDA from pinned host memory on a side stream (`prefetching` is off where nothing can
        overlap; on a CPU, turned on, it copies at once). The walk prefetches layer i + 1 just
        before layer i runs, and only inside the layers it runs, so none is left over after a
        pass or a unit (it would hold a layer beyond the budget while other work runs)."""
        entry = self.layers.get(i)
        if not self.prefetching or entry is None or entry.resident or i in self._prefetched:
            return
        if self._stream is not None:
            # the copy reads pinned host memory, which never changes: no wait on the main stream
            with torch.cuda.stream(self._stream):
                tensors = self._copy(entry)
                done = torch.cuda.Event()
                done.record(self._stream)
        else:
            tensors, done = self._copy(entry), None
        self._prefetched[i] = (tensors, done)
        self._hold(entry.nbytes)

    def drop_prefetched(self) -> None:
        """Forget copies in flight. (On CUDA their memory was allocated on the side stream,
        which reuses it only after the copy: dropping one early is safe.)"""
        for i in list(self._prefetched):
            self._prefetched.pop(i)
            self.held -= self.layers[i].nbytes

    def fetch(self, i: int, kind: str) -> None:
        entry = self.layers[i]
        start = time.perf_counter()
        if i in self._prefetched:
            tensors, done = self._prefetched.pop(i)
            self.held -= entry.nbytes  # (held again below)
            self.prefetch_hits += 1
            if done is not None:
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(done)  # the layer runs only after its copy finished
                for t in tensors:
                    t.record_stream(stream)  # the allocator must not reuse it before it ran
        else:
            tensors = self._copy(entry)
        for index, (p, t) in enumerate(zip(entry.params, tensors, strict=True)):
            p.data = t
            self._storages[t.untyped_storage().data_ptr()] = (i, index)
        entry.resident = True
        self._hold(entry.nbytes)
        seconds = time.perf_counter() - start
        self.fetches.append(Fetch(i, kind, entry.nbytes, seconds, self.mode))
        self.fetch_seconds += seconds

    def _copy(self, entry: OffloadedLayer) -> list[torch.Tensor]:
        """The layer's weights on the device, from their home (on the current stream)."""
        if self.mode == "cpu" and self.device.type == "cpu":
            return [t.clone() for t in entry.host]  # a real copy, as to a device
        if self.mode == "cpu":
            return [t.to(self.device, non_blocking=True) for t in entry.host]  # pinned: async
        if self.cold:
            drop_from_page_cache(entry.file)
        with safe_open(str(entry.file), framework="pt", device=str(self.device)) as f:
            return [f.get_tensor(name) for name in entry.names]

    def _hold(self, nbytes: int) -> None:
        self.held += nbytes
        self.peak_held = max(self.peak_held, self.held)

    def _release(self, entry: OffloadedLayer) -> None:
        for p in entry.params:
            self._storages.pop(p.untyped_storage().data_ptr(), None)
            p.data = torch.empty(0, dtype=p.dtype, device=self.device)
        if entry.resident:
            self.held -= entry.nbytes
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

    @staticmethod
    def _write_file(folder: Path, i: int, names: list[str], tensors: list[torch.Tensor]) -> Path:
        """Layer i's safetensors file, written once: its name carries a hash of the weights'
        names, shapes, dtype and first values, so another model's files are not reused.
        (safetensors' torch API: any dtype, bfloat16 included, which numpy lacks.)"""
        digest = hashlib.sha1()
        for n, t in zip(names, tensors, strict=True):
            digest.update(f"{n}{tuple(t.shape)}{t.dtype}".encode())
            digest.update(bytes(t.flatten()[:64].contiguous().view(torch.uint8).tolist()))
        file = folder / f"layer-{i:03d}-{digest.hexdigest()[:12]}.safetensors"
        if not file.is_file():
            atomic_write(file, save(dict(zip(names, tensors, strict=True))))
        return file


def _from_parameters(layers: torch.nn.ModuleList) -> Weights:
    def read(i: int, names: list[str]) -> list[torch.Tensor]:
        params = dict(layers[i].named_parameters())
        return [params[n].detach().to("cpu", copy=True) for n in names]  # not views

    return read


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
