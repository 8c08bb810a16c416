"""Peers for the benchmark: the same architecture, initial weights, optimizer, data and batch
order run by PyTorch (CPU, and CUDA when present), by JAX (CPU: a jitted step per batch, and the
whole epoch as one lax.scan; its model is peers_jax.py's) and by scikit-learn's MLPClassifier.

None is a dependency: a peer that is not installed gives a note, not an error.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from . import peers_jax
from .model import NORM_EPS
from .workload import (LEARNING_RATE, SEED, Config, Trajectory, batch_order, initial_weights,
                       parity_workload)

PEERS = ("torch", "jax", "sklearn")
# The note, and the table's "n/a", of a peer whose parity is not compared: with dropout it draws
# its own masks.
DROPOUT_PARITY_NOTE = "parity n/a: dropout masks differ (torch draws its own); timed only"


@dataclass
class PeerEntry:
    """One peer run of the benchmark, timed like a backend by ``bpk bench`` (bench.run).

    ``make_epoch()`` builds the peer's model (on the run's data, from the shared initial
    weights) and gives a function that trains its next epoch and returns the epoch's seconds.
    ``parity(reference)`` replays the 20 parity steps on a model of its own and returns their
    relative error against ``reference`` and a note on how the peer computed ("" if none); an
    error of None, and a note saying why, where the peer's steps cannot match ours (dropout)."""

    name: str
    threads: int | None
    make_epoch: Callable[[], Callable[[], float]]
    parity: Callable[[Trajectory], tuple[float | None, str]]
    extra: dict[str, Any] = field(default_factory=dict)


def peer_entries(peer: str, config: Config, dtype: str, threads: int | None,
                 data: tuple[np.ndarray, np.ndarray]) -> list[PeerEntry]:
    """The entries of ``peer`` on ``data`` (the run's X, y in ``dtype``) at ``threads``:
    torch gives one on the CPU and one on CUDA where present, jax a jitted step and a scan.
    Raises PeerUnavailable where the peer is not installed or cannot run at ``threads``."""
    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}; valid peers: {', '.join(PEERS)}")
    if peer == "torch":
        return _torch_entries(config, dtype, threads, data)
    if peer == "jax":
        return _jax_entries(config, dtype, threads, data)
    if dtype == "bf16":
        raise PeerUnavailable("sklearn skipped in bf16: MLPClassifier computes in float32 or "
                              "float64 only")
    return [_sklearn_entry(config, dtype, threads, data)]


class PeerUnavailable(ImportError):
    """A peer that cannot run here (not installed) or cannot build the config's layers; the
    benchmark notes it and goes on. ``count_only``: it cannot run at this thread count only,
    and is tried again at the run's other counts."""

    def __init__(self, message: str, count_only: bool = False):
        super().__init__(message)
        self.count_only = count_only


# --------------------------------------------------------------------------- torch
def _torch_entries(config: Config, dtype: str, threads: int | None,
                   data: tuple[np.ndarray, np.ndarray]) -> list[PeerEntry]:
    try:
        import torch
    except ImportError:
        raise PeerUnavailable("torch skipped: PyTorch is not installed (pip install torch)") from None
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [PeerEntry("torch" if device == "cpu" else "torch-cuda",
                      threads if device == "cpu" else None,
                      _torch_make_epoch(torch, device, config, dtype, threads, data),
                      _torch_parity(torch, device, config, dtype, threads),
                      {"torch": torch.__version__}) for device in devices]


