"""Load a model, run sample text through it, and capture each layer's queries and keys.

Shared by the hashattn training and the double-sparsity calibration commands. The capture
goes through transformers' AttentionInterface (a function that records q, k and then
computes eager attention), so it sees q and k exactly as the sparse methods do (after RoPE).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from sa_bench.attention.dense import eager_attention
from sa_bench.attention.files import model_shapes

SAMPLE_TEXT = (
    "The river town woke slowly. Boats knocked against the pier while the baker counted "
    "loaves and the ferryman read yesterday's paper. In the archive above the post office, "
    "a clerk sorted letters by year: 1911, 1923, 1940, each bundle tied with a different "
    "string. Somewhere in the bundles was a note that mentioned the bridge, the flood, and "
    "a number the mayor had asked everyone to remember: 48213. "
)


def add_common_args(parser) -> None:
    parser.add_argument("--model", required=True,
                        help="Hugging Face model directory, hub id, or embedded:<name>")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--text", default=None, help="plain-text file of sample text, or "
                        "'passkey' for passkey-benchmark prompts (default: a built-in paragraph, repeated)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="tokens per sample")
    parser.add_argument("--samples", type=int, default=1, help="number of text windows")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)


def resolve(name: str) -> str:
    """`embedded:<name>` (as in conf/model) -> its directory; anything else unchanged."""
    from sa_bench.models.loading import EMBEDDED_PREFIX, embedded_dir

    return str(embedded_dir(name[len(EMBEDDED_PREFIX):])) if name.startswith(EMBEDDED_PREFIX) else name


def load_model(name: str, dtype: str, device: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve(name), dtype=getattr(torch, dtype))
    return model.to(device).eval()


def passkey_prompts(n_tokens: int, samples: int, seed: int = 7) -> list[str]:
    """Passkey-benchmark prompts with their answers (the embedded model's own task), each
    ending with its question and answer."""
    import random

    from sa_bench.benchmarks.passkey import make_prompt

    rng = random.Random(seed)
    out = []
    for _ in range(samples):
        context, question, answer = make_prompt(rng, n_tokens - 32, rng.random(), len)
        out.append(f"{context}{question}{answer}.")
    return out


def token_windows(name: str, text_file: str | None, max_tokens: int, samples: int,
                  vocab: int) -> list[Tensor]:
    """Token id windows of the sample text; byte values mod vocab if there is no tokenizer.
    `passkey`: one passkey prompt per window, ending at the window's end (its last tokens are
    the question and answer)."""
    try:
        from transformers import AutoTokenizer

        tokenize = AutoTokenizer.from_pretrained(resolve(name))
    except Exception:  # a bare model directory: no tokenizer files
        def tokenize(text):
            return {"input_ids": [b % vocab for b in text.encode("utf-8")]}
    if text_file == "passkey":
        return [torch.tensor(tokenize(p)["input_ids"][-max_tokens:]).unsqueeze(0)
                for p in passkey_prompts(max_tokens, samples)]
    text = Path(text_file).read_text(encoding="utf-8") if text_file else SAMPLE_TEXT
    ids = tokenize(text)["input_ids"]
    need = max_tokens * samples
    ids = (ids * (need // max(len(ids), 1) + 1))[:need]
    return [torch.tensor(ids[i * max_tokens:(i + 1) * max_tokens]).unsqueeze(0) for i in range(samples)]


def capture(model, windows: list[Tensor]) -> dict[int, list[tuple[Tensor, Tensor]]]:
    """{layer: [(query [H, n, d], key [Hk, n, d]) per window]} in float32 on the CPU."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    seen: dict[int, list[tuple[Tensor, Tensor]]] = {}

    def record(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        seen.setdefault(module.layer_idx, []).append(
            (query[0].detach().float().cpu(), key[0].detach().float().cpu()))
        return eager_attention(module, query, key, value, attention_mask, scaling, dropout)

    name = "sa_bench_capture"
    previous = model.config._attn_implementation
    AttentionInterface.register(name, record)
    AttentionMaskInterface.register(name, eager_mask)  # else the function gets no (causal) mask
    try:
        model.set_attn_implementation(name)
        device = next(model.parameters()).device
        with torch.no_grad():
            for ids in windows:
                model(ids.to(device))
    finally:  # leave no global registration behind
        model.set_attn_implementation(previous)
        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)
    return seen


def shapes(model) -> tuple[int, int, int, int]:
    return model_shapes(model.config)
