"""Sparse-attention methods: composable maskers hooked into transformers' AttentionInterface.

`SparseMethod` is imported lazily so that `import sa_bench.attention` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sa_bench.attention.method import SparseMethod

__all__ = ["SparseMethod"]


def __getattr__(name: str) -> Any:
    if name == "SparseMethod":
        from sa_bench.attention.method import SparseMethod

        return SparseMethod
    raise AttributeError(name)
