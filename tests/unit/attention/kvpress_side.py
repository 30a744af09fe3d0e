"""Run inside the kvpress venv (transformers < 5.3) by tests/unit/attention/test_compression_parity.py.

    python kvpress_side.py OUT_DIR EMBEDDED_DIR PROMPT_FILE

Makes tiny random Llama, Qwen2 and Mistral models with GQA (saved to OUT_DIR/<arch>,
loadable by transformers 5), a random prompt, and for each press and ratio the positions kvpress keeps per layer and kv head
(recovered by matching the compressed keys against the uncompressed ones; AdaKV and KVzip:
the complement of the positions they mask), written to OUT_DIR/kept.json. The same for
sa_bench's embedded model (arch `embedded`: the checkpoint in EMBEDDED_DIR, loaded as is) on
PROMPT_FILE's text encoded with its own tokenizer (the ids: `embedded_ids`). KVzipPress gets
a byte-level tokenizer (`ByteTokenizer`) in place of AutoTokenizer for the random models, the
embedded model's own tokenizer for it.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import kvpress
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache

RATIOS = [0.25, 0.5, 0.75]
N = 300  # (1 - r) * N is whole for every ratio: kvpress's int() and our ceil agree


def presses(ratio: float) -> dict:
    p = kvpress
    return {
        "random": p.RandomPress(ratio, seed=0),
        "knorm": p.KnormPress(ratio),
        "streaming_llm": p.StreamingLLMPress(ratio),
        "snapkv": p.SnapKVPress(ratio),
        "pyramidkv": p.PyramidKVPress(ratio),
        "tova": p.TOVAPress(ratio),
        "observed_attention": p.ObservedAttentionPress(ratio),
        "expected_attention": p.ExpectedAttentionPress(ratio),
        "keydiff": p.KeyDiffPress(ratio),
        "lagkv": p.LagKVPress(ratio),
        "adakv": p.AdaKVPress(p.SnapKVPress(), alpha_safeguard=0.2),
        "criticalkv": p.CriticalKVPress(p.SnapKVPress(ratio)),
        "critical_adakv": p.CriticalAdaKVPress(p.SnapKVPress(ratio)),
        "composed": p.ComposedPress([AscendingSnapKV(ratio), p.KnormPress(COMPOSED_SECOND)]),
        "kvzip": p.KVzipPress(ratio),
        "kvzip_layerwise": p.KVzipPress(ratio, layerwise=True),
        "kvzip_chunked": ChunkedKVzip(ratio),
    }


class AscendingSnapKV(kvpress.SnapKVPress):
    """kvpress's SnapKVPress keeping its positions in position order (kvpress: in its topk
    order), sa_bench's documented difference: a press composed after it breaks exact score
    ties by position. (On the embedded model KNorm after SnapKV differs otherwise: its layer-0
    keys of one token have one norm, and ties fell differently.)"""

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        scores = self.score(module, hidden_states, keys, values, attentions, kwargs)
        kept = scores.topk(int(keys.shape[2] * (1 - self.compression_ratio)), dim=-1).indices
        kept = kept.sort(-1).values.unsqueeze(-1).expand(-1, -1, -1, module.head_dim)
        return keys.gather(2, kept).contiguous(), values.gather(2, kept).contiguous()


class ChunkedKVzip(kvpress.KVzipPress):
    """KVzipPress reconstructing the context in chunks of KVZIP_CHUNK tokens (kvpress's
    `prepare` takes the chunk size as an argument; its default, 2048, exceeds N)."""

    def prepare(self, model, tokenizer):
        return super().prepare(model, tokenizer, chunk_size=KVZIP_CHUNK)


KVZIP_CHUNK = 128


class ByteTokenizer:
    """Token id = UTF-8 byte, no chat template (sa_bench.attention.kvzip.ByteTokenizer's
    encoding): what KVzipPress gets from AutoTokenizer.from_pretrained here for the random
    models (they have no tokenizer), so both sides feed the same reconstruction prompt; a
    model directory with a tokenizer (the embedded model) gets its own."""

    chat_template = None

    @classmethod
    def from_pretrained(cls, path="", *args, **kwargs):
        if path and Path(path, "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(path)
        return cls()

    def encode(self, text, return_tensors=None, add_special_tokens=False):
        return torch.tensor([list(text.encode())])


kvpress.presses.kvzip_press.AutoTokenizer = ByteTokenizer


COMPOSED_SECOND = 0.2
"""The second press's ratio in the composition (conf/sparse/composed.yaml's KNorm)."""
DECODING = dict(compression_interval=4, target_size=200)
"""DecodingPress over KnormPress: compressed after the 4th pass while answering."""


def decoding_kept(model, ids, steps, make=None) -> list[list[list[int]]]:
    """The positions DecodingPress (`make()`, else over KnormPress) keeps when a question and
    3 tokens are fed after the context (its compression comes after the 4th pass), against
    the same passes uncompressed."""
    caches = []
    for press in (None, (make or p_decoding)()):
        cache = prefill(model, ids)
        pos = ids.shape[1]
        with torch.no_grad(), (press(model) if press is not None else contextlib.nullcontext()):
            for step in steps:
                t = torch.tensor([step])
                model(t, past_key_values=cache, position_ids=torch.arange(pos, pos + len(step))[None])
                pos += len(step)
        caches.append(cache)
    assert caches[1].layers[0].keys.shape[2] == DECODING["target_size"]
    return kept_positions(caches[0], caches[1], model)


def p_decoding():
    return kvpress.DecodingPress(base_press=kvpress.KnormPress(), **DECODING)


@dataclass
class ExpectedAttentionAfterTrue(kvpress.ExpectedAttentionPress):
    """kvpress's ExpectedAttentionPress with its future positions after the true position of
    the last buffered query (kvpress: after the buffer's length), sa_bench's documented
    difference while decoding: `offset` is the context length."""

    offset: int = 0

    def apply_avg_rope(self, module, mu, cov, q_len):
        return super().apply_avg_rope(module, mu, cov, q_len + self.offset)


DECODING_STEPS = [[17], [23], [31], [5, 9, 11, 13, 2]]
"""The last pass feeds SnapKV's window (4): kvpress rotates the window with that pass's RoPE."""


def decoding_presses() -> dict:
    """DecodingPress (interval 4, target 200) over scoring presses that read the passes since
    the last compression, as sa_bench's `Decoding` configs (press keyword arguments)."""
    return {"snapkv": (kvpress.SnapKVPress, dict(window_size=4)), "tova": (kvpress.TOVAPress, {}),
            "expected_attention": (ExpectedAttentionAfterTrue, dict(n_sink=0, offset=N))}


def prefill(model, ids, press=None) -> DynamicCache:
    cache = DynamicCache()
    with torch.no_grad():
        if press is None:
            model(ids, past_key_values=cache)
        else:
            with press(model):
                model(ids, past_key_values=cache)
    return cache


def kept_positions(full: DynamicCache, cache: DynamicCache, model) -> list[list[list[int]]]:
    out = []
    for layer, (before, after) in enumerate(zip(full.layers, cache.layers, strict=True)):
        attn = model.model.layers[layer].self_attn
        masked = getattr(attn, "masked_key_indices", None)
        heads = []
        for h in range(before.keys.shape[1]):
            if masked is not None:  # AdaKV masks: kept = not masked
                _, hs, ss = masked
                gone = set(ss[hs == h].tolist())
                heads.append([i for i in range(before.keys.shape[2]) if i not in gone])
            else:
                d = torch.cdist(after.keys[0, h], before.keys[0, h])
                heads.append(sorted(d.argmin(-1).tolist()))
        out.append(heads)
    return out


def make_model(arch: str, impl: str, out: Path, embedded: Path):
    """The embedded model as shipped, or a random one (saved to OUT_DIR/<arch> once)."""
    if arch == "embedded":
        model = AutoModelForCausalLM.from_pretrained(embedded, dtype=torch.float32).eval()
        model.set_attn_implementation(impl)
        return model
    shape = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 max_position_embeddings=2048, rope_theta=10000.0)
    # sa_bench refuses sliding-window cache layers (Mistral's default, 4096: wider than
    # the prompt, so the same attention) for compression
    config = AutoConfig.for_model(arch, **shape, **({"sliding_window": None} if arch == "mistral" else {}))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.set_attn_implementation(impl)
    if impl == "sdpa":
        model.save_pretrained(out / arch)
    return model


