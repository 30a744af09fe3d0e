"""Each benchmark's load + score on its fixture files (official row formats), and its YAML."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from sa_bench.benchmarks.base import Benchmark
from sa_bench.benchmarks.data import DataNotFoundError, split_prompt
from sa_bench.config import ConfigError, build_target
from tests.conftest import FIXTURES, ROOT


def make(config: str, **overrides: Any) -> Any:
    """Build the benchmark of `conf/benchmark/<config>.yaml` with overrides, as the runner does."""
    data = yaml.safe_load((ROOT / "conf" / "benchmark" / f"{config}.yaml").read_text())
    data.update(overrides)
    return build_target(data, "benchmark", Benchmark)


@pytest.fixture(scope="session")
def byte_tokenizer():
    """A byte-level BPE tokenizer without merges (one token per byte), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<s>": 0, "</s>": 1}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def n_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


# ----------------------------------------------------------------------------- shared


@pytest.mark.parametrize(
    "config",
    ["longbench", "longbench_e", "niah", "ruler", "longbench_v2", "infinitebench", "loogle",
     "aime24", "aime25"],
)  # fmt: skip
def test_yaml_builds_and_declares_every_key(config):
    path = ROOT / "conf" / "benchmark" / f"{config}.yaml"
    if not path.exists():
        pytest.skip(f"{config}.yaml not written yet")
    data = yaml.safe_load(path.read_text())
    for key in ("name", "subsets", "subset", "data_dir", "data_files", "revision", "max_samples",
                "seed"):
        assert key in data, key
    assert data["name"] == config
    bench = make(config, subset=data["subsets"][0])
    assert bench.max_new_tokens() > 0
    with pytest.raises(ConfigError, match="subset"):
        make(config, subset="no_such_subset")
    with pytest.raises(ConfigError, match="unknown key"):
        make(config, no_such_key=1)


def test_split_prompt_round_trip():
    template = "Read {context}\n\nQ: {input} (about {context})"
    ctx, q = split_prompt(template, context="DOC {x}", input="why?")
    assert ctx == "Read DOC {x}"
    assert ctx + q == template.format(context="DOC {x}", input="why?")


# ----------------------------------------------------------------------------- LongBench


LB = FIXTURES / "longbench"


def test_longbench_load_prompt_and_score():
    bench = make("longbench", subset="hotpotqa", data_dir=str(LB))
    samples = bench.load(None)
    assert len(samples) == 2 and bench.max_new_tokens() == 32
    s = samples[0]
    assert s.chat is True and s.id == "hq0"
    assert s.context.startswith("Answer the question based on the given passages.")
    assert s.context.endswith("Babbage designed the Analytical Engine.")
    assert s.question.endswith("Question: Where was Ada Lovelace born?\nAnswer:")
    result = bench.score(samples, ["London", "It is in Asia"])
    assert result["score"] == 50.0


@pytest.mark.parametrize(
    "subset,predictions,expected,chat",
    [
        ("multifieldqa_zh", ["北京"], 100.0, True),
        ("trec", ["City\nIndividual"], 100.0, False),  # first line only
        ("passage_count", ["2"], 100.0, True),
        ("passage_retrieval_en", ["Paragraph 2"], 100.0, True),
        ("lcc", ["    return a + b\n"], 100.0, False),
        ("dureader", [""], 0.0, True),
    ],
)
def test_longbench_subsets(subset, predictions, expected, chat):
    bench = make("longbench", subset=subset, data_dir=str(LB))
    samples = bench.load(None)
    assert all(s.chat is chat for s in samples)
    assert bench.score(samples, predictions)["score"] == expected


