"""Everything under tests/e2e/ starts `python -m sa_bench` (or a cluster) in a subprocess: all of
it is marked `e2e`, so `python -m pytest -m "not e2e"` runs the unit tests alone. (Unit files mark
their few tests that start a sweep one by one.)"""

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    # a conftest's hook sees every collected item, not only those below it: filter by path
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def probe_conf(tmp_path_factory) -> Path:
    """A user's conf folder holding the probe benchmark (tests.e2e_support), one per session."""
    from tests.e2e_support import write_probe_config

    folder = tmp_path_factory.mktemp("userconf")
    write_probe_config(folder)
    return folder


def probe_args(conf: Path) -> list[str]:
    return [f"hydra.searchpath=[file://{conf}]", "benchmark=probe"]


@pytest.fixture(scope="session")
def finished_sweep(tmp_path_factory, probe_conf):
    """The probe sweep (tiny/dense/probe, 2 cells x 2 samples), run once per session and finished:
    `(output root, the sweep's CompletedProcess)`. Tests only read this tree; a test that changes
    it (a fault, a rerun) works on `shutil.copytree` of it."""
    from tests.conftest import ROOT, run_sa_bench

    out = tmp_path_factory.mktemp("finished") / "out"
    proc = run_sa_bench(*probe_args(probe_conf), root=out, env={"PYTHONPATH": str(ROOT)}, check=True)
    return out, proc
