"""Needle in a haystack (NIAH): one needle at a chosen depth in filler text of an exact length.

After G. Kamradt's "LLMTest_NeedleInAHaystack" (https://github.com/gkamradt/LLMTest_NeedleInAHaystack):
a needle sentence is placed at a depth (percent of the haystack, moved back to the previous
sentence boundary) of a filler essay, and the model is asked to retrieve it. To be scored
offline without a judge model, the needle carries a random key and 7-digit value (as RULER's
niah_single_2): "The special magic number for {key} is: {value}.", scored by whether the
value appears in the answer. One subset per length ("4k" = 4096 tokens of context + question,
counted with the model's tokenizer without chat template); `depths` x `samples_per_depth`
samples per subset; the score is reported overall and per depth.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from sa_bench.benchmarks import metrics, synthetic
from sa_bench.benchmarks.base import Benchmark, Sample
from sa_bench.config import ConfigError

INTRO = (
    "Below is a long text. Somewhere in it a special magic number is hidden. Memorize it; "
    "I will quiz you about it afterwards.\n\n"
)
NEEDLE = "The special magic number for {key} is: {value}."
QUESTION = (
    "\n\nWhat is the special magic number for {key} mentioned in the provided text? "
    "Don't give information outside the document or repeat your findings."
)


def insert_at_depth(sentences: list[str], needle: str, depth: float) -> str:
    """Join sentences with the needle placed at `depth` percent of the characters, moved back
    to the start of the sentence that contains that point (Kamradt: previous sentence end)."""
    starts, pos = [], 0
    for s in sentences:
        starts.append(pos)
        pos += len(s) + 1
    if depth <= 0 or not sentences:
        cut = 0
    elif depth >= 100:
        cut = len(sentences)
    else:
        cut = max(0, bisect.bisect_right(starts, pos * depth / 100) - 1)
    return " ".join([*sentences[:cut], needle, *sentences[cut:]])


@dataclass
class Niah(Benchmark):
    """Single-needle retrieval at exact token lengths and needle depths."""

    depths: list[float] = field(default_factory=lambda: [float(d) for d in range(0, 101, 10)])
    """Needle depths in percent of the haystack (0 = start, 100 = end)."""
    samples_per_depth: int = 3
    haystack: Literal["essay", "noise"] = "essay"
    """Filler: this project's essay text, or RULER's repeated noise sentence."""

    reads_files: ClassVar[bool] = False
    revision_refused: ClassVar[str | None] = "generates its samples and reads no hub dataset"

    def __post_init__(self) -> None:
        super().__post_init__()
        for s in self.subsets:
            try:
                synthetic.parse_length(s)
            except ValueError as exc:
                raise ConfigError(f"subsets: {exc}") from None
        if not self.depths:
            raise ConfigError("depths: expected a non-empty list of percentages")
        for d in self.depths:
            if not 0 <= d <= 100:
                raise ConfigError(f"depths: each depth must be in [0, 100], got {d}")
        if self.samples_per_depth < 1:
            raise ConfigError(f"samples_per_depth: expected an int >= 1, got {self.samples_per_depth}")

    @property
    def length(self) -> int:
        return synthetic.parse_length(self.subset)

    def max_new_tokens(self) -> int:
        return 32

    @classmethod
    def package_files(cls) -> list[Path]:
        return synthetic.asset_files()

    def _filler(self, n: int) -> list[str]:
        """n words of the essay (as sentences), or n of the noise haystack's sentences."""
        if self.haystack == "noise":
            noise = synthetic.split_sentences(synthetic.NOISE)
            return (noise * (n // len(noise) + 1))[:n]
        return synthetic.split_sentences(synthetic.essay_text(n))

    def load(self, tokenizer: Any) -> list[Sample]:
        """Each sample's haystack is the largest whose prompt has <= `length` tokens."""
        count = synthetic.token_counter(tokenizer)
        plan = [(d, r) for d in self.depths for r in range(self.samples_per_depth)]
        chosen = self.select(list(range(len(plan))))  # type: ignore[arg-type]
        samples, hint = [], None
        for index in chosen:
            depth, rep = plan[index]
            rng = synthetic.sample_seed("niah", self.length, self.seed, depth, rep)
            key, value = synthetic.random_key_word(rng), synthetic.random_number(rng)
            needle = NEEDLE.format(key=key, value=value)
            question = QUESTION.format(key=key)

            def context(n: int, needle: str = needle, depth: float = depth) -> str:
                return INTRO + insert_at_depth(self._filler(n), needle, depth)

            def fits(n: int, context: Any = context, question: str = question) -> bool:
                return count(context(n) + question) <= self.length

            try:
                n = synthetic.fit(fits, hint=hint)
            except ValueError as exc:
                raise ValueError(f"niah/{self.subset}: {exc}") from None
            hint = n
            samples.append(
                Sample(
                    id=f"niah-{self.subset}-d{depth:g}-{rep}",
                    context=context(n),
                    question=question,
                    answers=[value],
                    meta={"depth": depth, "haystack": n},
                )
            )
        return samples

    def score(self, samples: list[Sample], predictions: list[str]) -> dict[str, Any]:
        """Overall and per-depth 100 x fraction of answers containing the needle's value."""
        values = [
            metrics.string_match_all(p, s.answers)
            for s, p in zip(samples, predictions, strict=True)
        ]
        result: dict[str, Any] = {
            "score": metrics.mean_percent(values),
            "n": len(values),
            "length": self.length,
        }
        for depth in self.depths:
            bucket = [v for v, s in zip(values, samples, strict=True) if s.meta["depth"] == depth]
            result[f"depth_{depth:g}"] = metrics.mean_percent(bucket)
        return result
