"""Zero-SCROLLS: ten zero-shot long-text tasks, scored on the validation split.

Shaham et al., "ZeroSCROLLS: A Zero-Shot Benchmark for Long Text Understanding", Findings of
EMNLP 2023 (https://github.com/tau-nlp/zero_scrolls, data and metrics: hub dataset
tau/zero_scrolls). The test split's answers are private (scored only by the leaderboard), so
this benchmark reads and scores the **validation** split (about 20 examples per task, meant by
the authors for inspection): its numbers are not leaderboard numbers.

Prompt: the row's `input`, which already holds the official prompt (instruction, document,
query, answer header). The document part, `input[:query_start_index]`, is the shared context;
the rest is the question. An over-long prompt is cut as the official `run_hf_model.py` cuts it:
the document keeps its first tokens, then the row's `truncation_seperator` and the whole query
follow. Generation lengths: the official per-task budgets (`experiments/api/api.py`).
Rows repeating an `id` are one example with several references (the official
`drop_duplicates_in_input`); a prediction scores its best reference.

Metrics (0-100, rounded to 4 digits as the official metric does): the geometric mean of the
mean ROUGE-1, -2 and -L F-measures for gov_report, summ_screen_fd, qmsum and squality; token F1
for qasper, narrative_qa and musique; accuracy of the first standalone letter A-D for quality;
exponential similarity of the percentage for space_digest; concordance index of the order for
book_sum_sort (see `metrics.scrolls_*`).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from sa_bench.benchmarks import metrics
from sa_bench.benchmarks.base import Benchmark, Sample
from sa_bench.benchmarks.data import files_found, hub_zip_member, load_rows

HUB_ID = "tau/zero_scrolls"
SPLIT = "validation"

METRIC = {
    "gov_report": "rouge", "summ_screen_fd": "rouge", "qmsum": "rouge", "squality": "rouge",
    "qasper": "f1", "narrative_qa": "f1", "musique": "f1", "quality": "accuracy",
    "space_digest": "exp_similarity", "book_sum_sort": "concordance_index",
}  # fmt: skip

MAX_NEW_TOKENS = {
    "gov_report": 1024, "summ_screen_fd": 512, "qmsum": 512, "qasper": 128, "narrative_qa": 64,
    "quality": 10, "musique": 32, "squality": 512, "space_digest": 36, "book_sum_sort": 256,
}  # fmt: skip
"""Official `dataset_to_leave_tokens_for_generations` (experiments/api/api.py)."""

PER_SAMPLE = {
    "f1": metrics.scrolls_f1,
    "accuracy": metrics.scrolls_accuracy,
    "exp_similarity": metrics.scrolls_exp_similarity,
    "concordance_index": metrics.scrolls_concordance,
}

ROW_FIELDS = {"id": str, "input": str, "output": str, "query_start_index": int,
              "truncation_seperator": str}  # fmt: skip

HOW_TO_GET = (
    "Get https://huggingface.co/datasets/tau/zero_scrolls/resolve/main/<task>.zip, unzip it "
    "(the folder <task>/ holds validation.jsonl) and point benchmark.data_dir at the folder "
    "holding <task>/ (or benchmark.data_files at the validation.jsonl). Only the validation "
    "split has answers."
)


def score_outputs(subset: str, predictions: list[str], references: list[list[str]]) -> dict[str, Any]:
    """The official figures of one task: {"score": ..., and the ROUGE types for summaries}."""
    if METRIC[subset] == "rouge":
        best = [metrics.scrolls_best_rouge(p, refs) for p, refs in zip(predictions, references, strict=True)]
        figures = metrics.scrolls_rouge_aggregate(best)
        return {"score": figures["geometric_mean"],
                **{f"rouge/{k}": v for k, v in figures.items()}}  # fmt: skip
    metric = PER_SAMPLE[METRIC[subset]]
    values = [max(metric(p, r) for r in refs) for p, refs in zip(predictions, references, strict=True)]
    return {"score": round(100 * sum(values) / len(values), 4)}


@dataclass
class ZeroScrolls(Benchmark):
    """Zero-SCROLLS, validation split; one subset per task."""

    known_subsets: ClassVar[Collection[str]] = METRIC
    revision_refused: ClassVar[str | None] = None  # benchmark.revision reaches every hub fetch

    def _names(self) -> list[str]:
        return [f"{self.subset}/{SPLIT}", f"{self.subset}_{SPLIT}", str(self.subset)]

    def data_dir_files(self) -> list[Path]:
        return files_found(self.data_dir, self._names())

    def load(self, tokenizer: Any = None) -> list[Sample]:
        """One sample per example id, its references gathered from the repeated rows."""
        rows = load_rows(
            benchmark=self.name, subset=self.subset, data_dir=self.data_dir,
            data_files=self.data_files, names=self._names(),
            hub=lambda: hub_zip_member(HUB_ID, f"{self.subset}.zip", f"{SPLIT}.jsonl", self.revision),
            hub_id=f"{HUB_ID} {self.subset}.zip:{SPLIT}.jsonl",
            how_to_get=HOW_TO_GET, fields=ROW_FIELDS,
        )  # fmt: skip
        samples: dict[str, Sample] = {}
        for row in rows:
            if row["id"] in samples:
                samples[row["id"]].answers.append(row["output"])
                continue
            cut = row["query_start_index"]
            samples[row["id"]] = Sample(
                id=row["id"],
                context=row["input"][:cut],
                question=row["input"][cut:],
                answers=[row["output"]],
                truncation_separator=row["truncation_seperator"],
            )
        return self.select(list(samples.values()))

    def max_new_tokens(self) -> int:
        return MAX_NEW_TOKENS[self.subset]

    def score(self, samples: list[Sample], predictions: list[str]) -> dict[str, Any]:
        result = score_outputs(self.subset, predictions, [s.answers for s in samples])
        return {**result, "n": len(samples), "metric": METRIC[self.subset], "split": SPLIT}
