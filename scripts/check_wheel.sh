#!/usr/bin/env bash
# Build sa_bench's wheel, install it (not editable) into a fresh venv, and run the default job
# from outside the checkout. The fresh venv borrows the dependencies already installed in the
# active environment (a .pth line pointing at its site-packages) instead of downloading torch
# again; sa_bench itself, its configs and its embedded model come only from the wheel.
# Usage (from the repository root, with the project's venv active): scripts/check_wheel.sh
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

pip wheel --quiet --no-deps --no-build-isolation -w "$work/dist" "$repo"
wheel="$(ls "$work"/dist/sa_bench-*.whl)"
python -m venv "$work/venv"
deps="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
site="$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$deps" > "$site/_sa_bench_deps.pth"
"$work/venv/bin/python" -m pip install --quiet --no-deps --no-index "$wheel"

cd "$work"  # not the checkout: nothing may come from the source tree
where="$("$work/venv/bin/python" -c 'import sa_bench; print(sa_bench.__file__)')"
case "$where" in
  "$site"/*) ;;
  *) echo "check_wheel: sa_bench imported from $where, not from the installed wheel"; exit 1 ;;
esac
out="$(OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 "$work/venv/bin/python" -m sa_bench \
       output_root="$work/outputs" benchmark.n_samples=2 2>&1)" || { echo "$out"; exit 1; }
echo "$out" | tail -4
echo "$out" | grep -q "Sweep finished .*: 2 done, 0 skipped, 0 failed" || {
  echo "check_wheel: the default job did not finish from the wheel install"; exit 1; }
echo "check_wheel: OK ($(basename "$wheel") installed in a fresh venv ran the default job)"
