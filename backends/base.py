"""The kernel contract: what every backend implements, with shapes, dtypes and what is written.

Arrays passed to kernels are the backend's own device arrays (NumPy arrays for the CPU
backends), C-contiguous, all of the model's one floating dtype (float32 or float64) unless
said otherwise. Shapes use the names of the math: ``n`` rows in a batch, ``i`` inputs and
``o`` outputs of a layer. Every output is passed in and overwritten; kernels return nothing,
so the training loop allocates nothing per step.

Activation names (:data:`ACTIVATION_TABLE`): ``identity``, ``relu``, ``leaky_relu`` (slope
0.01), ``sigmoid``, ``tanh``, ``gelu`` (erf form), ``silu`` (``z * sigmoid(z)``). Those whose
derivative needs the pre-activation (:data:`KEEPS_Z`: ``gelu``, ``silu``) make a model keep
``Z``; the others' derivative is computed from the activation's output ``A``.

Loss names (PyTorch conventions): ``mse`` (mean over all elements), ``cross_entropy`` (logits;
targets are int labels of shape (n,) or probability rows (n, o); mean over the batch) and
``binary_cross_entropy`` (logits; targets in [0, 1] of shape (n, o); mean over all elements).
With row weights ``W`` (n,) (sample and class weights, >= 0) the mean is weighted:
``sum_i w_i l_i / sum_i w_i``, where for ``mse`` and ``binary_cross_entropy`` a row's weight
applies to each of its elements (``sum_ij w_i l_ij / (o sum_i w_i)``): for class weights this is
PyTorch's ``CrossEntropyLoss(weight=...)`` with ``reduction="mean"``. A batch whose weights sum
to 0 has loss 0 and gradient 0 (never 0 / 0).

Optimizer hyper-parameters are passed as one object ``hp`` with the attributes named in each
method's docstring (and in :data:`RULES`, whose order is the kernels' order). ``step`` is the
1-based count of updates including this one.
``halted`` is a device array of one int64, the divergence latch: 0 while training is healthy.
It takes a step's 1-based index when that step's loss or a gradient is not finite
(:meth:`Backend.check_step`), or when its update would make any parameter or any optimizer state
value not finite (the ``*_step`` kernels). That step's update is then not applied at all, nor is
any later one: the parameters and every state buffer stay exactly as the last finite step left
them, finite, so the model saves and loads. All on the device, with no host round trip per step;
the host reads ``halted`` once per epoch.

Gradient clipping (``torch.nn.utils.clip_grad_norm_``) rides on the same two passes: ``clip`` is
None or a (2 + CLIP_SLOTS,) float64 device array made by the caller as ``[0, max_norm, 0, ...]``:
``clip[1]`` the largest norm allowed, ``clip[2:]`` a backend's scratch for its reduction (a
GPU's partial sums), and
``clip[0]`` written by :meth:`Backend.check_step` with the sum of squares of the step's gradients
(accumulated in float64; inf or NaN latches the step, so an overflowing norm is divergence).
The ``*_step`` kernels then scale each gradient element as they read it by
``min(1, clip[1] / (sqrt(clip[0]) + 1e-6))``, rounded to the dtype: no pass of its own, no host
read. ``grads`` keeps the unclipped gradient.

A per-step learning-rate schedule reaches the updates without a host round trip either:
``rate`` is None or a (2,) float64 device array (a row of the epoch's table, uploaded once per
epoch), the step's learning rate and the rule's cycled momentum (:data:`RATE_MOMENTUM`: SGD's
and RMSprop's ``momentum``, Adam's ``beta1``, the optimizer's own value where the schedule
cycles none); they replace ``hp``'s.

A backend whose ``keeps_bounds`` is True also takes ``bounds`` in :meth:`Backend.check_step` and
the ``*_step`` kernels: None, or a (BOUNDS,) float64 device array that the caller fills with inf
(unknown) whenever anything but these kernels may have written the parameters or the state
(fit() does, at the start of every epoch). ``bounds[0:4]``: upper bounds of max |params| and of
each state buffer's max |value|, in kernel order; ``bounds[4]``: one of max |grads|, written by
check_step for the update that follows and used once. With them an update may skip its check
pass where the bounds prove every new value finite, and must keep them true after writing.

Dropout (``torch.nn.Dropout``, inverted) is a pair of kernels on a hidden layer's output, each
drawing its keep-mask inside itself from a :class:`Dropout` (seed, step, layer, the batch's
data-set rows): no mask array is ever written, and every backend draws the same mask
(bpkernels/philox.py, docs/dropout.md). Each multiplies by the mask's value, ``scale`` (1 / (1 -
p) rounded to the dtype) where a unit is kept and 0 where dropped, as PyTorch multiplies by its
noise: a dropped inf gives NaN, which latches, as in PyTorch.

LayerNorm (``torch.nn.LayerNorm(o, eps)``: biased variance, a scale ``gamma`` and a shift
``beta`` per unit) sits between a hidden layer's product and its activation: the layer runs
:meth:`Backend.dense_forward` with the ``identity`` activation into ``H``, then
:meth:`Backend.layer_norm_forward` normalizes H in place and applies the activation;
:meth:`Backend.layer_norm_backward` turns the activation's gradient into that of the product,
and :meth:`Backend.dense_backward` (``identity``) takes it from there. Each row's mean and
variance are accumulated in float64 (two passes: the mean, then the squared deviations) for
every dtype; ``rstd = 1 / sqrt(var + eps)`` and ``xhat = (z - mean) * rstd`` are formed in
float64 and rounded to the dtype once; ``N = xhat * gamma + beta`` in the dtype.

One method is optional: :meth:`Backend.train_epoch` runs a whole epoch at once, described by an
:class:`EpochPlan`; by default it declines and the training loop calls the kernels one by one.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

# ------------------------------------------------------------------ the tables
# One row per fact; every backend reads these (the CUDA sources through the -D defines that
# backends/cuda_sources.py generates from them). A new activation is one row here plus its
# math in each backend.


@dataclass(frozen=True)
class ActivationSpec:
    name: str             # "relu"
    code: int             # its index in ACTIVATION_TABLE: the code every kernel switches on
    derivative_from: str  # "output": act'(z) computable from a = act(z); "input": needs z


ACTIVATION_TABLE: tuple[ActivationSpec, ...] = tuple(
    ActivationSpec(name, code, derivative_from) for code, (name, derivative_from) in enumerate((
        ("identity", "output"),
        ("relu", "output"),
        ("leaky_relu", "output"),
        ("sigmoid", "output"),
        ("tanh", "output"),
        ("gelu", "input"),
        ("silu", "input"),
    )))
ACTIVATIONS = tuple(a.name for a in ACTIVATION_TABLE)
ACTIVATION_CODES: dict[str, int] = {a.name: a.code for a in ACTIVATION_TABLE}
# Activations whose derivative needs the pre-activation: a layer keeps Z for them.
KEEPS_Z: frozenset[str] = frozenset(a.name for a in ACTIVATION_TABLE
                                    if a.derivative_from == "input")
LEAKY_RELU_SLOPE = 0.01
# GELU's constants (erf form): Phi(z) = (1 + erf(z * SQRT_HALF)) / 2, phi(z) =
# ONE_OVER_SQRT_2PI * exp(-z^2 / 2).
SQRT_HALF = 0.7071067811865475244
ONE_OVER_SQRT_2PI = 0.3989422804014326779


@dataclass(frozen=True)
class OptimizerRule:
    name: str                # "sgd", "adam", "rmsprop": the kernel's rule
    hyper: tuple[str, ...]   # the hyper-parameters (attributes of ``hp``), in kernel order
    state: tuple[str, ...]   # the state buffers, in kernel order


RULES: dict[str, OptimizerRule] = {rule.name: rule for rule in (
    OptimizerRule("sgd", ("lr", "momentum", "dampening", "nesterov", "weight_decay"),
                  ("momentum_buffer",)),
    OptimizerRule("adam", ("lr", "beta1", "beta2", "eps", "weight_decay", "decoupled"),
                  ("exp_avg", "exp_avg_sq")),
    OptimizerRule("rmsprop", ("lr", "alpha", "eps", "weight_decay", "momentum", "centered"),
                  ("square_avg", "momentum_buffer", "grad_avg")),
)}
# rule -> its hyper-parameter that a schedule's second column (the cycled momentum) replaces
RATE_MOMENTUM: dict[str, str] = {"sgd": "momentum", "adam": "beta1", "rmsprop": "momentum"}


class Rated:
    """``hp`` with the learning rate and momentum of a schedule's ``rate`` row: how the host
    backends (whose "device" arrays the host reads) read the ``rate`` of a ``*_step``."""

    def __init__(self, rule: str, hp: Any, rate: Any) -> None:
        self._hp, self.lr = hp, float(rate[0])
        setattr(self, RATE_MOMENTUM[rule], float(rate[1]))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._hp, name)


def rated(rule: str, hp: Any, rate: Any) -> Any:
    return hp if rate is None else Rated(rule, hp, rate)


# optimizer name -> the rule its kernels run (AdamW is Adam with decoupled = 1)
OPTIMIZER_RULES: dict[str, str] = {"sgd": "sgd", "adam": "adam", "adamw": "adam",
                                   "rmsprop": "rmsprop"}

# torch.nn.utils.clip_grad_norm_'s coefficient: max_norm / (total_norm + CLIP_EPS), at most 1
CLIP_EPS = 1e-6
# A GPU's reduction of the norm (cuda/optim.cu): CLIP_THREADS partial sums, added up in
# CLIP_GROUPS groups; clip[2:] holds both, CLIP_SLOTS values.
CLIP_THREADS, CLIP_GROUPS = 4096, 64
CLIP_SLOTS = CLIP_THREADS + CLIP_GROUPS


def clip_coefficient(sumsq: float, max_norm: float) -> float:
    """The factor of every gradient element under clipping, from the sum of squares."""
    return min(1.0, max_norm / (math.sqrt(sumsq) + CLIP_EPS))


# Dropout's masks (the reference: bpkernels/philox.py; why: docs/dropout.md). Philox4x32-10 as
# Random123's philox.h defines it (cuRAND's Philox4_32_10 is built on it): the two multipliers,
# the two Weyl constants added to the key between rounds, and the number of rounds.
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
PHILOX_ROUNDS = 10
# The counter's last word holds the layer in its low DROPOUT_LAYER_BITS bits and the row's bits
# above the 32 of the second word in the rest; a unit's uniform is the top
# DROPOUT_UNIFORM_BITS bits of its word, so that it is exact in float32 too.
DROPOUT_LAYER_BITS = 16
DROPOUT_UNIFORM_BITS = 24



@dataclass(frozen=True)
class Dropout:
    """One hidden layer's dropout at one training step, as the dropout kernels take it."""

    rows: Any        # int64 device vector (n,): the batch's rows' indices in the data set
    key0: int        # the model seed's low 32 bits (the Philox key)
    key1: int        # its high 32 bits
    step: int        # the optimizer step (1-based, this step's), < 2**32
    layer: int       # the hidden layer (0 for the first), < 2**DROPOUT_LAYER_BITS
    threshold: int   # bpkernels.philox.keep_threshold(p): kept where word >> 8 >= threshold
    scale: float     # 1 / (1 - p) in float64; kernels round it to the model's dtype


