"""End to end: the sweep's status never lies (issue 13, "Status that cannot lie" 1-9, and the
offline console). Each test runs `python -m sa_bench` (or the report) in a subprocess the way
a user would, after injecting the fault on disk."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sa_bench.launch import jobdir
from tests.conftest import ROOT, run_sa_bench
from tests.e2e.conftest import probe_args
from tests.e2e_support import write_probe_config


def env(**extra: str) -> dict:
    return {"PYTHONPATH": str(ROOT), **extra}


@pytest.fixture
def conf(probe_conf) -> Path:
    return probe_conf


@pytest.fixture
def finished(finished_sweep) -> Path:
    """An output root holding the probe sweep (2 cells), finished: the session's (tests/e2e/conftest.py),
    which every test here copies before changing anything."""
    return finished_sweep[0]


def copy_of(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(finished, out, ignore=shutil.ignore_patterns(".sa_bench"))
    return out


def cell(out: Path, subset: str) -> Path:
    (path,) = (out / "tiny/dense/probe" / subset).iterdir()
    return path


def mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"needs mount privileges (root): {proc.stderr.strip()}")


def fill(folder: Path) -> None:
    """Write into `folder` until its file system is full."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)


# 1 ---------------------------------------------------------------------------------------------


def test_leftover_running_file_does_not_make_a_cell_busy(tmp_path, conf, finished):
    """A running.json left by a killed job, naming a live PID on this host (a reused PID), must
    not make the cell look busy: only the per-job lock, held by a live process, does."""
    out = copy_of(finished, tmp_path)
    victim = cell(out, "1k")
    (victim / jobdir.MARKER).unlink()
    (victim / jobdir.RUNNING).write_text(json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}))
    # while a live process holds the lock, the cell is running ...
    lock = jobdir.JobLock(victim)
    assert lock.try_acquire()
    plan = run_sa_bench(*probe_args(conf), "plan=true", root=out, env=env(), check=True)
    assert f"running  {victim}" in plan.stdout
    lock.release()
    # ... and once it is gone, the leftover file means nothing
    plan = run_sa_bench(*probe_args(conf), "plan=true", root=out, env=env(), check=True)
    assert f"pending  {victim}" in plan.stdout
    rerun = run_sa_bench(*probe_args(conf), root=out, env=env())
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "2 jobs: 1 done (skipped), 1 to run" in rerun.stdout
    assert "running elsewhere" not in rerun.stdout
    assert jobdir.is_done(victim, victim.name)


# 2 and 8 (malformed LongBench rows) ----------------------------------------------------------------


def longbench_row(_id: str, context: object, answer: str) -> str:
    return json.dumps({"_id": _id, "input": "What is the code?", "context": context,
                       "answers": [answer], "length": 10, "dataset": "x", "language": "en",
                       "all_classes": None})


def test_repeated_ids_get_their_own_predictions_and_bad_rows_are_named(tmp_path):
    data = tmp_path / "longbench"
    data.mkdir()
    (data / "hotpotqa.jsonl").write_text("\n".join([
        longbench_row("same", "The code is 11111.", "11111"),
        longbench_row("same", "The code is 22222.", "22222"),
        longbench_row("other", "The code is 33333.", "33333"),
    ]) + "\n")
    (data / "2wikimqa.jsonl").write_text("\n".join([
        longbench_row("a", "The code is 44444.", "44444"),
        longbench_row("b", 12345, "12345"),
    ]) + "\n")
    out = tmp_path / "out"
    proc = run_sa_bench("benchmark=longbench", "benchmark.subsets=[hotpotqa,2wikimqa]",
                        f"benchmark.data_dir={data}", "max_new_tokens=2", root=out, env=env())
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (good,) = (out / "tiny/dense/longbench/hotpotqa").iterdir()
    records = [json.loads(x) for x in (good / jobdir.PREDICTIONS).read_text().splitlines()]
    assert len(records) == 3 and len({r["id"] for r in records}) == 3
    assert [r["answers"] for r in records] == [["11111"], ["22222"], ["33333"]]
    assert json.loads((good / jobdir.METRICS).read_text())["n"] == 3
    assert (f"{data / '2wikimqa.jsonl'}: row 2: field 'context' should be str, got int"
            in proc.stdout)


