"""Official per-sample metrics of the supported benchmarks (each returns a float in [0, 1]).

Every function re-implements the definition named in its docstring, or calls the package
the official code calls (`rouge`, Google's `rouge_score`, `math_verify`); the text
normalisation is the official one (SQuAD-style for English, jieba word segmentation for
Chinese). The benchmarks average these per-sample values with each benchmark's own
arithmetic (the aggregates at the end) and report them on a 0-100 scale.
Heavy optional imports (jieba, rouge, rouge_score, fuzzywuzzy, math_verify) happen on first use.
"""

from __future__ import annotations

import _thread
import ast
import math
import re
import string
import sys
import threading
import unicodedata
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

# --------------------------------------------------------------------------------------
# Text normalisation (LongBench `metrics.py`, InfiniteBench `compute_scores.py`)
# --------------------------------------------------------------------------------------

_CN_PUNCTUATION = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕"
    "〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_EN_PUNCT = frozenset(string.punctuation)
_ZH_PUNCT = frozenset(string.punctuation + _CN_PUNCTUATION)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation, drop articles, squeeze spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _EN_PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def normalize_zh_answer(s: str) -> str:
    """Chinese normalisation: lower case, drop ASCII and CJK punctuation, drop all spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _ZH_PUNCT)
    return "".join(s.split())


@lru_cache(maxsize=1)
def _jieba() -> Any:
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)
    return jieba


def _cut(text: str) -> list[str]:
    """jieba precise-mode word segmentation (``jieba.cut(text, cut_all=False)``)."""
    return list(_jieba().cut(text, cut_all=False))


# --------------------------------------------------------------------------------------
# LongBench (THUDM/LongBench, LongBench/metrics.py)
# --------------------------------------------------------------------------------------


def f1_tokens(prediction: Sequence[str], ground_truth: Sequence[str]) -> float:
    """Bag-of-tokens F1 (LongBench `f1_score`): 0 when nothing is shared."""
    common = Counter(prediction) & Counter(ground_truth)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction)
    recall = num_same / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """LongBench `qa_f1_score`: F1 over whitespace tokens after `normalize_answer`."""
    return f1_tokens(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """LongBench `qa_f1_zh_score`: F1 over jieba words, each `normalize_zh_answer`-ed,
    empty words dropped."""
    pred = [t for t in (normalize_zh_answer(w) for w in _cut(prediction)) if t]
    gold = [t for t in (normalize_zh_answer(w) for w in _cut(ground_truth)) if t]
    return f1_tokens(pred, gold)


OFFICIAL_RECURSION_LIMIT = 1000
"""Python's default recursion limit, under which the official scripts run."""


