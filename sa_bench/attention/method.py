"""A sparse-attention method: ordered maskers, hooked into transformers' attention registry."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from sa_bench.attention.compression import Compressor, Press, head_wise_attention, restore, snapshot
from sa_bench.attention.dense import dense_attention, dense_mask
from sa_bench.attention.driver import attend_blocks, decode_spans
from sa_bench.attention.gather import CPU_GATHER, GatherCosts, Workspace
from sa_bench.attention.masker import Masker
from sa_bench.attention.ops import allowed_from_mask
from sa_bench.attention.prefill import PrefillMethod, attend, causal_pairs, computed_pairs
from sa_bench.config import ConfigError, build, build_target
from sa_bench.lazy import torch

PHASES = ("prefill", "question", "decode")
_ids = itertools.count()


@dataclass
class SparseConfig:
    """The `sparse` config section (conf/sparse/<method>.yaml)."""

    name: str
    phase: Literal["question", "decode"] = "question"
    dense_layers: list[int] = field(default_factory=list)
    measure_error: bool = False
    seed: int = 0
    maskers: dict[str, Any] = field(default_factory=dict)
    block_bytes: int = 256 * 2**20
    """Sparse calls process query rows in blocks with no temporary above this (question phase)."""
    prefill: dict[str, Any] | None = None
    """A sparse prefill method (`_target_`: a `sa_bench.attention.prefill.PrefillMethod`):
    the context's prefill, and the question tokens when `phase` is question, use it; the
    maskers then select for decode steps only."""
    compression: dict[str, Any] | None = None
    """A KV-cache compression press (`_target_` a `sa_bench.attention.compression.Press`),
    applied once after the context's prefill (see that module)."""

    def __post_init__(self) -> None:
        if self.block_bytes < 1:
            raise ConfigError(f"block_bytes: expected a positive number of bytes, got {self.block_bytes}")
        for i, layer in enumerate(self.dense_layers):
            if layer < 0:
                raise ConfigError(f"dense_layers[{i}]: a layer index must be >= 0, got {layer}")


class _Meter:
    """Running sums per (phase, layer). Tensor totals stay on their device: they are queued
    and summed `FLUSH` at a time with one stack and one index_add_ (no launch per layer and
    call, no sync), and read only by `table()`."""

    FLUSH = 256

    def __init__(self) -> None:
        self.sums: dict[tuple[str, int], list] = {}
        self._slots: dict[tuple[str, int], int] = {}
        self._pending: list[tuple[int, torch.Tensor]] = []
        self._device_sums: dict = {}  # device -> float64 sums per slot

    def add(self, phase: str, layer: int, total: torch.Tensor | float, count: int,
            scale: float = 1.0) -> None:
        """Add `total * scale` (a device total is scaled when summed: no launch here)."""
        entry = self.sums.setdefault((phase, layer), [0.0, 0])
        entry[1] += count
        if isinstance(total, (int, float)):
            entry[0] += total * scale
            return
        slot = self._slots.setdefault((phase, layer), len(self._slots))
        self._pending.append((slot, total, scale))
        if len(self._pending) >= self.FLUSH:
            self._flush()

    def _flush(self) -> None:
        by_device: dict = {}
        for slot, total, scale in self._pending:
            by_device.setdefault(total.device, ([], [], []))
            by_device[total.device][0].append(slot)
            by_device[total.device][1].append(total.reshape(()))
            by_device[total.device][2].append(scale)
        self._pending = []
        for device, (slots, totals, scales) in by_device.items():
            acc = self._device_sums.get(device)
            if acc is None or acc.shape[0] < len(self._slots):
                grown = torch.zeros(len(self._slots) + 64, dtype=torch.float64, device=device)
                if acc is not None:
                    grown[: acc.shape[0]] = acc
                acc = self._device_sums[device] = grown
            values = torch.stack(totals).double()
            if any(scale != 1.0 for scale in scales):
                values = values * torch.tensor(scales, dtype=torch.float64, device=device)
            acc.index_add_(0, torch.tensor(slots, device=device), values)

    def total(self, key: tuple[str, int]) -> float:
        self._flush()
        value = self.sums.get(key, (0.0, 0))[0]
        slot = self._slots.get(key)
        if slot is not None:
            value += sum(float(acc[slot]) for acc in self._device_sums.values() if acc.shape[0] > slot)
        return value

    def table(self, layers: int) -> dict[str, list[float | None]]:
        out = {}
        for phase in PHASES:
            row = []
            for layer in range(layers):
                count = self.sums.get((phase, layer), (0.0, 0))[1]
                row.append(round(self.total((phase, layer)) / count, 6) if count else None)
            out[phase] = row
        return out

