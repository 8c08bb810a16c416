"""Every CUDA source compiles: with nvcc to PTX for sm_80 and sm_90 (warnings are errors), for
both dtypes, exactly the text NVRTC gets at run time; and for the CPU emulation with the host
compiler (warnings are errors too). Plus the rules that keep the kernels runnable on the CPU.

nvcc is on PATH on CI machines; where it is not, the nvcc tests skip and say so.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

import cudasim
from bpkernels.backends import cuda_sources as sources
from cudasim import compiler

ARCHS = ("sm_80", "sm_90")
NVCC = shutil.which("nvcc")
CASES = [(source, dtype) for source in sources.SOURCES for dtype in sources.DTYPES]
CASE_IDS = [f"{source}-{dtype}" for source, dtype in CASES]


def _nvcc(source: str, dtype: str, arch: str, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / f"{source}.{dtype}.{arch}.cu"
    path.write_text(sources.source(source))
    return subprocess.run([NVCC, "-ptx", f"-arch={arch}", "-Werror", "all-warnings",
                           *sources.options(dtype), str(path), "-o", str(path.with_suffix(".ptx"))],
                          capture_output=True, text=True)


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH (CI has it): CUDA sources not "
                                         "compiled here")
@pytest.mark.parametrize("source, dtype", CASES, ids=CASE_IDS)
def test_nvcc_compiles_to_ptx(source, dtype, tmp_path):
    with ThreadPoolExecutor(len(ARCHS)) as pool:
        results = list(pool.map(lambda arch: _nvcc(source, dtype, arch, tmp_path), ARCHS))
    for arch, result in zip(ARCHS, results):
        assert result.returncode == 0, f"nvcc {arch} {dtype}:\n{result.stderr}"
        ptx = (tmp_path / f"{source}.{dtype}.{arch}.ptx").read_text()
        for name in sources.kernel_names(source):
            assert re.search(rf"\.entry {name}\(", ptx), f"{name} missing from the {arch} PTX"


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH (CI has it)")
def test_nvcc_rejects_a_broken_source(tmp_path):
    """The check above can fail: a type error in a kernel is a compile error."""
    path = tmp_path / "broken.cu"
    path.write_text(sources.source("dense.cu") + '\nextern "C" __global__ void broken(real* x) '
                    '{ x[0] = undefined_name; }\n')
    result = subprocess.run([NVCC, "-ptx", "-arch=sm_80", "-DREAL=float", str(path), "-o",
                             str(tmp_path / "broken.ptx")], capture_output=True, text=True)
    assert result.returncode != 0 and "undefined_name" in result.stderr


@pytest.mark.skipif(cudasim.unavailable_reason() is not None,
                    reason=f"CPU emulation of CUDA: {cudasim.unavailable_reason()}")
@pytest.mark.parametrize("source, dtype", CASES, ids=CASE_IDS)
def test_cpu_emulation_builds_every_kernel(source, dtype):
    library = compiler.Library(compiler.build(sources.source(source), sources.options(dtype)))
    for name in sources.kernel_names(source):
        assert library.signature(name), name


@pytest.mark.parametrize("source", sources.SOURCES)
def test_sources_follow_the_rules_of_the_emulation(source):
    """Self-contained after splicing (NVRTC has no system headers), and nothing a serial,
    barrier-free execution of the grid could not run."""
    text = re.sub(r"//[^\n]*", "", sources.source(source))  # code, not comments
    assert "#include" not in text
    for forbidden in ("__shared__", "__syncthreads", "__shfl", "cooperative_groups", "atomicAdd"):
        assert forbidden not in text, f"{source} uses {forbidden}"
    assert sources.kernel_names(source)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU runner: ci/gpu.sh runs")
def test_gpu_runner_script_refuses_a_machine_without_a_gpu():
    from pathlib import Path
    script = Path(__file__).resolve().parent.parent / "ci" / "gpu.sh"
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "no NVIDIA GPU visible" in result.stderr
