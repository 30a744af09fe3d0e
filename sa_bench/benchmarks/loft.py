"""LOFT RAG: answer a question from a whole corpus given in the context (corpus-in-context).

Lee et al., "Can Long-Context Language Models Subsume Retrieval, RAG, SQL, and More?", 2024
(https://github.com/google-deepmind/loft). Subsets `<dataset>_<length>`: nq, hotpotqa, musique
(one answer) and qampari, quest (a set of answers), at 32k and 128k tokens of corpus.

Prompt: LOFT's `rag_<dataset>_<length>_<split>:few_shot_with_cot`, the text its
`dump_prompts.py` writes: the corpus instruction, the answer-format instruction, every passage
of `corpus.jsonl` as `ID: i | TITLE: t | CONTENT: p | END ID: i` (i its position), the few-shot
examples of `few_shot_queries.jsonl` (query, the TITLE and ID of its gold passages, its final
answer), then the query. Texts are stripped and "childhood abuse" removed from passages and
titles, as LOFT's loader does. Everything up to the query is the context shared by all the
queries of a subset.

Scoring, as LOFT's `run_evaluation.py`: the answer list is read from the first output line
holding `[...]` (`Final Answer: ['a', 'b']`, `utils.extract_prediction`) and SQuAD-normalised.
One-answer datasets (`rag`): the first predicted answer against the gold ones: `em`,
`subspan_em` (a gold answer inside it) and token `f1`, each the best over gold answers.
Answer-set datasets (`multi_value_rag`): `em` (the two sets equal), `subspan_em` (every gold
answer matched to a distinct predicted one that contains it or that it contains) and `coverage`
(share of gold answers predicted), coverage averaged, as officially, over the questions with a
non-empty prediction. The score is `subspan_em`, LOFT's primary metric for every RAG dataset;
all are means x 100 (rounded to 4 digits here; LOFT prints them unrounded).

Generation: LOFT sets no length (Gemini's default); `max_new_tokens` is 256 here, room for the
titles and IDs the prompt asks for and the final answer. LOFT is distributed as files, not on
the Hugging Face hub: see HOW_TO_GET.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from sa_bench.benchmarks import metrics
from sa_bench.benchmarks.base import Benchmark, Sample
from sa_bench.benchmarks.data import files_found, load_rows
from sa_bench.config import ConfigError

DATASETS = ("nq", "hotpotqa", "musique", "qampari", "quest")
MULTI_VALUE = frozenset({"qampari", "quest"})
LENGTHS = ("32k", "128k")
SUBSETS = tuple(f"{d}_{n}" for d in DATASETS for n in LENGTHS)
SPLITS = ("dev", "test")

CORPUS_INSTRUCTION = (
    "You will be given a list of documents. You need to read carefully and understand all of "
    "them. Then you will be given a query, and your goal is to answer the query based on the "
    "documents you have read."
)
FORMATTING_INSTRUCTION = (
    "\nYour final answer should be in a list, in the following format:\n"
    "Final Answer: ['answer1', 'answer2', ...]\n"
    "If there is only one answer, it should be in the format:\n"
    "Final Answer: ['answer']\n"
)
PASSAGE = "ID: {pid} | TITLE: {title} | CONTENT: {passage} | END ID: {pid}"
QUERY = (
    "Based on the documents above, can you answer the following query? Print out the TITLE and "
    "ID of the documents you use to answer. Then format the answers into a list.\nquery: {query}"
)
EXAMPLE_HEADER = "====== Example {example_id} ======\n"
TEST_HEADER = "====== Now let's start! ======\n"
EXAMPLE_PASSAGE = "TITLE: {title} | ID: {pid}"
FINAL_ANSWER = "Final Answer: {final_answer}"
BLACKLIST = ("childhood abuse",)
"""Removed from corpus titles and passages by LOFT's `load_data_from_file`."""

HOW_TO_GET = (
    "LOFT is distributed as zip files, not on the Hugging Face hub: get "
    "https://storage.googleapis.com/loft-bench/rag/<dataset>.zip (or run LOFT's download.sh), "
    "unzip it so that <data_dir>/rag/<dataset>/<length>/ holds corpus.jsonl, "
    "few_shot_queries.jsonl and <split>_queries.jsonl, and set benchmark.data_dir to that folder."
)
CORPUS_FIELDS = {"pid": str, "title_text": str, "passage_text": str}
QUERY_FIELDS = {"qid": str, "query_text": str, "answers": list, "metadata": dict}


def _clean(text: str) -> str:
    text = text.strip()
    for word in BLACKLIST:
        text = text.replace(word, "")
    return text


def build_prompt(corpus: list[dict[str, Any]], few_shot: list[dict[str, Any]]) -> str:
    """The context LOFT puts before every query: instructions, corpus, few-shot examples."""
    index = {row["pid"]: i for i, row in enumerate(corpus)}
    by_pid = {row["pid"]: row for row in corpus}
    titles = {pid: _clean(row["title_text"]) or "None" for pid, row in by_pid.items()}
    chunks = [CORPUS_INSTRUCTION, FORMATTING_INSTRUCTION]
    chunks += [PASSAGE.format(pid=index[row["pid"]], title=titles[row["pid"]],
                              passage=_clean(row["passage_text"])) for row in corpus]  # fmt: skip
    for number, row in enumerate(few_shot, 1):
        chunks.append(EXAMPLE_HEADER.format(example_id=number) + QUERY.format(query=row["query_text"].strip()))
        chunks += [EXAMPLE_PASSAGE.format(title=titles[pid], pid=index[pid])
                   for pid, _ in row["metadata"]["qrels"]]  # fmt: skip
        chunks.append(FINAL_ANSWER.format(final_answer=row["answers"]))
    return "".join(f"{chunk}\n" for chunk in chunks)


