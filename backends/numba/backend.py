"""The Numba backend: the contract's kernels compiled by Numba on the CPU (``layers.py``,
``losses.py``, ``optim.py``), float32 and float64, and a whole training epoch in one compiled
call (``epoch.py``). ``jit.py`` chooses native or plain mode (docs/numba.md).

GEMMs run inside the compiled kernels, into the buffers passed in, transposes as BLAS flags:
by the BLAS NumPy uses in native mode (``_native/blas.py``), by Numba's ``np.dot`` in plain
mode. Threads: BLAS's for the GEMMs, Numba's for the
(rare: see PARALLEL_MIN) parallel passes; ``bpkernels.set_num_threads`` (the public way),
``NumbaBackend(threads=n)``, :meth:`NumbaBackend.set_threads` or NUMBA_NUM_THREADS set both.
"""
from __future__ import annotations

import os
import platform
import threading
from typing import Any

import numba
import numpy as np
from numba.core import event

from . import dropout, epoch, jit, layers, losses, norm, optim
from ..base import ACTIVATION_CODES, BOUNDS, KEEPS_Z, LOSS_CODES, OPTIMIZER_RULES, RULES, \
    Backend, EpochPlan, rated, refuse_bf16
from .. import host
from ... import philox
from ..numpy_backend import HostMemory, blas_info

if jit.NATIVE is not None:
    from ._native import passes, pool
else:
    pool = None


def _hyper(rule: str, hp) -> tuple[tuple[float, ...] | None, ...]:
    """The ``sgd``, ``adam``, ``rmsprop`` arguments of the kernels: ``rule``'s hyper-parameters
    as floats in the order of its ``base.RULES`` row, None for the other rules."""
    return tuple(tuple(float(getattr(hp, name)) for name in RULES[rule].hyper) if name == rule
                 else None for name in RULES)


# The ``kinds`` of a single activation: one compiled copy of a layer kernel per activation met.
_KINDS = {name: layers.activation_kinds([code]) for name, code in ACTIVATION_CODES.items()}


class _ReadOnlyAlias:
    """A read-only array's memory as a writeable array (``np.asarray`` of it), which keeps the
    array alive."""

    def __init__(self, array: np.ndarray) -> None:
        self.__array_interface__ = dict(array.__array_interface__,
                                        data=(array.__array_interface__["data"][0], False))
        self.array = array


def _writeable(array: Any) -> Any:
    """``array``, or a writeable alias of it where it is read-only (a memory map, a broadcast
    or a frozen array): Numba compiles a kernel once more for read-only arguments (the epoch
    kernel: seconds), though no kernel writes to its inputs."""
    if isinstance(array, np.ndarray) and not array.flags.writeable:
        return np.asarray(_ReadOnlyAlias(array))
    return array

# A pass over fewer than 2 * PARALLEL_MIN elements runs serially. Measured on 2 cores with BLAS on
# 2 threads: between GEMMs, BLAS's idle workers spin on the cores a parallel pass needs, and the
# passes are memory-bound; at L's sizes (1M activations, 6.3M parameters) parallel passes gained
# nothing (and cost 1.5x with libgomp's default active waiting), so only larger work uses them.
PARALLEL_MIN = 1 << 22
# bf16 models' passes (the rounding of every product's inputs above all) from 2 * 32K elements
# on: their products run on MKL's threads, not beside the BLAS pool's spinning workers, and
# in parallel these passes took L's bf16 epoch from 1.6 to 0.8-0.9 s and M's from 0.32 to 0.27
# s (2-core AMX Xeon). The update and check_step keep PARALLEL_MIN.
PARALLEL_MIN_BF16 = 1 << 15
# From this many parameters on, the epoch kernel bounds the weight gradients rather than scan
# them for inf and NaN, and fuses plain SGD's update into their GEMM (epoch._backward
# and epoch.train_epoch). Fewer parameters and their gradients stay in cache from step to step, where
# the scan and the update pass cost less than the bound's own passes.
BOUND_MIN_PARAMS = 1 << 16
# From as many parameters on (and BOUND_MIN_PARAMS), BLAS's parallel jobs and a share of the
# epoch kernel's gather run on worker threads of our own (_native/pool.py), in native mode and
# where NumPy's OpenBLAS allows it: M's epochs ~5% faster. Smaller models' GEMMs run on one thread, and their batches
# gather in microseconds.
# BPK_BLAS_POOL=0 in the environment keeps OpenBLAS's own threads.
POOL, POOL_MIN_PARAMS = os.environ.get("BPK_BLAS_POOL", "1") != "0", 1 << 16