def test_longbench_every_official_template_formats(tmp_path):
    """All 21 subsets load from a folder of official-format rows and score an empty answer."""
    bench = make("longbench", subset="narrativeqa")
    for subset in bench.subsets:
        row = {"input": "q?", "context": "DOC", "answers": ["a"], "length": 3, "dataset": subset,
               "language": "en", "all_classes": ["a", "b"], "_id": "x"}  # fmt: skip
        (tmp_path / f"{subset}.jsonl").write_text(json.dumps(row) + "\n")
        b = make("longbench", subset=subset, data_dir=str(tmp_path))
        (s,) = b.load(None)
        assert "DOC" in s.context and "{" not in s.question.replace("{}", "")
        assert b.score([s], [""])["score"] == 0.0


def test_longbench_e_buckets():
    bench = make("longbench_e", subset="hotpotqa", data_dir=str(LB))
    samples = bench.load(None)
    result = bench.score(samples, ["Paris", "no", "Madrid"])
    assert result["0-4k"] == 100.0 and result["4-8k"] == 0.0
    assert result["8k+"] is None and result["n_8k+"] == 0  # empty bucket, no division by zero
    assert result["score"] == pytest.approx(66.67)


def test_longbench_e_bucket_rounds_like_scorer_e():
    """scorer_e: round(100 * np.mean(bucket), 2); eval.py's overall: round(100 * sum / len, 2).
    passage_count scores the fraction of predicted numbers equal to the gold count."""
    from sa_bench.benchmarks.base import Sample

    bench = make("longbench_e", subset="passage_count")
    predictions = ["5 1 2 3 4 6 7 8 9 0", "5 1 2 3 4 6 7 8 9 0", "5 1 2 3", "5",
                   "5 5 5 5 5 5 5 1 2 3", "5 1 2", "5 5 1", "1"]  # 0.1 0.1 0.25 1 0.7 1/3 2/3 0
    samples = [Sample(str(i), "c", "q", ["5"], meta={"length": 100}) for i in range(8)]
    result = bench.score(samples, predictions)
    assert result["0-4k"] == 39.37 and result["score"] == 39.38


def test_longbench_max_samples_is_reproducible():
    a = make("longbench_e", subset="hotpotqa", data_dir=str(LB), max_samples=2, seed=3).load(None)
    b = make("longbench_e", subset="hotpotqa", data_dir=str(LB), max_samples=2, seed=3).load(None)
    assert [s.id for s in a] == [s.id for s in b] and len(a) == 2


def test_longbench_missing_data_names_files(tmp_path):
    bench = make("longbench", subset="qasper", data_dir=str(tmp_path))
    with pytest.raises(DataNotFoundError, match=r"qasper\.jsonl.*data\.zip"):
        bench.load(None)
    bench = make("longbench", subset="qasper", data_files=str(tmp_path / "x.jsonl"))
    with pytest.raises(FileNotFoundError, match="x.jsonl"):
        bench.load(None)


def test_longbench_reads_parquet(tmp_path):
    import datasets

    rows = [json.loads(line) for line in (LB / "hotpotqa.jsonl").read_text().splitlines()]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "hotpotqa.parquet"))
    samples = make("longbench", subset="hotpotqa", data_dir=str(tmp_path)).load(None)
    assert [s.id for s in samples] == ["hq0", "hq1"]


# ----------------------------------------------------------------------------- RULER


RULER_SYNTHETIC = ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1",
                   "niah_multikey_2", "niah_multikey_3", "niah_multivalue", "niah_multiquery",
                   "vt", "cwe", "fwe"]  # fmt: skip


@pytest.mark.parametrize("task", RULER_SYNTHETIC)
def test_ruler_synthetic_tasks(task, byte_tokenizer):
    bench = make("ruler", subset=task, length=2048, max_samples=2)
    samples = bench.load(byte_tokenizer)
    budget = 2048 - bench.max_new_tokens()
    assert len(samples) == 2
    for s in samples:
        n = n_tokens(byte_tokenizer, s.context + s.question)
        assert 0.85 * budget <= n <= budget, (n, budget)
        assert s.answers and s.answer_prefix
        if task.startswith("niah"):
            assert all(a in s.context for a in s.answers)
    perfect = bench.score(samples, [" ".join(s.answers) for s in samples])
    assert perfect["score"] == 100.0 and perfect["metric"] == "string_match_all"
    assert bench.score(samples, ["", ""])["score"] == 0.0
    again = make("ruler", subset=task, length=2048, max_samples=2).load(byte_tokenizer)
    assert [(s.context, s.answers) for s in again] == [(s.context, s.answers) for s in samples]


