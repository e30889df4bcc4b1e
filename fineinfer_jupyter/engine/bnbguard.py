"""bitsandbytes without downloads: its CPU backend, when imported (PEFT imports it whenever it
is installed), asks the Hugging Face Hub for a 4-bit kernel through the `kernels` package.
Nothing is downloaded at run time here (docs/design.md, "Base weight formats"): while that one
module runs, `kernels` cannot be imported, so bitsandbytes uses its own built-in kernel. No
torch import: the package installs this before anything imports bitsandbytes."""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys

GUARDED = "bitsandbytes.backends.cpu.ops"


class _Guarded(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        saved = sys.modules.get("kernels", ...)
        sys.modules["kernels"] = None  # `from kernels import get_kernel` raises ImportError
        quiet = logging.getLogger("bitsandbytes")
        level, quiet.level = quiet.level, logging.ERROR
        try:
            self.loader.exec_module(module)
        finally:
            quiet.setLevel(level)
            if saved is ...:
                sys.modules.pop("kernels", None)
            else:
                sys.modules["kernels"] = saved


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != GUARDED:
            return None
        sys.meta_path.remove(self)  # find the real spec once, then step aside
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            spec.loader = _Guarded(spec.loader)
        return spec


def install() -> None:
    if GUARDED not in sys.modules and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
