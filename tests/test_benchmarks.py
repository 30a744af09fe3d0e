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

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"


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
    for key in ("name", "subsets", "subset", "data_dir", "data_files", "max_samples", "seed"):
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
