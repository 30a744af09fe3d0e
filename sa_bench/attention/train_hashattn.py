"""Fit HashAttention signature MLPs for any model and write the safetensors weights file.

    python -m sa_bench.attention.train_hashattn --model <hf dir or id> --out hash.safetensors

Captures each layer's (post-RoPE) queries and keys on sample text, then fits, per layer and
kv head, f (queries) and g (keys) so that the true top keys of each query rank high: with
soft signatures tanh(f(q)), tanh(g(k)) and similarity sim = tanh(f(q)).tanh(g(k)) / bits, a
binary cross-entropy on a*sim + c whose positives are the `--top` fraction of causal keys with
the highest q.k (positives up-weighted to balance). Prints the top-k recall of the hard
signatures before and after training. (HashAttention: https://arxiv.org/abs/2412.14468.)
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor

from sa_bench.attention.capture import add_common_args, capture, load_model, shapes, token_windows
from sa_bench.attention.hashattn import ACTIVATIONS, SIDES, HashWeights


def _labels(q: Tensor, k: Tensor, pos: Tensor, top: float) -> tuple[Tensor, Tensor]:
    """True top keys (bool) and causal pairs for queries q [Hk, S, d] at positions pos [S]."""
    causal = torch.arange(k.shape[1])[None, :] <= pos[:, None]  # [S, n]
    s = torch.matmul(q, k.transpose(-1, -2)).masked_fill(~causal, float("-inf"))
    rank = s.argsort(-1, descending=True).argsort(-1)
    need = (top * (pos + 1).float()).round().clamp(min=1).long()  # [S]
    return (rank < need[:, None]) & causal, causal.expand_as(s)


def _recall(w: HashWeights, layer: int, q: Tensor, k: Tensor, pos: Tensor, top: float) -> float:
    pos_lab, causal = _labels(q, k, pos, top)
    fq = w.project("query", layer, q.unsqueeze(0))[0].sign()
    gk = w.project("key", layer, k.unsqueeze(0))[0].sign()
    s = torch.matmul(fq, gk.transpose(-1, -2)) + torch.rand(pos_lab.shape) * 1e-3  # break ties
    s = s.masked_fill(~causal, float("-inf"))
    need = pos_lab.sum(-1, keepdim=True)
    pred = s.argsort(-1, descending=True).argsort(-1) < need
    return float((pred & pos_lab).sum() / pos_lab.sum().clamp(min=1))


def fit_layer(w: HashWeights, layer: int, data: list[tuple[Tensor, Tensor]], groups: int,
              steps: int, lr: float, top: float, rows: int, gen: torch.Generator) -> tuple[float, float]:
    """Train w's layer `layer` (hashes per kv head) in place; returns recall (before, after)."""
    params = {side: [(wt.clone().requires_grad_(True), b.clone().requires_grad_(True))
                     for wt, b in w.layers[layer][side]] for side in SIDES}
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(0.0, requires_grad=True)
    opt = torch.optim.Adam([t for mlp in params.values() for pair in mlp for t in pair] + [scale, bias], lr=lr)
    per_window = []
    for q, k in data:  # q [H, n, d] -> [Hk, g*n, d]; positions repeat per query head
        hk, n = k.shape[0], k.shape[1]
        per_window.append((q.reshape(hk, groups * n, -1), k, torch.arange(n).repeat(groups)))
    act = ACTIVATIONS[w.activation]

    def mlp(side: str, x: Tensor) -> Tensor:
        layers = params[side]
        for i, (wt, b) in enumerate(layers):
            x = torch.matmul(x, wt) + b[:, None, :]
            if i < len(layers) - 1:
                x = act(x)
        return x

    def recall() -> float:
        return sum(_recall(w, layer, q, k, pos, top) for q, k, pos in per_window) / len(per_window)

    before = recall()
    for step in range(steps):
        q, k, pos = per_window[step % len(per_window)]
        pick = torch.randperm(q.shape[1], generator=gen)[:rows]
        qs, ps = q[:, pick], pos[pick]
        target, causal = _labels(qs, k, ps, top)
        fq, gk = torch.tanh(mlp("query", qs)), torch.tanh(mlp("key", k))
        sim = torch.matmul(fq, gk.transpose(-1, -2)) / fq.shape[-1]
        logits = scale * sim + bias
        npos = target.sum().clamp(min=1)
        pos_weight = ((causal.sum() - npos) / npos).clamp(min=1.0)
        loss = F.binary_cross_entropy_with_logits(
            logits[causal], target[causal].float(), pos_weight=pos_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    w.layers[layer] = {side: [(wt.detach(), b.detach()) for wt, b in mlp_] for side, mlp_ in params.items()}
    return before, recall()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--bits", type=int, default=32)
    parser.add_argument("--hidden", type=int, nargs="*", default=[64],
                        help="hidden widths of the MLPs (their depth is this count + 1)")
    parser.add_argument("--steps", type=int, default=200, help="optimiser steps per layer")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--top", type=float, default=0.05, help="fraction of keys that are positives")
    parser.add_argument("--rows", type=int, default=256, help="queries per step")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = load_model(args.model, args.dtype, args.device)
    layers, heads, kv_heads, head_dim = shapes(model)
    vocab = model.config.get_text_config().vocab_size
    seen = capture(model, token_windows(args.model, args.text, args.max_tokens, args.samples, vocab))
    w = HashWeights.init(layers, kv_heads, head_dim, args.bits, args.hidden, args.seed)  # per kv head
    for layer in range(layers):
        before, after = fit_layer(w, layer, seen[layer], heads // kv_heads, args.steps, args.lr,
                                  args.top, args.rows, gen)
        print(f"layer {layer}: top-{args.top:g} recall {before:.3f} -> {after:.3f}", flush=True)
    w.check(layers, heads, kv_heads, head_dim, "--out")
    w.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
