"""The GEMM floor of ``bpk bench``: an epoch of a config's matrix products alone, by the library
each dtype's products use (NumPy's BLAS; MKL's bf16 GEMM for bf16), into preallocated buffers.
No training epoch can be faster; the ratio of an epoch to it shows what the rest costs."""
from __future__ import annotations

from typing import Callable

import numpy as np

from .backends import BackendUnavailable, get_backend
from .model import resolve_dtype
from .workload import SEED, Config


def floor_unavailable(dtype: str) -> str | None:
    """Why the floor of ``dtype`` cannot be timed here (bf16 without MKL's bf16 GEMM), or None."""
    if resolve_dtype(dtype) != "bf16":
        return None
    try:
        why = get_backend("numba").bf16_unavailable()
    except BackendUnavailable as err:
        why = str(err)
    return None if why is None else f"gemm-floor skipped in bf16: {why}"


def gemm_floor_epoch(config: Config, dtype: str) -> Callable[[], None]:
    """An epoch of the config's matrix products alone (forward, dW, dX for every step, the
    last partial batch included), into preallocated buffers, by NumPy's BLAS: no training
    epoch can be faster. The same products with LayerNorm and dropout (M+reg as M): their
    elementwise work is what the ratio to the floor then shows."""
    if resolve_dtype(dtype) == "bf16":
        return _bf16_floor_epoch(config)
    dt = resolve_dtype(dtype)
    rng = np.random.default_rng(SEED)
    layers = list(zip(config.sizes[:-1], config.sizes[1:]))
    Ws = [(rng.standard_normal((i, o)) * 0.05).astype(dt) for i, o in layers]
    plans = {}
    for rows in set(config.batch_rows()):
        acts = [rng.standard_normal((rows, w)).astype(dt) for w in config.sizes]
        grads = [np.empty((rows, w), dt) for w in config.sizes]
        grads[-1][...] = acts[-1]
        plans[rows] = (acts, grads, [np.empty_like(W) for W in Ws])
    schedule = [plans[rows] for rows in config.batch_rows()]

    def epoch() -> None:
        for acts, grads, dWs in schedule:
            for layer, W in enumerate(Ws):
                np.matmul(acts[layer], W, out=acts[layer + 1])
            for layer in reversed(range(len(Ws))):
                np.matmul(acts[layer].T, grads[layer + 1], out=dWs[layer])
                if layer:
                    np.matmul(grads[layer + 1], Ws[layer].T, out=grads[layer])

    return epoch


def _bf16_floor_epoch(config: Config) -> Callable[[], None]:
    """gemm_floor_epoch in bf16: the same products, on bfloat16 inputs rounded ahead, by MKL
    (the library the Numba backend's bf16 calls), one compiled call a step. Raises
    FloorUnavailable where MKL's bf16 GEMM cannot run here."""
    why = floor_unavailable("bf16")
    if why is not None:
        raise FloorUnavailable(why)
    from .backends.numba.mixed import products
    from .backends.bf16 import to_bf16_bits
    rng = np.random.default_rng(SEED)
    layers = list(zip(config.sizes[:-1], config.sizes[1:]))
    Ws = tuple(to_bf16_bits(rng.standard_normal((i, o)) * 0.05) for i, o in layers)
    dWs = tuple(np.empty((i, o), np.float32) for i, o in layers)
    plans = {}
    for rows in set(config.batch_rows()):
        bits = tuple(to_bf16_bits(rng.standard_normal((rows, w))) for w in config.sizes)
        out = tuple(np.empty((rows, w), np.float32) for w in config.sizes)
        plans[rows] = (bits, out, bits, tuple(np.empty_like(o) for o in out))
    schedule = [plans[rows] for rows in config.batch_rows()]

    def epoch() -> None:
        for acts, outs, grads, gouts in schedule:
            products(acts, outs, grads, gouts, Ws, dWs)

    return epoch


class FloorUnavailable(RuntimeError):
    """The GEMM floor of a dtype that cannot be timed here (bf16 without MKL): noted, skipped."""
