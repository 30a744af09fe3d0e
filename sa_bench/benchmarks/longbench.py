"""LongBench (v1) and LongBench-E.

Bai et al., "LongBench: A Bilingual, Multitask Benchmark for Long Context Understanding",
ACL 2024 (https://github.com/THUDM/LongBench). Prompts and generation lengths are the
official `config/dataset2prompt.json` / `dataset2maxlen.json` (shipped in `assets/longbench`,
MIT). Scoring follows the official `eval.py`: the prediction is cut to its first line for
trec, triviaqa, samsum and lsht; each sample scores the maximum over its gold answers; the
subset score is round(100 * sum / len, 2). LongBench-E also reports the buckets 0-4k, 4-8k
and 8k+ of the row's `length` field (words / characters) as `scorer_e` does,
round(100 * np.mean, 2), an empty one as None (officially NaN).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

from sa_bench.benchmarks import metrics
from sa_bench.benchmarks.base import Benchmark, Sample
from sa_bench.benchmarks.data import files_found, hub_zip_member, load_rows, split_prompt

ASSETS = Path(__file__).parent / "assets" / "longbench"
HUB_ID = "THUDM/LongBench"

METRIC = {
    "narrativeqa": "qa_f1", "qasper": "qa_f1", "multifieldqa_en": "qa_f1",
    "multifieldqa_zh": "qa_f1_zh", "hotpotqa": "qa_f1", "2wikimqa": "qa_f1", "musique": "qa_f1",
    "dureader": "rouge_zh", "gov_report": "rouge", "qmsum": "rouge", "multi_news": "rouge",
    "vcsum": "rouge_zh", "trec": "classification", "triviaqa": "qa_f1", "samsum": "rouge",
    "lsht": "classification", "passage_retrieval_en": "retrieval", "passage_count": "count",
    "passage_retrieval_zh": "retrieval_zh", "lcc": "code_sim", "repobench-p": "code_sim",
}  # fmt: skip
"""Official `dataset2metric` of LongBench `eval.py`."""

NO_CHAT_TEMPLATE = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
"""Few-shot and code subsets: the official `pred.py` feeds the raw prompt, no chat template."""

FIRST_LINE_ONLY = frozenset({"trec", "triviaqa", "samsum", "lsht"})

E_SUBSETS = (
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec",
    "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
)  # fmt: skip
"""The 13 datasets that LongBench-E covers (files `<name>_e.jsonl`)."""

E_BUCKETS = (("0-4k", 0, 4000), ("4-8k", 4000, 8000), ("8k+", 8000, float("inf")))

ROW_FIELDS = {"context": str, "answers": (list, str)}
"""The row fields a LongBench prompt and score need, with their types."""

HOW_TO_GET = (
    "Get the files from https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip "
    "(unzip; the folder `data/` holds <dataset>.jsonl and <dataset>_e.jsonl) and point "
    "benchmark.data_dir at that folder."
)


@cache
def _config(name: str) -> dict[str, Any]:
    return json.loads((ASSETS / name).read_text(encoding="utf-8"))


def prompts() -> dict[str, str]:
    """Official per-dataset prompt templates (`dataset2prompt.json`)."""
    return _config("dataset2prompt.json")


def max_lengths() -> dict[str, int]:
    """Official per-dataset maximum generation lengths (`dataset2maxlen.json`)."""
    return _config("dataset2maxlen.json")


def score_one(subset: str, prediction: str, answers: list[str], all_classes: Any) -> float:
    """One sample's official score in [0, 1] (LongBench `eval.py` `scorer`)."""
    if subset in FIRST_LINE_ONLY:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = metrics.LONGBENCH_METRICS[METRIC[subset]]
    return metrics.best_over_answers(metric, prediction, answers, all_classes=all_classes or [])


