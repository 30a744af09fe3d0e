"""KVzip (Kim et al., 2025, https://arxiv.org/abs/2505.23416), kvpress 0.5.4's KVzipPress:
query-agnostic compression by context reconstruction.

After the context's prefill the model is fed, over the cached context, a "repeat the previous
context" prompt followed by the context itself, in chunks of `chunk_size` tokens (each later
chunk's prompt ends with the last `prev_postfix_size` tokens of the chunk before). Each cached
position of a chunk is scored, per layer and kv head, by the largest attention any query of
its reconstruction pass (any query head of the group) pays it, the softmax taken over the
sinks, the chunk and the pass's own tokens only; the first `n_sink` positions score 1. The
pass's own keys are dropped again after each pass. Then the lowest scores go:
int(r * L * Hk * n) of them over all compressed layers together (`layerwise: false`, the
default: layers and heads keep different counts) or int(r * Hk * n) per layer
(`layerwise: true`); within a layer the heads keep different counts (head-wise, stored as
AdaKV's layout, see `sa_bench.attention.compression`).

The prompt's tokens come from the model's tokenizer, as in kvpress: with a chat template its
user-turn prefix (not scored: those positions keep score 0 after the sinks, and are not
repeated) and its generation-prompt suffix between the prompt and the repeated chunk; without
one, no prefix and "\\n".

Where sa_bench differs from kvpress:
- a tokenizer with a chat template is treated as templated only when the context starts with
  the template's prefix tokens (the job rendered it with the template); otherwise as kvpress
  treats a tokenizer without one;
- scores are kept in float32 (kvpress: the model's dtype, so bfloat16 models tie more);
- `dense_layers` are neither compressed nor counted in the global allocation;
- kvpress masks the pruned keys; here they are removed (head-wise layout: memory falls with
  the ratio, to the head keeping most);
- KVzip+ normalisation (`kvzip_plus_normalization`) is not implemented.

The extra passes (count, tokens fed, seconds) are in stats.json's attention.compression
(`reconstruction_passes`, `reconstruction_tokens`, `reconstruction_s`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from sa_bench.attention.compression import (
    ROW_BLOCK_BYTES,
    Compressor,
    Observation,
    Press,
    head_wise_layout,
    kept_count,
)
from sa_bench.attention.kv_cache import is_plain
from sa_bench.config import ConfigError
from sa_bench.lazy import torch

if TYPE_CHECKING:
    from torch import Tensor

FIRST_PROMPT = "\n\nRepeat the previous context exactly."
LATER_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"


@dataclass
class KVzip(Press):
    """KVzip's context-reconstruction scores and its global (or per-layer) head-wise budget
    (see the module docstring)."""

    layerwise: bool = False
    n_sink: int = 4
    chunk_size: int = 2048
    prev_postfix_size: int = 8
    head_wise: ClassVar[bool] = True
    reconstructs: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.query_aware:
            raise ConfigError("query_aware: KVzip is query-agnostic (it compresses the context "
                              "once); leave query_aware unset")
        if self.n_sink < 0 or self.chunk_size < 1 or self.prev_postfix_size < 0:
            raise ConfigError(f"n_sink, chunk_size, prev_postfix_size: expected >= 0, >= 1, >= 0, "
                              f"got {self.n_sink}, {self.chunk_size}, {self.prev_postfix_size}")
        self._kept: dict[int, Tensor] = {}

    def passes(self, ids: list[int], tokenizer: Any) -> list[tuple[int, int, list[int]]]:
        """(start, end, tokens fed) of each reconstruction pass over the context `ids`: the
        positions [start, end) it scores."""
        prefix, suffix = template_tokens(tokenizer, ids)
        body, size = ids[prefix:], self.chunk_size
        chunks = [body[i:i + size] for i in range(0, len(body), size)]
        first, later = encode(tokenizer, FIRST_PROMPT), encode(tokenizer, LATER_PROMPT)
        out, start = [], prefix
        for i, chunk in enumerate(chunks):
            prev = chunks[i - 1] if i else []
            prompt = first if i == 0 else later + prev[len(prev) - self.prev_postfix_size:]
            out.append((start, start + len(chunk), prompt + suffix + chunk))
            start += len(chunk)
        return out

    def plan(self, compressor: Compressor, cache: Any, layers: list[int]) -> None:
        """The reconstruction passes over `cache` (scores of `layers`), then the allocation."""
        if compressor.model is None or compressor.tokenizer is None:
            raise ValueError("kvzip: the reconstruction prompt needs the model's tokenizer (give "
                             "SparseMethod.installed its tokenizer)")
        self._kept = {}
        if not layers:
            return
        for layer, entry in enumerate(cache.layers):  # dense_layers too: every pass is rewound
            if not is_plain(entry):
                raise ValueError(f"kvzip: its reconstruction passes are rewound by cropping every "
                                 f"cache layer; layer {layer} is a {type(entry).__name__}")
        ids = [t for part in compressor.context_ids for t in part[0].tolist()]
        b, hk, n, _ = cache.layers[layers[0]].keys.shape
        if n != len(ids):
            raise ValueError(f"kvzip: the cache holds {n} positions but {len(ids)} context tokens "
                             f"were prefilled")
        scores = {layer: torch.zeros(b, hk, n, device=cache.layers[layer].keys.device)
                  for layer in layers}
        for s in scores.values():
            s[..., :self.n_sink] = 1.0
        from sa_bench.models.forward import synchronize, with_cache

        model = compressor.model
        device = model.get_input_embeddings().weight.device
        for start, end, feed in self.passes(ids, compressor.tokenizer):
            t0 = time.perf_counter()

            def score(layer: int, query: Tensor, key: Tensor, start=start, end=end) -> None:
                if layer in scores:
                    scores[layer][..., start:end] = self.chunk_scores(query, key, start, end)

            compressor.scoring = score
            try:
                positions = torch.arange(n, n + len(feed), device=device)[None]
                with torch.inference_mode():
                    model(input_ids=torch.tensor([feed], device=device), position_ids=positions,
                          **with_cache(model, cache))
            finally:
                compressor.scoring = None
            for entry in cache.layers:  # the pass's own keys go again
                if entry.is_initialized:
                    entry.crop(n - entry.get_seq_length())
            synchronize(cache.layers[layers[-1]].keys.device)
            totals, seconds = compressor.totals, time.perf_counter() - t0
            totals["reconstruction_passes"] = totals.get("reconstruction_passes", 0) + 1
            totals["reconstruction_tokens"] = totals.get("reconstruction_tokens", 0) + len(feed)
            totals["reconstruction_s"] = totals.get("reconstruction_s", 0.0) + seconds
        self._kept = self.allocate(scores)

    def chunk_scores(self, query: Tensor, key: Tensor, start: int, end: int) -> Tensor:
        """[b, Hk, end - start]: the largest softmax weight any query row [b, H, q, d] of the
        pass (any head of a kv head's group) gives each position in [start, end), the softmax
        over the sinks, [start, end) and the pass's own q keys (causal), scaled by
        1 / sqrt(d) as kvpress (in blocks of rows of at most `ROW_BLOCK_BYTES`)."""
        b, h, q, d = query.shape
        hk = key.shape[1]
        g, sink = h // hk, min(self.n_sink, start)
        sub = torch.cat([key[:, :, :sink], key[:, :, start:end], key[:, :, -q:]], 2).float()
        m = sub.shape[2]
        sub_t = sub.transpose(-1, -2)
        best = torch.zeros(b, hk, end - start, device=key.device)
        rows = max(1, ROW_BLOCK_BYTES // (4 * b * h * m))
        own = torch.arange(q, device=key.device)
        for r0 in range(0, q, rows):
            r1 = min(q, r0 + rows)
            part = query[:, :, r0:r1].float().reshape(b, hk, g * (r1 - r0), d)
            s = torch.matmul(part, sub_t).div_(math.sqrt(d)).view(b, hk, g, r1 - r0, m)
            s[..., m - q:].masked_fill_(own[None, :] > own[r0:r1, None], float("-inf"))
            p = s.softmax(-1)[..., sink:sink + end - start]
            best = torch.maximum(best, p.amax(dim=(2, 3)))
        return best

    def allocate(self, scores: dict[int, Tensor]) -> dict[int, Tensor]:
        """Per layer the kept positions [b, Hk, n] (bool): the best ceil((1 - r) * total)
        scores of all layers together, or of each layer (`layerwise`)."""
        if self.layerwise:
            return {layer: _best(s.flatten(1), kept_count(s[0].numel(), self.compression_ratio))
                    .view_as(s) for layer, s in scores.items()}
        layers = list(scores)
        home = scores[layers[0]].device  # layers may sit on several devices
        flat = torch.cat([scores[layer].flatten(1).to(home) for layer in layers], 1)
        kept = _best(flat, kept_count(flat.shape[1], self.compression_ratio))
        parts = kept.split([scores[layer][0].numel() for layer in layers], 1)
        return {layer: part.reshape(scores[layer].shape).to(scores[layer].device)
                for layer, part in zip(layers, parts, strict=True)}

    def keep(self, obs: Observation) -> tuple[Tensor, Tensor | None]:
        kept = self._kept.pop(obs.layer, None)
        if kept is None:
            raise ValueError(f"kvzip: no reconstruction scores for layer {obs.layer}")
        return head_wise_layout(kept)


def _best(x: Tensor, k: int) -> Tensor:
    """[b, m] -> bool [b, m]: True at each row's k largest values."""
    kept = torch.zeros_like(x, dtype=torch.bool)
    return kept.scatter_(-1, x.topk(k, -1).indices, True)


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def template_tokens(tokenizer: Any, context: list[int]) -> tuple[int, list[int]]:
    """(prefix length, suffix ids): kvpress's split of the chat template around a user
    message, when the context starts with the template's prefix tokens; else (0, "\\n")."""
    plain = 0, encode(tokenizer, "\n")
    if getattr(tokenizer, "chat_template", None) is None:
        return plain
    dummy = "dummy context"
    separator = "\n" + "#" * len(dummy)
    text = tokenizer.apply_chat_template([{"role": "user", "content": dummy + separator}],
                                         add_generation_prompt=True, tokenize=False,
                                         enable_thinking=False)
    head, suffix = text.split(separator)
    prefix = encode(tokenizer, head.split(dummy)[0])
    if context[:len(prefix)] != prefix:
        return plain
    return len(prefix), encode(tokenizer, suffix)


class ByteTokenizer:
    """Token id = UTF-8 byte, no chat template: the reconstruction prompt for random-weight
    models without a tokenizer (`sa_bench.perf.scale`, tests)."""

    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode())
