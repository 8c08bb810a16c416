"""Memory: what cannot fit is refused before anything is allocated, with one error naming the
sizes (bpkernels.InsufficientMemory, a MemoryError), and `bpk` turns any MemoryError into one
line and exit code 2. The memory available is fixed by monkeypatching (the estimates are
compared with sizes worked out here by hand), or limited for real with RLIMIT_AS in a
subprocess; nothing large is ever allocated."""
import gzip
import io
import os
import resource
import struct
import subprocess
import sys
import zipfile
import zlib

import numpy as np
import pytest

import bpkernels as bpk
from bpkernels import cli, datasets, workload
from bpkernels.backends import host

GiB = 2**30


@pytest.fixture
def available(monkeypatch):
    """Fix the memory the host reports: ``available(bytes)``."""
    def set_to(nbytes, source="MemAvailable in /proc/meminfo"):
        monkeypatch.setattr(host, "memory_available", lambda: (int(nbytes), source))
    set_to(24 * GiB)
    return set_to


def one_line(capsys, code):
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


# ---------------------------------------------------------------------------- the model
def test_a_layer_of_a_hundred_million_units_is_refused_with_its_sizes(available):
    n = 64 * 10**8 + 10**8 + 10**8 * 10 + 10  # W and b of both layers
    with pytest.raises(bpk.InsufficientMemory) as caught:
        bpk.MLP([64, 10**8, 10], backend="numpy")
    text = str(caught.value)
    assert f"parameters {n * 4 / GiB:.1f} GiB" in text and f"gradients {n * 4 / GiB:.1f} GiB" in text
    assert f"initial weights drawn in float64 {n * 16 / GiB:.1f} GiB" in text
    assert f"needs {n * 24 / GiB:.1f} GiB" in text and "only 24.0 GiB is available" in text
    assert caught.value.needed == n * 24 and caught.value.available == 24 * GiB
    assert isinstance(caught.value, MemoryError)


def test_the_cli_refuses_two_layers_of_two_million_in_one_line(available, capsys):
    code = cli.main(["train", "--data", "synthetic", "--backend", "numpy",
                     "--layers", "2000000,2000000", "--no-progress"])
    line = one_line(capsys, code)
    n = 20 * 2 * 10**6 + 2 * 10**6 + 4 * 10**12 + 2 * 10**6 + 2 * 10**6 * 4 + 4
    assert line.startswith("bpk: error: MLP [20, 2000000, 2000000, 4] in float32")
    assert f"parameters {n * 4 / 2**40:.1f} TiB" in line and "24.0 GiB is available" in line


def test_a_model_that_fits_is_built(available):
    n = 3 * 5 + 5 + 5 * 2 + 2
    available(n * 24)  # exactly the estimate: not refused
    assert bpk.MLP([3, 5, 2], backend="numpy").n_params == n
    available(n * 24 - 1)
    with pytest.raises(bpk.InsufficientMemory):
        bpk.MLP([3, 5, 2], backend="numpy")


# ---------------------------------------------------------------------------- training
def test_fit_refuses_a_batch_whose_workspaces_cannot_fit_before_allocating(available):
    model = bpk.MLP([4, 50000, 3], activation="gelu", backend="numpy")
    X = np.zeros((200000, 4))
    y = np.arange(200000) % 3
    opt = bpk.Adam()
    with pytest.raises(bpk.InsufficientMemory) as caught:
        bpk.fit(model, X, y, optimizer=opt, batch_size=200000, epochs=1)
    # X; A, dA of both layers and gelu's Z (the output's identity needs none); int64 labels
    per_row = (4 + 3 * 50000 + 2 * 3) * 4 + 8
    assert f"workspaces for batches of 200000 rows {200000 * per_row / GiB:.1f} GiB" in str(caught.value)
    assert not opt.bound_to(model) and not model._workspaces  # nothing was allocated


def test_fit_counts_the_optimizer_state_and_the_batch_order(available):
    model = bpk.MLP([3, 4, 2], backend="numpy", dtype="float64")
    X, y = np.random.default_rng(0).standard_normal((10, 3)), np.arange(10) % 2
    n = model.n_params
    workspace = 5 * ((3 + 2 * 4 + 2 * 2) * 8 + 8)  # X, A and dA (ReLU keeps no Z), labels
    need = 2 * n * 8 + workspace + 16 * 10  # Adam's two states, the batch order (X is used in place)
    available(need - 1)
    with pytest.raises(bpk.InsufficientMemory, match="adam state"):
        bpk.fit(model, X, y, optimizer="adam", batch_size=5, epochs=1)
    available(need)
    assert len(bpk.fit(model, X, y, optimizer="adam", batch_size=5, epochs=1)) == 1