BOUNDS = 5  # the length of the optional ``bounds`` array (module docstring)

DTYPES = ("float32", "float64")  # what a model may hold; each backend supports some of them


class MixedPrecision:
    """``dtype="bf16"``: mixed precision as ``torch.autocast(dtype=torch.bfloat16)`` defines
    it. Everything a model stores (weights, gradients, optimizer state, activations) is
    ``storage`` (float32); the two inputs of every matrix product are rounded to bfloat16
    (round to nearest even) and the product accumulates in float32. Not a NumPy dtype: NumPy
    has no bfloat16, and nothing is ever stored in it, so code that allocates asks for
    ``storage``. Compares equal to the string "bf16"."""

    name = "bf16"
    storage = np.dtype(np.float32)
    itemsize = storage.itemsize  # of what is stored: memory estimates

    def __eq__(self, other: Any) -> bool:
        return other is self or (isinstance(other, str) and other.lower() in BF16_NAMES)

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return "bf16"

    __str__ = __repr__


BF16 = MixedPrecision()
BF16_NAMES = ("bf16", "bfloat16")
PRECISIONS = DTYPES + ("bf16",)  # what dtype= accepts


def refuse_bf16(backend: "Backend", bf16: bool) -> None:
    """For the dense kernels of a backend without bfloat16 products (models refuse bf16 on
    such a backend before any kernel runs: this guards direct calls)."""
    if bf16:
        raise ValueError(f"cannot run bf16 products: {backend.bf16_unavailable()}")


