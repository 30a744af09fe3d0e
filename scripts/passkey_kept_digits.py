"""Which presses keep the passkey's digits on the embedded model (docs/results.md).

    python scripts/passkey_kept_digits.py [--ratio 0.25] [--samples 5] [PRESS ...]

Builds passkey prompts of 1k tokens (the benchmark's own generator, needle depths spread from
0 to 1), prefills them on the embedded model through sa_bench's job path, compresses the
context with each press, and prints for each press the share of (layer, kv head) pairs that
keep all five digits, and the share of digit keys that are among the largest `ratio` of their head's key norms
(KNorm evicts the largest norms first).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch

from sa_bench.attention import SparseMethod
from sa_bench.benchmarks.passkey import even_depths, make_prompt
from sa_bench.models.loading import EMBEDDED_ROOT
from sa_bench.perf.attention import method_config
from sa_bench.runner import _prefill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("presses", nargs="*", default=["knorm", "expected_attention", "snapkv",
                                                        "keydiff", "streaming_llm"])
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--samples", type=int, default=5)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = EMBEDDED_ROOT / "tiny_retrieval"
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    prompts = []
    for i, depth in enumerate(even_depths(args.samples)):
        context, _, digits = make_prompt(random.Random(i), 1024, depth, count)
        ids = tok(context, add_special_tokens=False)["input_ids"]
        at = count(context[:context.index(digits)])  # byte-level: the digits' first token
        prompts.append((ids, range(at, at + len(digits))))
    print(f"# embedded model, passkey 1k, {args.samples} prompts, compression ratio {args.ratio}")
    print("| press | (layer, kv head) pairs keeping all 5 digits |")
    print("|---|---|")
    for name in args.presses:
        method = SparseMethod.from_config(method_config(name, Path(), args.ratio))  # no model files
        keeping, pairs, quantiles = 0, 0, []
        with method.installed(model, "sdpa", tok):
            for ids, digits in prompts:
                method.reset()
                cache, n, _ = _prefill(model, method, tuple(ids), torch.device("cpu"), 256)
                for layer in cache.layers:
                    norms = layer.keys[0].norm(dim=-1)
                    rank = norms.argsort(-1).argsort(-1).float() / (n - 1)
                    quantiles += rank[:, digits.start:digits.stop].flatten().tolist()
                method.compress(cache, "context")
                for idx, valid in method.compressor.kept.values():  # [b, hk, kept]
                    for h in range(idx.shape[1]):
                        head = idx[0, h] if valid is None else idx[0, h][valid[0, h]]
                        pairs += 1
                        keeping += set(digits) <= set(head.tolist())
        print(f"| {name} | {keeping}/{pairs} |")
    top = sum(q > 1 - args.ratio for q in quantiles) / len(quantiles)
    print(f"\ndigit keys among the largest {args.ratio:g} of their head's key norms: {top:.0%}")


if __name__ == "__main__":
    main()
