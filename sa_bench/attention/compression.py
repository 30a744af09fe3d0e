"""KV-cache compression (kvpress's family): which key/value pairs survive, decided once.

Design
------
A compression method is a *press*: a dataclass holding its parameters and ONE scoring
function, `score(obs) -> [b, Hk, n]` (higher = keep), as kvpress's `ScorerPress`. Everything
else lives here, once:

- budget: a press of ratio r keeps ceil((1 - r) * n) positions per layer and kv head
  (`Press.budget`; kvpress truncates, int((1 - r) * n), so at an n where (1 - r) * n is not
  whole we keep one position more); the kept positions are the top-k of the scores, stored
  in ascending position order (kvpress keeps top-k order; order does not change attention,
  but decode maskers that read positions, Quest pages, sink and local, see the kept keys in
  context order);
- the physical shrink: each full-attention cache layer's `keys` / `values` are replaced by
  the gathered kept positions (`kv_cache.store`: a pre-sized layer gets a new buffer of the
  kept length plus the room the cell still needs, `to_come`), so decoding reads fewer bytes
  and memory falls;
- RoPE: kept keys keep their rotated values; new tokens are fed with their true
  `position_ids` (the runner passes them), while the causal mask works in the compressed
  cache's index space (transformers builds it from the cache length);
- head-wise budgets (`AdaKV`): every kv head keeps its own number of positions, stored
  flat (`HeadWise`: all heads' kept keys and values one after another, each head's padded
  to a multiple of `TILE` keys, with each head's offset), so the bytes kept are the layer's
  budget, about (1 - r) of dense, plus < `TILE` padding keys per head and a small index
  (offsets, each tile's head and padding bias); kvpress only masks. The cache layer itself is
  emptied and holds only the positions appended afterwards (every head); attention
  (`head_wise_attention`) takes each kv head's kept keys, then the appended ones, in one
  softmax (on CPU one SDPA call per kv head: the pre-sized layer's room moves into the store
  as each head's slack after its kept keys, where the appended keys are written as they come;
  on an accelerator batched over tiles, launches independent of the number of heads).
  Head-wise layouts do not combine with decode maskers;
- what a press reads (`Observation`): the layer's keys and values; the last queries of the
  prefill (post-RoPE, as captured by the attention function: kvpress recomputes them from
  the hidden states, the same numbers); column sums of the prefill's attention
  probabilities; mean and covariance of the pre-RoPE queries (the captured queries rotated
  back at their true positions, the `position_ids` the model was fed). These are recorded by
  `Compressor.observe` during every prefill chunk, so they are exact under chunked prefill:
  kvpress's observed attention needs eager attention weights of the whole prefill in one
  pass; here they are summed chunk by chunk (the same sums, on any kernel), at the cost of a
  second pass over each chunk's scores in blocks of rows. A press compressing while decoding
  (`Decoding`) reads the same from the passes since its last compression instead.

Protocol (kvpress's pipeline): the context is prefilled, then compressed once without the
question (`query_aware: false`); every question is answered from the compressed cache and
the cache restored afterwards (the layers' tensors put back: bit-identical). With
`query_aware: true` the question is appended first and context + question are compressed
together (SnapKV's setting), per question. `dense_layers` are neither compressed nor masked.
Only full-attention cache layers are compressed (a sliding-window layer is refused), and the
runner's batch of one prompt has no padding, so the compressed layers need no padding mask.
Configured as the `compression:` section of a `sparse` config (`_target_` a `Press`), so one
config may combine a press with decode maskers (e.g. SnapKV, then Quest over what is left).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

from sa_bench.attention.kv_cache import is_plain, store, to_come
from sa_bench.attention.ops import (
    NEG_INF,
    bottom_right_causal,
    float_matmul,
    merge_softmax,
    reads_free,
)
from sa_bench.config import ConfigError, build_target
from sa_bench.lazy import torch

if TYPE_CHECKING:
    from torch import Tensor

ROW_BLOCK_BYTES = 64 * 2**20
"""Largest float32 block of attention probabilities built while recording column sums."""


@dataclass
class Observation:
    """What a press may read for one layer at compression time."""

    layer: int
    n_layers: int
    keys: Tensor  # [b, Hk, n, d], RoPE applied
    values: Tensor  # [b, Hk, n, d]
    scaling: float
    queries: Tensor | None = None  # the last `query_window` queries [b, H, w, d], RoPE applied
    attention_sums: Tensor | None = None  # [b, H, n]: sum over recorded rows of softmax(q.k)
    attention_rows: int = 0  # how many rows (queries) those sums are over
    query_mean: Tensor | None = None  # [b, H, d], pre-RoPE, positions >= stats_from
    query_cov: Tensor | None = None  # [b, H, d, d]
    n_observed: int | Tensor = 0
    """The true position after the last recorded query (a 0-d tensor once recorded)."""
    rope: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None
    """positions [m] -> (cos, sin) [m, d] of the model's rotary embedding."""
    out_weight: Tensor | None = None
    """The layer's output projection weight [hidden, H * d] (CriticalKV's value projection)."""