def storage_dtype(dtype: Any) -> np.dtype:
    """The NumPy dtype arrays of a model of ``dtype`` (a resolved dtype or BF16) are held in."""
    return dtype.storage if isinstance(dtype, MixedPrecision) else np.dtype(dtype)
LOSSES = ("mse", "cross_entropy", "binary_cross_entropy")  # the index is the loss code
LOSS_CODES: dict[str, int] = {name: code for code, name in enumerate(LOSSES)}


def stats_size(kind: str, n_outputs: int, n_top: int) -> int:
    """The length of the statistics vector of :meth:`Backend.accumulate_stats`."""
    if kind == "regression":
        return 1 + 4 * n_outputs
    classes = max(n_outputs, 2)
    return classes * classes + 2 * classes + n_top


@dataclass
class EpochPlan:
    """One epoch of training, for :meth:`Backend.train_epoch`: every buffer it reads and writes
    (this backend's device arrays) and every number it needs. It stands for this loop of kernel
    calls, ``ws`` being ``workspaces[0]`` for full batches and ``workspaces[1]`` for the last::

        for s in range(steps):                    # rows = batch, the last step the rest
            index = order[s * batch:s * batch + rows]
            take_rows(X, index, ws.X); take_rows(T, index, ws.T)
            if W is not None: take_rows(W, index, w)     # w: the batch's row weights
            Y = ws.A[-1] after dense_forward of every layer (activations[l], ws.Z[l] for KEEPS_Z)
            loss(loss, Y, ws.T, ws.dA[-1], step_loss[s:s + 1], w)        # w None: unweighted
            if metric: count_correct(Y, ws.T, step_correct[s:s + 1], w)
            if metrics: accumulate_stats(metrics[0], Y, ws.T, w, metrics[1], stats)
            dense_backward of every layer, last first, into the views of ``grads``
            check_step(step_loss[s:s + 1], grads, first_step + s, halted, clip)
            <optimizer>_step(params, grads, <state>, hp, first_step + s, halted, clip,
                             rates[s] if rates is not None else None)  # latches too

    Parameters (and gradients, and each state buffer) are flat: per layer, W (in x out,
    row-major) then b (out,). Every epoch of one fit() passes the same buffers, except ``order``
    and ``rates`` (new arrays each epoch) and the numbers (``first_step``; ``hp`` may be changed
    between epochs by a callback). A backend may keep what it builds for them (compiled code, scratch
    buffers, captured graphs) in ``cache``, which lives as long as the fit() does.
    """

    # the model
    sizes: tuple[int, ...]           # layer widths, input first
    activations: tuple[str, ...]     # one per layer; the output layer's is "identity"
    params: Any                      # flat parameters, updated in place
    grads: Any                       # flat gradients; hold the last step's afterwards
    # the data
    X: Any                           # (N, sizes[0]) every training row
    T: Any                           # (N,) int64 labels or (N, sizes[-1]) targets
    order: Any                       # (N,) int64: the rows of this epoch, in order
    batch: int                       # rows per step; the last step takes the rest
    steps: int
    workspaces: tuple[Any, Any]      # (full, last): X, T, A, Z, dA as the per-kernel loop uses
    # the loss and the per-step results
    loss: str
    metric: bool                     # whether count_correct runs
    step_loss: Any                   # (steps,) written: each step's mean loss
    step_correct: Any                # (steps,) written when metric
    halted: Any                      # (1,) int64, the latch of check_step
    # the optimizer
    optimizer: str                   # "sgd", "adam", "adamw", "rmsprop" (decline any other)
    hp: Any                          # its hyper-parameters, as the *_step kernels take them
    state: dict[str, Any]            # its state buffers by name (momentum_buffer, exp_avg, ...)
    first_step: int                  # 1-based optimizer step of this epoch's first step
    cache: dict = field(default_factory=dict)
    W: Any = None                    # (N,) every row's weight (model dtype), or None: unweighted
    # metrics: (kind, ks) of accumulate_stats, run after loss every step into ``stats`` (float64;
    # the caller zeroes it before the epoch), or None
    metrics: Any = None
    stats: Any = None
    # gradient clipping: None, or the (2 + CLIP_SLOTS,) float64 device array of check_step and
    # the updates (clip[1] the max norm, fixed for the fit; clip[0] each step's sum of squares)
    clip: Any = None
    # a per-step schedule: None, or (steps, 2) float64 on the device, row s the ``rate`` of step
    # s (its learning rate and RATE_MOMENTUM), which replace hp's; uploaded once per epoch
    rates: Any = None
    # dropout: None, or (the model seed, each hidden layer's p): every step's hidden layer l
    # with p > 0 then runs dropout_forward / dropout_backward with Dropout(rows of the step's
    # batch, the seed's words, first_step + s, l, ...); ``ws.D[l]`` is its output, the next
    # layer's X. A backend that cannot must decline.
    dropout: Any = None
    # LayerNorm: None, or its eps where every hidden layer is normalized (``norm="layer"``):
    # each hidden layer's parameters are then W, b, gamma, beta in the flat buffers. A backend
    # that cannot must decline.
    norm: Any = None
    # dtype="bf16": every dense_forward / dense_backward runs with bf16=True (float32 buffers).
    # A backend that cannot must decline.
    bf16: bool = False