def main(out: Path, embedded: Path, prompt: Path) -> None:
    result: dict = {"kvpress": version("kvpress"), "transformers": version("transformers"),
                    "n": N, "kept": {}}
    torch.manual_seed(0)
    random_ids = torch.randint(0, 256, (1, N))
    result["ids"] = random_ids[0].tolist()
    embedded_ids = AutoTokenizer.from_pretrained(embedded)(prompt.read_text(), return_tensors="pt").input_ids
    assert embedded_ids.shape == (1, N), embedded_ids.shape
    result["embedded_ids"] = embedded_ids[0].tolist()
    steps = [[5, 9, 11, 13, 2], [17], [23], [31]]
    result["decoding"] = {"steps": steps, **DECODING, "kept": {}}
    for arch in ("llama", "qwen2", "mistral", "embedded"):
        ids = embedded_ids if arch == "embedded" else random_ids
        for impl in ("sdpa", "eager"):
            model = make_model(arch, impl, out, embedded)
            full = prefill(model, ids)
            for ratio in RATIOS:
                for name, press in presses(ratio).items():
                    if (name == "observed_attention") != (impl == "eager"):
                        continue  # observed attention reads eager weights; AdaKV refuses eager
                    if name in ("adakv", "critical_adakv"):
                        press.compression_ratio = ratio
                    for attn in (layer.self_attn for layer in model.model.layers):
                        attn.masked_key_indices = None
                    cache = prefill(model, ids, press)
                    kept = kept_positions(full, cache, model)
                    result["kept"].setdefault(arch, {}).setdefault(name, {})[str(ratio)] = kept
            if impl == "sdpa":
                result["decoding"]["kept"][arch] = decoding_kept(model, ids, steps)
                for name, (cls, kw) in decoding_presses().items():
                    case = result.setdefault("decoding_presses", {}).setdefault(name, {
                        "steps": DECODING_STEPS, **DECODING, "press": {k: v for k, v in kw.items() if k != "offset"},
                        "kept": {}})
                    case["kept"][arch] = decoding_kept(model, ids, DECODING_STEPS, lambda c=cls, k=kw: (
                        kvpress.DecodingPress(base_press=c(**k), **DECODING)))
    (out / "kept.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*map(Path, sys.argv[1:4]))
