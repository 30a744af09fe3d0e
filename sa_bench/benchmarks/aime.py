"""AIME 2024 / 2025: 30 competition problems each, integer answers 0-999.

Score: 100 x the fraction of problems whose output math-verify (Hugging Face's answer
extraction and comparison, as used by open-r1 / lighteval) finds equal to the answer: boxed in
any form it normalises, or a final answer without a box. Prompt: the problem followed by
"Please reason step by step, and put your final answer within \\boxed{}.". Hub copies:
HuggingFaceH4/aime_2024 (train) and math-ai/aime25 (test); rows have `problem` (or
`question`) and `answer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from sa_bench.benchmarks import metrics
from sa_bench.benchmarks.base import Benchmark, Sample
from sa_bench.benchmarks.data import files_found, hub_dataset, load_rows
from sa_bench.config import ConfigError

INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."
HUBS = {"aime24": ("HuggingFaceH4/aime_2024", "train"), "aime25": ("math-ai/aime25", "test")}


@dataclass
class Aime(Benchmark):
    """AIME problems scored with math-verify; the YAML `name` picks the year."""

    key_version = 3  # results changed meaning: a box math-verify cannot read (70\%) is re-read as LaTeX

    revision_refused: ClassVar[str | None] = None  # benchmark.revision reaches every hub fetch
    generation_tokens: int = 32768
    """Maximum generated tokens (reasoning models need long budgets)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.name not in HUBS:
            raise ConfigError(f"name: expected one of {sorted(HUBS)}, got {self.name!r}")
        if self.generation_tokens < 1:
            raise ConfigError(f"generation_tokens: expected an int >= 1, got {self.generation_tokens}")

    def _file_names(self) -> list[str]:
        return [self.name, f"aime_{'2024' if self.name == 'aime24' else '2025'}"]

    def data_dir_files(self) -> list[Path]:
        return files_found(self.data_dir, self._file_names())

    def load(self, tokenizer: Any = None) -> list[Sample]:
        repo, split = HUBS[self.name]
        rows = load_rows(
            benchmark=self.name, subset=self.subset, data_dir=self.data_dir,
            data_files=self.data_files, names=self._file_names(),
            hub=lambda: hub_dataset(repo, None, split, self.revision), hub_id=repo,
            fields={("problem", "question"): str, "answer": (str, int, float)},
            how_to_get=f"Download the hub dataset {repo} (jsonl/parquet with problem, answer) "
            f"and set benchmark.data_dir or benchmark.data_files.",
        )  # fmt: skip
        samples = [
            Sample(
                id=str(row.get("id", i)),
                context=str(row.get("problem") or row.get("question")),
                question=INSTRUCTION,
                answers=[str(row["answer"]).strip()],
            )
            for i, row in enumerate(rows)
        ]
        return self.select(samples)

    def max_new_tokens(self) -> int:
        return self.generation_tokens

    def score(self, samples: list[Sample], predictions: list[str]) -> dict[str, Any]:
        values = [
            metrics.math_verify_match(p, s.answers[0])
            for s, p in zip(samples, predictions, strict=True)
        ]
        return {"score": metrics.mean_percent(values), "n": len(values)}
