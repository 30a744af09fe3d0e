"""Double Sparsity offline channel calibration.

    python -m sa_bench.attention.calibrate_ds --model <hf dir or id> --out ds.safetensors

For each layer and query head h, channel c is ranked by the authors' "qk" statistic (reference
code config/offline_calibration.py, https://github.com/andy-yang-1/DoubleSparse): the mean over
tokens t of |q_tc k_tc|, each token's query against its own key (k from h's kv head), over sample
text (Yang et al., 2024, https://arxiv.org/abs/2408.07092). Writes `channel_rank` [L, H, d]
(int64, most important first), format "sa_bench.double_sparsity.v1".
"""

from __future__ import annotations

import argparse
import sys

import torch

from sa_bench.attention.capture import add_common_args, capture, load_model, shapes, token_windows

FORMAT = "sa_bench.double_sparsity.v1"


def channel_rank(seen: dict, layers: int, heads: int, kv_heads: int) -> torch.Tensor:
    g = heads // kv_heads
    ranks = []
    for layer in range(layers):
        qs = torch.cat([q for q, _ in seen[layer]], 1)  # [H, n, d]
        ks = torch.cat([k for _, k in seen[layer]], 1).repeat_interleave(g, 0)  # [H, n, d]
        imp = (qs * ks).abs().mean(1)  # [H, d]
        ranks.append(imp.argsort(-1, descending=True))
    return torch.stack(ranks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    args = parser.parse_args(argv)
    from safetensors.torch import save_file

    torch.manual_seed(args.seed)
    model = load_model(args.model, args.dtype, args.device)
    layers, heads, kv_heads, _ = shapes(model)
    vocab = model.config.get_text_config().vocab_size
    seen = capture(model, token_windows(args.model, args.text, args.max_tokens, args.samples, vocab))
    rank = channel_rank(seen, layers, heads, kv_heads).contiguous()
    command = " ".join(["python -m sa_bench.attention.calibrate_ds", *(sys.argv[1:] if argv is None else argv)])
    save_file({"channel_rank": rank}, args.out, metadata={"format": FORMAT, "model": str(args.model),
                                                          "command": command})
    print(f"wrote {args.out}: channel_rank {list(rank.shape)}")


if __name__ == "__main__":
    main()
