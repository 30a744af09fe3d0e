"""Double Sparsity: top-k by approximate scores from a few calibrated "label" channels."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sa_bench.attention.files import method_file, model_shapes
from sa_bench.attention.gather import Workspace
from sa_bench.attention.masker import TopKMasker
from sa_bench.attention.ops import reads_free
from sa_bench.attention.selection import Context, KeyCache
from sa_bench.config import ConfigError, Size, check_range, check_size
from sa_bench.lazy import torch

if TYPE_CHECKING:
    from torch import Tensor

CALIBRATION_FILE = "double_sparsity.safetensors"
"""Name of the calibration file looked up next to a model (`calibration: auto`)."""
CALIBRATE_COMMAND = "python -m sa_bench.attention.calibrate_ds"


def pseudo_quantize(x: Tensor, bits: int, out: Tensor | None = None) -> Tensor:
    """The authors' label quantisation: per row (a token's r label channels), uniform on
    [min, max] with 2^bits - 1 steps, returned dequantised (into `out` when given, cast to its
    dtype). bits >= 16: unchanged.

    Their steps, round((x - lo) * scale).clamp(0, top) / scale + lo with scale = top / span
    (1 where span = 0), in three kernels fewer: the clamp cannot act (x - lo is in [0, span],
    so its product with scale is at most top, up to rounding, and rounds to top), and a row of
    one value (scale 1 / 0 = inf, 0 * inf = NaN) comes out as lo by turning NaN into 0 (which
    also gives lo, not NaN, where 1 / span overflows: a subnormal span)."""
    if bits >= 16:
        return x if out is None else out.copy_(x)
    top = 2**bits - 1
    lo, hi = torch.aminmax(x, dim=-1, keepdim=True)
    scale = torch.reciprocal(hi - lo).mul_(top)  # top / span as torch divides a number by a tensor
    steps = torch.round((x - lo).mul_(scale)).nan_to_num_(0.0, posinf=top, neginf=0.0)
    return torch.addcdiv(lo, steps, scale, out=out)


def load_channel_rank(path: Path, layers: int, key: str) -> Tensor | None:
    """`channel_rank` [L, H, d] from calibrate_ds's safetensors, or from the authors' channel
    config JSON (config/<org>/<model>.json in their repository: per layer
    "model.layers.<i>.self_attn.qk_proj" -> [H][d] channel indices, most important first; the
    "qk" ranking their evaluation scripts default to, else "q_proj")."""
    if path.suffix != ".json":
        from safetensors.torch import load_file

        return load_file(str(path)).get("channel_rank")
    import json

    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot read {path} as a Double Sparsity channel config ({exc})") from None
    for kind in ("qk_proj", "q_proj"):
        names = [f"model.layers.{i}.self_attn.{kind}" for i in range(layers)]
        if all(n in config for n in names):
            return torch.tensor([config[n] for n in names], dtype=torch.long)
    raise ConfigError(f"{key}: {path} has no model.layers.<0..{layers - 1}>.self_attn.qk_proj (or q_proj) "
                      f"channel lists")


def kv_head_channels(rank: Tensor, kv_heads: int, r: int) -> Tensor:
    """Channel ranks per query head [H, d] -> the r best channels per kv head [Hk, r]: the
    lowest summed rank over the kv head's query heads (Borda count; = the ranks when H = Hk)."""
    h, d = rank.shape
    position = torch.empty_like(rank)
    position.scatter_(-1, rank, torch.arange(d, device=rank.device).expand(h, d))  # channel -> rank
    total = position.view(kv_heads, h // kv_heads, d).sum(1)
    return total.argsort(dim=-1, stable=True)[:, :r]


@dataclass
class DoubleSparsity(TopKMasker):
    """Double Sparsity (Yang et al., 2024, https://arxiv.org/abs/2408.07092; reference code
    https://github.com/andy-yang-1/DoubleSparse): approximate scores from r label channels,
    s_j = sum_{c in C} Q(q)_c Q(k_j)_c with Q the authors' per-token `label_bits`
    quantisation (`pseudo_quantize`), labels and the product in bfloat16 (`label_dtype`), then
    top-k by s.

    Defaults as the authors' evaluation scripts (evaluation/generate.py, chat.py):
    group_factor 4 -> `channels` = head_dim / 4, q_bits 4 -> `label_bits` 4, channels ranked
    offline by the "qk" statistic mean_t |q_tc k_tc| (calibrate_ds). `calibration`: `auto` =
    `double_sparsity.safetensors` next to `model` (shipped for the embedded model; a model
    without one is refused at validation); a file from calibrate_ds or the authors' channel
    config JSON (`load_channel_rank`); or `online` = ranked on
    each context from its first sparse call (the query rows and their own keys), recorded in
    the notes. The channel set is per kv head (the group's query-head ranks summed), so one
    label cache serves the group; for models without GQA this is the authors' per-head set.
    `per_kv_head`: one selection per kv head (`TopKMasker`).
    """

    key_version = 2  # results changed meaning: authors' label bits and channels

    heavy_size: Size = 0.1
    per_kv_head: bool = False
    channels: Size = 0.25
    label_bits: int = 4
    file_locators = ("calibration", "model")  # name the calibration file; its content is in the job key
    calibration: str = "auto"
    model: str | None = None
    _labels: KeyCache = field(default_factory=KeyCache, init=False, repr=False)
    _scores: Workspace = field(default_factory=Workspace, init=False, repr=False)
    _path: Path | None = field(default=None, init=False, repr=False)
    _chosen: dict = field(default_factory=dict, init=False, repr=False)
    _online_rows: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        # not a field: config checks evaluate the type hints of a masker and its fields, without torch
        self._rank: Tensor | None = None
        check_size(self.channels, "channels")
        if self.channels == 0:
            raise ConfigError("channels: expected at least 1 label channel (an int) or a fraction of head_dim")
        check_range(self.label_bits, "label_bits", 1, 16)
        if self.calibration == "online":
            return
        self._path = method_file(
            self.calibration, self.model, CALIBRATION_FILE, "calibration",
            "double-sparsity calibration",
            f"no Double Sparsity calibration for model {self.model!r} (looked for "
            f"{CALIBRATION_FILE} in its directory). Make one with `{CALIBRATE_COMMAND} --model "
            f"{self.model} --out ds.safetensors` and pass sparse.maskers.<name>.calibration="
            f"ds.safetensors, or calibration=online")

    @property
    def label_dtype(self) -> torch.dtype:
        """The label cache's dtype, as the authors' kernels keep it in the model's half
        precision: a quarter of float32 K's bytes per label channel, and on CPU a bf16 matmul
        ~6x faster than float32."""
        return torch.bfloat16

    def _r(self, head_dim: int) -> int:
        r = round(self.channels * head_dim) if isinstance(self.channels, float) else self.channels
        return max(1, min(r, head_dim))

    def prepare(self, model_config, key: str) -> None:
        layers, heads, _, head_dim = model_shapes(model_config)
        if isinstance(self.channels, int) and self.channels > head_dim:
            raise ConfigError(f"{key}.channels: {self.channels} > head_dim {head_dim}")
        if self._path is None:
            return
        rank = load_channel_rank(self._path, layers, f"{key}.calibration")
        want = (layers, heads, head_dim)
        if rank is None or tuple(rank.shape) != want:
            got = None if rank is None else list(rank.shape)
            raise ConfigError(f"{key}.calibration: channel_rank has shape {got}, but the model "
                              f"needs {list(want)} (layers, heads, head_dim)")
        self._rank = rank

    def reset(self) -> None:
        super().reset()
        if self._path is None:
            self._chosen.clear()

    def notes(self) -> list[str]:
        what = f"{self.label_bits}-bit labels"
        if self._path is None:
            return [f"double_sparsity: channels calibrated online on each context's first sparse call "
                    f"(its query rows and their own keys; {self._online_rows} rows so far), {what}"]
        return [f"double_sparsity: channels from {self._path}, {what}"]

    def _channels(self, ctx: Context) -> Tensor:
        """Label channels [Hk, r] of this layer."""
        ch = self._chosen.get(ctx.layer)
        if ch is None or ch.device != ctx.key.device:
            r, hk = self._r(ctx.key.shape[-1]), ctx.key.shape[1]
            if self._rank is not None:
                rank = self._rank[ctx.layer].to(ctx.key.device)
            else:  # online: the authors' "qk" statistic on this call's rows and their own keys
                q = ctx.query.float()
                k = ctx.key[:, :, ctx.kv - q.shape[2]:].float().repeat_interleave(ctx.groups, 1)
                rank = (q * k).abs().mean((0, 2)).argsort(-1, descending=True)
                self._online_rows += q.shape[2]
            ch = self._chosen[ctx.layer] = kv_head_channels(rank, hk, r)
        return ch

    def _label_scores(self, ctx: Context) -> Tensor:
        """Label products of the grouped query rows, [b, Hk, g*q, kv] in `label_dtype` (a view
        of a buffer reused by the next call).

        The new keys' labels and the query rows' are quantised in one pass (decode: one key
        and the group's query rows per kv head), written into the label cache's buffer: the
        keys' at their rows, the queries' in the rows past them (scratch, the next key's)."""
        ch = self._channels(ctx)  # [Hk, r]
        b, hk, kv = *ctx.key.shape[:2], ctx.kv
        keep = self._labels.kept(ctx.layer, ctx.key, ctx.query.shape[2])
        grouped = ctx.grouped(ctx.query)  # [b, Hk, g*q, d]
        rows = torch.cat([ctx.key[:, :, keep:], grouped.to(ctx.key.dtype)], 2)
        lab = rows.gather(-1, ch[None, :, None, :].expand(b, hk, rows.shape[2], -1)).float()
        like = lab.new_empty(b, hk, 0, lab.shape[-1], dtype=self.label_dtype)
        pseudo_quantize(lab, self.label_bits, out=self._labels.rows(ctx.layer, keep, rows.shape[2], like))
        self._labels.length[ctx.layer] = kv
        buf = self._labels.buf[ctx.layer]
        lab, qc = buf[:, :, :kv], buf[:, :, kv:kv + grouped.shape[2]]
        shape = (*qc.shape[:3], kv)
        out = self._scores.take(math.prod(shape), 1, qc).view(shape)
        if not reads_free(qc.device):  # one batched matmul (strided batches: no copy on CUDA)
            return torch.matmul(qc, lab.transpose(-1, -2), out=out)
        for bi in range(b):  # one mm per kv head: a batched matmul over the cache's strided
            for h in range(hk):  # buffer view copies it first (~10x slower on CPU)
                torch.mm(qc[bi, h], lab[bi, h].t(), out=out[bi, h])
        return out

    def score(self, ctx: Context) -> Tensor:
        return ctx.ungrouped(self._label_scores(ctx).float())

    def group_score(self, ctx: Context) -> Tensor:
        # the group's best label product, then floats for the kv heads' rows only
        q = ctx.query.shape[2]
        return self._label_scores(ctx).unflatten(2, (ctx.groups, q)).amax(2).float()
