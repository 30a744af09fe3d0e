"""The wheel carries everything `python -m sa_bench` needs: the config tree, the embedded
model, the sweeper plugin. (.ci/run goes further with scripts/check_wheel.sh: it installs the
wheel in a fresh venv and runs the default job from it.)"""

import shutil
import subprocess
import sys
import zipfile

import pytest

from sa_bench.launch.hydra_app import CONF_DIR
from tests.conftest import ROOT


def test_config_tree_is_found_through_the_package():
    assert (ROOT / "sa_bench" / "conf").is_symlink()  # the tree itself stays at the top: conf/
    assert CONF_DIR == (ROOT / "conf").resolve()
    assert (CONF_DIR / "config.yaml").is_file()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    pytest.importorskip("setuptools")
    out = tmp_path_factory.mktemp("dist")
    src = tmp_path_factory.mktemp("src") / "sa_bench"  # a copy: setuptools builds in-tree
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "outputs", "*.egg-info", "__pycache__", ".*_cache", "data"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = out.glob("sa_bench-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_holds_the_whole_config_tree(wheel):
    names = set(wheel.namelist())
    tree = sorted(p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml"))
    assert tree and "config.yaml" in tree
    missing = [t for t in tree if f"sa_bench/conf/{t}" not in names]
    assert not missing, f"config files missing from the wheel: {missing}"
    assert not any(n.startswith("conf/") for n in names)  # inside the package, not top level


def test_wheel_holds_embedded_model_key_defaults_and_sweeper(wheel):
    names = set(wheel.namelist())
    for needed in ("sa_bench/models/embedded/tiny_retrieval/model.safetensors",
                   "sa_bench/models/embedded/tiny_retrieval/tokenizer.json",
                   "sa_bench/launch/key_defaults.json",
                   "sa_bench/benchmarks/assets/synthetic/essay.txt",
                   "hydra_plugins/sa_bench_sweeper/sa_bench_sweeper.py"):
        assert needed in names, needed
    # a symlink in the wheel would not survive every installer: the files are real copies
    info = wheel.getinfo("sa_bench/conf/config.yaml")
    assert (info.external_attr >> 16) & 0o170000 != 0o120000
    assert wheel.read("sa_bench/conf/config.yaml") == (ROOT / "conf" / "config.yaml").read_bytes()