# 3 ---------------------------------------------------------------------------------------------


def test_fast_path_sees_quoted_search_paths(tmp_path, finished):
    conf = tmp_path / "userconf"
    write_probe_config(conf)
    out = copy_of(finished, tmp_path)
    args = [f"hydra.searchpath=['file://{conf}']", "benchmark=probe"]  # quoted, as a shell user may
    first = run_sa_bench(*args, root=out, env=env(), check=True)
    assert "2 jobs: 2 done (skipped), 0 to run" in first.stdout
    probe = conf / "benchmark" / "probe.yaml"
    probe.write_text(probe.read_text().replace("subsets: [1k, 2k]", "subsets: [1k, 2k, 3k]"))
    grown = run_sa_bench(*args, root=out, env=env(SA_BENCH_TEST_FAIL="3k"))
    assert "3 jobs: 2 done (skipped), 1 to run" in grown.stdout, grown.stdout


def test_fast_path_does_not_vouch_for_environment_variables(tmp_path, conf, finished):
    out = copy_of(finished, tmp_path)
    args = [*probe_args(conf), "model.name=${oc.env:SA_BENCH_MODEL_NAME}"]
    first = run_sa_bench(*args, root=out, env=env(SA_BENCH_MODEL_NAME="tiny"), check=True)
    assert "2 jobs: 2 done (skipped), 0 to run" in first.stdout
    other = run_sa_bench(*args, root=out,
                         env=env(SA_BENCH_MODEL_NAME="tiny2", SA_BENCH_TEST_FAIL="1k,2k"))
    assert "2 jobs: 0 done (skipped), 2 to run" in other.stdout, other.stdout


# 4 ---------------------------------------------------------------------------------------------


def test_hydra_sweep_dir_is_refused_with_a_pointer_to_output_root(tmp_path, conf):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    proc = run_sa_bench(*probe_args(conf), f"hydra.sweep.dir={elsewhere}", root=out, env=env())
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Config error: hydra.sweep.dir" in proc.stdout and "output_root" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob(jobdir.PREDICTIONS))


# 5 ---------------------------------------------------------------------------------------------


def test_duplicate_device_ids_are_refused_not_waited_for(tmp_path, conf):
    proc = run_sa_bench(*probe_args(conf), "pool.devices=[0,0]", "pool.devices_per_job=2",
                        "pool.simulate=true", f"pool.lock_dir={tmp_path / 'locks'}",
                        root=tmp_path / "out", env=env(), timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Config error: pool.devices: each GPU id may be listed once, got [0, 0]" in proc.stdout


# 6 ---------------------------------------------------------------------------------------------


def test_finished_job_with_unreadable_config_is_listed_by_the_report(tmp_path, finished):
    out = copy_of(finished, tmp_path)
    victim = cell(out, "2k")
    (victim / jobdir.CONFIG).write_bytes(b"\xff\xfe\x00garbage: [")
    proc = subprocess.run([sys.executable, "-m", "sa_bench.report", str(out), "--no-plots"],
                          capture_output=True, text=True, env={**os.environ, **env()})
    assert proc.returncode == 0, proc.stderr
    rel = victim.relative_to(out).as_posix()
    assert (f"unfinished  {rel}: finished, but since then result files went missing or changed: "
            "config.yaml (the next sweep reruns it)") in proc.stdout
    assert rel in (out / "report.md").read_text()
    # a marker that does not list config.yaml vouches for the cell: listed as such
    marker = jobdir.read_json(victim / jobdir.MARKER)
    marker["files"].pop(jobdir.CONFIG)
    jobdir.write_json_atomic(victim / jobdir.MARKER, marker)
    proc = subprocess.run([sys.executable, "-m", "sa_bench.report", str(out), "--no-plots"],
                          capture_output=True, text=True, env={**os.environ, **env()})
    assert (f"no config   {rel}: finished (score 100) but config.yaml is missing or unreadable"
            in proc.stdout), proc.stdout


def test_report_into_a_closed_pipe_ends_quietly(tmp_path):
    root = tmp_path / "out"
    for i in range(1500):  # enough failed jobs to overflow a pipe buffer
        path = root / "m" / "dense" / "passkey" / "1k" / f"key{i:05d}"
        path.mkdir(parents=True)
        (path / jobdir.ERROR).write_text("Traceback\nValueError: " + "x" * 100 + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "sa_bench.report", str(root), "--no-plots"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **env()})
    assert proc.stdout.readline().startswith(b"1500 jobs")
    proc.stdout.close()  # what `| head -1` does
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
    assert (root / "report.md").is_file()


