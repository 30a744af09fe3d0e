"""The command line: config errors before any work, plan view, subsets, console script."""

import shutil
import subprocess
import time

import pytest

from tests.conftest import ROOT, run_sa_bench


@pytest.mark.parametrize(
    "override, message",
    [
        ("sparse.measure_error=abc", "sparse.measure_error"),
        ("benchmark.max_samples=0", "benchmark.max_samples: expected an int >= 1"),
        ("pool.jobs_per_device=0", "pool.jobs_per_device: expected an int >= 1"),
        ("+benchmark.bogus=1", "benchmark.bogus: unknown key"),
        ("model.pretrained=/no/such/dir", "model.pretrained"),
        ("max_new_tokens=-3", "max_new_tokens: expected an int >= 1"),
    ],
)
def test_bad_values_fail_before_any_job_runs(tmp_path, override, message):
    out = tmp_path / "out"
    proc = run_sa_bench(override, root=out)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stdout
    assert "nothing was run" in proc.stdout or "Config error" in proc.stdout
    assert not list(out.rglob("predictions.jsonl")) and not list(out.rglob("done.json"))


def test_unknown_key_and_unknown_option_are_refused(tmp_path):
    proc = run_sa_bench("sparse.no_such_key=1", root=tmp_path / "out")
    assert proc.returncode != 0
    assert "Could not override 'sparse.no_such_key'" in proc.stderr
    proc = run_sa_bench("sparse=no_such_method", root=tmp_path / "out")
    assert proc.returncode != 0
    assert "no_such_method" in proc.stderr and "Available options" in proc.stderr


def test_plan_lists_every_cell_and_subsets_narrow(tmp_path):
    out = tmp_path / "out"
    proc = run_sa_bench("seed=0,1", "plan=true", root=out, check=True)
    assert "4 jobs: 0 done (skipped), 4 to run" in proc.stdout
    pending = [ln.split()[1] for ln in proc.stdout.splitlines() if ln.strip().startswith("pending")]
    assert len(set(pending)) == 4
    assert all(p.startswith(str(out / "tiny/dense/passkey")) for p in pending)
    assert not out.exists() or not list(out.rglob("config.yaml"))
    narrowed = run_sa_bench("benchmark.subsets=[2k]", "plan=true", root=out, check=True)
    assert "1 jobs: 0 done (skipped), 1 to run" in narrowed.stdout
    assert "/passkey/2k/" in narrowed.stdout
    # narrowing picks cells; it does not make new ones: same directory as in the full sweep
    full = run_sa_bench("plan=true", root=out, check=True)
    assert narrowed.stdout.splitlines()[1] in full.stdout.splitlines()
    single = run_sa_bench("benchmark.subset=1k", "plan=true", root=out, check=True)
    assert "1 jobs" in single.stdout and "/passkey/1k/" in single.stdout


def test_sweeping_a_parameter_gives_distinct_directories(tmp_path):
    proc = run_sa_bench("benchmark.n_samples=3,4", "benchmark.subsets=[1k]", "plan=true",
                        root=tmp_path / "out", check=True)
    dirs = {ln.split()[1] for ln in proc.stdout.splitlines() if ln.strip().startswith("pending")}
    assert len(dirs) == 2


def test_console_script_matches_module(tmp_path):
    script = shutil.which("sa-bench") or str(ROOT / ".venv/bin/sa-bench")
    out = tmp_path / "out"
    args = [f"output_root={out}", "plan=true"]
    a = subprocess.run([script, *args], capture_output=True, text=True, cwd=tmp_path)
    b = run_sa_bench("plan=true", root=out)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout


def test_default_run_finishes_and_prints_score(tmp_path):
    """The README's main job: `python -m sa_bench` with no arguments (output root aside)."""
    out = tmp_path / "out"
    start = time.time()
    proc = run_sa_bench(root=out, check=True)
    elapsed = time.time() - start
    assert "2 jobs: 0 done (skipped), 2 to run" in proc.stdout
    scores = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("score")]
    assert len(scores) == 2 and all(str(out) in ln for ln in scores)
    print(f"default run took {elapsed:.1f}s")


def test_headline_sweep_plans_every_cell(tmp_path):
    """The command from the project's front page expands to model × method × subset cells."""
    proc = run_sa_bench("model=llama3.1-8b,qwen2.5-7b", "sparse=dense,hashattn,quest",
                        "benchmark=longbench", "plan=true", root=tmp_path / "out")
    # 2 x 3 x 21 subsets; hashattn has no fitted weights for these models on a fresh machine,
    # so the plan lists those cells as invalid (with the reason) and exits 2, as a run would
    assert "126 jobs: 0 done (skipped), 84 to run, 42 invalid" in proc.stdout, proc.stdout[-3000:]
    assert "/llama3.1-8b/quest/longbench/hotpotqa/" in proc.stdout
    assert "invalid  llama3.1-8b/hashattn/longbench/hotpotqa\n" in proc.stdout
    assert "no HashAttention weights" in proc.stdout and proc.returncode == 2
