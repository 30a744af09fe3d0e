import io
import time
from pathlib import Path

from sa_bench.launch import jobdir
from sa_bench.launch.plan import Cell
from sa_bench.launch.progress import Progress, write_progress


def cell(root: Path, name: str) -> Cell:
    path = root / "m/s/b" / name / "key0"
    path.mkdir(parents=True)
    return Cell([], {}, f"m/s/b/{name}/key0", "key0", path)


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_counts_and_sample_progress_without_carriage_returns(tmp_path):
    done, running, failed, waiting = (cell(tmp_path, n) for n in ("a", "b", "c", "d"))
    (done.path / jobdir.METRICS).write_text('{"score": 1}')
    jobdir.write_marker(done.path, "key0")
    lock = jobdir.JobLock(running.path)  # running = its lock is held
    assert lock.try_acquire()
    write_progress(running.path, 3, 10)
    (failed.path / jobdir.ERROR).write_text("Traceback\nValueError: x\n")
    log = io.StringIO()
    progress = Progress([done, running, failed, waiting], interval=0.05, stream=log)
    assert progress.line() == (
        "[sa_bench] 1 done, 1 running, 1 failed, 1 waiting | m/s/b/b 3/10")
    progress.start()
    time.sleep(0.3)
    write_progress(running.path, 4, 10)
    time.sleep(0.3)
    progress.stop()
    lock.release()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert lines == ["[sa_bench] 1 done, 1 running, 1 failed, 1 waiting | m/s/b/b 3/10",
                     "[sa_bench] 1 done, 1 running, 1 failed, 1 waiting | m/s/b/b 4/10"]


def test_terminal_redraws_one_line(tmp_path):
    one = cell(tmp_path, "a")
    term = Tty()
    progress = Progress([one], stream=term)
    progress.interval = 0.05
    progress.start()
    time.sleep(0.3)
    progress.stop()
    out = term.getvalue()
    assert out.count("\r\033[K") >= 2 and out.endswith("\n") and out.count("\n") == 1