# Plain mode forms the products of the per-kernel calls by NumPy, from Python, and runs the
# epoch kernel for small models only (fewer than BOUND_MIN_PARAMS parameters). Its compiled
# np.dot is SciPy's OpenBLAS, a second library with a thread pool of its own: on M (2 cores) its
# epochs ran 1.7x the floor, the two pools' idle threads spinning on the cores the other
# needs, where NumPy's own BLAS runs them at the floor. Small models' products are too small
# for either library to start its threads, and their steps too short for calls from Python.
GEMM_BY_NUMPY = jit.NATIVE is None


class _CompileNotice(event.Listener):
    """Calls ``callback()`` once, when a kernel of this package starts compiling (Numba's
    documented compile event, which a kernel loaded from the on-disk cache does not raise)."""

    def __init__(self, callback) -> None:
        self.callback, self.called = callback, False

    def on_start(self, compile_event) -> None:
        module = compile_event.data["dispatcher"].py_func.__module__
        if not self.called and module.startswith(__package__):
            self.called = True
            self.callback()

    def on_end(self, compile_event) -> None:
        pass


# Address space LLVM takes while it compiles a model's kernels (measured: ~130 MiB over an
# imported process for `bpk train`'s model; C++ allocation failures inside LLVM abort the
# process, past any Python handler, so compiling is refused before it starts).
COMPILE_BYTES = 160 * 2**20


class _CompileMemoryCheck(event.Listener):
    """Refuses, with InsufficientMemory, to start compiling a kernel of this package when less
    than COMPILE_BYTES of memory is available (a low ``ulimit -v``)."""

    def on_start(self, compile_event) -> None:
        module = compile_event.data["dispatcher"].py_func.__module__
        if module.startswith(__package__):
            host.check("compiling Numba kernels", {"LLVM's working memory": COMPILE_BYTES},
                       host.memory_available())

    def on_end(self, compile_event) -> None:
        pass


event.register("numba:compile", _CompileMemoryCheck())


