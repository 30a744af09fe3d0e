"""Dense attention on the model's own fast kernels, for prefill, dense layers and dense phases.

`model.attn_implementation` chooses the kernel:

- `sdpa`: torch's `scaled_dot_product_attention` (its flash / memory-efficient kernels on CUDA,
  the blocked flash kernel on CPU), GQA without copying K/V per query head;
- `flash_attention_2`: the `flash_attn` package (CUDA, half precision);
- `eager`: transformers' eager math (the exact reference, with a materialised float mask);
- `auto`: `flash_attention_2` where it can run, else `sdpa`.

Masks: for a plain causal mask without padding (always the case for a batch of one prompt),
`dense_mask` returns None instead of a [rows x keys] tensor and the kernels apply causality
themselves, aligned bottom-right (query row i sits at key position kv - q + i), so a prefill
chunk or a question after a cached context builds no mask. PyTorch's `is_causal` is aligned
top-left and so is used only where rows == keys; other row counts on SDPA get a boolean mask
built for a block of rows at a time, at most `MASK_BLOCK_BYTES` per block, so memory stays
bounded whatever the context length.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sa_bench.lazy import F, torch
from sa_bench.models.identity import flash_attn_installed

if TYPE_CHECKING:
    from torch import Tensor

IMPLEMENTATIONS = ("auto", "sdpa", "flash_attention_2", "eager")
MASK_BLOCK_BYTES = 64 * 2**20
"""Largest boolean causal mask (rows x keys bytes) built for one SDPA call."""


def resolve_implementation(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The kernel actually used for `requested` on this device and dtype."""
    if requested not in IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {IMPLEMENTATIONS}, got {requested!r}")
    flash_ok = (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
                and flash_attn_installed())
    if requested == "auto":
        requested = "flash_attention_2" if flash_ok else "sdpa"
    elif requested == "flash_attention_2" and not flash_ok:
        raise ValueError("model.attn_implementation=flash_attention_2 needs the flash_attn package, "
                         f"a CUDA device and float16/bfloat16 weights (have {device.type}, {dtype}); "
                         "use auto or sdpa")
    if requested == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError as exc:
            raise ValueError(f"flash_attn is installed but cannot be imported ({exc}); the job key "
                             "names flash-attention 2: reinstall flash_attn for this torch, or set "
                             "model.attn_implementation=sdpa") from None
    return requested


def dense_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0,
               kv_offset: int = 0, mask_function: Any = None, attention_mask: Tensor | None = None,
               local_size: int | None = None, allow_is_causal_skip: bool = True, **kwargs: Any):
    """A transformers mask-interface function: None for a plain causal mask (see module doc),
    else transformers' own boolean SDPA mask."""
    from transformers.masking_utils import prepare_padding_mask, sdpa_mask

    # as transformers' own SDPA mask: callers that add anything but causality, a window or
    # padding (packed sequences, custom overlays) pass allow_is_causal_skip=False
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    plain = (
        allow_is_causal_skip
        and (local_size is None or kv_length < local_size)
        and kv_offset == 0
        and not isinstance(q_offset, torch.Tensor)
        and q_offset + q_length == kv_length
        and (padding is None or bool(padding.all()))
    )
    if plain:
        return None
    if mask_function is not None:
        kwargs["mask_function"] = mask_function
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                     q_offset=q_offset, kv_offset=kv_offset, attention_mask=attention_mask,
                     local_size=local_size, allow_is_causal_skip=allow_is_causal_skip, **kwargs)


