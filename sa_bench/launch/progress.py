"""Live sweep progress, read from the job directories by a thread in the sweep's process.

Jobs write `progress.json` (samples done / total) as they go. A job whose lease waits for a device
slot held by another process is counted as waiting, not running, and named with the holder (from
its `waiting.json`, see `pool.read_waiting`). In a terminal the status line is
redrawn in place; when output is a file or pipe, a plain line is printed whenever the counts
change (at most every `interval` seconds), so logs carry no carriage-return clutter.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from sa_bench.launch import jobdir
from sa_bench.launch.jobdir import Status
from sa_bench.launch.pool import describe_holders, read_waiting


class Progress:
    def __init__(self, cells: list, interval: float = 10.0, stream: TextIO | None = None) -> None:
        self.cells = cells
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.interval = 1.0 if self.tty else interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._last = ""

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self.tty and self._last:
            self.stream.write("\n")
            self.stream.flush()

    def line(self) -> str:
        """`waiting` counts the cells not started yet and the jobs whose lease waits."""
        counts = dict.fromkeys((Status.DONE, Status.RUNNING, Status.FAILED, Status.PENDING), 0)
        samples = []
        for cell in self.cells:
            state = jobdir.status(cell.path, cell.key)
            name = cell.relpath.rsplit("/", 1)[0]
            if state == Status.RUNNING and (wait := read_waiting(cell.path)) is not None:
                state = Status.PENDING
                wants = wait.get("wants") if isinstance(wait.get("wants"), str) else "a device slot"
                samples.append(f"{name} waiting for {wants} held by {describe_holders(wait['holders'])}")
            counts[state] += 1
            if state == Status.RUNNING:
                info = jobdir.read_json(cell.path / jobdir.PROGRESS) or {}
                if "total" in info:
                    samples.append(f"{name} {info['done']}/{info['total']}")
        text = (
            f"[sa_bench] {counts[Status.DONE]} done, {counts[Status.RUNNING]} running, "
            f"{counts[Status.FAILED]} failed, {counts[Status.PENDING]} waiting"
        )
        if samples:
            text += " | " + "; ".join(samples[:4]) + (" ..." if len(samples) > 4 else "")
        return text

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            text = self.line()
            if self.tty:
                self.stream.write("\r\033[K" + text)
                self.stream.flush()
                self._last = text
            elif text != self._last:
                self.stream.write(text + "\n")
                self.stream.flush()
                self._last = text


def write_progress(path, done: int, total: int) -> None:
    jobdir.write_json_atomic(path / jobdir.PROGRESS, {"done": done, "total": total, "time": time.time()})