def query_text(query: str) -> str:
    """The test query as LOFT appends it (the dumped prompt ends stripped)."""
    return TEST_HEADER + QUERY.format(query=query.strip())


def extract_answers(output: str) -> list[Any]:
    """LOFT `utils.extract_prediction`: '*' and '`' removed, the first line holding '[' and ']'
    read from its first '[' to its last ']' as a Python literal (a quote between two letters or
    digits escaped first); [] when no line has one or the literal does not parse."""
    for line in output.replace("*", "").replace("`", "").strip().split("\n"):
        if "[" in line and "]" in line:
            text = line[line.find("[") : line.rfind("]") + 1].strip()
            text = re.sub(r"([a-zA-Z0-9])'([a-zA-Z0-9])", r"\1\\'\2", text)
            try:
                return ast.literal_eval(text)
            except Exception:  # noqa: BLE001 - the official code catches everything here
                return []
    return []


def score_output(dataset: str, output: str, answers: list[str]) -> dict[str, float]:
    """One question's LOFT metrics (values in [0, 1]); `coverage` only where LOFT records it."""
    predicted = [metrics.loft_normalize(str(a)) for a in extract_answers(output)]
    gold = [metrics.loft_normalize(a) for a in answers]
    if not predicted:  # LOFT records f1 here for answer-set datasets too (only here)
        return {"em": 0.0, "subspan_em": 0.0, "f1": 0.0}
    if dataset in MULTI_VALUE:
        return {"em": float(set(gold) == set(predicted)),
                "coverage": len(set(predicted) & set(gold)) / len(gold),
                "subspan_em": metrics.loft_multi_subspan_em(gold, predicted)}  # fmt: skip
    first = predicted[0]
    return {"em": max(float(g == first) for g in gold),
            "subspan_em": max(float(g in first) for g in gold),
            "f1": max(metrics.loft_f1(g, first) for g in gold)}  # fmt: skip


@dataclass
class Loft(Benchmark):
    """LOFT RAG, one subset per dataset and corpus length."""

    split: str = "test"
    """Which query file is asked and scored: `test` (the paper's numbers) or `dev`."""

    known_subsets: ClassVar[Collection[str]] = SUBSETS
    revision_refused: ClassVar[str | None] = "reads local files only (LOFT is not on the hub)"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.split not in SPLITS:
            raise ConfigError(f"split: expected one of {list(SPLITS)}, got {self.split!r}")
        if self.data_files:
            raise ConfigError(
                "data_files: LOFT reads three files per subset (corpus, few-shot and query "
                "file); set benchmark.data_dir instead"
            )

    def _parts(self) -> tuple[str, str]:
        assert self.subset is not None, "subset is not set"
        dataset, length = self.subset.rsplit("_", 1)
        return dataset, length

    def _names(self, file: str) -> list[str]:
        dataset, length = self._parts()
        return [f"rag/{dataset}/{length}/{file}", f"{dataset}/{length}/{file}"]

    def _files(self) -> tuple[str, ...]:
        return ("corpus", "few_shot_queries", f"{self.split}_queries")

    def data_dir_files(self) -> list[Path]:
        return [p for file in self._files() for p in files_found(self.data_dir, self._names(file))]

    def _rows(self, file: str, fields: dict[str, Any]) -> list[dict[str, Any]]:
        return load_rows(
            benchmark=self.name, subset=self.subset, data_dir=self.data_dir, data_files=None,
            names=self._names(file), hub=None, hub_id="", how_to_get=HOW_TO_GET, fields=fields,
        )  # fmt: skip

    def load(self, tokenizer: Any = None) -> list[Sample]:
        corpus_file, few_shot_file, query_file = self._files()
        corpus = self._rows(corpus_file, CORPUS_FIELDS)
        context = build_prompt(corpus, self._rows(few_shot_file, QUERY_FIELDS))
        samples = [
            Sample(id=row["qid"], context=context, question=query_text(row["query_text"]),
                   answers=[str(a) for a in row["answers"]])
            for row in self._rows(query_file, QUERY_FIELDS)
        ]  # fmt: skip
        return self.select(samples)

    def max_new_tokens(self) -> int:
        return 256

    def score(self, samples: list[Sample], predictions: list[str]) -> dict[str, Any]:
        dataset, _ = self._parts()
        per_question = [score_output(dataset, p, s.answers)
                        for s, p in zip(samples, predictions, strict=True)]  # fmt: skip
        keys = ("subspan_em", "em", "coverage") if dataset in MULTI_VALUE else ("subspan_em", "em", "f1")
        result: dict[str, Any] = {}
        for key in keys:  # LOFT's mean of each metric over the questions that record it
            values = [q[key] for q in per_question if key in q]
            result[key] = round(100 * sum(values) / len(values), 4) if values else None
        return {"score": result["subspan_em"], **result, "n": len(per_question),
                "n_no_answer_list": sum(not extract_answers(p) for p in predictions),
                "split": self.split,
                "task_type": "multi_value_rag" if dataset in MULTI_VALUE else "rag"}  # fmt: skip
