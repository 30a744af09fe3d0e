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

rm -rf "$repo/build"  # setuptools builds in-tree: no stale module of an earlier build
isolation="--no-build-isolation"  # use the venv's setuptools; Python >= 3.12 venvs have none
python -c "import setuptools" 2>/dev/null || isolation=""
pip wheel --quiet --no-deps $isolation -w "$work/dist" "$repo"
rm -rf "$repo/build"
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
# user configs next to the installed tree: one benchmark file of the user's own
mkdir -p "$work/userconf/benchmark"
printf '_target_: sa_bench.benchmarks.passkey.Passkey\nname: mine\nsubsets: [1k]\nn_samples: 1\n' \
  > "$work/userconf/benchmark/mine.yaml"
plan="$("$work/venv/bin/python" -m sa_bench output_root="$work/outputs" \
        "hydra.searchpath=[file://$work/userconf]" benchmark=mine plan=true 2>&1)" || { echo "$plan"; exit 1; }
echo "$plan" | grep -q "^1 jobs: 0 done (skipped), 1 to run" || {
  echo "$plan"; echo "check_wheel: hydra.searchpath did not add the user's config"; exit 1; }
echo "check_wheel: OK ($(basename "$wheel") installed in a fresh venv ran the default job;" \
     "hydra.searchpath adds user configs)"
