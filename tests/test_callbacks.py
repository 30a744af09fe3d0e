"""The job hands its per-job lock to the completion callback inside its return value (no
module global); the lock cannot outlive the job whatever happens to that value."""

import gc
import pickle

from hydra.core.utils import JobReturn, JobStatus

from sa_bench.launch import jobdir
from sa_bench.launch.callbacks import CompletionMarker, LockHandle


def locked_cell(tmp_path):
    lock = jobdir.JobLock(tmp_path)
    assert lock.try_acquire() and jobdir.is_locked(tmp_path)
    return LockHandle(lock)


def finished(tmp_path, handle) -> JobReturn:
    for name in jobdir.OUTPUT_FILES:
        (tmp_path / name).write_text("x")
    ret = JobReturn()
    ret.status = JobStatus.COMPLETED
    ret.return_value = {"status": "done", "dir": str(tmp_path), "key": "abc",
                        "summary": {"score": 1.0}, "lock": handle}
    return ret


def test_callback_writes_marker_under_the_lock_then_releases_it(tmp_path):
    handle = locked_cell(tmp_path)
    ret = finished(tmp_path, handle)
    CompletionMarker().on_job_end(config=None, job_return=ret)
    assert jobdir.is_done(tmp_path, "abc")
    assert not jobdir.is_locked(tmp_path)
    assert "lock" not in ret.return_value  # nothing lock-like travels back to the sweep
    pickle.dumps(ret)


def test_without_the_callback_pickling_or_dropping_the_value_releases(tmp_path):
    handle = locked_cell(tmp_path)
    copy = pickle.loads(pickle.dumps({"lock": handle}))  # sent back to the sweep's process
    assert not jobdir.is_locked(tmp_path) and copy["lock"].lock is None
    handle = locked_cell(tmp_path)
    del handle
    gc.collect()
    assert not jobdir.is_locked(tmp_path)


def test_launch_room_never_imports_the_job_upward():
    """launch/ (identity, plan, callbacks, the Hydra app) is used by the job, not the reverse:
    `__main__` hands the task function to `hydra_app.hydra_main`."""
    import ast
    from pathlib import Path

    import sa_bench.launch

    upward = []
    for file in Path(sa_bench.launch.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            upward += [f"{file.name}: {n}" for n in names if n in ("sa_bench.job", "sa_bench.runner")]
    assert not upward, upward
