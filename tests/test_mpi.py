"""Data-parallel training over MPI (bpkernels.distributed), run for real under mpiexec with 2 and
3 processes (3 on 2 cores: an uneven split, and a short last batch that leaves a rank no rows).

Each launch trains from fixed seeds (tests/mpi_fit.py) and every rank reports what it ended
with; the reference is the same training in this process without MPI, by the NumPy backend in
float64. In float64 the only difference is summation order (each rank sums its shard's rows,
then the all-reduce sums the ranks; other backends' kernels sum in their own order), a few ulps
per step: after the ~20 steps here the weights agree to about 1e-15 relative to the layer's
largest weight, so 1e-12 is a loose bound that a wrong shard, a missing or doubled row, a wrong
weighting or a skipped step (all O(1e-3) or more) would break. A float32 case is held to 1e-5
(it lands near 2e-7, float32's rounding over its 18 steps).

The CuPy backend runs here on the CPU stand-in of CuPy and NCCL (tests/cudasim): its NCCL path
(device buffers summed by the stand-in's allReduce, queued on the stream, after the weigh_grads
kernel) and its staged path (a CuPy without NCCL), with what the simulated device did per step.

Timeouts below only keep a hang from blocking the suite; nothing asserts how long a run took.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bpkernels as bpk
import cudasim
from bpkernels import checkpoint, cli, distributed

import mpi_fit

HERE = Path(__file__).resolve().parent
HANG_GUARD_S = 180
RTOL = 1e-12
RTOL_FLOAT32 = 1e-5
CUPY_CASES = [c for c in mpi_fit.CASES if mpi_fit.CASES[c][0].startswith("cupy")]
# One BLAS and Numba thread per rank: 3 ranks already oversubscribe 2 cores.
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1",
           MKL_NUM_THREADS="1")


def _mpiexec(ranks: int) -> list[str]:
    try:
        import mpi4py  # noqa: F401  (the package only: mpi4py.MPI would start MPI here)
    except ImportError:
        pytest.skip('mpi4py is not installed: pip install "bpkernels[mpi]"')
    try:
        return distributed.mpiexec_command(ranks)
    except FileNotFoundError as err:
        pytest.skip(str(err))


def launch(ranks: int, *command, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(_mpiexec(ranks) + [str(c) for c in command], capture_output=True,
                          text=True, timeout=HANG_GUARD_S, env=ENV, cwd=cwd)


def run_script(ranks: int, task: str, out: Path) -> tuple[subprocess.CompletedProcess, list]:
    out.mkdir()
    done = launch(ranks, sys.executable, HERE / "mpi_fit.py", task, out)
    reports = [json.loads((out / f"rank{r}.json").read_text()) if (out / f"rank{r}.json").exists()
               else None for r in range(ranks)]
    return done, reports


def needs_cudasim(case: str = "cupy") -> None:
    if case.startswith("cupy") and cudasim.unavailable_reason() is not None:
        pytest.skip(f"CPU emulation of CUDA: {cudasim.unavailable_reason()}")


def bpk_command() -> list[str]:
    script = Path(sys.executable).parent / "bpk"
    return [str(script)] if script.exists() else [sys.executable, "-m", "bpkernels.cli"]


def rel_error(weights, reference) -> float:
    """Largest |difference| over each array's largest |reference| entry."""
    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) /
               max(float(np.max(np.abs(np.asarray(b)))), 1e-300)
               for a, b in zip(weights, reference))


# --------------------------------------------------------------------------- without mpiexec
def test_shards_cover_a_batch_in_order_and_differ_by_at_most_one_row():
    assert [distributed.shard(10, r, 3) for r in range(3)] == [(0, 4), (4, 3), (7, 3)]
    assert [distributed.shard(2, r, 3) for r in range(3)] == [(0, 1), (1, 1), (2, 0)]
    for rows in range(0, 23):
        for ranks in range(1, 6):
            parts = [distributed.shard(rows, r, ranks) for r in range(ranks)]
            covered = [i for start, count in parts for i in range(start, start + count)]
            assert covered == list(range(rows))
            counts = [count for _, count in parts]
            assert max(counts) - min(counts) <= 1


