"""InfiniteBench (∞Bench): twelve tasks beyond 100k tokens.

Zhang et al., "∞Bench: Extending Long Context Evaluation Beyond 100K Tokens", ACL 2024
(https://github.com/OpenBMB/InfiniteBench, hub xinrongzhang2022/InfiniteBench). Prompts are the
official templates for open models (`src/prompt.py`, the `yarn_mistral_templates` family, which
ends each prompt with an answer cue), generation lengths are `DATA_NAME_TO_MAX_NEW_TOKENS`
(`src/eval_utils.py`) and each task uses its official scorer (`src/compute_scores.py`).
Rows: `id`, `context`, `input`, `answer`, `options` (list). `answer` is a list in every
official file except kv_retrieval.jsonl, where it is the value string itself (the authors'
result files store it so); math_calc's is a list holding the list of expected values.

No chat template by default: the official scripts for open models (`src/eval_yarn_mistral.py`,
`eval_yi_200k.py`, `eval_chatglm.py`) tokenize the raw prompt (`create_prompt`) and generate
from it; `benchmark.chat_template=true` applies the model's template instead.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from sa_bench.benchmarks import metrics
from sa_bench.benchmarks.base import Benchmark, Sample
from sa_bench.benchmarks.data import files_found, hub_file, load_rows, read_rows, split_prompt

HUB_ID = "xinrongzhang2022/InfiniteBench"
TEMPLATES = {
    "passkey": "There is an important info hidden inside a lot of irrelevant text. Find it and "
    "memorize it. I will quiz you about the important information.\n\n{context}\n\n"
    "{input}\n\nThe pass key is",
    "number_string": "There is an important info hidden inside a lot of irrelevant text. Find it. "
    "I will quiz you about the important information there.\n\n{context}\n\n{input}\n\n"
    "The sequence of digits is",
    "kv_retrieval": "Extract the value corresponding to the specified key in the JSON object "
    "below.\n\n{context}\n\n{input}",
    "longbook_choice_eng": "Read the book and answer the question.\n\n{context}\n\nQuestion: "
    "{question}\nA. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}\n\n"
    "The letter of the correct answer is",
    "longbook_qa_eng": "Read the book and answer the question. Be very concise in your answer."
    "\n\n{context}\n\nQuestion: {question}\nAnswer:",
    "longbook_qa_chn": "阅读以下书籍然后回答问题。\n\n{context}\n\n问题：{question}\n答案：",
    "longbook_sum_eng": "Summarize the book below.\n\n{context}\n\nSummary:",
    "math_find": "{prefix}\n\n{context}\n\n{input}",
    "math_calc": "Let us calculate the intermediate values of an expression.\n\nExpression: 1 + 3 + 4\n"
    "Values: [1, 4, 8]\n\nExpression: 8 - 3 + 2 - 4\nValues: [8, 5, 7, 3]\n\nExpression: {context}\n"
    "Values:",
    "code_run": "There is a function called {func} in the following Python code.\n\n{context}\n\n"
    "Please compute the exact value of {func_call}. The value of {func_call} is",
    "code_debug": "Following is a Python code where exactly one of the functions/methods has a "
    "deliberate error that makes it crash.\n\n{context}\n\nOptions:\nA. {OPTION_A}\nB. "
    "{OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}\n\nThe correct option is:",
    "longdialogue_qa_eng": 'Below is a dialogue script where one random occurrence of a character '
    'name is replaced with "$$MASK$$", and you should try to guess who that character is.\n\n'
    "{context}\n\nThe name that has been replaced with $$MASK$$ is likely",
}
MAX_NEW_TOKENS = {
    "passkey": 6, "number_string": 12, "kv_retrieval": 50, "longbook_choice_eng": 40,
    "longbook_qa_eng": 40, "longdialogue_qa_eng": 40, "math_find": 3, "code_run": 5,
    "code_debug": 5, "longbook_sum_eng": 1200, "longbook_qa_chn": 40, "math_calc": 30000,
}  # fmt: skip
HOW_TO_GET = (
    "Download <task>.jsonl from https://huggingface.co/datasets/xinrongzhang2022/InfiniteBench "
    "and set benchmark.data_dir to their folder."
)


def _number(value: Any) -> int | float:
    if isinstance(value, (int, float)):
        return value
    text = str(value).strip()
    return float(text) if "." in text else int(text)


def row_fields(task: str) -> dict[str, Any]:
    """The row fields a task's prompt and label read, with their types (official files)."""
    fields: dict[str, Any] = {"context": str, "answer": (list, str, int, float)}
    if task in ("longbook_choice_eng", "code_debug"):
        fields["options"] = list
    if task in ("longbook_choice_eng", "longbook_qa_eng", "longbook_qa_chn", "code_run", "math_find"):
        fields["input"] = str
    return fields