def at_official_depth(depth: int, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` with the recursion headroom it has in an official script, where `fn` runs
    as frame number `depth` of the main thread (the module's own frame is 1) under the
    default limit.

    The `rouge` package reconstructs its LCS recursively; the official code turns the
    resulting RecursionError into a score of 0. How many frames are already on the stack
    (a Hydra job is deep) would move that point, so `fn` runs in a fresh thread, padded to
    `depth` frames (more when the process's recursion limit was raised): a prediction scores
    the same here as under the official script, wherever this is called from.
    """
    pad = max(0, sys.getrecursionlimit() - OFFICIAL_RECURSION_LIMIT) + depth - 2
    outcome: dict[str, Any] = {}
    done = _thread.allocate_lock()
    done.acquire()

    def padded(n: int) -> Any:  # frames 2 .. pad+1, then fn at frame `depth` (+ raised limit)
        return padded(n - 1) if n > 0 else fn(*args)

    def run() -> None:  # the new thread's first frame
        try:
            outcome["value"] = padded(pad - 1) if pad > 0 else fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller below
            outcome["error"] = exc
        finally:
            done.release()

    _thread.start_new_thread(run, ())
    done.acquire()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _rouge_scores(prediction: str, ground_truth: str) -> dict[str, dict[str, float]] | None:
    """`Rouge().get_scores` of one pair, None where it raises (empty text, recursion)."""
    from rouge import Rouge

    try:
        return Rouge().get_scores([prediction], [ground_truth])[0]
    except Exception:  # noqa: BLE001 - the official code swallows every error here
        return None


def rouge_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """LongBench `rouge_score`: ROUGE-L F of the `rouge` package; 0 where it raises
    (empty hypothesis or reference, RecursionError on long text, which happens at the
    same length as under the official `eval.py`: see `at_official_depth`)."""
    scores = at_official_depth(3, _rouge_scores, prediction, ground_truth)
    return 0.0 if scores is None else float(scores["rouge-l"]["f"])


def rouge_zh_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """LongBench `rouge_zh_score`: ROUGE-L F over jieba words joined by spaces (called one
    frame deeper than `rouge_score` officially, as it goes through it)."""
    pred, gold = " ".join(_cut(prediction)), " ".join(_cut(ground_truth))
    scores = at_official_depth(4, _rouge_scores, pred, gold)
    return 0.0 if scores is None else float(scores["rouge-l"]["f"])


def classification_score(
    prediction: str, ground_truth: str, all_classes: Sequence[str] = (), **_: Any
) -> float:
    """LongBench `classification_score` (trec, lsht).

    Classes named in the prediction are collected; a match that is a strict substring of
    the gold class is dropped; the score is 1/len(matches) if the gold class is among
    them. The official loop removes items from the list it iterates over, which skips
    the element after each removal; that behaviour is reproduced here.
    """
    matches = [c for c in all_classes if c in prediction]
    i = 0
    while i < len(matches):
        term = matches[i]
        if term in ground_truth and term != ground_truth:
            matches.remove(term)  # like list.remove inside a for-loop: next item skipped
        i += 1
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _fraction_equal(numbers: list[str], target: str) -> float:
    return 0.0 if not numbers else sum(n == target for n in numbers) / len(numbers)


def retrieval_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """LongBench `retrieval_score` (passage_retrieval_en): the fraction of the numbers in
    the prediction that equal the gold paragraph number ("Paragraph N")."""
    found = re.findall(r"Paragraph (\d+)", ground_truth)
    if not found:
        return 0.0
    return _fraction_equal(re.findall(r"\d+", prediction), found[0])


def retrieval_zh_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """LongBench `retrieval_zh_score` (passage_retrieval_zh): as `retrieval_score` with
    the gold written "段落N"."""
    found = re.findall(r"段落(\d+)", ground_truth)
    if not found:
        return 0.0
    return _fraction_equal(re.findall(r"\d+", prediction), found[0])


def count_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """LongBench `count_score` (passage_count): the fraction of the numbers in the
    prediction that equal the gold count."""
    return _fraction_equal(re.findall(r"\d+", prediction), str(ground_truth))


def code_sim_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """LongBench `code_sim_score` (lcc, repobench-p): fuzzywuzzy `fuzz.ratio` / 100 between
    the gold line and the first predicted line containing none of '`', '#', '//'."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Using slow pure-python SequenceMatcher"
        from fuzzywuzzy import fuzz

    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return fuzz.ratio(line, ground_truth) / 100


LONGBENCH_METRICS: dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1_score,
    "qa_f1_zh": qa_f1_zh_score,
    "rouge": rouge_score,
    "rouge_zh": rouge_zh_score,
    "classification": classification_score,
    "retrieval": retrieval_score,
    "retrieval_zh": retrieval_zh_score,
    "count": count_score,
    "code_sim": code_sim_score,
}


def best_over_answers(
    metric: Callable[..., float], prediction: str, answers: Sequence[str], **kwargs: Any
) -> float:
    """LongBench `scorer`: the maximum of the metric over all gold answers (0 if none)."""
    return max((metric(prediction, a, **kwargs) for a in answers), default=0.0)


