"""The presses: one dataclass and one scoring function each, with kvpress 0.5's definitions
and defaults (kvpress/presses/*.py). Budgets, the cache shrink, head-wise and per-layer
wrappers live in `sa_bench.attention.compression`. Scores are [b, Hk, n]; higher is kept.
Positions a press always keeps (sinks, observation windows) get the maximum score + 1, as in
kvpress."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from sa_bench.attention.compression import Observation, Press
from sa_bench.config import ConfigError
from sa_bench.lazy import F, torch

if TYPE_CHECKING:
    from torch import Tensor


def _always(scores: Tensor, before: int = 0, after: int = 0) -> Tensor:
    """`scores` with `before` leading and `after` trailing positions added at the top score."""
    top = scores.max().item() + 1 if scores.numel() else 1.0
    return F.pad(scores, (before, after), value=top)


def _grouped_mean(x: Tensor, hk: int) -> Tensor:
    """[b, H, n] -> [b, Hk, n]: the mean over each kv head's query heads."""
    return x.unflatten(1, (hk, x.shape[1] // hk)).mean(2)


def window_attention(obs: Observation, w: int) -> Tensor:
    """[b, H, w, n - w]: softmax over all n keys of the last `w` recorded queries (causal
    within the window), restricted to the keys before the window (kvpress's SnapKV)."""
    if obs.queries is None or obs.queries.shape[2] < w:
        raise ValueError(f"the press needs the last {w} prefill queries of layer {obs.layer}")
    b, h, _, d = obs.queries.shape
    hk, n = obs.keys.shape[1], obs.keys.shape[2]
    q = obs.queries[:, :, -w:].float().reshape(b, hk, (h // hk) * w, d)
    s = torch.matmul(q, obs.keys.float().transpose(-1, -2)).reshape(b, h, w, n) * obs.scaling
    rows = torch.arange(n - w, n, device=s.device)
    s.masked_fill_(torch.arange(n, device=s.device)[None, :] > rows[:, None], float("-inf"))
    return s.softmax(-1)[..., : n - w]


@dataclass
class Random(Press):
    """Uniform random scores (kvpress RandomPress), from a generator seeded with `seed` at
    every layer (kvpress with a seed)."""

    seed: int = 0

    def score(self, obs: Observation) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        return torch.rand(obs.keys.shape[:-1], generator=gen).to(obs.keys.device)


@dataclass
class KNorm(Press):
    """Keys of small L2 norm matter most (Devoto et al., 2024, https://arxiv.org/abs/2406.11430)."""

    def score(self, obs: Observation) -> Tensor:
        return -obs.keys.float().norm(dim=-1)


@dataclass
class StreamingLLM(Press):
    """StreamingLLM (https://arxiv.org/abs/2309.17453): the first `n_sink` positions and the
    most recent ones; the positions right after the sinks go."""

    n_sink: int = 4

    def score(self, obs: Observation) -> Tensor:
        n = obs.keys.shape[2]
        pruned = n - self.budget(n, obs.layer, obs.n_layers)
        scores = torch.ones(obs.keys.shape[:-1], device=obs.keys.device)
        scores[:, :, self.n_sink:self.n_sink + pruned] = 0
        return scores


@dataclass
class SnapKV(Press):
    """SnapKV (https://arxiv.org/abs/2404.14469): the attention of the last `window_size`
    queries, averaged over them, smoothed by an average pool of `kernel_size`, averaged over
    each kv head's query heads; the window itself is kept. A context of at most
    `window_size` positions uses a window of n - 1 (kvpress refuses it)."""

    window_size: int = 64
    kernel_size: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window_size < 1 or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError("window_size, kernel_size: expected a window >= 1 and an odd kernel "
                              f"size, got {self.window_size}, {self.kernel_size}")

    def window(self) -> int:
        return self.window_size

    def score(self, obs: Observation) -> Tensor:
        n, hk = obs.keys.shape[2], obs.keys.shape[1]
        w = max(1, min(self.window_size, n - 1))
        scores = window_attention(obs, w).mean(2)
        scores = F.avg_pool1d(scores, self.kernel_size, stride=1, padding=self.kernel_size // 2)
        return _always(_grouped_mean(scores, hk), after=w)


@dataclass
class PyramidKV(SnapKV):
    """PyramidKV (https://arxiv.org/abs/2406.02069): SnapKV's scores, budgets falling linearly
    from the first layer to the last (`beta` sets the slope), kvpress's formula (falls back to
    the uniform budget where the pyramid does not fit)."""

    beta: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 1:
            raise ConfigError(f"beta: expected a value >= 1, got {self.beta}")

    def budget(self, n: int, layer: int, n_layers: int) -> int:
        capacity = self.window_size + n * (1 - self.compression_ratio)
        low = (capacity - self.window_size) / self.beta
        high = (capacity - self.window_size) * 2 - low
        if high >= n - self.window_size:
            high = n - self.window_size
            low = (capacity - self.window_size) * 2 - high
        if not n >= high >= low >= self.window_size or n_layers < 2:
            return round(n * (1 - self.compression_ratio))
        return round(high - layer * (high - low) / (n_layers - 1))


@dataclass
class TOVA(Press):
    """TOVA (https://arxiv.org/abs/2401.06104): the last query's attention, averaged over all
    query heads (one ranking for every kv head); the last position is kept."""

    query_window: ClassVar[int] = 1

    def score(self, obs: Observation) -> Tensor:
        hk, n = obs.keys.shape[1], obs.keys.shape[2]
        scores = window_attention(obs, 1)[:, :, 0].mean(1, keepdim=True)
        return _always(scores.expand(-1, hk, n - 1), after=1)


@dataclass
class ObservedAttention(Press):
    """H2O-style (https://arxiv.org/abs/2306.14048): the attention each position received
    during prefill, averaged over the queries that could see it, then over each kv head's
    query heads. kvpress reads eager attention weights of a one-pass prefill; here the same
    sums are recorded chunk by chunk (see `sa_bench.attention.compression`)."""

    attention_sums: ClassVar[bool] = True

    def score(self, obs: Observation) -> Tensor:
        if obs.attention_sums is None:
            raise ValueError(f"observed attention: no prefill attention recorded for layer {obs.layer}")
        n, hk = obs.keys.shape[2], obs.keys.shape[1]
        seen = torch.arange(n, 0, -1, device=obs.keys.device, dtype=torch.float32)
        if obs.attention_rows:  # while decoding: only the rows since the last compression
            seen = seen.clamp(max=obs.attention_rows)
        return _grouped_mean(obs.attention_sums[..., :n] / seen, hk)


@dataclass
class ExpectedAttention(Press):
    """Expected Attention (kvpress's own method, its README): the attention the next
    `n_future_positions` queries are expected to pay each key, from the mean (and covariance)
    of the prefill's pre-RoPE queries (first `n_sink` left out) under RoPE averaged over those
    positions, softmax over keys, times the value norm; the sinks are kept."""

    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    @property
    def stats_from(self) -> int | None:
        return self.n_sink

    def score(self, obs: Observation) -> Tensor:
        n = obs.keys.shape[2]
        if n <= self.n_sink:
            return torch.ones(obs.keys.shape[:-1], device=obs.keys.device)
        if obs.rope is None or obs.query_mean is None:
            raise ValueError("expected attention needs the model's rotary embedding and the "
                             f"prefill's query statistics (layer {obs.layer})")
        keys, values = obs.keys[:, :, self.n_sink:].float(), obs.values[:, :, self.n_sink:].float()
        d, hk = keys.shape[-1], keys.shape[1]
        # the future positions after the last recorded query (kvpress while decoding: after
        # its buffer's length, not the true position)
        cos, sin = obs.rope(obs.n_observed + torch.arange(self.n_future_positions, device=keys.device))
        half = torch.eye(d // 2, device=keys.device)
        swap = torch.zeros(d, d, device=keys.device)
        swap[d // 2:, : d // 2], swap[: d // 2, d // 2:] = half, -half
        rot = torch.diag(cos.mean(0)) + swap * sin.mean(0)[None, :]
        mean = obs.query_mean @ rot.T  # [b, H, d]
        k = keys.repeat_interleave(mean.shape[1] // hk, 1)  # [b, H, m, d]
        scores = (k @ mean.unsqueeze(-1)).squeeze(-1) / math.sqrt(d)
        if self.use_covariance:
            cov = rot @ obs.query_cov @ rot.T
            scores = scores + ((k @ cov) * k).sum(-1) / d / 2
        scores = _grouped_mean(scores.softmax(-1), hk)
        if self.use_vnorm:
            scores = (scores + self.epsilon) * values.norm(dim=-1)
        return _always(scores, before=self.n_sink)


@dataclass
class KeyDiff(Press):
    """KeyDiff (https://arxiv.org/abs/2504.15364): keys least similar (cosine) to the mean of
    the normalised keys matter most (one pass, as kvpress; the paper's block-wise variant is
    kvpress's BlockPress)."""

    def score(self, obs: Observation) -> Tensor:
        keys = obs.keys.float()
        anchor = F.normalize(keys, p=2, dim=-1).mean(2, keepdim=True)
        return -F.cosine_similarity(keys, anchor, dim=-1)


@dataclass
class LagKV(Press):
    """LagKV (https://arxiv.org/abs/2504.04704): positions in partitions of `lag_size`, each
    scored by the spread of its keys and values normalised by the min/max of the next
    partition; the sinks and the last (incomplete) partition plus one are kept. Contexts
    shorter than n_sink + 2 * lag_size keep the most recent positions."""

    n_sink: int = 4
    lag_size: int = 128
    cross_scoring: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lag_size < 1 or self.n_sink < 0:
            raise ConfigError(f"lag_size, n_sink: expected >= 1 and >= 0, got {self.lag_size}, {self.n_sink}")

    def score(self, obs: Observation) -> Tensor:
        b, hk, n, d = obs.keys.shape
        dev = obs.keys.device
        if n < self.n_sink + 2 * self.lag_size:
            scores = torch.ones(b, hk, n, device=dev)
            if n > self.n_sink:
                scores[:, :, self.n_sink:] = torch.arange(n - self.n_sink, device=dev) / (n - self.n_sink)
            return scores
        end = self.n_sink + ((n - self.n_sink) // self.lag_size) * self.lag_size
        parts = (b, hk, -1, self.lag_size, d)
        scores = (self._spread(obs.keys[:, :, self.n_sink:end].float().reshape(parts))
                  + self._spread(obs.values[:, :, self.n_sink:end].float().reshape(parts))) / 2
        if not self.cross_scoring:
            scores = scores.argsort(-1).argsort(-1).float() / self.lag_size
        ones = torch.ones(b, hk, 1, device=dev)
        return torch.cat([ones.expand(b, hk, self.n_sink), scores.reshape(b, hk, -1),
                          ones.expand(b, hk, self.lag_size + n - end)], -1)

    def _spread(self, x: Tensor) -> Tensor:
        """[b, Hk, P, lag, d] -> [b, Hk, P - 1, lag]: softmax over a partition of the std over
        channels of its states min-max normalised by the next partition."""
        ref, cur = x[:, :, 1:], x[:, :, :-1]
        low, high = ref.amin(-2, keepdim=True), ref.amax(-2, keepdim=True)
        return ((cur - low) / (high - low)).std(dim=-1).softmax(-1)


@dataclass
class QFilter(Press):
    """Q-Filters (https://arxiv.org/abs/2503.02812): learned per-layer, per-kv-head filter
    vectors; score = -<filter, key> (kvpress QFilterPress). kvpress downloads the filters from
    the Hub (`nthngdy/<model>_qfilt`); sa_bench runs offline, so `filters` names a local
    `.safetensors` file holding `q_filters` [layers, Hk, d] (what that repository ships as
    model.safetensors) or a Hub repository id already in the local Hugging Face cache; anything
    else is refused at validation. The file's content is part of the job key."""

    filters: str = ""
    file_locators: ClassVar[tuple[str, ...]] = ("filters",)
    _file: Path | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._file = _filters_file(self.filters)
        self._loaded: Tensor | None = None

    def score(self, obs: Observation) -> Tensor:
        if self._loaded is None:
            from safetensors.torch import load_file

            self._loaded = load_file(str(self._file))["q_filters"]
        if self._loaded.shape[0] <= obs.layer or self._loaded.shape[1:] != obs.keys.shape[1::2]:
            raise ValueError(f"Q-filters {self._file}: shape {tuple(self._loaded.shape)} does not fit layer "
                             f"{obs.layer} with keys {tuple(obs.keys.shape)}")
        q_filter = self._loaded[obs.layer][None, :, None].to(obs.keys.device, torch.float32)
        return -(q_filter * obs.keys.float()).sum(-1)


def _filters_file(filters: str) -> Path:
    hint = ("kvpress downloads Q-filters from the Hub (nthngdy/<model>_qfilt); give a local "
            ".safetensors file with q_filters [layers, kv heads, head dim], or the id of a Hub "
            "repository already in the local Hugging Face cache")
    if not filters:
        raise ConfigError(f"filters: missing: {hint}")
    path = Path(filters).expanduser()
    if path.is_file():
        return path.resolve()
    if "/" in filters and not path.exists():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(filters, "model.safetensors")
        if isinstance(cached, str):
            return Path(cached)
    raise ConfigError(f"filters: {filters!r} is neither a local file nor in the local Hugging Face "
                      f"cache (sa_bench runs offline): {hint}")