class NumbaBackend(HostMemory, Backend):
    name = "numba"
    dtypes = ("float32", "float64")
    keeps_bounds = True  # the updates skip their check pass where bounds prove it unneeded

    def __init__(self, threads: int | None = None) -> None:
        """``threads``: as set_threads; by default NUMBA_NUM_THREADS where it is set (for BLAS
        too), else Numba's and BLAS's own defaults (every core). A count set by
        bpkernels.set_num_threads reaches the backend through the registry, which calls
        set_threads once the backend is made."""
        self._empty: dict[tuple, np.ndarray] = {}
        self._local = threading.local()  # per-thread scratch: models train at once in threads
        self._requested_threads: int | None = None  # set_threads's last count, for MKL
        self._last_kinds = _KINDS["identity"]
        self.max_threads = numba.config.NUMBA_NUM_THREADS
        if threads is None and os.environ.get("NUMBA_NUM_THREADS"):
            threads = numba.config.NUMBA_NUM_THREADS
        if threads is not None:
            self.set_threads(threads)

    def on_compile(self, callback):
        notice = _CompileNotice(callback)
        event.register("numba:compile", notice)
        return lambda: event.unregister("numba:compile", notice)

    # ----------------------------------------------------------------- threads
    @property
    def threads(self) -> int:
        """Threads of the parallel kernels: NUMBA_NUM_THREADS, or what set_threads set (Numba
        keeps this per calling thread)."""
        return numba.get_num_threads()

    def set_threads(self, n: int) -> None:
        """Run the parallel kernels, and BLAS where threadpoolctl is installed, on ``n`` threads
        (1 to NUMBA_NUM_THREADS)."""
        limit = numba.config.NUMBA_NUM_THREADS
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise TypeError(f"threads must be an integer, got {type(n).__name__}")
        if not 1 <= n <= limit:
            raise ValueError(f"threads must lie in 1..{limit} (NUMBA_NUM_THREADS), got {n}")
        numba.set_num_threads(int(n))
        self._requested_threads = int(n)
        from ._native import mkl
        if mkl.loaded():  # (its count is process-wide, as BLAS's; threadpoolctl may be absent)
            mkl.set_threads(int(n))
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            return
        threadpool_limits(int(n), user_api="blas")

    def _par(self, size: int, bf16: bool = False) -> int | None:
        """The ``par`` argument of the kernels for work of ``size`` elements (of a bf16
        layer's products and passes with ``bf16``)."""
        least = PARALLEL_MIN_BF16 if bf16 else PARALLEL_MIN
        return least if size >= 2 * least and numba.get_num_threads() > 1 else None

    def _or_empty(self, buf, like) -> np.ndarray:
        """``buf``, or an empty array of ``like``'s dtype where a kernel's buffer is unused (so
        the kernel is compiled once, not once more for None). Safe from many threads: two
        racing on a key each get an empty array of one shape and dtype, and none is written."""
        if buf is not None:
            return buf
        key = (like.dtype, like.ndim)
        empty = self._empty.get(key)
        if empty is None:
            empty = self._empty[key] = np.empty((0,) * like.ndim, like.dtype)
        return empty

    def device_info(self):
        try:
            layer = numba.threading_layer()
        except ValueError:  # no parallel kernel has run yet
            layer = numba.config.THREADING_LAYER
        return {"device": "cpu", "name": platform.processor() or platform.machine(),
                "cores": os.cpu_count(), "numpy": np.__version__, "numba": numba.__version__,
                "threads": self.threads, "threading_layer": layer, "blas": blas_info(),
                "gemm": jit.BLAS_SOURCE, "mode": jit.MODE, "mode_reason": jit.MODE_REASON,
                "blas_pool": pool.status() if pool is not None else "off (plain mode)"}

    # ------------------------------------------------------------------ dense layer
    def _kinds(self, activation: str) -> tuple:
        """The ``kinds`` of a layer kernel's call. An identity layer (a network's output) takes
        those of the last other layer called, a network's hidden layer as a rule: then the
        layers of a network share one compiled copy of the kernel (and its row pass, with the
        epoch kernel), not one more for the output layer (~0.7 s of a first evaluate). The
        identity's loop is in every copy, and computes the same in each: so threads racing on
        ``_last_kinds`` (models of one backend used at once) change which copy runs, never the
        numbers."""
        if activation != "identity":
            self._last_kinds = _KINDS[activation]
        return self._last_kinds

    def bf16_unavailable(self):
        from ._native import mkl  # (loads MKL on the first call only)
        fresh = not mkl.loaded()
        why = mkl.availability()
        if why is None and fresh and self._requested_threads is not None:
            mkl.set_threads(self._requested_threads)  # a count set before MKL was loaded
        return why

    def _bf16(self, tag: str, like: np.ndarray) -> np.ndarray:
        """The calling thread's uint16 scratch for the bfloat16 bits of ``like``."""
        return self._scratch(tag, like.shape, np.uint16)

    def dense_forward(self, X, W, b, activation, A, Z=None, bf16=False):
        if bf16:
            refuse_bf16(self, self.bf16_unavailable() is not None)
            from . import mixed
            mixed.dense_forward(_writeable(X), _writeable(W), _writeable(b),
                                ACTIVATION_CODES[activation], A if Z is None else Z, A,
                                Z is not None, self._bf16("X", X), self._bf16("W", W),
                                self._par(max(A.size, W.size), True), self._kinds(activation))
            return
        if GEMM_BY_NUMPY:
            product = A if Z is None else Z
            np.matmul(X, W, out=product)
            layers.bias_activation(product, _writeable(b), ACTIVATION_CODES[activation],
                                   Z is not None, A, self._par(A.size), self._kinds(activation))
            return
        layers.dense_forward(_writeable(X), _writeable(W), _writeable(b),
                             ACTIVATION_CODES[activation], A if Z is None else Z, A,
                             Z is not None, self._par(A.size), self._kinds(activation))

    def dense_backward(self, X, W, dA, activation, A, Z, dW, db, dX=None, bf16=False):
        if Z is None and activation in KEEPS_Z:
            raise ValueError(f"dense_backward of a {activation} layer needs its pre-activation Z")
        if bf16:
            refuse_bf16(self, self.bf16_unavailable() is not None)
            from . import mixed
            mixed.dense_backward(_writeable(X), _writeable(W), dA, ACTIVATION_CODES[activation],
                                 A, A if Z is None else Z, dW, db, dA if dX is None else dX,
                                 dX is not None, self._bf16("X", X), self._bf16("W", W),
                                 self._bf16("dZ", dA), self._par(max(dA.size, W.size), True),
                                 self._kinds(activation))
            return
        if GEMM_BY_NUMPY:
            layers.dense_dz(dA, ACTIVATION_CODES[activation], A, A if Z is None else Z, db,
                            self._par(dA.size), self._kinds(activation))
            np.matmul(X.T, dA, out=dW)
            if dX is not None:
                np.matmul(dA, W.T, out=dX)
            return
        layers.dense_backward(_writeable(X), _writeable(W), dA, ACTIVATION_CODES[activation], A,
                              A if Z is None else Z, dW, db, dA if dX is None else dX,
                              dX is not None, self._par(dA.size), self._kinds(activation))

    # ------------------------------------------------------------------ dropout
    def dropout_forward(self, A, D, drop):
        self._dropout(_writeable(A), D, drop)

    def dropout_backward(self, dD, drop):
        self._dropout(dD, dD, drop)

    def _dropout(self, A, D, drop):
        par = self._par(A.size)
        dropout.dropout(A, D, _writeable(drop.rows), drop.key0, drop.key1, drop.step, drop.layer,
                        drop.threshold, A.dtype.type(drop.scale), par,
                        self._words(A.size, A.shape[1], par))

    def _words(self, size, units, par) -> np.ndarray:
        """The calling thread's scratch for dropout's words (dropout.words_scratch)."""
        cache = getattr(self._local, "words", None)
        if cache is None:
            cache = self._local.words = {}
        key = (size, units, par)
        buf = cache.get(key)
        if buf is None:
            buf = cache[key] = dropout.words_scratch(size, units, par)
        return buf

    # ------------------------------------------------------------------ layer norm
    def layer_norm_forward(self, H, gamma, beta, activation, A, rstd, eps):
        norm.layer_norm_forward(H, _writeable(gamma), _writeable(beta),
                                ACTIVATION_CODES[activation], A, rstd, float(eps),
                                self._zeros(H.shape[1], H.dtype), self._kinds(activation))

    def layer_norm_backward(self, dA, activation, A, H, gamma, beta, rstd, dgamma, dbeta):
        keeps_n = activation in KEEPS_Z
        N = self._scratch("norm", H.shape, H.dtype) if keeps_n else A
        norm.layer_norm_backward(dA, ACTIVATION_CODES[activation], _writeable(A), H,
                                 _writeable(gamma), _writeable(beta), rstd, dgamma, dbeta, N,
                                 keeps_n, self._kinds(activation))

    def _zeros(self, n, dtype) -> np.ndarray:
        """n zeros of ``dtype``, kept (never written: a zero bias)."""
        key = ("zeros", n, np.dtype(dtype))
        zeros = self._empty.get(key)
        if zeros is None:
            zeros = self._empty[key] = np.zeros(n, dtype)
        return zeros

    def _scratch(self, tag: str, shape, dtype) -> np.ndarray:
        """The calling thread's scratch ``tag`` of this shape and dtype (LayerNorm's recomputed
        activation input, the bfloat16 copies of the products' inputs)."""
        local = self._local
        key = (tag, tuple(shape), np.dtype(dtype))
        cache = getattr(local, "scratch", None)
        if cache is None:
            cache = local.scratch = {}
        buf = cache.get(key)
        if buf is None:
            buf = cache[key] = np.empty(shape, dtype)
        return buf

    # ------------------------------------------------------------------ loss
    def loss(self, kind, Y, T, dY, out, W=None):
        if kind == "cross_entropy":
            kernel = losses.softmax_xent_labels if T.ndim == 1 else losses.softmax_xent_rows
        else:
            kernel = losses.binary_xent if kind == "binary_cross_entropy" else losses.mse
        kernel(_writeable(Y), _writeable(T), None if W is None else _writeable(W), dY, out)

    def count_correct(self, Y, T, out, W=None):
        (losses.count_correct_labels if T.ndim == 1 else losses.count_correct_rows)(
            _writeable(Y), _writeable(T), None if W is None else _writeable(W), out)

    def accumulate_stats(self, kind, Y, T, W, ks, out):
        W = None if W is None else _writeable(W)
        if kind == "regression":
            losses.regression_stats(_writeable(Y), _writeable(T), W, out)
        else:
            (losses.class_stats_labels if T.ndim == 1 else losses.class_stats_rows)(
                _writeable(Y), _writeable(T), W, np.asarray(ks, np.int64), out)

    def check_step(self, loss, grads, step, halted, clip=None, bounds=None):
        optim.check_step(loss, grads, int(step), halted, self._par(grads.size), clip, bounds)

    # ------------------------------------------------------------------ optimizers
    def sgd_step(self, params, grads, momentum_buf, hp, step, halted, clip=None, rate=None,
                 bounds=None):
        self._step("sgd", params, grads, (momentum_buf,), hp, step, halted, clip, rate, bounds)

    def adam_step(self, params, grads, m, v, hp, step, halted, clip=None, rate=None,
                  bounds=None):
        self._step("adam", params, grads, (m, v), hp, step, halted, clip, rate, bounds)

    def rmsprop_step(self, params, grads, square_avg, momentum_buf, grad_avg, hp, step, halted,
                     clip=None, rate=None, bounds=None):
        self._step("rmsprop", params, grads, (square_avg, momentum_buf, grad_avg), hp, step,
                   halted, clip, rate, bounds)

    def _step(self, rule, params, grads, states, hp, step, halted, clip, rate, bounds):
        optim.optimizer_step(params, grads, self._states(states, params),
                             *_hyper(rule, rated(rule, hp, rate)), int(step), halted,
                             self._par(params.size), clip, bounds)

    def _states(self, states, params) -> tuple[np.ndarray, ...]:
        """Three state buffers, an empty array for each one that is None or absent."""
        states = list(states) + [None] * (3 - len(states))
        return tuple(self._or_empty(buf, params) for buf in states)

    # ------------------------------------------------------------------ a whole epoch
    def train_epoch(self, plan: EpochPlan) -> bool:
        rule = OPTIMIZER_RULES.get(plan.optimizer)
        if rule is None or (GEMM_BY_NUMPY and plan.params.size >= BOUND_MIN_PARAMS) or \
                (plan.bf16 and self.bf16_unavailable() is not None):
            return False
        net, work, targets, bounds, norm = plan.cache.get("numba") or \
            plan.cache.setdefault("numba", self._epoch_buffers(plan))
        labeled = plan.T.ndim == 1
        stats = None if plan.metrics is None else (np.asarray(plan.metrics[1], np.int64),
                                                   plan.stats)
        weights = None
        if plan.W is not None:  # every row's weight, and the batch's (gathered per step)
            source, weights = plan.cache.get("numba-weights", (None, None))
            if source is not plan.W:
                weights = (_writeable(plan.W), np.empty(plan.batch, plan.W.dtype))
                plan.cache["numba-weights"] = (plan.W, weights)
        states = self._states([plan.state.get(name) for name in RULES[rule].state], plan.params)
        widest = max(plan.params.size, plan.batch * max(plan.sizes))
        workers = None
        # (fit's data is C-ordered; the large models' gather reads rows by address, a native
        # trick: plain mode declined large models above)
        drop = None
        if plan.dropout is not None:
            drop = plan.cache.get("numba-dropout") or \
                plan.cache.setdefault("numba-dropout", _dropout_table(plan))
        mixed = None
        if plan.bf16:
            mixed = plan.cache.get("numba-bf16") or \
                plan.cache.setdefault("numba-bf16", _bf16_scratch(plan, work))
        if plan.params.size >= BOUND_MIN_PARAMS and plan.X.flags.c_contiguous:
            workers = 0
            # (bf16: MKL's threads form the products, OpenBLAS's pool would only spin beside)
            if POOL and plan.params.size >= POOL_MIN_PARAMS and mixed is None:
                workers = pool.ensure(epoch.pool_worker, pool.blas_threads() - 1)
            if workers:  # the records of the passes shared with them, and dropout's words
                work = work[:5] + (_plan_scratch(plan, "numba-tasks",
                                                 (workers + 1) * passes.SLOTS, np.int64),)
                if drop is not None:
                    drop = drop[:6] + (_plan_scratch(plan, "numba-words",
                                                     (workers + 1) * drop[6].size, np.uint32),)
        out = (plan.step_loss, plan.step_correct, plan.halted, bounds)
        epoch.train_epoch(net, (_writeable(plan.X), plan.order, plan.batch), work, out,
                          plan.first_step, LOSS_CODES[plan.loss], plan.metric,
                          targets if labeled else None,
                          None if labeled else targets, weights, stats, states,
                          *_hyper(rule, plan.hp),
                          workers, True if workers is None else None,
                          self._par(widest, plan.bf16), self._par(widest),
                          layers.activation_kinds(ACTIVATION_CODES[a] for a in plan.activations),
                          plan.clip, plan.rates, drop, norm, mixed)
        return True

    def _epoch_buffers(self, plan: EpochPlan) -> tuple[Any, Any, tuple, np.ndarray, Any]:
        """The epoch kernel's view of the model (flat buffers and a layer table), its per-step
        scratch (the full workspace's X; flat A, dA and Z of every layer; two rows as wide as
        the widest layer), the targets pair (all of them, the full workspace's T), its
        updates' bounds (base.py) and LayerNorm's buffers (epoch.py's ``norm``) or None."""
        dtype, ws = plan.params.dtype, plan.workspaces[0]
        table, a_size, z_size, h_size, s_size = epoch.layer_table(
            plan.sizes, plan.activations, plan.batch, plan.norm is not None)
        work = (ws.X, np.empty(a_size, dtype), np.empty(a_size, dtype), np.empty(z_size, dtype),
                np.empty(2 * max(plan.sizes), dtype), _NO_TASKS)
        norm = None if plan.norm is None else (np.empty(h_size, dtype), np.empty(s_size, dtype),
                                               float(plan.norm), np.zeros(max(plan.sizes), dtype))
        return (plan.params, plan.grads, table), work, (_writeable(plan.T), ws.T), \
            np.empty(BOUNDS), norm