@contextlib.contextmanager
def _torch_threads(torch, threads: int | None) -> Iterator[None]:
    """torch keeps a thread pool of its own, which limit_threads does not reach; entries of
    other counts take turns with this one, so the count is set for each epoch and given back."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _torch_model(torch, config: Config, dtype: str, device: str):
    """Linear -> [LayerNorm] -> ReLU -> [Dropout] per hidden layer, as MLP builds it with the
    config's norm and dropout, from the shared initial weights (gamma 1, beta 0)."""
    layers: list[Any] = []
    # bf16: float32 master weights, as autocast's users keep them (autocast is _torch_trainer's)
    torch_dtype = getattr(torch, "float32" if dtype == "bf16" else dtype)
    hidden = len(config.sizes) - 2
    for layer, (W, b, *affine) in enumerate(initial_weights(config)):
        # Created in the run's dtype, so float64 weights are never rounded through float32.
        linear = torch.nn.Linear(*W.shape, dtype=torch_dtype, device=device)
        _copy(torch, [linear.weight, linear.bias], [W.T, b])
        layers.append(linear)
        if layer < hidden:
            if config.norm is not None:
                norm = torch.nn.LayerNorm(W.shape[1], eps=NORM_EPS, dtype=torch_dtype,
                                          device=device)
                _copy(torch, [norm.weight, norm.bias], affine)
                layers.append(norm)
            layers.append(torch.nn.ReLU())
            if config.dropout > 0:
                layers.append(torch.nn.Dropout(config.dropout))
    return torch.nn.Sequential(*layers)


def _copy(torch, params, arrays) -> None:
    with torch.no_grad():
        for param, array in zip(params, arrays):
            param.copy_(torch.from_numpy(np.ascontiguousarray(array)))


