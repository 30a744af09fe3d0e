import io
import json
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from sa_bench.config import ConfigError, build
from sa_bench.launch import jobdir, pool
from sa_bench.launch.plan import Cell
from sa_bench.launch.pool import PoolConfig, lease
from sa_bench.launch.progress import Progress


def _hold(cfg_dict, seconds, queue):
    cfg = build(PoolConfig, cfg_dict, "pool")
    with lease(cfg) as held:
        start = time.time()
        time.sleep(seconds)
        queue.put((tuple(held.devices), start, time.time()))


def _run_jobs(cfg_dict, n_jobs, seconds):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_hold, args=(cfg_dict, seconds, queue)) for _ in range(n_jobs)]
    for p in procs:
        p.start()
    records = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join()
    return records


def _max_overlap(intervals):
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    now = peak = 0
    for _, delta in events:
        now += delta
        peak = max(peak, now)
    return peak


def test_each_device_has_at_most_one_job(tmp_path):
    cfg = {"devices": [0, 1], "simulate": True, "lock_dir": str(tmp_path), "poll_seconds": 0.02}
    records = _run_jobs(cfg, 6, 0.3)
    by_device = {}
    for devices, start, end in records:
        assert len(devices) == 1
        by_device.setdefault(devices[0], []).append((start, end))
    assert set(by_device) == {0, 1}
    for intervals in by_device.values():
        assert _max_overlap(intervals) == 1
    assert _max_overlap([(s, e) for _, s, e in records]) == 2  # both devices were busy at once


def test_devices_per_job_takes_distinct_devices(tmp_path):
    cfg = {"devices": [0, 1, 2, 3], "devices_per_job": 2, "simulate": True,
           "lock_dir": str(tmp_path), "poll_seconds": 0.02}
    records = _run_jobs(cfg, 4, 0.3)
    for devices, _, _ in records:
        assert len(set(devices)) == 2
    for dev in range(4):
        assert _max_overlap([(s, e) for d, s, e in records if dev in d]) <= 1


def test_jobs_per_device_shares_one_device(tmp_path):
    cfg = {"devices": [0], "jobs_per_device": 2, "simulate": True, "lock_dir": str(tmp_path),
           "poll_seconds": 0.02}
    records = _run_jobs(cfg, 4, 0.3)
    assert _max_overlap([(s, e) for _, s, e in records]) == 2


def test_lease_released_when_holder_is_killed(tmp_path):
    cfg = {"devices": [0], "simulate": True, "lock_dir": str(tmp_path), "poll_seconds": 0.02}
    ctx = mp.get_context("fork")
    holder = ctx.Process(target=_hold, args=(cfg, 60, ctx.Queue()))
    holder.start()
    time.sleep(0.5)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    start = time.time()
    with lease(build(PoolConfig, cfg, "pool")) as held:
        assert held.devices == [0]
    assert time.time() - start < 5


def test_cpu_pool_and_parallelism():
    assert PoolConfig(devices="cpu", jobs_per_device=1).n_parallel() == 1
    assert PoolConfig(devices="cpu", jobs_per_device=2).n_parallel() == 2
    assert PoolConfig(devices=[0, 1, 2, 3], devices_per_job=2).n_parallel() == 2
    assert PoolConfig(devices=[0, 1], jobs_per_device=3).n_parallel() == 6


