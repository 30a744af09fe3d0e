"""What every benchmark provides.

A benchmark is a dataclass whose fields are the keys of its YAML file in `conf/benchmark/`
(the YAML's `_target_` names the class). The job runner calls, for the one subset of a job:

    samples = bench.load(tokenizer)        # list[Sample], already narrowed by max_samples
    n = bench.max_new_tokens()              # official generation length for bench.subset
    stop = eos | bench.generation.stop_ids(tokenizer)  # token ids that end an answer
    token = next_token(logits, bench.generation, prompt_ids, generated,  # each greedy step
                       stop=stop, n_new=len(generated))
    metrics = bench.score(samples, preds)  # {"score": 0-100, ...}, official metric
"""

from __future__ import annotations

import functools
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from sa_bench.config import ConfigError

if TYPE_CHECKING:
    import torch


@dataclass
class Generation:
    """Decoding settings of a benchmark's official prediction script (greedy decoding).

    A setting that is null in the config is the benchmark's official value for the job's
    subset (`Benchmark.official_generation`), filled in when the subset is set, so the job
    key holds the value actually used.
    """

    repetition_penalty: float = 1.0
    """transformers' `repetition_penalty`: the logit of every token id already in the prompt
    or the answer is divided by it where positive, multiplied where negative. 1.0: off."""

    stop_on_newline: bool | None = None
    """Also end the answer at the newline token, found as LongBench's `pred.py` finds it:
    the last id of `tokenizer.encode("\\n", add_special_tokens=False)` (officially on for
    LongBench samsum). null: the subset's official value."""

    min_new_tokens: int | None = None
    """No stop token (EOS, or the newline above) is chosen before this many tokens, as
    transformers' `min_new_tokens` (LongBench samsum: 1, its `min_length=context_length+1`).
    null: the subset's official value."""

    def __post_init__(self) -> None:
        if self.repetition_penalty <= 0:
            raise ConfigError(
                f"repetition_penalty: expected a value > 0, got {self.repetition_penalty}"
            )
        if self.min_new_tokens is not None and self.min_new_tokens < 0:
            raise ConfigError(
                f"min_new_tokens: expected an int >= 0 or null, got {self.min_new_tokens}"
            )

    def resolved(self, official: dict[str, Any]) -> Generation:
        """These settings with each null one set to its value in `official`."""
        return replace(self, **{k: v for k, v in official.items() if getattr(self, k) is None})

    def stop_ids(self, tokenizer: Any) -> set[int]:
        """Token ids that end an answer besides the model's EOS ids."""
        if not self.stop_on_newline:
            return set()
        return {tokenizer.encode("\n", add_special_tokens=False)[-1]}


def next_token(logits: torch.Tensor, generation: Generation, *seen: Sequence[int],
               stop: Collection[int] = (), n_new: int = 0) -> int:
    """The greedy choice from one position's logits ([vocab]) under `generation`, where
    `seen` are the token ids so far (prompt and generated, in any number of pieces), `stop`
    the ids that end an answer and `n_new` the number of tokens generated so far.

    The penalty is applied as transformers' `RepetitionPenaltyLogitsProcessor` does it, over
    the prompt and the answer so far (an id seen twice is penalised once). A tuple piece (the
    runner's context ids, the same object at every step) is turned into a tensor only once.
    The `stop` ids cannot be chosen while `n_new < generation.min_new_tokens`, as with
    transformers' `MinNewTokensLengthLogitsProcessor`.
    """
    import torch

    penalty = generation.repetition_penalty
    ban = bool(stop) and n_new < (generation.min_new_tokens or 0)
    if penalty != 1.0 or ban:
        logits = logits.to(torch.float32, copy=True)  # generate() scores float32 logits
    if penalty != 1.0:
        ids = torch.cat([
            _distinct_ids(part, logits.device) if isinstance(part, tuple)
            else torch.tensor(list(part), dtype=torch.long, device=logits.device)
            for part in seen
        ])  # fmt: skip
        picked = logits[ids]
        logits[ids] = torch.where(picked < 0, picked * penalty, picked / penalty)
    if ban:
        logits[torch.tensor(sorted(stop), dtype=torch.long, device=logits.device)] = -torch.inf
    return int(logits.argmax())


@functools.lru_cache(maxsize=4)
def _distinct_ids(part: tuple[int, ...], device: torch.device) -> torch.Tensor:
    import torch

    return torch.tensor(part, dtype=torch.long, device=device).unique()


@dataclass
class Sample:
    """One question. The prompt is `context + question`.

    Samples whose `context` strings are equal share one prefilled KV cache: the runner
    prefills the context once and answers each question from a copy of that cache.
    """

    id: str
    context: str
    question: str
    answers: list[str]
    chat: bool = True
    """False where the benchmark's official pipeline does not apply a chat template."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Whatever the metric needs (all_classes, length bucket, difficulty, ...)."""
    answer_prefix: str = ""
    """Text that starts the model's answer, after the chat template's assistant header
    (RULER's " Answer:"); without a chat template it simply follows the question."""
    truncation_separator: str | None = None
    """None: an over-long prompt loses the middle of its tokens (LongBench). A string: the
    context keeps its first tokens and the question stays whole, with this text between them
    (Zero-SCROLLS' `truncation_seperator`)."""