@dataclass
class LongBench(Benchmark):
    """LongBench v1: 21 datasets, one subset each."""

    file_suffix = ""  # class attribute, not a config key

    known_subsets: ClassVar[Collection[str]] = METRIC
    revision_refused: ClassVar[str | None] = None  # benchmark.revision reaches every hub fetch

    def _file_name(self) -> str:
        assert self.subset is not None, "subset is not set"
        return f"{self.subset}{self.file_suffix}"

    def data_dir_files(self) -> list[Path]:
        return files_found(self.data_dir, [self._file_name()])

    @classmethod
    def package_files(cls) -> list[Path]:
        return [ASSETS / "dataset2prompt.json", ASSETS / "dataset2maxlen.json"]

    def _rows(self) -> list[dict[str, Any]]:
        name = self._file_name()
        return load_rows(
            benchmark=self.name,
            subset=self.subset,
            data_dir=self.data_dir,
            data_files=self.data_files,
            names=[name],
            hub=lambda: hub_zip_member(HUB_ID, "data.zip", f"data/{name}.jsonl", self.revision),
            hub_id=f"{HUB_ID} data.zip:data/{name}.jsonl",
            how_to_get=HOW_TO_GET,
            fields=ROW_FIELDS,
        )

    def load(self, tokenizer: Any = None) -> list[Sample]:
        """The official prompt of every row; the tokenizer is not needed (no truncation here)."""
        template = prompts()[self.subset]
        samples = []
        for i, row in enumerate(self._rows()):
            context, question = split_prompt(
                template, context=row["context"], input=row.get("input") or ""
            )
            answers = row["answers"]
            samples.append(
                Sample(
                    id=str(row.get("_id") or i),
                    context=context,
                    question=question,
                    answers=[answers] if isinstance(answers, str) else list(answers),
                    chat=self.subset not in NO_CHAT_TEMPLATE,
                    meta={
                        "all_classes": row.get("all_classes"),
                        "length": row.get("length"),
                        "language": row.get("language"),
                    },
                )
            )
        return self.select(samples)

    def max_new_tokens(self) -> int:
        return int(max_lengths()[self.subset])

    def official_generation(self) -> dict[str, Any]:
        """samsum as `pred.py` decodes it (also for LongBench-E): "\\n" ends the answer too,
        and the first token is never a stop token (`min_length=context_length+1`)."""
        if self.subset == "samsum":
            return {"stop_on_newline": True, "min_new_tokens": 1}
        return super().official_generation()

    def _per_sample(self, samples: list[Sample], predictions: list[str]) -> list[float]:
        if len(samples) != len(predictions):
            raise ValueError(f"{len(samples)} samples but {len(predictions)} predictions")
        return [
            score_one(self.subset, p, s.answers, s.meta.get("all_classes"))
            for s, p in zip(samples, predictions, strict=True)
        ]

    def score(self, samples: list[Sample], predictions: list[str]) -> dict[str, Any]:
        values = self._per_sample(samples, predictions)
        return {"score": metrics.mean_percent(values), "n": len(values), "metric": METRIC[self.subset]}


@dataclass
class LongBenchE(LongBench):
    """LongBench-E: 13 datasets with a uniform length distribution, scored per length bucket."""

    key_version = 2  # results changed meaning: buckets rounded as the official scorer_e

    file_suffix = "_e"

    known_subsets: ClassVar[Collection[str]] = E_SUBSETS

    def score(self, samples: list[Sample], predictions: list[str]) -> dict[str, Any]:
        """Overall score plus the official `scorer_e` buckets of the row `length`."""
        values = self._per_sample(samples, predictions)
        result: dict[str, Any] = {
            "score": metrics.mean_percent(values),
            "n": len(values),
            "metric": METRIC[self.subset],
        }
        for key, low, high in E_BUCKETS:
            bucket = [v for v, s in zip(values, samples, strict=True) if low <= (s.meta.get("length") or 0) < high]
            result[key] = metrics.numpy_mean_percent(bucket)
            result[f"n_{key}"] = len(bucket)
        return result
