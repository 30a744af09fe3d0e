"""The completion-marker callback: the last thing a successful job does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback

from sa_bench.launch import jobdir


class CompletionMarker(Callback):
    """Write `done.json` atomically when a job returned status "done", then drop its lock.

    The job keeps its per-job lock until here, so a second sweep can never slip in between
    the last result file and the marker and run the cell again.
    """

    def on_job_end(self, config: Any, job_return: JobReturn, **kwargs: Any) -> None:
        try:
            result = job_return.return_value if job_return.status == JobStatus.COMPLETED else None
            if isinstance(result, dict) and result.get("status") == "done":
                jobdir.write_marker(Path(result["dir"]), result["key"], result.get("summary"))
        finally:
            jobdir.release_held_lock()
