"""Calling a transformers model's forward with a cache, the same way on every transformers 5.x
release sa_bench supports, and waiting for its GPU work (used by the job's path, by presses
that run extra passes, and by the perf commands)."""

from __future__ import annotations

import functools
import inspect
from typing import Any


def with_cache(model: Any, cache: Any) -> dict[str, Any]:
    """Keyword arguments that hand `cache` to the model's forward, logits of the last position
    only (the model's own `logits_to_keep`, where its forward has it)."""
    kwargs = {cache_keyword(type(model)): cache, "use_cache": True}
    if _keeps_logits(type(model)):
        kwargs["logits_to_keep"] = 1
    return kwargs


@functools.cache
def _keeps_logits(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def synchronize(device: Any) -> None:
    """Wait for queued GPU work, so timings measure the work and not its launch."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


@functools.cache
def cache_keyword(model_class: type) -> str:
    """`cache` from transformers 5.24, `past_key_values` before. An unknown keyword would be
    swallowed silently and every step would run without its context."""
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
