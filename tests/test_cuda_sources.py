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
from bpkernels.backends import base, bf16
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
    result = subprocess.run([NVCC, "-ptx", "-arch=sm_80", *sources.options("float32"), str(path),
                             "-o", str(tmp_path / "broken.ptx")], capture_output=True, text=True)
    assert result.returncode != 0 and "undefined_name" in result.stderr


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH (CI has it)")
def test_nvcc_refuses_the_sources_without_the_generated_defines(tmp_path):
    """The tables' facts exist only as the generated defines: without them nothing compiles."""
    path = tmp_path / "dense.cu"
    path.write_text(sources.source("dense.cu"))
    result = subprocess.run([NVCC, "-ptx", "-arch=sm_80", "-DREAL=float", str(path), "-o",
                             str(tmp_path / "dense.ptx")], capture_output=True, text=True)
    assert result.returncode != 0 and "generated defines" in result.stderr


# ====================================================================== the tables' constants
def _generated(dtype: str) -> dict[str, str]:
    """The -D defines that every compiler receives for ``dtype``, parsed back."""
    defines = {}
    for option in sources.options(dtype):
        name, _, value = option.removeprefix("-D").partition("=")
        assert option.startswith("-D") and name not in defines, option
        defines[name] = value
    return defines


@pytest.mark.parametrize("dtype", sources.DTYPES)
def test_generated_defines_are_the_tables(dtype):
    """Every code, slot and constant of backends/base.py reaches the compilers, with the
    table's value, and nothing else does (besides the element type)."""
    expected = {"REAL": {"float32": "float", "float64": "double"}[dtype]}
    for spec in base.ACTIVATION_TABLE:
        expected[f"ACT_{spec.name.upper()}"] = str(spec.code)
    for code, name in enumerate(base.LOSSES):
        expected[f"LOSS_{name.upper()}"] = str(code)
    for rule in base.RULES.values():
        for slot, name in enumerate(rule.hyper):
            expected[f"HP_{rule.name.upper()}_{name.upper()}"] = str(slot)
    generated = _generated(dtype)
    expected["CLIP_THREADS"], expected["CLIP_GROUPS"] = str(base.CLIP_THREADS), \
        str(base.CLIP_GROUPS)
    for name in ("LEAKY_RELU_SLOPE", "SQRT_HALF", "ONE_OVER_SQRT_2PI", "CLIP_EPS"):
        assert float(generated.pop(name)) == getattr(base, name), name  # the same double
    for i in range(2):  # Philox's 32-bit constants, as unsigned literals
        for name, table in (("PHILOX_M", base.PHILOX_M), ("PHILOX_W", base.PHILOX_W)):
            literal = generated.pop(f"{name}{i}")
            assert literal.endswith("u") and int(literal[:-1], 16) == table[i], literal
    for name in ("PHILOX_ROUNDS", "DROPOUT_LAYER_BITS", "DROPOUT_UNIFORM_BITS"):
        expected[name] = str(getattr(base, name))
    literal = generated.pop("BF16_QUIET_NAN")  # backends/bf16.py's, for round_bf16
    assert literal.endswith("u") and int(literal[:-1], 16) == bf16.QUIET_NAN, literal
    assert generated == expected
    # codes are the table's indices; silu is the row added last
    assert [s.code for s in base.ACTIVATION_TABLE] == list(range(len(base.ACTIVATION_TABLE)))
    assert generated["ACT_SILU"] == "6" and base.KEEPS_Z == {"gelu", "silu"}


@pytest.mark.parametrize("path", sorted(sources.CUDA_DIR.iterdir()), ids=lambda p: p.name)
def test_sources_hard_code_no_fact_of_the_tables(path):
    """No .cu or .cuh file defines a generated macro or switches on / indexes by a bare number:
    an activation code, a loss code or a hyper-parameter slot written by hand would drift from
    the table unseen."""
    text = re.sub(r"//[^\n]*", "", path.read_text())  # code, not comments
    names = _generated("float64")
    for name in names:
        assert not re.search(rf"#\s*define\s+{name}\b", text), f"{path.name} defines {name}"
    assert not re.search(r"\bcase\s+-?\d", text), f"{path.name}: a case on a number"
    assert not re.search(r"\bhp\s*\[\s*\d", text), f"{path.name}: hp indexed by a number"
    assert not re.search(r"\bact\s*[!=]=\s*\d", text), f"{path.name}: act compared with a number"
    for value in ("0.01", "0.7071", "0.3989"):
        assert value not in text, f"{path.name} writes a table constant ({value}) by hand"


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
