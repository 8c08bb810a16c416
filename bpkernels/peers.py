"""Peers for the benchmark: the same architecture, initial weights, optimizer, data and batch
order run by PyTorch (CPU, and CUDA when present) and by scikit-learn's MLPClassifier.

Neither is a dependency: a peer that is not installed gives a note, not an error.
"""
from __future__ import annotations

import time
import warnings
from typing import Any, Callable

import numpy as np

from .bench import (LEARNING_RATE, SEED, Config, Result, Trajectory, batch_order,
                    initial_weights, parity_workload, workload)

PEERS = ("torch", "sklearn")


def run_peer(peer: str, config: Config, dtype: str, repeats: int, threads: int | None,
             reference: Trajectory) -> list[Result]:
    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}; valid peers: {', '.join(PEERS)}")
    if peer == "torch":
        return _run_torch(config, dtype, repeats, threads, reference)
    return [_run_sklearn(config, dtype, repeats, threads, reference)]


class PeerUnavailable(ImportError):
    """A peer that cannot run here; the benchmark notes it and goes on."""


# --------------------------------------------------------------------------- torch
def _run_torch(config, dtype, repeats, threads, reference) -> list[Result]:
    try:
        import torch
    except ImportError:
        raise PeerUnavailable("torch skipped: PyTorch is not installed (pip install torch)") from None
    if threads:
        torch.set_num_threads(threads)
    results = [_time_torch(torch, "cpu", config, dtype, repeats, reference)]
    if torch.cuda.is_available():
        results.append(_time_torch(torch, "cuda", config, dtype, repeats, reference))
    return results


def _torch_model(torch, config: Config, dtype: str, device: str):
    layers: list[Any] = []
    torch_dtype = getattr(torch, dtype)
    for layer, (W, b) in enumerate(initial_weights(config)):
        # Created in the run's dtype, so float64 weights are never rounded through float32.
        linear = torch.nn.Linear(*W.shape, dtype=torch_dtype, device=device)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(W.T.copy()))
            linear.bias.copy_(torch.from_numpy(b))
        layers.append(linear)
        if layer < len(config.sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def _torch_epochs(torch, model, X, y, config: Config, epochs: int, device: str,
                  on_epoch: Callable[[float, float], None]) -> None:
    """Train like ``fit``: same batches, SGD, mean cross-entropy; the epoch loss is kept on the
    device and read once per epoch, as bpkernels does."""
    opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    loss_fn = torch.nn.CrossEntropyLoss()
    n = X.shape[0]
    for epoch in range(epochs):
        order = torch.from_numpy(batch_order(n, epoch)).to(device)
        start = time.perf_counter()
        total = torch.zeros((), dtype=torch.float64, device=device)
        for s in range(0, n, config.batch):
            rows = order[s:s + config.batch]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(X[rows]), y[rows])
            loss.backward()
            opt.step()
            total += loss.detach() * rows.shape[0]
        epoch_loss = float(total) / n  # synchronises, like reading a bpkernels epoch loss
        on_epoch(time.perf_counter() - start, epoch_loss)


def _time_torch(torch, device: str, config: Config, dtype: str, repeats: int,
                reference: Trajectory) -> Result:
    name = "torch" if device == "cpu" else "torch-cuda"
    X, y = workload(config, dtype)
    Xt, yt = torch.from_numpy(X).to(device), torch.from_numpy(y).to(device)
    model = _torch_model(torch, config, dtype, device)
    times: list[float] = []
    _torch_epochs(torch, model, Xt, yt, config, 1 + repeats, device,
                  lambda seconds, _: times.append(seconds))
    result = Result.from_times(name, "peer", config, dtype, times[1:],
                               compile_seconds=None, parity_rel_err=None,
                               threads=torch.get_num_threads() if device == "cpu" else None)
    # Parity: the same 20 steps as the backends, compared with the float64 NumPy reference.
    Xp, yp, epochs = parity_workload(config)
    model = _torch_model(torch, config, dtype, device)
    losses: list[float] = []
    _torch_epochs(torch, model, torch.from_numpy(Xp.astype(dtype)).to(device),
                  torch.from_numpy(yp).to(device), config, epochs, device,
                  lambda _, loss: losses.append(loss))
    weights = []
    for module in model:
        if isinstance(module, torch.nn.Linear):
            weights += [module.weight.detach().cpu().numpy().T, module.bias.detach().cpu().numpy()]
    result.parity_rel_err = Trajectory(losses, weights).error_against(reference)
    result.extra["torch"] = torch.__version__
    return result


# --------------------------------------------------------------------------- scikit-learn
def _run_sklearn(config, dtype, repeats, threads, reference) -> Result:
    try:
        from sklearn.neural_network import MLPClassifier
    except ImportError:
        raise PeerUnavailable('sklearn skipped: scikit-learn is not installed '
                              '(pip install "bpkernels[sklearn]")') from None
    X, y = workload(config, dtype)
    times: list[float] = []
    _sklearn_epochs(MLPClassifier, config, X, y, 1 + repeats, lambda s, _: times.append(s))
    result = Result.from_times("sklearn", "peer", config, dtype, times[1:], compile_seconds=None,
                               parity_rel_err=None, threads=threads)
    Xp, yp, epochs = parity_workload(config)
    losses: list[float] = []
    clf = _sklearn_epochs(MLPClassifier, config, Xp.astype(dtype), yp, epochs,
                          lambda _, loss: losses.append(loss))
    weights = [a for W, b in zip(clf.coefs_, clf.intercepts_) for a in (W, b)]
    result.parity_rel_err = Trajectory(losses, weights).error_against(reference)
    if np.dtype(dtype) != np.float64 and clf.coefs_[0].dtype == np.float64:
        result.note = "scikit-learn computed in float64"
    return result


def _sklearn_epochs(MLPClassifier, config: Config, X, y, epochs: int,
                    on_epoch: Callable[[float, float], None]):
    """partial_fit over pre-shuffled rows with shuffle=False: the same batches as fit. SGD with
    no momentum, no L2 and a constant rate is plain SGD, as in the other runs."""
    classes = np.arange(config.sizes[-1])
    clf = MLPClassifier(hidden_layer_sizes=config.sizes[1:-1], activation="relu", solver="sgd",
                        learning_rate="constant", learning_rate_init=LEARNING_RATE,
                        momentum=0.0, nesterovs_momentum=False, alpha=0.0,
                        batch_size=config.batch, shuffle=False, random_state=SEED)
    # One call on a single row builds the network; then our initial weights replace its own.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "batch_size larger than sample size": intended
        clf.partial_fit(X[:1], y[:1], classes=classes)
    weights = initial_weights(config)
    clf.coefs_ = [W.astype(X.dtype) for W, _ in weights]
    clf.intercepts_ = [b.astype(X.dtype) for _, b in weights]
    n = X.shape[0]
    for epoch in range(epochs):
        order = batch_order(n, epoch)
        Xe, ye = X[order], y[order]
        start = time.perf_counter()
        clf.partial_fit(Xe, ye)
        seconds = time.perf_counter() - start
        on_epoch(seconds, float(clf.loss_))
    return clf
