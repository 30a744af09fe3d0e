"""End to end: `python -m sa_bench` in a subprocess, joblib launcher, temporary output root."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_sa_bench
from tests.e2e.conftest import probe_args
from tests.e2e_support import write_probe_config

JOB_FILES = ["predictions.jsonl", "metrics.json", "config.yaml", "stats.json", "env.json", "done.json"]


@pytest.fixture
def probe(tmp_path):
    """Args that select the probe benchmark (2 subsets x 2 samples) from a user conf dir."""
    conf = tmp_path / "userconf"
    write_probe_config(conf)
    return [f"hydra.searchpath=[file://{conf}]", "benchmark=probe"]


def env(**extra):
    return {"PYTHONPATH": str(ROOT), **extra}


def job_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("config.yaml") if p.parent.name != ".hydra")


def snapshot(dirs):
    return {str(d / f): (d / f).stat().st_mtime_ns for d in dirs for f in JOB_FILES if (d / f).exists()}


def test_fresh_then_resumed_sweep(tmp_path, probe_conf, finished_sweep):
    shared, first = finished_sweep  # the probe sweep, run fresh once per session
    assert "2 jobs: 0 done (skipped), 2 to run" in first.stdout
    out = tmp_path / "out"  # the rerun works on a copy: the session's tree is only read
    shutil.copytree(shared, out, ignore=shutil.ignore_patterns(".sa_bench"))
    probe = probe_args(probe_conf)
    dirs = job_dirs(out)
    assert [d.relative_to(out).parts[:4] for d in dirs] == [
        ("tiny", "dense", "probe", "1k"), ("tiny", "dense", "probe", "2k")]
    for d in dirs:
        for name in JOB_FILES:
            assert (d / name).is_file(), name
        assert json.loads((d / "done.json").read_text())["key"] == d.name
        assert len((d / "predictions.jsonl").read_text().splitlines()) == 2
        env_info = json.loads((d / "env.json").read_text())
        assert env_info["model_source"]["path"].endswith("tiny_retrieval")
        assert env_info["torch"] and env_info["transformers"] and env_info["device"] == "cpu"
        metrics = json.loads((d / "metrics.json").read_text())
        assert 0 <= metrics["score"] <= 100
        assert f"{metrics['score']:7.2f}  {shared / d.relative_to(out)}" in first.stdout
    before = snapshot(dirs)
    second = run_sa_bench(*probe, root=out, env=env(), check=True)
    assert "2 jobs: 2 done (skipped), 0 to run" in second.stdout
    assert snapshot(dirs) == before


def test_failing_cell_is_isolated_and_retried(tmp_path, probe):
    out = tmp_path / "out"
    failed = run_sa_bench(*probe, root=out, env=env(SA_BENCH_TEST_FAIL="2k"))
    assert failed.returncode != 0
    bad = next(d for d in (out / "tiny/dense/probe/2k").iterdir())
    good = next(d for d in (out / "tiny/dense/probe/1k").iterdir())
    assert "Traceback" in (bad / "error.txt").read_text()
    assert not (bad / "done.json").exists() and (good / "done.json").exists()
    assert "1 done, 0 skipped, 1 failed" in failed.stdout
    assert f"FAILED {bad}" in failed.stdout
    assert "RuntimeError: injected failure for subset 2k" in failed.stdout
    plan = run_sa_bench(*probe, "plan=true", root=out, env=env(), check=True)
    assert f"failed   {bad}" in plan.stdout and f"done     {good}" in plan.stdout
    good_before = snapshot([good])
    retry = run_sa_bench(*probe, root=out, env=env(), check=True)
    assert "2 jobs: 1 done (skipped), 1 to run" in retry.stdout
    assert (bad / "done.json").exists() and not (bad / "error.txt").exists()
    assert snapshot([good]) == good_before


def test_two_sweeps_at_once_run_each_cell_once(tmp_path, probe):
    out = tmp_path / "out"
    log = tmp_path / "loads.log"
    args = [*probe, "seed=0,1"]
    e = {**os.environ, **env(SA_BENCH_TEST_LOG=str(log), SA_BENCH_TEST_SLEEP="1"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "sa_bench", f"output_root={out}", *args]
    procs = [subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    loads = log.read_text().split("\n")[:-1]
    assert len(loads) == 4, loads  # 2 seeds x 2 subsets, each loaded by exactly one sweep
    assert len(job_dirs(out)) == 4
    assert all((d / "done.json").exists() for d in job_dirs(out))


def _wait_for(predicate, timeout=240, step=0.1):
    end = time.time() + timeout
    while time.time() < end:
        found = predicate()
        if found:
            return found
        time.sleep(step)
    raise AssertionError("timed out")


def test_killed_worker_leaves_cell_unfinished_and_rerun_completes_it(tmp_path, probe):
    out = tmp_path / "out"
    args = [*probe, "seed=0,1", "benchmark.n_samples=6", "pool.jobs_per_device=2",
            "hydra.sweeper.launch_attempts=1"]
    e = {**os.environ, **env(), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "sa_bench", f"output_root={out}", *args]
    sweep = subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def running_with_a_prediction():
        for running in out.rglob("running.json"):
            preds = running.parent / "predictions.jsonl"
            if preds.exists() and preds.read_text().count("\n") >= 1:
                try:
                    return running.parent, json.loads(running.read_text())["pid"]
                except (ValueError, OSError):
                    return None
        return None

    victim, pid = _wait_for(running_with_a_prediction)
    os.kill(pid, signal.SIGKILL)
    stdout, _ = sweep.communicate(timeout=600)
    assert sweep.returncode != 0
    assert not (victim / "done.json").exists()
    finished = [d for d in job_dirs(out) if (d / "done.json").exists()]
    before = snapshot(finished)
    kept = (victim / "predictions.jsonl").read_text().splitlines()

    rerun = run_sa_bench(*args, root=out, env=env(), check=True)
    assert f"4 jobs: {len(finished)} done (skipped), {4 - len(finished)} to run" in rerun.stdout
    assert snapshot(finished) == before
    lines = (victim / "predictions.jsonl").read_text().splitlines()
    assert lines[: len(kept)] == kept  # resumed after the last complete line, nothing redone
    assert len(lines) == 6 and len({json.loads(x)["id"] for x in lines}) == 6
    assert (victim / "done.json").exists()


def test_broken_launch_is_relaunched_for_unfinished_cells(tmp_path, probe):
    """With the default launch_attempts a killed worker does not end the sweep."""
    out = tmp_path / "out"
    args = [*probe, "benchmark.n_samples=6", "pool.jobs_per_device=2"]
    e = {**os.environ, **env(), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "sa_bench", f"output_root={out}", *args]
    sweep = subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def a_running_job():
        for running in out.rglob("running.json"):
            try:
                return json.loads(running.read_text())["pid"]
            except (ValueError, OSError):
                return None
        return None

    os.kill(_wait_for(a_running_job), signal.SIGKILL)
    stdout, stderr = sweep.communicate(timeout=600)
    assert sweep.returncode == 0, stdout + stderr
    assert "Launch broke" in stdout and "relaunching" in stdout
    assert all((d / "done.json").exists() for d in job_dirs(out)) and len(job_dirs(out)) == 2


def test_simulated_pool_gives_each_job_its_own_device(tmp_path, probe):
    out = tmp_path / "out"
    run_sa_bench(*probe, "seed=0,1,2", "pool.devices=[0,1]", "pool.simulate=true",
                 f"pool.lock_dir={tmp_path / 'locks'}", "pool.poll_seconds=0.02", "hydra.launcher.n_jobs=4",
                 root=out, env=env(SA_BENCH_TEST_SLEEP="1"), check=True)
    leases = [json.loads((d / "stats.json").read_text())["lease"] for d in job_dirs(out)]
    assert len(leases) == 6
    by_device: dict[int, list] = {}
    for lease in leases:
        assert len(lease["devices"]) == 1 and lease["simulated"]
        by_device.setdefault(lease["devices"][0], []).append((lease["acquired"], lease["released"]))
    assert set(by_device) == {0, 1}
    for intervals in by_device.values():
        intervals.sort()
        assert all(a[1] <= b[0] for a, b in zip(intervals, intervals[1:], strict=False)), intervals
    waited = [lease for lease in leases if lease["waited_s"] > 0.3]
    assert waited, "with 4 workers and 2 devices some jobs must have waited for a lease"
    # while a job waited, both devices were busy
    for lease in waited:
        t = lease["acquired"] - lease["waited_s"] / 2
        busy = {d for d, ivs in by_device.items() for s, e in ivs if s <= t <= e}
        assert busy == {0, 1}


def test_resume_reruns_a_cell_whenever_an_input_outside_conf_changed(tmp_path, probe):
    """Issue 23, item 1: each of these once left a finished cell "done" on an identical
    command (a manifest shortcut that re-derived the plan from argv and file mtimes). Every
    resume now goes through Hydra's composition and the validated config's key."""
    out = tmp_path / "out"
    model = tmp_path / "m"
    shutil.copytree(ROOT / "sa_bench" / "models" / "embedded" / "tiny_retrieval", model)
    user = tmp_path / "user"
    user.mkdir()
    (user / "mymask.py").write_text(
        "from dataclasses import dataclass\n"
        "from sa_bench.attention.maskers import Local\n\n"
        "@dataclass\nclass MyLocal(Local):\n    size: int = 64\n")
    conf = tmp_path / "userconf"
    (conf / "sparse").mkdir(parents=True)
    (conf / "sparse" / "mine.yaml").write_text(
        "name: mine\nmaskers:\n  sink: {_target_: sa_bench.attention.maskers.Sink,"
        " size: '${oc.decode:${oc.env:MY_SINK}}'}\n  local: {_target_: mymask.MyLocal}\n")
    args = [*probe, "sparse=mine", f"model.pretrained={model}", "benchmark.subsets=[1k]"]
    run_env = env(PYTHONPATH=f"{ROOT}:{user}", MY_SINK="4")

    def first_line(**extra) -> str:
        proc = run_sa_bench(*args, root=out, env={**run_env, **extra}, check=True)
        return proc.stdout.splitlines()[0]

    assert first_line() == "1 jobs: 0 done (skipped), 1 to run"
    assert first_line() == "1 jobs: 1 done (skipped), 0 to run"
    # a nested resolver reads another value of the environment variable
    assert first_line(MY_SINK="8") == "1 jobs: 0 done (skipped), 1 to run"
    assert first_line() == "1 jobs: 1 done (skipped), 0 to run"
    # the user's masker class changes its default
    (user / "mymask.py").write_text((user / "mymask.py").read_text().replace("64", "32"))
    assert first_line() == "1 jobs: 0 done (skipped), 1 to run"
    # the local model directory is overwritten in place (other weights, same file names)
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1
    weights.write_bytes(bytes(data))
    assert first_line() == "1 jobs: 0 done (skipped), 1 to run"
    assert len(job_dirs(out)) == 4  # every earlier result is kept in its own directory
