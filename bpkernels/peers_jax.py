"""The JAX peer's network and trainers (peers.py makes its benchmark entries): the config's
layers as pure functions of a parameter pytree, one SGD step differentiated by ``jax.grad``,
and two ways to drive it: one jitted step per batch called from Python (``jax``), and the whole
epoch as one ``lax.scan`` (``jax-scan``).

JAX is imported by the caller and passed in, so this module imports without it.
"""
from __future__ import annotations

import functools
import itertools
import os
import time
from typing import Any, Callable

import numpy as np

from .model import NORM_EPS
from .workload import (LEARNING_RATE, SEED, Config, Trajectory, batch_order, initial_weights,
                       parity_workload)

# How each entry drives the step: entry name -> whether the epoch is one lax.scan.
ENTRIES = {"jax": False, "jax-scan": True}
DROPOUT_PARITY_NOTE = "parity n/a: dropout masks differ (jax draws its own); timed only"


def xla_threads() -> int:
    """The threads XLA's CPU client computes on: it sizes its pool once, when JAX starts, to
    the CPUs the process may run on, and no call changes it afterwards."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def x64(jax, dtype: str):
    """float64 needs jax_enable_x64, which is part of the jit cache key: set per call as a
    context, so float32 runs of the same process keep JAX's defaults (int32 indices)."""
    on = dtype == "float64"
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(on)
    from jax import experimental  # before jax 0.5 the context lived here
    return experimental.enable_x64() if on else experimental.disable_x64()


def storage(dtype: str) -> str:
    """bf16 as torch.autocast: float32 master weights; only the products' inputs are bf16."""
    return "float32" if dtype == "bf16" else dtype


def initial_params(jax, config: Config, dtype: str) -> list[tuple[Any, ...]]:
    """The shared initial weights, (W, b[, gamma, beta]) per layer, W as (in, out), cast from
    float64 straight to the storage dtype on the host."""
    return [tuple(jax.numpy.asarray(np.asarray(a, storage(dtype))) for a in layer)
            for layer in initial_weights(config)]


def _forward(jax, params, X, config: Config, dtype: str, key):
    """Linear -> [LayerNorm] -> ReLU -> [Dropout] per hidden layer, a linear output layer."""
    jnp = jax.numpy
    if dtype == "bf16":
        # bf16 products accumulated in float32, as autocast's matmuls on CPU
        dot = functools.partial(_bf16_dot, jax)
    else:
        dot = jnp.matmul
    A = X
    for layer, (W, b, *affine) in enumerate(params):
        Z = dot(A, W) + b
        if layer == len(params) - 1:
            return Z
        if affine:
            mu = Z.mean(axis=1, keepdims=True)
            var = ((Z - mu) ** 2).mean(axis=1, keepdims=True)
            Z = (Z - mu) * jax.lax.rsqrt(var + NORM_EPS) * affine[0] + affine[1]
        A = jnp.maximum(Z, 0)
        if config.dropout > 0:
            keep = jax.random.bernoulli(jax.random.fold_in(key, layer), 1 - config.dropout,
                                        A.shape)
            A = jnp.where(keep, A / (1 - config.dropout), 0)
    return A


def _bf16_dot(jax, A, W):
    bf16 = jax.numpy.bfloat16
    return jax.lax.dot(A.astype(bf16), W.astype(bf16), preferred_element_type=jax.numpy.float32)


def sgd_step(jax, config: Config, dtype: str) -> Callable:
    """``step(params, X, y, step_number) -> (params, mean loss)``: mean cross-entropy, plain
    SGD. The dropout key is the seed folded with the step number, so both drivers draw the
    same masks at the same step."""
    jnp = jax.numpy
    base_key = jax.random.key(SEED)

    def loss_fn(params, X, y, key):
        logits = _forward(jax, params, X, config, dtype, key)
        picked = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
        return jnp.mean(jax.nn.logsumexp(logits, axis=1) - picked)

    def step(params, X, y, number):
        key = jax.random.fold_in(base_key, number)
        loss, grads = jax.value_and_grad(loss_fn)(params, X, y, key)
        return jax.tree_util.tree_map(lambda p, g: p - LEARNING_RATE * g, params, grads), loss

    return step