def prompt_fields(task: str, row: dict[str, Any]) -> dict[str, Any]:
    """The template fields of one row, as the official `create_prompt` builds them."""
    fields: dict[str, Any] = {"context": row["context"], "input": row.get("input", "")}
    options = list(row.get("options") or [])
    if task in ("longbook_choice_eng", "code_debug"):
        fields.update({f"OPTION_{c}": o for c, o in zip("ABCD", options, strict=False)})
    if task in ("longbook_choice_eng", "longbook_qa_eng", "longbook_qa_chn"):
        fields["question"] = row["input"]
    if task == "code_run":
        func_call = re.findall(r"func_[0-9]+\(\-?[0-9]+\)", row["input"])[0]
        fields.update(func_call=func_call, func=func_call.split("(")[0])
    if task == "math_find":  # official: the greedy "The .+ of", lower-cased, without " of"
        target = re.findall(r"The .+ of", row["input"])[0].lower()[:-3]
        fields["prefix"] = f"What is {target} in the following list?"
    return fields


def label_of(task: str, row: dict[str, Any]) -> Any:
    """The label each official scorer compares with (`get_answer`, then the scorer's own
    unwrapping): [option text, letter] for choice tasks, the answer list for the QA and
    summary tasks, the list of values for math_calc, the single answer otherwise."""
    answer = row["answer"]
    if task == "kv_retrieval":
        if not isinstance(answer, str):  # officially `label in words`: a list never matches
            raise ValueError(
                f"infinitebench/kv_retrieval row {row.get('id')}: `answer` is {answer!r}; the "
                "official kv_retrieval.jsonl stores the value string itself"
            )
        return answer
    answers = list(answer) if isinstance(answer, list) else [answer]
    if task in ("longbook_choice_eng", "code_debug"):
        if len(answers) == 2 and answers[1] in ("A", "B", "C", "D"):
            return answers
        return [answers[0], "ABCD"[list(row["options"]).index(answers[0])]]
    if task in ("longbook_qa_eng", "longbook_qa_chn", "longbook_sum_eng"):
        return [str(a) for a in answers]
    if task == "math_calc":
        return [int(v) for v in (answers[0] if isinstance(answers[0], list) else answers)]
    if task == "code_run":
        return int(answers[0])
    if task == "math_find":
        return _number(answers[0])
    return str(answers[0])


def score_one(task: str, prediction: str, label: Any) -> float:
    """One sample's official score (`get_score_one`)."""
    if task in ("passkey", "number_string"):
        return metrics.ib_passkey(prediction, label)
    if task == "kv_retrieval":
        return metrics.ib_kv_retrieval(prediction, label)
    if task == "code_run":
        return metrics.ib_code_run(prediction, label)
    if task == "code_debug":
        return metrics.ib_code_debug(prediction, label[0], label[1])
    if task == "math_find":
        return metrics.ib_math_find(prediction, label)
    if task == "longdialogue_qa_eng":
        return metrics.ib_longdialogue_qa(prediction, label)
    if task == "longbook_choice_eng":
        return metrics.ib_choice(prediction, label)
    if task == "longbook_qa_chn":
        return metrics.ib_qa_f1_zh(prediction, label)
    if task == "longbook_sum_eng":
        return metrics.ib_rouge_lsum(prediction, label)
    if task == "math_calc":
        return metrics.ib_math_calc(prediction, label)
    return metrics.ib_qa_f1(prediction, label)


@dataclass
class InfiniteBench(Benchmark):
    """The twelve InfiniteBench tasks with their official prompts and scorers."""

    key_version = 2  # results changed meaning: official scorers, prompts and no chat template

    chat_template: bool = False
    """Apply the model's chat template to the prompts (officially not: the raw prompt)."""

    known_subsets: ClassVar[Collection[str]] = TEMPLATES
    revision_refused: ClassVar[str | None] = None  # benchmark.revision reaches every hub fetch

    def data_dir_files(self) -> list[Path]:
        return files_found(self.data_dir, [self.subset])

    def load(self, tokenizer: Any = None) -> list[Sample]:
        task = self.subset
        rows = load_rows(
            benchmark=self.name, subset=task, data_dir=self.data_dir, data_files=self.data_files,
            names=[task], hub=lambda: read_rows(hub_file(HUB_ID, f"{task}.jsonl", self.revision)),
            hub_id=f"{HUB_ID}:{task}.jsonl", how_to_get=HOW_TO_GET, fields=row_fields(task),
        )  # fmt: skip
        samples = []
        for i, row in enumerate(rows):
            context, question = split_prompt(TEMPLATES[task], **prompt_fields(task, row))
            label = label_of(task, row)
            answers = [label] if task == "math_calc" or not isinstance(label, list) else label
            samples.append(
                Sample(
                    id=str(row.get("id", i)),
                    context=context,
                    question=question,
                    answers=[str(a) for a in answers],
                    chat=self.chat_template,
                    meta={"label": label},
                )
            )
        return self.select(samples)

    def max_new_tokens(self) -> int:
        return MAX_NEW_TOKENS[self.subset]

    def score(self, samples: list[Sample], predictions: list[str]) -> dict[str, Any]:
        values = [
            score_one(self.subset, p, s.meta["label"])
            for s, p in zip(samples, predictions, strict=True)
        ]
        return {"score": metrics.mean_percent(values), "n": len(values)}
