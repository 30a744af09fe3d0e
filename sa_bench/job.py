"""The Hydra task function: one job = one (model, sparse, benchmark, subset) cell."""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sa_bench.launch import jobdir
from sa_bench.launch.identity import job_key


def run_job(cfg: DictConfig) -> dict[str, Any]:
    """Validate, lock, lease, evaluate; on failure leave `error.txt` and re-raise.

    Returns {"status": "done" | "skipped" | "busy", ...}; the completion-marker callback
    writes the marker for "done" and releases the per-job lock.
    """
    from hydra.core.hydra_config import HydraConfig

    jobdir.release_held_lock()
    container: dict = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    path = Path(HydraConfig.get().runtime.output_dir)
    key = job_key(container)
    lock = jobdir.JobLock(path)
    if not lock.try_acquire():
        return {"status": "busy", "dir": str(path)}
    jobdir.hold_lock(lock)
    overwrite = container.get("overwrite", False)
    if jobdir.is_done(path, key) and not overwrite:
        return {"status": "skipped", "dir": str(path)}
    if overwrite:
        jobdir.clear_results(path)
    (path / jobdir.ERROR).unlink(missing_ok=True)
    (path / jobdir.MARKER).unlink(missing_ok=True)
    jobdir.mark_running(path)
    try:
        from sa_bench.launch.pool import lease
        from sa_bench.runner import evaluate
        from sa_bench.spec import JobSpec

        spec = JobSpec.from_dict(container)
        (path / jobdir.CONFIG).write_text(OmegaConf.to_yaml(container))
        with lease(spec.pool) as held:
            summary = evaluate(spec, path, held)
    except BaseException:
        (path / jobdir.ERROR).write_text(traceback.format_exc())
        raise
    finally:
        (path / jobdir.RUNNING).unlink(missing_ok=True)
        _free_accelerator_memory()
    return {"status": "done", "dir": str(path), "key": key, "summary": summary}


def _free_accelerator_memory() -> None:
    """joblib reuses worker processes: hand cached GPU memory back before the next job."""
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
