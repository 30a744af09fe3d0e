"""RULER: 13 tasks generated at any configured sequence length.

Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language Models?",
COLM 2024 (https://github.com/NVIDIA/RULER). This module re-implements the generators of
`scripts/data/synthetic/` with the task settings of `synthetic.yaml`:

- niah_*: needles "One of the special magic {values} for {key} is: {value}." hidden in a
  haystack (repeated noise sentence, an essay, or distractor needles);
- vt: variable tracking (1 chain of 4 hops in noise, with one in-context example);
- cwe: the 10 most common words of a numbered list (with one in-context example);
- fwe: the 3 most frequent coded words of a Zipf(alpha=2) text;
- qa_1 / qa_2: SQuAD v2 dev / HotpotQA dev (distractor) questions among distractor documents.

The prompt of a sample is sized like RULER: the largest haystack such that prompt tokens +
the task's generation length <= `length` (the prompt counted with the model's tokenizer,
without chat template). Metrics: `string_match_all` (niah, vt, cwe, fwe) and
`string_match_part` (qa), after RULER's `postprocess_pred`.

Deviations (documented): the essay haystack is this project's own text, repeated (RULER
downloads Paul Graham essays); words come from this project's lists (RULER uses wonderwords);
RULER's answer prefix (e.g. " Answer:") is placed after the assistant turn by RULER; here it
is passed as `sample.answer_prefix` for the runner to append after the chat template.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from sa_bench.benchmarks import metrics, synthetic
from sa_bench.benchmarks.base import Benchmark, Sample
from sa_bench.benchmarks.data import DataNotFoundError, hub_dataset, read_json, split_prompt
from sa_bench.config import ConfigError

NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to "
    "memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
NIAH_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above."
)
VT_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
    "variables are assigned the value {query}, they are: "
)  # upstream fixed its "assgined" typo on 2025-05-13 (NVIDIA/RULER e88d2c4, 26ed7ba)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common "
    "words in the above list?"
)
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three "
    "most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. "
    "Please ignore the dots '....'. What are the three most frequently appeared words in the "
    "above coded text?"
)
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
QA_TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not output "
    "any other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question "
    "based on the given documents. Only give me the answer and do not output any other words.\n\n"
    "Question: {query}"
)
QA_PREFIX = " Answer:"

NIAH_TASKS: dict[str, tuple[str, str, str, int, int, int]] = {
    # haystack, key type, value type, num_needle_k, num_needle_v, num_needle_q (synthetic.yaml)
    "niah_single_1": ("noise", "words", "numbers", 1, 1, 1),
    "niah_single_2": ("essay", "words", "numbers", 1, 1, 1),
    "niah_single_3": ("essay", "words", "uuids", 1, 1, 1),
    "niah_multikey_1": ("essay", "words", "numbers", 4, 1, 1),
    "niah_multikey_2": ("needle", "words", "numbers", 1, 1, 1),
    "niah_multikey_3": ("needle", "uuids", "uuids", 1, 1, 1),
    "niah_multivalue": ("essay", "words", "numbers", 1, 4, 1),
    "niah_multiquery": ("essay", "words", "numbers", 4, 1, 4),
}
TASKS = (*NIAH_TASKS, "vt", "cwe", "fwe", "qa_1", "qa_2")
TOKENS_TO_GENERATE = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}
DEPTHS = [round(i * 100 / 39) for i in range(40)]  # np.linspace(0, 100, 40), rounded
QA_FILES = {"qa_1": "squad", "qa_2": "hotpotqa"}
QA_HOW_TO_GET = (
    "RULER's qa_1 reads SQuAD v2.0 dev (https://rajpurkar.github.io/SQuAD-explorer/dataset/"
    "dev-v2.0.json) and qa_2 HotpotQA dev distractor (http://curtis.ml.cmu.edu/datasets/hotpot/"
    "hotpot_dev_distractor_v1.json); save them as <data_dir>/squad.json and <data_dir>/hotpotqa.json "
    "(RULER's download_qa_dataset.sh names) or pass one with benchmark.data_files."
)


def family(task: str) -> str:
    return "niah" if task.startswith("niah") else task.split("_")[0]


# A plan draws everything random for one sample; build(n) lays it out with haystack size n.
Build = Callable[[int], tuple[str, str]]


@dataclass
class Plan:
    build: Build
    answers: list[str]
    answer_prefix: str
    limit: int | None = None
    """The largest meaningful haystack size (qa: the number of documents), None if unbounded."""


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


def plan_niah(rng: Any, task: str) -> Plan:
    """RULER `niah.py` `generate_input_output` for one sample."""
    haystack, k_type, v_type, n_k, n_v, n_q = NIAH_TASKS[task]
    keys: list[str] = []
    while len(keys) < n_k:
        key = synthetic.random_value(rng, k_type)
        if key not in keys:
            keys.append(key)
    values = [[synthetic.random_value(rng, v_type) for _ in range(n_v)] for _ in keys]
    needles = [
        NEEDLE.format(type_needle_v=v_type, key=k, value=v)
        for k, vs in zip(keys, values, strict=True)
        for v in vs
    ]
    rng.shuffle(needles)
    queried = rng.sample(range(n_k), n_q)
    query = _join([keys[i] for i in queried])
    answers = [v for i in queried for v in values[i]]
    template, prefix, type_v = NIAH_TEMPLATE, NIAH_PREFIX, v_type
    if n_q * n_v == 1:  # RULER's singular wording
        for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template, prefix = template.replace(old, new), prefix.replace(old, new)
        type_v = v_type[:-1]
    depths = sorted(rng.sample(DEPTHS, len(needles)))
    fractions = [rng.random() for _ in needles]
    distractor_seed = rng.random()
    distractors: list[str] = []

    def haystack_items(n: int) -> list[str]:
        if haystack == "noise":
            return [synthetic.NOISE] * n
        while len(distractors) < n:  # extend a fixed stream: build(n) is a prefix of build(n+1)
            drng = synthetic.sample_seed(distractor_seed, len(distractors))
            distractors.append(
                NEEDLE.format(
                    type_needle_v=v_type,
                    key=synthetic.random_value(drng, k_type),
                    value=synthetic.random_value(drng, v_type),
                )
            )
        return distractors[:n]

    def build(n: int) -> tuple[str, str]:
        if haystack == "essay":
            sents = synthetic.split_sentences(synthetic.essay_text(n))
            cuts = [0, *(int(len(sents) * d / 100) for d in depths), len(sents)]
            parts = []
            for i in range(1, len(cuts)):
                parts.append(" ".join(sents[cuts[i - 1] : cuts[i]]))
                if i - 1 < len(needles):
                    parts.append(needles[i - 1])
            context = " ".join(p for p in parts if p)
        else:
            items = haystack_items(n)
            for idx, needle in sorted(
                zip((int(f * n) for f in fractions), needles, strict=True), reverse=True
            ):
                items.insert(idx, needle)
            context = "\n".join(items)
        return split_prompt(template, context=context, type_needle_v=type_v, query=query)

    return Plan(build, answers, prefix.format(type_needle_v=type_v, query=query))


def _vt_chain(rng: Any, num_hops: int, k: int) -> tuple[list[str], list[str]]:
    names: list[str] = []
    while len(names) < num_hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=k))
        if name not in names:
            names.append(name)
    chain = [f"VAR {names[0]} = {rng.randint(10000, 99999)}"]
    chain += [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(num_hops)]
    return names, chain


def _vt_text(chain: list[str], positions: list[float], n: int) -> str:
    sentences = [synthetic.NOISE] * n
    slots = sorted(int(p * n) for p in positions)
    for j, (slot, statement) in enumerate(zip(slots, chain, strict=True)):
        sentences.insert(slot + j, statement)
    return "\n".join(sentences).replace(". \n", ".\n")


def plan_vt(rng: Any, num_hops: int = 4) -> Plan:
    """RULER `variable_tracking.py` (1 chain, 4 hops, noise haystack, one ICL example)."""
    icl_names, icl_chain = _vt_chain(rng, num_hops, 3)
    icl_value = icl_chain[0].split("=")[-1].strip()
    icl_text = _vt_text(icl_chain, [rng.random() for _ in icl_chain], 5)
    icl = (
        VT_TEMPLATE.format(context=icl_text, query=icl_value)
        + VT_PREFIX.format(num_v=num_hops + 1, query=icl_value)
        + " ".join(icl_names)
    )
    names, chain = _vt_chain(rng, num_hops, 5)
    value = chain[0].split("=")[-1].strip()
    positions = [rng.random() for _ in chain]

    def build(n: int) -> tuple[str, str]:
        ctx, q = split_prompt(VT_TEMPLATE, context=_vt_text(chain, positions, n), query=value)
        return icl + "\n\n" + ctx, q

    return Plan(build, names, VT_PREFIX.format(num_v=num_hops + 1, query=value))


def plan_cwe(rng: Any, length: int, num_cw: int = 10) -> Plan:
    """RULER `common_words_extraction.py` (freq_cw 30, freq_ucw 3; 6/1 below 4k tokens)."""
    example_args, main_args = ((20, 3, 1), (6, 1)) if length < 4096 else ((40, 10, 3), (30, 3))
    pool = synthetic.WordPool(rng)
    seed = rng.random()

    def numbered(words: list[str]) -> str:
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))

    def listing(words: list[str], freq_cw: int, freq_ucw: int, salt: str) -> str:
        items = words[:num_cw] * freq_cw + words[num_cw:] * freq_ucw
        synthetic.sample_seed(seed, salt).shuffle(items)
        return numbered(items)

    n_ex, ex_cw, ex_ucw = example_args
    ex_words = synthetic.WordPool(synthetic.sample_seed(seed, "icl")).take(n_ex)
    example = (
        CWE_TEMPLATE.format(context=listing(ex_words, ex_cw, ex_ucw, "icl"))
        + CWE_PREFIX
        + " "
        + numbered(ex_words[:num_cw])
    )

    def build(n: int) -> tuple[str, str]:
        words = pool.take(num_cw + n)
        ctx, q = split_prompt(CWE_TEMPLATE, context=listing(words, *main_args, "main"))
        return example + "\n" + ctx, q

    return Plan(build, pool.take(num_cw), CWE_PREFIX)


def plan_fwe(rng: Any, alpha: float = 2.0, vocab_size: int = 2000, word_len: int = 6) -> Plan:
    """RULER `freq_words_extraction.py`: Zipf(alpha) counts over a random coded vocabulary;
    the most frequent word is replaced by '...', the answer is ranks 2-4."""
    vocab_set: set[str] = set()
    while len(vocab_set) < vocab_size:
        vocab_set.add("".join(rng.choices(string.ascii_lowercase, k=word_len)))
    vocab = sorted(vocab_set)
    rng.shuffle(vocab)
    vocab[0] = "..."
    weights = [k**-alpha for k in range(1, vocab_size + 1)]
    total = sum(weights)
    seed = rng.random()

    def build(n: int) -> tuple[str, str]:
        words = [w for w, p in zip(vocab, weights, strict=True) for _ in range(int(n * p / total))]
        synthetic.sample_seed(seed).shuffle(words)
        return split_prompt(FWE_TEMPLATE, context=" ".join(words))

    return Plan(build, vocab[1:4], FWE_PREFIX)


def read_qa(task: str, rows: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """RULER `qa.py` `read_squad` / `read_hotpotqa`: questions and the sorted unique docs.

    Accepts the original files (SQuAD json with "data"; HotpotQA list with "context" as
    [title, sentences] pairs) and the hub row formats (rajpurkar/squad_v2,
    hotpotqa/hotpot_qa distractor).
    """
    if task == "qa_1":
        paragraphs: list[tuple[str, str, list[dict]]] = []  # (title, context, qas)
        if isinstance(rows, dict):
            for d in rows["data"]:
                for p in d["paragraphs"]:
                    qas = [
                        {"question": q["question"], "answers": [a["text"] for a in q["answers"]]}
                        for q in p["qas"]
                        if not q.get("is_impossible")
                    ]
                    paragraphs.append((d["title"], p["context"], qas))
        else:
            for r in rows:
                texts = r["answers"]["text"] if isinstance(r["answers"], dict) else r["answers"]
                q = [{"question": r["question"], "answers": list(texts)}] if texts else []
                paragraphs.append((r["title"], r["context"], q))
        docs = sorted({c for _, c, _ in paragraphs})
        index = {c: i for i, c in enumerate(docs)}
        by_title: dict[str, list[int]] = {}
        for title, c, _ in paragraphs:
            if index[c] not in by_title.setdefault(title, []):
                by_title[title].append(index[c])
        qas = []
        for title, c, pq in paragraphs:
            for q in pq:
                qas.append({
                    "query": q["question"], "outputs": q["answers"], "context": [index[c]],
                    "more_context": [i for i in by_title[title] if i != index[c]],
                })  # fmt: skip
        return qas, docs

    def pairs(r: dict) -> list[tuple[str, list[str]]]:
        ctx = r["context"]
        if isinstance(ctx, dict):  # hub format
            return list(zip(ctx["title"], ctx["sentences"], strict=True))
        return [(t, s) for t, s in ctx]

    docs = sorted({f"{t}\n{''.join(s)}" for r in rows for t, s in pairs(r)})
    index = {d: i for i, d in enumerate(docs)}
    qas = [
        {"query": r["question"], "outputs": [r["answer"]],
         "context": [index[f"{t}\n{''.join(s)}"] for t, s in pairs(r)], "more_context": []}
        for r in rows
    ]  # fmt: skip
    return qas, docs


def plan_qa(rng: Any, qa: dict[str, Any], docs: list[str]) -> Plan:
    """RULER `qa.py` `generate_input_output`: the gold documents, then same-article
    documents, then random others; shuffled; "Document {i}:\\n{document}" joined by blank lines."""
    gold, more = list(qa["context"]), list(qa.get("more_context", []))
    taken = set(gold) | set(more)
    others = [i for i in rng.sample(range(len(docs)), min(len(docs), 4 * 1024)) if i not in taken]
    more = rng.sample(more, len(more))
    order_seed = rng.random()

    def build(n: int) -> tuple[str, str]:
        chosen = (gold + more + others)[: max(n, len(gold))]
        chosen = [docs[i] for i in chosen]
        synthetic.sample_seed(order_seed).shuffle(chosen)
        context = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(chosen))
        return split_prompt(QA_TEMPLATE, context=context, query=qa["query"])

    return Plan(build, list(qa["outputs"]), QA_PREFIX, limit=len(gold + more + others))


@dataclass
class Ruler(Benchmark):
    """RULER's 13 tasks at `length` tokens (prompt + generation), `num_samples` per task."""

    key_version = 2  # results changed meaning: current upstream vt template, official aggregate

    length: int = 4096
    """Sequence length in tokens: prompt (without chat template) + the task's generation length."""
    num_samples: int = 500
    """Samples per task (RULER's default); `max_samples` then picks a seeded subset of them."""

    known_subsets: ClassVar[Collection[str]] = TASKS
    revision_refused: ClassVar[str | None] = (
        "reads two hub datasets (qa_1 rajpurkar/squad_v2, qa_2 hotpotqa/hotpot_qa) and its "
        "other tasks none, so one revision pins neither; local QA files (benchmark.data_dir) "
        "are keyed by their content"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.length < 256:
            raise ConfigError(f"length: expected an int >= 256, got {self.length}")
        if self.num_samples < 1:
            raise ConfigError(f"num_samples: expected an int >= 1, got {self.num_samples}")
        for name in ("data_files", "data_dir"):
            if getattr(self, name) and not set(self.subsets) & set(QA_FILES):
                raise ConfigError(
                    f"{name}: ruler reads data files only for {' and '.join(QA_FILES)}, and "
                    f"subsets lists neither (the others are generated); remove "
                    f"benchmark.{name}={getattr(self, name)}"
                )

    def max_new_tokens(self) -> int:
        return TOKENS_TO_GENERATE[family(self.subset)]

    @classmethod
    def package_files(cls) -> list[Path]:
        return synthetic.asset_files()

    def _plan(self, index: int, qa: tuple[list[dict], list[str]] | None) -> Plan:
        task = self.subset
        rng = synthetic.sample_seed("ruler", task, self.length, self.seed, index)
        kind = family(task)
        if kind == "niah":
            return plan_niah(rng, task)
        if kind == "vt":
            return plan_vt(rng)
        if kind == "cwe":
            return plan_cwe(rng, self.length)
        if kind == "fwe":
            return plan_fwe(rng)
        assert qa is not None
        qas, docs = qa
        return plan_qa(rng, qas[index % len(qas)], docs)

    def data_dir_files(self) -> list[Path]:
        if self.subset not in QA_FILES or not self.data_dir:
            return []  # generated from the tokenizer's vocabulary: no file read
        path = Path(self.data_dir) / f"{QA_FILES[self.subset]}.json"
        return [path] if path.is_file() else []

    def _qa_data(self) -> tuple[list[dict], list[str]]:
        name = QA_FILES[self.subset]
        path: Path | None = None
        if self.data_files:
            path = Path(self.data_files)
        elif self.data_dir:
            path = Path(self.data_dir) / f"{name}.json"
        if path is not None:
            if not path.is_file():
                raise DataNotFoundError(f"ruler/{self.subset}: {path} does not exist. {QA_HOW_TO_GET}")
            return read_qa(self.subset, read_json(path))
        try:
            rows = (
                hub_dataset("rajpurkar/squad_v2", None, "validation")
                if self.subset == "qa_1"
                else hub_dataset("hotpotqa/hotpot_qa", "distractor", "validation")
            )
        except Exception as exc:
            raise DataNotFoundError(
                f"ruler/{self.subset}: no local file (benchmark.data_dir / data_files) and the hub "
                f"copy failed ({type(exc).__name__}: {str(exc)[:200]}). {QA_HOW_TO_GET}"
            ) from exc
        return read_qa(self.subset, rows)

    def load(self, tokenizer: Any) -> list[Sample]:
        """Generate the selected samples; the haystack size is found on sample 0 by bisection
        and, for a sample whose prompt is then over budget, searched again below it."""
        qa = self._qa_data() if family(self.subset) == "qa" else None
        n_total = self.num_samples if qa is None else min(self.num_samples, len(qa[0]))
        indices = self.select(list(range(n_total)))  # type: ignore[arg-type]
        count = synthetic.token_counter(tokenizer)
        budget = self.length - self.max_new_tokens()

        def fits(plan: Plan) -> Callable[[int], bool]:
            return lambda n: count("".join(plan.build(n))) <= budget

        try:
            plan0 = self._plan(0, qa)
            n0 = synthetic.fit(fits(plan0), maximum=plan0.limit)
        except ValueError as exc:
            raise ValueError(f"ruler/{self.subset}: length={self.length}: {exc}") from None
        samples = []
        for index in indices:
            plan = self._plan(index, qa)
            n, ok = n0, fits(plan)
            if not ok(n):  # RULER steps down; bisecting below n0 keeps the prompt near the budget
                n = synthetic.fit(ok, hint=n0, maximum=plan.limit) if ok(0) else 0
            context, question = plan.build(n)
            samples.append(
                Sample(
                    id=f"{self.subset}-{index}",
                    context=context,
                    question=question,
                    answers=plan.answers,
                    answer_prefix=plan.answer_prefix,
                    meta={"haystack": n, "index": index},
                )
            )
        return samples

    def score(self, samples: list[Sample], predictions: list[str]) -> dict[str, Any]:
        match = metrics.string_match_part if family(self.subset) == "qa" else metrics.string_match_all
        values = [
            match(metrics.ruler_postprocess(p), s.answers)
            for s, p in zip(samples, predictions, strict=True)
        ]
        return {
            "score": metrics.ruler_mean_percent(values),
            "n": len(values),
            "metric": match.__name__,
            "length": self.length,
        }
