"""The report on hand-written output trees: table numbers, labels, status, CSV, plots, filters."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from sa_bench import report
from sa_bench.launch import jobdir
from sa_bench.launch.identity import sanitize


def job_key(cfg: dict) -> str:
    """A stand-in key: the report reads keys from directory names, it never computes them
    (these configs name classes that do not exist, so no JobSpec can be built)."""
    return hashlib.sha256(json.dumps(report.result_values(cfg), sort_keys=True).encode()).hexdigest()[:12]


def job_relpath(cfg: dict) -> str:
    parts = [cfg["model"]["name"], cfg["sparse"]["name"], cfg["benchmark"]["name"],
             cfg["benchmark"]["subset"]]
    return "/".join(sanitize(p) for p in parts) + "/" + job_key(cfg)

MODELS = ("m-small", "m-large")
SUBSETS = ("1k", "2k")
METHODS = {  # method -> [(maskers, per-layer question density)] at two densities
    "oracle_topk": [
        ({"topk": {"_target_": "x.OracleTopK", "heavy_size": 0.05}}, [0.1, None, 0.2]),
        ({"topk": {"_target_": "x.OracleTopK", "heavy_size": 0.2}}, [0.3, 0.4, None]),
    ],
    "streaming": [
        ({"local": {"_target_": "x.Local", "size": 64}}, [0.5, 0.5, 0.5]),
        ({"local": {"_target_": "x.Local", "size": 128}}, [0.7, 0.8, 0.9]),
    ],
}


def config(model: str, method: str, subset: str, maskers: dict | None = None) -> dict:
    return {
        "model": {"name": model, "pretrained": f"hub/{model}", "max_context": 4096},
        "sparse": {"name": method, "phase": "question", "dense_layers": [],
                   "measure_error": False, "maskers": maskers or {}},
        "benchmark": {"_target_": "x.Passkey", "name": "passkey", "subsets": list(SUBSETS),
                      "subset": subset, "data_dir": None, "n_samples": 4},
        "output_root": "ignored", "overwrite": False, "seed": 0, "max_new_tokens": None,
        "pool": {"devices": "auto"},
    }


def write_job(root: Path, cfg: dict, *, score: float | None = None,
              density: list | None = None, decode: list | None = None,
              error: str | None = None, partial: bool = False, key: str | None = None,
              prefill: list | None = None, compression: float | None = None) -> Path:
    """A job directory; `key` overrides the hashed key (a job from an older key scheme);
    `prefill`: per-layer densities of a sparse prefill method."""
    path = root / job_relpath(cfg)
    if key is not None:
        path = path.parent / key
    path.mkdir(parents=True)
    (path / jobdir.CONFIG).write_text(yaml.safe_dump(cfg))
    if error is not None:
        (path / jobdir.ERROR).write_text(error)
        return path
    if partial:
        (path / jobdir.PREDICTIONS).write_text(json.dumps({"id": "0", "prediction": "1"}) + "\n")
        (path / "progress.json").write_text(json.dumps({"done": 1, "total": 4}))
        return path
    (path / jobdir.PREDICTIONS).write_text("")
    jobdir.write_json_atomic(path / jobdir.METRICS, {"score": score, "n": 4, "by_depth": {"0.5": score}})
    stats = {"total_s": 1.5, "truncated_samples": 0,
             "attention": {"density": {"question": density or [], "decode": decode or []},
                           "notes": []}}
    if compression is not None:  # a press's achieved ratio
        stats["attention"]["compression"] = {"achieved_ratio": compression}
    if prefill is not None:
        stats["attention"]["density"]["prefill"] = prefill
        stats["attention"]["prefill_density_per_head"] = [[v, v] for v in prefill]
    jobdir.write_json_atomic(path / jobdir.STATS, stats)
    jobdir.write_marker(path, key or job_key(cfg), {"score": score})
    return path


def scores() -> dict[tuple[str, str, str, int], float]:
    """(model, method, subset, variant) -> score; dense is variant 0."""
    out = {}
    for i, model in enumerate(MODELS):
        for j, subset in enumerate(SUBSETS):
            out[(model, "dense", subset, 0)] = 90.0 - 10 * i - 5 * j
            for k, method in enumerate(METHODS):
                for v in range(2):
                    out[(model, method, subset, v)] = 20.0 + 10 * v + 7 * k + 3 * i + j + 0.25
    return out


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "outputs"
    for (model, method, subset, v), score in scores().items():
        if method == "dense":
            write_job(root, config(model, "dense", subset), score=score, density=[1.0, 1.0, 1.0])
        else:
            maskers, density = METHODS[method][v]
            write_job(root, config(model, method, subset, maskers), score=score, density=density)
    failing = config("m-small", "quest", "1k", {"quest": {"page_size": 16}})
    write_job(root, failing, error="Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                                   "torch.OutOfMemoryError: CUDA out of memory\n\n")
    unfinished = config("m-large", "quest", "2k", {"quest": {"page_size": 16}})
    write_job(root, unfinished, partial=True)
    (root / "multirun.yaml").write_text("not a job\n")
    return root


def test_finds_every_job_with_its_status(tree: Path) -> None:
    jobs = report.read_jobs(tree)
    assert len(jobs) == len(scores()) + 2
    by_status = {s: [j for j in jobs if j.status == s] for s in ("done", "failed", "pending")}
    assert len(by_status["done"]) == len(scores())
    assert [j.relpath.split("/")[:4] for j in by_status["failed"]] == [["m-small", "quest", "passkey", "1k"]]
    assert by_status["failed"][0].error == "torch.OutOfMemoryError: CUDA out of memory"
    assert [j.relpath.split("/")[:4] for j in by_status["pending"]] == [["m-large", "quest", "passkey", "2k"]]


def test_table_numbers_equal_metrics_and_stats(tree: Path) -> None:
    table = report.build_table(report.read_jobs(tree))
    checked = 0
    for row in table.rows:
        for column, job in row.cells.items():
            if job.status != "done":
                continue
            score, density, diff = table.cell(row, column)
            metrics = json.loads((job.path / "metrics.json").read_text())
            stats = json.loads((job.path / "stats.json").read_text())
            assert score == metrics["score"]
            values = [v for v in stats["attention"]["density"]["question"] if v is not None]
            assert density == pytest.approx(sum(values) / len(values))
            dense_job = next(r for r in table.rows if r.method == "dense" and r.model == row.model
                             ).cells[column]
            dense_score = json.loads((dense_job.path / "metrics.json").read_text())["score"]
            assert diff == pytest.approx(metrics["score"] - dense_score)
            checked += 1
    assert checked == len(scores())
    # and the printed strings carry those numbers
    header, body = report.table_cells(table)
    line = next(r for r in body if r[0] == "m-small" and r[1] == "oracle_topk (topk.heavy_size=0.05)")
    s, d = scores()[("m-small", "oracle_topk", "1k", 0)], scores()[("m-small", "dense", "1k", 0)]
    assert line[header.index("passkey/1k")] == f"{s:.1f} @0.150 ({s - d:+.1f})"
    avg = (s + scores()[("m-small", "oracle_topk", "2k", 0)]) / 2
    assert line[header.index("average")].startswith(f"{avg:.1f} @0.150 ")


def test_rows_spell_out_differing_parameters(tree: Path) -> None:
    table = report.build_table(report.read_jobs(tree))
    labels = {(r.model, r.label) for r in table.rows}
    for model in MODELS:
        assert {(model, "dense"), (model, "oracle_topk (topk.heavy_size=0.05)"),
                (model, "oracle_topk (topk.heavy_size=0.2)"), (model, "streaming (local.size=64)"),
                (model, "streaming (local.size=128)")} <= labels
    assert [r.model for r in table.rows] == sorted(r.model for r in table.rows)
    assert [report.table_cells(table)[0][i] for i in (2, 3, 4)] == ["passkey/1k", "passkey/2k", "average"]


def test_failed_and_unfinished_cells_and_status(tree: Path) -> None:
    table = report.build_table(report.read_jobs(tree))
    header, body = report.table_cells(table)
    quest = {r[0]: r for r in body if r[1] == "quest"}
    assert quest["m-small"][header.index("passkey/1k")] == "FAILED"
    assert quest["m-large"][header.index("passkey/2k")] == "unfinished"
    lines = report.status_lines(report.read_jobs(tree))
    assert len(lines) == 2
    assert lines[0].startswith("failed") and "m-small/quest/passkey/1k/" in lines[0]
    assert lines[0].endswith("torch.OutOfMemoryError: CUDA out of memory")
    assert lines[1].startswith("unfinished") and "m-large/quest/passkey/2k/" in lines[1]
    assert lines[1].endswith("1/4 samples")


def test_difference_blank_without_dense_cell(tree: Path) -> None:
    jobs = [j for j in report.read_jobs(tree) if not (j.method == "dense" and j.subset == "2k")]
    table = report.build_table(jobs)
    header, body = report.table_cells(table)
    line = next(r for r in body if r[0] == "m-large" and r[1] == "streaming (local.size=64)")
    s = scores()[("m-large", "streaming", "2k", 0)]
    assert line[header.index("passkey/2k")] == f"{s:.1f} @0.500"


def test_measured_density_rules() -> None:
    def stats(question: list, decode: list) -> dict:
        return {"attention": {"density": {"question": question, "decode": decode}}}

    assert report.measured_density(stats([None, 0.2, 0.4], [0.9]), "x") == pytest.approx(0.3)
    assert report.measured_density(stats([None, None], [0.5, None, 0.7]), "x") == pytest.approx(0.6)
    assert report.measured_density({}, "dense") == 1.0
    assert report.measured_density({}, "oracle_topk") is None


def test_measured_compression_reads_the_achieved_ratio() -> None:
    assert report.measured_compression({"attention": {"compression": {"achieved_ratio": 0.5}}}) == 0.5
    assert report.measured_compression({"attention": {"density": {}}}) is None
    assert report.measured_compression({"attention": {"compression": {"achieved_ratio": None}}}) is None


def test_filters_by_globs(tree: Path) -> None:
    jobs = report.read_jobs(tree)
    picked = report.select(jobs, model=["*small"], method=["oracle*", "dense"], benchmark=["passkey/1k"])
    assert {(j.model, j.method, j.subset) for j in picked} == {
        ("m-small", "oracle_topk", "1k"), ("m-small", "dense", "1k")}
    assert len(report.select(jobs, benchmark=["pass*"])) == len(jobs)
    assert report.select(jobs, benchmark=["ruler"]) == []


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    body = data[16:29]
    assert struct.unpack(">I", data[29:33])[0] == zlib.crc32(kind + body)
    assert data.endswith(b"IEND\xaeB`\x82")
    return struct.unpack(">II", body[:8])


def test_main_writes_report_csv_and_plots(tree: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rep"
    assert report.main([str(tree), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "oracle_topk (topk.heavy_size=0.05)" in printed
    assert "torch.OutOfMemoryError: CUDA out of memory" in printed
    width, height = _png_size(out / "plot_passkey.png")
    assert width > 100 and height > 100
    md = (out / "report.md").read_text()
    assert "| m-small | oracle_topk (topk.heavy_size=0.05) |" in md
    assert "![plot_passkey](plot_passkey.png)" in md and "**unfinished**" in md

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(scores()) + 2
    row = next(r for r in rows if r["model.name"] == "m-large" and r["sparse.name"] == "oracle_topk"
               and r["sparse.maskers.topk.heavy_size"] == "0.2" and r["benchmark.subset"] == "2k")
    expected = scores()[("m-large", "oracle_topk", "2k", 1)]
    assert float(row["metrics.score"]) == expected
    assert float(row["metrics.by_depth.0.5"]) == expected
    assert float(row["stats.total_s"]) == 1.5
    assert float(row["density"]) == pytest.approx(0.35)
    assert float(row["score_vs_dense"]) == pytest.approx(expected - scores()[("m-large", "dense", "2k", 0)])
    assert json.loads(row["stats.attention.density.question"]) == [0.3, 0.4, None]
    failed = next(r for r in rows if r["status"] == "failed")
    assert failed["error"] == "torch.OutOfMemoryError: CUDA out of memory"
    assert failed["metrics.score"] == ""


def test_default_out_is_the_output_root_and_import_is_light(tree: Path) -> None:
    code = ("import sys, sa_bench.report; assert 'matplotlib' not in sys.modules; "
            "assert 'torch' not in sys.modules; sys.argv[1:] = [sys.argv[1], '--method', 'dense']; "
            "sys.exit(sa_bench.report.main())")
    done = subprocess.run([sys.executable, "-c", code, str(tree)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "8 jobs: 4 done" not in done.stdout and "4 jobs: 4 done" in done.stdout
    assert (tree / "report.md").exists() and (tree / "results.csv").exists()
    assert (tree / "plot_passkey.png").stat().st_size > 0


def test_output_root_given_as_on_the_sweeps_command_line(tree: Path, capsys) -> None:
    assert report.main([f"output_root={tree}", "--no-plots"]) == 0
    assert "22 jobs: 20 done" in capsys.readouterr().out  # the tree fixture's cells


def test_module_entry_point_and_missing_root(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "sa_bench.report", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "not a directory" in done.stderr


def test_rows_sorted_numerically_and_other_differences_spelled_out(tmp_path: Path) -> None:
    root = tmp_path / "out"
    write_job(root, config("m", "dense", "1k"), score=50.0)
    for size in (128, 64, 1024):
        write_job(root, config("m", "streaming", "1k", {"local": {"size": size}}), score=size / 100,
                  density=[size / 2048])
    decode_only = config("m", "streaming", "1k", {"local": {"size": 64}})
    decode_only["sparse"]["phase"] = "decode"
    write_job(root, decode_only, score=1.0, decode=[0.25, None])
    table = report.build_table(report.read_jobs(root))
    assert [r.label for r in table.rows] == [
        "dense",
        "streaming (local.size=64, phase=decode)",
        "streaming (local.size=64, phase=question)",
        "streaming (local.size=128, phase=question)",
        "streaming (local.size=1024, phase=question)",
    ]
    column = table.columns[0]
    assert table.cell(table.rows[1], column) == (1.0, 0.25, -49.0)


def test_job_without_config_is_still_listed(tmp_path: Path) -> None:
    path = tmp_path / "out" / "m" / "hashattn" / "passkey" / "1k" / "abc123"
    path.mkdir(parents=True)
    (path / jobdir.ERROR).write_text("Traceback\nsa_bench.config.ConfigError: sparse.x: unknown key\n")
    jobs = report.read_jobs(tmp_path / "out")
    assert [(j.model, j.method, j.benchmark, j.subset, j.status) for j in jobs] == [
        ("m", "hashattn", "passkey", "1k", "failed")]
    assert report.build_table(jobs).rows == []
    assert report.status_lines(jobs) == [
        "failed      m/hashattn/passkey/1k/abc123: sa_bench.config.ConfigError: sparse.x: unknown key"]


def test_newest_finished_job_of_a_cell_is_shown(tmp_path: Path) -> None:
    root = tmp_path / "out"
    cfg = config("m", "dense", "1k")
    # the same cell under three keys (e.g. written by older versions of the key scheme)
    old_path = write_job(root, cfg, score=10.0, key="0000000000aa")
    jobdir.write_json_atomic(old_path / jobdir.MARKER, {"key": old_path.name, "finished": 1.0})
    write_job(root, cfg, score=20.0)
    write_job(root, cfg, error="boom\n", key="0000000000bb")
    table = report.build_table(report.read_jobs(root))
    assert len(table.rows) == 1 and len(table.columns) == 1
    assert table.cell(table.rows[0], table.columns[0])[0] == 20.0
    assert table.rows[0].cells[table.columns[0]].status == "done"


# --- issue 23: odd names and malformed files never crash the report ---------------------------


def _rewrite(path: Path, name: str, data: bytes) -> None:
    """Replace a result file of a finished job and re-vouch for it (the marker records sizes)."""
    (path / name).write_bytes(data)
    jobdir.write_marker(path, path.name)


def test_non_utf8_directory_names_are_shown_with_replacement_characters(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "out"
    write_job(root, config("m", "dense", "1k"), score=50.0)
    odd = write_job(root, config("m", "streaming", "1k", {"local": {"size": 64}}), score=40.0,
                    density=[0.5])
    renamed = os.fsencode(odd.parent) + b"/key\xff\xfe"
    os.rename(os.fsencode(odd), renamed)
    failed = os.fsencode(root) + b"/m\xe9/quest/passkey/1k/abc"  # no config: names from the path
    os.makedirs(failed)
    Path(os.fsdecode(failed), jobdir.ERROR).write_bytes(b"Traceback\nValueError: caf\xe9\n")
    os.makedirs(os.fsencode(root) + b"/stray\xff/x")  # not a job directory
    out = tmp_path / "rep"
    assert report.main([str(root), "--out", str(out), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "m\ufffd/quest/passkey/1k/abc: ValueError: caf\ufffd" in printed
    with open(out / "results.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows) == sorted([
        job_relpath(config("m", "dense", "1k")),
        odd.parent.relative_to(root).as_posix() + "/key\ufffd\ufffd",
        "m\ufffd/quest/passkey/1k/abc"])
    assert "m\ufffd/quest/passkey/1k/abc" in (out / "report.md").read_text(encoding="utf-8")


@pytest.mark.parametrize(("name", "data", "reason"), [
    ("stats.json", b"[]", "stats.json: a JSON array where an object is expected"),
    ("stats.json", b"3", "stats.json: a JSON number where an object is expected"),
    ("metrics.json", b"[1, 2]", "metrics.json: a JSON array where an object is expected"),
    ("metrics.json", b'"high"', "metrics.json: a JSON string where an object is expected"),
    ("metrics.json", b"{\"score\": 1", "metrics.json: not valid JSON"),
    ("stats.json", b"{\"attention\": [1], \"total_s\": 2}", None),  # odd inside, still an object
])
def test_malformed_result_file_makes_the_job_unreadable_not_a_crash(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, data: bytes,
        reason: str | None) -> None:
    root = tmp_path / "out"
    write_job(root, config("m", "dense", "1k"), score=50.0)
    victim = write_job(root, config("m", "streaming", "1k", {"local": {"size": 64}}), score=40.0,
                       density=[0.5])
    write_job(root, config("m", "streaming", "2k", {"local": {"size": 64}}), score=30.0,
              density=[0.25])
    _rewrite(victim, name, data)
    out = tmp_path / "rep"
    assert report.main([str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rel = victim.relative_to(root).as_posix()
    with open(out / "results.csv", encoding="utf-8") as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    assert len(rows) == 3
    assert float(rows[job_relpath(config("m", "streaming", "2k", {"local": {"size": 64}}))]
                 ["metrics.score"]) == 30.0
    jobs = report.read_jobs(root)
    header, body = report.table_cells(report.build_table(jobs))
    cell = next(r for r in body if r[1] == "streaming")[header.index("passkey/1k")]
    if reason is None:
        assert "unreadable" not in printed and cell == "40.0 (-10.0)"
        return
    assert f"unreadable  {rel}: {reason}" in printed
    assert f"**unreadable** `{rel}`: {reason}" in (out / "report.md").read_text()
    assert rows[rel]["error"] == reason
    assert cell == ("unreadable" if name == "metrics.json" else "40.0 (-10.0)")  # no density


def test_config_sections_that_are_not_mappings(tmp_path: Path) -> None:
    path = tmp_path / "out" / "m" / "dense" / "passkey" / "1k" / "abc"
    path.mkdir(parents=True)
    (path / jobdir.CONFIG).write_text("model: 3\nsparse: [1]\nbenchmark: text\n")
    (path / jobdir.ERROR).write_text("boom\n")
    jobs = report.read_jobs(tmp_path / "out")
    assert [(j.model, j.method, j.benchmark, j.subset) for j in jobs] == [("m", "dense", "passkey", "1k")]
    report.build_table(jobs)
    assert report.main([str(tmp_path / "out"), "--no-plots"]) == 0


# --- issue 23: a cell run again under a new key (new weights, a bumped key_version) -----------


def finished_at(path: Path, when: float, env: dict | None = None) -> Path:
    """Make a finished job's marker say it finished at `when`; `env` becomes its env.json."""
    if env is not None:
        jobdir.write_json_atomic(path / jobdir.ENV, env)
    jobdir.write_marker(path, path.name)
    marker = json.loads((path / jobdir.MARKER).read_text())
    jobdir.write_json_atomic(path / jobdir.MARKER, {**marker, "finished": when})
    return path