def dense_attention(module: Any, query: Tensor, key: Tensor, value: Tensor,
                    attention_mask: Tensor | None, scaling: float, implementation: str,
                    dropout: float = 0.0, sinks: Tensor | None = None) -> Tensor:
    """softmax(q k^T * scaling + mask) v on the chosen kernel -> [b, q, H, d].

    query [b, H, q, d], key/value [b, Hk, kv, d]; `attention_mask` as made by `dense_mask`
    (None = causal, bottom-right) or, for `eager`, by transformers' `eager_mask`. `sinks`:
    learned per-head sink logits [H] (GPT-OSS's `s_aux`), a column of the softmax that
    attends to nothing (`sink_attention`; no SDPA or flash kernel takes them).
    """
    if sinks is not None:
        return sink_attention(module, query, key, value, attention_mask, scaling, sinks,
                              implementation, dropout)
    if implementation == "eager":
        attention_mask = _additive_mask(query, key, attention_mask)
        return eager_attention(module, query, key, value, attention_mask, scaling, dropout)[0]
    q, kv = query.shape[2], key.shape[2]
    if q == 1:
        return _grouped_single_row(query, key, value, attention_mask, scaling)
    if implementation == "flash_attention_2" and attention_mask is None:
        from flash_attn import flash_attn_func

        out = flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                              softmax_scale=scaling, causal=True)  # causal = bottom-right
        return out
    if attention_mask is not None:
        return _sdpa(query, key, value, attention_mask[..., :kv], scaling)
    if q == kv:
        return _sdpa(query, key, value, None, scaling, is_causal=True)
    return _causal_in_blocks(query, key, value, scaling)


def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0):
    """Exactly transformers' eager attention: softmax(q k^T * scaling + mask) v.

    Returns (output [b, q, H, d], weights [b, H, q, kv]).
    """
    g = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(g, dim=1) if g > 1 else key
    value = value.repeat_interleave(g, dim=1) if g > 1 else value
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value)
    return out.transpose(1, 2).contiguous(), weights


