"""Run by tests/test_mpi.py under mpiexec: ``python tests/mpi_fit.py TASK OUT_DIR``.

Every rank builds the same data and model from fixed seeds (``case_data``, ``build``, shared
with the single-process reference in the test) and trains with ``comm=MPI.COMM_WORLD``. Each
rank writes what it ended with to ``OUT_DIR/rank<r>.json`` (weights as lists, history, the
errors it raised), so the test can check every rank, not only rank 0.

Tasks: ``parity`` (the CASES below), ``launch-errors`` (bad launches, each expected to raise
DistributedError on every rank), ``raise`` and ``kill`` (rank 1 fails after the first epoch).
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np

import bpkernels as bpk
from bpkernels.distributed import DistributedError

# name -> (backend, optimizer, loss, sizes, activation, samples, batch, epochs); samples and
# batch leave a short last batch, which under 3 ranks gives a rank no rows.
CASES = {
    "numpy-sgd-ce": ("numpy", ("sgd", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
                     "cross_entropy", [6, 8, 3], "relu", 50, 16, 3),
    "numpy-adam-mse": ("numpy", ("adam", {"lr": 1e-2, "weight_decay": 1e-3}), "mse",
                       [5, 7, 2], "tanh", 45, 8, 3),
    "numba-adam-ce": ("numba", ("adam", {"lr": 1e-2}), "cross_entropy", [6, 8, 3], "relu",
                      50, 16, 3),
    "numba-sgd-mse": ("numba", ("sgd", {"lr": 0.05}), "mse", [5, 7, 2], "tanh", 45, 8, 3),
    # One target of row 37 is 1e200: its squared error overflows to inf while its gradient
    # stays finite, so only the rank whose shard holds the row sees a bad loss.
    "numpy-diverges": ("numpy", ("sgd", {"lr": 0.01}), "mse", [4, 5, 2], "tanh", 40, 8, 3),
}


def case_data(name: str) -> tuple[np.ndarray, np.ndarray]:
    _, _, loss, sizes, _, samples, _, _ = CASES[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    X = rng.standard_normal((samples, sizes[0]))
    if loss == "cross_entropy":
        return X, rng.integers(0, sizes[-1], samples)
    Y = rng.standard_normal((samples, sizes[-1]))
    if name == "numpy-diverges":
        Y[37, 1] = 1e200
    return X, Y


def build(name: str, backend: str | None = None):
    """(model, fit keyword arguments) of a case; ``backend`` overrides the case's."""
    case_backend, (opt, hp), loss, sizes, activation, _, batch, epochs = CASES[name]
    model = bpk.MLP(sizes, activation=activation, backend=backend or case_backend,
                    dtype="float64", seed=7)
    return model, {"loss": loss, "optimizer": bpk.optim.make_optimizer(opt, **hp),
                   "epochs": epochs, "batch_size": batch, "seed": 3}


def train(name: str, comm=None) -> dict:
    """Train a case; the weights, history and divergence (epoch, step) it ended with."""
    model, kwargs = build(name)
    X, y = case_data(name)
    outcome: dict = {"diverged": None, "history": None}
    try:
        history = bpk.fit(model, X, y, comm=comm, **kwargs)
        outcome["history"] = {k: history[k] for k in ("loss", "accuracy") if k in history.epochs[0]}
    except bpk.TrainingDiverged as err:
        outcome["diverged"] = [err.epoch, err.step, err.global_step]
    outcome["weights"] = [a.tolist() for W, b in model.get_weights() for a in (W, b)]
    return outcome


def launch_errors(comm) -> dict:
    """Bad launches; each must raise DistributedError on every rank (and leave it usable)."""
    rank, X, y = comm.Get_rank(), *case_data("numpy-sgd-ce")
    attempts = {
        "batch_size differs": lambda: _fit(comm, X, y, batch_size=16 if rank == 0 else 8),
        "seed differs": lambda: _fit(comm, X, y, model_seed=rank),
        "data differs": lambda: _fit(comm, X + (rank == comm.Get_size() - 1), y),
        "too many ranks": lambda: _fit(comm, X[:comm.Get_size() - 1], y[:comm.Get_size() - 1]),
        "batch below ranks": lambda: _fit(comm, X, y, batch_size=comm.Get_size() - 1),
    }
    messages = {}
    for what, attempt in attempts.items():
        try:
            attempt()
            messages[what] = None
        except DistributedError as err:
            messages[what] = str(err)
    return messages


def _fit(comm, X, y, batch_size: int = 16, model_seed: int = 7) -> None:
    model = bpk.MLP([6, 8, 3], backend="numpy", dtype="float64", seed=model_seed)
    bpk.fit(model, X, y, optimizer="sgd", epochs=1, batch_size=batch_size, comm=comm)


def fail_on_rank_1(comm, how: str) -> None:
    def callback(epoch: int, record: dict) -> None:
        if comm.Get_rank() == 1:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise ValueError("callback failed on purpose")
    model, kwargs = build("numpy-sgd-ce")
    X, y = case_data("numpy-sgd-ce")
    bpk.fit(model, X, y, comm=comm, callbacks=[callback], **dict(kwargs, epochs=50))


def main(task: str, out: Path) -> None:
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    if task == "parity":
        result = {name: train(name, comm) for name in CASES}
    elif task == "launch-errors":
        result = launch_errors(comm)
    else:
        fail_on_rank_1(comm, task)
        result = {"finished": True}  # must never be reached on any rank
    (out / f"rank{comm.Get_rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
