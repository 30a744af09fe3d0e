"""Zero-SCROLLS and LOFT RAG: loading, prompts, truncation and scorers against fixtures produced
by running the official code (each fixture says which code and commit)."""

from __future__ import annotations

import json

import pytest
import yaml

from sa_bench.benchmarks import metrics as m
from sa_bench.benchmarks.base import Sample
from sa_bench.benchmarks.data import BadRowError, DataNotFoundError, read_rows
from sa_bench.benchmarks.loft import extract_answers, score_output
from sa_bench.benchmarks.zero_scrolls import score_outputs
from sa_bench.config import ConfigError
from sa_bench.models.prompting import build_request
from tests.conftest import FIXTURES, ROOT
from tests.unit.benchmarks.test_benchmarks import byte_tokenizer, make  # noqa: F401 - byte_tokenizer: a fixture

ZS_PARITY = json.loads((FIXTURES / "zero_scrolls" / "metric_parity.json").read_text())["cases"]
LOFT_OFFICIAL = json.loads((FIXTURES / "loft" / "official_outputs.json").read_text())


@pytest.mark.parametrize("config", ["zero_scrolls", "loft"])
def test_yaml_builds_and_refuses_unknown_subsets_and_keys(config):
    data = yaml.safe_load((ROOT / "conf" / "benchmark" / f"{config}.yaml").read_text())
    assert data["name"] == config
    for subset in data["subsets"]:
        assert make(config, subset=subset).max_new_tokens() > 0
    with pytest.raises(ConfigError, match="unknown"):
        make(config, subsets=["no_such_subset"])
    with pytest.raises(ConfigError, match="unknown key"):
        make(config, no_such_key=1)


# ----------------------------------------------------------------------------- Zero-SCROLLS


def test_zero_scrolls_rows_of_one_id_are_one_example_with_every_reference():
    bench = make("zero_scrolls", subset="qasper", data_dir=str(FIXTURES / "zero_scrolls"))
    samples = bench.load(None)
    rows = read_rows(FIXTURES / "zero_scrolls" / "qasper" / "validation.jsonl")
    assert [s.id for s in samples] == ["qasper_1", "qasper_2"]
    assert samples[0].answers == [rows[0]["output"], rows[1]["output"]]
    assert samples[0].context + samples[0].question == rows[0]["input"]  # the official prompt
    assert samples[0].question.startswith("Question:\n") and samples[0].question.endswith("Answer:")
    assert samples[0].context == samples[1].context  # one paper: one shared prefill
    assert samples[0].truncation_separator == rows[0]["truncation_seperator"]
    assert bench.max_new_tokens() == 128
    assert bench.data_dir_files() == [FIXTURES / "zero_scrolls" / "qasper" / "validation.jsonl"]
    result = bench.score(samples, ["arXiv, PubMed and BookSum", "12"])
    assert result["score"] == 100.0 and result["split"] == "validation" and result["n"] == 2


def test_zero_scrolls_truncation_keeps_the_document_start_and_the_whole_query(byte_tokenizer):  # noqa: F811
    """As the official run_hf_model.py: document cut at its end, separator, then the query."""
    sample = Sample(id="a", context="Instruction.\n\nArticle:\n" + "x" * 400 + "END",
                    question="Question:\nWhat?\n\nAnswer:", answers=["y"],
                    truncation_separator="... [The rest of the article is omitted]\n\n")
    request = build_request(sample, byte_tokenizer, chat=False, max_prompt_tokens=200)
    text = byte_tokenizer.decode(request.context_ids + request.question_ids, skip_special_tokens=True)
    assert request.truncated and len(request.context_ids) + len(request.question_ids) <= 200
    assert text.startswith("Instruction.\n\nArticle:\nxxx") and "END" not in text
    assert text.endswith("x... [The rest of the article is omitted]\n\nQuestion:\nWhat?\n\nAnswer:")
    short = build_request(sample, byte_tokenizer, chat=False, max_prompt_tokens=1000)
    assert not short.truncated and "omitted" not in byte_tokenizer.decode(short.question_ids)


@pytest.mark.parametrize("case", ZS_PARITY, ids=[c["subset"] for c in ZS_PARITY])
def test_zero_scrolls_scores_equal_the_official_metric_code(case):
    result = score_outputs(case["subset"], case["predictions"], case["references"])
    expected = case["expected"]
    assert result["score"] == pytest.approx(expected["score"], abs=1e-4)
    for key in ("rouge/rouge1", "rouge/rouge2", "rouge/rougeL", "rouge/geometric_mean"):
        if key in expected:
            assert result[key] == pytest.approx(expected[key], abs=1e-4)
    metric = {"f1": m.scrolls_f1, "accuracy": m.scrolls_accuracy,
              "exp_similarity": m.scrolls_exp_similarity,
              "concordance_index": m.scrolls_concordance}.get(case["task"])
    if metric is not None:
        got = [100 * max(metric(p, r) for r in refs)
               for p, refs in zip(case["predictions"], case["references"], strict=True)]
        assert got == pytest.approx(expected["per_sample"], abs=1e-8)


def test_zero_scrolls_rouge_is_the_geometric_mean_of_the_means():
    best = [{"rouge1": 80.0, "rouge2": 10.0, "rougeL": 40.0}, {"rouge1": 20.0, "rouge2": 30.0, "rougeL": 40.0}]
    figures = m.scrolls_rouge_aggregate(best)
    assert figures["geometric_mean"] == round((50.0 * 20.0 * 40.0) ** (1 / 3), 4)
    assert m.scrolls_best_rouge("a b c", ["a b c", "x"])["rouge2"] == 100.0
    assert m.scrolls_concordance("2, 1", "1, 2") == 0.0 and m.scrolls_concordance("1, 2", "2, 1, 3") == 0.0