def test_ruler_answers_are_right(byte_tokenizer):
    (s,) = make("ruler", subset="vt", length=2048, max_samples=1).load(byte_tokenizer)
    # current upstream wording (typo "assgined" fixed in NVIDIA/RULER 4a216f4, 2025-05-13)
    assert s.answer_prefix.startswith(" Answer: According to the chain(s) of variable assignment "
                                      "in the text above, 5 variables are assigned the value ")
    assert "are assigned the value" in s.context and "assgined" not in s.context + s.answer_prefix
    value = s.question.split("the value ")[1].split(" ")[0]
    assert f"VAR {s.answers[0]} = {value}" in s.context
    (s,) = make("ruler", subset="cwe", length=2048, max_samples=1).load(byte_tokenizer)
    listing = s.context.split("\n")[-1]  # the real list, after the in-context example
    counts = {w: listing.count(f". {w} ") + listing.endswith(f". {w}") for w in s.answers}
    assert min(counts.values()) == 6  # below 4k tokens the common words appear 6 times


@pytest.mark.parametrize("task,predictions,expected", [("qa_1", ["France", "", "It is 8"], 66.67),
                                                       ("qa_2", ["paris", "Spree"], 100.0)])
def test_ruler_qa_from_local_files(task, predictions, expected, byte_tokenizer):
    bench = make("ruler", subset=task, length=800, data_dir=str(FIXTURES / "ruler"))
    samples = bench.load(byte_tokenizer)
    assert len(samples) == len(predictions)
    assert all(any(a in s.context for a in s.answers) for s in samples)
    assert all(n_tokens(byte_tokenizer, s.context + s.question) <= 800 - 32 for s in samples)
    result = bench.score(samples, predictions)
    assert result["score"] == expected and result["metric"] == "string_match_part"


def test_ruler_score_rounds_like_ruler():
    """RULER: round(sum / len * 100, 2): 23 of 160 is 14.37 there (100 * 23 / 160 = 14.375)."""
    from sa_bench.benchmarks.base import Sample

    bench = make("ruler", subset="niah_single_1")
    samples = [Sample(str(i), "c", "q", ["7"]) for i in range(160)]
    assert bench.score(samples, ["7"] * 23 + [""] * 137)["score"] == 14.37


def test_ruler_qa_missing_file(tmp_path, byte_tokenizer):
    with pytest.raises(DataNotFoundError, match=r"squad\.json.*dev-v2\.0\.json"):
        make("ruler", subset="qa_1", data_dir=str(tmp_path)).load(byte_tokenizer)


def test_ruler_config_checks():
    with pytest.raises(ConfigError, match="length"):
        make("ruler", subset="vt", length=10)


# ----------------------------------------------------------------------------- NIAH


def test_niah_exact_length_and_depths(byte_tokenizer):
    bench = make("niah", subset="1k", depths=[0, 50, 100], samples_per_depth=2)
    samples = bench.load(byte_tokenizer)
    assert len(samples) == 6
    for s in samples:
        assert 1000 <= n_tokens(byte_tokenizer, s.context + s.question) <= 1024
        from sa_bench.benchmarks.niah import INTRO

        hay = s.context[len(INTRO) :]
        needle = hay.index("The special magic number for")
        where = needle / (len(hay) - len(f"The special magic number for x is: {s.answers[0]}."))
        assert abs(where - s.meta["depth"] / 100) < 0.1
    result = bench.score(samples, [s.answers[0] if s.meta["depth"] == 0 else "" for s in samples])
    assert result["depth_0"] == 100.0 and result["depth_50"] == 0.0
    assert result["score"] == pytest.approx(33.33)


