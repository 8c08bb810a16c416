#!/usr/bin/env bash
# GPU runner: on a machine with an NVIDIA GPU, a fresh virtual environment with the CuPy extra
# that matches the CUDA driver (cuda12 or cuda13), the whole test suite (every parity test then
# runs on the "cupy" backend too, and tests/test_cuda_gpu.py runs instead of skipping), then the
# benchmark with the GEMM floor timed by cuBLAS under CUDA events. Writes gpu-bench.json (or
# $BPK_BENCH_JSON) and prints its path.
#   BPK_CUDA_MAJOR=12|13  overrides the detected CUDA major version
#   BPK_BENCH_ARGS         extra arguments for `bpk bench` (e.g. "--repeats 7 --dtypes float32,float64")
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "ci/gpu.sh: no NVIDIA GPU visible (nvidia-smi fails); use ci/test.sh on CPU runners" >&2
    exit 2
fi

# The driver's CUDA version decides the wheel: a cuda13 CuPy needs a CUDA 13 driver.
major="${BPK_CUDA_MAJOR:-}"
if [ -z "$major" ]; then
    major="$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]\+\)\..*/\1/p' | head -n 1)"
fi
if [ -z "$major" ] && command -v nvcc >/dev/null 2>&1; then
    major="$(nvcc --version | sed -n 's/.*release \([0-9]\+\)\..*/\1/p' | head -n 1)"
fi
case "$major" in
    12) extra=cuda12 ;;
    13|14|15) extra=cuda13 ;;
    *) echo "ci/gpu.sh: cannot tell the CUDA major version (got '${major}'); set BPK_CUDA_MAJOR" >&2
       exit 2 ;;
esac
nvidia-smi -L

python3 -m venv .venv-gpu
# shellcheck disable=SC1091
. .venv-gpu/bin/activate
python -m pip install --quiet --disable-pip-version-check -e ".[${extra},test,bench]"
# CuPy finds cuBLAS and NVRTC in a CUDA toolkit; without one, it takes them from NVIDIA's wheels.
if ! python -c "import cupy; a = cupy.ones((2, 2)); (a @ a).get(); \
        cupy.RawKernel('extern \"C\" __global__ void k() {}', 'k').compile()" 2>/dev/null; then
    python -m pip install --quiet --disable-pip-version-check "cupy-${extra}x[ctk]"
fi
# torch is the peer of the S goal (>= 5x PyTorch-CUDA eager); optional, noted in the JSON if absent.
python -m pip install --quiet --disable-pip-version-check torch || \
    echo "ci/gpu.sh: torch not installed: the benchmark notes the missing peer"

bpk info
# The cupy backend must be available here: fail loudly rather than skip the GPU tests.
python - <<'PY'
import sys
import bpkernels
reasons = bpkernels.backends.unavailable_reasons()
if "cupy" in reasons:
    sys.exit(f"ci/gpu.sh: the cupy backend is unavailable: {reasons['cupy']}")
print("cupy backend:", bpkernels.get_backend("cupy").device_info())
PY
python -m pytest -q
json="${BPK_BENCH_JSON:-gpu-bench.json}"
# shellcheck disable=SC2086
bpk bench --backends cupy,numpy --configs S,M,L --peers torch --json "$json" ${BPK_BENCH_ARGS:-}
echo "benchmark written to $(cd "$(dirname "$json")" && pwd)/$(basename "$json")"
