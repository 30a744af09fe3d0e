"""Shared pieces of the synthetic benchmarks (niah, ruler): word lists, filler text, sizing.

Word lists (`assets/synthetic/nouns.txt`, `adjectives.txt`) and the filler essay
(`assets/synthetic/essay.txt`) are written for this project, so generation needs no download.
Prompts are sized like RULER does: the largest haystack whose prompt fits a token budget,
counted with the model's own tokenizer (`tokenizer(text, add_special_tokens=False)`).
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).parent / "assets" / "synthetic"

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
"""RULER's repeated-noise haystack sentence."""


def asset_files() -> list[Path]:
    """The shipped files the synthetic benchmarks read (in their job keys)."""
    return [ASSETS / name for name in ("adjectives.txt", "essay.txt", "nouns.txt")]


@cache
def _words(name: str) -> tuple[str, ...]:
    return tuple((ASSETS / name).read_text(encoding="utf-8").split())


def nouns() -> tuple[str, ...]:
    return _words("nouns.txt")


def adjectives() -> tuple[str, ...]:
    return _words("adjectives.txt")


@cache
def essay_words() -> tuple[str, ...]:
    """The filler essay as whitespace-separated words (cycled when more are needed)."""
    return tuple((ASSETS / "essay.txt").read_text(encoding="utf-8").split())


def essay_text(n_words: int) -> str:
    """The first `n_words` words of the endlessly repeated essay, joined by spaces."""
    words = essay_words()
    reps, rest = divmod(n_words, len(words))
    return " ".join(words * reps + words[:rest])


def split_sentences(text: str) -> list[str]:
    """Sentences split after '.', '!' or '?' followed by whitespace."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def random_key_word(rng: random.Random) -> str:
    """An "adjective-noun" key (RULER's `words` needle type)."""
    return f"{rng.choice(adjectives())}-{rng.choice(nouns())}"


def random_number(rng: random.Random, digits: int = 7) -> str:
    """A random integer with exactly `digits` digits (RULER's `numbers` needle type)."""
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def random_uuid(rng: random.Random) -> str:
    """A random version-4 UUID drawn from `rng` (RULER's `uuids` needle type)."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def random_value(rng: random.Random, kind: str) -> str:
    return {"words": random_key_word, "numbers": random_number, "uuids": random_uuid}[kind](rng)


class WordPool:
    """A reproducible stream of distinct English-like words for `index` 0, 1, 2, ...

    The real words (nouns and adjectives) come first in a seeded order, then noun+noun
    compounds ("riverstone") in a seeded pseudo-random order, so any number of distinct
    words is available (RULER's cwe needs thousands at long lengths).
    """

    def __init__(self, rng: random.Random) -> None:
        real = sorted(set(nouns()) | set(adjectives()))
        rng.shuffle(real)
        self.real = real
        self.n = len(nouns())
        self.size = self.n * self.n
        self.mult = self._coprime(rng.randrange(1, self.size), self.size)
        self.offset = rng.randrange(self.size)

    @staticmethod
    def _coprime(a: int, m: int) -> int:
        from math import gcd

        while gcd(a, m) != 1:
            a += 1
        return a

    def take(self, count: int) -> list[str]:
        """The first `count` words of the stream (the same for every call)."""
        out = list(self.real[:count])
        seen = set(out)
        i = 0
        while len(out) < count:
            if i >= self.size:
                raise ValueError(f"cannot make {count} distinct words")
            j = (self.offset + i * self.mult) % self.size
            word = nouns()[j // self.n] + nouns()[j % self.n]
            i += 1
            if word not in seen:
                seen.add(word)
                out.append(word)
        return out


def token_counter(tokenizer: Any) -> Callable[[str], int]:
    """len(tokenizer(text, add_special_tokens=False).input_ids), the sizing rule."""

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    return count


def fit(
    fits: Callable[[int], bool],
    hint: int | None = None,
    minimum: int = 0,
    maximum: int | None = None,
) -> int:
    """The largest n in [minimum, maximum] with fits(n) (fits is monotone: True up to some n).

    Exponential search from `hint` (or 16), then bisection, as RULER sizes its haystacks.
    Raises ValueError if even `minimum` does not fit.
    """
    if not fits(minimum):
        raise ValueError("the target length is too small for the prompt without any haystack")
    if maximum is not None:
        if fits(maximum):
            return maximum
        inner = fits
        fits = lambda n: n < maximum and inner(n)  # noqa: E731
    lo = minimum
    probe = max(hint or 16, minimum + 1)
    step = max(1, probe // 32) if hint else probe
    if fits(probe):
        lo = probe
        while fits(lo + step):
            lo += step
            step *= 2
        hi = lo + step
    else:
        hi = probe
        while hi - step > lo and not fits(hi - step):
            hi -= step
            step *= 2
        lo = max(lo, hi - step)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def sample_seed(*parts: Any) -> random.Random:
    """A Random seeded deterministically (str seeds hash with SHA-512) from the parts."""
    return random.Random("|".join(str(p) for p in parts))


def parse_length(name: str) -> int:
    """'4k' -> 4096, '128k' -> 131072, '1500' -> 1500."""
    match = re.fullmatch(r"(\d+)([kK]?)", name.strip())
    if not match:
        raise ValueError(f"cannot read a token length from {name!r} (use e.g. 4k or 4096)")
    return int(match.group(1)) * (1024 if match.group(2) else 1)