# --------------------------------------------------------------------------------------
# RULER (NVIDIA/RULER, scripts/eval/synthetic/constants.py)
# --------------------------------------------------------------------------------------


def ruler_postprocess(prediction: str) -> str:
    """RULER `postprocess_pred`: strip, turn control characters into newlines, strip."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER `string_match_all`: the fraction of references found (case-insensitive
    substring) in the prediction."""
    if not references:
        return 0.0
    pred = prediction.lower()
    return sum(r.lower() in pred for r in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """RULER `string_match_part`: 1 if any reference is a case-insensitive substring."""
    pred = prediction.lower()
    return float(any(r.lower() in pred for r in references))


# --------------------------------------------------------------------------------------
# InfiniteBench (OpenBMB/InfiniteBench, src/compute_scores.py)
# --------------------------------------------------------------------------------------


def first_int_match(prediction: str) -> str:
    """The first maximal run of digits in the prediction ("" if none)."""
    found = re.search(r"[0-9]+", prediction)
    return found.group(0) if found else ""


def _strip_chars(text: str, chars: Sequence[str]) -> str:
    for c in chars:
        text = text.replace(c, " ")
    return text


def ib_passkey(prediction: str, label: str) -> float:
    """InfiniteBench passkey / number_string: the first integer equals the label."""
    return float(first_int_match(prediction) == str(label))


def ib_kv_retrieval(prediction: str, label: str) -> float:
    """InfiniteBench kv_retrieval: the label is one of the words after replacing
    newline : " ' . , ? ! { } by spaces (`label in words`; the label is the row's `answer`
    string, see `InfiniteBench.load`)."""
    words = _strip_chars(prediction, ["\n", ":", '"', "'", ".", ",", "?", "!", "{", "}"]).split()
    return float(label in words)


def ib_code_run(prediction: str, label: int | str) -> float:
    """InfiniteBench code_run: the last word (after replacing newline . ` ' " : by spaces)
    is an integer equal to the label."""
    words = _strip_chars(prediction.strip(), ["\n", ".", "`", "'", '"', ":"]).split()
    if not words:
        return 0.0
    try:
        return float(int(words[-1]) == int(label))
    except ValueError:
        return 0.0


def ib_code_debug(prediction: str, function_name: str, letter: str) -> float:
    """InfiniteBench code_debug: the stripped prediction starts with "X." / "X:", or the
    text after the first of "answer is:", "is:", "answer:", "correct option is:" starts
    with the letter or the function name."""
    pred = prediction.strip()
    if pred[:2] in (f"{letter}.", f"{letter}:"):
        return 1.0
    pred = _strip_chars(pred, ["\n", "`", "'", '"', "-", "*", "Option", "option"])
    while "  " in pred:
        pred = pred.replace("  ", " ")
    for prefix in ("answer is:", "is:", "answer:", "correct option is:"):
        idx = pred.find(prefix)
        if idx == -1:
            continue
        if len(pred) < idx + len(prefix) + 1:
            return 0.0
        rest = pred[idx + len(prefix) + 1 :]
        return float(rest.startswith(letter) or rest.startswith(function_name))
    return 0.0


def ib_math_find(prediction: str, label: int | float | str) -> float:
    """InfiniteBench math_find: the first number in the prediction equals the label
    (compared as int for an int label, as float for a float label)."""
    found = re.search(r"\d+\.\d+|\d+", prediction)
    if found is None:
        return 0.0
    value = found.group(0).strip()
    if isinstance(label, str):
        label = float(label) if "." in label else int(label)
    if isinstance(label, int):
        try:
            return float(int(value) == label)
        except ValueError:  # "1.5" for an int label: the official int() raises; count it wrong
            return 0.0
    return float(float(value) == label)


def ib_longdialogue_qa(prediction: str, label: str) -> float:
    """InfiniteBench longdialogue_qa_eng: the label is one of the upper-cased words."""
    words = _strip_chars(prediction.strip(), ["\n", ":", '"', "'", ".", ",", "?", "!", "{", "}"]).split()
    return float(label in [w.upper() for w in words])


def ib_choice(prediction: str, labels: Sequence[str]) -> float:
    """InfiniteBench longbook_choice_eng: `labels` is [option text, letter]. On the stripped
    prediction, in this order: its first character if it is one of A-D; the whole
    prediction if it equals the option text or letter; the text after "answer is:",
    "answer:", "answer is", "option is"; the first word that is one of A, B, C, D."""
    pred = prediction.strip()
    if not pred:
        return 0.0
    if pred[0] in "ABCD":
        return float(pred[0] in labels)
    if pred in labels:
        return 1.0
    pred = _strip_chars(pred, ["\n", '"', "'", ".", ",", "?", "!", "{", "}"])
    while "  " in pred:
        pred = pred.replace("  ", " ")
    for prefix in ("answer is:", "answer:", "answer is", "option is"):
        idx = pred.find(prefix)
        if idx == -1:
            continue
        if len(pred) < idx + len(prefix) + 1:
            return 0.0
        rest = pred[idx + len(prefix) + 1 :]
        return float(any(rest.startswith(s) for s in labels))
    for word in pred.split():
        if word in "ABCD":  # substring test, as official: "AB" stops the search too
            return float(word in labels)
    return 0.0


def ib_qa_f1(prediction: str, answers: Sequence[str]) -> float:
    """InfiniteBench longbook_qa_eng: the best SQuAD-normalised token F1 over answers."""
    return best_over_answers(qa_f1_score, prediction, answers)


def ib_qa_f1_zh(prediction: str, answers: Sequence[str]) -> float:
    """InfiniteBench longbook_qa_chn (`qa_f1_score_zh` of `compute_scores.py`): the best F1
    over answers with one token per character of the `normalize_zh_answer`-ed text (no
    jieba, unlike LongBench)."""
    pred = list(normalize_zh_answer(prediction))
    return max((f1_tokens(pred, list(normalize_zh_answer(a))) for a in answers), default=0.0)


def ib_math_calc(prediction: str, label: Sequence[int]) -> float:
    """InfiniteBench math_calc: the fraction of the expected values that the prediction's
    numbers match one by one from the start, up to the first mismatch. The numbers are the
    runs of digits (officially `re.split("[^0-9]", pred)`): a minus sign is dropped, so a
    negative expected value never matches, as in the official scorer."""
    values = [int(run) for run in re.findall(r"[0-9]+", prediction)]
    count = 0
    for expected, got in zip(label, values, strict=False):
        if expected != got:
            break
        count += 1
    return count / len(label)


def ib_rouge_lsum(prediction: str, references: Sequence[str]) -> float:
    """InfiniteBench longbook_sum_eng: ROUGE-Lsum F of Hugging Face `evaluate`'s "rouge" on
    the row's list of summaries (so `score_multi`: the best reference) - Google's
    `rouge_score`, default tokenizer, no stemming, sentences split at newlines."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=False)
    return float(scorer.score_multi(list(references), prediction)["rougeLsum"].fmeasure)


# --------------------------------------------------------------------------------------
# LongBench v2 (THUDM/LongBench, pred.py `extract_answer`)
# --------------------------------------------------------------------------------------


def extract_choice(response: str) -> str | None:
    """LongBench v2: the letter in "The correct answer is (X)" or "... is X" (asterisks
    removed first); None when neither appears."""
    response = response.replace("*", "")
    match = re.search(r"The correct answer is \(([A-D])\)", response) or re.search(
        r"The correct answer is ([A-D])", response
    )
    return match.group(1) if match else None


# --------------------------------------------------------------------------------------
# LooGLE (bigai-nlco/LooGLE, Evaluation/automatic_metrics.py)
# --------------------------------------------------------------------------------------


def parse_mapping(text: Any) -> dict | None:
    """A Python/JSON dict literal parsed with `ast.literal_eval` (never evaluated as code);
    None if the text is not a dict literal.

    The official code calls `eval` on the prediction as it is. Like `eval`, `literal_eval`
    skips leading spaces and tabs and blank lines, and fails on other surrounding
    whitespace (an indented line after a newline, a trailing newline plus space), so the
    text is not stripped here either: such a prediction scores 0, as officially.
    """
    if isinstance(text, dict):
        return text
    try:
        value = ast.literal_eval(str(text))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def cloze_match(prediction: str, reference: dict[str, str]) -> tuple[int, int, int]:
    """LooGLE `get_exact_match` and `get_partial_match` for one cloze question.

    Returns (exact matches, partial matches, number of masks): exact = the predicted
    entity equals the gold one; partial = they share a whitespace word.
    """
    hyp = parse_mapping(prediction)
    if hyp is None:
        return 0, 0, len(reference)
    exact = sum(1 for k, v in reference.items() if k in hyp and hyp[k] == v)
    partial = sum(
        1
        for k, v in reference.items()
        if k in hyp and set(str(v).split()) & set(str(hyp[k]).split())
    )
    return exact, partial, len(reference)


def rouge_all(prediction: str, reference: str, stat: str = "r") -> tuple[float, float, float]:
    """LooGLE `get_rouge_score`: ROUGE-1, -2, -L of the `rouge` package, recall by default
    (the official default `metric="r"`). Zeros where `rouge` raises (e.g. empty text; the
    official script would stop there), with the official recursion headroom."""
    s = at_official_depth(3, _rouge_scores, prediction, reference)
    if s is None:
        return 0.0, 0.0, 0.0
    return s["rouge-1"][stat], s["rouge-2"][stat], s["rouge-l"][stat]


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def sentence_bleu_n(prediction: str, reference: str, n: int) -> float:
    """Sentence BLEU with all weight on n-grams of order n (nltk `sentence_bleu` with weights
    (1,0,0,0) for BLEU-1, (0,0,0,1) for BLEU-4, no smoothing), as LooGLE `get_bleu_score`:
    brevity penalty x clipped n-gram precision; 0 when there is no n-gram overlap."""
    hyp = prediction.replace("\n", " ").split()
    ref = reference.replace("\n", " ").split()
    if not hyp:
        return 0.0
    hyp_counts = _ngrams(hyp, n)
    total = sum(hyp_counts.values())
    if total == 0:
        return 0.0
    clipped = sum((hyp_counts & _ngrams(ref, n)).values())
    if clipped == 0:
        return 0.0
    bp = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
    return bp * clipped / total


# --------------------------------------------------------------------------------------
# Zero-SCROLLS (tau/zero_scrolls `metrics/`, built on the SCROLLS metric `metrics/scrolls.py`)
# --------------------------------------------------------------------------------------


def scrolls_normalize(s: str) -> str:
    """SCROLLS `f1.py` normalisation: SQuAD's (lower case, no punctuation, no articles, spaces
    squeezed), then transliterated to ASCII with `unidecode`."""
    from unidecode import unidecode

    return unidecode(normalize_answer(s))


def scrolls_f1(prediction: str, ground_truth: str) -> float:
    """Zero-SCROLLS F1 (qasper, narrative_qa, musique): bag-of-tokens F1 of the
    `scrolls_normalize`-d texts, 0 when nothing is shared."""
    return f1_tokens(scrolls_normalize(prediction).split(), scrolls_normalize(ground_truth).split())


def scrolls_rouge(prediction: str, ground_truth: str) -> dict[str, float]:
    """ROUGE-1, -2 and -L F-measures x 100 of Google's `rouge_score` without stemming, as the
    SCROLLS metric computes them. (Its sentence splitting before scoring only changes
    ROUGE-Lsum, which is not part of the score and not reported.)"""
    from rouge_score import rouge_scorer

    scores = _rouge_scorer(rouge_scorer).score(ground_truth, prediction)
    return {key: scores[key].fmeasure * 100 for key in ("rouge1", "rouge2", "rougeL")}


@lru_cache(maxsize=1)
def _rouge_scorer(module: Any) -> Any:
    return module.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)


def scrolls_rouge_aggregate(best: Sequence[dict[str, float]]) -> dict[str, float]:
    """The SCROLLS ROUGE figures from each prediction's best scores: the mean of each type,
    then `geometric_mean` = (R-1 x R-2 x R-L)^(1/3) of those means (not a mean of per-sample
    geometric means); each rounded to 4 digits as `scrolls.py` does."""
    keys = ("rouge1", "rouge2", "rougeL")
    means = {k: sum(b[k] for b in best) / len(best) for k in keys}
    means["geometric_mean"] = (means["rouge1"] * means["rouge2"] * means["rougeL"]) ** (1 / 3)
    return {k: round(v, 4) for k, v in means.items()}


def scrolls_best_rouge(prediction: str, references: Sequence[str]) -> dict[str, float]:
    """Each ROUGE type's maximum over the references, taken separately per type (SCROLLS
    `_compute_helper` with `agg_fn=max`)."""
    scores = [scrolls_rouge(prediction, r) for r in references]
    return {k: max(s[k] for s in scores) for k in ("rouge1", "rouge2", "rougeL")}


def scrolls_letter(text: str) -> str | None:
    """Zero-SCROLLS `accuracy` (QuALITY): the first standalone letter A-D (`\\b[A-D]\\b`)."""
    found = re.search(r"\b[A-D]\b", text)
    return found.group(0) if found else None


def scrolls_accuracy(prediction: str, ground_truth: str) -> float:
    """1 if the first standalone A-D of the prediction is the gold answer's letter."""
    return float(scrolls_letter(prediction) == scrolls_letter(ground_truth))


