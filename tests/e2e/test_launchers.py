"""Beyond one machine: the SLURM (submitit) and Ray launchers.

Unit tests: the pool under a scheduler leases only the GPUs it was given; the launcher presets
compose. Cluster tests (marker `cluster`): a real single-node SLURM cluster on localhost
(scripts/slurm_cluster.sh) and a local Ray instance each run a 4-cell sweep, then a rerun must
submit nothing. A cluster that cannot start skips its test with the reason.
"""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sa_bench.launch.pool import PoolConfig, lease
from tests.conftest import ROOT, build_venv, run_sa_bench, skip_with_reason
from tests.e2e_support import write_probe_config

JOB_FILES = ["predictions.jsonl", "metrics.json", "config.yaml", "stats.json", "env.json", "done.json"]
SWEEP = ["seed=0,1", "benchmark=passkey", "benchmark.n_samples=2", "pool.simulate=true"]


@pytest.fixture
def sweep(tmp_path):
    """The 4-cell sweep, with a pool of its own (other sweeps on this machine lease GPU "0" too)."""
    return [*SWEEP, f"pool.lock_dir={tmp_path / 'locks'}"]
SCRIPT = ROOT / "scripts" / "slurm_cluster.sh"
SLURM_DIR = Path(os.environ.get("SA_BENCH_SLURM_DIR", "/tmp/sa_bench-slurm"))
RAY_VENV = Path(os.environ.get("SA_BENCH_RAY_VENV", Path.home() / ".cache" / "sa_bench" / "ray-venv"))


# ---------------------------------------------------------------- the pool under a scheduler

def test_pool_sees_only_the_gpus_the_scheduler_assigned(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    cfg = PoolConfig(devices="auto")
    assert cfg.gpu_ids() == [0, 1] and cfg.n_parallel() == 2
    assert PoolConfig(devices="auto", devices_per_job=2).n_parallel() == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    assert PoolConfig(devices="auto").gpu_ids() == [0]


def test_jobs_given_different_gpus_on_one_node_do_not_share_a_lease(tmp_path, monkeypatch):
    """Two scheduler jobs on one node both see their GPU as index 0: their leases must differ."""
    cfg = dict(devices="auto", simulate=True, lock_dir=str(tmp_path), poll_seconds=0.01)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    with lease(PoolConfig(**cfg)) as first:
        assert first.devices == [0] and Path(first.slots[0]).name == "dev-2.slot-0.lock"
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
        start = time.monotonic()
        with lease(PoolConfig(**cfg)) as second:
            assert second.devices == [0] and Path(second.slots[0]).name == "dev-3.slot-0.lock"
        assert time.monotonic() - start < 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1a2b/MIG-3")
    with lease(PoolConfig(**cfg)) as held:
        assert Path(held.slots[0]).name == "dev-GPU-1a2b_MIG-3.slot-0.lock"


# ---------------------------------------------------------------- launcher presets

def compose_launcher(*overrides: str):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import sa_bench.launch.resolvers  # noqa: F401

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


def test_local_preset_takes_n_jobs_from_the_pool():
    launcher = compose_launcher("pool.devices=[0,1,2,3]", "pool.devices_per_job=2")
    assert launcher["_target_"].endswith("JoblibLauncher") and launcher["n_jobs"] == 2


def test_slurm_preset_requests_the_pool_gpus(slurm_extra):
    launcher = compose_launcher("hydra/launcher=slurm", "pool.devices_per_job=2", "output_root=/o",
                                "hydra.launcher.partition=gpu", "hydra.launcher.array_parallelism=8")
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["gpus_per_node"] == 2
    assert launcher["submitit_folder"] == "/o/.submitit/%j"
    assert (launcher["partition"], launcher["array_parallelism"]) == ("gpu", 8)
    plain = compose_launcher("hydra/launcher=submitit_slurm")  # the plugin's own config composes too
    assert "n_jobs" not in plain


# ---------------------------------------------------------------- helpers for cluster sweeps

def job_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("done.json"))


