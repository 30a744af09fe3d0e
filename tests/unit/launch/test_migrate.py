"""`python -m sa_bench.migrate`: result trees of earlier key schemes found done after one move.

tests/data/legacy_v1 was written by the first scheme (key = hash of the raw config);
tests/data/legacy_v2 by commit e14f8da (`python -m sa_bench -m sparse=dense,streaming
benchmark.n_samples=2`), the scheme before maskers were keyed in order and files by their
full content.
"""

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sa_bench import migrate
from sa_bench.launch import jobdir
from tests.conftest import DATA, ROOT, run_sa_bench


def tree(tmp_path: Path, name: str) -> Path:
    out = tmp_path / "out"
    shutil.copytree(DATA / name, out)
    return out


def cells(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob(jobdir.MARKER))


@pytest.mark.e2e  # starts `python -m sa_bench` in a subprocess
def test_scheme_2_tree_is_moved_to_todays_keys_and_found_done(tmp_path):
    out = tree(tmp_path, "legacy_v2")
    before = cells(out)
    assert len(before) == 4
    proc = run_sa_bench("sparse=dense,streaming", "benchmark.n_samples=2", "plan=true", root=out,
                        check=True)
    assert proc.stdout.startswith("4 jobs: 0 done (skipped), 4 to run")  # new keys: not found
    assert cells(out) == before  # a plan changes nothing
    cli = subprocess.run([sys.executable, "-m", "sa_bench.migrate", str(out)], capture_output=True,
                         text=True, check=True)
    assert "4 finished cells moved to today's keys, 0 left" in cli.stdout, cli.stdout
    assert all("(scheme 2)" in line for line in cli.stdout.splitlines()[:4])
    proc = run_sa_bench("sparse=dense,streaming", "benchmark.n_samples=2", "plan=true", root=out,
                        check=True)
    assert proc.stdout.startswith("4 jobs: 4 done (skipped), 0 to run"), proc.stdout
    after = cells(out)
    assert {p.parent for p in after} == {p.parent for p in before}
    for cell in after:
        marker = jobdir.read_json(cell / jobdir.MARKER)
        assert marker["schema"] == jobdir.SCHEMA and marker["migrated_from"] != cell.name
    again = migrate.migrate(out)
    assert again == ([], [])  # nothing left to move


@pytest.mark.e2e  # starts `python -m sa_bench` in a subprocess
def test_scheme_1_tree_is_moved_too(tmp_path):
    out = tree(tmp_path, "legacy_v1")
    moved, left = migrate.migrate(out)
    assert len(moved) == 4 and left == [] and all("(scheme 1)" in m for m in moved)
    proc = run_sa_bench("sparse=dense,streaming", "benchmark.n_samples=2", "plan=true", root=out,
                        check=True)
    assert "4 jobs: 4 done (skipped), 0 to run" in proc.stdout, proc.stdout


def test_a_cell_whose_config_no_longer_gives_its_key_is_left(tmp_path):
    out = tree(tmp_path, "legacy_v2")
    victim = cells(out)[0]
    cfg = yaml.safe_load((victim / jobdir.CONFIG).read_text())
    edited = copy.deepcopy(cfg)
    edited["seed"] = 7  # not the config it ran with
    (victim / jobdir.CONFIG).write_text(yaml.safe_dump(edited))
    moved, left = migrate.migrate(out)
    assert len(moved) == 3 and len(left) == 1 and str(victim) in left[0]
    assert "not its config's under any earlier scheme" in left[0]
    assert victim.is_dir()


def test_dry_run_moves_nothing(tmp_path):
    out = tree(tmp_path, "legacy_v2")
    before = cells(out)
    moved, left = migrate.migrate(out, dry_run=True)
    assert len(moved) == 4 and cells(out) == before


def test_a_scheme_1_config_without_a_field_now_in_the_key_is_left():
    """A legacy LooGLE cell ran without the repetition penalty its config did not name."""
    from sa_bench.fingerprint import FingerprintCache
    from sa_bench.launch.identity import Inputs, identity_values
    from sa_bench.spec import JobSpec

    cfg = yaml.safe_load((DATA / "legacy_v1/tiny/dense/passkey/1k/f1627d3a8373/config.yaml").read_text())
    inputs = Inputs("cpu", False, FingerprintCache())
    assert migrate._filled_by_code(identity_values(JobSpec.from_dict(cfg), inputs), cfg) == []
    old = copy.deepcopy(cfg)
    old["benchmark"] = yaml.safe_load((ROOT / "conf/benchmark/loogle.yaml").read_text())
    old["benchmark"].pop("generation")
    old["benchmark"]["subset"] = "shortdep_qa"
    missing = migrate._filled_by_code(identity_values(JobSpec.from_dict(old), inputs), old)
    assert missing == ["benchmark.generation"]
