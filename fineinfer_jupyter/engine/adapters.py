"""The PEFT adapter store: every LoRA adapter lives in the one PeftModel over the shared base.

The store is the only owner of adapter metadata. The engine thread changes it; other threads
read `names()`, `list()` and `resolve()`, which see one consistent snapshot (every change
publishes a new dict instead of editing the one readers may hold). Snapshots of an adapter
under training are named "<name>@<step>": '@' is not allowed in a user's adapter name, so the
two can never collide.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from .adapter_check import check_lora_folder, layer_shapes
from .config import NameTaken, UnknownName, check, check_adapter_name
from .runner import Runner
from .storage import atomic_dir, atomic_write, is_scratch, recover

log = logging.getLogger("fineinfer")
SNAPSHOT = "@"


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: str | None  # the saved PEFT folder, None until saved
    r: int
    training: bool
    step: int | None  # optimizer steps its weights have had (None: unknown, loaded from elsewhere)
    job: str | None = None  # the job that trained it (None: loaded from elsewhere)

    def to_dict(self) -> dict:
        return asdict(self)


class AdapterStore:
    def __init__(self, runner: Runner, root: Path, *, base_hash: str | None = None):
        self.runner = runner
        self.root = root  # <data_dir>/adapters: one PEFT folder per saved adapter
        self.base_hash = base_hash  # models.shape_hash of the base model, before any adapter
        self._info: dict[str, AdapterInfo] = {}  # replaced, never edited: readers hold one
        self._snapshots: dict[str, int] = {}  # "<name>@<step>" -> requests pinned to it
        self._pins: dict[str, int] = {}  # adapter -> requests using it (not under training)
        self._leaving: set[str] = set()  # deleted, unloaded when its last request ends
        # the prefix cache's: each adapter's weights version, and who hears of a change
        self._versions: dict[str, int] = {}
        self.on_change = None  # called with an adapter's (or snapshot's) name
        # called before anything changes the model's structure, its active adapter or LoRA
        # weights: waits for a training run in flight on the training worker (worker.py)
        self.before_change = None

    def version(self, name: str | None) -> int:
        """Goes up each time `name`'s weights change (the base model's never do)."""
        return self._versions.get(name, 0) if name is not None else 0

    def pin_name(self, name: str | None) -> str | None:
        """What pin(name) would give now (nothing is pinned)."""
        if name is None:
            return None
        info = self.get(name)
        return f"{name}{SNAPSHOT}{info.step}" if info.training else name

    def _changed(self, name: str) -> None:
        self._versions[name] = self._versions.get(name, 0) + 1
        if self.on_change is not None:
            self.on_change(name)

    # -- reads (any thread) -------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(self._info)

    def list(self) -> list[dict]:
        info = self._info
        return [info[name].to_dict() for name in sorted(info)]

    def __contains__(self, name: str) -> bool:
        return name in self._info or name in self._leaving

    def check_free(self, name: str, field: str = "name") -> None:
        """NameTaken unless `name` can be given to a new adapter now."""
        if name in self._info:
            raise NameTaken(f"{field}: an adapter named {name!r} exists already")
        if name in self._leaving:
            raise NameTaken(
                f"{field}: {name!r} was deleted but {self._pins.get(name, 0)} running requests "
                "still use it; try again when they end"
            )

    def get(self, name: str) -> AdapterInfo:
        info = self._info.get(name)
        if info is None:
            known = ", ".join(self.names()) or "none"
            raise UnknownName(f"adapter: no adapter named {name!r} (known: {known})")
        return info

    def resolve(self, name: str | None) -> str | None:
        """The adapter a request asks for (None, "" and "base" are the base model)."""
        if name in (None, "", "base"):
            return None
        if name not in self._info:
            known = ", ".join(self.names()) or "none"
            raise UnknownName(
                f"adapter: no adapter named {name!r} (known: {known}; use 'base' for the base model)"
            )
        return name

    def owner(self, name: str) -> str | None:
        """Who holds `name` now: None (nobody), the id of the job that trained it, or what it
        is when no job did."""
        if name in self._leaving:
            return "a deleted adapter that running requests still use"
        info = self._info.get(name)
        if info is None:
            return None
        return info.job or "an adapter loaded from a folder"

    @property
    def snapshots(self) -> list[str]:
        return sorted(self._snapshots)

    # -- changes (engine thread) ----------------------------------------------------------------

    def _quiet(self) -> None:
        """Before the model's structure, its active adapter or LoRA weights change."""
        if self.before_change is not None:
            self.before_change()
        self.runner.walk.forget()  # (each module's LoRA layers are found again)

    def _set(self, info: AdapterInfo) -> None:
        self._info = {**self._info, info.name: info}

    def _drop(self, name: str) -> AdapterInfo:
        info = self._info[name]
        self._info = {k: v for k, v in self._info.items() if k != name}
        self._changed(name)
        return info

    def load(
        self, name: str, path: str | Path, *, replace: bool = False, job: str | None = None
    ) -> AdapterInfo:
        """Load a saved LoRA adapter folder under `name` (checked first: adapter_check.py)."""
        check_adapter_name(name, "name")
        path = Path(path)
        config = check_lora_folder(path, layer_shapes(self.runner.walk.causal_lm))
        meta = _read_json(path / "fineinfer.json")
        self._check_base(path, meta.get("base_model"))
        if replace and name in self._info:
            self.delete(name)
        self.check_free(name)
        wrapped = self.runner.peft
        self._quiet()
        try:
            model = self.runner.model
            if wrapped:
                model.load_adapter(str(path), adapter_name=name, is_trainable=False)
            else:
                model = PeftModel.from_pretrained(
                    model, str(path), adapter_name=name, is_trainable=False
                )
        except Exception:
            self._forget(name, wrapped)
            raise
        model.eval()
        self.runner.model = model
        step, owner = meta.get("step"), meta.get("job")
        info = AdapterInfo(
            name,
            str(path),
            config["r"] if isinstance(config.get("r"), int) else model.peft_config[name].r,
            False,
            step if isinstance(step, int) else None,
            (owner if isinstance(owner, str) else None) or job,
        )
        self._set(info)
        self._changed(name)
        return info

    def _check_base(self, path: Path, base) -> None:
        """An adapter that says which base model it was trained on (fineinfer.json "base_model",
        written by an exported job's train.py) must name this one."""
        if not isinstance(base, dict) or self.base_hash is None:
            return
        theirs = base.get("shape_hash")
        check(
            theirs in (None, self.base_hash),
            "path",
            f"{path.name} was trained on {base.get('name', 'another base model')} (shape hash "
            f"{theirs}); this engine's base model has shape hash {self.base_hash}",
        )

    def load_saved(self) -> list[str]:
        """Load every adapter saved under the data directory (at engine start). A folder that
        does not load is skipped (and logged); it never stops the others or the engine."""
        loaded = []
        self.root.mkdir(parents=True, exist_ok=True)
        for folder in sorted(p for p in self.root.iterdir() if not is_scratch(p)):
            try:
                recover(folder)
                if not folder.is_dir() or not (folder / "adapter_config.json").is_file():
                    continue
                self.load(folder.name, folder)
                loaded.append(folder.name)
            except Exception:
                log.exception("saved adapter %s does not load; skipped", folder)
        return loaded

    def _forget(self, name: str, wrapped: bool) -> None:
        """Undo whatever a load that failed half-way added to the model."""
        model = self.runner.model
        if wrapped:
            if name in model.peft_config:
                self._unload(name)
            return
        for parent in list(model.modules()):  # PeftModel.from_pretrained wraps layers in place
            for child_name, child in list(parent.named_children()):
                if isinstance(child, LoraLayer):
                    setattr(parent, child_name, child.get_base_layer())
        model.__dict__.pop("peft_config", None)  # and marks the model as a PEFT one

    def delete(self, name: str, *, files: bool = False) -> None:
        """Unload `name`; requests that use it now finish with it first (it is unloaded when
        the last one ends), new ones no longer find it."""
        info = self.get(name)
        check(not info.training, "name", f"adapter {name!r} is being trained; stop its job first")
        self._drop(name)
        if self._pins.get(name):
            self._leaving.add(name)
        else:
            self._unload(name)
        if files and info.path and Path(info.path).parent == self.root:
            shutil.rmtree(info.path, ignore_errors=True)

    def create(self, name: str, config: LoraConfig, *, job: str | None = None) -> None:
        """A new adapter over the shared base, to be trained."""
        self.check_free(name, "adapter")
        self._quiet()
        if self.runner.peft:
            self.runner.model.add_adapter(name, config)
        else:
            self.runner.model = get_peft_model(self.runner.model, config, adapter_name=name)
        self.runner.model.eval()
        self._set(AdapterInfo(name, None, config.r, False, 0, job))
        self._changed(name)

    def begin_training(self, name: str) -> list[torch.nn.Parameter]:
        """Make `name` the adapter that plain forwards use and that gets gradients; returns
        its parameters. Requests that ask for it from now on get snapshots."""
        info = self.get(name)
        self._quiet()
        self.runner.model.set_adapter(name)
        params = [
            part[name].weight
            for layer in self._lora_layers()
            for part in (layer.lora_A, layer.lora_B)
            if name in part
        ]
        for p in params:
            p.requires_grad_(True)
        self._set(replace(info, training=True, step=info.step or 0))
        self._changed(name)
        return params

    def trained(self, name: str, step: int) -> None:
        """`name`'s weights now have `step` optimizer steps (new requests pin a new snapshot)."""
        self._set(replace(self.get(name), step=step))
        self._changed(name)

    def end_training(self, name: str, step: int, path: Path | None) -> None:
        self._quiet()
        self.runner.model.requires_grad_(False)
        info = self.get(name)
        self._set(replace(info, training=False, step=step, path=str(path) if path else info.path))
        self._changed(name)
        self._release_unused()

    def save(self, name: str, folder: Path, meta: dict | None = None) -> Path:
        """Write `name` in PEFT's format (adapter_model.safetensors + adapter_config.json),
        atomically: a reader sees the old folder or the new one, never a half-written one."""
        with atomic_dir(folder) as tmp:
            self.write(name, tmp, meta)
        return folder

    def write(self, name: str, folder: Path, meta: dict | None = None) -> None:
        """The adapter's files into an existing folder (not atomic: see save)."""
        model = self.runner.model
        state = get_peft_model_state_dict(model, adapter_name=name)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in state.items()},
            folder / "adapter_model.safetensors",
        )
        config = copy.deepcopy(model.peft_config[name])
        config.inference_mode = True
        config.save_pretrained(str(folder))
        atomic_write(folder / "fineinfer.json", json.dumps(meta or {}))

    def restore(self, name: str, folder: Path, *, step: int | None = None) -> None:
        """Load saved LoRA weights into the existing adapter `name` (in place: optimizers keep
        their tensors)."""
        recover(folder)
        state = load_file(str(folder / "adapter_model.safetensors"), device=str(self.runner.device))
        self._quiet()
        with torch.no_grad():
            result = set_peft_model_state_dict(self.runner.model, state, adapter_name=name)
        check(not result.unexpected_keys, "checkpoint", f"{folder.name} does not match {name!r}")
        self._changed(name)
        if step is not None:
            self._set(replace(self.get(name), step=step))

    # -- snapshots --------------------------------------------------------------------------------

    def pin(self, name: str | None) -> str | None:
        """The adapter a request admitted now uses: a training adapter's snapshot at its current
        step (made on first use), else the adapter itself. Undo with unpin()."""
        if name is None:
            return None
        info = self.get(name)
        if not info.training:
            self._pins[name] = self._pins.get(name, 0) + 1
            return name
        snap = f"{name}{SNAPSHOT}{info.step}"
        if snap not in self._snapshots:
            self._quiet()  # (add_adapter and set_adapter change what a training forward uses)
            self._release_unused()
            model = self.runner.model
            config = copy.deepcopy(model.peft_config[name])
            config.inference_mode = True
            model.add_adapter(snap, config)
            with torch.no_grad():
                for layer in self._lora_layers():
                    if name in layer.lora_A:
                        for part in (layer.lora_A, layer.lora_B):
                            part[snap].weight.copy_(part[name].weight)
                            part[snap].weight.requires_grad_(False)
            model.set_adapter(name)  # add_adapter must not change which adapter trains
            self._snapshots[snap] = 0
        self._snapshots[snap] += 1
        return snap

    def unpin(self, adapter: str | None) -> None:
        if adapter in self._snapshots:
            self._snapshots[adapter] -= 1
            self._release_unused()
        elif adapter in self._pins:
            self._pins[adapter] -= 1
            if not self._pins[adapter]:
                del self._pins[adapter]
                if adapter in self._leaving:
                    self._leaving.discard(adapter)
                    self._unload(adapter)

    def _release_unused(self) -> None:
        """Drop snapshots no request uses, except the newest of an adapter still training
        (the next request will want it)."""
        for snap, refs in list(self._snapshots.items()):
            name, _, step = snap.rpartition(SNAPSHOT)
            info = self._info.get(name)
            current = info is not None and info.training and str(info.step) == step
            if refs == 0 and not current:
                self._unload(snap)
                del self._snapshots[snap]

    def _unload(self, adapter: str) -> None:
        self._quiet()
        self._changed(adapter)
        model = self.runner.model
        model.delete_adapter(adapter)
        if not model.peft_config:  # the last one: back to the plain base model
            self.runner.model = model.unload()

    def _lora_layers(self) -> list[LoraLayer]:
        return [m for m in self.runner.model.modules() if isinstance(m, LoraLayer)]


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