def _percentage(text: str) -> float | None:
    found = re.search(r"\d+\.?\d*%", text)
    return float(found.group(0)[:-1]) if found else None


def scrolls_exp_similarity(prediction: str, ground_truth: str) -> float:
    """Zero-SCROLLS `exp_similarity` (space_digest): 0.5 ** (|gold% - predicted%| / 10), the
    percentages being the first `<number>%` of each text; 0 without one in the prediction, a
    gold without one counts as 0%."""
    predicted = _percentage(prediction)
    if predicted is None:
        return 0.0
    return 0.5 ** (abs((_percentage(ground_truth) or 0.0) - predicted) / 10)


def _summary_ids(text: str) -> list[int]:
    """The ids of a book_sum_sort answer: every character but digits, whitespace and commas
    dropped, commas read as spaces, the numbers in order ([] if one is not an int)."""
    kept = re.sub(r"[^0-9\s,]", "", text).replace(",", " ").strip(string.punctuation).split()
    try:
        return [int("".join(ch for ch in x if ch not in _EN_PUNCT).strip()) for x in kept]
    except ValueError:
        return []


def scrolls_concordance(prediction: str, ground_truth: str) -> float:
    """Zero-SCROLLS `concordance_index` (book_sum_sort): 0 unless the predicted ids are a
    permutation of the gold ones; else the fraction of pairs of summaries that the prediction
    puts in the gold order (Harrell's C-index of the positions, as `lifelines` computes it for
    two tie-free rankings)."""
    predicted, gold = _summary_ids(prediction), _summary_ids(ground_truth)
    if sorted(predicted) != sorted(gold):
        return 0.0
    pos_pred = {summary: i for i, summary in enumerate(predicted)}
    pos_gold = {summary: i for i, summary in enumerate(gold)}
    pairs = [(a, b) for i, a in enumerate(gold) for b in gold[i + 1 :]]
    if not pairs:
        raise ValueError("book_sum_sort: one summary gives no pair to order")  # lifelines raises too
    agree = sum((pos_pred[a] < pos_pred[b]) == (pos_gold[a] < pos_gold[b]) for a, b in pairs)
    return agree / len(pairs)


