"""The files of one job directory, its completion marker and its per-job lock.

A job is done exactly when `done.json` exists, parses, and holds the job's own key.
The marker is written last, atomically (write a temporary file, fsync, rename).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

MARKER = "done.json"
ERROR = "error.txt"
RUNNING = "running.json"
LOCK = ".lock"
PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"
STATS = "stats.json"
ENV = "env.json"
CONFIG = "config.yaml"
PROGRESS = "progress.json"
RESULT_FILES = (PREDICTIONS, METRICS, STATS, ENV, CONFIG, ERROR, RUNNING, PROGRESS, MARKER)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Any | None:
    """The parsed file, or None if it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_done(path: Path, key: str) -> bool:
    marker = read_json(path / MARKER)
    return isinstance(marker, dict) and marker.get("key") == key


def write_marker(path: Path, key: str, summary: dict | None = None) -> None:
    write_json_atomic(
        path / MARKER, {"key": key, "finished": time.time(), "summary": summary or {}}
    )


def status(path: Path, key: str) -> str:
    """done | running | failed | pending — cheap: a few stats, no locks taken."""
    if is_done(path, key):
        return "done"
    if (path / RUNNING).exists():
        info = read_json(path / RUNNING) or {}
        if _alive(info):
            return "running"
    if (path / ERROR).exists():
        return "failed"
    return "pending"


def first_error_line(path: Path) -> str:
    """The last line of a traceback is the exception; that is what a user wants to see first."""
    try:
        lines = [ln for ln in (path / ERROR).read_text().splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def mark_running(path: Path) -> None:
    write_json_atomic(
        path / RUNNING, {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    )


def _alive(info: dict) -> bool:
    if info.get("host") != socket.gethostname():
        return True  # cannot check another machine's process; trust the file
    try:
        os.kill(int(info.get("pid", -1)), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


def clear_results(path: Path) -> None:
    """Remove a previous attempt's results (overwrite=true)."""
    for name in RESULT_FILES:
        (path / name).unlink(missing_ok=True)


class JobLock:
    """Exclusive per-job lock (fcntl): released by the OS when its holder dies."""

    def __init__(self, path: Path) -> None:
        from filelock import FileLock  # imported here: resuming a finished sweep never locks

        path.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(path / LOCK))

    def try_acquire(self) -> bool:
        from filelock import Timeout

        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            return False
        return True

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()


_held: JobLock | None = None


def hold_lock(lock: JobLock) -> None:
    """Keep `lock` until the completion callback (or the next job in this worker) releases it."""
    global _held
    release_held_lock()
    _held = lock


def release_held_lock() -> None:
    global _held
    if _held is not None:
        _held.release()
        _held = None