def test_a_cell_under_two_keys_shows_the_newest_and_lists_the_older(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "out"
    cfg = config("m", "streaming", "1k", {"local": {"size": 64}})
    newer = finished_at(write_job(root, cfg, score=20.0, density=[0.5], key="0000000000bb"), 2e9)
    older = finished_at(write_job(root, cfg, score=10.0, density=[0.5], key="0000000000cc"), 1e9)
    write_job(root, config("m", "streaming", "2k", {"local": {"size": 64}}), score=5.0)
    table = report.build_table(report.read_jobs(root))
    assert len(table.rows) == 1 and len(table.columns) == 2
    row, column = table.rows[0], table.columns[0]
    assert row.cells[column].path == newer and row.older[column] == [
        j for j in report.read_jobs(root) if j.path == older]
    header, body = report.table_cells(table)
    assert body[0][header.index("passkey/1k")] == "20.0 @0.500 [^1]"
    assert body[0][header.index("passkey/2k")] == "5.0"  # no mark: one result only
    out = tmp_path / "rep"
    assert report.main([str(root), "--out", str(out), "--no-plots"]) == 0
    printed, md = capsys.readouterr().out, (out / "report.md").read_text()
    rel_new, rel_old = (p.relative_to(root).as_posix() for p in (newer, older))
    for text in (printed, md):
        note = next(ln for ln in text.splitlines() if ln.lstrip().startswith("[^1]"))
        assert rel_new in note and rel_old in note and "score 10" in note
    with open(out / "results.csv") as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    assert len(rows) == 3
    assert (rows[rel_old]["superseded"], rows[rel_old]["superseded_by"]) == ("True", rel_new)
    assert (rows[rel_new]["superseded"], rows[rel_new]["superseded_by"]) == ("False", "")
    assert float(rows[rel_old]["metrics.score"]) == 10.0


def test_difference_only_against_dense_of_the_same_weights(tmp_path: Path) -> None:
    root = tmp_path / "out"
    dense = config("m", "dense", "1k")
    old_dense = finished_at(write_job(root, dense, score=80.0, key="00000000000a"), 1e9,
                            {"weights": "local:aaa"})
    finished_at(write_job(root, dense, score=90.0, key="00000000000b"), 2e9,
                {"weights": "local:bbb"})
    same = finished_at(write_job(root, config("m", "streaming", "1k", {"local": {"size": 64}}),
                                 score=50.0, density=[0.5]), 1.5e9, {"weights": "local:aaa"})
    other = finished_at(write_job(root, config("m", "streaming", "1k", {"local": {"size": 128}}),
                                  score=60.0, density=[0.7]), 3e9, {"weights": "local:ccc"})
    table = report.build_table(report.read_jobs(root))
    column = table.columns[0]
    by_label = {r.label: r for r in table.rows}
    assert table.cell(by_label["streaming (local.size=64)"], column) == (50.0, 0.5, -30.0)
    assert table.reference(by_label["streaming (local.size=64)"], column).path == old_dense
    assert table.cell(by_label["streaming (local.size=128)"], column) == (60.0, 0.7, None)
    assert table.cell(by_label["dense"], column) == (90.0, 1.0, 0.0)
    out = tmp_path / "rep"
    assert report.main([str(root), "--out", str(out), "--no-plots"]) == 0
    with open(out / "results.csv") as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    rel = same.relative_to(root).as_posix()
    assert float(rows[rel]["score_vs_dense"]) == -30.0
    assert rows[rel]["dense_path"] == old_dense.relative_to(root).as_posix()
    assert rows[rel]["model_weights"] == "local:aaa"
    assert rows[other.relative_to(root).as_posix()]["score_vs_dense"] == ""
    old = rows[old_dense.relative_to(root).as_posix()]  # superseded, still compared with itself
    assert (old["superseded"], float(old["score_vs_dense"])) == ("True", 0.0)


def test_no_difference_when_the_weights_cannot_be_told_apart(tmp_path: Path) -> None:
    """No weights identity in the job files: with the dense cell (or this cell) run under two
    keys there is no knowing which dense result had this cell's weights."""
    root = tmp_path / "out"
    dense = config("m", "dense", "1k")
    finished_at(write_job(root, dense, score=80.0, key="00000000000a"), 1e9)
    finished_at(write_job(root, dense, score=90.0, key="00000000000b"), 2e9)
    write_job(root, config("m", "dense", "2k"), score=70.0)
    for subset in SUBSETS:
        write_job(root, config("m", "streaming", subset, {"local": {"size": 64}}), score=50.0,
                  density=[0.5])
    table = report.build_table(report.read_jobs(root))
    row = next(r for r in table.rows if r.method == "streaming")
    assert [table.cell(row, c) for c in table.columns] == [(50.0, 0.5, None), (50.0, 0.5, -20.0)]
    assert report.superseded_notes(table)[0].startswith("[^1]: m / dense / passkey/1k: shows ")
    # this cell run again too: still no knowing, and its note says why its difference is blank
    finished_at(write_job(root, config("m", "streaming", "1k", {"local": {"size": 64}}),
                          score=55.0, density=[0.5], key="00000000000c"), 3e9)
    table = report.build_table(report.read_jobs(root))
    row = next(r for r in table.rows if r.method == "streaming")
    assert table.cell(row, table.columns[0]) == (55.0, 0.5, None)
    note = report.superseded_notes(table)[1]
    assert note.startswith("[^2]: m / streaming / passkey/1k: shows m/streaming/passkey/1k/00000000000c")
    assert note.endswith("no difference from dense: the job files do not tell which dense result "
                         "had the same model weights")


def test_no_difference_across_weights_sources(tmp_path: Path) -> None:
    root = tmp_path / "out"
    hub = {"model_source": {"source": "hub", "path": "hub/m"}}
    fallback = {"model_source": {"source": "offline_fallback:tiny", "path": "/cache/tiny"}}
    finished_at(write_job(root, config("m", "dense", "1k"), score=80.0), 1e9, fallback)
    finished_at(write_job(root, config("m", "dense", "2k"), score=80.0), 1e9, hub)
    for subset in SUBSETS:
        finished_at(write_job(root, config("m", "streaming", subset, {"local": {"size": 64}}),
                              score=50.0, density=[0.5]), 2e9, hub)
    other = config("m", "streaming", "1k", {"local": {"size": 64}})
    other["model"]["pretrained"] = "hub/other"  # the only dense row of `m` is not of these weights
    other["model"]["max_context"] = 1024
    write_job(root, other, score=40.0, density=[0.5])
    table = report.build_table(report.read_jobs(root))
    rows = {r.label: r for r in table.rows}
    row = rows["streaming (model.max_context=4096, model.pretrained=hub/m)"]
    assert [table.cell(row, c)[2] for c in table.columns] == [None, -30.0]
    assert table.cell(rows["streaming (model.max_context=1024, model.pretrained=hub/other)"],
                      table.columns[0])[2] is None


# --- issue 22: a table per benchmark, an overview, plots over shared cells, formats ------------


def ruler_config(model: str, method: str, subset: str, length: int,
                 maskers: dict | None = None) -> dict:
    cfg = config(model, method, subset, maskers)
    cfg["benchmark"] = {"_target_": "x.Ruler", "name": "ruler", "subsets": ["vt", "cwe"],
                        "subset": subset, "length": length, "data_dir": None}
    return cfg


TOPK = {"topk": {"_target_": "x.OracleTopK", "heavy_size": 0.05}}
LOCAL = {"local": {"_target_": "x.Local", "size": 64}}


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """passkey (1k, 2k) and RULER (vt, cwe at 4096; vt only at 8192) for dense, oracle_topk
    (everywhere) and streaming (RULER vt only)."""
    root = tmp_path / "mixed"
    for subset, score in (("1k", 100.0), ("2k", 90.0)):
        write_job(root, config("m", "dense", subset), score=score, density=[1.0])
        write_job(root, config("m", "oracle_topk", subset, TOPK), score=score - 10, density=[0.05])
    for (subset, length), score in {("vt", 4096): 60.0, ("cwe", 4096): 40.0,
                                    ("vt", 8192): 50.0}.items():
        write_job(root, ruler_config("m", "dense", subset, length), score=score, density=[1.0])
        write_job(root, ruler_config("m", "oracle_topk", subset, length, TOPK), score=score - 20,
                  density=[0.02])
        if subset == "vt":
            write_job(root, ruler_config("m", "streaming", subset, length, LOCAL),
                      score=score - 30, density=[0.1])
    return root


def test_one_table_per_benchmark_with_its_own_average(mixed: Path) -> None:
    table = report.build_table(report.read_jobs(mixed))
    header, body = report.table_cells(table, "passkey")
    assert header == ["model", "sparse", "passkey/1k", "passkey/2k", "average"]
    assert [r[1] for r in body] == ["dense", "oracle_topk"]  # streaming ran no passkey cell
    assert body[1][-1] == "85.0 @0.050 (-10.0)"  # passkey only: (90 + 80) / 2
    header, body = report.table_cells(table, "ruler")
    assert header[2:] == ["ruler/cwe (length=4096)", "ruler/vt (length=4096)",
                          "ruler/vt (length=8192)", "average"]
    streaming = next(r for r in body if r[1] == "streaming")
    assert streaming[2] == "" and streaming[-1] == "25.0 @0.100 (-30.0) [2/3]"
    header, body = report.overview_cells(table)
    assert header == ["model", "sparse", "passkey", "ruler"]
    rows = {r[1]: r[2:] for r in body}
    assert rows["dense"] == ["95.0 @1.000 (+0.0)", "50.0 @1.000 (+0.0)"]
    assert rows["oracle_topk"] == ["85.0 @0.050 (-10.0)", "30.0 @0.020 (-20.0)"]
    assert rows["streaming"] == ["", "25.0 @0.100 (-30.0) [2/3]"]


def test_plot_panels_compare_methods_over_the_cells_they_share(mixed: Path) -> None:
    table = report.build_table(report.read_jobs(mixed))
    panels = {p.group: p for p in report.plot_panels(table, "ruler")}
    assert sorted(panels) == ["length=4096", "length=8192"]  # one panel per length
    at4k = panels["length=4096"]
    assert [c.subset for c in at4k.shared] == ["vt"]  # streaming has vt only
    points = {m: [(p.density, p.score, p.shared) for p in ps] for m, ps in at4k.curves.items()}
    # oracle_topk scored cwe too, but is drawn over vt alone, as streaming is
    assert points == {"dense": [(1.0, 60.0, True)], "oracle_topk": [(0.02, 40.0, True)],
                      "streaming": [(0.1, 30.0, True)]}
    assert "1 of 2 subsets" in at4k.title
    [passkey] = report.plot_panels(table, "passkey")
    assert passkey.group == "" and len(passkey.shared) == 2


def test_points_without_a_shared_cell_are_marked(tmp_path: Path) -> None:
    write_job(tmp_path, config("m", "dense", "1k"), score=90.0, density=[1.0])
    write_job(tmp_path, config("m", "oracle_topk", "2k", TOPK), score=50.0, density=[0.1])
    [panel] = report.plot_panels(report.build_table(report.read_jobs(tmp_path)), "passkey")
    assert panel.shared == [] and "hollow" in panel.title
    assert [(p.score, p.n, p.shared) for ps in panel.curves.values() for p in ps] == [
        (90.0, 1, False), (50.0, 1, False)]


def test_pareto_front_keeps_the_points_no_other_beats() -> None:
    def point(density: float, score: float) -> report.Point:
        return report.Point("x", density, score, 1, True)

    points = [point(0.1, 50), point(0.05, 40), point(0.2, 45), point(1.0, 90), point(0.05, 30)]
    assert [(p.density, p.score) for p in report.pareto_front(points)] == [
        (0.05, 40), (0.1, 50), (1.0, 90)]


def test_plot_density_axis_is_logarithmic_with_a_panel_per_length(mixed: Path) -> None:
    table = report.build_table(report.read_jobs(mixed))
    fig = report.plot_figure(table, "ruler")
    assert len(fig.axes) == 2 and {ax.get_xscale() for ax in fig.axes} == {"log"}
    labels = {t.get_text() for t in fig.axes[0].get_legend().get_texts()}
    assert labels == {"dense", "oracle_topk", "streaming", "Pareto front"}


def test_formats_json_and_self_contained_html(mixed: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import base64
    import re

    out = tmp_path / "rep"
    assert report.main([str(mixed), "--out", str(out), "--format", "json,html"]) == 0
    printed = capsys.readouterr().out
    assert "overview: average per benchmark:" in printed and "\nruler:\n" in printed
    assert not (out / "report.md").exists() and not (out / "results.csv").exists()
    data = json.loads((out / "report.json").read_text())
    assert sorted(data["benchmarks"]) == ["passkey", "ruler"]
    topk = next(r for r in data["benchmarks"]["passkey"]["rows"] if r["method"] == "oracle_topk")
    assert topk["average"] == {"score": 85.0, "density": 0.05, "score_vs_dense": -10.0,
                               "cells": 2, "of": 2, "prefill_density": None}
    assert topk["cells"]["passkey/1k"]["score"] == 90.0
    page = (out / "report.html").read_text()
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(images) == 2 and "plot_passkey.png" not in page.replace("alt='plot_passkey'", "")
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "<td>85.0 @0.050 (-10.0)</td>" in page
    assert report.main([str(mixed), "--format", "pdf"]) == 2


def test_prefill_density_beside_decode_density(tmp_path: Path) -> None:
    """A job that ran a sparse prefill method shows its prefill density as a field of its own
    (the table cell, CSV and JSON); the decode density stays the cell's density; a dense
    prefill (no per-head prefill record) shows none."""
    root = tmp_path / "outputs"
    dense = write_job(root, config("m", "dense", "1k"), score=90.0)
    write_job(root, config("m", "vertical_slash", "1k"), score=80.0, density=[1.0, 1.0],
              decode=[0.5, 0.7], prefill=[0.1, 0.3])
    assert report.measured_prefill_density(json.loads((dense / jobdir.STATS).read_text())) is None
    out = tmp_path / "rep"
    assert report.main([str(root), "--out", str(out), "--format", "md,csv,json"]) == 0
    md = (out / "report.md").read_text()
    assert "80.0 @1.000 (-10.0) prefill @0.200" in md and "90.0 @1.000 (+0.0) |" in md
    with open(out / "results.csv") as f:
        rows = {r["sparse.name"]: r for r in csv.DictReader(f)}
    assert float(rows["vertical_slash"]["prefill_density"]) == pytest.approx(0.2)
    assert rows["dense"]["prefill_density"] == ""
    cells = {r["method"]: r["cells"]["passkey/1k"]
             for r in json.loads((out / "report.json").read_text())["benchmarks"]["passkey"]["rows"]}
    assert cells["vertical_slash"]["prefill_density"] == pytest.approx(0.2)
    assert cells["vertical_slash"]["density"] == 1.0 and cells["dense"]["prefill_density"] is None


# --- issue 18: compression methods on the compression axis and the KV-read axis -----------------

def test_compression_and_kv_read_axes(tmp_path: Path) -> None:
    write_job(tmp_path, config("m", "dense", "1k"), score=90.0, density=[1.0])
    write_job(tmp_path, config("m", "oracle_topk", "1k", TOPK), score=70.0, density=[0.1])
    for ratio, score in ((0.5, 80.0), (0.75, 60.0)):
        cfg = config("m", "snapkv", "1k")
        cfg["sparse"]["compression"] = {"_target_": "x.SnapKV", "compression_ratio": ratio}
        write_job(tmp_path, cfg, score=score, density=[1.0], compression=ratio)
    cfg = config("m", "snapkv_quest", "1k", TOPK)
    cfg["sparse"]["compression"] = {"_target_": "x.SnapKV", "compression_ratio": 0.5}
    write_job(tmp_path, cfg, score=50.0, density=[0.2], compression=0.5)
    table = report.build_table(report.read_jobs(tmp_path))

    [panel] = report.plot_panels(table, "passkey", "compression")
    points = {m: [(p.density, p.score) for p in ps] for m, ps in panel.curves.items()}
    # the leaderboard's view: presses at their achieved ratio, dense at 0, maskers alone absent
    assert points == {"dense": [(0.0, 90.0)], "snapkv": [(0.5, 80.0), (0.75, 60.0)],
                      "snapkv_quest": [(0.5, 50.0)]}
    [panel] = report.plot_panels(table, "passkey", "kv_read")
    points = {m: [(round(p.density, 6), p.score) for p in ps] for m, ps in panel.curves.items()}
    # masker: its density; press: 1 - achieved ratio; both: the product
    assert points == {"dense": [(1.0, 90.0)], "oracle_topk": [(0.1, 70.0)],
                      "snapkv": [(0.25, 60.0), (0.5, 80.0)], "snapkv_quest": [(0.1, 50.0)]}
    fig = report.plot_figure(table, "passkey", "compression")
    assert fig.axes[0].get_xscale() == "linear" and "compression ratio" in fig.axes[0].get_xlabel()
    kv_axes = report.plot_figure(table, "passkey", "kv_read").axes[0]
    assert kv_axes.get_xscale() == "log"
    kv_axes.figure.canvas.draw()  # log ticks labelled in decimals at 1, 2, 5 per decade only
    labels = {t.get_text() for t in kv_axes.get_xticklabels() if t.get_text()}
    assert {"0.1", "0.2", "0.5", "1"} <= labels and not any(t.get_text() for t in kv_axes.get_xminorticklabels())

    out = tmp_path / "report"
    assert report.main([str(tmp_path), "--out", str(out)]) == 0
    assert {p.name for p in out.glob("plot_*.png")} == {
        "plot_passkey.png", "plot_passkey_compression.png", "plot_passkey_kv_read.png"}


def test_no_compression_plot_without_a_press(tree: Path, tmp_path: Path) -> None:
    table = report.build_table(report.read_jobs(tree))
    assert report.plot_figure(table, "passkey", "compression") is None
    assert [p.name for p in report.write_plots(table, tmp_path)] == ["plot_passkey.png"]


def test_prefill_average_and_plot_by_prefill_density(tmp_path: Path) -> None:
    """The average column carries the mean prefill density of the cells that have one; the
    score-vs-density plot puts the prefill density on its x axis with `--density prefill`
    (a dense prefill at 1.0), the question/decode density by default."""
    root = tmp_path / "outputs"
    write_job(root, config("m", "dense", "1k"), score=90.0)
    write_job(root, config("m", "dense", "2k"), score=80.0)
    write_job(root, config("m", "vertical_slash", "1k"), score=70.0, density=[0.5, 0.5],
              prefill=[0.1, 0.3])
    write_job(root, config("m", "vertical_slash", "2k"), score=60.0, density=[0.3, 0.3],
              prefill=[0.4, 0.4])
    write_job(root, config("m", "quest", "1k"), score=50.0, density=[0.2, 0.2])
    write_job(root, config("m", "quest", "2k"), score=40.0, density=[0.2, 0.2])
    table = report.build_table(report.read_jobs(root))
    header, body = report.table_cells(table, "passkey")
    rows = {line[1]: line for line in body}
    assert rows["vertical_slash"][-1] == "65.0 @0.400 (-20.0) prefill @0.300"
    assert "prefill" not in rows["quest"][-1] and "prefill" not in rows["dense"][-1]
    decode = {m: [(p.density, p.score) for p in ps]
              for m, ps in report.plot_panels(table, "passkey")[0].curves.items()}
    assert decode["vertical_slash"] == [(pytest.approx(0.4), 65.0)]
    prefill = {m: [(p.density, p.score) for p in ps]
               for m, ps in report.plot_panels(table, "passkey", density="prefill")[0].curves.items()}
    assert prefill == {"dense": [(1.0, 85.0)], "quest": [(1.0, 45.0)],
                       "vertical_slash": [(pytest.approx(0.3), 65.0)]}
    out = tmp_path / "rep"
    assert report.main([str(root), "--out", str(out), "--format", "json", "--density", "prefill"]) == 0
    assert (out / "plot_passkey.png").is_file()
    avg = {r["method"]: r["average"] for r in json.loads((out / "report.json").read_text())["benchmarks"]["passkey"]["rows"]}
    assert avg["vertical_slash"]["prefill_density"] == pytest.approx(0.3)
    assert avg["dense"]["prefill_density"] is None
    with pytest.raises(SystemExit):
        report.main([str(root), "--density", "question"])


def press_config(method: str, subset: str, ratio: float | None, **params: Any) -> dict:
    cfg = config("m", method, subset)
    cfg["sparse"]["compression"] = {"_target_": "x.Press", **params}
    if ratio is not None:
        cfg["sparse"]["compression"]["compression_ratio"] = ratio
    return cfg


def test_compression_leaderboard_rows_are_presses_columns_are_ratios(tmp_path: Path) -> None:
    """kvpress's leaderboard view: one row per press (its other parameters spelled out), one
    column per configured ratio, dense at 0, the score averaged over the subsets; a masker
    alone has no row; a press without a configured ratio sits at its achieved one."""
    for subset, dense in (("1k", 100.0), ("2k", 80.0)):
        write_job(tmp_path, config("m", "dense", subset), score=dense, density=[1.0])
        write_job(tmp_path, config("m", "oracle_topk", subset, TOPK), score=70.0, density=[0.1])
        for ratio, score in ((0.5, 90.0), (0.75, 50.0)):
            for window in (32, 64):
                write_job(tmp_path, press_config("snapkv", subset, ratio, window_size=window),
                          score=score - (window == 32) * 10, density=[1.0],
                          compression=ratio - 0.001)
        write_job(tmp_path, press_config("composed", subset, None), score=60.0, density=[1.0],
                  compression=0.6)
    write_job(tmp_path, press_config("knorm", "1k", 0.5), score=40.0, density=[1.0],
              compression=0.5)
    table = report.build_table(report.read_jobs(tmp_path))

    [(title, header, body)] = report.leaderboard_sections(table, "passkey")
    assert title == "passkey: compression leaderboard (score by compression ratio)"
    assert header == ["model", "press", "0", "0.5", "0.6", "0.75"]
    assert body == [
        ["m", "dense", "90.0 (+0.0)", "", "", ""],
        ["m", "composed", "", "", "60.0 (-30.0)", ""],
        ["m", "knorm", "", "40.0 (-60.0) [1/2]", "", ""],
        ["m", "snapkv (compression.window_size=32)", "", "80.0 (-10.0)", "", "40.0 (-50.0)"],
        ["m", "snapkv (compression.window_size=64)", "", "90.0 (+0.0)", "", "50.0 (-40.0)"],
    ]
    # the report shows it after the benchmark's own table, and only where a press ran
    assert [t for t, _, _ in report.sections(table)] == ["passkey", title]
    out = tmp_path / "report"
    assert report.main([str(tmp_path), "--out", str(out), "--no-plots", "--format", "md,json"]) == 0
    assert f"### {title}" in (out / "report.md").read_text()
    rows = json.loads((out / "report.json").read_text())["benchmarks"]["passkey"]["rows"]
    ratios = {(r["sparse"], r["compression_ratio"], r["average"]["score"]) for r in rows}
    assert {("dense", 0.0, 90.0), ("oracle_topk", None, 70.0), ("composed", 0.6, 60.0),
            ("knorm", 0.5, 40.0)} <= ratios  # the leaderboard's numbers
    knorm = next(r for r in rows if r["method"] == "knorm")
    assert [c["compression"] for c in knorm["cells"].values()] == [0.5]


def test_no_leaderboard_without_a_press(tree: Path) -> None:
    table = report.build_table(report.read_jobs(tree))
    assert report.leaderboard_sections(table, "passkey") == []
    assert [t for t, _, _ in report.sections(table)] == ["passkey"]


def test_more_than_ten_methods_stay_apart_on_the_plot(tmp_path: Path) -> None:
    """Past the 10 colours a method gets the first colours again with another line style, and a
    panel with many curves has its legend beside it, not over the points."""
    write_job(tmp_path, config("m", "dense", "1k"), score=90.0, density=[1.0])
    methods = [f"press{i:02d}" for i in range(12)]
    for i, method in enumerate(methods):
        for ratio in (0.5, 0.75):
            write_job(tmp_path, press_config(method, "1k", ratio), score=float(i), density=[1.0],
                      compression=ratio)
    fig = report.plot_figure(report.build_table(report.read_jobs(tmp_path)), "passkey", "compression")
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines() if line.get_label() in methods}
    styles = {(line.get_color(), line.get_linestyle()) for line in lines.values()}
    assert len(lines) == len(styles) == 12
    assert lines["press00"].get_color() == lines["press10"].get_color()
    assert (lines["press00"].get_linestyle(), lines["press10"].get_linestyle()) == ("-", "--")
    anchor = ax.get_legend().get_bbox_to_anchor().transformed(ax.transAxes.inverted())
    assert anchor.x0 > 1.0  # right of the panel