def sink_attention(module: Any, query: Tensor, key: Tensor, value: Tensor,
                   attention_mask: Tensor | None, scaling: float, sinks: Tensor,
                   implementation: str = "sdpa", dropout: float = 0.0) -> Tensor:
    """Attention with learned sinks as transformers' GPT-OSS eager attention computes it:
    softmax over [q k^T * scaling + mask, sink_h] (max subtracted), the sink's column dropped,
    times v -> [b, q, H, d]. `eager`: that exact math on the whole call (so equal to the
    model's own eager attention); otherwise the same in blocks of query rows, each block's
    float32 scores at most `MASK_BLOCK_BYTES`, GQA without repeating K/V."""
    if implementation == "eager":
        attention_mask = _additive_mask(query, key, attention_mask)
        g = query.shape[1] // key.shape[1]
        key_states = key.repeat_interleave(g, dim=1) if g > 1 else key
        value_states = value.repeat_interleave(g, dim=1) if g > 1 else value
        weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
        weights = weights + attention_mask[..., : key.shape[2]]
        column = sinks.reshape(1, -1, 1, 1).expand(query.shape[0], -1, query.shape[-2], -1)
        logits = torch.cat([weights, column.to(weights.dtype)], dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True).values
        probs = F.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1]
        probs = F.dropout(probs, p=dropout, training=module.training).to(value_states.dtype)
        return torch.matmul(probs, value_states).transpose(1, 2).contiguous()
    b, h, q, d = query.shape
    hk, kv = key.shape[1], key.shape[2]
    g = h // hk
    sink = sinks.float().reshape(1, hk, g, 1, 1)
    step = max(1, min(q, MASK_BLOCK_BYTES // max(4 * b * h * kv, 1)))
    outs = []
    for r0 in range(0, q, step):
        r1 = min(q, r0 + step)
        scores = torch.matmul(query[:, :, r0:r1].unflatten(1, (hk, g)),
                              key.unsqueeze(2).transpose(-1, -2)).float() * scaling
        if attention_mask is None:
            allowed = causal_bool(q, kv, query.device)[r0:r1]
        else:
            rows = attention_mask[:, :, r0:r1] if attention_mask.shape[2] == q else attention_mask
            allowed = rows[..., :kv]
            if allowed.dtype != torch.bool:
                allowed = allowed > torch.finfo(allowed.dtype).min / 2
            allowed = allowed.unsqueeze(2)  # [b, 1, 1, rows, kv] over [b, Hk, g, rows, kv]
        scores = scores.masked_fill_(~allowed, float("-inf"))
        weights = softmax_with_sinks(scores, sink)
        out = torch.matmul(weights.to(value.dtype), value.unsqueeze(2))  # [b, Hk, g, rows, d]
        outs.append(out.flatten(1, 2).transpose(1, 2))
    return (outs[0] if len(outs) == 1 else torch.cat(outs, 1)).to(query.dtype)


def _additive_mask(query: Tensor, key: Tensor, attention_mask: Tensor | None) -> Tensor:
    """The mask as eager attention adds it: 0 where allowed, the dtype's minimum elsewhere
    (None: causal, bottom-right)."""
    if attention_mask is None:
        attention_mask = causal_bool(query.shape[2], key.shape[2], query.device)
    if attention_mask.dtype == torch.bool:
        attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype,
                                     device=query.device).masked_fill_(
            ~attention_mask, torch.finfo(query.dtype).min)
    return attention_mask


def softmax_with_sinks(scores: Tensor, sinks: Tensor | None) -> Tensor:
    """softmax over the last dim of `scores` with one more column `sinks` (broadcast to
    scores[..., :1]) in the denominator only: a row of -inf scores gives zeros."""
    if sinks is None:
        return torch.softmax(scores, -1)
    top = torch.maximum(scores.amax(-1, keepdim=True), sinks)
    weights = torch.exp(scores - top)
    return weights / (weights.sum(-1, keepdim=True) + torch.exp(sinks - top))


def causal_bool(q: int, kv: int, device: Any) -> Tensor:
    """[q, kv] bool, causal aligned bottom-right: row i sees keys 0 .. kv - q + i."""
    rows = torch.arange(q, device=device)
    return torch.arange(kv, device=device)[None, :] <= (kv - q + rows)[:, None]


def rows_per_block(q: int, kv: int, budget: int | None = None, groups: int = 1) -> int:
    """Query rows per SDPA call so a [rows x keys] boolean mask, repeated for the `groups` query
    heads of a kv head (`_sdpa` folds them into rows), stays within `budget` bytes (default
    `MASK_BLOCK_BYTES`)."""
    budget = MASK_BLOCK_BYTES if budget is None else budget
    return max(1, min(q, budget // max(kv * groups, 1)))


def _causal_in_blocks(query: Tensor, key: Tensor, value: Tensor, scaling: float) -> Tensor:
    """Causal attention of q rows over kv > q keys, bottom-right, in blocks of rows."""
    q, kv = query.shape[2], key.shape[2]
    step = rows_per_block(q, kv, groups=query.shape[1] // key.shape[1])
    outs = []
    for r0 in range(0, q, step):
        r1 = min(q, r0 + step)
        visible = kv - q + r1  # keys the block's last row may see
        mask = causal_bool(r1 - r0, visible, query.device)
        outs.append(_sdpa(query[:, :, r0:r1], key[:, :, :visible], value[:, :, :visible],
                          mask, scaling))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 1)


def _sdpa(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scaling: float,
          is_causal: bool = False) -> Tensor:
    """SDPA -> [b, q, H, d]. With a mask and GQA, the g query heads of each kv head are folded
    into its rows ([b, Hk, g*q, d], the mask repeated per head): SDPA with a mask *and*
    `enable_gqa` has no flash or memory-efficient kernel on CUDA (it falls to the float32 math
    kernel, or to cuDNN with a new plan per shape). Without a mask (is_causal, rows == keys) the
    flash kernel takes `enable_gqa` itself."""
    b, h, q, d = query.shape
    hk = key.shape[1]
    if mask is None or h == hk or mask.dim() != 4 or mask.shape[1] != 1:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=is_causal,
                                             scale=scaling, enable_gqa=h != hk)
        return out.transpose(1, 2)
    g = h // hk
    rows = mask.shape[-2]  # 1 (broadcast over rows) or q
    folded = mask.unsqueeze(2).expand(mask.shape[0], 1, g, rows, mask.shape[-1])
    folded = folded.reshape(mask.shape[0], 1, g * rows, mask.shape[-1]) if rows == q else mask
    out = F.scaled_dot_product_attention(query.reshape(b, hk, g * q, d), key, value,
                                         attn_mask=folded, scale=scaling)
    return out.view(b, h, q, d).transpose(1, 2)


def _grouped_single_row(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                        scaling: float) -> Tensor:
    """One query row: the query heads of a kv head become that head's rows, so SDPA reads each
    kv head once (faster than `enable_gqa` on CPU, no K/V copies)."""
    b, h, _, d = query.shape
    hk = key.shape[1]
    grouped = query.reshape(b, hk, h // hk, d)
    if mask is not None:
        mask = mask[..., : key.shape[2]]  # [b, 1, 1, kv] broadcasts over heads and rows
    out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, h, 1, d).transpose(1, 2)
