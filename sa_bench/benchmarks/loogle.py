"""LooGLE: long-document QA, cloze and summarization.

Li et al., "LooGLE: Can Long-Context Language Models Understand Long Contexts?", ACL 2024
(https://github.com/bigai-nlco/LooGLE, hub bigainlco/LooGLE). Prompts and generation lengths are
the official `config/task2prompt.json` and `task2maxlen.json`; as in the official open-model
script (`Prediction/pred_opensource_models.py`) the raw prompt is used, without chat template,
and decoding is greedy with `repetition_penalty=2.0` (the default of
`benchmark.generation.repetition_penalty` here). Every question of a document shares that
document's prefilled context.

Scores (`Evaluation/automatic_metrics.py`): shortdep_cloze: exact match of the masked entities
(micro-averaged over masks; partial match reported too), the prediction parsed as a dict
literal as it is, with `ast.literal_eval` (never evaluated as code, unlike the official `eval`,
but failing on the same surrounding whitespace);
QA and summarization: ROUGE-L recall (`get_rouge_score`'s default `metric="r"`) as `score`,
with ROUGE-1/2 recall and BLEU-1/4 reported. An empty prediction is scored as "None", as
officially. METEOR and BERTScore are not computed (they need downloaded resources).
"""

from __future__ import annotations

import ast
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from sa_bench.benchmarks import metrics
from sa_bench.benchmarks.base import Benchmark, Generation, Sample
from sa_bench.benchmarks.data import files_found, hub_dataset, load_rows, split_prompt

HUB_ID = "bigainlco/LooGLE"
PROMPTS = {
    "shortdep_qa": "Please answer the question based on the long texts below. \n{input}\n"
    "Question: {Q}\nAnswer: ",
    "longdep_qa": "Please answer the question based on the long texts below. \n{input}\n"
    "Question: {Q}\nAnswer: ",
    "longdep_summarization": "Please generate a summary of the below paper. \n{input}\n Summarization: ",
    "shortdep_cloze": "Please fill in the clozes based on the given long texts below. Each of the "
    "placeholder '<mask-n>' in the question could be an entity of Person, Location or "
    "Organiocation. The same masks represent the same entity. Output a json format answer, for "
    "example: {{'<mask-0>': 'Bob', '<mask-1>': 'Gorrosion Magazine','<mask-2>': 'Bethel Horizon'}}"
    "\n{input}\n Question: {Q} What are the masked entities? \nAnswer:",
}
MAX_NEW_TOKENS = {"shortdep_qa": 300, "longdep_qa": 500, "longdep_summarization": 500,
                  "shortdep_cloze": 50}  # fmt: skip
HOW_TO_GET = (
    "Download <task>.jsonl (LooGLE-testdata/ of https://github.com/bigai-nlco/LooGLE, or the hub "
    "dataset bigainlco/LooGLE) and set benchmark.data_dir to their folder."
)


def parse_qa_pairs(value: Any) -> list[dict[str, Any]]:
    """The `qa_pairs` field: a list, or its Python literal string ("none" for summaries).
    Parsed with `ast.literal_eval`, never `eval`."""
    if value in (None, "none", ""):
        return []
    if isinstance(value, list):
        return value
    return list(ast.literal_eval(value))


@dataclass
class LooGLE(Benchmark):
    """LooGLE's four tasks; one sample per question, sharing the document prefix."""

    key_version = 2  # results changed meaning: repetition penalty 2.0, cloze parsed as the official eval

    generation: Generation = field(default_factory=lambda: Generation(repetition_penalty=2.0))

    known_subsets: ClassVar[Collection[str]] = PROMPTS
    revision_refused: ClassVar[str | None] = None  # benchmark.revision reaches every hub fetch

    def data_dir_files(self) -> list[Path]:
        return files_found(self.data_dir, [self.subset])

    def load(self, tokenizer: Any = None) -> list[Sample]:
        task = self.subset
        rows = load_rows(
            benchmark=self.name, subset=task, data_dir=self.data_dir, data_files=self.data_files,
            names=[task], hub=lambda: hub_dataset(HUB_ID, task, "test", self.revision),
            hub_id=f"{HUB_ID}/{task}",
            how_to_get=HOW_TO_GET,
            fields={("input", "context"): str, ("qa_pairs", "question", "output"): (str, list)},
        )  # fmt: skip
        samples = []
        for i, row in enumerate(rows):
            doc_id = str(row.get("doc_id") or row.get("id") or i)
            if "question" in row:  # flattened rows (one question each)
                pairs = [{"Q": row["question"], "A": row["answer"]}]
                document = row["context"]
            else:
                pairs = parse_qa_pairs(row.get("qa_pairs"))
                document = row["input"]
            if task == "longdep_summarization":
                pairs = [{"Q": "", "A": row.get("output") or (pairs[0]["A"] if pairs else "")}]
            for j, pair in enumerate(pairs):
                context, question = split_prompt(
                    PROMPTS[task], context_field="input", input=document, Q=pair["Q"]
                )
                answer = pair["A"]
                masks = metrics.parse_mapping(answer) if task == "shortdep_cloze" else None
                samples.append(
                    Sample(
                        id=f"{doc_id}-{j}",
                        context=context,
                        question=question,
                        answers=[str(answer)],
                        chat=False,
                        meta={"masks": masks} if masks is not None else {},
                    )
                )
        return self.select(samples)

    def max_new_tokens(self) -> int:
        return MAX_NEW_TOKENS[self.subset]

    def score(self, samples: list[Sample], predictions: list[str]) -> dict[str, Any]:
        if len(samples) != len(predictions):
            raise ValueError(f"{len(samples)} samples but {len(predictions)} predictions")
        n = len(samples)
        if self.subset == "shortdep_cloze":
            exact = partial = total = 0
            for s, p in zip(samples, predictions, strict=True):
                e, pa, t = metrics.cloze_match(p, s.meta.get("masks") or {})
                exact, partial, total = exact + e, partial + pa, total + t
            return {
                # official `get_match_score`: round(matches / masks, 4)
                "score": round(100 * round(exact / total, 4), 2) if total else None,
                "partial_match": round(100 * round(partial / total, 4), 2) if total else None,
                "n": n,
                "masks": total,
            }
        r1, r2, rl, b1, b4 = [], [], [], [], []
        for s, p in zip(samples, predictions, strict=True):
            hyp = p if p != "" else "None"
            ref = s.answers[0]
            a, b, c = metrics.rouge_all(hyp, ref)
            r1.append(a), r2.append(b), rl.append(c)
            b1.append(metrics.sentence_bleu_n(hyp, ref, 1))
            b4.append(metrics.sentence_bleu_n(hyp, ref, 4))
        return {
            "score": metrics.numpy_mean_percent(rl),  # official `get_semantic_matching`: np.mean
            "rouge1": metrics.numpy_mean_percent(r1),
            "rouge2": metrics.numpy_mean_percent(r2),
            "bleu1": metrics.numpy_mean_percent(b1),
            "bleu4": metrics.numpy_mean_percent(b4),
            "n": n,
        }
