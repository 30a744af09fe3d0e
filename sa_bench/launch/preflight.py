"""Checks the sweeper makes before any job starts, each failing with one line naming the key.

Bad values that would otherwise surface late (a GPU id this machine does not have, an output
root that is a file, an unset environment variable) or make the sweep's own bookkeeping wrong
(`hydra.sweep.dir` pointing the jobs somewhere the sweeper does not look) are refused here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sa_bench.config import ConfigError, build
from sa_bench.launch.jobdir import unusable_dir
from sa_bench.launch.pool import PoolConfig

LOCAL_LAUNCHERS = ("JoblibLauncher", "BasicLauncher")
"""Launchers whose jobs run on this machine: the pool's GPU ids must exist here."""

def config_error(exc: OmegaConfBaseException) -> ConfigError:
    """An OmegaConf error (unset `${oc.env:...}`, bad interpolation) as one line with its key."""
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    key = getattr(exc, "full_key", None)
    return ConfigError(f"{key}: {message}" if key else message)


def resolved(config: Any, key: str) -> Any:
    """`config.<key>` resolved to plain Python values; errors become ConfigError."""
    try:
        node = OmegaConf.select(config, key, throw_on_missing=True)
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    except OmegaConfBaseException as exc:
        raise config_error(exc) from None


def check_pool(config: Any) -> PoolConfig:
    """The pool section, validated; on a local launcher its GPU ids must be visible here."""
    pool = build(PoolConfig, resolved(config, "pool") or {}, "pool")
    if str(OmegaConf.select(config, "hydra.launcher._target_", default="")).endswith(LOCAL_LAUNCHERS):
        try:
            pool.check_visible()
        except ConfigError as exc:
            raise ConfigError(f"pool.{exc}") from None
    return pool


JOB_DIR_SETTINGS = {
    "hydra.sweep.dir": "${sa_bench_expand_user:${output_root}}",
    "hydra.sweep.subdir": "${sa_bench_job_path:}",
    "hydra.run.dir": "${sa_bench_expand_user:${output_root}}/${sa_bench_job_path:}",
    "hydra.job.chdir": False,
}
"""Hydra settings that place jobs or change their working directory, as conf/config.yaml sets
them: the sweeper finds each cell at `<output_root>/<model>/.../<key>` and its job checks it."""


def check_job_dirs(config: Any) -> Path:
    """Job directories are `<output_root>/<model>/.../<key>`, found by the sweeper from
    output_root alone: Hydra's own directory settings, composed from any source (command
    line, a config file, a search path), may not move them. Returns the root."""
    for key, expected in JOB_DIR_SETTINGS.items():
        *parents, last = key.split(".")
        node = OmegaConf.select(config, ".".join(parents))
        value = OmegaConf.to_container(node, resolve=False).get(last) if node is not None else None
        if value != expected:
            hint = ("jobs run in the sweep's working directory and write to their own "
                    "directory" if key == "hydra.job.chdir" else
                    "job directories are <output_root>/<model>/<sparse>/<benchmark>/<subset>/"
                    "<key>; set output_root=... to move them")
            raise ConfigError(f"{key}: not supported (set to {value!r}); {hint}")
    root = Path(str(resolved(config, "output_root"))).expanduser()
    problem = unusable_dir(root, write=False)
    if problem:
        raise ConfigError(f"output_root: expected a directory; {problem}")
    return root


def job_device(config: Any, pool: PoolConfig) -> str:
    """`cuda` or `cpu`: what the sweep's jobs run on. Part of their identity (`auto` dtype and
    kernel resolve by it); each job derives it again from what it sees and must agree."""
    if pool.simulate or pool.devices == "cpu":
        return "cpu"
    launcher = OmegaConf.select(config, "hydra.launcher")
    if str(OmegaConf.select(config, "hydra.launcher._target_", default="")).endswith(LOCAL_LAUNCHERS):
        return "cuda" if pool.gpu_ids() else "cpu"
    # a cluster launcher: its jobs see the GPUs it requests, not this login node's
    requested = (OmegaConf.select(launcher, "gpus_per_node", default=None)
                 or OmegaConf.select(launcher, "ray.remote.num_gpus", default=None))
    return "cuda" if requested or pool.gpu_ids() else "cpu"


def check_writable(root: Path) -> None:
    """Jobs will run: the output root must be writable (a finished sweep only reads it)."""
    problem = unusable_dir(root, write=True)
    if problem:
        raise ConfigError(f"output_root: jobs need to write there; {problem}")


def decide_hub(configs: list[dict]) -> str | None:
    """If any job loads a hub model, decide once for the sweep whether the hub is reachable.

    Offline, the jobs are told so (HF_HUB_OFFLINE=1, inherited by the workers) and load from
    the hub cache or their offline fallback at once instead of retrying. Returns why the
    sweep is offline (for the summary), or None.
    """
    from sa_bench.models.loading import ModelConfig, go_offline, hub_offline, offline_by_env

    if not any(build(ModelConfig, c["model"], "model").source() == "hub" for c in configs):
        return None
    already = offline_by_env()
    if not hub_offline():
        return None
    go_offline()
    return "HF_HUB_OFFLINE is set" if already else "the Hugging Face hub is not reachable"
