"""The validated form of one job's config: everything checked before any model loads."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sa_bench.config import ConfigError, build, build_target
from sa_bench.launch.pool import PoolConfig

TOP_LEVEL_KEYS = {
    "model", "sparse", "benchmark", "pool", "output_root", "overwrite", "plan", "seed",
    "max_new_tokens", "cell",
}


@dataclass
class JobSpec:
    model: Any  # sa_bench.models.loading.ModelConfig
    sparse: Any  # sa_bench.attention.SparseMethod
    benchmark: Any  # sa_bench.benchmarks.base.Benchmark
    pool: PoolConfig
    seed: int = 0
    max_new_tokens: int | None = None
    overwrite: bool = False
    cell: str | None = None
    """`<model>/<sparse>/<benchmark>/<subset>/<key>` as the sweeper computed it (it hands
    every job its cell); the job refuses to run if its own computation differs."""

    @classmethod
    def from_dict(cls, cfg: dict) -> JobSpec:
        """Validate a resolved job config; raises ConfigError naming the offending key."""
        from sa_bench.attention import SparseMethod
        from sa_bench.benchmarks.base import Benchmark
        from sa_bench.models.loading import ModelConfig

        unknown = sorted(set(cfg) - TOP_LEVEL_KEYS)
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown top-level key; expected one of {sorted(TOP_LEVEL_KEYS)}")
        for key in ("model", "sparse", "benchmark"):
            if not isinstance(cfg.get(key), dict):
                raise ConfigError(f"{key}: missing; choose one with {key}=<name>")
        seed = cfg.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed: expected an int, got {seed!r}")
        max_new = cfg.get("max_new_tokens")
        if max_new is not None and (isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1):
            raise ConfigError(f"max_new_tokens: expected an int >= 1 or null, got {max_new!r}")
        overwrite = cfg.get("overwrite", False)
        if not isinstance(overwrite, bool):
            raise ConfigError(f"overwrite: expected true or false, got {overwrite!r}")
        cell = cfg.get("cell")
        if cell is not None and not isinstance(cell, str):
            raise ConfigError(f"cell: expected a job path string (set by the sweeper), got {cell!r}")
        benchmark = build_target(cfg["benchmark"], "benchmark", Benchmark)
        if benchmark.subset is None:
            raise ConfigError(
                f"benchmark.subset: not set; expected one of {benchmark.subsets} "
                "(a sweep sets it for every subset)"
            )
        return cls(
            model=build(ModelConfig, cfg["model"], "model"),
            sparse=SparseMethod.from_config(cfg["sparse"]),
            benchmark=benchmark,
            pool=_pool(json.dumps(cfg.get("pool") or {}, sort_keys=True)),
            seed=seed,
            max_new_tokens=max_new,
            overwrite=overwrite,
            cell=cell,
        )


@lru_cache(maxsize=64)
def _pool(section: str) -> PoolConfig:
    """Validated once per distinct pool section: a sweep's cells share it, and the checks
    (the lock folder, visible GPUs) touch the file system."""
    return build(PoolConfig, json.loads(section), "pool")