@dataclass
class Benchmark:
    name: str
    subsets: list[str]
    subset: str | None = None
    data_dir: str | None = None
    data_files: str | None = None
    max_samples: int | None = None
    seed: int = 0
    revision: str | None = None
    """The commit, branch or tag of the benchmark's hub dataset repository that its data is
    fetched at (part of the job key: pin a commit for an exact identity). null: `main`."""
    generation: Generation = field(default_factory=Generation)
    """Decoding settings (official values per benchmark; part of the job key)."""

    known_subsets: ClassVar[Collection[str] | None] = None
    """The official subset names; `subsets` may only list these (None: any name)."""

    reads_files: ClassVar[bool] = True
    """False for a benchmark that generates every sample (passkey, niah): `data_dir` and
    `data_files` are then refused, not silently ignored."""

    revision_refused: ClassVar[str | None] = "reads no single hub dataset that a revision pins"
    """Why `revision` is refused (after the benchmark's name); None for a benchmark that reads
    one hub dataset repository and passes `revision` to every fetch from it."""

    def __post_init__(self) -> None:
        if not self.subsets:
            raise ConfigError("subsets: expected a non-empty list of subset names")
        if not self.reads_files:
            for name in ("data_files", "data_dir"):
                if getattr(self, name):
                    raise ConfigError(
                        f"{name}: {self.name} generates its samples and reads no data files; "
                        f"remove benchmark.{name}={getattr(self, name)}"
                    )
        if self.revision is not None:
            self._check_revision()
        if self.known_subsets is not None:
            unknown = [s for s in self.subsets if s not in self.known_subsets]
            if unknown:
                raise ConfigError(
                    f"subsets: unknown {self.name} subset(s) {unknown}; known: {list(self.known_subsets)}"
                )
        if self.subset is not None and self.subset not in self.subsets:
            raise ConfigError(f"subset: {self.subset!r} is not one of {self.subsets}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"max_samples: expected an int >= 1 or null, got {self.max_samples}")
        if self.subset is not None:
            self.generation = self.generation.resolved(self.official_generation())

    def _check_revision(self) -> None:
        remove = f"remove benchmark.revision={self.revision}"
        if not self.revision:
            raise ConfigError("revision: expected a commit, branch or tag of the hub dataset, "
                              "or null")
        if self.revision_refused:
            raise ConfigError(f"revision: {self.name} {self.revision_refused}; {remove}")
        local = next((n for n in ("data_files", "data_dir") if getattr(self, n)), None)
        if local:
            raise ConfigError(
                f"revision: pins the hub dataset, but benchmark.{local}={getattr(self, local)} "
                f"reads local files instead (keyed by their content); {remove}"
            )

    def data_dir_files(self) -> list[Path] | None:
        """The files this cell reads from `data_dir` (those that exist now; the data fingerprint
        covers them). None: the benchmark does not say, and every file directly in `data_dir`
        counts."""
        return None

    @classmethod
    def package_files(cls) -> list[Path]:
        """The files shipped in this package that the benchmark reads (official prompts, word
        lists): their content is in the job key, as data files' is."""
        return []

    def official_generation(self) -> dict[str, Any]:
        """The official values of the `generation` settings that depend on the subset."""
        return {"stop_on_newline": False, "min_new_tokens": 0}

    def load(self, tokenizer: Any) -> list[Sample]:
        raise NotImplementedError(f"{type(self).__name__}.load")

    def max_new_tokens(self) -> int:
        raise NotImplementedError(f"{type(self).__name__}.max_new_tokens")

    def score(self, samples: list[Sample], predictions: list[str]) -> dict[str, float]:
        raise NotImplementedError(f"{type(self).__name__}.score")

    def select(self, samples: list[Sample]) -> list[Sample]:
        """A reproducible subset of `max_samples` samples (seeded), in original order."""
        if self.max_samples is None or self.max_samples >= len(samples):
            return samples
        keep = sorted(random.Random(self.seed).sample(range(len(samples)), self.max_samples))
        return [samples[i] for i in keep]


def unique_ids(samples: list[Sample]) -> list[Sample]:
    """The samples with ids made unique: predictions are stored and matched by id, so two
    samples sharing one (repeated LongBench `_id`s, LooGLE's flattened rows of one document)
    would both be scored with one prediction. A repeated id becomes `<id>#2`, `<id>#3`, ...
    in data order, the same on every run over the same data."""
    taken = {s.id for s in samples}
    seen: set[str] = set()
    last: dict[str, int] = {}
    out = []
    for sample in samples:
        if sample.id not in seen:
            seen.add(sample.id)
            out.append(sample)
            continue
        n = last.get(sample.id, 1) + 1
        while f"{sample.id}#{n}" in taken:
            n += 1
        last[sample.id] = n
        taken.add(f"{sample.id}#{n}")
        out.append(replace(sample, id=f"{sample.id}#{n}"))
    return out
