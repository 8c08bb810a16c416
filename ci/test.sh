#!/usr/bin/env bash
# CPU runner: a fresh virtual environment, the project installed from pyproject.toml with its
# test extra, then the test command of README.md (on pytest-xdist), then the Numba kernels as
# plain Python and with the oldest Numba pyproject.toml allows, packaging, and the benchmark smoke
# tests (agreement is asserted, time never is), and last the GPU-path tests with CuPy installed
# on this GPU-less machine. Needs no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
stage() { printf '\n=== %s (%ss)\n' "$1" "$SECONDS"; }

stage "install"
python3 -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
# (the mkl extra: the Numba backend's bf16 products, where the CPU has AMX-BF16 or
# AVX512-BF16; elsewhere bf16's Numba tests skip with the reason)
python -m pip install --quiet --disable-pip-version-check -e ".[test,mkl]"
# PyTorch: a test-only reference (autograd, torch.optim, torch.nn, its schedulers) and a
# benchmark peer; Keras (on PyTorch) the reference of EarlyStopping. Never dependencies of
# bpkernels; their tests skip without them.
python -m pip install --quiet --disable-pip-version-check torch==2.13.0 keras
bpk info

stage "the test command of README.md (a cold Numba cache)"
python -m pytest -q -n auto

# Plain mode (public Numba only) has no stage of its own on the current Numba: the suite
# trains it against native mode in other processes (test_numba_modes.py; the weighted and the
# clipped epoch kernels in test_weights.py and test_clip_grad_norm.py), and the oldest-Numba
# stage below runs the epoch-kernel tests in it.
stage "the Numba kernels as plain Python (NUMBA_DISABLE_JIT, for debugging)"
NUMBA_DISABLE_JIT=1 python -m pytest -q tests/test_numba.py tests/test_kernels.py -k numba

stage "the oldest Numba that pyproject.toml allows (plain mode: its releases are untested)"
oldest="$(sed -n 's/^numba = \["numba>=\([0-9.]*\)".*/\1/p' pyproject.toml)"
python3 -m venv .venv-oldest
.venv-oldest/bin/python -m pip install --quiet --disable-pip-version-check \
    "numba==${oldest}.*" "numpy<2" "scipy<1.14" "pytest>=7" "pytest-xdist>=3"
.venv-oldest/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
.venv-oldest/bin/python -c "import numba; print('numba', numba.__version__)"
# (the epoch kernel against the per-kernel loop, one case per optimizer rule and target kind,
# and its latch: each case compiles a whole epoch kernel afresh, 7-30 s apiece on this Numba)
BPK_NUMBA_TEST_SUBSET=1 .venv-oldest/bin/python -m pytest -q -p no:cacheprovider -n auto \
    tests/test_numba.py -k "per_kernel_loop and not parallel_passes"

# Packaging: an sdist and a wheel built from it (python -m build) hold bpkernels.backends and every
# subpackage of backends/ (through the bpkernels/backends symlink) and the .cu sources, and install
# no top-level `backends` (tests/test_packaging.py, test_built_distributions)
stage "packaging"
python -m pip install --quiet --disable-pip-version-check build
dist="$(mktemp -d)"
python -m build --outdir "$dist" . >"$dist/build.log" 2>&1 || { cat "$dist/build.log"; exit 1; }
BPK_DIST_DIR="$dist" python -m pytest -q tests/test_packaging.py
rm -rf "$dist"

stage "benchmark smoke tests"
BPK_BENCH_QUICK=1 python -m pytest benchmarks --benchmark-disable -q
bpk bench --quick --configs S,M --dtypes float32,float64,bf16 --peers torch,sklearn
# Last, as it changes the environment: CuPy installed on this GPU-less runner, as `pip install
# "bpkernels[cuda12]"` leaves a CPU-only image. The registry must report "no GPU" and pass over
# the real backend, and the CUDA stand-in (tests/cudasim) must take none of the real CuPy's
# modules; DeprecationWarnings are errors here, as they are from our code everywhere.
stage "the GPU-path tests with CuPy installed and no GPU (cupy-cuda12x)"
python -m pip install --quiet --disable-pip-version-check cupy-cuda12x
python -c "import cupy; print('cupy', cupy.__version__)"
# (not the digits runs, the MPI launches and scikit-learn's conformance suite: a minute of
# training on the stand-in, already done above, whose CuPy modules the kernel and backend
# tests here load alike)
python -m pytest -q -n auto -W error::DeprecationWarning \
    -k "(cupy or cuda or gpu) and not (digits or mpi or conformance)"
stage "done"
