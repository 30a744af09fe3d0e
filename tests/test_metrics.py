"""Every metric against hand-computed cases (official definitions, see metrics.py)."""

from __future__ import annotations

import pytest

from sa_bench.benchmarks import metrics as m
from sa_bench.benchmarks.longbench import score_one

approx = pytest.approx


# ----------------------------------------------------------------------------- normalisation


def test_normalize_answer():
    assert m.normalize_answer("The  Cat's, an apple!") == "cats apple"
    assert m.normalize_answer("") == ""


def test_normalize_zh_answer():
    assert m.normalize_zh_answer("北京， 是 首都。ABC!") == "北京是首都abc"


# ----------------------------------------------------------------------------- LongBench


def test_qa_f1():
    # pred tokens [eiffel, tower, paris], gold [eiffel, tower]: P=2/3, R=1, F1=0.8
    assert m.qa_f1_score("The Eiffel Tower, Paris", "eiffel tower") == approx(0.8)
    assert m.qa_f1_score("", "eiffel tower") == 0.0
    assert m.qa_f1_score("a the", "the") == 0.0  # both normalise to nothing
    # repeated tokens are clipped: pred [x, x], gold [x]: P=1/2, R=1 -> 2/3
    assert m.qa_f1_score("x x", "x") == approx(2 / 3)


def test_qa_f1_zh():
    # jieba: 北京/是/中国/的/首都 vs 中国/的/首都/是/北京: same bag of words
    assert m.qa_f1_zh_score("北京是中国的首都。", "中国的首都是北京") == approx(1.0)
    assert m.qa_f1_zh_score("", "北京") == 0.0
    # pred 北京 / gold 北京/上海 (punctuation dropped): P=1, R=1/2 -> 2/3
    assert m.qa_f1_zh_score("北京", "北京，上海") == approx(2 / 3)


def test_rouge_en():
    # LCS("alpha beta gamma delta", "alpha beta chi delta") = 3 of 4 both ways -> F=0.75
    assert m.rouge_score("alpha beta gamma delta", "alpha beta chi delta") == approx(0.75, abs=1e-6)
    # P = 2/4, R = 2/3 -> F = 4/7
    assert m.rouge_score("w1 w2 w3 w4", "w1 w2 w5") == approx(4 / 7, abs=1e-6)
    assert m.rouge_score("", "the cat") == 0.0  # rouge raises on empty hypothesis -> 0
    assert m.rouge_score("identical words", "identical words") == approx(1.0, abs=1e-6)


def test_rouge_zh():
    # jieba: 今天天气/很/好 vs 今天天气/不错: LCS 1, P=1/3, R=1/2 -> F=0.4
    assert m.rouge_zh_score("今天天气很好", "今天天气不错") == approx(0.4, abs=1e-6)
    assert m.rouge_zh_score("", "今天天气不错") == 0.0


def test_classification():
    classes = ["Location", "City", "Cit"]
    # matches Location, City, Cit; Cit is a strict substring of the gold City -> dropped
    assert m.classification_score("Location or City", "City", all_classes=classes) == 0.5
    assert m.classification_score("City", "City", all_classes=classes) == 1.0
    assert m.classification_score("", "City", all_classes=classes) == 0.0
    # official quirk: removing "Ci" skips the next match "Cit", which is kept
    quirk = ["Ci", "Cit", "City"]
    assert m.classification_score("City", "City", all_classes=quirk) == 0.5


def test_retrieval_and_count():
    assert m.retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    assert m.retrieval_score("Paragraph 3 or Paragraph 4", "Paragraph 3") == 0.5
    assert m.retrieval_score("", "Paragraph 3") == 0.0
    assert m.retrieval_zh_score("答案是段落12", "段落12") == 1.0
    assert m.retrieval_zh_score("段落1或段落12", "段落12") == 0.5
    assert m.count_score("There are 5 or 6 paragraphs", "5") == 0.5
    assert m.count_score("five", "5") == 0.0


def test_code_sim():
    # first line without ` # // is "    return x + 1" ; ratio with "    return x+1" = 93
    assert m.code_sim_score("\n# comment\n    return x + 1", "    return x+1") == approx(0.93)
    assert m.code_sim_score("", "x = 1") == 0.0
    assert m.code_sim_score("```python", "x = 1") == 0.0  # every line skipped -> ""


def test_longbench_max_over_answers_and_first_line():
    assert score_one("hotpotqa", "Paris", ["London", "Paris"], None) == 1.0
    assert score_one("hotpotqa", "", ["London", "Paris"], None) == 0.0
    # triviaqa keeps only the first line of the prediction
    assert score_one("triviaqa", "\nParis\nLondon", ["London"], None) == 0.0
    assert score_one("trec", "Location\nCity", ["Location"], ["Location", "City"]) == 1.0