def test_on_a_gpu_the_model_is_checked_against_the_devices_free_memory(available):
    """The stand-in's device has 1 GiB: parameters and gradients go there, the float64
    initial weights stay on the host (24 GiB here)."""
    import cudasim
    if cudasim.unavailable_reason() is not None:
        pytest.skip(cudasim.unavailable_reason())
    backend = cudasim.make_backend()
    free, where = backend.memory_available()
    assert where == "free memory of GPU 0" and 0 < free <= GiB
    n = 64 * 10**7 + 10**7 + 10**7 * 10 + 10
    with pytest.raises(bpk.InsufficientMemory) as caught:
        bpk.MLP([64, 10**7, 10], backend=backend)
    assert f"needs {n * 8 / GiB:.1f} GiB (parameters {n * 4 / GiB:.1f} GiB, gradients " \
        f"{n * 4 / GiB:.1f} GiB), but only " in str(caught.value)
    assert str(caught.value).endswith("is available (free memory of GPU 0)")
    assert caught.value.available == free  # what other tests left allocated is not free
    small = 64 * 1000 + 1000 + 1000 * 10 + 10
    available(small * 16 - 1)  # the host's part, checked on its own
    with pytest.raises(bpk.InsufficientMemory, match=r"\(initial weights drawn in float64 "
                                                     r"1.1 MiB\), but only 1.1 MiB is available "
                                                     r"\(MemAvailable"):
        bpk.MLP([64, 1000, 10], backend=backend)
    available(small * 16)
    assert bpk.MLP([64, 1000, 10], backend=backend).n_params == small


def test_moving_a_model_to_a_gpu_without_room_leaves_it_as_it_was(monkeypatch, available):
    import cudasim
    if cudasim.unavailable_reason() is not None:
        pytest.skip(cudasim.unavailable_reason())
    model = bpk.MLP([64, 1000, 10], backend="numpy")
    X, y = np.random.default_rng(0).standard_normal((8, 64)), np.arange(8) % 10
    bpk.fit(model, X, y, optimizer="adam", epochs=1)
    before = [a.copy() for pair in model.get_weights() for a in pair]
    gpu = cudasim.make_backend()
    n = model.n_params  # parameters, gradients and Adam's two moments, in float64 there
    monkeypatch.setattr(gpu, "memory_available", lambda: (4 * n * 8 - 1, "free memory of GPU 0"))
    with pytest.raises(bpk.InsufficientMemory, match=rf"needs {4 * n * 8 / 2**20:.1f} MiB \("
                                                     r"parameters .*, gradients .*, optimizer "
                                                     r"state exp_avg .*, optimizer state "
                                                     r"exp_avg_sq .*\), but only"):
        model.to(gpu, "float64")
    assert model.backend.name == "numpy" and model.dtype == np.float32
    assert all(np.array_equal(a, b) for a, b in
               zip(before, [a for pair in model.get_weights() for a in pair]))
    monkeypatch.setattr(gpu, "memory_available", lambda: (4 * n * 8, "free memory of GPU 0"))
    assert model.to(gpu, "float64").backend is gpu


# ---------------------------------------------------------------------------- benchmark
def test_a_bench_config_of_a_hundred_million_inputs_is_refused(available, capsys):
    config = workload.parse_config("99999999-10:32:16384")
    with pytest.raises(bpk.InsufficientMemory, match="synthetic data of 16384 x 99999999"):
        workload.workload(config)
    code = cli.main(["bench", "--configs", "99999999-10:32:16384", "--backends", "numpy",
                     "--dtypes", "float32"])
    line = one_line(capsys, code)
    assert line.startswith("bpk: error: benchmark config 99999999-10:32:16384 in float32 needs")


def test_any_other_memory_error_is_one_line(monkeypatch, available, capsys):
    def exhausted(*args, **kwargs):
        raise MemoryError("Unable to allocate 3.0 GiB for an array with shape (1, 2)")
    monkeypatch.setattr(datasets, "load", exhausted)
    line = one_line(capsys, cli.main(["train", "--no-progress"]))
    assert line == ("bpk: error: out of memory: Unable to allocate 3.0 GiB for an array with "
                    "shape (1, 2) (24.0 GiB available now, MemAvailable in /proc/meminfo); a "
                    "smaller model, batch or data set, or a higher limit, may fit")
    from bpkernels import bench
    monkeypatch.setattr(bench, "run", exhausted)
    line = one_line(capsys, cli.main(["bench", "--backends", "numpy", "--configs", "S"]))
    assert line.startswith("bpk: error: out of memory: Unable to allocate 3.0 GiB")


# ---------------------------------------------------------------------------- .npz files
def _npy_header(shape, descr="<f8"):
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": descr, "fortran_order": False,
                                               "shape": shape})
    return out.getvalue()


