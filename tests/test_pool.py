import multiprocessing as mp
import os
import signal
import time

import pytest

from sa_bench.config import ConfigError, build
from sa_bench.launch.pool import PoolConfig, lease


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
    assert PoolConfig(devices="cpu").n_parallel() == 1
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
