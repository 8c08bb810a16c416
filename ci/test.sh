#!/usr/bin/env bash
# CPU runner: a fresh virtual environment, the project installed from pyproject.toml with its
# test extra, then the test command of README.md, then the benchmark smoke tests (agreement is
# asserted, time never is). Needs no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install --quiet --disable-pip-version-check -e ".[test]"
bpk info
python -m pytest -q
# The Numba kernels' pure-Python fallbacks (NUMBA_DISABLE_JIT, for debugging) run as well
NUMBA_DISABLE_JIT=1 python -m pytest -q tests/test_numba.py tests/test_kernels.py
# Packaging: an sdist and a wheel built from it (python -m build) hold bpkernels.backends and every
# subpackage of backends/ (through the bpkernels/backends symlink) and the .cu sources, and install
# no top-level `backends` (tests/test_packaging.py, test_built_distributions)
python -m pip install --quiet --disable-pip-version-check build
dist="$(mktemp -d)"
python -m build --outdir "$dist" . >"$dist/build.log" 2>&1 || { cat "$dist/build.log"; exit 1; }
BPK_DIST_DIR="$dist" python -m pytest -q tests/test_packaging.py
rm -rf "$dist"
BPK_BENCH_QUICK=1 python -m pytest benchmarks --benchmark-disable -q
bpk bench --quick --dtypes float32,float64 --peers torch,sklearn