# 7 ---------------------------------------------------------------------------------------------


def test_read_only_output_root_resumes_when_everything_is_finished(tmp_path, conf, finished):
    out = copy_of(finished, tmp_path)
    mount("--bind", str(out), str(out))
    try:
        mount("-o", "remount,bind,ro", str(out))
        with pytest.raises(OSError):
            (out / "probe").write_text("")
        # an argument the fast path has no manifest for: the Hydra path, which plans and
        # would record a manifest
        proc = run_sa_bench(*probe_args(conf), "hydra.launcher.verbose=0", root=out, env=env())
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.startswith("2 jobs: 2 done (skipped), 0 to run")
        assert "Traceback" not in proc.stderr
    finally:
        subprocess.run(["umount", str(out)], check=True)
    # work to do on a read-only root: one line, before anything runs
    (cell(out, "1k") / jobdir.MARKER).unlink()
    mount("--bind", str(out), str(out))
    try:
        mount("-o", "remount,bind,ro", str(out))
        proc = run_sa_bench(*probe_args(conf), root=out, env=env())
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert f"Config error: output_root: jobs need to write there; {out} is not writable" in proc.stdout
    finally:
        subprocess.run(["umount", str(out)], check=True)


# 8 ---------------------------------------------------------------------------------------------


def test_garbage_line_in_predictions_names_file_and_line(tmp_path, conf, finished):
    out = copy_of(finished, tmp_path)
    victim = cell(out, "1k")
    (victim / jobdir.MARKER).unlink()
    lines = (victim / jobdir.PREDICTIONS).read_text().splitlines()
    (victim / jobdir.PREDICTIONS).write_text("\n".join([lines[0], "{garbage", *lines[1:]]) + "\n")
    proc = run_sa_bench(*probe_args(conf), root=out, env=env())
    assert proc.returncode == 1
    assert f"{victim / jobdir.PREDICTIONS} line 2: expected a JSON prediction record" in proc.stdout


def test_disk_full_is_reported_as_such_and_not_relaunched(tmp_path, conf):
    out = tmp_path / "out"
    out.mkdir()
    mount("-t", "tmpfs", "-o", "size=256k", "tmpfs", str(out))
    try:
        fill(out)
        proc = run_sa_bench(*probe_args(conf), root=out, env=env())
    finally:
        subprocess.run(["umount", str(out)], check=True)
    assert proc.returncode != 0
    assert "disk full" in proc.stdout and "No space left on device" in proc.stdout, proc.stdout
    assert "relaunching" not in proc.stdout and "worker process died" not in proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr


def test_disk_filling_up_during_a_job_fails_that_job_and_frees_its_cell(tmp_path, conf):
    """The job's writes (and its error.txt) fail: the cell is reported failed with the disk
    as the reason, its lock is released (not "still running"), and nothing is relaunched."""
    out = tmp_path / "out"
    out.mkdir()
    mount("-t", "tmpfs", "-o", "size=2m", "tmpfs", str(out))
    try:
        cmd = [sys.executable, "-m", "sa_bench", f"output_root={out}", *probe_args(conf),
               "benchmark.n_samples=40", "benchmark.subsets=[1k]"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **env(), "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 240
        while not list(out.rglob(jobdir.PROGRESS)):
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.1)
        fill(out)  # the disk fills up while the job runs
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        subprocess.run(["umount", str(out)], check=True)
    assert proc.returncode == 1, stdout + stderr
    assert "0 done, 0 skipped, 1 failed" in stdout and "still running" not in stdout, stdout
    assert "disk full: [Errno 28] No space left on device" in stdout, stdout
    assert "relaunching" not in stdout


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_prints_one_line_and_leaves_the_cell_unfinished(tmp_path, conf, workers):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "sa_bench", f"output_root={out}", *probe_args(conf),
           "benchmark.n_samples=40", f"pool.jobs_per_device={workers}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env(), "OMP_NUM_THREADS": "1"},
                            start_new_session=True)
    deadline = time.time() + 240
    while not list(out.rglob(jobdir.PROGRESS)):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    time.sleep(1)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole group
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert stderr.strip().splitlines() == [
        "Interrupted. Finished cells are kept; run the same command again to resume."]
    assert not list(out.rglob(jobdir.ERROR))  # interrupted is not failed
    plan = run_sa_bench(*probe_args(conf), "benchmark.n_samples=40", "plan=true", root=out,
                        env=env(), check=True)
    assert "failed" not in plan.stdout