def test_auto_follows_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert PoolConfig(devices="auto").gpu_ids() == [0, 1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert PoolConfig(devices="auto").gpu_ids() == []


@pytest.mark.parametrize("data, message", [
    ({"devices": "gpu"}, "pool.devices: expected 'auto', 'cpu' or a list"),
    ({"devices": [0], "devices_per_job": 2}, "pool.devices_per_job: 2 devices per job"),
    ({"jobs_per_device": 0}, "pool.jobs_per_device: expected an int >= 1"),
    ({"jobs_per_device": "many"}, "pool.jobs_per_device: expected 'auto' or an int >= 1, got 'many'"),
    ({"devices": [0, 0], "devices_per_job": 2}, "pool.devices: each GPU id may be listed once"),
    ({"poll_seconds": -1}, "pool.poll_seconds: expected a number > 0, got -1"),
    ({"poll_seconds": 0}, "pool.poll_seconds: expected a number > 0, got 0"),
    ({"lock_dir": "/dev/null"}, "pool.lock_dir: expected a writable directory; /dev/null is not a directory"),
])
def test_bad_pool_config(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        build(PoolConfig, data, "pool")


def test_listed_gpus_must_exist_unless_simulated(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")  # one visible GPU, index 0
    PoolConfig(devices=[0]).check_visible()
    with pytest.raises(ConfigError, match=r"devices: GPU id\(s\) \[1\] requested but this machine has 1"):
        PoolConfig(devices=[0, 1]).check_visible()
    PoolConfig(devices=[0, 1], simulate=True).check_visible()
    with pytest.raises(ConfigError, match="devices: GPU id"):  # the lease refuses too
        with lease(PoolConfig(devices=[5], lock_dir=str(tmp_path))):
            pass


# ---------------------------------------------------------------- a lease that waits says for whom

def _hold_until(cfg_dict, job_dir, queue, release):
    with lease(build(PoolConfig, cfg_dict, "pool"), job_dir=Path(job_dir)):
        queue.put(os.getpid())
        release.wait(60)


def _cell(root: Path, name: str) -> Cell:
    path = root / "out/m/s/b" / name / "key0"
    path.mkdir(parents=True)
    return Cell([], {}, f"m/s/b/{name}/key0", "key0", path)


def _wait_for(predicate, timeout=20.0):
    end = time.time() + timeout
    while time.time() < end:
        found = predicate()
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_waiting_lease_names_its_holder_and_shows_as_waiting(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(pool, "REPORT_AFTER", 0.3)
    cfg = {"devices": "cpu", "jobs_per_device": 1, "lock_dir": str(tmp_path / "locks"),
           "poll_seconds": 0.02}
    holder_cell, waiter = _cell(tmp_path, "holder"), _cell(tmp_path, "waiter")
    ctx = mp.get_context("fork")
    queue, release = ctx.Queue(), ctx.Event()
    holder = ctx.Process(target=_hold_until, args=(cfg, str(holder_cell.path), queue, release))
    holder.start()
    try:
        holder_pid = queue.get(timeout=30)
        slot = tmp_path / "locks" / "dev-cpu.slot-0.lock"
        recorded = pool.read_holder(slot)
        assert (recorded["pid"], recorded["cell"], recorded["device"]) == (
            holder_pid, str(holder_cell.path), "cpu")
        lock = jobdir.JobLock(waiter.path)  # the waiting job runs, as far as its lock says
        assert lock.try_acquire()
        jobdir.mark_running(waiter.path)
        got = []

        def wait_for_lease():
            with lease(build(PoolConfig, cfg, "pool"), job_dir=waiter.path) as held:
                got.append((held.waited, pool.read_holder(slot)))

        thread = threading.Thread(target=wait_for_lease)
        thread.start()
        waiting = _wait_for(lambda: jobdir.read_json(waiter.path / pool.WAITING))
        assert waiting["pid"] == os.getpid() and waiting["wants"] == "a cpu slot"
        assert [(h["pid"], h["cell"]) for h in waiting["holders"]] == [
            (holder_pid, str(holder_cell.path))]
        line = Progress([holder_cell, waiter], stream=io.StringIO()).line()
        assert line.startswith("[sa_bench] 0 done, 0 running, 0 failed, 2 waiting | "), line
        assert (f"m/s/b/waiter waiting for a cpu slot held by pid {holder_pid} on "
                in line and line.endswith("(m/s/b/holder)")), line
        release.set()
        thread.join(30)
        assert not thread.is_alive()
    finally:
        release.set()
        holder.join(30)
    waited, held_by = got[0]
    assert waited >= 0.3 and held_by["pid"] == os.getpid() and held_by["cell"] == str(waiter.path)
    assert not (waiter.path / pool.WAITING).exists()  # gone once the lease is taken
    assert not pool.holder_path(slot).exists()  # and the holder's file at release
    lock.release()
    err = capfd.readouterr().err
    assert err.count("has waited") == 1, err
    assert re.search(rf"job {re.escape(str(waiter.path))} has waited \d+ s for a cpu slot, held by "
                     rf"pid {holder_pid} on \S+ \({re.escape(str(holder_cell.path))}\) "
                     rf"\(pool {re.escape(str(tmp_path / 'locks'))}\)", err), err


def test_stale_holder_and_waiting_files_are_ignored(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    slot = tmp_path / "dev-cpu.slot-0.lock"
    for content in ["{not json", json.dumps([1]), json.dumps({"pid": "x"}),
                    json.dumps({"pid": int(dead), "host": os.uname().nodename})]:
        pool.holder_path(slot).write_text(content)
        assert pool.read_holder(slot) is None
    assert pool.read_holder(tmp_path / "missing.lock") is None
    pool.holder_path(slot).write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    assert pool.read_holder(slot)["pid"] == os.getpid()

    cell = _cell(tmp_path, "a")
    lock = jobdir.JobLock(cell.path)
    assert lock.try_acquire()
    jobdir.mark_running(cell.path)
    jobdir.write_json_atomic(cell.path / jobdir.PROGRESS, {"done": 1, "total": 4})
    me = {"pid": os.getpid(), "host": os.uname().nodename, "holders": "junk"}
    stale = [{**me, "pid": int(dead)}, {**me, "pid": 1}]  # a dead process; not the job's own
    for info in stale:
        jobdir.write_json_atomic(cell.path / pool.WAITING, info)
        assert pool.read_waiting(cell.path) is None
        assert Progress([cell], stream=io.StringIO()).line() == (
            "[sa_bench] 0 done, 1 running, 0 failed, 0 waiting | m/s/b/a 1/4")
    jobdir.write_json_atomic(cell.path / pool.WAITING, me)
    assert pool.read_waiting(cell.path)["holders"] == []
    assert Progress([cell], stream=io.StringIO()).line() == (
        "[sa_bench] 0 done, 0 running, 0 failed, 1 waiting | m/s/b/a waiting for a device slot "
        "held by an unrecorded holder (an older sa_bench, or one just starting)")
    lock.release()
    # a new attempt's lease clears what a killed attempt left
    with lease(PoolConfig(devices="cpu", lock_dir=str(tmp_path / "locks")), job_dir=cell.path):
        assert not (cell.path / pool.WAITING).exists()


# ---------------------------------------------------------------- the default lock directory

def test_tests_lease_in_their_own_lock_dir(own_lock_dir):
    assert os.environ[pool.LOCK_DIR_ENV] == str(own_lock_dir)
    assert PoolConfig().lock_path() == own_lock_dir
    with lease(PoolConfig(devices="cpu", jobs_per_device=1)) as held:
        assert Path(held.slots[0]).parent == own_lock_dir


def test_lock_dir_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv("SA_BENCH_LOCK_DIR", str(tmp_path / "env"))
    assert PoolConfig().lock_path() == tmp_path / "env"
    assert PoolConfig(lock_dir=str(tmp_path / "own")).lock_path() == tmp_path / "own"  # wins
    monkeypatch.setenv("SA_BENCH_LOCK_DIR", "/dev/null/locks")
    with pytest.raises(ConfigError, match="pool.lock_dir: SA_BENCH_LOCK_DIR must name a writable "
                                          "directory; /dev/null/locks cannot be created"):
        build(PoolConfig, {}, "pool")
    monkeypatch.delenv("SA_BENCH_LOCK_DIR")
    assert PoolConfig().lock_path() == Path(tempfile.gettempdir()) / f"sa_bench-pool-{os.getuid()}"


# ---------------------------------------------------------------- jobs_per_device=auto

@pytest.mark.parametrize("omp, cores, slots", [
    ("1", 8, 8), ("3", 8, 2), ("2", 8, 4), ("16", 8, 1), (None, 8, 1), ("bad", 8, 1), ("1", 1, 1),
])
def test_cpu_jobs_per_device_auto_counts_cores_per_job(monkeypatch, omp, cores, slots):
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    monkeypatch.setattr(pool, "usable_cpus", lambda: cores)
    assert PoolConfig().jobs_per_device == "auto"
    assert PoolConfig(devices="cpu").n_parallel() == slots
    assert PoolConfig(devices="cpu").slots_per_device() == slots
    assert PoolConfig(devices="cpu", jobs_per_device=3).n_parallel() == 3  # an int is kept
    assert PoolConfig(devices=[0, 1, 2]).n_parallel() == 3  # one job per GPU
    assert PoolConfig(devices=[0, 1], jobs_per_device=2).n_parallel() == 4


@pytest.mark.parametrize("omp, overlap", [("1", 2), (None, 1)])
def test_cpu_auto_lets_one_thread_jobs_share_the_cpu(tmp_path, monkeypatch, omp, overlap):
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    monkeypatch.setattr(pool, "usable_cpus", lambda: 2)  # inherited by the forked jobs
    cfg = {"devices": "cpu", "lock_dir": str(tmp_path), "poll_seconds": 0.02}
    records = _run_jobs(cfg, 2, 0.5)
    assert _max_overlap([(s, e) for _, s, e in records]) == overlap


def test_pool_validation_and_auto_import_no_torch(tmp_path):
    code = ("import sys; from sa_bench.config import build; from sa_bench.launch.pool import PoolConfig;"
            "c = build(PoolConfig, {'devices': 'cpu', 'jobs_per_device': 'auto'}, 'pool');"
            "print(c.n_parallel(), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout.split()
    assert out == [str(pool.usable_cpus()), "False"]
