"""The parity kit: per-dtype tolerances, a gradient check by central finite differences, and
agreement of training runs across backends with the float64 NumPy reference.

Our own test suite uses it, and so can any project that embeds bpkernels or adds an activation,
a loss or a backend. Its pytest plugin (``bpkernels._pytest_plugin``, loaded automatically
where bpkernels is installed) adds the fixtures ``bpk_backend``, ``bpk_dtype`` and
``bpk_tolerance``. Nothing here imports pytest: a failure is a plain ``AssertionError`` whose
message says where the numbers part.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .backends import available_backends, backend_names, get_backend
from .model import DTYPES, MLP, NORM_EPS, resolve_dtype
from .optim import OPTIMIZERS, Optimizer, make_optimizer, optimizer_from_config
from .train import TrainingDiverged, fit
from .validation import check_numeric, check_positive_int

__all__ = ["Tolerance", "TOLERANCES", "tolerance", "check_gradients", "assert_backends_agree"]


@dataclass(frozen=True)
class Tolerance:
    """A result passes when ``|actual - expected| <= atol + rtol * scale``."""

    rtol: float
    atol: float


# Kernel results versus the float64 reference evaluated on the *same* inputs (float32 inputs are
# widened exactly), so the only difference is the kernel's own rounding. Inputs in the tests are
# of unit scale, so absolute and relative errors are comparable.
#   float64: eps = 2.2e-16. The longest sums in the tests have 64 terms (dW, db over a batch of
#            64 rows): their rounding is up to ~64 eps ~ 1.4e-14 of the sum of |terms|. 1e-12
#            leaves room for BLAS summation order and the package's own erf (Cody's, ~1e-16),
#            while a wrong formula (a missing factor, a wrong derivative) is off by >= 1e-8.
#            Measured: the NumPy backend passes every test with 10x tighter bounds, not 100x.
#   float32: eps = 1.2e-7. The same sums err by a few 1e-7 of their scale; rtol 1e-5 (~80 ulp)
#            and atol 1e-6 cover that and results that cancel to ~0 (the GELU derivative near its
#            zero at z ~ -0.75, dW entries summing terms of both signs). Measured: 10x tighter
#            fails dW over 64 rows and 5-step momentum trajectories, so the headroom is 3-10x.
#            A GPU backend must not use TF32 matmuls (errors ~1e-3) to pass it.
TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(rtol=1e-12, atol=1e-12),
    "float32": Tolerance(rtol=1e-5, atol=1e-6),
}

# Activations whose derivative jumps at z = 0: a finite difference across the jump measures
# neither side's slope.
_KINKED = ("relu", "leaky_relu")
# A step h in one parameter moves a pre-activation by about h * (size of the layer input); kinks
# closer than this many such moves make the central difference straddle them.
_KINK_SAFETY = 100.0


def tolerance(dtype: Any) -> Tolerance:
    """The tolerance of ``dtype`` ("float32", "float64" or a NumPy dtype)."""
    return TOLERANCES[resolve_dtype(dtype).name]


# =========================================================================== gradients
def check_gradients(model: MLP, X: Any, y: Any, loss: str, h: float = 1e-6,
                    rtol: float = 1e-6, atol: float = 1e-8) -> None:
    """Check ``model.loss_and_grads(X, y, loss)`` against central finite differences of the
    model's own loss, ``(L(p + h) - L(p - h)) / 2h``, one parameter at a time.

    The model must be float64: its analytic gradient is what is checked, and only float64 loss
    values make a difference quotient meaningful (float32 rounding of the loss divided by h would
    swamp it). Every built-in backend supports float64; check a float32 path with
    :func:`assert_backends_agree`. Entry by entry, ``|analytic - numeric| <= atol + rtol *
    |numeric|``: with h = 1e-6 the truncation error is ~h^2 = 1e-12 and the rounding error
    ~eps * loss / h ~ 1e-10 for a loss of order 1, so the defaults catch any wrong factor or
    missing term; scale ``atol`` with the loss when it is far from 1.

    Kinks: where a ReLU-family pre-activation lies within ~100 h (times the scale of the
    layer's input) of 0, the difference straddles the kink and the check is meaningless; that
    raises ValueError naming the layer and entry (draw other inputs or weights).

    Raises AssertionError naming each layer, ``dW`` or ``db``, the worst index, both values and
    the error. The model's weights are restored exactly; its gradient buffer is overwritten.
    """
    if not isinstance(model, MLP):
        raise TypeError(f"model must be a bpkernels.MLP, got {type(model).__name__}")
    if model.dtype != np.float64:
        raise ValueError(f"check_gradients needs a float64 model (finite differences of a "
                         f"{model.dtype.name} loss are rounding noise), got {model.dtype.name}; "
                         "build it with dtype='float64' on the same backend")
    h = _check_number("h", h, allow_zero=False)
    rtol, atol = _check_number("rtol", rtol), _check_number("atol", atol)
    _, analytic = model.loss_and_grads(X, y, loss)  # also validates X, y and loss
    weights = model.get_weights()
    X = np.asarray(X, dtype=np.float64)
    _check_away_from_kinks(model, weights, X, h)
    numeric = _central_differences(model, weights, X, y, loss, h)

    failures = []
    for layer, (pair, numeric_pair) in enumerate(zip(analytic, numeric)):
        for name, a, n in zip(("dW", "db", "dgamma", "dbeta"), pair, numeric_pair):
            err = np.abs(a - n)
            bound = atol + rtol * np.abs(n)
            off = ~(err <= bound)  # NaN counts as off
            if off.any():
                with np.errstate(divide="ignore", invalid="ignore"):
                    excess = np.where(off, err / bound, -1.0)
                idx = np.unravel_index(np.argmax(excess), a.shape)
                where = [int(i) for i in idx]
                failures.append(
                    f"layer {layer} {name}{where}: analytic {a[idx]:.10g}, numeric {n[idx]:.10g}, "
                    f"|error| {err[idx]:.3g} > atol + rtol*|numeric| = {bound[idx]:.3g} "
                    f"({int(off.sum())} of {a.size} entries off)")
    if failures:
        raise AssertionError(
            f"check_gradients: the {model.backend.name!r} backend's analytic gradients of "
            f"{loss!r} ({_describe(model)}) disagree with central finite differences "
            f"(h={h:g}, rtol={rtol:g}, atol={atol:g}):\n  " + "\n  ".join(failures))


def _central_differences(model: MLP, weights, X, y, loss: str, h: float):
    numeric = []
    try:
        for layer in weights:  # (W, b), or (W, b, gamma, beta) with LayerNorm
            pair = []
            for arr in layer:
                g = np.empty_like(arr)
                for idx in np.ndindex(arr.shape):
                    original = arr[idx]
                    arr[idx] = original + h
                    model.set_weights(weights)
                    up = model.loss_and_grads(X, y, loss)[0]
                    arr[idx] = original - h
                    model.set_weights(weights)
                    down = model.loss_and_grads(X, y, loss)[0]
                    arr[idx] = original  # restored exactly, not by adding h back
                    g[idx] = (up - down) / (2 * h)
                pair.append(g)
            numeric.append(tuple(pair))
    finally:
        model.set_weights(weights)
    return numeric


def _check_away_from_kinks(model: MLP, weights, X: np.ndarray, h: float) -> None:
    """ValueError if a ReLU-family pre-activation is too close to its kink for a step of h."""
    # |act(z)| <= max(1, |z|) for every activation, so the largest input of a layer is bounded
    # by the largest input and pre-activation seen so far.
    scale = max(1.0, float(np.max(np.abs(X))))
    for layer, act in enumerate(model.activations):
        # The first layer + 1 layers with a linear top: its output is this layer's Z.
        prefix = MLP(model.sizes[:layer + 2], activation=list(model.activations[:layer]),
                     backend="numpy", dtype="float64", norm=model.norm)
        prefix.set_weights([*weights[:layer], weights[layer][:2]])
        Z = prefix.forward(X)
        if model.norm is not None:  # the activation's input is LayerNorm's output
            gamma, beta = weights[layer][2:]
            centered = Z - Z.mean(axis=1, keepdims=True)
            Z = centered / np.sqrt(np.mean(centered ** 2, axis=1, keepdims=True) + NORM_EPS)
            Z = Z * gamma + beta
        if act in _KINKED:
            margin = _KINK_SAFETY * h * scale
            idx = np.unravel_index(np.argmin(np.abs(Z)), Z.shape)
            if abs(Z[idx]) < margin:
                where = [int(i) for i in idx]
                raise ValueError(
                    f"check_gradients: layer {layer} ({act}) pre-activation Z{where} = "
                    f"{Z[idx]:.3g} lies within {margin:.3g} of the kink at 0, where a finite "
                    f"difference with h={h:g} is meaningless; use other inputs or weights")
        scale = max(scale, float(np.max(np.abs(Z))))


# =========================================================================== agreement
@dataclass
class _Run:
    """What is compared: the loss of every step (before its update) and the final weights."""

    losses: np.ndarray
    weights: list[tuple[np.ndarray, np.ndarray]]


def assert_backends_agree(build_model: Callable[[str, str], MLP], X: Any, y: Any, loss: str,
                          optimizer: str | Optimizer, steps: int,
                          backends: Sequence[str] | None = None, rtol: float | None = None, *,
                          atol: float | None = None, dtypes: Sequence[str] | None = None,
                          batch_size: int = 32, seed: int = 0) -> None:
    """Train the same model on each backend and compare it with the float64 NumPy reference.

    ``build_model(backend: str, dtype: str) -> MLP`` returns a new model on that backend (a
    registry name) and dtype ("float32" or "float64"), of the same architecture on every call.
    The initial weights of ``build_model("numpy", "float64")`` are copied into every model, so
    all runs start from the same numbers. Each backend in ``backends`` (default: every available
    one) runs in each dtype it supports (``dtypes`` narrows that) for ``steps`` optimizer steps
    of ``optimizer`` (a name, or an SGD/Adam/AdamW/RMSprop whose hyper-parameters are copied
    into a fresh optimizer per run). Step s trains on batch s of the row order that epoch
    ``s // batches_per_epoch`` draws from ``(seed, epoch)``, the final partial batch included,
    so every run sees the same batches.

    A float32 run is compared with a float64 reference run started from the float32-rounded
    weights on the float32-rounded X (and float y), so only arithmetic differs. Both are
    judged with the dtype's :data:`TOLERANCES` entry (``rtol``/``atol`` override it):
    - the loss of every step, ``|loss - ref| <= atol + rtol * |ref|``;
    - the final weights per layer, scale-aware: ``max |w - ref| <= atol + rtol * s`` for W and b,
      with s the largest ``|ref|`` of the layer (W and b together). Biases start at zero and stay
      small sums of cancelling gradients; judged against their own size they would measure
      rounding noise, against the layer's weights they measure what the layer computes.

    Raises AssertionError listing every disagreeing run: backend and dtype, the first and the
    worst step of the loss trajectory, each layer's W or b with its worst index, the largest
    relative error and the tolerance. A run that diverges where the reference does not is a
    disagreement too.
    """
    if not callable(build_model):
        raise TypeError(f"build_model must be a callable (backend, dtype) -> MLP, "
                        f"got {type(build_model).__name__}")
    steps = check_positive_int(steps, "steps", 1)
    batch_size = check_positive_int(batch_size, "batch_size", 1)
    seed = check_positive_int(seed, "seed", 0)
    X = check_numeric(X, "X")
    y = check_numeric(y, "y")
    if X.ndim != 2 or y.shape[:1] != X.shape[:1]:
        raise ValueError(f"X must be 2-D (samples, features) with one row of y per row, got X "
                         f"shape {X.shape} and y shape {y.shape}")
    _fresh_optimizer(optimizer)  # a bad optimizer fails here, before any training
    runs = _runs(backends, dtypes)
    tolerances = {dt: _override(TOLERANCES[dt], rtol, atol) for _, dt in runs}

    reference_model = _build(build_model, "numpy", "float64")
    initial = reference_model.get_weights()
    batches = _batches(X.shape[0], batch_size, steps, seed)
    references: dict[str, _Run] = {}
    failures: list[str] = []
    for name, dt in runs:
        weights, X_dt, y_dt = _rounded(initial, X, y, dt)
        if dt not in references:
            model = reference_model if dt == "float64" else _build(build_model, "numpy",
                                                                  "float64", reference_model)
            references[dt] = _train(model, weights, X_dt, y_dt, loss, optimizer, batches)
        model = _build(build_model, name, dt, reference_model)
        try:
            run = _train(model, weights, X_dt, y_dt, loss, optimizer, batches)
        except TrainingDiverged as err:
            failures.append(f"{name} {dt}: training diverged at step {err.global_step} (the "
                            "loss, a gradient or the update is not finite); the reference did "
                            "not")
            continue
        failures += _compare(f"{name} {dt}", run, references[dt], tolerances[dt])
    if failures:
        raise AssertionError(
            f"backends disagree with the float64 NumPy reference ({_describe(reference_model)}, "
            f"loss {loss!r}, optimizer {_fresh_optimizer(optimizer)!r}, {steps} steps of batch "
            f"{batch_size}, seed {seed}):\n  " + "\n  ".join(failures))


def _runs(backends: Sequence[str] | None, dtypes: Sequence[str] | None) -> list[tuple[str, str]]:
    """(backend, dtype) pairs to compare; numpy float64 is the reference itself."""
    if backends is None:
        backends = available_backends()
    elif isinstance(backends, str) or not all(isinstance(b, str) for b in backends):
        raise TypeError(f"backends must be a list of backend names, got {backends!r}")
    if dtypes is None:
        dtypes = DTYPES
    elif isinstance(dtypes, str):
        raise TypeError(f"dtypes must be a list of dtype names, got {dtypes!r}")
    wanted = [resolve_dtype(dt).name for dt in dtypes]
    runs = [(name, dt) for name in backends for dt in get_backend(name).dtypes
            if dt in wanted and (name, dt) != ("numpy", "float64")]
    if not runs:
        raise ValueError(f"nothing to compare: backends {list(backends)} with dtypes {wanted} "
                         "leave only the float64 NumPy reference itself; valid backends: "
                         f"{', '.join(backend_names())}")
    return runs


def _build(build_model: Callable[[str, str], MLP], backend: str, dtype: str,
           like: MLP | None = None) -> MLP:
    model = build_model(backend, dtype)
    call = f"build_model({backend!r}, {dtype!r})"
    if not isinstance(model, MLP):
        raise TypeError(f"{call} must return a bpkernels.MLP, got {type(model).__name__}")
    if model.backend is not get_backend(backend) or model.dtype.name != dtype:
        raise ValueError(f"{call} returned a model on backend {model.backend.name!r} with dtype "
                         f"{model.dtype.name}; pass both on: "
                         "MLP(..., backend=backend, dtype=dtype)")
    if like is not None and (model.sizes, model.activations) != (like.sizes, like.activations):
        raise ValueError(f"{call} returned {_describe(model)}, but build_model('numpy', "
                         f"'float64') returned {_describe(like)}; the architecture must not "
                         "depend on the backend or dtype")
    return model


def _fresh_optimizer(optimizer: str | Optimizer) -> Optimizer:
    """A new optimizer, unbound and at step 0, with the given one's hyper-parameters."""
    if isinstance(optimizer, Optimizer):
        fresh = optimizer_from_config(optimizer.config()) if optimizer.name in OPTIMIZERS else None
        if type(fresh) is not type(optimizer):
            raise TypeError(f"cannot copy the optimizer {optimizer!r}: give a name or an "
                            f"instance of {', '.join(c.__name__ for c in OPTIMIZERS.values())}")
        return fresh
    return make_optimizer(optimizer)


def _batches(n: int, batch_size: int, steps: int, seed: int) -> list[np.ndarray]:
    batch_size = min(batch_size, n)
    per_epoch = math.ceil(n / batch_size)
    batches = []
    for step in range(steps):
        epoch, j = divmod(step, per_epoch)
        if j == 0:
            order = np.random.default_rng([seed, epoch]).permutation(n)
        batches.append(order[j * batch_size:(j + 1) * batch_size])
    return batches


def _rounded(initial, X: np.ndarray, y: np.ndarray, dtype: str):
    """Weights, X and float y as float64 arrays holding ``dtype``-representable numbers."""
    def through(a):
        return np.asarray(a).astype(dtype).astype(np.float64)
    weights = [(through(W), through(b)) for W, b in initial]
    return weights, through(X), (through(y) if y.dtype.kind == "f" else y)


def _train(model: MLP, weights, X: np.ndarray, y: np.ndarray, loss: str,
           optimizer: str | Optimizer, batches: list[np.ndarray]) -> _Run:
    # One fit() per step, through the same training loop as any user's fit, so each step's
    # loss is recorded on its own and a backend's fused epoch path is the one compared.
    model.set_weights(weights)
    opt = _fresh_optimizer(optimizer)
    losses = []
    for rows in batches:
        history = fit(model, X[rows], y[rows], loss=loss, optimizer=opt, epochs=1,
                      batch_size=len(rows), shuffle=False)
        losses.append(history["loss"][0])
    return _Run(np.array(losses), model.get_weights())


def _compare(label: str, run: _Run, reference: _Run, tol: Tolerance) -> list[str]:
    tolerance_text = f"tolerance rtol={tol.rtol:g}, atol={tol.atol:g}"
    failures = []
    err = np.abs(run.losses - reference.losses)
    off = ~(err <= tol.atol + tol.rtol * np.abs(reference.losses))
    if off.any():
        first = int(np.argmax(off))
        relative = err / np.maximum(np.abs(reference.losses), np.finfo(np.float64).tiny)
        worst = int(np.argmax(relative))
        failures.append(
            f"{label}: loss trajectory off from step {first + 1} of {len(err)} "
            f"({run.losses[first]:.10g}, reference {reference.losses[first]:.10g}); largest "
            f"relative error {relative[worst]:.3g} at step {worst + 1}; {tolerance_text}")
    for layer, (pair, reference_pair) in enumerate(zip(run.weights, reference.weights)):
        scale = max(float(np.max(np.abs(a))) for a in reference_pair)
        bound = tol.atol + tol.rtol * scale
        for name, a, r in zip(("W", "b"), pair, reference_pair):
            diff = np.abs(a - r)
            off = ~(diff <= bound)
            if off.any():
                idx = np.unravel_index(np.argmax(np.where(off, diff, -1.0)), a.shape)
                failures.append(
                    f"{label}: final layer {layer} {name}{[int(i) for i in idx]} = {a[idx]:.10g}, "
                    f"reference {r[idx]:.10g}: largest relative error {diff[idx] / scale:.3g} (of "
                    f"the layer's largest |weight| {scale:.3g}), {int(off.sum())} of {a.size} "
                    f"entries off; {tolerance_text}")
    return failures


def _override(base: Tolerance, rtol: float | None, atol: float | None) -> Tolerance:
    return Tolerance(base.rtol if rtol is None else _check_number("rtol", rtol),
                     base.atol if atol is None else _check_number("atol", atol))


def _check_number(name: str, value: Any, allow_zero: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        allowed = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {allowed}, got {value}")
    return value


def _describe(model: MLP) -> str:
    return f"sizes {list(model.sizes)}, activations {list(model.activations)}"