def test_niah_noise_and_max_samples(byte_tokenizer):
    a = make("niah", subset="1k", haystack="noise", max_samples=4).load(byte_tokenizer)
    b = make("niah", subset="1k", haystack="noise", max_samples=4).load(byte_tokenizer)
    assert len(a) == 4 and [s.context for s in a] == [s.context for s in b]
    assert "The grass is green." in a[0].context


def test_niah_config_checks():
    with pytest.raises(ConfigError, match="depths"):
        make("niah", subset="1k", depths=[150])


@pytest.mark.parametrize("key", ["data_files", "data_dir"])
@pytest.mark.parametrize("config, subsets, message", [
    ("passkey", ["1k"], "passkey generates its samples and reads no data files"),
    ("niah", ["1k"], "niah generates its samples and reads no data files"),
    ("ruler", ["vt", "cwe"], "ruler reads data files only for qa_1 and qa_2, and subsets lists "
                             "neither"),
])
def test_generated_benchmarks_refuse_data_files_they_would_ignore(config, subsets, message, key):
    with pytest.raises(ConfigError, match=rf"^benchmark\.{key}: {message}.*remove "
                                          rf"benchmark\.{key}=/some/data$"):
        make(config, subsets=subsets, subset=subsets[0], **{key: "/some/data"})
    make(config, subsets=subsets, subset=subsets[0], **{key: None})
    if config == "ruler":  # a sweep over tasks where qa_1 reads the file: allowed for each task
        make(config, subsets=["vt", "qa_1"], subset="vt", **{key: "/some/data"})


# ----------------------------------------------------------------------------- LongBench v2


def test_longbench_v2_accuracy_by_group():
    bench = make("longbench_v2", subset="all", data_dir=str(FIXTURES / "longbench_v2"))
    samples = bench.load(None)
    assert len(samples) == 3 and bench.max_new_tokens() == 128
    assert samples[0].context.endswith("The correct option is A.")
    assert "(D) Option four" in samples[0].question
    preds = ["The correct answer is (A)", "**The correct answer is C**", ""]
    result = bench.score(samples, preds)
    assert result["score"] == 33.3  # one decimal, as result.py; the empty output counts as wrong
    assert result["n_empty"] == 1 and result["score_without_empty"] == 50.0  # as pred.py/result.py
    assert result["empty_outputs"] == "counted as wrong"
    assert result["decoding"] == "greedy (official: temperature 0.1)"  # says how it differs
    assert result["easy"] == 100.0 and result["hard"] == 0.0
    assert result["short"] == 50.0 and result["medium"] == 0.0
    assert result["long"] is None and result["n_long"] == 0  # empty bucket, no division by zero
    assert result["domain_single_document_qa"] == 50.0


def test_longbench_v2_breakdowns_also_as_the_official_scripts_print_them():
    """pred.py drops an empty output, so result.py's easy/hard and short/medium/long figures are
    over the non-empty answers: each breakdown is reported that way too, beside the counted one."""
    bench = make("longbench_v2", subset="all", data_dir=str(FIXTURES / "longbench_v2"))
    samples = bench.load(None)  # (easy, short, A), (hard, short, B), (hard, medium, C)
    result = bench.score(samples, ["The correct answer is (A)", "The correct answer is (B)", ""])
    assert result["score"] == 66.7 and result["score_without_empty"] == 100.0
    assert result["hard"] == 50.0 and result["hard_without_empty"] == 100.0
    assert result["n_hard"] == 2 and result["n_hard_without_empty"] == 1
    assert result["easy"] == result["easy_without_empty"] == 100.0
    assert result["short"] == result["short_without_empty"] == 100.0
    assert result["medium"] == 0.0 and result["medium_without_empty"] is None  # only an empty one
    assert result["n_medium_without_empty"] == 0
    assert result["long_without_empty"] is None
    assert result["domain_code_repository_understanding"] == 0.0
    assert result["domain_code_repository_understanding_without_empty"] is None
    assert result["domain_single_document_qa_without_empty"] == 100.0


