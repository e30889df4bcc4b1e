"""The PEFT adapter store: every LoRA adapter lives in the one PeftModel over the shared base."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from .config import NameTaken, UnknownName, check, check_adapter_name
from .runner import Runner


class AdapterStore:
    def __init__(self, runner: Runner, root: Path):
        self.runner = runner
        self.root = root  # <data_dir>/adapters: one PEFT folder per saved adapter
        self.info: dict[str, dict] = {}  # name -> {"name", "path", "r", "training", "step"}
        self.snapshots: dict[
            str, int
        ] = {}  # pinned copy of a training adapter -> requests using it

    def names(self) -> list[str]:
        return sorted(self.info)

    def __contains__(self, name: str) -> bool:
        return name in self.info

    def get(self, name: str) -> dict:
        if name not in self.info:
            raise UnknownName(
                f"adapter: no adapter named {name!r} (known: {', '.join(self.names()) or 'none'})"
            )
        return self.info[name]

    def load(self, name: str, path: str | Path, *, replace: bool = False) -> dict:
        check_adapter_name(name, "name")
        path = Path(path)
        check(
            (path / "adapter_config.json").is_file(),
            "path",
            f"{path} is not a PEFT adapter folder (no adapter_config.json)",
        )
        if name in self.info:
            if not replace:
                raise NameTaken(f"name: an adapter named {name!r} exists already")
            self.delete(name)
        model = self.runner.model
        if self.runner.peft:
            model.load_adapter(str(path), adapter_name=name, is_trainable=False)
        else:
            model = PeftModel.from_pretrained(
                model, str(path), adapter_name=name, is_trainable=False
            )
        model.eval()
        self.runner.model = model
        meta = _read_json(path / "fineinfer.json")
        self.info[name] = {
            "name": name,
            "path": str(path),
            "r": model.peft_config[name].r,
            "training": False,
            "step": meta.get("step"),
        }
        return self.info[name]

    def load_saved(self) -> list[str]:
        """Load every adapter saved under the data directory (at engine start)."""
        loaded = []
        for folder in sorted(self.root.glob("*/adapter_config.json")):
            name = folder.parent.name
            try:
                self.load(name, folder.parent)
                loaded.append(name)
            except ValueError:
                continue
        return loaded

    def delete(self, name: str, *, files: bool = False) -> None:
        self.get(name)
        check(
            not self.info[name]["training"],
            "name",
            f"adapter {name!r} is being trained; stop its job first",
        )
        self._delete(name)
        path = self.info.pop(name)["path"]
        if files and path and Path(path).parent == self.root:
            shutil.rmtree(path, ignore_errors=True)

    def create(self, name: str, config: LoraConfig) -> None:
        """A new trainable adapter over the shared base (engine thread)."""
        if self.runner.peft:
            self.runner.model.add_adapter(name, config)
        else:
            self.runner.model = get_peft_model(self.runner.model, config, adapter_name=name)
        self.runner.model.eval()
        self.info[name] = {"name": name, "path": None, "r": config.r, "training": True, "step": 0}

    def train(self, name: str) -> list[torch.nn.Parameter]:
        """Make `name` the adapter that plain forwards use and that gets gradients."""
        self.runner.model.set_adapter(name)
        params = [p for n, p in self.runner.model.named_parameters() if f".{name}." in n]
        for p in params:
            p.requires_grad_(True)
        return params

    def save(self, name: str, folder: Path, meta: dict | None = None) -> Path:
        """Write `name` in PEFT's format (adapter_model.safetensors + adapter_config.json),
        atomically: a reader sees the old folder or the new one, never a half-written one."""
        model = self.runner.model
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        state = get_peft_model_state_dict(model, adapter_name=name)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in state.items()},
            tmp / "adapter_model.safetensors",
        )
        config = copy.deepcopy(model.peft_config[name])
        config.inference_mode = True
        config.save_pretrained(str(tmp))
        (tmp / "fineinfer.json").write_text(json.dumps(meta or {}))
        _replace_dir(tmp, folder)
        return folder

    def restore(self, name: str, folder: Path) -> None:
        """Load saved LoRA weights into the existing adapter `name` (in place: optimizers keep their tensors)."""
        state = load_file(str(folder / "adapter_model.safetensors"), device=str(self.runner.device))
        with torch.no_grad():
            result = set_peft_model_state_dict(self.runner.model, state, adapter_name=name)
        check(not result.unexpected_keys, "checkpoint", f"{folder} does not match adapter {name!r}")

    def pin(self, name: str) -> str:
        """The adapter a new request should use: a training adapter's snapshot at its current step."""
        info = self.info[name]
        if not info["training"]:
            return name
        snap = f"{name}__at{info['step']}"
        if snap not in self.snapshots:
            self._release_unused()
            config = copy.deepcopy(self.runner.model.peft_config[name])
            config.inference_mode = True
            self.runner.model.add_adapter(snap, config)
            with torch.no_grad():
                for layer in self._lora_layers():
                    if name in layer.lora_A:
                        for part in (layer.lora_A, layer.lora_B):
                            part[snap].weight.copy_(part[name].weight)
                            part[snap].weight.requires_grad_(False)
            self.runner.model.set_adapter(name)  # add_adapter must not change which adapter trains
            self.snapshots[snap] = 0
        self.snapshots[snap] += 1
        return snap

    def unpin(self, adapter: str | None) -> None:
        if adapter in self.snapshots:
            self.snapshots[adapter] -= 1
            self._release_unused()

    def _release_unused(self) -> None:
        for snap, refs in list(self.snapshots.items()):
            name, _, step = snap.rpartition("__at")
            current = (
                name in self.info
                and self.info[name]["training"]
                and str(self.info[name]["step"]) == step
            )
            if refs == 0 and not current:
                self._delete(snap)
                del self.snapshots[snap]

    def _delete(self, adapter: str) -> None:
        model = self.runner.model
        model.delete_adapter(adapter)
        if not model.peft_config:  # the last one: back to the plain base model
            self.runner.model = model.unload()

    def _lora_layers(self) -> list[LoraLayer]:
        return [m for m in self.runner.model.modules() if isinstance(m, LoraLayer)]


def _replace_dir(new: Path, target: Path) -> None:
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