def _with_y(archive, n):
    out = io.BytesIO()
    np.save(out, np.arange(n))
    archive.writestr("y.npy", out.getvalue())


def test_an_npz_whose_header_claims_four_trillion_elements(tmp_path):
    path = tmp_path / "claims.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("X.npy", _npy_header((2000000, 2000000)) + bytes(64))
        _with_y(archive, 3)
    with pytest.raises(ValueError, match=r"X.npy's header claims shape \(2000000, 2000000\) of "
                                         r"float64 \(29.1 TiB\), but the member holds 64 B"):
        datasets.load_npz(path)


def _deflate_bomb(path, data_bytes):
    """A zip whose X.npy is a real deflate stream of ``data_bytes`` zeros after an .npy
    header, written by hand: one compressed block of 16 MiB of zeros, repeated (a full flush
    makes each block independent of what came before)."""
    chunk = 16 * 2**20
    header = _npy_header((data_bytes // 8,))
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = packer.compress(header) + packer.flush(zlib.Z_FULL_FLUSH)
    block = packer.compress(bytes(chunk)) + packer.flush(zlib.Z_FULL_FLUSH)
    stream = head + block * (data_bytes // chunk) + packer.flush()
    crc = zlib.crc32(header)
    zeros = bytes(chunk)
    for _ in range(data_bytes // chunk):
        crc = zlib.crc32(zeros, crc)
    size = len(header) + data_bytes
    name = b"X.npy"
    local = struct.pack("<4s2B4HL2L2H", b"PK\003\004", 20, 0, 0, 8, 0, 0x21, crc,
                        len(stream), size, len(name), 0) + name
    central = struct.pack("<4s4B4HL2L5H2L", b"PK\001\002", 20, 0, 20, 0, 0, 8, 0, 0x21, crc,
                          len(stream), size, len(name), 0, 0, 0, 0, 0, 0) + name
    end = struct.pack("<4s4H2LH", b"PK\005\006", 0, 0, 1, 1, len(central),
                      len(local) + len(stream), 0)
    path.write_bytes(local + stream + central + end)


def test_a_4_mb_zip_that_expands_to_4_gb_is_refused_unopened(tmp_path):
    path = tmp_path / "bomb.npz"
    _deflate_bomb(path, 255 * 16 * 2**20)  # 3.98 GiB of data: no zip64 needed
    assert path.stat().st_size < 5 * 2**20
    info = zipfile.ZipFile(path).getinfo("X.npy")
    assert info.file_size > 3.9 * GiB and info.compress_type == zipfile.ZIP_DEFLATED
    with pytest.raises(ValueError, match=r"member X.npy expands from 4.0 MiB to 4.0 GiB "
                                         r"\(over 200:1\): refused as a zip bomb"):
        datasets.load_npz(path)


def test_an_npz_larger_than_the_memory_available(tmp_path, available):
    path = tmp_path / "big.npz"
    np.savez_compressed(path, X=np.zeros((4096, 512)), y=np.zeros(4096, np.int64))
    available(16 * 2**20)
    with pytest.raises(bpk.InsufficientMemory, match=r"loading .*big.npz needs 32.1 MiB \(X.npy "
                                                     r"as stored 16.0 MiB, X converted to 64 bits "
                                                     r"16.0 MiB, y.npy as stored 32.0 KiB"):
        datasets.load_npz(path)
    available(33 * 2**20)
    assert datasets.load_npz(path)[0].shape == (4096, 512)


def _idx_images(path, dims, payload=b""):
    """An images file as given, beside a labels file that is fine."""
    header = struct.pack(">4I", 0x00000803, *dims)
    path.write_bytes(gzip.compress(header + payload) if path.suffix == ".gz" else header + payload)
    labels = struct.pack(">2I", 0x00000801, dims[0]) + bytes(dims[0])
    (path.parent / "train-labels-idx1-ubyte").write_bytes(labels)


def test_a_gzipped_idx_file_claiming_a_gigabyte_is_refused_unread(tmp_path, monkeypatch):
    _idx_images(tmp_path / "train-images-idx3-ubyte.gz", (100000, 100, 100))
    read = []
    monkeypatch.setattr(datasets, "_count_rest", lambda f: read.append(f) or 0)
    with pytest.raises(ValueError, match=r"the IDX header claims 953.7 MiB from a gzip file of "
                                         r"\d+ B \(over 200:1\): refused"):
        datasets.load_mnist(tmp_path)
    assert not read


@pytest.mark.parametrize("name", ["train-images-idx3-ubyte", "train-images-idx3-ubyte.gz"])
def test_idx_pixels_larger_than_the_memory_available(tmp_path, available, name):
    _idx_images(tmp_path / name, (1000, 28, 28), bytes(1000 * 28 * 28))
    available(2**20)
    with pytest.raises(bpk.InsufficientMemory, match=r"needs 6.7 MiB \(the IDX payload 765.6 "
                                                     r"KiB, its float64 copy 6.0 MiB\)"):
        datasets.load_mnist(tmp_path)


# ---------------------------------------------------------------------------- ulimit -v
def _limited(limit_bytes, *argv):
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    return subprocess.run([sys.executable, "-m", "bpkernels.cli", *argv], capture_output=True,
                          text=True, timeout=300, preexec_fn=limit,
                          env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc: Linux")
def test_plain_bpk_train_under_a_low_ulimit_is_one_line():
    """Under `ulimit -v` of 400 MiB the libraries of `bpk train` cannot all be mapped: OpenBLAS
    or LLVM would abort the process, a library would fail to load and be reported as missing.
    The run is refused before it starts, naming the limit."""
    done = _limited(400 * 2**20, "train", "--no-progress")
    assert done.returncode == 2 and done.stdout == "", done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bpk: error: bpk train needs 512.0 MiB"), lines
    assert "is available (the address-space limit (ulimit -v 409600))" in lines[0]


def test_address_space_is_read_from_the_limit_and_the_mappings(tmp_path, monkeypatch):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmPeak:\t  300000 kB\nVmSize:\t  204800 kB\n")
    monkeypatch.setattr(resource, "getrlimit", lambda which: (500 * 2**20, resource.RLIM_INFINITY))
    assert host.address_space_available(str(status)) == (300 * 2**20, "the address-space "
                                                         "limit (ulimit -v 512000)")


def test_the_cgroup_limit_counts(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/job\n")
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "memory.max").write_text(f"{2 * GiB}\n")
    (tmp_path / "job" / "memory.current").write_text(f"{GiB // 2}\n")
    assert host._cgroup_available(str(proc), str(tmp_path)) == (
        GiB + GiB // 2, "the cgroup's memory.max (2.0 GiB)")
    (tmp_path / "job" / "memory.max").write_text("max\n")
    assert host._cgroup_available(str(proc), str(tmp_path))[0] is None


# ------------------------------------------------------------------ what failed, not "missing"
class _Failing:
    """A meta-path finder under which importing ``name`` raises ``error``."""

    def __init__(self, name, error):
        self.name, self.error = name, error

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name:
            raise self.error
        return None


@pytest.mark.parametrize("error, expected", [
    (OSError("libgomp.so.1: failed to map segment from shared object"),
     (ImportError, "the digits data set needs scikit-learn, which is installed but failed to "
                   "import: OSError: libgomp.so.1: failed to map segment from shared object")),
    (MemoryError(), (MemoryError, "importing scikit-learn for the digits data set ran out of "
                                  "memory")),
])
def test_digits_says_what_failed_when_scikit_learn_is_installed(monkeypatch, error, expected):
    pytest.importorskip("sklearn")
    monkeypatch.delitem(sys.modules, "sklearn.datasets", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_Failing("sklearn.datasets", error), *sys.meta_path])
    with pytest.raises(expected[0]) as caught:
        datasets.load_digits()
    assert str(caught.value) == expected[1]


def test_a_backend_whose_library_cannot_be_mapped_is_passed_over(monkeypatch):
    import bpkernels.backends as registry
    monkeypatch.setattr(registry, "_REGISTRY", {"starved": ("._starved_test_backend", "B", ""),
                                                **registry._REGISTRY})
    monkeypatch.setattr(registry, "_unavailable", {})
    monkeypatch.setattr(sys, "meta_path", [
        _Failing("bpkernels.backends._starved_test_backend", OSError("libllvmlite.so: failed "
                                                                      "to map segment")),
        *sys.meta_path])
    assert registry.unavailable_reasons()["starved"] == (
        "backend 'starved' failed to load a library while importing: OSError: libllvmlite.so: "
        "failed to map segment")
    assert registry.get_backend("auto").name != "starved"


def test_numba_refuses_to_start_compiling_without_room(monkeypatch, available):
    numba_backend = pytest.importorskip("bpkernels.backends.numba.backend")

    class Dispatcher:
        class py_func:
            __module__ = "bpkernels.backends.numba.layers"

    event = type("Event", (), {"data": {"dispatcher": Dispatcher}})()
    check = numba_backend._CompileMemoryCheck()
    available(200 * 2**20)
    check.on_start(event)
    available(100 * 2**20, "the address-space limit (ulimit -v 1000)")
    with pytest.raises(bpk.InsufficientMemory, match=r"compiling Numba kernels needs 160.0 MiB "
                                                     r"\(LLVM's working memory 160.0 MiB\), but "
                                                     r"only 100.0 MiB is available \(the address"):
        check.on_start(event)