# ----------------------------------------------------------------------------- InfiniteBench


@pytest.mark.parametrize(
    "task,right,wrong",
    [
        ("passkey", " 71432.", " 7143"),
        ("number_string", " 9876543210", " 987654321"),
        ("kv_retrieval", '"9f8e-7d6c"', "3333-4444"),
        ("code_run", " -12", " 12"),
        ("code_debug", "B. bad", "A"),
        ("math_find", " 12", " 94"),
        ("longbook_qa_eng", "Kell", ""),
        ("longbook_choice_eng", " B", " A"),
        ("longdialogue_qa_eng", " John.", " Mary"),
        ("longbook_sum_eng", "Mira sails to Kell.\nShe finds her brother and they sail home.", ""),
        ("longbook_qa_chn", "她的哥哥。", "米拉"),
        ("math_calc", " [42, 40, 47]", " [12, 42, 40, 47]"),
    ],
)
def test_infinitebench_tasks(task, right, wrong):
    bench = make("infinitebench", subset=task, data_dir=str(FIXTURES / "infinitebench"))
    (s,) = bench.load(None)
    assert s.context and s.question and bench.max_new_tokens() > 0
    assert "{" not in s.question.replace("{}", "") or task == "kv_retrieval"
    assert bench.score([s], [right])["score"] == 100.0
    assert bench.score([s], [wrong])["score"] == 0.0


def test_infinitebench_prompt_details():
    (s,) = make("infinitebench", subset="code_run", data_dir=str(FIXTURES / "infinitebench")).load(None)
    assert s.context.startswith("There is a function called func_2 in")
    assert s.question.endswith("The value of func_2(-3) is")
    # official: the greedy "The .+ of" of the input, lower-cased, without its " of"
    (s,) = make("infinitebench", subset="math_find", data_dir=str(FIXTURES / "infinitebench")).load(None)
    assert s.context.startswith("What is the second largest number in the following list?\n\n[3,")
    (s,) = make("infinitebench", subset="passkey", data_dir=str(FIXTURES / "infinitebench")).load(None)
    assert s.context.startswith(
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
        "it. I will quiz you about the important information.\n\n"
    )
    assert s.question == "\n\nWhat is the pass key?\n\nThe pass key is"
    (s,) = make("infinitebench", subset="math_calc", data_dir=str(FIXTURES / "infinitebench")).load(None)
    assert s.context.endswith("Values: [8, 5, 7, 3]\n\nExpression: 12 + 30 - 2 + 7")
    assert s.question == "\nValues:" and s.meta["label"] == [42, 40, 47]
    (s,) = make("infinitebench", subset="longbook_qa_chn", data_dir=str(FIXTURES / "infinitebench")).load(None)
    assert s.context.startswith("阅读以下书籍然后回答问题。\n\n从前")
    assert s.question == "\n\n问题：米拉在凯尔岛找到了谁？\n答案："
    (s,) = make("infinitebench", subset="longbook_sum_eng", data_dir=str(FIXTURES / "infinitebench")).load(None)
    assert s.context.startswith("Summarize the book below.\n\nOnce") and s.question == "\n\nSummary:"
    assert [make("infinitebench", subset=t).max_new_tokens()
            for t in ("longbook_sum_eng", "longbook_qa_chn", "math_calc")] == [1200, 40, 30000]


