"""What the sweep summary says about each job: why a cell failed, which model weights it used.

A failed cell's reason comes from its `error.txt`; when the job could not even write that
file (a full disk) or died outside the task function, from the exception the launcher handed
back for it; only when neither exists is the worker assumed to have died.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sa_bench.launch import jobdir

WORKER_DIED = "not finished: its worker process died"


def job_errors(cells: list, launches: list[Any]) -> dict[str, BaseException]:
    """cell.relpath -> the exception its job returned, from every launch's JobReturns."""
    by_dir = {os.path.abspath(c.path): c.relpath for c in cells}
    errors: dict[str, BaseException] = {}
    for results in launches:
        for ret in results or []:
            value = getattr(ret, "_return_value", None)
            hydra_cfg = getattr(ret, "hydra_cfg", None)
            if not isinstance(value, BaseException) or hydra_cfg is None:
                continue
            rel = by_dir.get(os.path.abspath(str(hydra_cfg.hydra.runtime.output_dir)))
            if rel is not None:
                errors[rel] = value
    return errors


def describe(exc: BaseException) -> str:
    if jobdir.disk_full(exc):
        return f"disk full: {exc}"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def failure_reason(path: Path, exc: BaseException | None, disk_full: bool = False) -> str:
    """One line: the job's own error, else the exception it returned, else what we know."""
    line = jobdir.first_error_line(path)
    if line:
        return line
    if exc is not None:
        return describe(exc)
    if disk_full:
        return "not finished: the launch stopped, the disk is full"
    return WORKER_DIED


def fallback_note(done_dirs: list[Path], hub_note: str | None) -> str | None:
    """One line for the summary when jobs loaded offline-fallback weights instead of the hub."""
    used: dict[str, int] = {}
    for path in done_dirs:
        env = jobdir.read_json(path / jobdir.ENV)
        source = env.get("model_source") if isinstance(env, dict) else None
        if isinstance(source, dict) and str(source.get("source", "")).startswith("offline_fallback"):
            used[str(source.get("path"))] = used.get(str(source.get("path")), 0) + 1
    if not used:
        return None
    where = ", ".join(f"{path} ({n} jobs)" for path, n in sorted(used.items()))
    return f"  offline fallback weights used ({hub_note or 'hub model not loadable'}): {where}"
