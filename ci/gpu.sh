#!/usr/bin/env bash
# GPU runner, offline: on a machine with an NVIDIA GPU whose Python already has CuPy, Numba,
# PyTorch, mpi4py and pytest (the GPU machine this project gets: no network, Python 3.12, CuPy
# for CUDA 13). It installs nothing from the network: the project goes into a virtual
# environment that sees the system's packages, with --no-deps --no-build-isolation (or, where
# that cannot build, runs from the source tree). Then, each step under its own time limit so
# that the whole fits in 6 minutes on a 16-core host, and each run even if the one before failed
# (a GPU run is rare: every finding counts):
#   1. the GPU-relevant tests: every test that runs on the "cupy" backend (the real one here,
#      and the CPU stand-in), tests/test_cuda_gpu.py, the CUDA sources and the MPI tests;
#   2. the NCCL path with one GPU: `bpk bench --ranks 1` (data-parallel training on the real
#      CuPy under mpiexec, its agreement with the float64 reference checked);
#   3. `bpk bench --backends cupy,numba --configs S,M,L --peers torch` (the GEMM floor timed by
#      cuBLAS under CUDA events).
# The report goes to $BPK_GPU_REPORT (default gpu-report/): install.txt, info.txt (the GPU,
# `bpk info`), tests.txt and tests.xml (JUnit), nccl.txt and nccl.json, bench.txt (the table)
# and bench.json.
# The limits (180 + 45 + 120 s) keep it within 6 minutes; a step over its limit fails.
# Exit status: 0 when every step passed, 1 when one failed, 2 when there is no GPU or no CuPy.
#   BPK_BENCH_ARGS    extra arguments for step 3 (e.g. "--repeats 7")
#   BPK_BENCH_DTYPES  step 3's dtypes (default float32,bf16; bf16 runs where a backend has it)
#   BPK_GPU_WORKERS   pytest-xdist workers for step 1 where xdist is installed (default 8)
set -uo pipefail
cd "$(dirname "$0")/.."
failed=0
step() { printf '\n=== %s (%ss)\n' "$1" "$SECONDS"; }
# run NAME LIMIT_S COMMAND...: the command's output to the terminal and $report/NAME.txt;
# a failure or a timeout marks the run failed and goes on.
run() {
    local name="$1" limit="$2"
    shift 2
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$report/$name.txt"
    local status="${PIPESTATUS[0]}"
    if [ "$status" -ne 0 ]; then
        echo "ci/gpu.sh: step '$name' failed (exit $status; 124: over its ${limit} s)" \
            | tee -a "$report/$name.txt" >&2
        failed=1
    fi
}

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "ci/gpu.sh: no NVIDIA GPU visible (nvidia-smi fails); use ci/test.sh on CPU runners" >&2
    exit 2
fi

report="${BPK_GPU_REPORT:-gpu-report}"
mkdir -p "$report" && report="$(cd "$report" && pwd)"

step "the project, offline"
python3 -m venv --system-site-packages .venv-gpu
# shellcheck disable=SC1091
. .venv-gpu/bin/activate
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
plugin=()
if ! python -m pip install --no-deps --no-build-isolation -e . >"$report/install.txt" 2>&1; then
    # No setuptools to build with: the source tree is the package (bpkernels/backends is a
    # link into backends/), and pytest loads the plugin the installed entry point would.
    echo "ci/gpu.sh: could not install the project offline (install.txt says why); running" \
        "it from the source tree"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    plugin=(-p bpkernels._pytest_plugin)
fi
bpk=(python -m bpkernels.cli)  # (installed or not; `timeout` runs no shell function)
{ nvidia-smi; python --version; "${bpk[@]}" info; } 2>&1 | tee "$report/info.txt"
# The cupy backend must be available here: stop loudly rather than skip every GPU test.
if ! python - <<'PY'
import sys
import bpkernels
reasons = bpkernels.backends.unavailable_reasons()
if "cupy" in reasons:
    sys.exit(f"ci/gpu.sh: the cupy backend is unavailable: {reasons['cupy']}")
print("cupy backend:", bpkernels.get_backend("cupy").device_info())
PY
then
    exit 2
fi

step "1. the GPU-relevant tests"
workers=()
if python -c "import xdist" 2>/dev/null; then
    workers=(-n "${BPK_GPU_WORKERS:-8}")
fi
run tests 180 python -m pytest -q -p no:cacheprovider "${plugin[@]}" "${workers[@]}" \
    --junitxml="$report/tests.xml" -k "cupy or cuda or gpu or nccl or mpi"

step "2. the NCCL path with one GPU"
run nccl 45 "${bpk[@]}" bench --ranks 1 --backends cupy --configs S --dtypes float32 --repeats 3 \
    --json "$report/nccl.json"

step "3. the benchmark"
# shellcheck disable=SC2086
run bench 120 "${bpk[@]}" bench --backends cupy,numba --configs S,M,L \
    --dtypes "${BPK_BENCH_DTYPES:-float32,bf16}" --peers torch --repeats 3 \
    --json "$report/bench.json" ${BPK_BENCH_ARGS:-}

step "done"
echo "ci/gpu.sh: report in $report ($([ "$failed" -eq 0 ] && echo "every step passed" ||
    echo "a step failed: see its .txt"))"
exit "$failed"
