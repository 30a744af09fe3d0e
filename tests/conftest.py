import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
FIXTURES = TESTS / "fixtures"  # benchmark rows in official formats, reference outputs
DATA = TESTS / "data"  # result trees of earlier key schemes


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def run_sa_bench(*args: str, root: Path, timeout: float = 300, check: bool = False,
                 env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m sa_bench` in a subprocess with its output root under `root`."""
    cmd = [sys.executable, "-m", "sa_bench", f"output_root={root}", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=root.parent)
    if check and proc.returncode != 0:
        raise AssertionError(f"sa_bench failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session", autouse=True)
def own_lock_dir(tmp_path_factory):
    """The pool's default lock directory for this test session alone (SA_BENCH_LOCK_DIR, seen by
    every sweep a test starts too): no test waits for a device leased by another process's sweep
    on this machine, and no test holds one that a real sweep waits for."""
    path = tmp_path_factory.mktemp("pool-locks")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SA_BENCH_LOCK_DIR", str(path))
        yield path


@pytest.fixture
def sa_bench_cli():
    return run_sa_bench


@pytest.fixture
def install():
    """`install(method, model, implementation="sdpa", tokenizer=None)` puts a SparseMethod on a
    model for the rest of the test (the method's own context manager, exited at teardown)."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        def put(method, model, implementation="sdpa", tokenizer=None):
            return stack.enter_context(method.installed(model, implementation, tokenizer))

        yield put


def skip_with_reason(reason: str) -> None:
    """Skip visibly: the reason also goes to the log (a reference or cluster that cannot run)."""
    print(f"\nSKIPPED: {reason}", flush=True)
    pytest.skip(reason)


def build_venv(venv: Path, what: str, packages: list[str], timeout: float) -> Path:
    """A fresh venv at `venv` with torch pinned to this one's version and `packages`
    (another project's pins in their own environment); skips visibly when it cannot be made.
    Returns its python."""
    import time

    import torch

    python = venv / "bin" / "python"
    start = time.monotonic()
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True,
                       capture_output=True, timeout=120)
        proc = subprocess.run([str(python), "-m", "pip", "install", "-q",
                               f"torch=={torch.__version__.split('+')[0]}", *packages],
                              capture_output=True, text=True, timeout=timeout)
    except (subprocess.SubprocessError, OSError) as exc:
        skip_with_reason(f"could not create the {what} venv in {venv}: {exc}")
    if proc.returncode != 0:
        skip_with_reason(f"pip install {what} into {venv} failed: {proc.stderr.strip()[-800:]}")
    print(f"\n{what} venv {venv} made in {time.monotonic() - start:.0f}s", flush=True)
    return python
