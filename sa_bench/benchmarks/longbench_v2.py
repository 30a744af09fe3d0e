"""LongBench v2: 503 multiple-choice questions over contexts of 8k-2M words.

Bai et al., "LongBench v2: Towards Deeper Understanding and Reasoning on Realistic Long-context
Multitasks", 2024 (https://github.com/THUDM/LongBench, hub THUDM/LongBench-v2). Prompt: the
official zero-shot template (`prompts/0shot.txt`, no chain of thought), 128 generated tokens
(`pred.py`); the answer letter is read with the official `extract_answer`. Reported: accuracy
overall, by difficulty (easy, hard), by length (short, medium, long) and by domain, rounded
to one decimal as the official `result.py` prints them; an empty group is None.

Empty outputs: the official `pred.py` drops a question whose output is '' from its results
file (for an API that is a failed call, retried on the next run), so `result.py` leaves it out
of the denominator. Here decoding is local and deterministic: an empty answer is the model's
answer and would be empty again, so `score` counts it as wrong (every question stays in the
denominator). The metrics report `n_empty` and `score_without_empty`, the accuracy over the
non-empty outputs that the official scripts would print, and beside every breakdown (`easy`,
`long`, `domain_...`, empties counted as wrong) its official figure over the non-empty outputs
(`easy_without_empty`, ..., with `n_..._without_empty`).

Decoding: greedy here, while the official `pred.py` samples at temperature 0.1. Greedy keeps a
cell deterministic and its methods comparable with each other; the metrics say so
(`decoding`), since a published number was sampled.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from sa_bench.benchmarks import metrics
from sa_bench.benchmarks.base import Benchmark, Sample
from sa_bench.benchmarks.data import files_found, hub_dataset, load_rows

HUB_ID = "THUDM/LongBench-v2"
TEMPLATE_HEAD = "Please read the following text and answer the question below.\n\n<text>\n"
TEMPLATE_TAIL = (
    "\n</text>\n\nWhat is the correct answer to this question: {question}\nChoices:\n"
    "(A) {A}\n(B) {B}\n(C) {C}\n(D) {D}\n\n"
    'Format your response as follows: "The correct answer is (insert answer here)".'
)
HOW_TO_GET = (
    "Download data.json from https://huggingface.co/datasets/THUDM/LongBench-v2 and set "
    "benchmark.data_dir to its folder (or benchmark.data_files to the file)."
)
DIFFICULTIES = ("easy", "hard")
LENGTHS = ("short", "medium", "long")
DECODING = "greedy (official: temperature 0.1)"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


@dataclass
class LongBenchV2(Benchmark):
    """LongBench v2, zero-shot without chain of thought; one subset `all`."""

    key_version = 2  # results changed meaning: accuracy rounded as the official result.py

    file_names = ("data", "longbench_v2")  # class attribute, not a config key
    revision_refused: ClassVar[str | None] = None  # benchmark.revision reaches every hub fetch

    def data_dir_files(self) -> list[Path]:
        return files_found(self.data_dir, self.file_names)

    def load(self, tokenizer: Any = None) -> list[Sample]:
        rows = load_rows(
            benchmark=self.name, subset=self.subset, data_dir=self.data_dir,
            data_files=self.data_files, names=self.file_names,
            hub=lambda: hub_dataset(HUB_ID, None, "train", self.revision), hub_id=HUB_ID,
            how_to_get=HOW_TO_GET,
            fields={k: str for k in ("context", "question", "answer", "choice_A", "choice_B",
                                     "choice_C", "choice_D")},
        )  # fmt: skip
        samples = []
        for i, row in enumerate(rows):
            question = TEMPLATE_TAIL.format(
                question=row["question"].strip(),
                **{c: row[f"choice_{c}"].strip() for c in "ABCD"},
            )
            samples.append(
                Sample(
                    id=str(row.get("_id") or i),
                    context=TEMPLATE_HEAD + row["context"].strip(),
                    question=question,
                    answers=[row["answer"]],
                    meta={k: row.get(k) for k in ("difficulty", "length", "domain")},
                )
            )
        return self.select(samples)

    def max_new_tokens(self) -> int:
        return 128

    def score(self, samples: list[Sample], predictions: list[str]) -> dict[str, Any]:
        correct = [
            float(metrics.extract_choice(p) == s.answers[0])
            for s, p in zip(samples, predictions, strict=True)
        ]
        nonempty = [c for c, p in zip(correct, predictions, strict=True) if p != ""]
        result: dict[str, Any] = {
            "score": metrics.mean_percent(correct, 1),
            "n": len(correct),
            "empty_outputs": "counted as wrong",
            "n_empty": len(correct) - len(nonempty),
            "score_without_empty": metrics.mean_percent(nonempty, 1),
            "decoding": DECODING,
        }
        groups = [("difficulty", d) for d in DIFFICULTIES] + [("length", n) for n in LENGTHS]
        groups += sorted({("domain", s.meta.get("domain")) for s in samples if s.meta.get("domain")})
        for key, value in groups:
            members = [(c, p) for c, p, s in zip(correct, predictions, samples, strict=True)
                       if s.meta.get(key) == value]
            name = value if key != "domain" else f"domain_{_slug(value)}"
            result[name] = metrics.mean_percent([c for c, _ in members], 1)
            result[f"n_{name}"] = len(members)
            official = [c for c, p in members if p != ""]  # result.py over pred.py's kept outputs
            result[f"{name}_without_empty"] = metrics.mean_percent(official, 1)
            result[f"n_{name}_without_empty"] = len(official)
        return result