def check_sweep_results(out: Path, gpus: set[str]) -> None:
    """4 finished cells, each on one of the scheduler's GPUs, leases never waited for another."""
    dirs = job_dirs(out)
    assert len(dirs) == 4, dirs
    spans: list[tuple[str, float, float]] = []
    for d in dirs:
        for name in JOB_FILES:
            assert (d / name).is_file(), d / name
        assert json.loads((d / "done.json").read_text())["key"] == d.name
        assert len((d / "predictions.jsonl").read_text().splitlines()) == 2
        held = json.loads((d / "stats.json").read_text())["lease"]
        visible = json.loads((d / "env.json").read_text())["cuda_visible_devices"]
        assert held["devices"] == [0] and held["simulated"] is True, held
        assert visible in gpus, visible
        assert held["waited_s"] < 3, f"{d}: waited {held['waited_s']:.1f}s for a lease"
        for other, start, end in spans:  # one GPU is never held by two jobs at once
            assert other != visible or end <= held["acquired"] or held["released"] <= start
        spans.append((visible, held["acquired"], held["released"]))
    # the same cells, directories and markers as with the default (joblib) launcher
    plan = run_sa_bench(*SWEEP, "plan=true", root=out, env={"PYTHONPATH": str(ROOT)}, check=True)
    assert "4 jobs: 4 done (skipped), 0 to run" in plan.stdout
    for d in dirs:
        assert f"done     {d}" in plan.stdout
        assert not list(d.rglob(".submitit")), "submitit files inside a job directory"


# ---------------------------------------------------------------- SLURM

def ensure_extra(name: str, module: str) -> None:
    """pip-install an optional extra of sa_bench into this venv if its module is missing."""
    if importlib.util.find_spec(module) is not None:
        return
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", f"{ROOT}[{name}]"],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        skip_with_reason(f"pip install of the {name} extra failed: {proc.stderr.strip()[-500:]}")


@pytest.fixture(scope="module")
def slurm_extra():
    ensure_extra("slurm", "hydra_plugins.hydra_submitit_launcher")
    importlib.invalidate_caches()
    import hydra_plugins.hydra_submitit_launcher.config  # noqa: F401  (registers its configs)


@pytest.fixture(scope="module")
def slurm_cluster(slurm_extra):
    env = {**os.environ, "SA_BENCH_SLURM_DIR": str(SLURM_DIR), "SA_BENCH_SLURM_GPUS": "2"}
    was_up = subprocess.run([str(SCRIPT), "status"], env=env, capture_output=True).returncode == 0
    start = time.monotonic()
    try:
        proc = subprocess.run([str(SCRIPT), "start"], env=env, capture_output=True, text=True,
                              timeout=420)
    except subprocess.TimeoutExpired:
        skip_with_reason("scripts/slurm_cluster.sh start did not finish in 420 s")
    if proc.returncode != 0:
        lines = (proc.stdout + proc.stderr).splitlines()
        why = [line for line in lines if "FAILED" in line] + [line for line in lines if "FAILED" not in line]
        skip_with_reason("the SLURM cluster did not start: " + "\n".join(why))
    print(f"\nSLURM cluster ready in {time.monotonic() - start:.0f}s", flush=True)
    yield {"SLURM_CONF": str(SLURM_DIR / "slurm.conf"), "PYTHONPATH": str(ROOT)}
    if not was_up:
        subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)


def slurm_jobs() -> set[str]:
    """Every job the test cluster holds or finished recently ("<id> <name>"; MinJobAge=600)."""
    proc = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i %j"], capture_output=True, text=True,
                          env={**os.environ, "SLURM_CONF": str(SLURM_DIR / "slurm.conf")}, check=True)
    return set(proc.stdout.splitlines())


@pytest.mark.cluster
def test_slurm_sweep_then_rerun_submits_nothing(slurm_cluster, sweep, tmp_path):
    out = tmp_path / "out"
    args = [*sweep, "hydra/launcher=slurm", "hydra.launcher.array_parallelism=2",
            "hydra.launcher.timeout_min=15"]
    before = slurm_jobs()
    first = run_sa_bench(*args, root=out, env=slurm_cluster, timeout=600, check=True)
    assert "4 jobs: 0 done (skipped), 4 to run" in first.stdout
    assert "4 done, 0 skipped, 0 failed" in first.stdout
    new = slurm_jobs() - before
    assert len(new) == 4 and all(j.endswith(" sa_bench") for j in new), new  # one array of 4
    check_sweep_results(out, gpus={"0", "1"})
    submitted = sorted(p.name for p in (out / ".submitit").iterdir())

    seen = slurm_jobs()
    again = run_sa_bench(*args, root=out, env=slurm_cluster, timeout=300, check=True)
    assert "4 jobs: 4 done (skipped), 0 to run" in again.stdout
    assert not slurm_jobs() - seen, "a finished sweep submitted SLURM jobs"
    assert sorted(p.name for p in (out / ".submitit").iterdir()) == submitted


