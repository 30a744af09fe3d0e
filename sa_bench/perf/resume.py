"""How much does resuming an all-finished sweep cost?

    python -m sa_bench.perf.resume --jobs 500

Builds an N-cell sweep (seed=range(...) × the default benchmark's subsets) in a temporary
output root, marks every cell finished, then times in one run:
  - `python -c "import sa_bench"`             (interpreter + package import)
  - `python -m sa_bench --help`               (Hydra start-up + one composition: the target's base)
  - `python -m sa_bench <sweep>` with 6 cells
  - `python -m sa_bench <sweep>` with N cells
and prints the N-cell resume as a ratio to `--help`, the marginal cost per finished cell,
(t(N) - t(6)) / (N - 6), and whether torch was imported. Every resume goes through Hydra's
composition: the sweeper validates every cell and computes its key (torch-free).
"""

from __future__ import annotations

import argparse
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


def best_of(repeats: int, args: list[str], expect: str | None = None) -> tuple[float, float]:
    """(best, median) wall time of `python <args>` over `repeats` runs."""
    times = []
    for _ in range(repeats):
        elapsed, out = run(args)
        if expect is not None and expect not in out:
            raise SystemExit(f"expected {expect!r} in the output of {args}, got:\n{out}")
        times.append(elapsed)
    return min(times), statistics.median(times)


TORCH_PROBE = ("import runpy, sys; sys.argv = ['sa_bench', *sys.argv[1:]]\n"
               "try:\n    runpy.run_module('sa_bench', run_name='__main__')\n"
               "finally:\n    print('torch imported:', 'torch' in sys.modules)")


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
        t_help = best_of(opts.repeats, ["-m", "sa_bench", "--help"])
        times = {}
        for root, n in ((small, n_small), (big, n_big)):
            args = ["-m", "sa_bench", *sweep_args(root, n)]
            times[n] = best_of(opts.repeats, args, f"{n} jobs: {n} done (skipped), 0 to run")
        _, probe = run(["-c", TORCH_PROBE, *sweep_args(big, n_big)])
    marginal_ms = (times[n_big][0] - times[n_small][0]) / (n_big - n_small) * 1000
    print(f"python -c 'import sa_bench'          : {t_import[0]:.3f} s (median {t_import[1]:.3f})")
    print(f"python -m sa_bench --help            : {t_help[0]:.3f} s (median {t_help[1]:.3f})")
    for n in (n_small, n_big):
        print(f"resume {n:4d} finished cells         : {times[n][0]:.3f} s (median {times[n][1]:.3f})")
    print(f"ratio resume({n_big}) / --help         : {times[n_big][0] / t_help[0]:.2f}x (target <= 1.5x)")
    print(f"marginal cost per finished cell     : {marginal_ms:.2f} ms (target <= 0.5 ms)")
    print(f"resume of {n_big} cells: {probe.strip().splitlines()[-1]}")


if __name__ == "__main__":
    main()