def test_importing_bpkernels_never_imports_mpi4py():
    code = "import sys, bpkernels; assert 'mpi4py' not in sys.modules, 'mpi4py imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env=ENV, timeout=HANG_GUARD_S)


def test_fit_rejects_a_comm_that_is_not_a_communicator():
    pytest.importorskip("mpi4py", reason='needs mpi4py: pip install "bpkernels[mpi]"')
    model = bpk.MLP([3, 2], dtype="float64")
    with pytest.raises(TypeError, match="mpi4py intracommunicator such as MPI.COMM_WORLD"):
        bpk.fit(model, np.ones((4, 3)), np.array([0, 1, 0, 1]), comm="COMM_WORLD")


def test_a_launcher_and_mpi4py_that_disagree_on_the_job_size_are_named(monkeypatch):
    # mpirun said 2 processes, but this process's MPI sees only itself: the classic mismatch
    # of an mpirun from one MPI with an mpi4py built for another.
    pytest.importorskip("mpi4py", reason='needs mpi4py: pip install "bpkernels[mpi]"')
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.launched_world() is None
    monkeypatch.setenv("PMI_SIZE", "2")
    with pytest.raises(distributed.DistributedError, match="started 2 processes but MPI reports 1"):
        distributed.launched_world()


# --------------------------------------------------------------------------- training parity
_reports: dict[int, list] = {}


@pytest.fixture(params=[2, 3], ids=["2-ranks", "3-ranks"])
def parity_reports(request, tmp_path_factory):
    """What each rank ended with after training every case of mpi_fit.CASES (one launch per
    rank count, shared by the tests)."""
    ranks = request.param
    if ranks not in _reports:
        out = tmp_path_factory.mktemp(f"parity{ranks}") / "out"
        done, reports = run_script(ranks, "parity", out)
        assert done.returncode == 0, done.stderr
        _reports[ranks] = reports
    return _reports[ranks]


@pytest.mark.parametrize("case", [c for c in mpi_fit.CASES if c not in mpi_fit.DIVERGING])
def test_data_parallel_training_equals_single_process_training(parity_reports, case):
    needs_cudasim(case)
    reference = mpi_fit.train(case, reference=True)
    rtol = RTOL_FLOAT32 if case in mpi_fit.FLOAT32 else RTOL
    first = parity_reports[0][case]
    for rank, report in enumerate(parity_reports):
        # Every rank applied the same all-reduced gradients: bit-identical weights and history
        # (what the device did may differ: a rank without rows in a step launches less).
        for key in ("diverged", "history", "weights"):
            assert report[case][key] == first[key], f"rank {rank}'s {key} differ from rank 0's"
    assert first["diverged"] is None
    assert rel_error(first["weights"], reference["weights"]) < rtol
    np.testing.assert_allclose(first["history"]["loss"], reference["history"]["loss"],
                               rtol=rtol, atol=0)
    if "accuracy" in reference["history"]:
        assert first["history"]["accuracy"] == reference["history"]["accuracy"]
    for name in mpi_fit.METRICS.get(case, ()):  # summed over each rank's shards, then ranks
        np.testing.assert_allclose(first["history"][name], reference["history"][name],
                                   rtol=rtol, atol=1e-14, err_msg=name)


@pytest.mark.parametrize("case", mpi_fit.DIVERGING)
def test_divergence_on_one_ranks_shard_halts_every_rank_at_the_same_step(parity_reports, case):
    # Only the rank holding row 37 sees its loss overflow (its gradient stays finite): the
    # poisoned all-reduce must halt all ranks at the step a single process halts at, with
    # the weights of the last finite step.
    needs_cudasim(case)
    reference = mpi_fit.train(case, reference=True)
    assert reference["diverged"] is not None
    for report in parity_reports:
        assert report[case]["diverged"] == reference["diverged"]
        assert rel_error(report[case]["weights"], reference["weights"]) < RTOL


