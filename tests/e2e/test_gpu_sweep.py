"""On a GPU machine: a real sweep leases GPUs from the pool and runs each job on its lease."""

import json

import pytest

from tests.conftest import run_sa_bench


@pytest.mark.gpu
def test_sweep_runs_each_job_on_its_leased_gpu(tmp_path):
    import torch

    out = tmp_path / "out"
    args = ["sparse=dense,streaming,oracle_topk,hashattn", "benchmark.n_samples=4",
            "pool.devices=auto", "pool.jobs_per_device=2", f"pool.lock_dir={tmp_path / 'locks'}"]
    first = run_sa_bench(*args, root=out, check=True, timeout=900)
    print(first.stdout)
    assert "8 jobs: 0 done (skipped), 8 to run" in first.stdout
    env_files = list(out.rglob("env.json"))
    assert len(env_files) == 8
    for p in env_files:
        lease = json.loads((p.parent / "stats.json").read_text())["lease"]
        assert len(lease["devices"]) == 1 and not lease["simulated"]
        assert lease["devices"][0] < torch.cuda.device_count()
        assert json.loads(p.read_text())["device"] == f"cuda:{lease['devices'][0]}"
    again = run_sa_bench(*args, root=out, check=True)
    assert "8 jobs: 8 done (skipped), 0 to run" in again.stdout
