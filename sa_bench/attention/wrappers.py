"""Press wrappers beyond budgets (those live in `sa_bench.attention.compression`): CriticalKV
and CriticalAdaKV (value-projection rescoring), composition, and compression while decoding,
with kvpress 0.5's definitions and defaults (kvpress/presses/criticalkv_press.py,
composed_press.py, decoding_press.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

from sa_bench.attention.compression import (
    ROW_BLOCK_BYTES,
    Observation,
    PerLayer,
    Press,
    Wrapper,
    adakv_kept,
    head_wise_layout,
)
from sa_bench.config import ConfigError, build_target
from sa_bench.lazy import torch

if TYPE_CHECKING:
    from torch import Tensor


def value_projection_norm(obs: Observation) -> Tensor:
    """[b, Hk, n]: the L1 norm of each value through the output projection of every query
    head, W_o[h] v (kvpress's `vwl1norm`), averaged over a kv head's query heads."""
    if obs.out_weight is None:
        raise ValueError(f"CriticalKV needs the attention's o_proj weight (layer {obs.layer})")
    b, hk, n, d = obs.values.shape
    weight = obs.out_weight.float()  # [hidden, H * d]
    heads = weight.shape[1] // d
    wo = weight.T.reshape(heads, d, weight.shape[0])
    rows = max(1, ROW_BLOCK_BYTES // (4 * b * weight.shape[0]))
    out = torch.empty(b, heads, n, device=obs.values.device)
    for h in range(heads):
        v = obs.values[:, h // (heads // hk)].float()
        for r0 in range(0, n, rows):
            out[:, h, r0:r0 + rows] = (v[:, r0:r0 + rows] @ wo[h]).abs().sum(-1)
    return out.view(b, hk, heads // hk, n).mean(2)


def _check_stages(epsilon: float, first_stage_ratio: float) -> None:
    if epsilon < 0:
        raise ConfigError(f"epsilon: expected a value >= 0, got {epsilon}")
    if not 0.0 <= first_stage_ratio <= 1.0:
        raise ConfigError(f"first_stage_ratio: expected a value in [0, 1], got {first_stage_ratio}")


@dataclass
class CriticalKV(Wrapper):
    """CriticalKV (Feng et al., 2025, https://arxiv.org/abs/2502.03805): the first stage keeps
    the press's best int((1 - r) * n * `first_stage_ratio`) positions per kv head; the rest of
    the budget goes to the press's scores rescaled by the value projection norm,
    (score + `epsilon`) * |W_o v|_1 (kvpress CriticalKVPress; expected attention should run
    with use_vnorm: false under it, as kvpress warns)."""

    epsilon: float = 1e-4
    first_stage_ratio: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_stages(self.epsilon, self.first_stage_ratio)
        if self.press.head_wise:
            raise ConfigError("press: CriticalKV wraps a score-based press, not a head-wise one")

    def score(self, obs: Observation) -> Tensor:
        scores = self.press.score(obs).float()
        first = int((1 - self.compression_ratio) * obs.keys.shape[2] * self.first_stage_ratio)
        top = scores.topk(first, -1).indices
        scores = (scores + self.epsilon) * value_projection_norm(obs)
        return scores.scatter(-1, top, torch.finfo(scores.dtype).max)


@dataclass
class CriticalAdaKV(Wrapper):
    """CriticalAdaKV (https://arxiv.org/abs/2502.03805): AdaKV's head-wise budgets (each head
    keeps its `alpha_safeguard` share, the rest to the best scores of all heads), then in each
    head CriticalKV's two stages over that head's budget (kvpress CriticalAdaKVPress). Stored
    flat like AdaKV (every head's kept keys one after another), where kvpress masks."""

    alpha_safeguard: float = 0.2
    epsilon: float = 1e-4
    first_stage_ratio: float = 0.5
    head_wise: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_stages(self.epsilon, self.first_stage_ratio)
        if not 0.0 <= self.alpha_safeguard <= 1.0:
            raise ConfigError(f"alpha_safeguard: expected a value in [0, 1], got {self.alpha_safeguard}")
        if self.press.head_wise:
            raise ConfigError("press: CriticalAdaKV wraps a score-based press, not a head-wise one")

    def keep(self, obs: Observation) -> tuple[Tensor, Tensor | None]:
        n = obs.keys.shape[2]
        k = self.budget(n, obs.layer, obs.n_layers)
        if k >= n:
            return Press.keep(self, obs)
        top = torch.finfo(torch.float32).max
        scores = self.press.score(obs).float().clone()
        budgets = adakv_kept(scores, k, self.alpha_safeguard).sum(-1)  # per head, [b, Hk]
        first = (budgets * self.first_stage_ratio).long()  # kvpress: .to(int64), a floor
        scores = torch.where(_ranks(scores) < first.unsqueeze(-1), top, scores)  # stage 1
        stage2 = torch.where(scores == top, torch.inf, (scores + self.epsilon) * value_projection_norm(obs))
        return head_wise_layout(_ranks(stage2) < budgets.unsqueeze(-1))


def _ranks(scores: Tensor) -> Tensor:
    """Each position's place in its row by descending score (0 = best), [b, Hk, n]."""
    ranked = scores.argsort(-1, descending=True)
    order = torch.arange(scores.shape[-1], device=scores.device).expand_as(ranked)
    return torch.empty_like(ranked).scatter_(-1, ranked, order)


@dataclass
class Composed(Press):
    """kvpress's ComposedPress: `presses` applied in turn, each to what the previous kept (its
    keys and values; the prefill's queries and attention as recorded, as in kvpress). Each
    press carries its own compression_ratio; the composition's is 1 - prod(1 - r_i), derived
    (leave it unset). Head-wise presses and compression while decoding do not compose."""

    presses: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.presses:
            raise ConfigError("presses: expected a non-empty list of presses (each a mapping with a _target_)")
        built = []
        for i, data in enumerate(self.presses):
            press = data if isinstance(data, Press) else build_target(data, f"presses[{i}]", Press)
            if press.head_wise or press.stage == "decode" or press.query_aware:
                raise ConfigError(f"presses[{i}]: {type(press).__name__} does not compose (head-wise, "
                                  f"decoding or query-aware; set query_aware on the composition)")
            built.append(press)
        self.presses = built
        derived = 1 - math.prod(1 - p.compression_ratio for p in built)
        if self.compression_ratio not in (0.0, derived):
            raise ConfigError(f"compression_ratio: derived from the presses' ratios ({derived:.6g}); "
                              f"leave it unset")
        self.compression_ratio = derived

    @property
    def stats_from(self) -> int | None:
        starts = [p.stats_from for p in self.presses if p.stats_from is not None]
        return min(starts) if starts else None

    def window(self) -> int:
        return max(p.window() for p in self.presses)

    def records_attention(self) -> bool:
        return any(p.records_attention() for p in self.presses)

    def budget(self, n: int, layer: int, n_layers: int) -> int:
        for press in self.presses:
            n = press.budget(n, layer, n_layers)
        return n

    def keep(self, obs: Observation) -> tuple[Tensor, Tensor | None]:
        b, hk, n, d = obs.keys.shape
        idx = torch.arange(n, device=obs.keys.device).expand(b, hk, n)
        for press in self.presses:
            sub, _ = press.keep(obs)
            idx = idx.gather(-1, sub)
            take = sub.unsqueeze(-1).expand(-1, -1, -1, d)
            sums = obs.attention_sums
            if sums is not None:
                group = sums.shape[1] // hk
                sums = sums[..., :obs.keys.shape[2]].gather(-1, sub.repeat_interleave(group, 1))
            obs = replace(obs, keys=obs.keys.gather(2, take), values=obs.values.gather(2, take),
                          attention_sums=sums)
        return idx, None


@dataclass
class Decoding(Wrapper):
    """kvpress's DecodingPress, for long generations: while answering, every
    `compression_interval` forward passes (the question's counts as one; at once when a pass
    feeds `target_size` tokens or more) each layer longer than `target_size` is cut to
    `target_size` positions by the wrapped press (its ratio set to 1 - target / n, as kvpress).
    The context is not compressed after its prefill. kvpress's name for the wrapped press is
    `base_press`; like kvpress, it takes a scoring press (kvpress's ScorerPress: not AdaKV,
    CriticalAdaKV, Composed, Chunk, PerLayer or Decoding).

    What the press reads comes from the passes since the last compression, as kvpress's
    buffer of hidden states: SnapKV and TOVA their last queries (at most
    `hidden_states_buffer_size`), ExpectedAttention the statistics of those passes' queries,
    ObservedAttention the attention those passes paid the cache. Where sa_bench differs:
    - buffered queries carry their own RoPE positions (kvpress rotates the whole window with
      the current pass's: the same when the last pass feeds the window, e.g. TOVA);
    - ExpectedAttention averages RoPE over the positions after the true last one (kvpress:
      after its buffer's length) and takes the statistics of every query since the last
      compression from position `n_sink` on (kvpress drops the buffer's first n_sink and
      keeps `hidden_states_buffer_size` passes);
    - ObservedAttention sums the attention of every pass since the last compression, each key
      divided by the rows that could see it, on any kernel (kvpress reads the eager weights of
      the last pass only, divided as in a prefill);
    - head-wise presses are refused: kvpress runs AdaKV here by masking, never shrinking the
      cache, and re-masks from scratch at each compression."""

    compression_interval: int = 512
    target_size: int = 2048
    hidden_states_buffer_size: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.compression_ratio != 0.0 or self.query_aware:
            raise ConfigError("compression_ratio: Decoding compresses to target_size; leave "
                              "compression_ratio and query_aware unset")
        if self.compression_interval < 1 or self.target_size < 1 or self.hidden_states_buffer_size < 0:
            raise ConfigError(f"compression_interval, target_size, hidden_states_buffer_size: expected "
                              f">= 1, >= 1, >= 0, got {self.compression_interval}, {self.target_size}, "
                              f"{self.hidden_states_buffer_size}")
        inner = self.press
        if inner.head_wise:
            raise ConfigError(f"press: {type(inner).__name__} is head-wise; compression while decoding "
                              f"takes a scoring press (kvpress's DecodingPress runs AdaKV only by masking, "
                              f"without shrinking the cache)")
        if type(inner).keep is not Press.keep or isinstance(inner, PerLayer):
            raise ConfigError(f"press: {type(inner).__name__} is not a scoring press; compression while "
                              f"decoding takes one (kvpress's DecodingPress: a ScorerPress)")
        if inner.window() > min(max(1, self.hidden_states_buffer_size), self.compression_interval):
            raise ConfigError(f"press: {type(inner).__name__} reads the last {inner.window()} queries, more "
                              f"than hidden_states_buffer_size / compression_interval hold")

    @property
    def stage(self) -> str:
        return "decode"

    def due(self, steps: int, q: int) -> bool:
        return steps >= self.compression_interval or q >= self.target_size

    def budget(self, n: int, layer: int, n_layers: int) -> int:
        return min(n, self.target_size)

    def keep(self, obs: Observation) -> tuple[Tensor, Tensor | None]:
        n = obs.keys.shape[2]
        if n <= self.target_size:
            return torch.arange(n, device=obs.keys.device).expand(*obs.keys.shape[:2], n), None
        return replace(self.press, compression_ratio=1 - self.target_size / n).keep(obs)
