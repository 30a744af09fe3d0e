"""The files of one job directory, its completion marker and its per-job lock.

A job is done exactly when `done.json` exists, parses, holds the job's own key, and every
result file it lists is still there with the size it had when the marker was written. The
marker is written last, atomically (write a temporary file, fsync, rename).

A job is running exactly when its per-job lock (`.lock`, an fcntl `flock`) is held: the
operating system drops the lock when its holder exits or is killed, so no leftover file can
make a cell look busy. `running.json` only tells a reader which process holds the lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from enum import Enum
from pathlib import Path
from typing import Any

MARKER = "done.json"
SCHEMA = 3
"""The key scheme a marker was written under (`sa_bench.migrate` moves older trees)."""
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
OUTPUT_FILES = (PREDICTIONS, METRICS, STATS, ENV, CONFIG)
"""What a finished job leaves; the marker records their sizes."""


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
    return damaged_results(path, key) == []


def damaged_results(path: Path, key: str) -> list[str] | None:
    """None without a marker of this schema for `key` (an older tree is moved to today's
    keys by `python -m sa_bench.migrate`); else the result files it lists that are missing or
    changed size since."""
    marker = read_json(path / MARKER)
    if not isinstance(marker, dict) or marker.get("key") != key or marker.get("schema") != SCHEMA:
        return None
    files = marker.get("files")
    if not isinstance(files, dict):
        return None
    damaged = [] if METRICS in files else [METRICS]  # a result without metrics is none
    for name, size in files.items():
        try:
            if os.stat(path / name).st_size != size and size is not None:
                damaged.append(name)
        except OSError:
            damaged.append(name)
    return damaged


def write_marker(path: Path, key: str, summary: dict | None = None) -> None:
    """Record the key and the result files present (name -> size); metrics.json must be."""
    files = {name: (path / name).stat().st_size for name in OUTPUT_FILES if (path / name).is_file()}
    if METRICS not in files:
        raise FileNotFoundError(f"{path / METRICS}: a finished job must have written it")
    write_json_atomic(
        path / MARKER,
        {"key": key, "schema": SCHEMA, "finished": time.time(), "files": files,
         "summary": summary or {}},
    )


class Status(str, Enum):
    """What a cell is, read from its directory (`status`); INVALID: its config was refused."""

    DONE = "done"
    RUNNING = "running"
    FAILED = "failed"
    PENDING = "pending"
    INVALID = "invalid"

    def __str__(self) -> str:
        return self.value


def status(path: Path, key: str) -> Status:
    """Cheap: a few stats and one lock probe."""
    if is_done(path, key):
        return Status.DONE
    if is_locked(path):
        return Status.RUNNING
    if (path / ERROR).exists():
        return Status.FAILED
    return Status.PENDING


def first_error_line(path: Path) -> str:
    """The last line of a traceback is the exception; that is what a user wants to see first."""
    try:
        lines = [ln for ln in (path / ERROR).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def mark_running(path: Path) -> None:
    """Say which process holds the lock (for people and tests; status never reads it)."""
    write_json_atomic(
        path / RUNNING, {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    )


def disk_full(exc: BaseException | None) -> bool:
    """Whether `exc`, or an exception it was raised from, is "no space left on device"."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def unusable_dir(path: Path, write: bool = True) -> str | None:
    """Why `path` cannot be (or be created as) a directory we write into; None if it can."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory" if existing == path else \
            f"{path} cannot be created: {existing} is not a directory"
    if write and not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def clear_results(path: Path) -> None:
    """Remove a previous attempt's results (overwrite=true)."""
    for name in RESULT_FILES:
        (path / name).unlink(missing_ok=True)


def is_locked(path: Path) -> bool:
    """Whether a live process holds the job's lock. Probes with a shared lock on a read-only
    descriptor (works on a read-only output root) and drops it at once."""
    try:
        fd = os.open(path / LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False  # no lock file: nobody ever locked this job
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)  # closing drops a probe lock we got
    return False


_HELD: set[int] = set()
"""Descriptors of the job locks this process holds (closed in forked children)."""


def _close_held_locks() -> None:
    """In a forked child (a tokenizer or data worker): drop its copies of the lock descriptors,
    so the lock stays the job process's alone (held while it lives, released when it dies)."""
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_locks)


class JobLock:
    """Exclusive per-job lock (fcntl `flock`): released by the OS when its holder dies."""

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.file = path / LOCK
        self._fd: int | None = None

    def try_acquire(self, wait: float = 2.0) -> bool:
        """Take the lock, retrying for `wait` seconds: another sweep's status probe holds it
        for microseconds; a running job holds it for its whole run."""
        fd = os.open(self.file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(0.02)
                continue
            self._fd = fd
            _HELD.add(fd)
            return True

    def release(self) -> None:
        if self._fd is not None:
            _HELD.discard(self._fd)
            fcntl.flock(self._fd, fcntl.LOCK_UN)  # also when a forked child still has a copy
            os.close(self._fd)
            self._fd = None


class JobDir:
    """One cell's directory as its job sees it: every write of its state files goes through
    here. `begin` takes the cell (per-job lock; results cleared on overwrite; the old marker
    and error removed; running.json written), then exactly one of `finish` (the marker, last)
    or `fail` (error.txt) or `release` (interrupted) ends it and drops the lock.

    A begun JobDir travels to the completion callback in the job's return value (no module
    global holds it); if it is pickled on the way (a launcher without the callback) or
    dropped, its lock is released, so it can never outlive the job.
    """

    def __init__(self, path: Path, key: str) -> None:
        self.path = path
        self.key = key
        self._lock: JobLock | None = None

    def status(self) -> Status:
        return status(self.path, self.key)

    def begin(self, overwrite: bool) -> str | None:
        """Take the cell; None when taken, else why not: "busy" (another process holds it)
        or "skipped" (finished, and no overwrite)."""
        lock = JobLock(self.path)
        if not lock.try_acquire():
            return "busy"
        if not overwrite and is_done(self.path, self.key):
            lock.release()
            return "skipped"
        self._lock = lock
        if overwrite:
            clear_results(self.path)
        (self.path / ERROR).unlink(missing_ok=True)
        (self.path / MARKER).unlink(missing_ok=True)
        mark_running(self.path)
        return None

    def finish(self, summary: dict | None) -> None:
        """Write the completion marker (the result files are complete), then release."""
        try:
            write_marker(self.path, self.key, summary)
        finally:
            self.release()

    def fail(self, text: str) -> None:
        """Leave the traceback in error.txt and release, even when it cannot be written."""
        try:
            (self.path / ERROR).write_text(text)
        finally:
            self.release()

    def release(self) -> None:
        (self.path / RUNNING).unlink(missing_ok=True)
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __reduce__(self) -> tuple:
        self.release()
        return (JobDir, (self.path, self.key))

    def __del__(self) -> None:
        self.release()
