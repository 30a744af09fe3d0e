"""A plain override under a swept config group (`-m sparse=a,b sparse.compression.x=0.5`) is applied
to each job's own composition, not to Hydra's first composition without the sweeps."""

from __future__ import annotations

import re

from sa_bench.launch.hydra_app import sweep_dependent_overrides
from tests.conftest import run_sa_bench


def test_plain_overrides_under_a_swept_group_become_one_value_sweeps():
    argv = ["sa_bench", "-m", "sparse=snapkv,knorm", "sparse.compression.compression_ratio=0.5",
            "benchmark.subsets=[qasper]", "sparse.seed=choice(1,2)", "+sparse.extra=1",
            "output_root=/tmp/x", "model=tiny"]
    assert sweep_dependent_overrides(argv) == [
        "sa_bench", "-m", "sparse=snapkv,knorm", "sparse.compression.compression_ratio=choice(0.5)",
        "benchmark.subsets=[qasper]", "sparse.seed=choice(1,2)", "+sparse.extra=1",
        "output_root=/tmp/x", "model=tiny"]
    single = ["sa_bench", "sparse=snapkv", "sparse.compression.compression_ratio=0.5"]
    assert sweep_dependent_overrides(single) == single  # the group is not swept
    assert sweep_dependent_overrides(["sa_bench", "-m", "sparse=a,b", "sparse.x=["]) == [
        "sa_bench", "-m", "sparse=a,b", "sparse.x=["]  # unparsable: left for Hydra to report


def test_a_sweep_of_presses_at_one_ratio_plans_each_press_with_that_ratio(tmp_path):
    both = run_sa_bench("sparse=snapkv,knorm", "sparse.compression.compression_ratio=0.875",
                        "plan=true", root=tmp_path / "out", check=True).stdout
    alone = run_sa_bench("sparse=snapkv", "sparse.compression.compression_ratio=0.875",
                         "plan=true", root=tmp_path / "out", check=True).stdout
    cells = re.findall(r"pending\s+(\S+)", both)
    assert len(cells) == 4 and {c.split("/")[-4] for c in cells} == {"snapkv", "knorm"}
    assert set(re.findall(r"pending\s+(\S+)", alone)) <= set(cells)  # the same keys as one press