class SparseMethod:
    """Maskers applied in order; the model's own dense kernel where the phase or layer is not sparse."""

    def __init__(self, config: SparseConfig, maskers: dict[str, Masker],
                 prefill: PrefillMethod | None = None, press: Press | None = None) -> None:
        self.config = config
        self.maskers = maskers
        self.prefill = prefill
        self.press = press
        self.compressor = Compressor(press) if press is not None else None
        self.phase = "prefill"
        self.name = f"sa_bench_{next(_ids)}_{config.name}"
        self.num_layers = 0
        self._devices: dict[Any, tuple[torch.Generator, Workspace]] = {}
        """Per device: the random generator of sampling methods and the gather workspace."""
        self.implementation = "sdpa"
        self.gather_costs: GatherCosts = CPU_GATHER
        """The cost model of sparse calls (`BATCHED_GATHER`: the GPU's paths on CPU too)."""
        self._density = _Meter()
        self._error = _Meter()
        self._prefill_heads: dict[int, list] = {}  # layer -> [computed pairs [H], causal pairs]
        self._estimated_on: set[str] = set()  # per context: "chunk" (several passes) or "prompt"
        self._context_estimate: str | None = None  # the current context's

    @classmethod
    def from_config(cls, data: dict) -> SparseMethod:
        """Validate the `sparse` section (no model needed) and build the method."""
        config = build(SparseConfig, dict(data), "sparse")
        maskers = {}
        per_head = None  # the first masker that selects per query head
        for name, masker in config.maskers.items():
            maskers[name] = build_target(masker, f"sparse.maskers.{name}", Masker)
            if getattr(maskers[name], "per_kv_head", False) and per_head is not None:
                raise ConfigError(
                    f"sparse.maskers.{name}.per_kv_head: one selection per kv head needs every "
                    f"earlier masker to select the same keys for a kv head's query heads (sink, "
                    f"local or per_kv_head: true), but '{per_head}' selects per query head")
            if per_head is None and not maskers[name].group_shared:
                per_head = name
        prefill = None
        if config.prefill is not None:
            prefill = build_target(config.prefill, "sparse.prefill", PrefillMethod)
        press = None
        if config.compression is not None:
            press = build_target(dict(config.compression), "sparse.compression", Press)
            if press.head_wise and maskers:
                raise ConfigError(f"sparse.compression._target_: a head-wise press "
                                  f"({type(press).__name__}) does not combine with decode maskers "
                                  f"({', '.join(maskers)}); use a uniform-budget press")
        return cls(config, maskers, prefill, press)

    # --- runner API --------------------------------------------------------------------------

    @contextmanager
    def installed(self, model, implementation: str = "sdpa",
                  tokenizer=None) -> Iterator[SparseMethod]:
        """Switch `model` to this method for the duration of the block (`tokenizer`: for a
        press that prompts the model itself, KVzip).

        Registers our attention and mask functions under a name of our own (dense work on
        `implementation`, see `sa_bench.attention.dense`), and on exit restores the model's
        previous attention, removes both registry entries and drops per-context state, so
        nothing of the method outlives the block (joblib reuses worker processes).
        """
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask

        self._prepare(model, tokenizer)
        self.implementation = implementation
        previous = model.config._attn_implementation
        AttentionInterface.register(self.name, self.attention)
        AttentionMaskInterface.register(self.name, eager_mask if implementation == "eager" else dense_mask)
        hook = None
        if self.press is not None and self.press.reconstructs:
            hook = model.get_input_embeddings().register_forward_pre_hook(self._record_ids)
        try:
            model.set_attn_implementation(self.name)
            yield self
        finally:
            model.set_attn_implementation(previous)
            AttentionInterface._global_mapping.pop(self.name, None)
            AttentionMaskInterface._global_mapping.pop(self.name, None)
            if hook is not None:
                hook.remove()
            self.reset()
            self._devices = {}
            if self.compressor is not None:
                self.compressor.release()

    def _record_ids(self, module, args) -> None:
        """The context's token ids, for a press that reconstructs it (KVzip)."""
        c = self.compressor
        if self.phase == "prefill" and c.scoring is None and not c.compressed:
            c.context_ids.append(args[0].detach())

    def _prepare(self, model, tokenizer=None) -> None:
        """Check layer indices and masker files against the model."""
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.num_layers = cfg.num_hidden_layers
        for i, layer in enumerate(self.config.dense_layers):
            if layer >= self.num_layers:
                raise ConfigError(f"sparse.dense_layers[{i}]: layer {layer} does not exist "
                                  f"(the model has {self.num_layers} layers)")
        kinds = layer_kinds(cfg)
        for i, layer in enumerate(self.config.dense_layers):
            if kinds[layer][0] is None:
                raise ConfigError(f"sparse.dense_layers[{i}]: layer {layer} of {cfg.model_type} is "
                                  f"not an attention layer ({kinds[layer][1]}): no method applies there")
        if self.prefill is not None:
            self._check_prefill(model, cfg, kinds)
            self.prefill.prepare(model.config, "sparse.prefill")
        for name, masker in self.maskers.items():
            masker.prepare(model.config, f"sparse.maskers.{name}")
        if self.compressor is not None:
            self.compressor.prepare(model, self.num_layers, tokenizer)

    def _check_prefill(self, model, cfg, kinds) -> None:
        """A sparse prefill computes causal (query block, key block) patterns on its own kernels:
        refused for models whose attention adds anything to causality (learned sinks, a sliding
        window shorter than the model's context)."""
        if any(hasattr(module, "sinks") for module in model.modules()):
            raise ConfigError(f"sparse.prefill: model type {cfg.model_type} has learned attention "
                              "sinks (a per-head logit in every softmax), which the sparse prefill "
                              "kernels do not take; use decode-time maskers with a dense prefill")
        longest = getattr(cfg, "max_position_embeddings", None)
        windows = sorted({w for w, _ in kinds if w and (longest is None or w < longest)})
        if windows:
            raise ConfigError(f"sparse.prefill: model type {cfg.model_type} has sliding-window "
                              f"attention layers (window {windows[0]}), which the sparse prefill "
                              "kernels (causal block patterns) do not restrict; use decode-time "
                              "maskers with a dense prefill")

    def set_phase(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        self.phase = phase

    def reset(self) -> None:
        """Drop per-context state (called before each context's prefill)."""
        for masker in self.maskers.values():
            masker.reset()
        if self._context_estimate is not None:
            self._estimated_on.add(self._context_estimate)
        self._context_estimate = None
        if self.compressor is not None:
            self.compressor.reset()

    # --- KV-cache compression (sa_bench.attention.compression) --------------------------------

    @property
    def compresses(self) -> bool:
        return self.press is not None

    def compress(self, cache, stage: Literal["context", "question"]) -> None:
        """Compress `cache` if the press compresses at this stage: after the context's prefill
        (`query_aware: false`) or after the question (`query_aware: true`)."""
        if self.press is None or self.press.stage != stage:
            return
        self.compressor.compress(cache, set(self.config.dense_layers))
        for masker in self.maskers.values():
            masker.reset()  # features of keys that moved or went

    def step(self, cache, q: int) -> None:
        """After each forward pass of `q` tokens while answering (question, then each
        generated token): a press that compresses while decoding may compress here."""
        if self.compressor is not None and self.compressor.step(cache, q, set(self.config.dense_layers)):
            for masker in self.maskers.values():
                masker.reset()

    def snapshot(self, cache) -> tuple:
        """What `restore` needs to put `cache` and the recorded state back as they are now."""
        c = self.compressor
        return snapshot(cache), dict(c.records), dict(c.heads), c.compressed, c.steps

    def restore(self, cache, saved: tuple) -> None:
        c = self.compressor
        tensors, records, heads, compressed, c.steps = saved
        restore(cache, tensors)
        c.records, c.heads, c.compressed = dict(records), dict(heads), compressed
        if self.press.stage != "context":  # the cache went back to before its compression
            for masker in self.maskers.values():
                masker.reset()

    def stats(self) -> dict:
        layers = self.num_layers or 1 + max((k[1] for k in self._density.sums), default=-1)
        out: dict[str, Any] = {"density": self._density.table(layers)}
        if self.config.measure_error:
            out["error"] = self._error.table(layers)
        notes = [note for m in self.maskers.values() for note in m.notes()]
        out["notes"] = notes
        if self.prefill is not None:
            out["prefill_density_per_head"] = [
                [round(float(c) / n, 6) for c in computed.tolist()] if n else None
                for computed, n in (self._prefill_heads.get(layer, (None, 0)) for layer in range(layers))]
            modes = self._estimated_on | ({self._context_estimate} - {None})
            out["prefill_estimated_on"] = "+".join(sorted(modes)) or None
        if self.compressor is not None:
            out["compression"] = self.compressor.stats()
        return out

    # --- the attention function --------------------------------------------------------------

    def is_sparse(self, layer: int) -> bool:
        """Whether the maskers select this call's keys."""
        if not self.maskers or layer in self.config.dense_layers:
            return False
        if self.phase == "question" and self.prefill is not None:
            return False
        return self.phase == "decode" or (self.phase == "question" and self.config.phase == "question")

    def uses_prefill(self, layer: int) -> bool:
        """Whether the prefill method computes this call (the context, and the question tokens
        when `phase` is question)."""
        if self.prefill is None or layer in self.config.dense_layers:
            return False
        return self.phase == "prefill" or (self.phase == "question" and self.config.phase == "question")

    def attention(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        """transformers attention function: query [b, H, q, d], key/value [b, Hk, kv, d]."""
        layer = module.layer_idx
        b, h, q, _ = query.shape
        kv = key.shape[-2]
        sinks = kwargs.get("s_aux")  # GPT-OSS: learned per-head sink logits [H]
        # a layer's sliding window arrives in the mask (transformers' sliding-window mask and
        # its sliding cache layer): the maskers' `allowed` keys and the dense kernels honour it
        compressor = self.compressor
        if compressor is not None and compressor.scoring is not None:  # a press's own pass
            compressor.scoring(layer, query, key)
            return dense_attention(module, query, key, value, attention_mask, scaling,
                                   self.implementation, dropout, sinks), None
        if compressor is not None:
            if compressor.recording(self.phase):
                compressor.observe(layer, query, key, scaling, kwargs.get("position_ids"))
            if compressor.compressed:
                attention_mask = None  # built for layer 0's length; no padding (batch of one)
                if layer in compressor.heads:
                    out = head_wise_attention(query, key, value, compressor.heads[layer], scaling)
                    if self.phase != "prefill":
                        self._density.add(self.phase, layer, float(b * h * q), b * h * q)
                    return out, None
        if self.uses_prefill(layer):
            return self._sparse_prefill(module, query, key, value, attention_mask, scaling), None
        if not self.is_sparse(layer):
            for masker in self.maskers.values():
                masker.truncate(layer, kv - q)  # keys past here may change (new context/crop)
            out = dense_attention(module, query, key, value, attention_mask, scaling,
                                  self.implementation, dropout, sinks)
            if self.phase != "prefill":
                self._density.add(self.phase, layer, float(b * h * q), b * h * q)
                self._error.add(self.phase, layer, 0.0, b * q)
            else:
                pairs = causal_pairs(kv - q, kv)
                self._density.add("prefill", layer, float(pairs), pairs)
            return out, None
        spans, ranged = decode_spans(self.maskers.values(), q, kv, attention_mask)
        if spans and ranged == len(self.maskers):  # sink / local only: slices of the cache
            out = dense_attention(module, query, *_slices(key, value, spans), None, scaling,
                                  self.implementation, dropout, sinks).transpose(1, 2)
            density, scale = b * h * sum(stop - start for start, stop in spans) / kv, 1.0
        else:
            generator, workspace = self.on_device(query.device)
            out, density, scale = attend_blocks(self.maskers.values(), query, key, value, attention_mask,
                                         scaling, layer, generator, workspace,
                                         self.config.block_bytes, self.gather_costs,
                                         sinks)  # [b, H, q, d]
        self._density.add(self.phase, layer, density, b * h * q, scale)
        if self.config.measure_error:
            self._measure_error(module, query, key, value, attention_mask, scaling, out, sinks)
        return out.transpose(1, 2).contiguous(), None


    def on_device(self, device) -> tuple[torch.Generator, Workspace]:
        """The generator and workspace of `device`, made once per installation: a model split
        over GPUs alternates devices layer by layer, and a generator recreated (reseeded) at
        each switch would draw the same numbers at every step. The i-th device the model uses
        (in layer order, from 0) has its generator seeded with seed + 7919 i: its position, not
        its id, so a job draws the same numbers on whichever GPU the pool leased it."""
        entry = self._devices.get(device)
        if entry is None:
            seed = self.config.seed + 7919 * len(self._devices)
            entry = self._devices[device] = (torch.Generator(device=device).manual_seed(seed),
                                             Workspace(device))
        return entry

    def _sparse_prefill(self, module, query, key, value, attention_mask, scaling: float):
        """The prefill method's pattern, estimated from this call's rows and keys, computed on
        its kernel; the computed fraction of causal pairs recorded per layer and head."""
        layer = module.layer_idx
        b, h, q, _ = query.shape
        kv = key.shape[2]
        if attention_mask is not None:  # eager builds a mask; anything but causality is refused
            causal = allowed_from_mask(None, b, q, kv, query.device)
            if not torch.equal(allowed_from_mask(attention_mask, b, q, kv, query.device), causal):
                raise ValueError("sparse prefill needs a plain causal mask (one unpadded prompt)")
        pattern = self.prefill.layer_pattern(query, key, kv - q, layer)
        out = attend(pattern, query, key, value, scaling, self.prefill.kernel)
        computed = computed_pairs(pattern, kv).sum(0)  # [H]
        pairs = causal_pairs(kv - q, kv) * b
        self._density.add(self.phase, layer, computed.sum(), pairs * h)  # pair-weighted
        if self.phase == "prefill":
            if kv > q or self._context_estimate == "chunk":  # a pass after the first
                self._context_estimate = "chunk"
            else:
                self._context_estimate = "prompt"
            entry = self._prefill_heads.setdefault(layer, [0.0, 0])
            entry[0] = entry[0] + computed / b
            entry[1] += pairs // b
        if self.config.measure_error:
            self._measure_error(module, query, key, value, None, scaling, out)
        return out.transpose(1, 2).contiguous()

    def _measure_error(self, module, query, key, value, attention_mask, scaling: float, out,
                       sinks=None) -> None:
        """Relative L2 error of `out` [b, H, q, d] against dense attention computed in float32
        (a bf16 reference would add its own rounding, larger than the error measured)."""
        b, _, q, _ = query.shape
        dense = reference_attention(module, query, key, value, attention_mask, scaling,
                                    self.implementation, sinks)
        diff = out.transpose(1, 2).float() - dense
        err = diff.flatten(2).norm(dim=-1) / dense.flatten(2).norm(dim=-1).clamp_min(1e-30)
        self._error.add(self.phase, module.layer_idx, err.sum(), b * q)


def reference_attention(module, query, key, value, attention_mask, scaling: float,
                        implementation: str, sinks=None):
    """Dense attention in float32 -> [b, q, H, d] float32, whatever the inputs' dtype (a
    float32-only kernel stands in for flash attention; a float additive mask is upcast)."""
    if query.dtype != torch.float32:
        query, key, value = query.float(), key.float(), value.float()
        sinks = None if sinks is None else sinks.float()
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            attention_mask = attention_mask.float()
        if implementation == "flash_attention_2":
            implementation = "sdpa"
    return dense_attention(module, query, key, value, attention_mask, scaling, implementation,
                           sinks=sinks).float()


def layer_kinds(cfg) -> list[tuple[int | None, str]]:
    """Per layer of a (text) config: (window, kind). window: None for a layer that is not
    attention (state-space, convolution, linear attention: the hook is never called there),
    0 for full attention, the sliding window's size otherwise; kind: the config's name for it."""
    n = cfg.num_hidden_layers
    types = getattr(cfg, "layer_types", None) or getattr(cfg, "layers_block_type", None)
    window = getattr(cfg, "sliding_window", None)
    if types is None:  # one kind for all (Llama, Mistral and Phi-3: a window for every layer)
        return [(window or 0, "attention")] * n
    out = []
    for kind in list(types)[:n]:
        if "attention" not in kind or "linear" in kind:
            out.append((None, kind))
        elif kind in ("sliding_attention", "chunked_attention"):
            out.append((window or getattr(cfg, "attention_chunk_size", None) or 0, kind))
        else:
            out.append((0, kind))
    return out


def _slices(key: torch.Tensor, value: torch.Tensor, spans: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values of `spans` (sorted disjoint ranges): a view for one range."""
    if len(spans) == 1:
        (start, stop), = spans
        return key[:, :, start:stop], value[:, :, start:stop]
    return (torch.cat([key[:, :, a:b] for a, b in spans], 2),
            torch.cat([value[:, :, a:b] for a, b in spans], 2))
