"""Passkey retrieval: one 5-digit key hidden in filler text, asked for at the end.

Synthetic and offline: every sample is generated from the seed with the model's own
tokenizer, at an exact prompt length in tokens (subset `1k` = 1,024 tokens of context +
question, special tokens not counted) and with needle depths spread evenly over the
samples. The needle `The pass key is #DDDDD.` is hidden between words of a fixed 64-word
lexicon; the question ends with the cue `The pass key is #`, after which the model should
write the five digits. (The plain-English wording around `#DDDDD.` is what lets a small
instruct model such as SmolLM2-135M answer too; the embedded model learns the same format.)

The same generator (`make_prompt`) produces the training data of the embedded default
model (`python -m sa_bench.models.train_tiny`), so the format is exactly what it learned.
Score: exact match of the first run of digits in the prediction (0-100).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from sa_bench.benchmarks.base import Benchmark, Sample
from sa_bench.config import ConfigError

LEXICON = (
    "the of and to in is was for on with as by at from that this are it be or an "
    "river stone cloud field house water light green small quiet north early bright "
    "garden window letter market summer winter morning evening forest island bridge "
    "silver golden gentle simple yellow purple orange little walked carried opened "
    "watched followed painted over under after before across"
).split()
assert len(LEXICON) == 64 and len(set(LEXICON)) == 64

HEADER = "A pass key of five digits is hidden in the text below. Remember it.\n\n"
NEEDLE = "The pass key is #{digits}."
QUESTION = "\n\nWhat is the pass key? The pass key is #"
ANSWER_PREFIX = "The pass key is #"
"""A sample's `question` is QUESTION without this tail, which becomes its `answer_prefix`: with a
chat template the cue opens the assistant's answer; without one the prompt text is unchanged."""
N_DIGITS = 5


def subset_tokens(subset: str) -> int:
    """`1k` -> 1024, `2k` -> 2048, `512` -> 512."""
    match = re.fullmatch(r"(\d+)(k?)", str(subset).strip().lower())
    if not match or int(match.group(1)) == 0:
        raise ConfigError(f"subset {subset!r}: expected a token length like '1k', '2k' or '512'")
    return int(match.group(1)) * (1024 if match.group(2) else 1)


def _insert_needle(filler: str, needle: str, depth: float) -> str:
    """Put `needle` between two words at fraction `depth` of `filler`."""
    if not filler:
        return needle
    if depth <= 0.0:
        return needle + " " + filler
    pos = filler.find(" ", int(depth * len(filler)))
    if pos < 0 or pos == len(filler) - 1:
        return filler.rstrip() + " " + needle
    return filler[:pos] + " " + needle + filler[pos:]


def make_prompt(
    rng: random.Random, n_tokens: int, depth: float, count_tokens: Callable[[str], int]
) -> tuple[str, str, str]:
    """One sample: (context, question, answer) with count_tokens(context + question) as close
    to `n_tokens` as possible without exceeding it (for a byte-level tokenizer: exact, or one
    short when the needle ends the filler and the cut fell on a space)."""
    digits = "".join(rng.choice("0123456789") for _ in range(N_DIGITS))
    needle = NEEDLE.format(digits=digits)
    words: list[str] = []
    size = 0
    while size < 8 * n_tokens + 64:
        word = rng.choice(LEXICON)
        words.append(word)
        size += len(word) + 1
    text = " ".join(words)

    def build(n_chars: int) -> str:
        return HEADER + _insert_needle(text[:n_chars], needle, depth)  # +1 char = +1 byte

    lo, hi = 0, len(text)  # largest n_chars whose prompt fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(build(mid) + QUESTION) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    return build(lo), QUESTION, digits


def even_depths(n: int) -> list[float]:
    return [0.5] if n == 1 else [i / (n - 1) for i in range(n)]


def first_digits(prediction: str) -> str:
    match = re.search(r"\d+", prediction)
    return match.group(0) if match else ""


@dataclass
class Passkey(Benchmark):
    name: str = "passkey"
    subsets: list[str] = field(default_factory=lambda: ["1k", "2k"])
    n_samples: int = 20
    """Samples per subset (needle depths spread evenly from 0 to 1)."""
    generation_tokens: int = 12

    reads_files: ClassVar[bool] = False
    revision_refused: ClassVar[str | None] = "generates its samples and reads no hub dataset"

    def __post_init__(self) -> None:
        super().__post_init__()
        for s in self.subsets:
            try:
                subset_tokens(s)
            except ConfigError as exc:
                raise ConfigError(f"subsets: {exc}") from None
        if self.n_samples < 1:
            raise ConfigError(f"n_samples: expected an int >= 1, got {self.n_samples}")
        if self.generation_tokens < N_DIGITS:
            raise ConfigError(f"generation_tokens: expected >= {N_DIGITS}, got {self.generation_tokens}")

    def load(self, tokenizer: Any) -> list[Sample]:
        if self.subset is None:
            raise ConfigError("subset: no subset selected")
        n_tokens = subset_tokens(self.subset)

        def count(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

        samples = []
        for i, depth in enumerate(even_depths(self.n_samples)):
            rng = random.Random(f"passkey:{self.seed}:{self.subset}:{i}")
            context, question, answer = make_prompt(rng, n_tokens, depth, count)
            samples.append(Sample(
                id=f"{self.subset}-{i}", context=context,
                question=question[: -len(ANSWER_PREFIX)], answer_prefix=ANSWER_PREFIX,
                answers=[answer], chat=True, meta={"depth": round(depth, 4), "n_tokens": n_tokens},
            ))
        return self.select(samples)

    def max_new_tokens(self) -> int:
        return self.generation_tokens

    def score(self, samples: list[Sample], predictions: list[str]) -> dict[str, float]:
        if len(samples) != len(predictions):
            raise ValueError(f"{len(samples)} samples but {len(predictions)} predictions")
        hits = [first_digits(p) in s.answers for s, p in zip(samples, predictions, strict=True)]
        return {"score": round(100.0 * sum(hits) / max(len(hits), 1), 2), "n": float(len(hits))}