@pytest.mark.cluster
def test_slurm_failed_cell_is_isolated_then_retried(slurm_cluster, tmp_path):
    conf = tmp_path / "userconf"
    write_probe_config(conf)  # passkey, plus a failure injected by environment variable
    out = tmp_path / "out"
    args = [f"hydra.searchpath=[file://{conf}]", "benchmark=probe", "pool.simulate=true",
            f"pool.lock_dir={tmp_path / 'locks'}", "hydra/launcher=slurm", "hydra.launcher.timeout_min=15"]
    failed = run_sa_bench(*args, root=out, env={**slurm_cluster, "SA_BENCH_TEST_FAIL": "2k"}, timeout=600)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "1 done, 0 skipped, 1 failed" in failed.stdout
    assert "RuntimeError: injected failure for subset 2k" in failed.stdout
    bad = next((out / "tiny/dense/probe/2k").iterdir())
    assert (bad / "error.txt").is_file() and not (bad / "done.json").exists()
    seen = slurm_jobs()
    retry = run_sa_bench(*args, root=out, env=slurm_cluster, timeout=600, check=True)
    assert "2 jobs: 1 done (skipped), 1 to run" in retry.stdout
    assert len(slurm_jobs() - seen) == 1  # only the failed cell went back to the queue
    assert (bad / "done.json").is_file() and not (bad / "error.txt").exists()


# ---------------------------------------------------------------- Ray

def ray_python() -> Path:
    """A separate venv with sa_bench[ray] (it pins cloudpickle<3), made once and cached."""
    python = RAY_VENV / "bin" / "python"
    stamp = RAY_VENV / "sa_bench-pyproject.toml"  # rebuilt when the dependencies change
    pyproject = (ROOT / "pyproject.toml").read_text()
    ok = python.exists() and stamp.exists() and stamp.read_text() == pyproject and subprocess.run(
        [str(python), "-c", "import hydra_plugins.hydra_ray_launcher, ray, torch, sa_bench"],
        capture_output=True).returncode == 0
    if ok:
        return python
    build_venv(RAY_VENV, "sa_bench[ray]", ["-e", f"{ROOT}[ray]"], timeout=900)
    stamp.write_text(pyproject)
    return python


def ray_sessions() -> set[str]:
    root = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray"
    return {p.name for p in root.glob("session_2*")} if root.exists() else set()


def run_in(python: Path, *args: str, root: Path, timeout: float) -> subprocess.CompletedProcess:
    cmd = [str(python), "-m", "sa_bench", f"output_root={root}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=root.parent)
    assert proc.returncode == 0, f"sa_bench failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.cluster
def test_ray_sweep_then_rerun_launches_nothing(sweep, tmp_path):
    python = ray_python()
    out = tmp_path / "out"
    # a new local Ray instance (even if a `ray start` cluster runs here) with 2 declared GPUs;
    # each task asks for pool.devices_per_job = 1
    args = [*sweep, "hydra/launcher=ray_cluster", "hydra.launcher.ray.init.address=local",
            "+hydra.launcher.ray.init.num_gpus=2",
            "+hydra.launcher.ray.init.num_cpus=2", "+hydra.launcher.ray.init.include_dashboard=false"]
    start = time.monotonic()
    try:
        first = run_in(python, *args, root=out, timeout=600)
    except subprocess.TimeoutExpired:
        skip_with_reason("the Ray sweep did not finish in 600 s")
    print(f"\nRay sweep: {time.monotonic() - start:.0f}s", flush=True)
    assert "4 jobs: 0 done (skipped), 4 to run" in first.stdout
    assert "4 done, 0 skipped, 0 failed" in first.stdout
    check_sweep_results(out, gpus={"0", "1"})

    sessions = ray_sessions()
    again = run_in(python, *args, root=out, timeout=300)
    assert "4 jobs: 4 done (skipped), 0 to run" in again.stdout
    assert ray_sessions() == sessions, "a finished sweep started Ray"
