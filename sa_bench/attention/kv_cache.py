"""The job's KV cache: transformers' `DynamicCache` with its full-attention layers pre-sized.

transformers' `DynamicLayer` appends by `torch.cat`, so every decode step copies the whole
layer cache (at 128k tokens of an 8B model, ~32 GiB of memory traffic per token). A
`PresizedLayer` keeps its keys and values in a buffer [b, Hk, capacity, d] allocated once
(capacity: the cell's longest prompt plus its generated tokens, `capacity`), with `keys` /
`values` the views of the live part; `update` writes the new positions in place.

The buffer is recognised from the live view alone (`room`: a view of the first n positions
of an allocation of [b, Hk, cap, d] of its own), so everything that assigns or slices
`keys` / `values` keeps working without knowing the class: `crop` (the runner's rewind
between questions) leaves a shorter view and only moves the length; a snapshot of the
views, restored after an answer (compression), brings back its buffer with its room;
compression stores the kept positions through `store`, in a new buffer of the kept length
plus the room the cell still needs (`to_come`: the capacity less the compressed length, not
whatever room a press's own passes grew), so memory really falls. Writes only ever go past the
live length, so views taken earlier (snapshots) keep their contents. A layer that runs out
of room (a caller that gave no capacity, or too little, or a compressed layer whose room
went elsewhere) moves to a buffer of twice its length: appends stay amortized.

Only plain full-attention layers (`DynamicLayer`) are replaced. Sliding-window layers
(`DynamicSlidingWindowLayer`: a `torch.cat` of the window, not of the whole cache),
linear-attention / convolution states and hybrid layers stay transformers' own classes.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

ROUND = 256
"""Capacities are rounded up to a multiple of this many positions."""


def capacity(longest_prompt: int, max_new: int) -> int:
    """Positions a cache must hold for prompts of up to `longest_prompt` tokens followed by
    `max_new` generated ones, rounded up to a multiple of `ROUND`."""
    need = max(1, longest_prompt + max_new)
    return -(-need // ROUND) * ROUND


def room(t: Tensor) -> int:
    """Positions the buffer behind `t` [b, H, n, d] holds: cap >= n when `t` is the first n
    positions of a whole allocation of [b, H, cap, d] (made by `with_room`, or a `torch.cat`
    result cropped), else n (nothing may be written past its end)."""
    if t.dim() != 4:
        return t.shape[-2] if t.dim() >= 2 else 0
    b, h, n, d = t.shape
    cap = t.stride(1) // max(d, 1)
    if (t.storage_offset() != 0 or t.stride(3) != 1 or t.stride(2) != d or t.stride(1) != cap * d
            or cap < n or (b > 1 and t.stride(0) != h * cap * d)
            or t.untyped_storage().nbytes() != b * h * cap * d * t.element_size()):
        return n
    return cap


def with_room(t: Tensor, extra: int) -> Tensor:
    """`t` [b, H, n, d] copied into a new buffer of n + `extra` positions -> the view of its
    first n."""
    b, h, n, d = t.shape
    buf = t.new_empty(b, h, n + max(extra, 0), d)
    if n:
        buf[:, :, :n].copy_(t)
    return buf[:, :, :n]


def _append(live: Tensor, new: Tensor) -> Tensor:
    """`live` [b, H, n, d] followed by `new` [b, H, q, d], written in place when the buffer has
    room (else into a new one of max(n + q, 2n) positions) -> the view of n + q."""
    n, end = live.shape[2], live.shape[2] + new.shape[2]
    if room(live) < end:
        live = with_room(live, max(end, 2 * n) - n)
    out = live.as_strided((*live.shape[:2], end, live.shape[3]), live.stride())
    out[:, :, n:].copy_(new)
    return out


@functools.cache
def presized_layer() -> type:
    """The class `PresizedLayer`, a subclass of transformers' `DynamicLayer` that appends in
    place into a buffer of `capacity` positions (see the module docstring); made on first use,
    as transformers is imported lazily."""
    from transformers.cache_utils import DynamicLayer

    class PresizedLayer(DynamicLayer):
        def __init__(self, capacity: int = 0) -> None:
            super().__init__()
            self.capacity = capacity

        def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
            self.device = key_states.device
            self.keys = with_room(key_states[:, :, :0], self.capacity)
            self.values = with_room(value_states[:, :, :0], self.capacity)
            self.is_initialized = True

        def update(self, key_states: Tensor, value_states: Tensor, *args: Any,
                   **kwargs: Any) -> tuple[Tensor, Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.keys = _append(self.keys, key_states)
            self.values = _append(self.values, value_states)
            return self.keys, self.values

    return PresizedLayer


def is_presized(layer: Any) -> bool:
    return type(layer) is presized_layer()


def is_plain(layer: Any) -> bool:
    """A plain full-attention layer (transformers' `DynamicLayer` or a `PresizedLayer`):
    `crop` rewinds it, compression may shrink it."""
    from transformers.cache_utils import DynamicLayer

    return type(layer) is DynamicLayer or is_presized(layer)


def presized_cache(config: Any, capacity: int) -> Any:
    """transformers' `DynamicCache` for `config`, its full-attention layers `PresizedLayer`s
    of `capacity` positions (other layer kinds unchanged)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=config)
    cache.layers = [presized_layer()(capacity) if type(layer) is DynamicLayer else layer
                    for layer in cache.layers]
    if cache.layer_class_to_replicate is DynamicLayer:  # layers made on first use
        cache.layer_class_to_replicate = functools.partial(presized_layer(), capacity)
    return cache


def to_come(layer: Any) -> int:
    """Positions a `PresizedLayer` still needs for the cell's tokens after its live ones (its
    capacity less its length; 0 for other layers): the room compression keeps."""
    return max(0, layer.capacity - layer.keys.shape[2]) if is_presized(layer) else 0


def store(layer: Any, keys: Tensor, values: Tensor, extra: int) -> None:
    """Replace `layer`'s keys and values (compression): a `PresizedLayer` gets a new buffer of
    the new length plus `extra` positions of room for the tokens still to come (past it, it
    grows by doubling)."""
    if is_presized(layer):
        keys, values = with_room(keys, extra), with_room(values, extra)
    layer.keys, layer.values = keys, values
