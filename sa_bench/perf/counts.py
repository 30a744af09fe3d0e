"""Kernel launches and host syncs of a call, counted on CPU: what one attention call would cost
a GPU at batch 1 beyond the bytes it reads (a launch of a few microseconds per operator; a sync
stalls the host until the device has run everything queued before it).

    with device_work() as work:
        method.attention(...)
    work.launches, work.syncs, work.names

Counted below autograd, at the operators' dispatch (composite operators appear as the kernels
they run): a *launch* is an operator that is not a view and not an uninitialised allocation;
a *sync* is an operator whose result the host must read (`item`, `bool(t)`, `int(t)`,
`nonzero`, `masked_select`, `unique`, `repeat_interleave` by a tensor, `equal`) or a
`Tensor.tolist()`. Run inside `accelerator_paths()` (see `sa_bench.attention.ops`) so CPU
takes the branches a GPU takes. `LargeWrites` counts the operators that write a tensor of at
least a given size (copies of a whole KV cache layer)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sa_bench.attention.ops import accelerator_paths

SYNCS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2",
         "unique_consecutive", "unique_dim", "equal", "is_nonzero"}
FREE = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
        "lift_fresh", "detach", "alias", "_unsafe_view", "scalar_tensor"}
"""Not launches. `scalar_tensor`: a Python number wrapped by a composite operator
(`torch.where(mask, x, 0.0)`) is a CPU scalar even on a GPU, passed to the kernel as an
argument (the package makes no `scalar_tensor` of its own)."""


class DeviceWork(TorchDispatchMode):
    """Counts launches and syncs of the operators run within (see module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.launches = 0
        self.syncs = 0
        self.names: Counter = Counter()
        self.sync_names: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCS or (name == "repeat_interleave" and func._overloadname == "Tensor"
                             and not (kwargs or {}).get("output_size")):
            self.syncs += 1
            self.sync_names[name] += 1
        elif not func.is_view and name not in FREE:
            self.launches += 1
            self.names[name] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def device_work() -> Iterator[DeviceWork]:
    """Count the launches and syncs of the block on the paths an accelerator takes."""
    real_tolist = torch.Tensor.tolist
    work = DeviceWork()

    def tolist(self):
        work.syncs += 1
        work.sync_names["tolist"] += 1
        return real_tolist(self)

    torch.Tensor.tolist = tolist
    try:
        with accelerator_paths(), work:
            yield work
    finally:
        torch.Tensor.tolist = real_tolist


class LargeWrites(TorchDispatchMode):
    """The operators (not views, not allocations) run within whose output holds at least
    `min_bytes`, by name: with `min_bytes` the size of one layer's cached keys, each is a copy
    of a whole cache layer (transformers' DynamicCache appends by `torch.cat`: two per layer
    and token)."""

    def __init__(self, min_bytes: int) -> None:
        super().__init__()
        self.min_bytes = min_bytes
        self.names: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and func.overloadpacket.__name__ not in FREE:
            outs = out if isinstance(out, (tuple, list)) else (out,)
            if any(isinstance(t, torch.Tensor) and t.nbytes >= self.min_bytes for t in outs):
                self.names[func.overloadpacket.__name__] += 1
        return out
