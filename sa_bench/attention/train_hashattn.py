"""Fit HashAttention signature MLPs for any model and write the safetensors weights file.

    python -m sa_bench.attention.train_hashattn --model <hf dir, hub id or embedded:name> \\
        --out hash.safetensors [--text passkey|file.txt]

Captures each layer's (post-RoPE) queries and keys on sample text, then fits, per layer and
kv head, f (queries) and g (keys) so that the keys carrying a query's attention rank high.
Keys that the method's sink and local window always keep (`--sink`, `--local`) are left out;
queries can be limited to each window's last tokens (`--last-rows`: with `--text passkey` the
question and answer, the rows the method actually runs on);
of the rest, the `--top` fraction with the highest q.k are the positives. With soft
signatures tanh(f(q)), tanh(g(k)) and logit = a * tanh(f(q)).tanh(g(k)) / bits + c, the loss
is a binary cross-entropy in which each positive weighs its softmax attention probability and
a row's negatives together weigh as much as its positives, so rows whose attention the top-k
must find (a retrieval head) count more than rows attending to their sink and window.
f and g start equal (an untrained hash is then locality-sensitive, like SimHash). Prints,
before and after, the share of the positives' attention mass that the hard signatures' top
keys capture. (HashAttention: https://arxiv.org/abs/2412.14468.)
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch import Tensor

from sa_bench.attention.capture import add_common_args, capture, load_model, shapes, token_windows
from sa_bench.attention.hashattn import SIDES, HashWeights, activation


def _targets(q: Tensor, k: Tensor, pos: Tensor, top: float, sink: int, local: int) -> tuple[Tensor, Tensor, Tensor]:
    """For queries q [Hk, S, d] at positions pos [S]: (positives, candidates, attention probs),
    each [Hk, S, n]; candidates are causal keys outside the sink and the local window."""
    j = torch.arange(k.shape[1])[None, :]
    causal = j <= pos[:, None]
    cand = causal & (j >= sink) & (j <= pos[:, None] - local)
    s = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    probs = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
    rank = s.masked_fill(~cand, float("-inf")).argsort(-1, descending=True).argsort(-1)
    need = (top * cand.sum(-1).float()).round().clamp(min=1).long()  # [Hk, S]
    return (rank < need[..., None]) & cand, cand.expand_as(s), probs


def _mass_recall(w: HashWeights, layer: int, q: Tensor, k: Tensor, pos: Tensor, top: float,
                 sink: int, local: int) -> float:
    """Attention mass of the hard-signature top keys / that of the true top keys."""
    target, cand, probs = _targets(q, k, pos, top, sink, local)
    fq = w.project("query", layer, q.unsqueeze(0))[0].sign()
    gk = w.project("key", layer, k.unsqueeze(0))[0].sign()
    s = torch.matmul(fq, gk.transpose(-1, -2)) + torch.rand(target.shape) * 1e-3  # break ties
    s = s.masked_fill(~cand, float("-inf"))
    need = target.sum(-1, keepdim=True)
    pred = (s.argsort(-1, descending=True).argsort(-1) < need) & cand
    return float((probs * pred).sum() / (probs * target).sum().clamp_min(1e-12))


def fit_layer(w: HashWeights, layer: int, data: list[tuple[Tensor, Tensor]], groups: int, args,
              gen: torch.Generator) -> tuple[float, float]:
    """Train w's layer `layer` (hashes per kv head) in place; returns mass recall (before, after)."""
    params = {side: [(wt.clone().requires_grad_(True), b.clone().requires_grad_(True))
                     for wt, b in w.layers[layer][side]] for side in SIDES}
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(0.0, requires_grad=True)
    opt = torch.optim.Adam([t for mlp in params.values() for pair in mlp for t in pair] + [scale, bias],
                           lr=args.lr)
    per_window = []
    for q, k in data:  # q [H, n, d] -> [Hk, g*m, d] (the last m rows); positions repeat per head
        hk, n = k.shape[0], k.shape[1]
        m = min(args.last_rows, n) if args.last_rows else n
        q = q[:, n - m:].reshape(hk, groups * m, -1)
        per_window.append((q, k, torch.arange(n - m, n).repeat(groups)))
    act = activation(w.activation)
    cut = (args.top, args.sink, args.local)

    def mlp(side: str, x: Tensor) -> Tensor:
        layers = params[side]
        for i, (wt, b) in enumerate(layers):
            x = torch.matmul(x, wt) + b[:, None, :]
            if i < len(layers) - 1:
                x = act(x)
        return x

    def recall() -> float:
        return sum(_mass_recall(w, layer, q, k, pos, *cut) for q, k, pos in per_window) / len(per_window)

    before = recall()
    for step in range(args.steps):
        q, k, pos = per_window[step % len(per_window)]
        pick = torch.randperm(q.shape[1], generator=gen)[:args.rows]
        qs, ps = q[:, pick], pos[pick]
        target, cand, probs = _targets(qs, k, ps, *cut)
        fq, gk = torch.tanh(mlp("query", qs)), torch.tanh(mlp("key", k))
        logits = scale * torch.matmul(fq, gk.transpose(-1, -2)) / fq.shape[-1] + bias
        pos_w = probs * target  # each positive: its attention probability
        neg = cand & ~target
        neg_w = pos_w.sum(-1, keepdim=True) / neg.sum(-1, keepdim=True).clamp(min=1) * neg
        loss = (pos_w * F.softplus(-logits) + neg_w * F.softplus(logits)).sum() / pos_w.sum().clamp_min(1e-12)
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
    parser.add_argument("--top", type=float, default=0.1, help="fraction of candidate keys that are positives")
    parser.add_argument("--sink", type=int, default=4, help="first keys always kept (left out of training)")
    parser.add_argument("--local", type=int, default=64, help="last keys always kept (left out of training)")
    parser.add_argument("--rows", type=int, default=256, help="queries per step")
    parser.add_argument("--last-rows", type=int, default=0,
                        help="train on the queries of each window's last N tokens only (0: all); the "
                        "method runs on question and answer rows, which end a passkey window")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = load_model(args.model, args.dtype, args.device)
    layers, heads, kv_heads, head_dim = shapes(model)
    vocab = model.config.get_text_config().vocab_size
    seen = capture(model, token_windows(args.model, args.text, args.max_tokens, args.samples, vocab))
    w = HashWeights.init(layers, kv_heads, head_dim, args.bits, args.hidden, args.seed)  # per kv head
    for layer in range(layers):
        before, after = fit_layer(w, layer, seen[layer], heads // kv_heads, args, gen)
        print(f"layer {layer}: top-{args.top:g} attention-mass recall {before:.3f} -> {after:.3f}", flush=True)
    w.check(layers, heads, kv_heads, head_dim, "--out")
    argv = sys.argv[1:] if argv is None else argv
    w.save(args.out, {"command": " ".join(["python -m sa_bench.attention.train_hashattn", *argv])})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
