"""The benchmark's workload, one definition for ``bpk bench`` (bench.py), its peers (peers.py)
and the pytest-benchmark suites in ``benchmarks/``: configs, synthetic data, initial weights,
batch order, and the trajectory that parity compares.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from . import memory
from .backends import host
from .lr_scheduler import CosineAnnealingLR
from .backends.base import storage_dtype
from .model import MLP, resolve_dtype
from .optim import SGD
from .train import fit

LEARNING_RATE = 0.01
PARITY_STEPS = 20  # steps compared with the float64 NumPy reference (5 epochs of 4 batches)
SEED = 0
# The ways ``bpk bench --training`` trains, all from SGD(lr=LEARNING_RATE): plain SGD, the
# benchmark's own workload, and variants timed beside it (``training_options``).
TRAININGS = ("sgd", "cosine-clip")
SCHEDULE_EPOCHS = 20  # cosine-clip's T_max: the steps of this many epochs
CLIP_NORM = 1.0


@dataclass(frozen=True)
class Config:
    """One benchmark workload: ReLU MLP of ``sizes``, softmax-CE, plain SGD, synthetic data;
    with ``norm`` and ``dropout``, each hidden layer is Linear -> LayerNorm -> ReLU -> Dropout
    (MLP's ``norm=`` and ``dropout=``)."""

    name: str
    sizes: tuple[int, ...]
    batch: int
    samples: int
    dropout: float = 0.0
    norm: str | None = None

    def model(self, backend: str = "numpy", dtype: str = "float32") -> MLP:
        """The config's MLP from the shared seed: every backend and parity run builds this one."""
        return MLP(self.sizes, backend=backend, dtype=dtype, seed=SEED, dropout=self.dropout,
                   norm=self.norm)

    @property
    def steps(self) -> int:
        return -(-self.samples // self.batch)

    def batch_rows(self) -> list[int]:
        rows = [self.batch] * (self.samples // self.batch)
        if self.samples % self.batch:
            rows.append(self.samples % self.batch)
        return rows

    def flops_per_epoch(self) -> float:
        """Multiply-adds x 2 of the GEMMs: forward, dW and dX (none for the first layer).
        LayerNorm and dropout are not counted: GFLOP/s stays the products' rate, comparable
        with the same layers' without them."""
        per_row = sum(2 * i * o * (3 if layer else 2)
                      for layer, (i, o) in enumerate(zip(self.sizes[:-1], self.sizes[1:])))
        return float(per_row) * self.samples

    def quick(self) -> "Config":
        """The same layers on a few batches: for smoke tests, not for numbers."""
        return replace(self, samples=min(self.samples, 3 * self.batch + 1))


# What ``+reg`` adds to a config: the layers real MLPs add, as MLP's norm= and dropout= take them.
REGULARIZED = {"dropout": 0.1, "norm": "layer"}
CONFIGS = {
    "S": Config("S", (64, 64, 10), 32, 16384),
    "M": Config("M", (784, 256, 128, 10), 128, 60000),
    "L": Config("L", (1024, 2048, 2048, 10), 512, 16384),
    "M+reg": Config("M+reg", (784, 256, 128, 10), 128, 60000, **REGULARIZED),
}


def parse_config(spec: str) -> Config:
    """"S", "M", "L", "M+reg", a custom ``layers:batch:samples`` like ``784-256-10:128:60000``,
    or S, L or a custom one followed by ``+reg`` (LayerNorm and dropout 0.1 on each hidden
    layer, named as given)."""
    if spec in CONFIGS:
        return CONFIGS[spec]
    # Only a trailing "+reg" is a suffix: int() takes "+128", so "784-10:+128:600" is a
    # custom config as it always was.
    base, regularized = (spec[:-4], True) if spec.endswith("+reg") else (spec, False)
    if base in CONFIGS:
        config = CONFIGS[base]
    else:
        try:
            layers, batch, samples = base.split(":")
            sizes = tuple(int(s) for s in layers.split("-"))
            config = Config(spec, sizes, int(batch), int(samples))
        except ValueError:
            raise ValueError(f"unknown config {spec!r}; valid: {', '.join(CONFIGS)}, or "
                             "layers:batch:samples like 784-256-10:128:60000; either with +reg "
                             "for LayerNorm and dropout 0.1, like S+reg") from None
        if len(sizes) < 2 or min(sizes) < 1 or config.batch < 1 or config.samples < 1:
            raise ValueError(f"config {spec!r} needs at least two positive layer widths and a "
                             "positive batch and sample count")
    if regularized and (config.norm is not None or config.dropout):
        raise ValueError(f"config {spec!r}: {base} already has LayerNorm and dropout")
    return replace(config, name=spec, **REGULARIZED) if regularized else config


def check_memory(config: Config, dtype: str = "float32", models: int = 1) -> None:
    """InsufficientMemory, before anything is drawn, when the config's data and ``models``
    models at once (the backends and peers of a run keep theirs while they take turns) cannot
    fit in the host's memory."""
    itemsize = resolve_dtype(dtype).itemsize
    widths, n_params = config.sizes[1:], memory.n_parameters(config.sizes, config.norm)
    # LayerNorm's xhat and dropout's output: one more hidden-width buffer each
    extra = (config.norm is not None) + (config.dropout > 0)
    memory.check(f"benchmark config {config.name} in {resolve_dtype(dtype).name}", {
        # drawn in float64, then cast; labels int64
        f"synthetic data of {config.samples} x {config.sizes[0]}":
            config.samples * (config.sizes[0] * (8 + itemsize) + 8),
        f"{models} model(s) with gradients and initial weights":
            models * n_params * (16 + 2 * itemsize),
        "workspaces": models * config.batch * (config.sizes[0] + 3 * sum(widths) +
                                               extra * sum(widths[:-1])) * itemsize,
    }, host.memory_available())


def workload(config: Config, dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """Synthetic inputs and labels, the same for every backend and peer."""
    check_memory(config, dtype)
    rng = np.random.default_rng(SEED)
    X = rng.standard_normal((config.samples, config.sizes[0])).astype(storage_dtype(resolve_dtype(dtype)))
    y = rng.integers(0, config.sizes[-1], config.samples)
    return X, y


def batch_order(n: int, epoch: int, seed: int = SEED) -> np.ndarray:
    """The row order ``fit`` uses for ``epoch``; peers replay it to see the same batches."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def initial_weights(config: Config) -> list[tuple[np.ndarray, ...]]:
    """(W, b) per layer, (W, b, gamma, beta) for a layer with LayerNorm, in float64."""
    return config.model(dtype="float64").get_weights()


def relative_error(values: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """Largest |a - b| / max|b| over paired arrays: one number for a whole trajectory or model."""
    worst = 0.0
    for a, b in zip(values, reference):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = max(float(np.max(np.abs(b))), np.finfo(np.float64).tiny)
        worst = max(worst, float(np.max(np.abs(a - b))) / scale)
    return worst


@dataclass
class Trajectory:
    """What parity compares: per-epoch losses and the final weights after PARITY_STEPS steps."""

    losses: list[float]
    weights: list[np.ndarray]

    def error_against(self, reference: "Trajectory") -> float:
        # The weights are judged as one parameter vector: biases start at zero and stay tiny
        # sums of cancelling gradients, so scaling each by its own max|b| would measure noise.
        flat = [np.concatenate([np.ravel(w) for w in t.weights]) for t in (self, reference)]
        return max(relative_error([np.array(self.losses)], [np.array(reference.losses)]),
                   relative_error(flat[:1], flat[1:]))


def parity_workload(config: Config) -> tuple[np.ndarray, np.ndarray, int]:
    """Four batches of the config's data, trained for five epochs: 20 comparable steps."""
    X, y = workload(replace(config, samples=4 * config.batch), "float64")
    return X, y, PARITY_STEPS // 4


def check_training(training: str) -> str:
    if training not in TRAININGS:
        raise ValueError(f"unknown training {training!r}; valid: {', '.join(TRAININGS)}")
    return training


def training_options(training: str, steps: int) -> dict[str, Any]:
    """fit's keyword arguments for ``training`` beside SGD(lr=LEARNING_RATE), on data of
    ``steps`` steps per epoch: none for "sgd"; for "cosine-clip", a fresh CosineAnnealingLR
    over SCHEDULE_EPOCHS epochs of steps, stepped per optimizer step, and clip_grad_norm."""
    if check_training(training) == "sgd":
        return {}
    return {"lr_scheduler": CosineAnnealingLR(T_max=SCHEDULE_EPOCHS * steps),
            "lr_scheduler_interval": "step", "clip_grad_norm": CLIP_NORM}


def backend_trajectory(backend: str, config: Config, dtype: str, comm: Any = None,
                       training: str = "sgd") -> Trajectory:
    X, y, epochs = parity_workload(config)
    # With dropout the reference draws the same masks: they depend on the model's seed, the
    # step, the layer, the data-set row and the unit only (docs/dropout.md).
    model = config.model(backend, dtype)
    history = fit(model, X, y, optimizer=SGD(lr=LEARNING_RATE), epochs=epochs,
                  batch_size=config.batch, seed=SEED, comm=comm,
                  **training_options(training, -(-len(X) // config.batch)))
    return Trajectory(history["loss"], [a for layer in model.get_weights() for a in layer])