@dataclass
class Press:
    """Base of all presses: `compression_ratio` (fraction of positions removed, kvpress's
    name) and `query_aware`; subclasses implement `score`."""

    compression_ratio: float = 0.0
    query_aware: bool = False
    """Compress context and question together, per question (else the context, once)."""

    query_window: ClassVar[int] = 0
    """How many of the last prefill queries the press reads (0: none)."""
    attention_sums: ClassVar[bool] = False
    head_wise: ClassVar[bool] = False
    reconstructs: ClassVar[bool] = False
    """Runs forward passes of its own before compressing (KVzip): needs the prefilled token
    ids and the tokenizer (`Compressor.context_ids`, `Compressor.tokenizer`)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.compression_ratio < 1.0:
            raise ConfigError(f"compression_ratio: expected a value in [0, 1), got {self.compression_ratio}")

    @property
    def stats_from(self) -> int | None:
        """First position whose pre-RoPE query enters the query statistics (None: none)."""
        return None

    @property
    def stage(self) -> str:
        """When the press compresses: after the context's prefill ("context"), after the
        question ("question", query-aware) or every N steps while answering ("decode")."""
        return "question" if self.query_aware else "context"

    def due(self, steps: int, q: int) -> bool:
        """Whether to compress after `steps` forward passes while answering, the last of `q`
        tokens (only presses of stage "decode")."""
        return False

    def window(self) -> int:
        return self.query_window

    def records_attention(self) -> bool:
        return self.attention_sums

    def score(self, obs: Observation) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def plan(self, compressor: Compressor, cache: Any, layers: list[int]) -> None:
        """Work over all compressed `layers` before any is compressed (KVzip's passes)."""

    def budget(self, n: int, layer: int, n_layers: int) -> int:
        """Positions kept per kv head of `layer` out of `n`: ceil((1 - r) * n)."""
        return kept_count(n, self.compression_ratio)

    def keep(self, obs: Observation) -> tuple[Tensor, Tensor | None]:
        """(kept positions [b, Hk, L] ascending, validity [b, Hk, L] or None when every
        head keeps L)."""
        n = obs.keys.shape[2]
        k = self.budget(n, obs.layer, obs.n_layers)
        if k >= n:
            return torch.arange(n, device=obs.keys.device).expand(*obs.keys.shape[:2], n), None
        return self.score(obs).topk(k, -1).indices.sort(-1).values, None


def kept_count(n: int, ratio: float) -> int:
    """ceil((1 - ratio) * n) = n - floor(ratio * n), without float ceil surprises."""
    return n - math.floor(ratio * n + 1e-9)


def inner_press(data: Any, key: str) -> Press:
    """A wrapper's `press`: built from its `_target_` mapping; its ratio must stay unset."""
    press = data if isinstance(data, Press) else build_target(data, key, Press)
    if press.reconstructs:
        raise ConfigError(f"{key}: {type(press).__name__} decides its own head-wise budgets "
                          f"over all layers; it is not wrapped")
    if press.compression_ratio != 0.0 or press.query_aware:
        raise ConfigError(f"{key}: set compression_ratio and query_aware on the wrapper, not on "
                          f"the press it wraps")
    return press


@dataclass
class Wrapper(Press):
    """A press that changes how budgets are spent and scores with the `press` it wraps."""

    press: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.press is None:
            raise ConfigError("press: missing required key (a mapping with the _target_ of a press)")
        self.press = inner_press(self.press, "press")

    @property
    def stats_from(self) -> int | None:
        return self.press.stats_from

    def window(self) -> int:
        return self.press.window()

    def records_attention(self) -> bool:
        return self.press.records_attention()

    def score(self, obs: Observation) -> Tensor:
        return self.press.score(obs)


@dataclass
class AdaKV(Wrapper):
    """AdaKV (Feng et al., 2024, https://arxiv.org/abs/2407.11550): head-wise budgets. Every
    kv head first keeps its `alpha_safeguard` share of a uniform budget (its best positions);
    the rest of the layer's budget, Hk * ceil((1 - r) * n), goes to the best scores of all
    heads together. Stored compactly (see the module docstring), not masked."""

    alpha_safeguard: float = 0.2
    head_wise: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha_safeguard <= 1.0:
            raise ConfigError(f"alpha_safeguard: expected a value in [0, 1], got {self.alpha_safeguard}")
        if self.press.head_wise:
            raise ConfigError("press: AdaKV wraps a score-based press, not another head-wise one")

    def keep(self, obs: Observation) -> tuple[Tensor, Tensor | None]:
        n = obs.keys.shape[2]
        k = self.budget(n, obs.layer, obs.n_layers)
        if k >= n:
            return Press.keep(self, obs)
        return head_wise_layout(adakv_kept(self.score(obs).float().clone(), k, self.alpha_safeguard))


def adakv_kept(scores: Tensor, k: int, alpha_safeguard: float) -> Tensor:
    """AdaKV's head-wise allocation of Hk * k positions: each head's best `alpha_safeguard`
    share of k first (their scores raised to the float max, in place in `scores` [b, Hk, n]),
    then the best scores of all heads together -> kept [b, Hk, n] (bool)."""
    b, hk, n = scores.shape
    safe = int(k * alpha_safeguard)
    if safe:
        scores.scatter_(-1, scores.topk(safe, -1).indices, torch.finfo(scores.dtype).max)
    chosen = scores.flatten(1).topk(hk * k, -1).indices  # [b, Hk * k] over every head
    kept = torch.zeros(b, hk * n, dtype=torch.bool, device=scores.device)
    kept.scatter_(-1, chosen, True)
    return kept.view(b, hk, n)


def head_wise_layout(kept: Tensor) -> tuple[Tensor, Tensor]:
    """A head-wise selection [b, Hk, n] (bool) -> (positions [b, Hk, L], validity [b, Hk, L]):
    each head's kept positions first (ascending), then padding, L the largest head's count
    (what `Press.keep` returns; `Compressor.compress` stores it flat, `HeadWise`)."""
    n = kept.shape[-1]
    width = int(kept.sum(-1).max())
    # kept positions first (ascending), then padding: sort by (not kept, position)
    order = (~kept).long() * n + torch.arange(n, device=kept.device)
    idx = order.sort(-1).values[..., :width] % n
    valid = torch.arange(width, device=kept.device) < kept.sum(-1).unsqueeze(-1)
    return torch.where(valid, idx, 0), valid


@dataclass
class PerLayer(Wrapper):
    """kvpress's PerLayerCompressionPress: `compression_ratios[layer]` for each layer,
    scored by `press`."""

    compression_ratios: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.compression_ratio != 0.0:
            raise ConfigError("compression_ratio: PerLayer takes compression_ratios, one per layer")
        for i, r in enumerate(self.compression_ratios):
            if not 0.0 <= r < 1.0:
                raise ConfigError(f"compression_ratios[{i}]: expected a value in [0, 1), got {r}")

    def budget(self, n: int, layer: int, n_layers: int) -> int:
        if len(self.compression_ratios) != n_layers:
            raise ValueError(f"sparse.compression.compression_ratios: {len(self.compression_ratios)} "
                             f"ratios for a model of {n_layers} layers")
        return kept_count(n, self.compression_ratios[layer])


@dataclass
class Chunk(Wrapper):
    """kvpress's ChunkPress (after FINCH): the context in chunks of `chunk_length`, each
    compressed on its own (ceil((1 - r) * chunk) kept per chunk), so eviction is spread
    evenly. For presses that read keys and values only: the queries a press reads are the
    prefill's last ones, not each chunk's."""

    chunk_length: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk_length < 1:
            raise ConfigError(f"chunk_length: expected a value >= 1, got {self.chunk_length}")
        if self.press.window() or self.press.records_attention() or self.press.stats_from is not None:
            raise ConfigError(f"press: {type(self.press).__name__} reads the prefill's queries; "
                              f"Chunk takes presses that score keys and values only")

    def budget(self, n: int, layer: int, n_layers: int) -> int:
        return sum(kept_count(min(self.chunk_length, n - i), self.compression_ratio)
                   for i in range(0, n, self.chunk_length))

    def keep(self, obs: Observation) -> tuple[Tensor, Tensor | None]:
        n, parts = obs.keys.shape[2], []
        for i in range(0, n, self.chunk_length):
            part = replace(obs, keys=obs.keys[:, :, i:i + self.chunk_length],
                           values=obs.values[:, :, i:i + self.chunk_length])
            k = kept_count(part.keys.shape[2], self.compression_ratio)
            parts.append(i + self.press.score(part).topk(k, -1).indices.sort(-1).values)
        return torch.cat(parts, -1), None


@dataclass(frozen=True)
class _Record:
    """What was recorded for one layer (replaced, never changed in place: a snapshot of the
    recorder is a copy of its dict)."""

    queries: Tensor | None = None
    sums: Tensor | None = None
    rows: int = 0
    s1: Tensor | None = None
    s2: Tensor | None = None
    count: int | Tensor = 0
    positions: int | Tensor = 0
    scaling: float = 1.0


class Compressor:
    """Records what the press reads during prefill, compresses a cache, keeps the statistics."""

    def __init__(self, press: Press) -> None:
        self.press = press
        self.records: dict[int, _Record] = {}
        self.heads: dict[int, HeadWise] = {}
        """Head-wise layers: their kept keys and values, stored flat (`HeadWise`)."""
        self.kept: dict[int, tuple[Tensor, Tensor | None]] = {}
        """The last compression's (kept positions, validity) per layer (as `Press.keep`)."""
        self.compressed = False
        self.n_layers = 0
        self.rope: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None
        self.totals: dict[str, Any] = {"compressions": 0, "scoring_s": 0.0, "kv_bytes_before": 0,
                                       "kv_bytes_after": 0}
        self.before: list[int] = []
        self.after: list[int] = []
        self.head_before: list[list[int]] = []
        self.head_after: list[list[int]] = []
        self.out_weights: dict[int, Tensor] = {}
        """Per layer the attention's output projection weight (presses that read it)."""
        self.steps = 0
        """Forward passes since the last compression while answering (`Decoding`)."""
        self.model: Any = None
        self.tokenizer: Any = None
        self.context_ids: list[Tensor] = []
        """The prefilled token ids (recorded for presses that reconstruct, KVzip)."""
        self.scoring: Callable[[int, Tensor, Tensor], None] | None = None
        """Set during a press's own passes: takes each layer's (query, key) instead of
        `observe` (`SparseMethod.attention` then computes dense attention)."""

    def prepare(self, model: Any, n_layers: int, tokenizer: Any = None) -> None:
        self.n_layers = n_layers
        self.model, self.tokenizer = model, tokenizer
        self.out_weights = {m.layer_idx: m.o_proj.weight.detach() for m in model.modules()
                            if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "o_proj")}
        self.before, self.after = [0] * n_layers, [0] * n_layers
        self.head_before, self.head_after = [[] for _ in range(n_layers)], [[] for _ in range(n_layers)]
        rotary = next((m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")), None)
        if rotary is None:
            self.rope = None
            return

        def rope(positions: Tensor) -> tuple[Tensor, Tensor]:
            x = torch.zeros((), dtype=torch.float32, device=positions.device)
            cos, sin = rotary(x, positions.unsqueeze(0))
            return cos[0].float(), sin[0].float()

        self.rope = rope

    def release(self) -> None:
        """Drop the references `prepare` took (the method leaves the model)."""
        self.model = self.tokenizer = self.rope = None
        self.out_weights = {}

    def reset(self) -> None:
        self.records.clear()
        self.heads.clear()
        self.context_ids.clear()
        self.compressed = False
        self.steps = 0

    def recording(self, phase: str) -> bool:
        if self.press.stage == "decode":  # the queries since the last compression
            return phase != "prefill"
        return not self.compressed and (phase == "prefill" or (phase == "question" and self.press.query_aware))

    def step(self, cache: Any, q: int, skip: set[int] | frozenset[int] = frozenset()) -> bool:
        """After a forward pass of `q` tokens while answering: compress if the press
        compresses during decoding and its interval has passed (kvpress's DecodingPress: every
        `compression_interval` passes, or at once when `q` reaches the target). -> compressed."""
        if self.press.stage != "decode":
            return False
        self.steps += 1
        if not self.press.due(self.steps, q):
            return False
        self.compress(cache, skip)
        self.steps = 0
        self.records.clear()  # kvpress clears its buffer of hidden states after compressing
        return True

    # --- recording ---------------------------------------------------------------------------

    def observe(self, layer: int, query: Tensor, key: Tensor, scaling: float,
                positions: Tensor | None = None) -> None:
        """Record one attention call of the prefill (or of a pass while answering, for a press
        compressing while decoding): query [b, H, q, d], key [b, Hk, kv, d] (cache included;
        row i sits at cache index kv - q + i), `positions` [b, q] the rows' true positions (the
        model's `position_ids`; the cache indices when None)."""
        rec = self.records.get(layer, _Record())
        q, kv = query.shape[2], key.shape[2]
        pos = positions[0] if positions is not None else torch.arange(kv - q, kv, device=query.device)
        changes: dict[str, Any] = {"positions": pos[-1] + 1, "scaling": scaling}
        window = self.press.window()
        if window:
            past = rec.queries
            joined = query if past is None else torch.cat([past, query], 2)
            changes["queries"] = joined[:, :, -window:].clone()  # not a view of the whole chunk
        if self.press.records_attention():
            new = column_sums(query, key, scaling)
            changes["sums"] = new if rec.sums is None else new + _pad_to(rec.sums, kv)
            changes["rows"] = rec.rows + q
        start = self.press.stats_from
        if start is not None and self.rope is not None:
            cos, sin = self.rope(pos)
            counted = (pos >= start).float()  # rows from `start` on: a weight, no host sync
            pre = unrotate(query.float(), cos, sin) * counted[:, None]
            s1, s2 = pre.sum(2), torch.einsum("bhsi,bhsj->bhij", pre, pre)
            changes["s1"] = s1 if rec.s1 is None else rec.s1 + s1
            changes["s2"] = s2 if rec.s2 is None else rec.s2 + s2
            changes["count"] = rec.count + counted.sum()
        self.records[layer] = replace(rec, **changes)

    def observation(self, layer: int, keys: Tensor, values: Tensor) -> Observation:
        rec = self.records.get(layer, _Record())
        mean = cov = None
        if rec.count:
            mean = rec.s1 / rec.count
            cov = rec.s2 / rec.count - mean.unsqueeze(-1) * mean.unsqueeze(-2)
        return Observation(layer, self.n_layers, keys, values, rec.scaling, rec.queries, rec.sums,
                           rec.rows, mean, cov, rec.positions, self.rope, self.out_weights.get(layer))

    # --- compressing -------------------------------------------------------------------------

    def compress(self, cache: Any, skip: set[int] | frozenset[int] = frozenset()) -> None:
        """Shrink every layer of `cache` (a DynamicCache) but `skip` to the press's kept positions."""
        layers = []
        for layer, entry in enumerate(cache.layers):
            if layer in skip or not getattr(entry, "is_initialized", True):
                continue
            if not is_plain(entry):
                raise ValueError(f"KV-cache compression needs full-attention cache layers; layer "
                                 f"{layer} is a {type(entry).__name__}")
            layers.append(layer)
        self.press.plan(self, cache, layers)
        for layer in layers:
            entry = cache.layers[layer]
            keys, values = entry.keys, entry.values
            n = keys.shape[2]
            t0 = time.perf_counter()
            idx, valid = self.press.keep(self.observation(layer, keys, values))
            self.kept[layer] = idx, valid
            if keys.device.type == "cuda":
                torch.cuda.synchronize(keys.device)
            self.totals["scoring_s"] += time.perf_counter() - t0
            take = idx.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
            before = keys.nbytes + values.nbytes
            kept_keys, kept_values = keys.gather(2, take), values.gather(2, take)
            room = to_come(entry)  # a pre-sized layer's room for the tokens still to come
            if valid is not None:  # head-wise: stored flat, the cache layer emptied
                # on CPU the room moves into the store (each head's slack); the layer keeps none
                slack = room if reads_free(keys.device) else 0
                self.heads[layer] = HeadWise.of(kept_keys, kept_values, valid, slack)
                kept_keys, kept_values = keys[:, :, :0].clone(), values[:, :, :0].clone()
                room -= slack
            store(entry, kept_keys.contiguous(), kept_values.contiguous(), room)
            self.totals["kv_bytes_before"] += before
            self.totals["kv_bytes_after"] += (entry.keys.nbytes + entry.values.nbytes
                                              + self.stored_bytes(layer))
            per_head = (valid.sum(-1) if valid is not None
                        else torch.full(idx.shape[:2], idx.shape[-1])).sum(0).tolist()
            if valid is not None:
                heads = self.head_after[layer] or [0] * len(per_head)
                self.head_after[layer] = [a + c for a, c in zip(heads, per_head, strict=True)]
                self.head_before[layer] = [a + n * keys.shape[0] for a in
                                           (self.head_before[layer] or [0] * len(per_head))]
            self.before[layer] += n * keys.shape[0] * keys.shape[1]
            self.after[layer] += int(sum(per_head))
        self.totals["compressions"] += 1
        self.compressed = True

    def stored_bytes(self, layer: int | None = None) -> int:
        """Bytes of the head-wise layers' flat stores (of `layer`, or all), outside the cache."""
        stores = self.heads.values() if layer is None else [self.heads[layer]] if layer in self.heads else []
        return sum(store.nbytes for store in stores)

    def stats(self) -> dict[str, Any]:
        """Compression achieved: per layer (and head, for head-wise presses) the fraction of
        positions kept, the KV bytes before and after, the scoring time."""
        before, after = sum(self.before), sum(self.after)
        out: dict[str, Any] = {
            **self.totals,
            "scoring_s": round(self.totals["scoring_s"], 6),
            **({"reconstruction_s": round(self.totals["reconstruction_s"], 6)}
               if "reconstruction_s" in self.totals else {}),
            "press": type(self.press).__name__,
            "compression_ratio": self.press.compression_ratio,
            "achieved_ratio": round(1 - after / before, 6) if before else None,
            "kept_per_layer": [round(a / b, 6) if b else None for a, b in zip(self.after, self.before, strict=True)],
        }
        if any(self.head_before):
            out["kept_per_head"] = [[round(a / b, 6) for a, b in zip(ha, hb, strict=True)] if hb else None
                                    for ha, hb in zip(self.head_after, self.head_before, strict=True)]
        return out


def column_sums(query: Tensor, key: Tensor, scaling: float) -> Tensor:
    """[b, H, kv]: the sum over the q rows (causal, bottom-right) of softmax(q.k * scaling),
    in float32, built in blocks of rows of at most `ROW_BLOCK_BYTES`."""
    b, h, q, d = query.shape
    hk, kv = key.shape[1], key.shape[2]
    g = h // hk
    rows = max(1, ROW_BLOCK_BYTES // (4 * b * h * kv))
    total = torch.zeros(b, h, kv, dtype=torch.float32, device=query.device)
    keys = key.float().transpose(-1, -2)
    for r0 in range(0, q, rows):
        r1 = min(q, r0 + rows)
        part = query[:, :, r0:r1].float().reshape(b, hk, g * (r1 - r0), d)
        s = torch.matmul(part, keys).reshape(b, h, r1 - r0, kv) * scaling
        pos = torch.arange(kv - q + r0, kv - q + r1, device=query.device)
        s.masked_fill_(torch.arange(kv, device=query.device)[None, :] > pos[:, None], float("-inf"))
        total += s.softmax(-1).sum(2)
    return total


def _pad_to(x: Tensor, n: int) -> Tensor:
    return torch.nn.functional.pad(x, (0, n - x.shape[-1])) if x.shape[-1] < n else x


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


def unrotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The inverse of transformers' `apply_rotary_pos_emb` (x cos + rotate_half(x) sin)."""
    return x * cos - rotate_half(x) * sin


TILE = 64
"""Keys per tile of a head-wise store: each (batch row, kv head) is padded to a multiple of it,
so the flat store is [tiles, TILE, d] without a copy, each tile of one segment (<= TILE - 1
padding keys per segment, counted in `HeadWise.nbytes`)."""


@dataclass(frozen=True)
class HeadWise:
    """A head-wise compressed layer, stored flat: the kept keys and values of every (batch
    row, kv head) one after another, [N, d]; segment i = b * Hk + h starts at `offsets[i]`,
    holds `counts[i]` keys (its positions in ascending order), then `slack` positions for the
    keys appended after compression (CPU path: written there as they come, so a head's keys
    are contiguous), then zero padding up to `offsets[i + 1]`, a multiple of `TILE`.
    `tile_segment` [tiles]: each tile's segment; `tile_bias` float32 [tiles, 1, TILE]: 0 on
    kept keys, -inf on slack and padding (the accelerator path, `_head_wise_tiles`)."""

    keys: Tensor
    values: Tensor
    offsets: tuple[int, ...]
    counts: tuple[int, ...]
    tile_segment: Tensor
    tile_bias: Tensor
    slack: int = 0

    @classmethod
    def of(cls, keys: Tensor, values: Tensor, valid: Tensor, slack: int = 0) -> HeadWise:
        """From the padded layout [b, Hk, L, d] and its validity [b, Hk, L]; `slack`
        positions reserved after each segment's kept keys."""
        counts = valid.sum(-1).flatten().tolist()
        tiles = [-(-(c + slack) // TILE) for c in counts]
        offsets = tuple(itertools.accumulate((TILE * t for t in tiles), initial=0))
        dev, d = keys.device, keys.shape[-1]
        start = torch.tensor(offsets[:-1], device=dev).view(valid.shape[:2])
        dest = (start.unsqueeze(-1) + valid.cumsum(-1) - 1)[valid]  # each kept key's place
        flat_keys, flat_values = keys.new_zeros(offsets[-1], d), values.new_zeros(offsets[-1], d)
        flat_keys[dest], flat_values[dest] = keys[valid], values[valid]
        segment = torch.tensor([i for i, t in enumerate(tiles) for _ in range(t)], dtype=torch.long,
                               device=dev)
        ends = torch.tensor([o + c for o, c in zip(offsets[:-1], counts, strict=True)], device=dev)
        place = torch.arange(offsets[-1], device=dev).view(-1, TILE)
        bias = torch.zeros(place.shape, device=dev).masked_fill_(place >= ends[segment, None], NEG_INF)
        return cls(flat_keys, flat_values, offsets, tuple(counts), segment, bias.unsqueeze(1), slack)

    @property
    def nbytes(self) -> int:
        """Bytes of the kept keys and values with their padding and index; the slack is the
        room for the tokens still to come (as a pre-sized cache layer's room, not counted)."""
        slack = self.slack * len(self.counts) * self.keys.shape[-1]
        return (self.keys.nbytes + self.values.nbytes
                - slack * (self.keys.element_size() + self.values.element_size())
                + self.tile_segment.nbytes + self.tile_bias.nbytes
                + 8 * (len(self.offsets) + len(self.counts)))


def head_wise_attention(query: Tensor, key: Tensor, value: Tensor, store: HeadWise,
                        scaling: float) -> Tensor:
    """Attention over a head-wise compressed layer: each kv head's kept keys in `store` (all
    visible), then the keys appended after compression, `key` / `value` [b, Hk, m, d]
    (causal, bottom-right; the last q of them are this call's), in one softmax per kv head
    (float32 scores). -> [b, q, H, d]. On CPU one SDPA call per (batch row, kv head) over
    its segment when the appended keys fit the slack (`_head_wise_slack`), else a loop that
    joins the two parts' scores; on an accelerator `_head_wise_tiles` (launches independent
    of the number of heads)."""
    if not reads_free(query.device):
        return _head_wise_tiles(query, key, value, store, scaling)
    b, h, q, d = query.shape
    hk, m = key.shape[1], key.shape[2]
    g = h // hk
    if q <= m <= store.slack:
        return _head_wise_slack(query, key, value, store, scaling)
    causal = bottom_right_causal(q, m, key.device)
    out = torch.empty_like(query)
    for i in range(b * hk):
        r, k = divmod(i, hk)
        kept = slice(store.offsets[i], store.offsets[i] + store.counts[i])
        rows = query[r, k * g:(k + 1) * g]  # [g, q, d]
        old = rows @ store.keys[kept].T  # [g, q, e]
        new = (rows @ key[r, k].transpose(-1, -2)).masked_fill(~causal, float("-inf"))
        p = (torch.cat([old, new], -1).float() * scaling).softmax(-1).to(value.dtype)
        e = old.shape[-1]
        out[r, k * g:(k + 1) * g] = p[..., :e] @ store.values[kept] + p[..., e:] @ value[r, k]
    return out.transpose(1, 2)


def _head_wise_slack(query: Tensor, key: Tensor, value: Tensor, store: HeadWise,
                     scaling: float) -> Tensor:
    """`head_wise_attention` on CPU when the m appended keys fit each segment's slack: this
    call's q new keys and values are written at their places after each segment's kept ones
    (the earlier ones are there already; a rewound cache rewrites the same places), then each
    (batch row, kv head) is one SDPA call over its kept + m keys, the group's query heads
    folded into rows (no copy of the kept keys, no merge)."""
    b, h, q, d = query.shape
    hk, m = key.shape[1], key.shape[2]
    g = h // hk
    ends = [o + c for o, c in zip(store.offsets[:-1], store.counts, strict=True)]
    dest = (torch.tensor(ends).unsqueeze(-1) + torch.arange(m - q, m)).flatten()
    store.keys.index_copy_(0, dest, key[:, :, m - q:].reshape(-1, d))
    store.values.index_copy_(0, dest, value[:, :, m - q:].reshape(-1, d))
    out = query.new_empty(b, hk, g * q, d)
    rows = query.reshape(b, hk, g * q, d)
    for i, end in enumerate(ends):
        r, k = divmod(i, hk)
        n = end - store.offsets[i] + m  # >= q >= 1 (a head that kept nothing sees its new keys)
        part = slice(store.offsets[i], end + m)
        # row j * q + t (query head j of the group, query t) sees the kept keys and the
        # appended ones up to its own
        allowed = bottom_right_causal(q, n, query.device).repeat(g, 1) if q > 1 else None
        out[r, k] = torch.nn.functional.scaled_dot_product_attention(
            rows[r, k][None, None], store.keys[part][None, None], store.values[part][None, None],
            attn_mask=allowed, scale=scaling)[0, 0]
    return out.view(b, h, q, d).transpose(1, 2)


def _head_wise_tiles(query: Tensor, key: Tensor, value: Tensor, store: HeadWise,
                     scaling: float) -> Tensor:
    """`head_wise_attention` batched over tiles: every tile's scores in one matmul (its
    segment's queries gathered), per-segment max and sums through scatter_reduce_ / index_add_
    over tiles, the appended keys as one batched part, the two merged by log-sum-exp."""
    b, h, q, d = query.shape
    hk, m = key.shape[1], key.shape[2]
    rows = query.reshape(b * hk, h // hk * q, d)  # segment i's queries: its kv head's group
    n, width = rows.shape[:2]
    qs = rows.index_select(0, store.tile_segment)  # [tiles, g * q, d]
    scores = torch.add(store.tile_bias, float_matmul(qs, store.keys.view(-1, TILE, d).transpose(1, 2)),
                       alpha=scaling)  # [tiles, g * q, TILE]
    top = scores.new_full((n, width), NEG_INF).scatter_reduce_(
        0, store.tile_segment.unsqueeze(-1).expand(-1, width), scores.amax(-1), "amax")
    p = scores.sub_(top.index_select(0, store.tile_segment).unsqueeze(-1)).exp_()
    total = scores.new_zeros(n, width).index_add_(0, store.tile_segment, p.sum(-1))
    out = scores.new_zeros(n, width, d).index_add_(
        0, store.tile_segment, float_matmul(p.to(value.dtype), store.values.view(-1, TILE, d)))
    out.div_(total.clamp_min(1.0).unsqueeze(-1))  # a kept segment's total is >= 1; empty: 0
    lse = top.add_(total.log())  # -inf for an empty segment
    if m:
        new = float_matmul(rows.view(b, hk, width, d), key.transpose(-1, -2)).mul_(scaling)
        if q > 1:
            causal = bottom_right_causal(q, m, key.device)
            new = new.view(b, hk, -1, q, m).masked_fill_(~causal, NEG_INF).view(b, hk, width, m)
        new_lse = new.logsumexp(-1)
        p_new = new.sub_(new_lse.unsqueeze(-1)).exp_().to(value.dtype)
        out, lse = merge_softmax(out, lse, float_matmul(p_new, value).view(n, width, d),
                                 new_lse.view(n, width))
    return out.view(b, h, q, d).transpose(1, 2).to(query.dtype)


# --- the cache, restored after each answer ---------------------------------------------------

def snapshot(cache: Any) -> list[tuple[Tensor, Tensor]]:
    """The layers' key and value tensors: references, no copy (an update writes only past the
    live length of a pre-sized layer, or replaces the tensors of a transformers layer)."""
    return [(entry.keys, entry.values) for entry in cache.layers]


def restore(cache: Any, saved: list[tuple[Tensor, Tensor]]) -> None:
    for entry, (keys, values) in zip(cache.layers, saved, strict=True):
        entry.keys, entry.values = keys, values
