"""CUDA GPUs through CuPy, float32, float64 and bf16 (bfloat16 products by cuBLAS on
compute capability 8.0 and later: cupy_mixed.py).

Products go to cuBLAS (``cupy.matmul`` into the buffers given, transposes as views; TF32 off
unless asked for). Everything else is one kernel of ``cuda/*.cu`` per fused operation (a few
for LayerNorm, whose row sums take a launch per pass), compiled by NVRTC on first use per dtype
and cached by CuPy. ``train_epoch`` captures one training step as a CUDA graph and replays it
once per step (a second graph for a final partial batch): the
step number, the step's result slot, the divergence latch, the hyper-parameters and dropout's
batch rows are all read on the device, so nothing waits on the host inside an epoch. A data set larger than the
device's free memory stays in host memory and is fed batch by batch through pinned buffers,
copied on a side stream while the previous step computes. Both live in cupy_graphs.py.

For data-parallel training (bpkernels.distributed) the backend offers NCCL (``nccl``, None
when this CuPy was built without it), the stream its kernels are queued on, and one kernel that
weighs a rank's gradient before the all-reduce; the MPI side stays in bpkernels.distributed.
"""
from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

import cupy

try:  # optional in CuPy: absent when built or installed without NCCL (as cupyx checks)
    from cupy.cuda import nccl as _nccl
except ImportError:
    _nccl = None

from . import BackendUnavailable
from . import cuda_sources as sources
# (names, not ``from . import cupy_mixed``: that reads the package's attribute, which may be
# the real module where tests/cudasim loads its copy)
from .cupy_mixed import gemm_bf16, unavailable as bf16_reason
from .bf16 import to_bf16_bits
from .host import no_gpu_driver_note
from .base import ACTIVATION_CODES, CLIP_GROUPS, CLIP_THREADS, KEEPS_Z, OPTIMIZER_RULES, \
    BF16_NAMES, Backend, EpochPlan, refuse_bf16
# after cupy: the graph runner's module imports it too
from .cupy_graphs import GraphRunner, HostArray, hp_values, plan_key, replayable

BLOCK = 256              # threads per block of every launch
ONE_PASS_ROWS = 64       # column sums over at most this many rows take one launch, not two
SUM_CHUNK = 16           # rows per thread of colsum_chunks (as in cuda/dense.cu)
RESIDENT_FRACTION = 0.5  # a data set stays on the device while it fits in this much free memory
NORM_LANES = 32          # threads per row of the LayerNorm kernels, at least (_norm_lanes)