# ----------------------------------------------------------------------------- RULER


def test_string_match():
    assert m.string_match_all("Values: 123, 456", ["123", "456", "789"]) == approx(2 / 3)
    assert m.string_match_all("", ["1"]) == 0.0
    assert m.string_match_all("ABC-Def", ["abc-def"]) == 1.0  # case-insensitive
    assert m.string_match_part("it is Paris", ["paris", "Lyon"]) == 1.0
    assert m.string_match_part("", ["paris"]) == 0.0
    assert m.ruler_postprocess("  a\tb\x01c \n") == "a\nb\nc"


# ----------------------------------------------------------------------------- InfiniteBench


def test_infinitebench_scorers():
    assert m.ib_passkey("The pass key is 71432.", "71432") == 1.0
    assert m.ib_passkey("key 7143 2", "71432") == 0.0
    assert m.ib_passkey("", "1") == 0.0
    assert m.ib_kv_retrieval('"a1b2-c3": "9f8e-7d"', "9f8e-7d") == 1.0
    assert m.ib_kv_retrieval("9f8e", "9f8e-7d") == 0.0
    assert m.ib_code_run("The return value is: -12.", -12) == 1.0
    assert m.ib_code_run("12 then 13", 12) == 0.0
    assert m.ib_code_run("", 1) == 0.0
    assert m.ib_code_debug("B. foo", "foo", "B") == 1.0
    assert m.ib_code_debug("The answer is: foo", "foo", "B") == 1.0
    assert m.ib_code_debug("The answer is: bar", "foo", "B") == 0.0
    assert m.ib_math_find("The max is 94.", 94) == 1.0
    assert m.ib_math_find("2.5 ok", 2.5) == 1.0
    assert m.ib_math_find("none", 3) == 0.0
    assert m.ib_longdialogue_qa("It is John.", "JOHN") == 1.0
    assert m.ib_longdialogue_qa("", "JOHN") == 0.0
    assert m.ib_choice("C) because", ["text", "C"]) == 1.0
    assert m.ib_choice("The answer is: B", ["text", "B"]) == 1.0
    assert m.ib_choice("I pick D", ["text", "D"]) == 1.0
    assert m.ib_choice("", ["text", "D"]) == 0.0
    assert m.ib_qa_f1("the Paris", ["London", "paris"]) == 1.0


# ----------------------------------------------------------------------------- LongBench v2


def test_extract_choice():
    assert m.extract_choice("The correct answer is (C)") == "C"
    assert m.extract_choice("**The correct answer is B**") == "B"
    assert m.extract_choice("I think C") is None
    assert m.extract_choice("") is None


# ----------------------------------------------------------------------------- LooGLE


def test_cloze_match_never_evaluates_code():
    ref = {"<mask-0>": "Bob Smith", "<mask-1>": "Paris"}
    assert m.cloze_match("{'<mask-0>': 'Bob Smith', '<mask-1>': 'Lyon'}", ref) == (1, 1, 2)
    assert m.cloze_match('{"<mask-0>": "Bob", "<mask-1>": "Paris"}', ref) == (1, 2, 2)
    assert m.cloze_match("", ref) == (0, 0, 2)
    assert m.cloze_match("__import__('os').system('echo pwned')", ref) == (0, 0, 2)


def test_bleu_and_rouge_recall():
    # 3 of 4 hypothesis unigrams in the reference, hyp shorter (4 < 5): BP = exp(1 - 5/4)
    import math

    assert m.sentence_bleu_n("a b c x", "a b c d e", 1) == approx(0.75 * math.exp(-0.25))
    assert m.sentence_bleu_n("a b c d", "a b c d", 4) == 1.0
    assert m.sentence_bleu_n("", "a", 1) == 0.0
    r1, r2, rl = m.rouge_all("a b", "a b c d")
    assert (r1, r2, rl) == (approx(0.5), approx(1 / 3), approx(0.5))
    assert m.rouge_all("", "a") == (0.0, 0.0, 0.0)


# ----------------------------------------------------------------------------- AIME


def test_boxed_integer():
    assert m.boxed_integer(r"first \boxed{12}, finally \boxed{033}") == 33
    assert m.boxed_integer(r"\boxed{\frac{1}{2}}") is None
    assert m.boxed_integer(r"\boxed{1,000}") == 1000
    assert m.boxed_integer("no box") is None
    assert m.boxed_integer_match(r"so \boxed{ 204 }", "204") == 1.0
    assert m.boxed_integer_match("", "204") == 0.0


def test_mean_percent():
    assert m.mean_percent([]) is None
    assert m.mean_percent([1.0, 0.0, 0.5]) == 50.0