@pytest.mark.parametrize("case", CUPY_CASES)
def test_cupy_steps_under_mpi_launch_kernels_and_never_wait_or_allocate(parity_reports, case):
    """Under comm, fit() runs the CuPy backend kernel by kernel (no graph: the all-reduce sits
    between backward and update); with NCCL one all-reduce is queued per step and a step's host
    code neither allocates nor waits for the device. Without NCCL the gradient goes through
    the host every step: the same count shows those waits, so the check can fail."""
    needs_cudasim(case)
    staged = mpi_fit.CASES[case][0] == "cupy-cudasim-nonccl"
    for report in parity_reports:
        device = report[case]["device"]
        assert device["fit"]["captures"] == device["fit"]["graph_launches"] == 0
        within, intervals = device["within_epochs"], device["intervals"]
        assert intervals > 0 or case in mpi_fit.DIVERGING
        if staged:
            assert device["fit"]["nccl_allreduces"] == 0
            assert within["host_waits"] >= intervals > 0
        else:
            assert device["fit"]["nccl_allreduces"] == device["steps"] > 0
            assert within["nccl_allreduces"] == intervals
            assert within["allocations"] == within["host_waits"] == 0


def test_the_nccl_stand_in_sums_on_the_stream_replays_in_graphs_and_refuses_bad_calls(tmp_path):
    needs_cudasim()
    ranks = 3
    done, reports = run_script(ranks, "nccl", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    own = [np.arange(5) + 10.0 * r for r in range(ranks)]
    total = sum(own)
    for rank, report in enumerate(reports):
        for dtype in ("float32", "float64"):
            got = report[f"sum {dtype}"]
            assert got["queued"] == own[rank].tolist()  # device work: runs when the host waits
            assert got["summed"] == total.tolist()
            # Out of place, queued after the sum on the same stream: the max of the sums.
            assert got["max"] == total[:3].tolist() + own[rank][3:].tolist()
        # Capture runs nothing; each replay sums again (NCCL >= 2.9 in CUDA graphs).
        assert report["graph"] == {"after capture": own[rank][:2].tolist(),
                                   "after 2 replays": (ranks * total[:2]).tolist()}
        refused = report["refused"]
        expected = {
            "dtype": "SimError: allReduce: NCCL_FLOAT64 over sendbuf's float32 memory",
            "size": "SimError: allReduce: 6 NCCL_FLOAT64 elements at sendbuf run past the end",
            "host pointer": "is not in any live device allocation",
            "array for pointer": "TypeError: allReduce: sendbuf is an int",
            "counts differ": "SimError: NCCL allReduce calls differ across ranks",
            "another stream in capture": "SimError: work queued on another stream during graph "
                                         "capture",
            "destroyed": "NcclError: NCCL_ERROR_INVALID_ARGUMENT: the communicator was destroyed",
        }
        assert set(refused) == set(expected)
        for what, text in expected.items():
            assert refused[what] is not None and text in refused[what], (what, refused[what])


def test_use_local_gpu_returns_on_every_rank_when_ranks_see_different_gpus(tmp_path):
    # Rank 1 sees no GPU, then names a CPU backend: it must still join the collective that
    # the rank with a GPU enters (it used to skip it, leaving rank 0 waiting forever).
    needs_cudasim()
    done, reports = run_script(2, "local-gpu", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert reports == [{"ranks back": [0, 1]}] * 2


def test_bench_worker_puts_each_rank_of_a_node_on_its_own_gpu(tmp_path):
    # `bpk bench --ranks 2 --backends cupy` on a node with two GPUs: bpk train picked each
    # rank's GPU, the bench worker did not (both ranks on GPU 0). On the CuPy stand-in, the
    # registry's "cupy" backend trains through its NCCL path and matches the NumPy reference.
    needs_cudasim()
    done, reports = run_script(2, "bench-worker", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert [report["device"] for report in reports] == [0, 1]
    result = reports[0]["result"]
    assert reports[1]["result"] is None  # rank 0 reports
    assert result["name"] == "cupy" and result["parity_rel_err"] < RTOL


# --------------------------------------------------------------------------- bad launches, failures
def test_the_data_check_reads_every_row_and_names_each_rank_that_differs(monkeypatch):
    # In this process: what each rank would gather, then the check every rank runs on it.
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((5000, 6)), rng.integers(0, 3, 5000)
    sampled = np.unique(np.linspace(0, 4999, 1024).astype(np.int64))  # what the old check read
    outside = np.setdiff1d(np.arange(5000), sampled)
    changed_X, changed_y = X.copy(), y.copy()
    changed_X[outside] += 1.0  # 3,976 rows, as in the issue
    changed_y[outside[-1]] = (y[outside[-1]] + 1) % 3  # one label, near the end
    monkeypatch.setattr(distributed, "_FINGERPRINT_BLOCK_BYTES", 100 * (6 * 8 + 8))  # 100 rows
    ranks = [(X, y), (X.copy(), y.copy()), (changed_X, y), (X, changed_y)]
    everyone = [{distributed._DATA: distributed._fingerprint(*data)} for data in ranks]
    distributed._check_same(everyone[0], everyone[:2])  # equal data passes
    block = outside[-1] // 100 * 100
    with pytest.raises(distributed.DistributedError, match=re.escape(
            "data (a fingerprint of X and y) differs across ranks: rank 2's differs from rank "
            f"0's within rows 0..99; rank 3's differs from rank 0's within rows "
            f"{block}..{block + 99}; every rank must")):
        distributed._check_same(everyone[0], everyone)
    with pytest.raises(distributed.DistributedError, match="seed differs across ranks: rank 0 "
                       "has 0, rank 1 has 1; ranks 2, 3 differ too; every rank must"):
        distributed._check_same({"seed": 0}, [{"seed": s} for s in (0, 1, 2, 1)])


def test_bad_launches_raise_the_same_clear_error_on_every_rank(tmp_path):
    done, reports = run_script(3, "launch-errors", tmp_path / "out")
    assert done.returncode == 0, done.stderr  # every rank raised, caught it and went on
    expected = {
        "batch_size differs": "batch_size differs across ranks: rank 0 has 16, rank 1 has 8",
        "seed differs": "weights (a digest) differs across ranks",
        "data differs": "data (a fingerprint of X and y) differs across ranks",
        # every rank that differs is named (5,000 rows of 56 bytes: one block of rows)
        "data differs outside a sample": "data (a fingerprint of X and y) differs across ranks: "
                                         "rank 1's differs from rank 0's within rows 0..4999; "
                                         "rank 2's differs from rank 0's within rows 0..4999",
        "too many ranks": "3 ranks but only 2 training samples",
        "batch below ranks": "batch_size 2 is smaller than the 3 ranks",
        "NCCL on rank 0 only": "gradient all-reduce differs across ranks: rank 0 has 'NCCL, on "
                               "the device', rank 1 has 'MPI, staged through host memory'",
        "bad labels everywhere": "ValueError: cross_entropy labels must lie in 0..2",
        "sample weights differ": "sample and class weights (a digest) differs across ranks",
        "metrics differ": "metrics differs across ranks: rank 0 has None, rank 2 has "
                          "['f1_macro']",
    }
    if cudasim.unavailable_reason() is not None:
        del expected["NCCL on rank 0 only"]
    for what, text in expected.items():
        messages = {report[what] for report in reports}
        assert len(messages) == 1, f"{what}: ranks disagree: {messages}"
        message = messages.pop()
        assert message is not None and text in message, f"{what}: {message}"
    assert "same seed" in reports[0]["seed differs"]
    assert "same seed" not in reports[0]["sample weights differ"]  # the hint is the seed's
    # Bad data on one rank, met before fit()'s first collective: that rank raises its own
    # error, the others a DistributedError naming it; no rank aborts the job or waits.
    bad = [report["bad labels on the last rank"] for report in reports]
    assert bad[-1].startswith("ValueError: cross_entropy labels must lie in 0..2")
    assert bad[:-1] == [f"rank 2 of 3 failed: {bad[-1]}"] * 2


def test_a_rank_that_raises_ends_the_job_with_one_line_naming_it(tmp_path):
    done, reports = run_script(2, "raise", tmp_path / "out")
    assert done.returncode != 0
    assert reports == [None, None]
    lines = [line for line in done.stderr.splitlines() if line.startswith("bpkernels:")]
    assert lines == ["bpkernels: rank 1 of 2 failed: ValueError: callback failed on purpose; "
                     "aborting the MPI job"]


def test_a_killed_rank_ends_the_job(tmp_path):
    done, reports = run_script(2, "kill", tmp_path / "out")
    assert done.returncode != 0
    assert reports == [None, None]


# --------------------------------------------------------------------------- the command line
TRAIN = ["train", "--data", "synthetic", "--layers", "16", "--batch-size", "50", "--dtype",
         "float64", "--backend", "numpy", "--optimizer", "sgd", "--lr", "0.05", "--seed", "1"]


def checkpoint_arrays(path: Path) -> tuple[dict, list[np.ndarray]]:
    meta, arrays = checkpoint.read(path)
    return meta, [arrays[name] for name in sorted(arrays)]


def test_bpk_train_under_mpiexec_prints_once_saves_once_and_resumes(tmp_path, capsys):
    saved, resumed = tmp_path / "mpi.npz", tmp_path / "mpi-resumed.npz"
    done = launch(2, *bpk_command(), *TRAIN, "--epochs", "2", "--save", saved)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("test accuracy:") == 1  # one summary: rank 0's
    assert "MPI ranks: 2 (data-parallel)" in done.stdout
    # One line per epoch, rank 0's (stderr is no terminal: no live bar).
    for epoch in (1, 2):
        shown = [line for line in done.stderr.splitlines() if line.startswith(f"epoch {epoch}/2 ")]
        assert len(shown) == 1 and len(shown[0]) <= 80, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mpi.npz"]  # no stray temp files

    # The same run in one process, then both resumed for one epoch.
    single, single_resumed = tmp_path / "one" / "single.npz", tmp_path / "one" / "resumed.npz"
    single.parent.mkdir()
    assert cli.main(TRAIN + ["--epochs", "2", "--save", str(single), "--quiet"]) == 0
    done = launch(2, *bpk_command(), "train", "--data", "synthetic", "--resume", saved,
                  "--epochs", "1", "--save", resumed, "--no-progress")
    assert done.returncode == 0, done.stderr
    assert cli.main(["train", "--data", "synthetic", "--resume", str(single), "--epochs", "1",
                     "--save", str(single_resumed), "--quiet"]) == 0
    capsys.readouterr()
    for mpi_path, single_path, epochs in ((saved, single, 2), (resumed, single_resumed, 3)):
        meta, arrays = checkpoint_arrays(mpi_path)
        meta_single, arrays_single = checkpoint_arrays(single_path)
        assert meta["epochs_trained"] == epochs
        assert meta["optimizer"] == meta_single["optimizer"]  # config and step count
        assert rel_error(arrays, arrays_single) < RTOL
    assert bpk.load(resumed).epochs_trained == 3


def test_bpk_train_error_under_mpiexec_is_one_line(tmp_path):
    done = launch(2, *bpk_command(), "train", "--data", tmp_path / "missing.csv")
    assert done.returncode == cli.EXIT_USAGE
    # Every rank meets the error; rank 0 alone reports it.
    assert done.stderr.splitlines() == [f"bpk: error: no such file: {tmp_path / 'missing.csv'}"]


def test_bpk_bench_ranks_reports_samples_per_second_and_efficiency(tmp_path):
    _mpiexec(2)
    out = tmp_path / "scaling.json"
    done = subprocess.run(bpk_command() + ["bench", "--quick", "--ranks", "1,2", "--configs",
                                           "S", "--backends", "numpy", "--dtypes", "float64",
                                           "--json", str(out)],
                          capture_output=True, text=True, timeout=HANG_GUARD_S, env=ENV)
    assert done.returncode == 0, done.stderr
    header = next(line for line in done.stdout.splitlines() if line.startswith("name"))
    assert header.split() == ["name", "config", "dtype", "ranks", "s/epoch", "(min-max)",
                              "samples/s", "speedup", "efficiency", "parity"]
    results = json.loads(out.read_text())["results"]
    assert [r["ranks"] for r in results] == [1, 2]
    one, two = results
    assert one["efficiency"] == 1.0 and one["speedup"] == 1.0
    assert two["speedup"] == pytest.approx(two["samples_per_sec"] / one["samples_per_sec"])
    assert two["efficiency"] == pytest.approx(two["speedup"] / 2)
    for r in results:
        assert r["samples_per_sec"] == pytest.approx(97 / r["seconds_per_epoch"])  # S, quick
        assert r["parity_rel_err"] < RTOL  # float64 data-parallel SGD vs the NumPy reference
