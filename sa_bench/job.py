"""The Hydra task function: one job = one (model, sparse, benchmark, subset) cell."""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sa_bench.config import ConfigError
from sa_bench.launch import jobdir
from sa_bench.launch.identity import job_relpath, local_inputs
from sa_bench.launch.jobdir import Status
from sa_bench.models.identity import weights_identity


class IdentityMismatch(ConfigError):
    """The job's own identity differs from the one the sweeper handed it."""


def run_job(cfg: DictConfig) -> dict[str, Any]:
    """Validate, check identity, lock, lease, evaluate; on failure leave `error.txt`, re-raise.

    Returns {"status": Status.DONE | "skipped" | "busy", ...}. A done result carries its begun
    `JobDir` (holding the cell's lock): the completion-marker callback finishes it.
    """
    from hydra.core.hydra_config import HydraConfig

    from sa_bench.spec import JobSpec

    container: dict = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    path = Path(HydraConfig.get().runtime.output_dir)
    root = Path(str(container.get("output_root", "outputs"))).expanduser()
    try:
        spec = JobSpec.from_dict(container)
        inputs = local_inputs(spec.pool, root)
        weights = weights_identity(spec.model, inputs.offline, inputs.cache)
        relpath = job_relpath(spec, inputs, weights)
        check_identity(spec.cell, relpath, path, root)
    except ConfigError:
        path.mkdir(parents=True, exist_ok=True)
        (path / jobdir.ERROR).write_text(traceback.format_exc())
        raise
    job = jobdir.JobDir(path, relpath.rsplit("/", 1)[1])
    refused = job.begin(spec.overwrite)
    if refused is not None:
        return {"status": refused, "dir": str(path)}
    try:
        (path / jobdir.CONFIG).write_text(OmegaConf.to_yaml(container))
        summary = evaluate_leased(spec, path, weights)
    except KeyboardInterrupt:
        job.release()
        raise  # interrupted, not failed: the cell stays unfinished and resumes next time
    except BaseException:
        job.fail(traceback.format_exc())
        raise
    return {"status": Status.DONE, "dir": str(path), "summary": summary, "job": job}


def check_identity(handed: str | None, relpath: str, path: Path, output_root: Path) -> None:
    """Refuse to run when the sweeper's cell (or the job directory) is not this config's."""
    if handed is not None and handed != relpath:
        raise IdentityMismatch(
            f"cell: the sweeper computed {handed} but the job computes {relpath} from the same "
            "config; the two processes see different code, configs or weights - nothing was run"
        )
    if path.resolve() != (output_root / relpath).resolve():
        raise IdentityMismatch(
            f"job directory {path} is not {output_root / relpath}: the directory comes from "
            "output_root and the config only (do not set hydra.run.dir / hydra.sweep.dir / "
            "hydra.sweep.subdir; set output_root)"
        )


def evaluate_leased(spec: Any, path: Path, weights: str | None) -> dict[str, Any]:
    """Lease the job's devices, evaluate, and free the job's memory *before* the lease ends.

    A failed job's exception holds its traceback, whose frames hold the model, the KV cache
    and every activation: released first, the next job on that GPU would start while this
    one's tensors are still allocated and could run out of memory too. So, still inside the
    lease: clear the frames the exception (and its chained causes) reference, collect, and
    hand the CUDA caching allocator's blocks back; only then does the lease end. The error
    text is unchanged (a traceback keeps its lines when its frames' locals are cleared).
    """
    from sa_bench.launch.pool import lease
    from sa_bench.runner import evaluate

    with lease(spec.pool, job_dir=path) as held:
        try:
            return evaluate(spec, path, held, weights)
        except BaseException as exc:
            _clear_frames(exc)
            raise
        finally:
            _free_accelerator_memory()


def _clear_frames(exc: BaseException) -> None:
    """Drop the local variables of every finished frame `exc` and its chain reference."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)  # skips frames still executing (this one)
        todo += [e.__cause__, e.__context__]


def _free_accelerator_memory() -> None:
    """Collect the job's garbage and hand cached GPU memory back (joblib reuses workers)."""
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
