"""backends/host.py: the facts about the machine that the engine and the backends share."""
import os
import platform

import numpy as np

from bpkernels.backends import host


def test_cpu_name_is_a_name():
    name = host.cpu_name()
    assert isinstance(name, str) and name.strip() == name and name


def _cpuinfo(tmp_path, text):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return str(path)


def test_x86_linux_reads_the_model_name(tmp_path):
    path = _cpuinfo(tmp_path, "processor\t: 0\nvendor_id\t: AuthenticAMD\n"
                              "model name\t: AMD EPYC 7763 64-Core Processor\n\n"
                              "processor\t: 1\nmodel name\t: AMD EPYC 7763 64-Core Processor\n")
    assert host._linux_cpu_name(path) == "AMD EPYC 7763 64-Core Processor"


def test_arm_linux_without_a_model_name_names_the_vendor(tmp_path):
    # What a Graviton or Ampere kernel prints: no "model name", an implementer code.
    path = _cpuinfo(tmp_path, "processor\t: 0\nBogoMIPS\t: 243.75\nCPU implementer\t: 0x41\n"
                              "CPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\n")
    assert host._linux_cpu_name(path) == f"Arm {platform.machine()} (part 0xd0c)"


def test_a_board_that_names_itself(tmp_path):
    path = _cpuinfo(tmp_path, "processor\t: 0\nCPU implementer\t: 0x41\n"
                              "Model\t\t: Raspberry Pi 4 Model B Rev 1.4\n")
    assert host._linux_cpu_name(path) == "Raspberry Pi 4 Model B Rev 1.4"


def test_no_cpuinfo_falls_back(tmp_path):
    assert host._linux_cpu_name(str(tmp_path / "missing")) is None


def test_numpy_blas_libraries_are_numpys_own_files():
    # Empty for a NumPy built on a system BLAS or MKL; NumPy's wheels bundle an OpenBLAS.
    for path in host.numpy_blas_libraries():
        assert os.path.isfile(path) and "openblas" in os.path.basename(path)
        assert os.path.dirname(os.path.dirname(np.__file__)) in os.path.abspath(path)