def test_infinitebench_raw_prompt_without_chat_template(byte_tokenizer):
    """The official scripts for open models generate from the raw prompt; the model's chat
    template only where benchmark.chat_template=true."""
    from sa_bench.models.prompting import build_request

    tok = byte_tokenizer.__class__(tokenizer_object=byte_tokenizer.backend_tokenizer,
                                   bos_token="<s>", eos_token="</s>")
    tok.chat_template = "<|user|>{{ messages[0]['content'] }}<|assistant|>"
    for chat_template, expected in [(False, "\n\nThe pass key is"),
                                    (True, "\n\nThe pass key is<|assistant|>")]:
        bench = make("infinitebench", subset="passkey", data_dir=str(FIXTURES / "infinitebench"),
                     chat_template=chat_template)
        (s,) = bench.load(None)
        assert s.chat is chat_template
        request = build_request(s, tok, True, 10_000)
        assert tok.decode(request.question_ids).endswith(expected)
        assert tok.decode(request.context_ids).startswith("<|user|>") is chat_template
    assert make("infinitebench", subset="passkey").chat_template is False  # the YAML's default


def test_infinitebench_kv_retrieval_label_as_stored(tmp_path):
    """The official kv_retrieval.jsonl stores the value string; officially `label in words`.
    A list there would score 0 on every row officially: it is refused, naming the row."""
    row = json.loads((FIXTURES / "infinitebench" / "kv_retrieval.jsonl").read_text())
    assert isinstance(row["answer"], str)
    (tmp_path / "kv_retrieval.jsonl").write_text(json.dumps({**row, "answer": [row["answer"]]}))
    bench = make("infinitebench", subset="kv_retrieval", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="kv_retrieval row 0: `answer` is"):
        bench.load(None)


def test_infinitebench_choice_tasks_score_stripped_predictions():
    bench = make("infinitebench", subset="code_debug", data_dir=str(FIXTURES / "infinitebench"))
    (s,) = bench.load(None)
    assert s.meta["label"] == ["bad", "B"]
    assert bench.score([s, s, s], ["\nB.", " B. bad", " A."])["score"] == pytest.approx(66.67)
    bench = make("infinitebench", subset="longbook_choice_eng", data_dir=str(FIXTURES / "infinitebench"))
    (s,) = bench.load(None)
    # the option text itself; the first letter before any "answer is:"; a wrong first letter
    assert bench.score([s, s, s], ["Kell", " B. but the answer is: A", " A. no, B"])["score"] == 66.67


# ----------------------------------------------------------------------------- LooGLE


def test_loogle_qa_shares_document_and_scores():
    bench = make("loogle", subset="shortdep_qa", data_dir=str(FIXTURES / "loogle"))
    samples = bench.load(None)
    assert len(samples) == 2 and samples[0].context == samples[1].context  # one prefill
    assert samples[0].question == "\nQuestion: Who did Ada Lovelace work with?\nAnswer: "
    assert not samples[0].chat
    perfect = bench.score(samples, [s.answers[0] for s in samples])
    assert perfect["score"] == 100.0 and perfect["bleu1"] == 100.0
    assert bench.score(samples, ["", ""])["score"] == 0.0


def test_loogle_cloze_and_summary():
    bench = make("loogle", subset="shortdep_cloze", data_dir=str(FIXTURES / "loogle"))
    (s,) = bench.load(None)
    assert "{'<mask-0>': 'Bob'" in s.context  # the template's literal braces survive
    pred = "{'<mask-0>': 'Ada Lovelace', '<mask-1>': 'Babbage'}"
    result = bench.score([s], [pred])
    assert result["score"] == 50.0 and result["partial_match"] == 100.0
    assert bench.score([s], ["open('/etc/passwd')"])["score"] == 0.0
    assert bench.score([s], [" " + pred])["score"] == 50.0  # eval skips a leading space
    assert bench.score([s], ["\n " + pred])["score"] == 0.0  # ... not an indented line
    bench = make("loogle", subset="longdep_summarization", data_dir=str(FIXTURES / "loogle"))
    (s,) = bench.load(None)
    assert s.answers == ["Ada Lovelace wrote the first algorithm with Babbage."]
    assert bench.score([s], [s.answers[0]])["score"] == 100.0