class Backend(ABC):
    """One array library on one device. Subclasses set ``name`` and ``dtypes``."""

    name: str = ""
    dtypes: tuple[str, ...] = ("float32", "float64")
    # The most threads set_threads accepts (a pool fixed at start-up); None: no bound. The
    # registry's set_num_threads asks for at most this many.
    max_threads: int | None = None
    # Whether check_step and the *_step kernels take ``bounds`` (module docstring).
    keeps_bounds: bool = False
    # A lock that training holds (EpochLoop, from its start to its end) where models of one
    # backend share its scratch between them: fits of different models in threads then take
    # turns rather than overwrite each other. None: every model trains on its own buffers.
    training_lock: Any = None

    def bf16_unavailable(self) -> str | None:
        """None where this backend runs ``dtype="bf16"``, else why not (one line, naming what
        to install or what the machine lacks)."""
        return f"backend {self.name!r} has no bfloat16 products yet"

    # ----------------------------------------------------------------- plumbing
    @abstractmethod
    def asarray(self, host: np.ndarray, dtype: Any = None) -> Any:
        """Copy a host array to the device as a new C-contiguous array of ``dtype``
        (default: keep the host dtype)."""

    def asarray_resident(self, host: np.ndarray, dtype: Any = None) -> Any:
        """:meth:`asarray`, always into device memory: for the arrays the kernels read and
        write in place (a model's parameters, gradients and optimizer state), which a backend
        that keeps large data sets in host memory (cupy's ``max_resident_bytes``) must not
        keep there. Whether they fit is checked before (bpkernels.memory)."""
        return self.asarray(host, dtype)

    @abstractmethod
    def to_host(self, array: Any) -> np.ndarray:
        """Copy a device array to a new host NumPy array (a synchronisation point)."""

    @abstractmethod
    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """A new uninitialised device array."""

    @abstractmethod
    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """A new zero-filled device array."""

    @abstractmethod
    def copy(self, src: Any, out: Any) -> None:
        """``out[...] = src`` between device arrays of the same shape (dtype may differ)."""

    @abstractmethod
    def take_rows(self, src: Any, index: Any, out: Any) -> None:
        """``out[:] = src[index]``: gather the rows named by the int64 device vector ``index``
        (length n) from ``src`` (N, k) or (N,) into ``out`` (n, k) or (n,). This is how a
        shuffled batch of inputs and targets is formed on the device."""

    @abstractmethod
    def synchronize(self) -> None:
        """Wait until all queued device work has finished (for timing)."""

    @abstractmethod
    def device_info(self) -> dict[str, Any]:
        """A JSON-able description of the device: name, memory, library versions, threads."""

    def memory_available(self) -> tuple[int, str]:
        """(bytes, what limits them): the memory new arrays of this backend can still take,
        checked before large allocations. Default: the host's (backends/host.py)."""
        from . import host
        return host.memory_available()

    # ------------------------------------------------------------------ dense layer
    @abstractmethod
    def dense_forward(self, X: Any, W: Any, b: Any, activation: str, A: Any, Z: Any = None,
                      bf16: bool = False) -> None:
        """``Z = X @ W + b`` and ``A = act(Z)``, fused.

        X (n, i), W (i, o), b (o,); writes A (n, o) and, when given, Z (n, o). ``Z`` is required
        for the activations of :data:`KEEPS_Z` (their derivative needs the pre-activation)
        and may be None for the others. ``bf16`` (float32 arrays only, where
        :meth:`bf16_unavailable` is None): X and W enter the product rounded to bfloat16
        (:class:`MixedPrecision`); neither is changed.
        """

    @abstractmethod
    def dense_backward(self, X: Any, W: Any, dA: Any, activation: str, A: Any, Z: Any,
                       dW: Any, db: Any, dX: Any = None, bf16: bool = False) -> None:
        """Gradients of a dense layer from the gradient of its output.

        ``dZ = dA * act'(Z or A)`` is formed in place of ``dA`` (n, o), which is overwritten;
        then ``dW = X.T @ dZ`` (i, o), ``db = dZ.sum(0)`` (o,) and, when ``dX`` is given,
        ``dX = dZ @ W.T`` (n, i). ``dX`` is None for the first layer, whose input needs no
        gradient. ``bf16``: both products take X, dZ and W rounded to bfloat16 (dA keeps dZ
        unrounded, db sums it unrounded, as autocast's float32 bias gradient does).
        """

    # ------------------------------------------------------------------ dropout
    def dropout_forward(self, A: Any, D: Any, drop: Dropout) -> None:
        """``D = A * noise`` (n, o): noise is ``drop.scale`` (rounded to the dtype) where the
        unit is kept and 0 where dropped, unit (r, j) drawn for data-set row ``drop.rows[r]``
        (bpkernels.philox.dropout_keep). ``D`` is the next layer's input in training."""
        raise NotImplementedError(f"backend {self.name!r} has no dropout kernels")

    def dropout_backward(self, dD: Any, drop: Dropout) -> None:
        """``dD *= noise`` in place, the same noise as :meth:`dropout_forward` drew for
        ``drop``: the gradient of D becomes that of A."""
        raise NotImplementedError(f"backend {self.name!r} has no dropout kernels")

    # ------------------------------------------------------------------ layer norm
    def layer_norm_forward(self, H: Any, gamma: Any, beta: Any, activation: str, A: Any,
                           rstd: Any, eps: float) -> None:
        """LayerNorm then the activation, per row of ``H`` (n, o), which holds the product
        ``X @ W + b`` on entry and ``xhat = (H - mean) * rstd`` on return (the module docstring
        says how each is rounded); ``rstd`` (n,) gets each row's ``1 / sqrt(var + eps)``;
        ``A = act(xhat * gamma + beta)`` (n, o). gamma and beta (o,)."""
        raise NotImplementedError(f"backend {self.name!r} has no LayerNorm kernels")

    def layer_norm_backward(self, dA: Any, activation: str, A: Any, H: Any, gamma: Any,
                            beta: Any, rstd: Any, dgamma: Any, dbeta: Any) -> None:
        """The gradient through the activation and LayerNorm, in place: ``dA`` (n, o) becomes
        the gradient of the product. With ``g = dA * act'(N)`` (N = xhat * gamma + beta
        recomputed from ``H`` = xhat where the activation's derivative needs its input, else
        from ``A``): ``dgamma = sum_r g * xhat``, ``dbeta = sum_r g`` (o,), and with ``d = g *
        gamma``, ``dA = rstd * (d - mean_j(d) - xhat * mean_j(d * xhat))`` per row (the row
        means accumulated in float64)."""
        raise NotImplementedError(f"backend {self.name!r} has no LayerNorm kernels")

    # ------------------------------------------------------------------ loss
    @abstractmethod
    def loss(self, kind: str, Y: Any, T: Any, dY: Any, out: Any, W: Any = None) -> None:
        """Value and gradient of the mean loss, numerically stable, in one pass.

        Y (n, o) outputs (logits for the two cross-entropies); T the targets: (n, o) of the
        model dtype, or int64 labels (n,) for ``cross_entropy``. Writes ``dY`` (n, o) =
        d(mean loss)/dY and ``out[0]`` = the mean loss; ``out`` is a length-1 device view, so
        the value stays on the device until asked for. ``W``: None, or the rows' weights (n,)
        of the model dtype, for the weighted mean of the module docstring (its total is summed
        on the device: no host read).
        """

    @abstractmethod
    def count_correct(self, Y: Any, T: Any, out: Any, W: Any = None) -> None:
        """``out[0]`` = how many rows of Y (n, o) are classified right, for targets ``T`` as
        passed to :meth:`loss`: int64 labels (n,) match the row's argmax; probability rows
        (n, o) match by argmax; for o == 1, ``Y > 0`` matches ``T >= 0.5``. Ties go to the
        first maximum. ``out`` is a length-1 view of the model dtype. With row weights ``W``
        (n,): the sum of the weights of the rows classified right."""

    def accumulate_stats(self, kind: str, Y: Any, T: Any, W: Any, ks: tuple[int, ...],
                         out: Any) -> None:
        """Add this batch's metric statistics to ``out`` (a float64 device vector, whatever the
        model's dtype, :func:`stats_size` long: the sums over the steps of an epoch, read once;
        in float32 a count would stop growing at 2**24). ``W``: the rows' weights (n,) or None
        (each row 1). ``kind``:

        - ``"classes"`` (C = max(o, 2) classes; true class: the label, the argmax of a target
          row, or ``T >= 0.5`` for one output; predicted: the argmax of Y, first maximum, or
          ``Y > 0`` for one output): ``out[t * C + p]`` += the weight of rows of true class t
          predicted p; ``out[C*C + c]`` += the number of rows of true class c and
          ``out[C*C + C + c]`` of rows predicted c (unweighted: which classes occur);
          ``out[C*C + 2C + i]`` += the weight of rows whose label ranks among the ``ks[i]``
          largest outputs (ties ranked as scikit-learn's top_k_accuracy_score: a larger index
          first).
        - ``"regression"`` (targets (n, o)): ``out[0]`` += sum w; then per output j,
          ``out[1 + j]`` += sum w |y - t|, ``out[1 + o + j]`` += sum w (y - t)^2,
          ``out[1 + 2o + j]`` += sum w t and ``out[1 + 3o + j]`` += sum w t^2.
        """
        raise NotImplementedError(f"backend {self.name!r} computes no metric statistics "
                                  "(Backend.accumulate_stats): metrics= needs them")

    @abstractmethod
    def check_step(self, loss: Any, grads: Any, step: int, halted: Any, clip: Any = None) -> None:
        """If ``halted[0]`` is 0 and ``loss[0]`` or any element of ``grads`` is not finite,
        set ``halted[0] = step``. Never clears it. (The update's own overflow is the
        optimizer kernels' half of the latch.) With ``clip`` (see the module's docstring),
        also ``clip[0]`` = the sum of squares of ``grads`` in float64, latching the step where
        it is not finite."""

    # ------------------------------------------------------------------ optimizers
    # Each is one fused in-place update of the flat parameter buffer ``params`` from the
    # flat gradient buffer ``grads`` (same length), a no-op while ``halted[0] != 0``. Each is
    # also the latch's check of its update: if any new value it would write (a parameter or a
    # state value) is not finite, it writes nothing and sets ``halted[0] = step`` (a finite
    # gradient times a huge learning rate; Adam's 0 / 0 with ``eps = 0``). No host sync: check
    # on the device, then write gated on ``halted`` (the NumPy reference updates scratch copies
    # and copies them back; Numba and CUDA run one element function twice, read-only first).
    # ``clip``: None, or check_step's array: every gradient element is scaled by the clip
    # coefficient (module docstring) as it is read. ``rate``: None, or a schedule's row for this
    # step (module docstring).

    @abstractmethod
    def sgd_step(self, params: Any, grads: Any, momentum_buf: Any, hp: Any, step: int,
                 halted: Any, clip: Any = None, rate: Any = None) -> None:
        """torch.optim.SGD. hp: lr, momentum, dampening, nesterov, weight_decay.
        ``momentum_buf`` (None when momentum == 0) is set to the gradient (with weight decay
        added) on step 1."""

    @abstractmethod
    def adam_step(self, params: Any, grads: Any, m: Any, v: Any, hp: Any, step: int,
                  halted: Any, clip: Any = None, rate: Any = None) -> None:
        """torch.optim.Adam / AdamW. hp: lr, beta1, beta2, eps, weight_decay, decoupled
        (True for AdamW: decay the weights directly instead of adding L2 to the gradient)."""

    @abstractmethod
    def rmsprop_step(self, params: Any, grads: Any, square_avg: Any, momentum_buf: Any,
                     grad_avg: Any, hp: Any, step: int, halted: Any, clip: Any = None,
                     rate: Any = None) -> None:
        """torch.optim.RMSprop. hp: lr, alpha, eps, weight_decay, momentum, centered.
        ``momentum_buf`` is used when momentum > 0 and ``grad_avg`` when centered; each is None
        otherwise."""

    # ------------------------------------------------------------------ optional
    def train_epoch(self, plan: EpochPlan) -> bool:
        """Run every step of ``plan`` at once (one compiled loop, a captured graph), writing
        what the kernel loop it describes writes: ``step_loss``, ``step_correct``, ``halted``,
        ``params``, ``grads`` and the state buffers, equal to that loop's up to the kernels' own
        rounding. Returns True when done; False, the default, to decline (no such path here, or
        not for this plan) before writing anything: the caller then runs the kernels one by
        one."""
        return False

    def set_threads(self, n: int) -> None:
        """Run this backend's own parallel work on at most ``n`` threads from now on (an int,
        1 to ``max_threads``; a ValueError beyond). A pool that keeps its count per calling
        thread (Numba's) takes it in the calling thread. The registry's ``set_num_threads``
        calls this on every loaded backend, and on each backend when it is loaded. Default:
        nothing, for a backend with no threads of its own (NumPy's BLAS, which the host
        backends share, is limited by ``bpkernels.threads``; a GPU backend's parallelism is
        the device's)."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"threads must be an integer >= 1, got {n!r}")

    def on_compile(self, callback: Callable[[], Any]) -> Callable[[], None]:
        """Call ``callback()`` when this backend starts compiling code for a model (not when it
        loads compiled code from a cache), so that a caller can say why the first epoch is
        slow; returns a function that unregisters it. Default: never calls it (nothing here is
        compiled)."""
        return lambda: None