@pytest.mark.parametrize("field,value,message", [
    ("truncation_seperator", None, "field 'truncation_seperator' should be str, got NoneType 'None'"),
    ("query_start_index", "twelve", "field 'query_start_index' should be int, got str 'twelve'"),
])  # fmt: skip
def test_zero_scrolls_a_bad_row_is_named(tmp_path, field, value, message):
    rows = read_rows(FIXTURES / "zero_scrolls" / "qasper" / "validation.jsonl")
    rows[1][field] = value
    target = tmp_path / "qasper.jsonl"
    target.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench = make("zero_scrolls", subset="qasper", data_dir=str(tmp_path))
    with pytest.raises(BadRowError, match=rf"^{target}: row 2: {message}$"):
        bench.load(None)


# ----------------------------------------------------------------------------- LOFT


@pytest.mark.parametrize("subset", ["nq_32k", "quest_32k"])
def test_loft_prompt_is_the_one_loft_builds(subset):
    bench = make("loft", subset=subset, data_dir=str(FIXTURES / "loft"))
    samples = bench.load(None)
    expected = LOFT_OFFICIAL["prompts"][subset]
    assert [s.id for s in samples] == list(expected)
    for sample in samples:
        assert sample.context + sample.question == expected[sample.id]
    assert len({s.context for s in samples}) == 1  # corpus and examples: one shared prefill
    assert samples[0].question.startswith("====== Now let's start! ======\n")


@pytest.mark.parametrize("dataset", ["nq", "quest"])
def test_loft_scores_equal_loft_evaluation(dataset):
    official = LOFT_OFFICIAL["metrics"][dataset]
    for case in official["cases"]:
        assert extract_answers(case["output"]) == case["extracted"]
        got = score_output(dataset, case["output"], case["answers"])
        assert got == pytest.approx(case["metrics"]), case["output"]
    bench = make("loft", subset=f"{dataset}_32k")
    samples = [Sample(id=str(i), context="", question="", answers=c["answers"])
               for i, c in enumerate(official["cases"])]
    result = bench.score(samples, [c["output"] for c in official["cases"]])
    for key in ("em", "subspan_em", "f1" if dataset == "nq" else "coverage"):
        assert result[key] == pytest.approx(100 * official["aggregate"][key], abs=1e-4)
    assert result["score"] == result["subspan_em"]
    assert result["n_no_answer_list"] == sum(not c["extracted"] for c in official["cases"])


def test_loft_multi_value_subspan_needs_a_distinct_prediction_per_gold_answer():
    assert m.loft_multi_subspan_em(["ab", "a"], ["ab"]) == 0.0
    assert m.loft_multi_subspan_em(["ab", "a"], ["a", "xab"]) == 1.0
    assert m.loft_multi_subspan_em(["a", "ab"], ["ab", "a"]) == 1.0


def test_loft_missing_files_say_how_to_get_them(tmp_path):
    bench = make("loft", subset="hotpotqa_128k", data_dir=str(tmp_path))
    with pytest.raises(DataNotFoundError, match=r"rag/hotpotqa/128k/corpus\.jsonl.*loft-bench"):
        bench.load(None)
    with pytest.raises(ConfigError, match="data_files"):
        make("loft", data_files=str(tmp_path / "x.jsonl"))
    with pytest.raises(ConfigError, match="split"):
        make("loft", split="train")


def test_loft_a_bad_row_is_named(tmp_path):
    target = tmp_path / "rag" / "nq" / "32k"
    target.mkdir(parents=True)
    for file in (FIXTURES / "loft" / "rag" / "nq" / "32k").iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    rows = read_rows(target / "test_queries.jsonl")
    rows[1]["answers"] = "Haliaeetus"
    (target / "test_queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench = make("loft", subset="nq_32k", data_dir=str(tmp_path))
    with pytest.raises(BadRowError, match=rf"^{target / 'test_queries.jsonl'}: row 2: field 'answers' should be list"):
        bench.load(None)


def test_zero_scrolls_reads_the_hub_archive_without_a_data_dir(tmp_path, monkeypatch):
    """The hub path: `<task>.zip` holding `<task>/validation.jsonl` beside the answerless test
    split, read once and extracted next to the archive (the download itself is replaced)."""
    import zipfile

    from sa_bench.benchmarks import data

    official = FIXTURES / "zero_scrolls" / "qasper" / "validation.jsonl"
    archive = tmp_path / "qasper.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("qasper/test.jsonl", '{"id": "t", "input": "x", "output": null}\n')
        zf.write(official, "qasper/validation.jsonl")
    asked = []
    monkeypatch.setattr(data, "hub_file",
                        lambda repo, name, revision: asked.append((repo, name, revision)) or archive)
    from_hub = make("zero_scrolls", subset="qasper").load(None)
    from_dir = make("zero_scrolls", subset="qasper", data_dir=str(FIXTURES / "zero_scrolls")).load(None)
    assert asked == [("tau/zero_scrolls", "qasper.zip", None)]  # no revision: main
    assert [(s.id, s.context, s.question, s.answers) for s in from_hub] == [
        (s.id, s.context, s.question, s.answers) for s in from_dir]
    assert (tmp_path / "qasper.zip.extracted" / "qasper" / "validation.jsonl").is_file()
    assert not (tmp_path / "qasper.zip.extracted" / "qasper" / "test.jsonl").exists()