# ----------------------------------------------------------------------------- AIME


@pytest.mark.parametrize("config,n", [("aime24", 2), ("aime25", 1)])
def test_aime(config, n):
    bench = make(config, subset="all", data_dir=str(FIXTURES / "aime"))
    samples = bench.load(None)
    assert len(samples) == n and "\\boxed{}" in samples[0].question
    right = [f"so \\boxed{{{s.answers[0]}}}" for s in samples]
    assert bench.score(samples, right)["score"] == 100.0
    assert bench.score(samples, ["\\boxed{7} then \\boxed{999}"] * n)["score"] == 0.0


@pytest.mark.parametrize("config", ["longbench", "longbench_e", "ruler", "infinitebench", "loogle"])
def test_unknown_subset_is_refused(config):
    data = yaml.safe_load((ROOT / "conf" / "benchmark" / f"{config}.yaml").read_text())
    data["subsets"] = [data["subsets"][0], "no_such_subset"]
    with pytest.raises(ConfigError, match=r"benchmark\.subsets: unknown .*\['no_such_subset'\]"):
        build_target(data, "benchmark")


@pytest.mark.parametrize("config,subset,file,drop,message", [
    ("infinitebench", "longbook_choice_eng", "infinitebench/longbook_choice_eng.jsonl", "options",
     "missing field 'options'"),
    ("infinitebench", "code_run", "infinitebench/code_run.jsonl", "input", "missing field 'input'"),
    ("infinitebench", "passkey", "infinitebench/passkey.jsonl", "answer", "missing field 'answer'"),
    ("longbench_v2", "all", "longbench_v2/data.json", "choice_C",
     "(missing field 'choice_C'|field 'choice_C' should be str, got NoneType 'None')"),
    ("loogle", "longdep_qa", "loogle/longdep_qa.jsonl", "input",
     "(missing field 'input' or 'context'|field 'input' should be str, got NoneType 'None')"),
    ("aime24", "all", "aime/aime24.jsonl", "problem",
     "(missing field 'problem' or 'question'|field 'problem' should be str, got NoneType 'None')"),
])
def test_a_row_without_a_field_the_benchmark_reads_is_named(tmp_path, config, subset, file, drop,
                                                            message):
    from sa_bench.benchmarks.data import BadRowError, read_rows

    rows = read_rows(FIXTURES / file)
    rows[0].pop(drop)
    target = tmp_path / (Path(file).stem + ".jsonl")
    target.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench = make(config, subset=subset, data_dir=str(tmp_path))
    with pytest.raises(BadRowError, match=rf"^{target}: row 1: {message}$"):
        bench.load(None)


# ----------------------------------------------------------------------------- hub revision

HUB_CELLS = [  # config, subset, the fixture the fake hub serves, (repo, file or config) fetched
    ("longbench", "hotpotqa", "longbench/hotpotqa.jsonl", ("THUDM/LongBench", "data.zip")),
    ("longbench_e", "hotpotqa", "longbench/hotpotqa_e.jsonl", ("THUDM/LongBench", "data.zip")),
    ("zero_scrolls", "qasper", "zero_scrolls/qasper/validation.jsonl",
     ("tau/zero_scrolls", "qasper.zip")),
    ("infinitebench", "kv_retrieval", "infinitebench/kv_retrieval.jsonl",
     ("xinrongzhang2022/InfiniteBench", "kv_retrieval.jsonl")),
    ("longbench_v2", "all", "longbench_v2/data.json", ("THUDM/LongBench-v2", None)),
    ("loogle", "shortdep_qa", "loogle/shortdep_qa.jsonl", ("bigainlco/LooGLE", "shortdep_qa")),
    ("aime24", "all", "aime/aime24.jsonl", ("HuggingFaceH4/aime_2024", None)),
    ("aime25", "all", "aime/aime25.jsonl", ("math-ai/aime25", None)),
]