def _torch_trainer(torch, model, X, y, config: Config, device: str,
                   dtype: str) -> Callable[[], tuple[float, float]]:
    """Trains like ``fit``, one epoch a call: same batches, SGD, mean cross-entropy; the epoch
    loss is kept on the device and read once per epoch, as bpkernels does. Each call returns
    (seconds, loss) of its epoch. bf16: the forward pass and loss under
    ``torch.autocast(dtype=torch.bfloat16)``, backward and step outside it, as its docs show."""
    if dtype == "bf16":
        autocast = functools.partial(torch.autocast, device_type=device, dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext
    opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    loss_fn = torch.nn.CrossEntropyLoss()
    n = X.shape[0]
    epochs = itertools.count()

    def epoch() -> tuple[float, float]:
        order = torch.from_numpy(batch_order(n, next(epochs))).to(device)
        start = time.perf_counter()
        total = torch.zeros((), dtype=torch.float64, device=device)
        for s in range(0, n, config.batch):
            rows = order[s:s + config.batch]
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = loss_fn(model(X[rows]), y[rows])
            loss.backward()
            opt.step()
            total += loss.detach() * rows.shape[0]
        epoch_loss = float(total) / n  # synchronises, like reading a bpkernels epoch loss
        return time.perf_counter() - start, epoch_loss

    return epoch


def _torch_make_epoch(torch, device: str, config: Config, dtype: str, threads: int | None,
                      data: tuple[np.ndarray, np.ndarray]) -> Callable[[], Callable[[], float]]:
    def make_epoch() -> Callable[[], float]:
        X, y = (torch.from_numpy(a).to(device) for a in data)
        train = _torch_trainer(torch, _torch_model(torch, config, dtype, device), X, y, config,
                               device, dtype)

        def epoch() -> float:
            with _torch_threads(torch, threads):
                return train()[0]

        return epoch

    return make_epoch


def _torch_parity(torch, device: str, config: Config, dtype: str,
                  threads: int | None) -> Callable[[Trajectory], tuple[float | None, str]]:
    def parity(reference: Trajectory) -> tuple[float | None, str]:
        if config.dropout > 0:
            # nn.Dropout draws from torch's generator, not our Philox masks: its trajectory
            # leaves ours at the first step, so an error against the reference would only
            # measure the masks. Timed, but not compared.
            return None, DROPOUT_PARITY_NOTE
        Xp, yp, epochs = parity_workload(config)
        storage = "float32" if dtype == "bf16" else dtype
        model = _torch_model(torch, config, dtype, device)
        train = _torch_trainer(torch, model, torch.from_numpy(Xp.astype(storage)).to(device),
                               torch.from_numpy(yp).to(device), config, device, dtype)
        with _torch_threads(torch, threads):
            losses = [train()[1] for _ in range(epochs)]
        weights = []  # in get_weights' order: W, b, then gamma, beta of a normalized layer
        for module in model:
            if isinstance(module, torch.nn.Linear):
                weights += [module.weight.detach().cpu().numpy().T,
                            module.bias.detach().cpu().numpy()]
            elif isinstance(module, torch.nn.LayerNorm):
                weights += [module.weight.detach().cpu().numpy(),
                            module.bias.detach().cpu().numpy()]
        return Trajectory(losses, weights).error_against(reference), ""

    return parity


# --------------------------------------------------------------------------- JAX
def _jax_entries(config: Config, dtype: str, threads: int | None,
                 data: tuple[np.ndarray, np.ndarray]) -> list[PeerEntry]:
    try:
        import jax
    except ImportError:
        raise PeerUnavailable("jax skipped: JAX is not installed (pip install jax)") from None
    # XLA's CPU pool is sized once, at start, and XLA_FLAGS' thread options did not shrink
    # it (jax 0.10): entries at another count would be mislabelled, so they are not made.
    pool = peers_jax.xla_threads()
    if threads is not None and threads != pool:
        raise PeerUnavailable(f"jax skipped at {threads} thread(s): XLA's CPU pool is fixed "
                              f"when JAX starts ({pool} threads here)", count_only=True)
    return [PeerEntry(name, pool, peers_jax.make_epoch(jax, config, dtype, data, scan),
                      peers_jax.parity(jax, config, dtype, scan), peers_jax.version(jax))
            for name, scan in peers_jax.ENTRIES.items()]


# --------------------------------------------------------------------------- scikit-learn
def _sklearn_entry(config: Config, dtype: str, threads: int | None,
                   data: tuple[np.ndarray, np.ndarray]) -> PeerEntry:
    try:
        from sklearn.neural_network import MLPClassifier
    except ImportError:
        raise PeerUnavailable('sklearn skipped: scikit-learn is not installed '
                              '(pip install "bpkernels[sklearn]")') from None
    if config.norm is not None or config.dropout > 0:
        raise PeerUnavailable(f"sklearn skipped on {config.name}: MLPClassifier has no "
                              "LayerNorm or dropout")
    X, y = data

    def make_epoch() -> Callable[[], float]:
        train = _sklearn_trainer(_sklearn_model(MLPClassifier, config, X, y), X, y)
        return lambda: train()[0]

    def parity(reference: Trajectory) -> tuple[float, str]:
        Xp, yp, epochs = parity_workload(config)
        Xp = Xp.astype(dtype)
        clf = _sklearn_model(MLPClassifier, config, Xp, yp)
        train = _sklearn_trainer(clf, Xp, yp)
        losses = [train()[1] for _ in range(epochs)]
        weights = [a for W, b in zip(clf.coefs_, clf.intercepts_) for a in (W, b)]
        note = "scikit-learn computed in float64" \
            if np.dtype(dtype) != np.float64 and clf.coefs_[0].dtype == np.float64 else ""
        return Trajectory(losses, weights).error_against(reference), note

    return PeerEntry("sklearn", threads, make_epoch, parity)


def _sklearn_model(MLPClassifier, config: Config, X: np.ndarray, y: np.ndarray):
    """SGD with no momentum, no L2 and a constant rate is plain SGD, as in the other runs;
    shuffle=False, as the trainer feeds pre-shuffled rows."""
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
    return clf


def _sklearn_trainer(clf, X: np.ndarray, y: np.ndarray) -> Callable[[], tuple[float, float]]:
    """partial_fit over the epoch's pre-shuffled rows: the same batches as fit, one epoch a
    call; each call returns (seconds, loss) of its epoch."""
    n = X.shape[0]
    epochs = itertools.count()

    def epoch() -> tuple[float, float]:
        order = batch_order(n, next(epochs))
        Xe, ye = X[order], y[order]
        start = time.perf_counter()
        clf.partial_fit(Xe, ye)
        seconds = time.perf_counter() - start
        return seconds, float(clf.loss_)

    return epoch