# --------------------------------------------------------------------------------------
# LOFT RAG (google-deepmind/loft, evaluation/utils.py and rag.py)
# --------------------------------------------------------------------------------------


def loft_normalize(s: str) -> str:
    """LOFT `normalize_answer`: Unicode NFD (accents become separate marks, kept), then SQuAD's
    lower case / no punctuation / no articles / squeezed spaces."""
    return normalize_answer(unicodedata.normalize("NFD", s))


def loft_f1(gold: str, predicted: str) -> float:
    """LOFT `compute_f1` for one gold answer: token F1 of the normalised texts, 0 when nothing
    is shared."""
    return f1_tokens(loft_normalize(predicted).split(), loft_normalize(gold).split())


def loft_multi_subspan_em(gold: Sequence[str], predicted: Sequence[str]) -> float:
    """LOFT `compute_multi_value_subspan_em`: 1 if every gold answer can be paired with its own
    predicted answer that contains it or is contained in it (a maximum matching covering all
    gold answers; officially found with `scipy.optimize.linear_sum_assignment`)."""
    fits = [[j for j, p in enumerate(predicted) if g in p or p in g] for g in gold]
    owner: dict[int, int] = {}

    def place(i: int, seen: set[int]) -> bool:  # augmenting path (Kuhn's algorithm)
        for j in fits[i]:
            if j not in seen:
                seen.add(j)
                if j not in owner or place(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return float(all(place(i, set()) for i in range(len(gold))))


# --------------------------------------------------------------------------------------
# AIME: Hugging Face math-verify
# --------------------------------------------------------------------------------------


def math_verify_match(prediction: str, answer: str | int) -> float:
    """1 if math-verify finds the gold answer in the prediction (`verify(parse(gold),
    parse(prediction))`, its default LaTeX and plain-expression extraction): a boxed answer
    in any form it normalises (`33.0`, `\\text{33}`, `n=33`, `\\dfrac{66}{2}`, units, ...) or
    a final answer without a box. A box whose content math-verify extracts but cannot read
    (`\\boxed{70\\%}`) is read by math-verify again as the LaTeX `$70\\%$`. Two boxes in one
    answer parse as a set (not equal to one number); `\\fbox` is not read.

    math-verify bounds parsing and comparison with SIGALRM, which only the main thread may
    use; elsewhere it runs without that time limit.
    """
    from math_verify import parse, verify

    limit = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(f"${answer}$", parsing_timeout=limit)
    found = parse(prediction, parsing_timeout=limit)
    if found and all(isinstance(x, str) for x in found):
        # Only the raw text of the answer came back: math-verify could not read what it took
        # out of the box (`\boxed{70\%}` gives '70\%': its boxed pattern has no percent
        # suffix). Its own parse of that text as LaTeX (`$70\%$`) reads it.
        found = parse(f"${found[-1]}$", parsing_timeout=limit) or found
    return float(bool(gold) and bool(found) and verify(gold, found, timeout_seconds=limit))


# --------------------------------------------------------------------------------------
# Aggregates: each benchmark's own arithmetic, so scores round as officially
# --------------------------------------------------------------------------------------


def mean_percent(values: Sequence[float], digits: int = 2) -> float | None:
    """LongBench `scorer`: round(100 * sum / len, 2) (LongBench v2's `result.py`: 1 digit);
    None for an empty list."""
    if not values:
        return None
    return round(100 * sum(values) / len(values), digits)


def numpy_mean_percent(values: Sequence[float]) -> float | None:
    """LongBench `scorer_e` (per length bucket): round(100 * np.mean, 2). numpy sums
    pairwise, so this can differ from `mean_percent` in the last digit. None for an empty
    bucket (officially NaN, with a warning)."""
    if not values:
        return None
    import numpy as np

    return round(100 * float(np.mean(values)), 2)


def ruler_mean_percent(values: Sequence[float]) -> float | None:
    """RULER `string_match_*`: round(sum / len * 100, 2); None for an empty list."""
    if not values:
        return None
    return round(sum(values) / len(values) * 100, 2)