def fake_hub(monkeypatch, tmp_path: Path, fixture: Path) -> list[tuple[str, str | None, Any]]:
    """`hf_hub_download` and `datasets.load_dataset` of a hub repository serve `fixture`
    (a zip holds it under the member name the benchmark asks for, in a folder per revision);
    returns the (repo, file or config, revision) of every fetch."""
    import zipfile

    import datasets
    import huggingface_hub

    from sa_bench.benchmarks.data import read_rows

    fetched: list[tuple[str, str | None, Any]] = []
    load_dataset = datasets.load_dataset

    def download(repo_id, filename, repo_type=None, revision=None, **kw):
        assert repo_type == "dataset"
        fetched.append((repo_id, filename, revision))
        if not filename.endswith(".zip"):
            return str(fixture)
        archive = tmp_path / str(revision) / filename
        archive.parent.mkdir(exist_ok=True)
        # LongBench's data.zip holds data/<name>.jsonl; Zero-SCROLLS' <task>.zip <task>/validation.jsonl
        member = f"data/{fixture.name}" if filename == "data.zip" else f"qasper/{fixture.name}"
        with zipfile.ZipFile(archive, "w") as zf:
            zf.write(fixture, member)
        return str(archive)

    def hub_or_local(path, name=None, **kw):
        if path in ("json", "parquet"):  # a local file (read_rows)
            return load_dataset(path, name, **kw)
        fetched.append((path, name, kw.get("revision")))
        rows = read_rows(fixture)
        return type("Rows", (), {"to_list": lambda self: rows})()

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(datasets, "load_dataset", hub_or_local)
    return fetched


@pytest.mark.parametrize("revision", [None, "0123abc"])
@pytest.mark.parametrize("config,subset,fixture,fetch", HUB_CELLS)
def test_the_revision_reaches_every_hub_fetch(monkeypatch, tmp_path, config, subset, fixture,
                                              fetch, revision):
    fetched = fake_hub(monkeypatch, tmp_path, FIXTURES / fixture)
    bench = make(config, subset=subset, revision=revision)
    assert bench.load(None)
    assert fetched == [(*fetch, revision)]


@pytest.mark.parametrize("config,subset,reason", [
    ("passkey", "1k", "passkey generates its samples and reads no hub dataset"),
    ("niah", "1k", "niah generates its samples and reads no hub dataset"),
    ("loft", "nq_32k", r"loft reads local files only \(LOFT is not on the hub\)"),
    ("ruler", "qa_1", r"ruler reads two hub datasets \(qa_1 rajpurkar/squad_v2, qa_2 "
                      r"hotpotqa/hotpot_qa\) and its other tasks none"),
    ("ruler", "vt", "ruler reads two hub datasets"),
])
def test_a_revision_is_refused_where_it_pins_no_one_hub_dataset(config, subset, reason):
    with pytest.raises(ConfigError, match=rf"^benchmark\.revision: {reason}.*; remove "
                                          r"benchmark\.revision=0123abc$"):
        make(config, subset=subset, revision="0123abc")
    make(config, subset=subset, revision=None)


@pytest.mark.parametrize("key", ["data_files", "data_dir"])
def test_a_revision_with_local_data_is_refused(key):
    """Local files are read instead of the hub (and keyed by their content): a revision
    would pin nothing, and only split the cell's key."""
    local = str(FIXTURES / "longbench" / ("hotpotqa.jsonl" if key == "data_files" else ""))
    with pytest.raises(ConfigError, match=rf"^benchmark\.revision: pins the hub dataset, but "
                                          rf"benchmark\.{key}=.* reads local files instead"):
        make("longbench", subset="hotpotqa", revision="0123abc", **{key: local})
    with pytest.raises(ConfigError, match=r"^benchmark\.revision: expected a commit"):
        make("longbench", subset="hotpotqa", revision="")
