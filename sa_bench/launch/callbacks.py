"""The completion-marker callback: the last thing a successful job does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback

from sa_bench.launch import jobdir
from sa_bench.launch.jobdir import Status


class LockHandle:
    """A job's per-job lock, handed to the completion callback in the job's return value.

    Whatever happens to the return value, the lock cannot leak: it is released when the
    callback is done with it, when the value is pickled to go back to the sweep's process
    (a launcher without the callback), or when the handle is garbage collected.
    """

    def __init__(self, lock: Any) -> None:
        self.lock = lock

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __reduce__(self) -> tuple:
        self.release()
        return (LockHandle, (None,))

    def __del__(self) -> None:
        self.release()


class CompletionMarker(Callback):
    """Write `done.json` atomically when a job returned status "done", then drop its lock.

    The job keeps its per-job lock until here, so a second sweep can never slip in between
    the last result file and the marker and run the cell again.
    """

    def on_job_end(self, config: Any, job_return: JobReturn, **kwargs: Any) -> None:
        result = job_return.return_value if job_return.status == JobStatus.COMPLETED else None
        handle = result.pop("lock", None) if isinstance(result, dict) else None
        try:
            if isinstance(result, dict) and result.get("status") == Status.DONE:
                jobdir.write_marker(Path(result["dir"]), result["key"], result.get("summary"))
        finally:
            if handle is not None:
                handle.release()
