"""+tracker=mlflow for real (a 2-cell sweep read back through MLflow's client), the W&B
tracker offline when wandb is installed, and what a cell logs."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from sa_bench import tracking
from tests.conftest import ROOT, run_sa_bench
from tests.e2e_support import write_probe_config

needs_mlflow = pytest.mark.skipif(importlib.util.find_spec("mlflow") is None,
                                  reason="mlflow-skinny is not installed (pip install -e '.[dev]')")


def test_numbers_flatten_nested_values_and_average_per_layer_lists() -> None:
    data = {"score": 50, "by_depth": {"0.5": 40.0}, "ok": True, "text": "x",
            "attention": {"density": {"question": [0.1, None, 0.3], "decode": []}}}
    assert tracking.numbers(data) == {"score": 50.0, "by_depth.0.5": 40.0,
                                      "attention.density.question": pytest.approx(0.2)}


def test_cell_metrics_name_densities_and_keep_stats_without_clock_readings() -> None:
    stats = {"total_s": 1.5, "peak_memory_bytes": 1024, "compression": {"kept": 0.25},
             "lease": {"acquired": 1.7e9, "released": 1.7e9, "waited_s": 0.1},
             "attention": {"density": {"prefill": [1.0, 1.0], "question": [0.2, 0.4]}}}
    out = tracking.cell_metrics({"score": 80.0}, stats, density=0.3)
    assert out == {"score": 80.0, "density": 0.3, "density.prefill": 1.0,
                   "density.question": pytest.approx(0.3), "stats.total_s": 1.5,
                   "stats.peak_memory_bytes": 1024.0, "stats.compression.kept": 0.25,
                   "stats.lease.waited_s": 0.1}


def test_wandb_mode_offline_unless_asked_or_logged_in(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert tracking.wandb_mode() == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password k\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert tracking.wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.wandb_mode() == "disabled" and tracking.wandb_mode("offline") == "offline"
    assert tracking.wandb_run_id("a/b", False) == tracking.wandb_run_id("a/b", False)
    assert tracking.wandb_run_id("a/b", True) != tracking.wandb_run_id("a/b", False)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> tuple[Path, list[str], str]:
    """A finished 2-cell sweep run with +tracker=mlflow: (output root, sweep args, stdout)."""
    base = tmp_path_factory.mktemp("tracked")
    write_probe_config(base / "conf")
    args = [f"hydra.searchpath=[file://{base / 'conf'}]", "benchmark=probe", "+tracker=mlflow"]
    root = base / "out"
    done = run_sa_bench(*args, root=root, env={"PYTHONPATH": str(ROOT)}, check=True)
    return root, args, done.stdout


def job_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("*/*/*/*/*/done.json"))


def cell_runs(root: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking.MlflowTracker().uri(root))
    experiment = client.get_experiment_by_name("sa_bench")
    return client.search_runs([experiment.experiment_id], "tags.`sa_bench.kind` = 'cell'")


@pytest.mark.e2e  # starts `python -m sa_bench` in a subprocess
@needs_mlflow
def test_a_sweep_logs_one_run_per_cell_read_back_by_mlflow(tracked) -> None:
    from mlflow.tracking import MlflowClient

    root, _, stdout = tracked
    assert "Tracker: 2 run(s) logged to sqlite:///" in stdout and "not logged" not in stdout
    runs = {r.data.tags["sa_bench.cell"]: r for r in cell_runs(root)}
    dirs = job_dirs(root)
    assert sorted(runs) == [d.relative_to(root).as_posix() for d in dirs]
    client = MlflowClient(tracking_uri=tracking.MlflowTracker().uri(root))
    for path in dirs:
        run = runs[path.relative_to(root).as_posix()]
        metrics = json.loads((path / "metrics.json").read_text())
        stats = json.loads((path / "stats.json").read_text())
        params, logged = run.data.params, run.data.metrics
        assert params["model.name"] == "tiny" and params["sparse.name"] == "dense"
        assert params["benchmark.name"] == "probe" and params["benchmark.subset"] == path.parent.name
        assert params["key"] == path.name == run.data.tags["sa_bench.key"]
        assert logged["score"] == metrics["score"] and logged["density"] == 1.0
        assert logged["stats.total_s"] == pytest.approx(stats["total_s"])
        assert logged["stats.peak_memory_bytes"] == stats["peak_memory_bytes"]
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"metrics.json", "stats.json", "predictions.jsonl"} <= names
    assert len({r.data.tags["sa_bench.sweep"] for r in runs.values()}) == 1
    experiment = client.get_experiment_by_name("sa_bench").experiment_id
    sweep = client.search_runs([experiment], "tags.`sa_bench.kind` = 'sweep'")
    assert len(sweep) == 1
    assert sweep[0].data.tags["sa_bench.sweep"] == next(iter(runs.values())).data.tags["sa_bench.sweep"]
    report = {a.path for a in client.list_artifacts(sweep[0].info.run_id, "report")}
    assert {"report/plot_probe.png", "report/report.html", "report/report.md"} <= report


@pytest.mark.e2e  # starts `python -m sa_bench` in a subprocess
@needs_mlflow
def test_a_rerun_logs_nothing_new(tracked, monkeypatch) -> None:
    root, args, _ = tracked
    before = sorted(r.info.run_id for r in cell_runs(root))
    again = run_sa_bench(*args, root=root, env={"PYTHONPATH": str(ROOT)}, check=True)
    assert "2 jobs: 2 done (skipped), 0 to run" in again.stdout and "Tracker" not in again.stdout
    # the same cells handed to the tracker again (as a backfill would): found by their tags
    assert tracking.MlflowTracker().log_dirs(root, job_dirs(root)) == 0
    monkeypatch.setenv(tracking.SWEEP_ENV, "backfill-test")
    assert tracking.main([str(root)]) == 0
    assert sorted(r.info.run_id for r in cell_runs(root)) == before


@pytest.mark.e2e  # starts `python -m sa_bench` in a subprocess
@needs_mlflow
def test_a_deliberate_rerun_is_a_new_run_and_a_broken_store_fails_no_cell(
        tracked, tmp_path, monkeypatch) -> None:
    root = tmp_path / "out"
    shutil.copytree(tracked[0], root)
    first = job_dirs(root)[0]
    assert tracking.MlflowTracker().log_dirs(root, [first], rerun=True) == 1
    assert len(cell_runs(root)) == 3
    # a store that cannot be written: the job is done all the same, the summary says it once
    _, args, _ = tracked
    broken = tmp_path / "not-a-dir"
    broken.write_text("")
    run = run_sa_bench(*args, "benchmark.subsets=[1k]", "overwrite=true",
                       f"hydra.callbacks.tracker.tracking_uri=sqlite:///{broken}/x.db",
                       root=root, env={"PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 done, 0 skipped, 0 failed" in run.stdout
    assert run.stdout.count("Tracker: 1 cell(s) not logged") == 1
    assert "python -m sa_bench.tracking" in run.stdout


@pytest.mark.e2e  # starts `python -m sa_bench` in a subprocess
@pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                    reason="wandb is not installed (pip install 'sa_bench[wandb]')")
def test_wandb_offline_logs_each_cell_once(tracked, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv(tracking.SWEEP_ENV, "test-sweep")
    root = tmp_path / "out"
    shutil.copytree(tracked[0], root, ignore=shutil.ignore_patterns(".sa_bench"))
    tracker = tracking.WandbTracker()
    dirs = job_dirs(root)
    assert tracker.log_dirs(root, dirs) == 2
    assert tracker.log_dirs(root, dirs) == 0
    for path in dirs:
        cell = path.relative_to(root).as_posix()
        run_id = tracking.wandb_run_id(cell, False)
        [run] = (root / ".sa_bench" / "wandb" / "wandb").glob(f"offline-run-*-{run_id}")
        assert cell.encode() in (run / f"run-{run_id}.wandb").read_bytes()
    assert tracking.error_note(root) is None
