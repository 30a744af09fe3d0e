"""How much does resuming an all-finished sweep cost?

    python -m sa_bench.perf.resume --jobs 500

Builds an N-cell sweep (seed=range(...) × the default benchmark's subsets) in a temporary
output root, marks every cell finished, then times in one run:
  - `python -c "import sa_bench"`             (the floor: interpreter + package import)
  - `python -m sa_bench <sweep>` with 5 cells  (Hydra start-up + one composition)
  - `python -m sa_bench <sweep>` with N cells
and prints the resume time as a ratio to the import time, and the marginal cost per finished
cell, (t(N) - t(5)) / (N - 5) — both for a resume through Hydra (no manifest: the sweeper
plans every cell) and for the fast path (an identical command after a resume recorded the
sweep's manifest; see sa_bench/launch/fastpath.py).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sa_bench.launch import jobdir

SUBSETS = ["1k", "2k"]


def sweep_args(root: Path, n_cells: int) -> list[str]:
    n_seeds = max(1, n_cells // len(SUBSETS))
    return [f"output_root={root}", f"seed=range(0,{n_seeds})", f"benchmark.subsets=[{','.join(SUBSETS)}]"]


def run(args: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"command failed: {args}\n{proc.stdout}\n{proc.stderr}")
    return elapsed, proc.stdout


def mark_all_done(root: Path, n_cells: int) -> int:
    """Finish every cell of the sweep by writing its marker (the plan view gives the dirs)."""
    _, out = run(["-m", "sa_bench", *sweep_args(root, n_cells), "plan=true"])
    count = 0
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "pending":
            path = Path(parts[1])
            path.mkdir(parents=True, exist_ok=True)
            for name in jobdir.OUTPUT_FILES:  # a finished job's files, as small as they come
                (path / name).write_text("{}\n")
            jobdir.write_marker(path, path.name)
            count += 1
    return count


def best_of(repeats: int, args: list[str], expect: str | None = None,
            forget: Path | None = None) -> tuple[float, float]:
    """(best, median) wall time; `forget` is a manifest folder removed before each run."""
    times = []
    for _ in range(repeats):
        if forget is not None:
            shutil.rmtree(forget, ignore_errors=True)
        elapsed, out = run(args)
        if expect is not None and expect not in out:
            raise SystemExit(f"expected {expect!r} in the output of {args}, got:\n{out}")
        times.append(elapsed)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        big, small = Path(tmp) / "big", Path(tmp) / "small"
        n_big = mark_all_done(big, opts.jobs)
        n_small = mark_all_done(small, 6)
        t_import = best_of(opts.repeats, ["-c", "import sa_bench"])
        times = {}
        for path_name, forget in (("through Hydra", True), ("fast path", False)):
            for root, n in ((small, n_small), (big, n_big)):
                args = ["-m", "sa_bench", *sweep_args(root, n)]
                expect = f"{n} jobs: {n} done (skipped), 0 to run"
                if not forget:
                    run(args)  # a Hydra resume writes the manifest the fast path reads
                times[path_name, n] = best_of(opts.repeats, args, expect,
                                              root / ".sa_bench" if forget else None)
    print(f"python -c 'import sa_bench'              : {t_import[0]:.3f} s (median {t_import[1]:.3f})")
    for path_name in ("through Hydra", "fast path"):
        small_t, big_t = times[path_name, n_small], times[path_name, n_big]
        marginal_ms = (big_t[0] - small_t[0]) / (n_big - n_small) * 1000
        print(f"{path_name}:")
        print(f"  resume {n_small:4d} finished cells         : {small_t[0]:.3f} s (median {small_t[1]:.3f})")
        print(f"  resume {n_big:4d} finished cells         : {big_t[0]:.3f} s (median {big_t[1]:.3f})")
        print(f"  ratio resume({n_big}) / import         : {big_t[0] / t_import[0]:.2f}x")
        print(f"  marginal cost per finished cell     : {marginal_ms:.2f} ms")


if __name__ == "__main__":
    main()