def _step_driver(jax, config: Config, dtype: str, n: int) -> Callable:
    """``epoch(params, X, y, order, first_step) -> (params, loss sum)``: one jitted call per
    batch from Python. The batch's rows are sliced from the epoch's order and gathered inside
    the call, so no batch is copied on the host."""
    step = sgd_step(jax, config, dtype)

    @functools.partial(jax.jit, static_argnames="rows", donate_argnums=(0, 1))
    def batch(params, total, X, y, order, start, number, rows):
        idx = jax.lax.dynamic_slice_in_dim(order, start, rows)
        params, loss = step(params, X[idx], y[idx], number)
        return params, total + loss * rows

    def epoch(params, X, y, order, first_step):
        total = jax.numpy.zeros((), storage(dtype))
        for number, start in enumerate(range(0, n, config.batch), first_step):
            params, total = batch(params, total, X, y, order, start, number,
                                  rows=min(config.batch, n - start))
        return params, total

    return epoch


def _scan_driver(jax, config: Config, dtype: str, n: int) -> Callable:
    """The same signature, the whole epoch one compiled call: a lax.scan over the full
    batches, then the short last batch (if any) inside the same call."""
    step = sgd_step(jax, config, dtype)
    full, tail = divmod(n, config.batch)

    @functools.partial(jax.jit, donate_argnums=0)
    def epoch(params, X, y, order, first_step):
        def body(params, batch):
            idx, number = batch
            return step(params, X[idx], y[idx], number)

        numbers = first_step + jax.numpy.arange(full + 1)
        params, losses = jax.lax.scan(
            body, params, (order[:full * config.batch].reshape(full, config.batch),
                           numbers[:full]))
        total = losses.sum() * config.batch
        if tail:
            idx = order[full * config.batch:]
            params, loss = step(params, X[idx], y[idx], numbers[full])
            total = total + loss * tail
        return params, total

    return epoch


def trainer(jax, config: Config, dtype: str, X: np.ndarray, y: np.ndarray,
            scan: bool) -> tuple[Callable[[], tuple[float, float]], Callable[[], list]]:
    """Trains like ``fit``, one epoch a call: the same batches (``batch_order``), SGD, mean
    cross-entropy. Returns ``epoch() -> (seconds, loss)``, whose seconds end when the new
    weights and the epoch's loss are computed (block_until_ready: JAX dispatches
    asynchronously), and ``weights()``, the current weights in get_weights order."""
    n = X.shape[0]
    with x64(jax, dtype):
        state = {"params": initial_params(jax, config, dtype)}
        Xd, yd = jax.numpy.asarray(X.astype(storage(dtype))), jax.numpy.asarray(y)
        driver = (_scan_driver if scan else _step_driver)(jax, config, dtype, n)
    epochs = itertools.count()
    steps = -(-n // config.batch)

    def epoch() -> tuple[float, float]:
        e = next(epochs)
        with x64(jax, dtype):
            order = jax.numpy.asarray(batch_order(n, e))  # outside the timing, as torch's
            start = time.perf_counter()
            params, total = driver(state["params"], Xd, yd, order, e * steps)
            jax.block_until_ready((params, total))
            seconds = time.perf_counter() - start
        state["params"] = params
        return seconds, float(total) / n

    def weights() -> list:
        return [np.asarray(a) for layer in state["params"] for a in layer]

    return epoch, weights


def make_epoch(jax, config: Config, dtype: str, data: tuple[np.ndarray, np.ndarray],
               scan: bool) -> Callable[[], Callable[[], float]]:
    def build() -> Callable[[], float]:
        train, _ = trainer(jax, config, dtype, *data, scan)
        return lambda: train()[0]

    return build


def parity(jax, config: Config, dtype: str,
           scan: bool) -> Callable[[Trajectory], tuple[float | None, str]]:
    def compare(reference: Trajectory) -> tuple[float | None, str]:
        if config.dropout > 0:
            return None, DROPOUT_PARITY_NOTE
        Xp, yp, epochs = parity_workload(config)
        train, weights = trainer(jax, config, dtype, Xp, yp, scan)
        losses = [train()[1] for _ in range(epochs)]
        return Trajectory(losses, weights()).error_against(reference), ""

    return compare


def version(jax) -> dict[str, str]:
    return {"jax": jax.__version__}

