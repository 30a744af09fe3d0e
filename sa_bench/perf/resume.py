"""How much does resuming an all-finished sweep cost?

    python -m sa_bench.perf.resume --jobs 500

Builds an N-cell sweep (seed=range(...) × the default benchmark's subsets) in a temporary
output root, marks every cell finished, then times in one run:
  - `python -c "import sa_bench"`             (the floor: interpreter + package import)
  - `python -m sa_bench <sweep>` with 5 cells  (Hydra start-up + one composition)
  - `python -m sa_bench <sweep>` with N cells
and prints the resume time as a ratio to the import time, and the marginal cost per finished
cell, (t(N) - t(5)) / (N - 5).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
            (path / "done.json").write_text(json.dumps({"key": path.name, "summary": {}}))
            count += 1
    return count


def best_of(repeats: int, args: list[str], expect: str | None = None) -> float:
    times = []
    for _ in range(repeats):
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
        t_small = best_of(opts.repeats, ["-m", "sa_bench", *sweep_args(small, 6)],
                          f"{n_small} jobs: {n_small} done (skipped), 0 to run")
        t_big = best_of(opts.repeats, ["-m", "sa_bench", *sweep_args(big, opts.jobs)],
                        f"{n_big} jobs: {n_big} done (skipped), 0 to run")
    marginal_ms = (t_big[0] - t_small[0]) / (n_big - n_small) * 1000
    print(f"python -c 'import sa_bench'       : {t_import[0]:.3f} s (median {t_import[1]:.3f})")
    print(f"resume, {n_small:4d} finished cells    : {t_small[0]:.3f} s (median {t_small[1]:.3f})")
    print(f"resume, {n_big:4d} finished cells    : {t_big[0]:.3f} s (median {t_big[1]:.3f})")
    print(f"ratio resume({n_big}) / import     : {t_big[0] / t_import[0]:.2f}x")
    print(f"marginal cost per finished cell  : {marginal_ms:.2f} ms "
          f"((t({n_big}) - t({n_small})) / {n_big - n_small})")


if __name__ == "__main__":
    main()
