"""HashAttention (learned bit signatures) and random-projection top-k, with bit-packed scoring.

HashAttention (Desai et al., 2024, https://arxiv.org/abs/2412.14468): per layer and head, two
small MLPs f (queries) and g (keys) map a vector to `bits` real numbers; the signature is
sign(f(x)) in {-1, +1}^bits and a query scores a key by the +-1 dot product of the
signatures, bits - 2 * popcount(sig(q) xor sig(k)) (= 2 * agreeing bits - bits).

Weights (`HashWeights`): per layer and side, a list of linear layers (W [Hh, in, out],
b [Hh, out]) with an activation between them (SiLU unless the file says otherwise), Hh either
the query heads (the published layout, keys hashed once per query head) or the kv heads (one
key signature shared by the query heads of a group). Three file layouts load:

- sa_bench's own safetensors (`python -m sa_bench.attention.train_hashattn`), metadata
  {"format": "sa_bench.hashattn.v2", "activation": ...}: `{side}.{i}.weight` [L, Hh, in, out],
  `{side}.{i}.bias` [L, Hh, out] for side in query, key and i = 0 .. depth-1;
- sparse-attention-hub's `hat_weights` pickle (`load_hat_weights`), {layer: {"query_matrix":
  [W [H, in, out] per MLP layer], "query_bias": [b [H, out]], "key_matrix": ..., "key_bias":
  ...}}; read with an unpickler that admits only tensors;
- HashAttention-1.0's USA checkpoint (`torch.save` of a state dict), `{layer}.learning_to_hash_
  transformation_{q,k}.{head}.{2i}.weight` [out, in] (nn.Sequential of Linear / SiLU).
"""

from __future__ import annotations

import io
import math
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sa_bench.attention.files import method_file, model_shapes
from sa_bench.attention.gather import Workspace
from sa_bench.attention.masker import TopKMasker
from sa_bench.attention.ops import reads_free
from sa_bench.attention.selection import Context, KeyCache
from sa_bench.config import ConfigError, Size, check_range
from sa_bench.lazy import F, torch

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import Tensor

    Mlp = list[tuple[Tensor, Tensor]]  # [(W [Hh, in, out], b [Hh, out]), ...]

FORMAT = "sa_bench.hashattn.v2"
SIDES = ("query", "key")
ACTIVATIONS = ("silu", "relu", "gelu", "tanh")
WEIGHTS_FILE = "hashattn.safetensors"
"""Name of the weights file looked up next to a model (`weights: auto`)."""
TRAIN_COMMAND = "python -m sa_bench.attention.train_hashattn"


