"""The completion-marker callback: the last thing a successful job does."""

from __future__ import annotations

from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback


class CompletionMarker(Callback):
    """Write `done.json` atomically when a job returned status "done", then drop its lock.

    The job keeps its per-job lock until here, so a second sweep can never slip in between
    the last result file and the marker and run the cell again.
    """

    def on_job_end(self, config: Any, job_return: JobReturn, **kwargs: Any) -> None:
        result = job_return.return_value if job_return.status == JobStatus.COMPLETED else None
        job = result.pop("job", None) if isinstance(result, dict) else None
        if job is not None:
            job.finish(result.get("summary"))
