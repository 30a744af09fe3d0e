"""The job hands its begun JobDir (holding the per-job lock) to the completion callback inside
its return value (no module global); the lock cannot outlive the job whatever happens to it."""

import gc
import pickle

from hydra.core.utils import JobReturn, JobStatus

from sa_bench.launch import jobdir
from sa_bench.launch.callbacks import CompletionMarker


def begun(tmp_path) -> jobdir.JobDir:
    job = jobdir.JobDir(tmp_path, "abc")
    assert job.begin(overwrite=False) is None
    assert jobdir.is_locked(tmp_path) and (tmp_path / jobdir.RUNNING).is_file()
    return job


def finished(tmp_path, job) -> JobReturn:
    for name in jobdir.OUTPUT_FILES:
        (tmp_path / name).write_text("x")
    ret = JobReturn()
    ret.status = JobStatus.COMPLETED
    ret.return_value = {"status": jobdir.Status.DONE, "dir": str(tmp_path),
                        "summary": {"score": 1.0}, "job": job}
    return ret


def test_callback_writes_marker_under_the_lock_then_releases_it(tmp_path):
    job = begun(tmp_path)
    ret = finished(tmp_path, job)
    assert not jobdir.is_done(tmp_path, "abc")
    CompletionMarker().on_job_end(config=None, job_return=ret)
    assert jobdir.is_done(tmp_path, "abc")
    assert not jobdir.is_locked(tmp_path) and not (tmp_path / jobdir.RUNNING).exists()
    assert "job" not in ret.return_value  # nothing lock-like travels back to the sweep
    pickle.dumps(ret)


def test_without_the_callback_pickling_or_dropping_the_job_releases(tmp_path):
    job = begun(tmp_path)
    copy = pickle.loads(pickle.dumps({"job": job}))  # sent back to the sweep's process
    assert not jobdir.is_locked(tmp_path) and copy["job"]._lock is None
    job = begun(tmp_path)
    del job
    gc.collect()
    assert not jobdir.is_locked(tmp_path)


def test_begin_refuses_a_busy_or_finished_cell_and_fail_leaves_the_error(tmp_path):
    job = begun(tmp_path)
    assert jobdir.JobDir(tmp_path, "abc").begin(overwrite=False) == "busy"
    job.fail("Traceback\nRuntimeError: boom\n")
    assert jobdir.first_error_line(tmp_path) == "RuntimeError: boom"
    assert jobdir.status(tmp_path, "abc") == jobdir.Status.FAILED
    job = begun(tmp_path)  # a retry clears the old error
    assert not (tmp_path / jobdir.ERROR).exists()
    CompletionMarker().on_job_end(config=None, job_return=finished(tmp_path, job))
    assert jobdir.JobDir(tmp_path, "abc").begin(overwrite=False) == "skipped"
    job = jobdir.JobDir(tmp_path, "abc")
    assert job.begin(overwrite=True) is None  # overwrite: results cleared, cell taken
    assert not (tmp_path / jobdir.MARKER).exists() and not (tmp_path / jobdir.METRICS).exists()
    job.release()


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
