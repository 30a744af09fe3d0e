"""OmegaConf resolvers the Hydra config uses; registered on import (parent and workers)."""

from __future__ import annotations

import os
from typing import Any

from omegaconf import OmegaConf

from sa_bench.config import build
from sa_bench.launch.identity import job_relpath, local_inputs
from sa_bench.launch.pool import PoolConfig
from sa_bench.spec import JobSpec


def _plain(root: Any) -> dict:
    return {
        k: OmegaConf.to_container(root[k], resolve=True) if OmegaConf.is_config(root[k]) else root[k]
        for k in root
        if k != "hydra"
    }


def _job_path(*, _root_: Any) -> str:
    """The cell's directory below output_root: as the sweeper handed it to the job (`cell`),
    else (a job started without the sweeper) computed here from the validated config."""
    if "cell" in _root_ and _root_.cell is not None:
        return str(_root_.cell)
    spec = JobSpec.from_dict(_plain(_root_))
    return job_relpath(spec, local_inputs(spec.pool, str(_root_.output_root)))


def _expand_user(path: Any) -> str:
    """`~` in output_root means the home folder, as in every other path setting."""
    return os.path.expanduser(str(path))


def _n_jobs(*, _root_: Any) -> int:
    pool = OmegaConf.to_container(_root_.pool, resolve=True)
    return build(PoolConfig, pool, "pool").n_parallel()


def register() -> None:
    if not OmegaConf.has_resolver("sa_bench_job_path"):
        OmegaConf.register_new_resolver("sa_bench_job_path", _job_path)
        OmegaConf.register_new_resolver("sa_bench_n_jobs", _n_jobs)
        OmegaConf.register_new_resolver("sa_bench_expand_user", _expand_user)


register()