_NO_TASKS = np.empty(0, np.int64)  # (the epoch's tasks where no pool shares its passes)


def _plan_scratch(plan: EpochPlan, key: str, size: int, dtype) -> np.ndarray:
    """A scratch array of the plan's cache (one fit's), at least ``size`` long; not the
    backend's per-thread ``_scratch``."""
    buf = plan.cache.get(key)
    if buf is None or buf.size < size:
        buf = plan.cache[key] = np.empty(size, dtype)
    return buf


def _bf16_scratch(plan: EpochPlan, work: tuple) -> tuple:
    """The epoch kernel's ``mixed`` (epoch.py): uint16 scratch for the rounded batch X, every
    layer's output and dZ (A's layout), and every W (the parameters' layout)."""
    return (np.empty(work[0].size, np.uint16), np.empty(work[1].size, np.uint16),
            np.empty(work[1].size, np.uint16), np.empty(plan.params.size, np.uint16))


def _dropout_table(plan: EpochPlan) -> tuple:
    """The epoch kernel's ``drop`` (epoch.py): the seed's words, each layer's threshold, factor
    and offset into a flat D (dropout's outputs, batch rows per layer), and the passes'
    scratch."""
    seed, probabilities = plan.dropout
    dtype = plan.params.dtype
    ps = tuple(probabilities) + (0.0,) * (len(plan.sizes) - 1 - len(probabilities))
    thresholds = np.array([philox.keep_threshold(p) for p in ps], np.int64)
    scales = np.array([philox.dropout_scale(p) for p in ps], np.float64).astype(dtype)
    offsets, size = np.full(len(ps), -1, np.int64), 0
    for layer, (p, width) in enumerate(zip(ps, plan.sizes[1:])):
        if p > 0:
            offsets[layer], size = size, size + plan.batch * width
    # (words for as many chunks as any ``par`` makes: the threads may change between epochs)
    hidden = max(plan.sizes[1:-1], default=1)
    words = dropout.words_scratch(plan.batch * hidden, hidden,
                                  PARALLEL_MIN_BF16 if plan.bf16 else PARALLEL_MIN)
    return (seed & 0xFFFFFFFF, seed >> 32, thresholds, scales, np.empty(size, dtype), offsets,
            words)