@pytest.mark.parametrize(
    "override, message",
    [
        ("pool.devices=[99]", "pool.devices: GPU id(s) [99] requested but this machine has"),
        ("pool.poll_seconds=-1", "pool.poll_seconds: expected a number > 0, got -1"),
        ("pool.lock_dir=/dev/null", "pool.lock_dir: expected a writable directory; /dev/null is not a directory"),
        ("output_root=/dev/null", "output_root: expected a directory; /dev/null is not a directory"),
        ("seed=${oc.env:SA_BENCH_UNSET_VARIABLE}", "seed: "),
        ("output_root=${oc.env:SA_BENCH_UNSET_VARIABLE}", "output_root: "),
    ],
)
def test_bad_values_fail_in_one_line_before_any_work(tmp_path, conf, override, message):
    out = tmp_path / "out"
    proc = run_sa_bench(*probe_args(conf), override, root=out, env=env(), timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = [ln for ln in proc.stdout.splitlines() if "Config error" in ln]
    assert message in line, line
    if "oc.env" in override:
        assert "SA_BENCH_UNSET_VARIABLE" in line
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not list(tmp_path.rglob(jobdir.PREDICTIONS))


# 9 ---------------------------------------------------------------------------------------------


def test_cell_without_its_result_files_is_not_done(tmp_path, conf, finished):
    out = copy_of(finished, tmp_path)
    victim, intact = cell(out, "1k"), cell(out, "2k")
    marker = json.loads((intact / jobdir.MARKER).read_text())
    assert marker["files"] == {name: (intact / name).stat().st_size
                               for name in jobdir.OUTPUT_FILES}
    (victim / jobdir.METRICS).unlink()
    proc = run_sa_bench(*probe_args(conf), root=out, env=env(), check=True)
    assert "2 jobs: 1 done (skipped), 1 to run" in proc.stdout
    assert (victim / jobdir.METRICS).is_file() and jobdir.is_done(victim, victim.name)


# offline console -------------------------------------------------------------------------------


def test_offline_hub_model_uses_prepared_fallback_quietly(tmp_path, conf):
    """A hub model on a machine without hub access: reachability is decided once, each job
    loads the prepared fallback at once (no retries), the summary names the fallback once,
    and Hydra's per-job launch lines stay off the console."""
    from sa_bench.models.loading import embedded_dir
    from sa_bench.models.smollm2_offline import CONVERTED_NAME

    cache = tmp_path / "cache"
    shutil.copytree(embedded_dir("tiny-retrieval"), cache / CONVERTED_NAME)  # stands in for it
    e = env(SA_BENCH_CACHE=str(cache), HF_ENDPOINT="http://127.0.0.1:9",
            HF_HOME=str(tmp_path / "hf"))
    e_full = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    cmd = [sys.executable, "-m", "sa_bench", f"output_root={tmp_path / 'out'}", *probe_args(conf),
           "model=smollm2-135m", "model.pretrained=sa-bench-test/not-a-model",
           "model.chat_template=false"]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**e_full, **e, "OMP_NUM_THREADS": "1"})
    elapsed = time.time() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    console = proc.stdout + proc.stderr
    assert "Retrying" not in console and "Launching jobs" not in console, console
    assert console.count("offline fallback") == 1, console
    assert str(cache / CONVERTED_NAME) in proc.stdout
    assert elapsed < 60, f"{elapsed:.0f}s: hub retries?"
