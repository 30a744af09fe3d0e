"""Data that would silently corrupt a score: repeated sample ids, malformed rows, a garbage
line in predictions.jsonl. Each is made unique or refused with the file and row named."""

import json

import pytest

from sa_bench.benchmarks.base import Sample, unique_ids
from sa_bench.benchmarks.data import BadRowError, check_rows
from sa_bench.runner import read_predictions
from tests.conftest import FIXTURES, ROOT


def sample(i: str, answer: str = "a") -> Sample:
    return Sample(id=i, context="c", question="q", answers=[answer])


def test_repeated_ids_become_unique_in_data_order():
    samples = [sample("x", "1"), sample("y"), sample("x", "2"), sample("x#2"), sample("x", "3")]
    ids = [s.id for s in unique_ids(samples)]
    assert ids == ["x", "y", "x#3", "x#2", "x#4"]  # x#2 was taken by a real id
    assert len(set(ids)) == len(ids)
    assert [s.answers for s in unique_ids(samples)] == [s.answers for s in samples]
    assert [s.id for s in unique_ids(samples)] == ids  # the same on every run
    plain = [sample("a"), sample("b")]
    assert unique_ids(plain) == plain


def test_rows_missing_fields_or_of_the_wrong_type_are_named():
    fields = {"context": str, "answers": (list, str)}
    good = [{"context": "c", "answers": ["a"]}, {"context": "d", "answers": "b"}]
    assert check_rows(good, fields, "f.jsonl") is good
    with pytest.raises(BadRowError, match=r"^f.jsonl: row 2: field 'context' should be str, got int '12'"):
        check_rows([good[0], {"context": 12, "answers": []}], fields, "f.jsonl")
    with pytest.raises(BadRowError, match=r"^f.jsonl: row 1: missing field 'answers'"):
        check_rows([{"context": "c"}], fields, "f.jsonl")
    with pytest.raises(BadRowError, match=r"row 1: field 'answers' should be list or str, got NoneType"):
        check_rows([{"context": "c", "answers": None}], fields, "f.jsonl")
    with pytest.raises(BadRowError, match=r"row 1: expected an object"):
        check_rows(["text"], fields, "f.jsonl")


def test_alternative_field_names_are_read_in_order():
    fields = {("problem", "question"): str}
    rows = [{"question": "q"}, {"problem": None, "question": "q"}, {"problem": "p"}]
    assert check_rows(rows, fields, "f.jsonl") is rows
    with pytest.raises(BadRowError, match=r"^f.jsonl: row 2: missing field 'problem' or 'question'$"):
        check_rows([rows[0], {"answer": 1}], fields, "f.jsonl")
    with pytest.raises(BadRowError, match=r"^f.jsonl: row 1: field 'problem' should be str, got int"):
        check_rows([{"problem": 3, "question": None}], fields, "f.jsonl")


def test_garbage_line_in_predictions_names_file_and_line(tmp_path):
    file = tmp_path / "predictions.jsonl"
    rec = [json.dumps({"id": str(i), "prediction": "p"}) for i in range(3)]
    file.write_text(f"{rec[0]}\n{rec[1]}\n{rec[2][:5]}")  # a torn last line is cut, silently
    assert list(read_predictions(tmp_path)) == ["0", "1"]
    assert file.read_text() == f"{rec[0]}\n{rec[1]}\n"
    file.write_text(f"{rec[0]}\nnot json\n{rec[2]}\n")
    with pytest.raises(ValueError, match=rf"^{file} line 2: expected a JSON prediction record"):
        read_predictions(tmp_path)
    file.write_text(f"{rec[0]}\n" + json.dumps({"prediction": "no id"}) + "\n")
    with pytest.raises(ValueError, match=rf"^{file} line 2: expected a JSON prediction record"):
        read_predictions(tmp_path)


def _bench(name: str, **overrides):

    import yaml

    from sa_bench.benchmarks.base import Benchmark
    from sa_bench.config import build_target

    conf = ROOT / "conf" / "benchmark" / f"{name}.yaml"
    return build_target({**yaml.safe_load(conf.read_text()), **overrides}, "benchmark", Benchmark)


@pytest.mark.parametrize("where", ["data_dir", "data_files"])
def test_a_torn_line_in_a_data_file_is_named_once_with_file_and_line(tmp_path, capfd, caplog, where):
    """`{"input": "a", "cont` as the 3rd line: one BadRowError naming the file and line 3
    (not the json module's `line 1 column 14`), and no `datasets` log of it on the way."""

    fixtures = FIXTURES / "longbench"
    lines = (fixtures / "hotpotqa.jsonl").read_text().splitlines()
    lines.insert(2, '{"input": "a", "cont')
    file = tmp_path / "hotpotqa.jsonl"
    file.write_text("\n".join(lines) + "\n")
    location = {"data_dir": str(tmp_path)} if where == "data_dir" else {"data_files": str(file)}
    bench = _bench("longbench", subsets=["hotpotqa"], subset="hotpotqa", **location)
    with pytest.raises(BadRowError) as err:
        bench.load(None)
    assert str(err.value).startswith(f"{file}: line 3: not valid JSON (Unterminated string "
                                     f"starting at: column 16); ")
    out, errors = capfd.readouterr()
    assert "Failed to load JSON" not in out + errors + caplog.text


def test_json_lines_break_only_at_newlines_and_bad_bytes_are_located(tmp_path):
    """A U+2028 inside a string is no line break (the json module fallback, taken here because
    `answer` is an int in one row and a str in the other); bytes that are not UTF-8 are named
    by line; a torn JSON document (RULER's squad.json) is named by file and line too."""
    from sa_bench.benchmarks.data import read_json, read_rows

    rows = [{"context": "one\u2028two", "answer": 1}, {"context": "three", "answer": "x"}]
    file = tmp_path / "rows.jsonl"
    file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert read_rows(file) == rows
    file.write_bytes(b'{"a": "x"}\n{"a": "\xff"}\n')
    with pytest.raises(BadRowError, match=rf"^{file}: line 2: not UTF-8 text"):
        read_rows(file)
    doc = tmp_path / "squad.json"
    doc.write_text('{"data": [\n  {"title": "x",\n  "paragraphs": [')
    with pytest.raises(BadRowError, match=rf"^{doc}: line 3: not valid JSON"):
        read_json(doc)