def _norm_lanes(o: int) -> int:
    """Threads per row of the LayerNorm kernels: 32 (each summing every 32nd column) up to
    1024 columns, then enough to keep each at 32 columns. A function of the width alone: the
    order of a row's additions, and so its bits, never depends on the batch or the device."""
    return min(o, max(NORM_LANES, -(-o // NORM_LANES)))


def _float32_compute_type(tf32: bool) -> bool:
    """Set CuPy's process-wide compute type of float32 products, TF32 or full float32, before
    a product (it is per process, and other code may change it). The one use of a CuPy
    internal (``cupy._core._routines_linalg``): CuPy's public way is the ``CUPY_TF32``
    environment variable, read once at import. Where the internal has moved, products run as
    CUPY_TF32 says (full float32 unless set) and this returns False; ``device_info`` reports
    it."""
    linalg = getattr(getattr(cupy, "_core", None), "_routines_linalg", None)
    try:
        wanted = linalg.COMPUTE_TYPE_TF32 if tf32 else linalg.COMPUTE_TYPE_DEFAULT
        if linalg.get_compute_type(np.float32) != wanted:
            linalg.set_compute_type(np.float32, wanted)
    except AttributeError:
        return False
    return True


class CupyBackend(Backend):
    name = "cupy"

    def __init__(self, tf32: bool | None = None, max_resident_bytes: int | None = None,
                 graphs: bool = True) -> None:
        """``tf32``: let cuBLAS round float32 products to TF32 (faster on Ampere and later,
        about 1e-3 relative error; default: the environment variable BPK_CUDA_TF32=1, else
        off). ``max_resident_bytes``: the largest data set kept on the device (default: half of
        the free device memory when it is copied; a model's parameters, gradients and optimizer
        state are always on the device). ``graphs``: capture and replay training
        steps (off: the kernels are launched one by one)."""
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except RuntimeError as err:  # CUDARuntimeError: no driver, or too old for this CuPy
            raise BackendUnavailable(f"backend 'cupy' cannot use a GPU here: {err}"
                                     f"{no_gpu_driver_note()}") from None
        if count < 1:
            raise BackendUnavailable("backend 'cupy' cannot use a GPU here: no CUDA device")
        if tf32 is None:
            tf32 = os.environ.get("BPK_CUDA_TF32", "0") not in ("", "0")
        self.tf32 = bool(tf32)
        self.max_resident_bytes = max_resident_bytes
        self.graphs = graphs
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.runtime.getDevice())
        self._properties = props
        # Grid-stride kernels need no more blocks than keep every multiprocessor busy.
        self._max_blocks = max(1, int(props["multiProcessorCount"]) * 16)
        self._modules: dict[np.dtype, dict[str, Any]] = {}
        self._scratch_cache: dict[tuple, Any] = {}
        self._hp_cache: dict[tuple, Any] = {}
        self._bf16_why: list[str | None] = []  # bf16_unavailable's answer, once known
        self.nccl = _nccl
        # The scratch, the stream and the graph captures are the backend's, shared by its
        # models: fits in threads take turns (reentrant: a callback may train another model)
        self.training_lock = threading.RLock()
        # Held while a graph is captured: CUDA refuses allocations and synchronous copies from
        # any thread during a (global-mode) capture, so another thread's new model or host
        # read waits the capture out rather than breaking it.
        self.capture_lock = threading.RLock()

    # ----------------------------------------------------------------- helpers
    def _kernels(self, dtype) -> dict[str, Any]:
        """Every kernel of every source, compiled for ``dtype`` on first use: all at once, so
        nothing is compiled or loaded while a graph is being captured."""
        dtype = np.dtype(dtype)
        table = self._modules.get(dtype)
        if table is None:
            table = {}
            for source in sources.SOURCES:
                module = cupy.RawModule(code=sources.source(source),
                                        options=sources.options(dtype))
                for name in sources.kernel_names(source):
                    table[name] = module.get_function(name)
            self._modules[dtype] = table
        return table

    def _launch(self, dtype, name: str, threads: int, args: tuple, exact: bool = False) -> None:
        """``exact``: a grid of exactly ``threads`` threads (a multiple of BLOCK), not capped
        at the blocks that keep the device busy."""
        blocks = -(-threads // BLOCK) if exact else min(max(1, -(-threads // BLOCK)),
                                                         self._max_blocks)
        self._kernels(dtype)[name]((blocks,), (BLOCK,), args)

    def _any_kernels_dtype(self) -> np.dtype:
        """A dtype whose module is (or will be) built, for the dtype-free kernels."""
        return next(iter(self._modules), np.dtype(np.float32))

    def _scratch(self, tag: str, shape: tuple[int, ...], dtype) -> Any:
        key = (tag, shape, np.dtype(dtype))
        buf = self._scratch_cache.get(key)
        if buf is None:
            buf = self._scratch_cache[key] = cupy.empty(shape, dtype)
        return buf

    def _matmul(self, a, b, out) -> None:
        if out.dtype == np.float32:
            _float32_compute_type(self.tf32)
        cupy.matmul(a, b, out=out)

    def _resident_limit(self) -> int:
        if self.max_resident_bytes is not None:
            return self.max_resident_bytes
        free, _ = cupy.cuda.runtime.memGetInfo()
        return int(free * RESIDENT_FRACTION)

    # ----------------------------------------------------------------- plumbing
    def asarray(self, host, dtype=None):
        if isinstance(host, HostArray):
            host = host.host
        host = np.ascontiguousarray(host, dtype=dtype)
        if host.nbytes > self._resident_limit():
            return HostArray(host.copy())
        return self.asarray_resident(host)

    def asarray_resident(self, host, dtype=None):
        if isinstance(host, HostArray):
            host = host.host
        with self.capture_lock:
            return cupy.asarray(np.ascontiguousarray(host, dtype=dtype))

    def from_device(self, obj) -> Any:
        """``obj``, a CUDA array of another library (``__cuda_array_interface__``, or DLPack on
        a CUDA device), as a CuPy array on the same memory, without a copy (for
        bpkernels.interop). ValueError if it is on another GPU than this backend's."""
        array = cupy.asarray(obj) if hasattr(obj, "__cuda_array_interface__") \
            else cupy.from_dlpack(obj)
        device = cupy.cuda.runtime.getDevice()
        if array.data.device_id != device:
            raise ValueError(f"the array is on CUDA device {array.data.device_id} but the "
                             f"backend computes on device {device}: move one of them")
        return array

    def to_host(self, array):
        if isinstance(array, HostArray):
            return np.array(array.host, copy=True)
        with self.capture_lock:
            return cupy.asnumpy(array)

    def empty(self, shape, dtype):
        with self.capture_lock:
            return cupy.empty(shape, dtype)

    def zeros(self, shape, dtype):
        with self.capture_lock:
            return cupy.zeros(shape, dtype)

    def copy(self, src, out):
        if isinstance(src, HostArray):
            out.set(np.ascontiguousarray(src.host, dtype=out.dtype).reshape(out.shape))
        else:
            out[...] = src

    def take_rows(self, src, index, out):
        if isinstance(src, HostArray) or isinstance(index, HostArray):
            rows = self.to_host(index)  # a host wait: only for data kept on the host
            host = src.host if isinstance(src, HostArray) else self.to_host(src)
            out.set(np.ascontiguousarray(np.take(host, rows, axis=0), dtype=out.dtype))
            return
        self._gather(src, index, None, 0, out)

    def _gather(self, src, index, slot, stride: int, out) -> None:
        """out = src[index[slot * stride:][:rows]] (slot: a device step counter, or None)."""
        if src.dtype != out.dtype:
            raise TypeError(f"take_rows: src is {src.dtype} but out is {out.dtype}")
        n = out.shape[0]
        k = int(np.prod(src.shape[1:], dtype=np.int64))
        if src.dtype == np.int64:
            kernel, dtype = "gather_rows_i64", self._any_kernels_dtype()
        else:
            kernel, dtype = "gather_rows", src.dtype
        self._launch(dtype, kernel, n * k, (src, np.int64(k), index, slot, np.int64(stride),
                                            np.int64(n), out))

    def synchronize(self):
        cupy.cuda.runtime.deviceSynchronize()

    def memory_available(self):
        free, _ = cupy.cuda.runtime.memGetInfo()
        # Blocks CuPy's pool holds for reuse are free to our arrays, not to the driver.
        pool = getattr(cupy, "get_default_memory_pool", None)
        cached = pool().free_bytes() if pool is not None else 0
        return int(free + cached), f"free memory of GPU {cupy.cuda.runtime.getDevice()}"

    def device_info(self):
        props = self._properties
        free, total = cupy.cuda.runtime.memGetInfo()
        runtime = cupy.cuda.runtime.runtimeGetVersion()
        name = props["name"]
        return {
            "device": "cuda", "name": name.decode() if isinstance(name, bytes) else str(name),
            "total_memory": int(total), "memory_gb": round(total / 2**30, 1),
            "free_memory": int(free),
            "compute_capability": f"{props['major']}.{props['minor']}",
            "multiprocessors": int(props["multiProcessorCount"]),
            "cuda": f"{runtime // 1000}.{runtime % 1000 // 10}",
            "driver": cupy.cuda.runtime.driverGetVersion(), "cupy": cupy.__version__,
            "tf32": self.tf32 if _float32_compute_type(self.tf32) else
            f"as CUPY_TF32 says ({os.environ.get('CUPY_TF32', '0')}): CuPy's setter moved",
            "graphs": self.graphs,
        }

    # ------------------------------------------------------------------ dense layer
    def bf16_unavailable(self):
        if not self._bf16_why:
            with self.capture_lock:  # the self-test allocates and waits
                if not self._bf16_why:
                    self._bf16_why.append(bf16_reason(self._properties))
        return self._bf16_why[0]

    def _rounded(self, role: str, a) -> Any:
        """The bfloat16 bits of float32 ``a`` (cuda/dense.cu's round_bf16), in uint16 scratch
        of the calling thread's for ``role``: threads that predict at once on one backend
        never round into each other's buffers."""
        refuse_bf16(self, self.bf16_unavailable() is not None)
        if a.dtype != np.float32:
            raise TypeError(f"bf16 products take float32 arrays, got {a.dtype}")
        bits = self._scratch(("bf16", role, threading.get_ident()), a.shape, np.uint16)
        self._launch(a.dtype, "round_bf16", a.size, (a, np.int64(a.size), bits))
        return bits

    def dense_forward(self, X, W, b, activation, A, Z=None, bf16=False):
        pre = A if Z is None else Z
        if bf16:
            gemm_bf16(self._rounded("X", X), False, self._rounded("W", W), False,
                                 pre)
        else:
            self._matmul(X, W, pre)
        n, o = pre.shape
        self._launch(pre.dtype, "bias_act_forward", n * o,
                     (pre, b, np.int64(n), np.int64(o),
                      np.int32(ACTIVATION_CODES[activation]), Z, A))

    def dense_backward(self, X, W, dA, activation, A, Z, dW, db, dX=None, bf16=False):
        if bf16:  # before dA is overwritten
            refuse_bf16(self, self.bf16_unavailable() is not None)
        if activation != "identity":
            if activation in KEEPS_Z and Z is None:
                raise ValueError(f"dense_backward of {activation} needs the pre-activation Z")
            self._launch(dA.dtype, "act_grad", dA.size,
                         (A, Z, np.int64(dA.size), np.int32(ACTIVATION_CODES[activation]), dA))
        if bf16:  # dA keeps dZ unrounded: db sums it as a float32 layer does
            dZ = self._rounded("dZ", dA)
            gemm_bf16(self._rounded("X", X), True, dZ, False, dW)
        else:
            self._matmul(X.T, dA, dW)
        self._colsum(dA, db, 1.0, None)
        if dX is not None:
            if bf16:
                gemm_bf16(dZ, False, self._rounded("W", W), True, dX)
            else:
                self._matmul(dA, W.T, dX)

    def _colsum(self, M, out, scale: float, slot) -> None:
        """out[slot * o:][:o] = scale * M.sum(0) for M (n, o), summed in double."""
        n, o = M.shape
        dt = M.dtype
        if n <= ONE_PASS_ROWS:
            self._launch(dt, "colsum_rows", o,
                         (M, np.int64(n), np.int64(o), np.float64(scale), out, slot))
            return
        chunks = -(-n // SUM_CHUNK)
        partial = self._scratch("colsum", (chunks, o), np.float64)
        self._launch(dt, "colsum_chunks", chunks * o, (M, np.int64(n), np.int64(o), partial))
        self._launch(dt, "colsum_store", o, (partial, np.int64(chunks), np.int64(o),
                                             np.float64(scale), out, slot))

    # ------------------------------------------------------------------ dropout
    # Both are one launch of cuda/dropout.cu's dropout_mul, backward in place: the same
    # arguments draw the same noise.
    def dropout_forward(self, A, D, drop):
        self._dropout(A, D, drop)

    def dropout_backward(self, dD, drop):
        self._dropout(dD, dD, drop)

    def _dropout(self, src, out, drop, slot=None, stride: int = 0, step_dev=None) -> None:
        """out = src * noise for the data-set rows ``drop.rows[slot * stride:][:n]`` (slot: a
        device step counter, or None) at step ``drop.step``, or ``*step_dev`` when given."""
        n, units = src.shape
        rows = drop.rows
        if isinstance(rows, HostArray):  # the kernel reads the rows on the device
            rows = self._scratch("dropout_rows", rows.shape, np.int64)
            rows.set(np.ascontiguousarray(drop.rows.host, np.int64))
        self._launch(src.dtype, "dropout_mul", n * -(-units // 4),
                     (src, np.int64(n), np.int64(units), rows, slot, np.int64(stride),
                      np.uint32(drop.key0), np.uint32(drop.key1), np.int64(drop.step), step_dev,
                      np.uint32(drop.layer), np.uint32(drop.threshold), np.float64(drop.scale),
                      out))

    # ------------------------------------------------------------------ layer norm
    # cuda/norm.cu: each row's sums by ``_norm_lanes(o)`` threads, one launch per pass (forward:
    # sums, squared deviations, apply; backward: sums, dgamma/dbeta, apply), in float64 scratch.
    def layer_norm_forward(self, H, gamma, beta, activation, A, rstd, eps):
        n, o = H.shape
        lanes = _norm_lanes(o)
        part = self._scratch("norm_rows", (2, n * lanes), np.float64)
        head = (np.int64(n), np.int64(o), np.int64(lanes))
        self._launch(H.dtype, "ln_forward_sums", n * lanes, (H, *head, part[0]))
        self._launch(H.dtype, "ln_forward_squares", n * lanes, (H, *head, part[0], part[1]))
        self._launch(H.dtype, "ln_forward_apply", n * lanes,
                     (H, gamma, beta, *head, part[0], part[1], np.float64(eps),
                      np.int32(ACTIVATION_CODES[activation]), rstd, A))

    def layer_norm_backward(self, dA, activation, A, H, gamma, beta, rstd, dgamma, dbeta):
        n, o = dA.shape
        lanes = _norm_lanes(o)
        sums = self._scratch("norm_rows", (2, n * lanes), np.float64)
        head = (np.int64(n), np.int64(o), np.int64(lanes))
        self._launch(dA.dtype, "ln_backward_sums", n * lanes,
                     (dA, A, H, gamma, beta, *head, np.int32(ACTIVATION_CODES[activation]),
                      sums))
        # dA holds g now: the column sums read it before the last pass overwrites it
        if n <= ONE_PASS_ROWS:
            self._launch(dA.dtype, "ln_param_grads_rows", o,
                         (dA, H, np.int64(n), np.int64(o), dgamma, dbeta))
        else:
            chunks = -(-n // SUM_CHUNK)
            partial = self._scratch("norm_columns", (2, chunks, o), np.float64)
            self._launch(dA.dtype, "ln_param_grads_chunks", chunks * o,
                         (dA, H, np.int64(n), np.int64(o), partial))
            self._launch(dA.dtype, "ln_param_grads_store", o,
                         (partial, np.int64(chunks), np.int64(o), dgamma, dbeta))
        self._launch(dA.dtype, "ln_backward_apply", n * lanes, (dA, H, gamma, rstd, *head, sums))

    # ------------------------------------------------------------------ loss
    def loss(self, kind, Y, T, dY, out, W=None):
        self._loss(kind, Y, T, dY, out, slot=None, W=W)

    def _loss(self, kind: str, Y, T, dY, out, slot, W=None) -> None:
        n, o = Y.shape
        dt = Y.dtype
        T = self._targets(T, dt)
        # Weighted, the row count n is replaced by sum(W), read on the device (weigh_rows)
        count = 1 if W is not None else n
        if kind == "cross_entropy":
            name = "xent_labels" if T.dtype == np.int64 else "xent_probs"
            grad_scale, value_scale = 1.0 / count, 1.0 / count
        elif kind == "binary_cross_entropy":
            name, grad_scale, value_scale = "bce", 1.0 / (count * o), 1.0 / (count * o)
        elif kind == "mse":
            name, grad_scale, value_scale = "mse", 2.0 / (count * o), 1.0 / (count * o)
        else:
            raise ValueError(f"unknown loss {kind!r}")
        rows = self._scratch("row_loss", (n, 1), dt)
        self._launch(dt, name, n, (Y, T, np.int64(n), np.int64(o), dt.type(grad_scale), dY, rows))
        if W is not None:
            total = self._scratch("weight_total", (1,), dt)
            self._colsum(W.reshape(n, 1), total, 1.0, None)
            self._launch(dt, "weigh_rows", n, (W, total, np.int64(n), np.int64(o), dY, rows))
        self._colsum(rows, out, value_scale, slot)

    def _targets(self, T, dtype):
        """T as the kernels read it: int64 labels, or rows of the model dtype (converted only
        when given otherwise, which the training loop never does)."""
        if T.dtype.kind in "iu":
            return T if T.dtype == np.int64 else T.astype(np.int64)
        return T if T.dtype == dtype else T.astype(dtype)

    def count_correct(self, Y, T, out, W=None):
        self._count_correct(Y, T, out, slot=None, W=W)

    def _count_correct(self, Y, T, out, slot, W=None) -> None:
        n, o = Y.shape
        dt = Y.dtype
        T = self._targets(T, dt)
        hits = self._scratch("hits", (n, 1), dt)
        name = "correct_labels" if T.dtype == np.int64 else "correct_rows"
        self._launch(dt, name, n, (Y, T, np.int64(n), np.int64(o), hits))
        if W is not None:
            self._launch(dt, "weigh_rows", n, (W, None, np.int64(n), np.int64(1), hits, None))
        self._colsum(hits, out, 1.0, slot)

    def accumulate_stats(self, kind, Y, T, W, ks, out):
        n, o = Y.shape
        dt = Y.dtype
        T = self._targets(T, dt)
        if kind == "regression":
            self._launch(dt, "regression_stats_add", 1 + 4 * o,
                         (Y, T, W, np.int64(n), np.int64(o), out))
            return
        width, C = 2 + len(ks), max(o, 2)
        rowstat = self._scratch("class_rows", (n, width), dt)
        key = ("ks", tuple(ks))  # made once (before a graph's capture: its first pass)
        ks_dev = self._scratch_cache.get(key)
        if ks_dev is None:
            ks_dev = self._scratch_cache[key] = cupy.asarray(np.array(tuple(ks) or (0,), np.int64))
        name = "class_rows_labels" if T.dtype == np.int64 else "class_rows_probs"
        self._launch(dt, name, n, (Y, T, np.int64(n), np.int64(o), ks_dev, np.int64(len(ks)),
                                   rowstat))
        self._launch(dt, "class_stats_add", C * C + 2 * C + len(ks),
                     (rowstat, W, np.int64(n), np.int64(width), np.int64(C), out))

    def check_step(self, loss, grads, step, halted, clip=None):
        self._check_step(loss, None, grads, step, None, halted, clip)

    def _check_step(self, loss, slot, grads, step: int, step_dev, halted, clip=None) -> None:
        # under clipping, a grid of CLIP_THREADS threads, one partial sum each (cuda/optim.cu)
        self._launch(grads.dtype, "check_step", grads.size if clip is None else CLIP_THREADS,
                     (loss, slot, grads, np.int64(grads.size), np.int64(step), step_dev, halted,
                      clip), exact=clip is not None)
        if clip is not None:  # the partial sums into clip[0]
            self._launch(grads.dtype, "norm_groups", CLIP_GROUPS, (clip,))
            self._launch(grads.dtype, "norm_total", 1, (clip,))

    # ------------------------------------------------------------------ optimizers
    def sgd_step(self, params, grads, momentum_buf, hp, step, halted, clip=None, rate=None):
        self._sgd(params, grads, momentum_buf if hp.momentum else None,
                  self._hp_device("sgd", hp, rate), step, None, halted, clip, rate)

    def adam_step(self, params, grads, m, v, hp, step, halted, clip=None, rate=None):
        self._adam(params, grads, m, v, self._hp_device("adam", hp, rate), step, None, halted,
                   clip, rate)

    def rmsprop_step(self, params, grads, square_avg, momentum_buf, grad_avg, hp, step, halted,
                     clip=None, rate=None):
        self._rmsprop(params, grads, square_avg, momentum_buf if hp.momentum > 0 else None,
                      grad_avg if hp.centered else None, self._hp_device("rmsprop", hp, rate),
                      step, None, halted, clip, rate)

    # Each update is two launches (cuda/optim.cu): <rule>_check latches the step if a new value
    # would not be finite, then <rule>_step writes them unless halted. ``clip``: check_step's
    # array, or None. ``rates``: a schedule's row (``rate_slot`` None) or the epoch's table
    # (``rate_slot`` the device's step in the epoch), or None.
    def _sgd(self, params, grads, buf, hp_dev, step: int, step_dev, halted, clip=None,
             rates=None, rate_slot=None) -> None:
        args = (params, grads, buf, np.int64(params.size), hp_dev, clip, rates, rate_slot,
                np.int64(step), step_dev, halted)
        self._launch(params.dtype, "sgd_check", params.size, args)
        self._launch(params.dtype, "sgd_step", params.size, args)

    def _adam(self, params, grads, m, v, hp_dev, step: int, step_dev, halted, clip=None,
              rates=None, rate_slot=None) -> None:
        args = (params, grads, m, v, np.int64(params.size), hp_dev, clip, rates, rate_slot,
                np.int64(step), step_dev, halted)
        self._launch(params.dtype, "adam_check", params.size, args)
        self._launch(params.dtype, "adam_step", params.size, args)

    def _rmsprop(self, params, grads, square_avg, buf, grad_avg, hp_dev, step: int, step_dev,
                 halted, clip=None, rates=None, rate_slot=None) -> None:
        head = (params, grads, square_avg, buf, grad_avg, np.int64(params.size), hp_dev, clip,
                rates, rate_slot)
        self._launch(params.dtype, "rmsprop_check", params.size,
                     (*head, np.int64(step), step_dev, halted))
        self._launch(params.dtype, "rmsprop_step", params.size, (*head, halted))

    def _hp_device(self, kernel: str, hp, rate=None) -> Any:
        """The hyper-parameters as a device vector, uploaded once per distinct set of values.
        With a schedule's ``rate`` (which the kernels read instead), the learning rate and
        momentum are left out of the key: a new rate each step uploads nothing."""
        values = hp_values(kernel, hp, scheduled=rate is not None)
        buf = self._hp_cache.get(values)
        if buf is None:
            if len(self._hp_cache) > 64:  # a callback that changes lr every epoch
                self._hp_cache.clear()
            buf = self._hp_cache[values] = cupy.asarray(np.array(values, np.float64))
        return buf

    # ------------------------------------------------------------------ data-parallel
    def weigh_grads(self, grads, loss, weight: float) -> None:
        """``grads *= weight`` before a gradient all-reduce, NaN when ``loss[0]`` is not
        finite, zeros when ``weight`` is 0 (cuda/optim.cu): one launch, no host wait."""
        self._launch(grads.dtype, "weigh_grads", grads.size,
                     (grads, np.int64(grads.size), loss, np.float64(weight)))

    def stream_ptr(self) -> int:
        """The stream this backend's kernels are queued on now, for NCCL calls to join."""
        return cupy.cuda.get_current_stream().ptr

    # ------------------------------------------------------------------ benchmark
    def gemm_floor_seconds(self, sizes, batch_rows, dtype, repeats: int) -> list[float]:
        """Seconds of each of ``repeats`` epochs of the matrix products alone (forward, dW and
        dX of every step, batches of ``batch_rows`` rows, layer widths ``sizes``; in bf16 on
        inputs rounded ahead), by cuBLAS into preallocated buffers with this backend's TF32
        setting, timed by CUDA events. The epoch is captured once as a graph and replayed, so
        host launch overhead is excluded: no training epoch can be faster."""
        rng = np.random.default_rng(0)
        bf16 = str(dtype) in BF16_NAMES
        # bf16: bfloat16 bits rounded ahead (the products alone), float32 results apart
        dtype = np.dtype(np.float32 if bf16 else dtype)

        def inputs(shape, scale=1.0):
            values = (rng.standard_normal(shape) * scale).astype(dtype)
            return cupy.asarray(to_bf16_bits(values) if bf16 else values)

        def product(a, trans_a, b, trans_b, out) -> None:
            if bf16:
                gemm_bf16(a, trans_a, b, trans_b, out)
            else:
                self._matmul(a.T if trans_a else a, b.T if trans_b else b, out)

        Ws = [inputs((i, o), 0.05) for i, o in zip(sizes[:-1], sizes[1:])]
        plans = {}
        for rows in set(batch_rows):
            acts = [inputs((rows, w)) for w in sizes]
            grads = [inputs((rows, w)) for w in sizes]
            outs = [cupy.empty((rows, w), dtype) for w in sizes] if bf16 else None
            plans[rows] = (acts, grads, [cupy.empty(W.shape, dtype) for W in Ws],
                           outs or acts, outs or grads)

        def epoch() -> None:
            for acts, grads, dWs, acts_out, grads_out in (plans[r] for r in batch_rows):
                for layer, W in enumerate(Ws):
                    product(acts[layer], False, W, False, acts_out[layer + 1])
                for layer in reversed(range(len(Ws))):
                    product(acts[layer], True, grads[layer + 1], False, dWs[layer])
                    if layer:
                        product(grads[layer + 1], False, Ws[layer], True, grads_out[layer])

        stream = cupy.cuda.Stream(non_blocking=True)
        stream.wait_event(cupy.cuda.get_current_stream().record())
        with stream:
            epoch()  # cuBLAS's handle and its choice of algorithms, outside the capture
            with self.capture_lock:
                stream.begin_capture()
                try:
                    epoch()
                finally:
                    graph = stream.end_capture()
            graph.launch(stream)
            times = []
            for _ in range(repeats):
                start, end = cupy.cuda.Event(), cupy.cuda.Event()
                start.record(stream)
                graph.launch(stream)
                end.record(stream)
                end.synchronize()
                times.append(cupy.cuda.get_elapsed_time(start, end) / 1e3)
        return times

    # ------------------------------------------------------------------ whole epochs
    def train_epoch(self, plan: EpochPlan) -> bool:
        if not self.graphs or plan.optimizer not in OPTIMIZER_RULES or not replayable(plan):
            return False
        runner = plan.cache.get("cupy-graphs")
        if runner is None or runner.key != plan_key(plan):
            runner = plan.cache["cupy-graphs"] = GraphRunner(self, plan)
        runner.run(plan)
        return True
