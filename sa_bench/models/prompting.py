"""From a benchmark sample to token ids: middle truncation, chat template once, one BOS.

The prompt is split into the shared context part (prefilled once, dense) and the question
part. With a chat template the whole user message is rendered once and split afterwards at a
sentinel, so the template's own tokens land on the right side of the split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sa_bench.benchmarks.base import Sample

_SPLIT = "\u2063SA_BENCH_SPLIT\u2063"


@dataclass
class Request:
    sample: Sample
    context_ids: list[int]
    question_ids: list[int]
    truncated: bool


def truncate_middle(ids: list[int], budget: int) -> list[int]:
    """Keep the first and the last tokens (LongBench: first half + last half)."""
    if len(ids) <= budget:
        return ids
    head = budget // 2
    return ids[:head] + ids[len(ids) - (budget - head):]


def truncate_end(ctx_ids: list[int], question: str, tokenizer: Any,
                 budget: int) -> tuple[list[int], list[int]]:
    """(the first context tokens, the question's tokens) within `budget` tokens: the question
    (separator included) whole, the context cut at its end (Zero-SCROLLS). A question longer
    than the budget keeps its first and last tokens."""
    q_ids = _encode(tokenizer, question)
    if len(q_ids) >= budget:
        return ctx_ids[:1], truncate_middle(q_ids, max(budget - 1, 1))
    return ctx_ids[: budget - len(q_ids)], q_ids


def adds_bos(tokenizer: Any) -> bool:
    """Does plain `tokenizer(text)` put a BOS token first?"""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[0] == bos


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _dedupe_bos(ids: list[int], bos: int | None) -> list[int]:
    while bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    return ids


def build_request(
    sample: Sample, tokenizer: Any, chat: bool, max_prompt_tokens: int,
    template_kwargs: dict[str, Any] | None = None,
) -> Request:
    """Token ids for one sample; the prompt never exceeds `max_prompt_tokens` tokens.

    `template_kwargs` go to the chat template (e.g. Qwen3's `enable_thinking: false`).
    """
    use_chat = chat and sample.chat and bool(getattr(tokenizer, "chat_template", None))
    ctx_ids = _encode(tokenizer, sample.context)
    q_ids = _encode(tokenizer, sample.question)
    budget = max_prompt_tokens
    for _ in range(3):  # the second pass accounts for the template's own tokens
        truncated = len(ctx_ids) + len(q_ids) > budget
        if truncated and sample.truncation_separator is not None:
            ctx_part, q_part = truncate_end(ctx_ids, sample.truncation_separator + sample.question,
                                            tokenizer, budget)
        else:
            ids = truncate_middle(ctx_ids + q_ids, max(budget, 2))
            n_q = min(len(q_ids), len(ids) - len(ids) // 2)
            ctx_part, q_part = ids[: len(ids) - n_q], ids[len(ids) - n_q:]
        if truncated:
            ctx_text = tokenizer.decode(ctx_part)
            q_text = tokenizer.decode(q_part)
        else:
            ctx_text, q_text = sample.context, sample.question
        context, question = _render(
            tokenizer, ctx_text, q_text, sample.answer_prefix, use_chat, template_kwargs or {}
        )
        overflow = len(context) + len(question) - max_prompt_tokens
        if overflow <= 0:
            break
        budget -= overflow
    if not question:  # the question phase needs at least one token
        context, question = context[:-1], context[-1:]
    return Request(sample, context, question, truncated)


def _render(
    tokenizer: Any, ctx_text: str, q_text: str, answer_prefix: str, use_chat: bool,
    template_kwargs: dict[str, Any],
) -> tuple[list[int], list[int]]:
    bos = tokenizer.bos_token_id
    if use_chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": ctx_text + _SPLIT + q_text}],
            add_generation_prompt=True, tokenize=False, **template_kwargs,
        )
        head, tail = text.split(_SPLIT, 1)
        tail += answer_prefix
    else:
        head, tail = ctx_text, q_text + answer_prefix
    context = _encode(tokenizer, head)
    if not use_chat and adds_bos(tokenizer):
        context = [bos, *context]
    return _dedupe_bos(context, bos), _encode(tokenizer, tail)
