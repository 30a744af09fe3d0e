"""torch, imported on first use.

The sweeper validates every cell's config in its own process on each resume; that imports
the masker classes, and importing torch (~1.7 s) would dominate a resume that runs nothing.
The attention modules therefore name torch through these stand-ins, which import it the
first time an attribute is read. `sys.modules` is left alone: `import torch` anywhere else
behaves as always.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any


class LazyModule:
    """Stands for the module `name`; imports it on the first attribute read and keeps each
    attribute read in its own `__dict__`, so later reads are plain attribute hits."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:  # only called for attributes not yet cached
        if self._module is None:
            self._module = importlib.import_module(self._name)
        value = getattr(self._module, attr)
        setattr(self, attr, value)
        return value

    def __repr__(self) -> str:
        state = "imported" if self._module is not None else "not imported yet"
        return f"<lazy module {self._name!r} ({state})>"


if TYPE_CHECKING:  # type checkers see the real modules
    import torch
    import torch.nn.functional as F
else:
    torch = LazyModule("torch")
    F = LazyModule("torch.nn.functional")

__all__ = ["F", "LazyModule", "torch"]
