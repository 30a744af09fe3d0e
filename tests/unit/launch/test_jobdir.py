"""The job directory contract: running = lock held by a live process, done = marker + results."""

import errno
import fcntl
import json
import multiprocessing as mp
import os
import signal
import socket
import threading
import time

from sa_bench.launch import jobdir


def finished(path, key="k1"):
    path.mkdir(parents=True, exist_ok=True)
    for name in jobdir.OUTPUT_FILES:
        (path / name).write_text(f"{name}\n")
    jobdir.write_marker(path, key, {"score": 1.0})


def test_status_comes_from_the_lock_not_from_running_json(tmp_path):
    path = tmp_path / "job"
    path.mkdir()
    assert jobdir.status(path, "k1") == "pending"
    (path / jobdir.RUNNING).write_text(json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}))
    assert jobdir.status(path, "k1") == "pending"  # a live PID in a leftover file means nothing
    lock = jobdir.JobLock(path)
    assert lock.try_acquire()
    assert jobdir.status(path, "k1") == "running"
    other = jobdir.JobLock(path)
    assert not other.try_acquire(wait=0.1)
    lock.release()
    assert jobdir.status(path, "k1") == "pending"
    assert other.try_acquire(wait=0)
    other.release()


def _hold(path, ready):
    lock = jobdir.JobLock(path)
    assert lock.try_acquire()
    ready.set()
    time.sleep(60)


def test_a_killed_holder_frees_the_cell(tmp_path):
    path = tmp_path / "job"
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_hold, args=(path, ready))
    proc.start()
    assert ready.wait(30)
    assert jobdir.status(path, "k1") == "running"
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert jobdir.status(path, "k1") == "pending"


def _linger(ready):
    ready.set()
    time.sleep(60)


def test_a_forked_child_of_the_job_does_not_hold_its_lock(tmp_path):
    """A worker forked by the job (tokenizer, data loader) gets no copy of the lock: releasing
    it, or the job dying, frees the cell while the worker still lives."""
    path = tmp_path / "job"
    lock = jobdir.JobLock(path)
    assert lock.try_acquire()
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_linger, args=(ready,))
    child.start()
    try:
        assert ready.wait(30)
        lock_file = str((path / jobdir.LOCK).resolve())
        child_fds = {os.path.realpath(f"/proc/{child.pid}/fd/{fd}")
                     for fd in os.listdir(f"/proc/{child.pid}/fd")}
        assert lock_file not in child_fds
        assert jobdir.status(path, "k1") == "running"
        lock.release()
        assert jobdir.status(path, "k1") == "pending"
    finally:
        child.kill()
        child.join()


def test_a_status_probe_never_makes_a_starting_job_think_the_cell_is_busy(tmp_path):
    path = tmp_path / "job"
    path.mkdir()
    (path / jobdir.LOCK).touch()
    fd = os.open(path / jobdir.LOCK, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)  # a probe, frozen in the middle

    def let_go():
        time.sleep(0.3)
        os.close(fd)

    threading.Thread(target=let_go).start()
    lock = jobdir.JobLock(path)
    assert lock.try_acquire()  # waits out the probe
    lock.release()


def test_done_needs_the_marker_key_and_every_recorded_result_file(tmp_path):
    path = tmp_path / "job"
    finished(path)
    marker = json.loads((path / jobdir.MARKER).read_text())
    assert marker["files"] == {name: len(name) + 1 for name in jobdir.OUTPUT_FILES}
    assert jobdir.status(path, "k1") == "done" and not jobdir.is_done(path, "other")
    (path / jobdir.STATS).write_text("{}")  # changed since
    assert jobdir.damaged_results(path, "k1") == [jobdir.STATS]
    assert jobdir.status(path, "k1") == "pending"
    finished(path)
    (path / jobdir.METRICS).unlink()
    assert jobdir.damaged_results(path, "k1") == [jobdir.METRICS]
    assert not jobdir.is_done(path, "k1")
    assert jobdir.damaged_results(path, "other") is None


def test_a_marker_of_an_earlier_schema_is_not_done_until_migrated(tmp_path):
    path = tmp_path / "job"
    path.mkdir()
    (path / jobdir.METRICS).write_text("{}")
    jobdir.write_json_atomic(path / jobdir.MARKER, {"key": "k1", "finished": 1.0})  # no files
    assert not jobdir.is_done(path, "k1")
    jobdir.write_json_atomic(path / jobdir.MARKER, {"key": "k1", "finished": 1.0,
                                                    "files": {jobdir.METRICS: 3}})  # no schema
    assert not jobdir.is_done(path, "k1")
    jobdir.write_marker(path, "k1")
    assert jobdir.is_done(path, "k1")


def test_unusable_dir_and_disk_full(tmp_path):
    assert jobdir.unusable_dir(tmp_path / "new" / "deeper") is None
    (tmp_path / "file").write_text("")
    assert jobdir.unusable_dir(tmp_path / "file") == f"{tmp_path / 'file'} is not a directory"
    assert "cannot be created" in jobdir.unusable_dir(tmp_path / "file" / "sub")
    full = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise full
        except OSError as exc:
            raise RuntimeError("while writing") from exc
    except RuntimeError as wrapped:
        assert jobdir.disk_full(wrapped)
    assert not jobdir.disk_full(OSError(errno.EACCES, "denied")) and not jobdir.disk_full(None)


def test_first_error_line_of_a_non_utf8_error_file(tmp_path):
    (tmp_path / jobdir.ERROR).write_bytes(b"Traceback\nRuntimeError: bad \xff byte\n")
    assert jobdir.first_error_line(tmp_path) == "RuntimeError: bad \ufffd byte"


def test_fallback_note_ignores_an_env_file_that_is_not_an_object(tmp_path):
    from sa_bench.launch.outcome import fallback_note

    (tmp_path / jobdir.ENV).write_text("[]")
    assert fallback_note([tmp_path], None) is None