def activation(name: str) -> Callable[[Tensor], Tensor]:
    """The function of an activation named in `ACTIVATIONS` (a weights file's metadata)."""
    return {"silu": F.silu, "relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}[name]


# --- signatures ----------------------------------------------------------------------------


SIGNATURE_BLOCK_BYTES = 64 * 2**20
"""Key signatures are computed for blocks of keys whose widest temporary (the keys expanded per
hash head, an MLP activation, the bits before packing) stays under this: the first sparse call
at 128k keys hashes the whole context (~1 GiB per temporary in one piece)."""


def pack_signs(x: Tensor) -> Tensor:
    """Signs of x [..., bits] (x >= 0 -> bit 1) packed into int32 words [..., ceil(bits / 32)]."""
    bits = x.shape[-1]
    words = -(-bits // 32)
    b = x >= 0
    if words * 32 != bits:
        b = F.pad(b.to(torch.int32), (0, words * 32 - bits))
    b = b.view(*x.shape[:-1], words, 32)
    powers = _constant("powers", x.device, lambda: torch.bitwise_left_shift(
        torch.ones(32, device=x.device, dtype=torch.int32),
        torch.arange(32, device=x.device, dtype=torch.int32)))
    # bit 31 is -2^31: the distinct powers sum without carries, as their bitwise or
    return (b * powers).sum(-1, dtype=torch.int32)


_CONSTANTS: dict = {}


def _constant(name: str, device, make) -> Tensor:
    """A small constant tensor made once per device (a launch per call saved on a GPU)."""
    key = (name, str(device))
    value = _CONSTANTS.get(key)
    if value is None:
        value = _CONSTANTS[key] = make()
    return value


def byte_table_sum(qs: Tensor, ks: Tensor, table: Tensor) -> Tensor:
    """sum over the bytes of q xor k of `table`[byte], for packed signatures qs [b, Hs, r, w],
    ks [b, Hs, kv, w] -> [b, Hs, r, kv] (a uint8 table summed into int32): per word the xor of
    the bytes written as int64 (the lookup's indices, no cast of their own), the lookup and its
    sum, three kernels where the SWAR steps of `popcount32_` launch thirteen (a GPU at batch 1
    pays per launch; on CPU the in-place SWAR is faster)."""
    out = None
    for w in range(qs.shape[-1]):
        idx = torch.empty(*qs.shape[:3], ks.shape[2], 4, dtype=torch.long, device=qs.device)
        torch.bitwise_xor(ks[..., w:w + 1].view(torch.uint8)[:, :, None],
                          qs[..., w:w + 1].view(torch.uint8)[..., None, :], out=idx)
        part = table[idx].sum(-1, dtype=torch.int32 if table.dtype == torch.uint8 else None)
        out = part if out is None else out.add_(part)
    return out


def _byte_table(name: str, device) -> Tensor:
    """Per byte value: its set bits (`popcount`, uint8), or the +-1 dot product they give a
    word of 32 bits as 8 - 2 popcount per byte (`agreement`, float32: a word's four sum to
    32 - 2 popcount exactly)."""
    def make() -> Tensor:
        counts = [bin(i).count("1") for i in range(256)]
        if name == "popcount":
            return torch.tensor(counts, dtype=torch.uint8, device=device)
        return torch.tensor([8.0 - 2 * c for c in counts], device=device)
    return _constant(name, device, make)


def popcount32_(x: Tensor, tmp: Tensor | None = None) -> Tensor:
    """Set bits of each int32, in place (SWAR; torch has no popcount); `tmp`: a buffer of x's
    shape to use as the one temporary."""
    tmp = torch.bitwise_right_shift(x, 1, out=tmp)
    x.sub_(tmp.bitwise_and_(0x55555555))
    torch.bitwise_right_shift(x, 2, out=tmp).bitwise_and_(0x33333333)
    x.bitwise_and_(0x33333333).add_(tmp)
    x.add_(torch.bitwise_right_shift(x, 4, out=tmp)).bitwise_and_(0x0F0F0F0F)
    return x.mul_(0x01010101).bitwise_right_shift_(24)


def signature_scores(qs: Tensor, ks: Tensor, bits: int,
                     buffers: tuple[Workspace, Workspace] | None = None) -> Tensor:
    """+-1 dot products of packed signatures, bits - 2 popcount(q xor k): qs [b, Hs, r, w],
    ks [b, Hs, kv, w] -> float [b, Hs, r, kv]. Off CPU the floats come from the lookup itself
    (`byte_table_sum` of the agreement table: no kernel for the difference); `buffers`: see
    `differing_bits`."""
    if reads_free(qs.device):
        return agreement(differing_bits(qs, ks, buffers), bits)
    out = byte_table_sum(qs, ks, _byte_table("agreement", qs.device))
    pad = 32 * qs.shape[-1] - bits  # padding bits, 0 in both: each counted as agreeing
    return out.sub_(pad) if pad else out


def agreement(diff: Tensor, bits: int) -> Tensor:
    """+-1 dot product of two `bits`-bit signatures that differ in `diff` bits, as floats
    (bits - 2 diff, one kernel; exact in float32)."""
    return torch.rsub(diff, float(bits), alpha=2)


def differing_bits(qs: Tensor, ks: Tensor, buffers: tuple[Workspace, Workspace] | None = None) -> Tensor:
    """popcount(q xor k) of packed signatures -> int32 [b, Hs, r, kv] (see signature_scores).
    `buffers`: reused for the result and the temporary (a view of the first is returned)."""
    shape = (*qs.shape[:3], ks.shape[2])
    if not reads_free(qs.device):
        return byte_table_sum(qs, ks, _byte_table("popcount", qs.device))
    out, tmp = ((ws.take(math.prod(shape), 1, ks).view(shape) for ws in buffers) if buffers
                else (None, None))
    diff = popcount32_(torch.bitwise_xor(ks[:, :, None, :, 0], qs[..., 0, None], out=out), tmp)
    for w in range(1, qs.shape[-1]):
        diff.add_(popcount32_(ks[:, :, None, :, w] ^ qs[..., w, None], tmp))
    return diff


def _per_head(x: Tensor, heads: int) -> Tensor:
    """x [b, Hk, n, d] -> [b, heads, n, d], each of a kv head's query heads seeing its rows."""
    b, hk, n, d = x.shape
    if heads == hk:
        return x
    return x[:, :, None].expand(b, hk, heads // hk, n, d).reshape(b, heads, n, d)


class _SignatureTopK(TopKMasker):
    """Top-k by bit signatures; key signatures packed and cached as the KV cache grows.

    Subclasses give `_signs(side, layer, x, heads)`: real vectors whose signs are the
    signature, for x [b, Hk, n, d] keys (`side` key) or [b, Hk, g*n, d] grouped queries.
    """

    _sigs: KeyCache

    @property
    def _bits(self) -> int:  # pragma: no cover
        raise NotImplementedError

    def _signs(self, side: str, ctx: Context, x: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def _key_width(self, ctx: Context) -> int:  # pragma: no cover
        """Values per key of the widest temporary of `_signs("key")`: hash heads x the widest
        layer (input included)."""
        raise NotImplementedError

    def key_signatures(self, ctx: Context, key: Tensor) -> Tensor:
        """Packed signatures [b, Hs, n, words] of keys [b, Hk, n, d], in blocks of keys with no
        temporary above `SIGNATURE_BLOCK_BYTES` (8 bytes per value counted: float32 and the
        int32 bits with their shifted copy)."""
        b, _, n, _ = key.shape
        rows = max(1, SIGNATURE_BLOCK_BYTES // (b * self._key_width(ctx) * 8))
        if rows >= n:
            return pack_signs(self._signs("key", ctx, key))
        out = None
        for r0 in range(0, n, rows):
            part = pack_signs(self._signs("key", ctx, key[:, :, r0:r0 + rows]))
            if out is None:
                out = part.new_empty(*part.shape[:2], n, part.shape[-1])
            out[:, :, r0:r0 + part.shape[2]] = part
        return out

    def _signatures(self, ctx: Context) -> tuple[Tensor, Tensor]:
        """Packed signatures of the grouped query rows [b, Hs, r, w] and of all keys
        [b, Hs, kv, w] (cached; the new keys' computed), the new keys and the query rows in one
        pass where `_joint_signs` gives one (decode: a launch per MLP layer, not two)."""
        n_new = ctx.query.shape[2]
        keep = self._sigs.kept(ctx.layer, ctx.key, n_new)
        joint = self._joint_signs(ctx, ctx.key[:, :, keep:]) if ctx.kv - keep == n_new else None
        if joint is not None:
            packed = pack_signs(joint)
            hs = packed.shape[1] // 2
            return packed[:, hs:], self._sigs.get(ctx.layer, ctx.key, n_new, lambda k: packed[:, :hs])
        ks = self._sigs.get(ctx.layer, ctx.key, n_new, lambda k: self.key_signatures(ctx, k))
        return pack_signs(self._signs("query", ctx, ctx.grouped(ctx.query))), ks

    def _joint_signs(self, ctx: Context, new_keys: Tensor) -> Tensor | None:
        """Real vectors [b, 2 Hs, n, bits] whose signs are the signatures of `new_keys` (the
        first Hs heads) and of the query rows (the others, n rows each), from one pass; None
        where they cannot be one (the default)."""
        return None

    def _workspaces(self) -> tuple[Workspace, Workspace]:
        if "_buffers" not in vars(self):  # reused each call: fresh multi-MB temporaries fault in
            self._buffers = (Workspace(), Workspace())
        return self._buffers

    def _differing_bits(self, ctx: Context) -> Tensor:
        """popcount(sig(q) xor sig(k)) per query head and key, int32 [b, H, q, kv]."""
        return ctx.ungrouped(differing_bits(*self._signatures(ctx), self._workspaces()))

    def score(self, ctx: Context) -> Tensor:
        qs, ks = self._signatures(ctx)
        return ctx.ungrouped(signature_scores(qs, ks, self._bits, self._workspaces()))

    def group_score(self, ctx: Context) -> Tensor:
        # the group's fewest differing bits, then floats for a quarter of the keys' scores
        fewest = self._differing_bits(ctx).unflatten(1, (ctx.key.shape[1], ctx.groups)).amin(2)
        return agreement(fewest, self._bits)


# --- HashAttention weights -------------------------------------------------------------------


@dataclass
class HashWeights:
    """Per layer, {side: MLP}; see the module docstring."""

    layers: list[dict[str, Mlp]]
    activation: str = "silu"

    @property
    def bits(self) -> int:
        return self.layers[0]["query"][-1][0].shape[-1]

    @property
    def hash_heads(self) -> int:
        return self.layers[0]["query"][0][0].shape[0]

    @classmethod
    def init(cls, layers: int, heads: int, head_dim: int, bits: int = 32,
             hidden: list[int] | tuple[int, ...] = (64,), seed: int = 0) -> HashWeights:
        """Random initial weights, the same for queries and keys, so that the untrained hash is
        locality-sensitive (as SimHash is); the training command starts from these."""
        g = torch.Generator().manual_seed(seed)
        dims = [head_dim, *hidden, bits]
        out = []
        for _ in range(layers):
            mlp = [(torch.randn(heads, a, b, generator=g) / a**0.5, torch.zeros(heads, b))
                   for a, b in zip(dims[:-1], dims[1:], strict=True)]
            out.append({side: [(w.clone(), b.clone()) for w, b in mlp] for side in SIDES})
        return cls(out)

    # --- files ---

    def save(self, path: str | Path, info: dict[str, str] | None = None) -> None:
        """Write the own format; `info` (e.g. the training command) goes into the metadata."""
        from safetensors.torch import save_file

        tensors = {}
        for side in SIDES:
            for i in range(len(self.layers[0][side])):
                tensors[f"{side}.{i}.weight"] = torch.stack([lay[side][i][0] for lay in self.layers])
                tensors[f"{side}.{i}.bias"] = torch.stack([lay[side][i][1] for lay in self.layers])
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, str(path), metadata={**(info or {}), "format": FORMAT, "activation": self.activation})

    @classmethod
    def load(cls, path: str | Path, key: str) -> HashWeights:
        """Read any of the three layouts (module docstring); ConfigError naming `key` otherwise."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{key}: hashattn weights file not found: {path}")
        try:
            if path.suffix == ".safetensors":
                return cls._load_own(path, key)
            if zipfile.is_zipfile(path):
                return cls._from_usa(torch.load(path, map_location="cpu", weights_only=True), path, key)
            with open(path, "rb") as f:
                return cls._from_hub(_TensorUnpickler(f).load(), path, key)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"{key}: cannot read {path} as HashAttention weights "
                              f"({type(exc).__name__}: {exc})") from exc

    @classmethod
    def _load_own(cls, path: Path, key: str) -> HashWeights:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            if meta.get("format") != FORMAT:
                raise ConfigError(f"{key}: {path} is not a {FORMAT} file (metadata {meta})")
            t = {n: f.get_tensor(n) for n in names}
        depth = sum(f"query.{i}.weight" in t for i in range(len(t)))
        want = {f"{s}.{i}.{p}" for s in SIDES for i in range(depth) for p in ("weight", "bias")}
        if depth == 0 or names != want:
            raise ConfigError(f"{key}: {path} has tensors {sorted(names)}; expected {sorted(want)}")
        n_layers = t["query.0.weight"].shape[0]
        layers = [{s: [(t[f"{s}.{i}.weight"][lay], t[f"{s}.{i}.bias"][lay]) for i in range(depth)]
                   for s in SIDES} for lay in range(n_layers)]
        return cls(layers, meta.get("activation", "silu"))

    @classmethod
    def _from_hub(cls, data, path: Path, key: str) -> HashWeights:
        if not isinstance(data, dict) or not data:
            raise ConfigError(f"{key}: {path} is not a hat_weights file (expected {{layer: {{...}}}})")
        layers = []
        for i in range(len(data)):
            entry = data.get(i)
            if not isinstance(entry, dict) or not {"query_matrix", "query_bias", "key_matrix",
                                                   "key_bias"} <= set(entry):
                raise ConfigError(f"{key}: {path}: layer {i} lacks query_matrix / query_bias / "
                                  f"key_matrix / key_bias")
            layers.append({s: list(zip(entry[f"{s}_matrix"], entry[f"{s}_bias"], strict=True))
                           for s in SIDES})
        return cls(layers)

    @classmethod
    def _from_usa(cls, state: dict, path: Path, key: str) -> HashWeights:
        pat = re.compile(r"^(\d+)\.learning_to_hash_transformation_([qk])\.(\d+)\.(\d+)\.(weight|bias)$")
        found: dict[tuple[int, str, int, int, str], Tensor] = {}
        for name, value in state.items():
            m = pat.match(name)
            if m:
                lay, side, head, idx, part = m.groups()
                found[int(lay), "query" if side == "q" else "key", int(head), int(idx), part] = value
        if not found:
            raise ConfigError(f"{key}: {path} has no learning_to_hash_transformation_q/k tensors "
                              f"(not a HashAttention USA checkpoint)")
        n_layers = 1 + max(k[0] for k in found)
        heads = 1 + max(k[2] for k in found)
        linear = sorted({k[3] for k in found})
        layers = []
        for lay in range(n_layers):
            sides = {}
            for side in SIDES:
                mlp = []
                for idx in linear:
                    w = [found[lay, side, h, idx, "weight"].t() for h in range(heads)]
                    b = [found.get((lay, side, h, idx, "bias"), torch.zeros(w[h].shape[1])) for h in range(heads)]
                    mlp.append((torch.stack(w), torch.stack(b)))
                sides[side] = mlp
            layers.append(sides)
        return cls(layers)

    # --- use ---

    def check(self, layers: int, heads: int, kv_heads: int, head_dim: int, key: str) -> None:
        """Raise ConfigError unless the weights fit a model with these attention shapes."""
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"{key}: unknown activation {self.activation!r}; expected one of "
                              f"{sorted(ACTIVATIONS)}")
        if len(self.layers) != layers:
            raise ConfigError(f"{key}: weights for {len(self.layers)} layers, but the model has {layers}")
        hh = self.hash_heads
        if hh not in (heads, kv_heads):
            raise ConfigError(f"{key}: weights for {hh} heads, but the model has {heads} query heads "
                              f"and {kv_heads} kv heads")
        for lay, sides in enumerate(self.layers):
            for side, mlp in sides.items():
                dim = head_dim
                for i, (w, b) in enumerate(mlp):
                    if w.dim() != 3 or tuple(w.shape[:2]) != (hh, dim) or tuple(b.shape) != (hh, w.shape[2]):
                        raise ConfigError(
                            f"{key}: layer {lay} {side} linear {i} has weight {list(w.shape)} and bias "
                            f"{list(b.shape)}; expected [{hh}, {dim}, out] and [{hh}, out] "
                            f"(head_dim={head_dim})")
                    dim = w.shape[2]
                if dim != self.bits:
                    raise ConfigError(f"{key}: layer {lay} {side} gives {dim} bits, query side of layer 0 "
                                      f"{self.bits}")

    def project(self, side: str, layer: int, x: Tensor, mlp: Mlp | None = None) -> Tensor:
        """f(x) for x [b, Hh, n, d] (rows already arranged per hash head) -> [b, Hh, n, bits].
        `mlp`: that layer's MLP already on x's device and dtype (`placed`; the casts below are
        then no-ops)."""
        act = activation(self.activation)
        mlp = self.layers[layer][side] if mlp is None else mlp
        bsz, hh, n, _ = x.shape
        x = x.transpose(0, 1).reshape(hh, bsz * n, x.shape[-1])  # a view at batch 1
        for i, (w, b) in enumerate(mlp):  # one kernel per linear: x W + b
            x = torch.baddbmm(b.to(x.dtype).unsqueeze(1), x, w.to(x.dtype))
            if i < len(mlp) - 1:
                x = act(x)
        return x.view(hh, bsz, n, x.shape[-1]).transpose(0, 1)

    def to(self, device) -> HashWeights:
        return HashWeights([{s: [(w.to(device), b.to(device)) for w, b in mlp] for s, mlp in lay.items()}
                            for lay in self.layers], self.activation)

    def placed(self, side: str, layer: int, device, dtype, cache: dict) -> Mlp:
        """One layer's MLP of `side` on `device` in `dtype`: the key and query MLPs are copied
        and cast once into `cache` as one MLP of twice the heads, keys first (`side` "both":
        one pass hashes the new keys and the queries), each side a view of it (a model split
        over GPUs keeps each layer on its own device: only that layer moves)."""
        both = cache.get((layer, device, dtype))
        if both is None:
            both = cache[layer, device, dtype] = [
                (torch.cat([wk, wq]).to(device=device, dtype=dtype),
                 torch.cat([bk, bq]).to(device=device, dtype=dtype))
                for (wk, bk), (wq, bq) in zip(self.layers[layer]["key"], self.layers[layer]["query"],
                                              strict=True)]
        if side == "both":
            return both
        heads = slice(0, self.hash_heads) if side == "key" else slice(self.hash_heads, None)
        return [(w[heads], b[heads]) for w, b in both]


class _TensorUnpickler(pickle.Unpickler):
    """Unpickles dicts / lists of tensors only (a pickle can otherwise run any code)."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            from torch._utils import _rebuild_tensor_v2

            return _rebuild_tensor_v2
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return lambda b: torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)
        if (module, name) == ("collections", "OrderedDict"):
            from collections import OrderedDict

            return OrderedDict
        raise pickle.UnpicklingError(f"refusing {module}.{name} in a weights pickle")


# --- maskers -------------------------------------------------------------------------------


@dataclass
class HashAttention(_SignatureTopK):
    """HashAttention top-k (Desai et al., 2024, https://arxiv.org/abs/2412.14468).

    Learned MLPs f, g give `bits`-bit signatures of q and k; top-k keys by the +-1 dot product
    of the signatures (module docstring). `weights`: a file in any layout of the module
    docstring, or `auto` = `hashattn.safetensors` next to `model` (the config sets
    `model: ${model.pretrained}`; the embedded model ships one). A model without weights is
    refused when the config is validated, before any job runs, naming the training command.
    `per_kv_head`: one selection per kv head (`TopKMasker`).
    """

    key_version = 2  # results changed meaning: learned weights only, published layouts
    file_locators = ("weights", "model")  # name the weights file; its content is in the job key

    heavy_size: Size = 0.1
    per_kv_head: bool = False
    weights: str = "auto"
    model: str | None = None
    _sigs: KeyCache = field(default_factory=KeyCache, init=False, repr=False)
    _path: Path | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        # not a field: config checks evaluate the type hints of a masker and its fields, without torch
        self._w: HashWeights | None = None
        self._placed: dict = {}  # (layer, device, dtype) -> MLP, see HashWeights.placed
        self._path = method_file(
            self.weights, self.model, WEIGHTS_FILE, "weights", "hashattn weights",
            f"no HashAttention weights for model {self.model!r} (looked for {WEIGHTS_FILE} in its "
            f"directory). Fit them with `{TRAIN_COMMAND} --model {self.model} --out "
            f"hash.safetensors` and pass sparse.maskers.<name>.weights=hash.safetensors, or use "
            f"sparse=random_projection_topk")

    def prepare(self, model_config, key: str) -> None:
        layers, heads, kv_heads, head_dim = model_shapes(model_config)
        w = HashWeights.load(self._path, f"{key}.weights")
        w.check(layers, heads, kv_heads, head_dim, f"{key}.weights")
        self._w = w
        self._placed = {}

    @property
    def _bits(self) -> int:
        return self._w.bits

    def notes(self) -> list[str]:
        if self._w is None:
            return []
        return [f"hashattn: learned signatures from {self._path} ({self._w.bits} bits, "
                f"{self._w.hash_heads} hash heads)"]

    def _key_width(self, ctx: Context) -> int:
        mlp = self._w.layers[ctx.layer]["key"]
        return self._w.hash_heads * max(ctx.key.shape[-1], *(w.shape[-1] for w, _ in mlp))

    def _joint_signs(self, ctx: Context, new_keys: Tensor) -> Tensor | None:
        b, hk, n, d = new_keys.shape
        heads = ctx.query.shape[1]
        if self._w is None or self._w.hash_heads != heads:  # kv-head weights: rows differ
            return None
        g = heads // hk  # each query head's new keys, then its query rows: [b, 2H, n, d]
        x = torch.cat([new_keys[:, :, None].expand(b, hk, g, n, d),
                       ctx.query.unflatten(1, (hk, g)).to(new_keys.dtype)], 1).flatten(1, 2)
        mlp = self._w.placed("both", ctx.layer, x.device, x.dtype, self._placed)
        return self._w.project("both", ctx.layer, x, mlp)

    def _signs(self, side: str, ctx: Context, x: Tensor) -> Tensor:
        if self._w is None:
            raise RuntimeError("HashAttention used before prepare() loaded its weights")
        heads = ctx.query.shape[1]
        if self._w.hash_heads == heads and heads != ctx.key.shape[1]:  # per query head
            x = ctx.ungrouped(x) if side == "query" else _per_head(x, heads)
        mlp = self._w.placed(side, ctx.layer, x.device, x.dtype, self._placed)
        return self._w.project(side, ctx.layer, x, mlp)


@dataclass
class RandomProjectionTopK(_SignatureTopK):
    """Top-k by random-projection signatures (SimHash, Charikar 2002): sign(x R) with R a
    Gaussian [d, bits] per layer and kv head, the same for queries and keys; the untrained
    baseline of HashAttention."""

    heavy_size: Size = 0.1
    per_kv_head: bool = False
    bits: int = 32
    seed: int = 0
    _sigs: KeyCache = field(default_factory=KeyCache, init=False, repr=False)
    _proj: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        check_range(self.bits, "bits", 1, 1024)

    @property
    def _bits(self) -> int:
        return self.bits

    def _key_width(self, ctx: Context) -> int:
        return ctx.key.shape[1] * max(ctx.key.shape[-1], self.bits)

    def _signs(self, side: str, ctx: Context, x: Tensor) -> Tensor:
        r = self._proj.get(ctx.layer)
        if r is None or r.device != x.device or r.dtype != x.dtype:  # made and cast once per layer
            g = torch.Generator().manual_seed(self.seed * 100003 + ctx.layer)
            r = torch.randn(x.shape[1], x.shape[-1], self.bits, generator=g)
            r = self._proj[ctx.layer] = r.to(device=x.device, dtype=x.dtype)
        return torch.matmul(x, r.unsqueeze(0))
