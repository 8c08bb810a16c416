"""Arrays from anywhere: how the model, fit() and set_weights read arrays of other libraries.

Inputs are recognised by protocol, never by importing their library (no torch, CuPy or JAX
import here), in this order:

- a NumPy array;
- anything with ``__dlpack__`` and ``__dlpack_device__``: it lives where its DLPack device says
  (CPU or pinned host memory: the host; CUDA or CUDA managed memory: the GPU);
- anything with ``__cuda_array_interface__``: the GPU (CuPy arrays, PyTorch CUDA tensors, JAX
  arrays on a GPU, Numba device arrays);
- anything else (``__array__``, ``__array_interface__``, the buffer protocol, nested lists):
  the host, read by ``np.asarray``.

The rules:

1. Data already in the model's memory is used in place, without a copy: host data on a CPU
   backend ("numpy", "numba"; a host DLPack object becomes a NumPy view by ``np.from_dlpack``),
   CUDA data on the "cupy" backend (``CupyBackend.from_device``: a CuPy array on the same
   memory). Host data given to a GPU backend is copied to the device, as it always was.
2. A device-to-host copy never happens behind your back: CUDA data given to a model on a CPU
   backend is refused with a ValueError that says to move the model (``model.to("cupy")``) or to
   copy the data to the host yourself.
3. Features (``X``, and the ``W``, ``b`` of set_weights) are used as a C-contiguous array of
   the model's dtype. An input that is one already is used as it is; any other (another float
   or int dtype, bool, a transposed or strided view) is converted once, on its own device, to a
   new C-contiguous array of the model's dtype. A value the conversion makes infinite (1e300
   into float32) is refused like a NaN. set_weights takes float arrays only.
4. Inputs are never written to, so read-only arrays (memory maps, ``np.broadcast_to``,
   read-only DLPack exports) are used in place like any other.
5. Targets are prepared on the host: class labels become int64, target rows the model's dtype.
   Targets on the GPU are read back for that (a cupy-backend model only; a CPU backend refuses
   them by rule 2): their checks (integer ids in range, [0, 1] for binary_cross_entropy) need
   reductions the kernel contract lacks, and they are one value per row where X has many.
6. forward and predict answer NumPy arrays for host inputs and the backend's device arrays for
   device inputs (CuPy arrays on the cupy backend); predict of a device input reads the outputs
   back for the argmax (the contract has no argmax kernel) and sends the class ids to the
   device. evaluate answers host numbers, loss_and_grads host numbers and NumPy arrays.
7. Every input is checked whatever its kind: numbers only, shapes, finite values (the first bad
   index is named). A device array is checked on the device, by the backend's ``check_step``
   kernel (one reduction) and one scalar read; only an array that fails is read back, to name
   the index.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .backends.base import Backend
from .backends.numpy_backend import HostMemory
from .validation import check_feature_shape, check_numeric, check_number_kind

# What the public API takes where it reads an array: anything the rules above accept. An alias of
# Any (no static type spans NumPy, DLPack and CUDA array interface objects), named for readers.
ArrayLike = Any

HOST, CUDA = "host", "cuda"
# DLPack's DLDeviceType codes (dlpack.h): which of them NumPy can read, which are CUDA's.
_DLPACK_HOST = {1: "cpu", 3: "cuda_host", 11: "rocm_host"}
_DLPACK_CUDA = {2: "cuda", 13: "cuda_managed"}
_DLPACK_OTHER = {4: "opencl", 7: "vulkan", 8: "metal", 9: "vpi", 10: "rocm", 12: "ext_dev",
                 14: "oneapi", 15: "webgpu", 16: "hexagon", 17: "maia"}


@dataclass(frozen=True)
class Array:
    """An input, checked and in the form the model computes on."""

    data: Any        # a C-contiguous array of the model's dtype: NumPy, or the backend's own
    resident: bool   # ``data`` is in the backend's memory: its kernels read it as it is
    device: bool     # it was given as a device array: results go back as device arrays

    @property
    def rows(self) -> int:
        return int(self.data.shape[0])


def host_backend(backend: Backend) -> bool:
    """Whether the backend's arrays are NumPy arrays in host memory (numpy, numba)."""
    return isinstance(backend, HostMemory)


# ------------------------------------------------------------------------------ where it lives
def _has(obj: Any, attribute: str) -> bool:
    """hasattr that counts an attribute which exists but raises (a torch CUDA tensor that
    requires grad raises RuntimeError for its array interface) as present: the conversion
    then reports the library's own reason."""
    try:
        getattr(obj, attribute)
    except AttributeError:
        return False
    except Exception:
        return True
    return True


def locate(obj: Any) -> tuple[str, int | None]:
    """``(where, device id)``: ``"host"``, ``"cuda"`` or another device's DLPack name."""
    if isinstance(obj, np.ndarray):
        return HOST, None
    if _has(obj, "__dlpack_device__") and _has(obj, "__dlpack__"):
        try:
            kind, index = obj.__dlpack_device__()
            kind, index = int(kind), int(index)
        except Exception as err:
            raise TypeError(f"cannot tell where a {describe(obj)} lives: its __dlpack_device__() "
                            f"failed: {err}") from None
        if kind in _DLPACK_HOST:
            return HOST, None
        if kind in _DLPACK_CUDA:
            return CUDA, index
        return _DLPACK_OTHER.get(kind, f"DLPack device type {kind}"), index
    if _has(obj, "__cuda_array_interface__"):
        return CUDA, None
    return HOST, None


def describe(obj: Any) -> str:
    """``torch.Tensor of shape (4, 3)``: the library and class, for messages."""
    cls = type(obj)
    name = f"{cls.__module__.split('.')[0]}.{cls.__qualname__}"
    shape = getattr(obj, "shape", None)
    try:
        return f"{name} of shape {tuple(int(s) for s in shape)}" if shape is not None else name
    except (TypeError, ValueError):
        return name


def _place(where: str, index: int | None) -> str:
    return where if index is None else f"{where}:{index}"


# ------------------------------------------------------------------------------ reading
def as_host(obj: Any, name: str) -> np.ndarray:
    """A host object as a NumPy array of numbers, a view of its memory where NumPy can."""
    if isinstance(obj, np.ndarray):
        arr = obj
    elif _has(obj, "__dlpack__") and _has(obj, "__dlpack_device__"):
        try:
            arr = np.from_dlpack(obj)
        except Exception as err:  # e.g. bfloat16, which NumPy has no dtype for
            raise TypeError(f"{name} ({describe(obj)}) cannot be read through DLPack: {err}; "
                            "convert it to a NumPy-readable dtype first") from None
    else:
        try:
            arr = np.asarray(obj)
        except Exception as err:
            raise TypeError(f"{name} must be an array of numbers, got {describe(obj)}: {err}") \
                from None
    return check_numeric(arr, name)


def adopt(obj: Any, backend: Backend, name: str) -> Any:
    """A device object as the backend's own array on the same memory, or a ValueError that says
    why it cannot be used where it is and what to do."""
    where, index = locate(obj)
    from_device = getattr(backend, "from_device", None)
    if where != CUDA or from_device is None:
        place = _place(where, index)
        if host_backend(backend):
            todo = ("move the model to the GPU with model.to('cupy'), or copy " if where == CUDA
                    else "copy ")
            raise ValueError(
                f"{name} is a {describe(obj)} on {place}, but the model runs on the "
                f"{backend.name!r} backend in host memory, and bpkernels never copies device data "
                f"to the host behind your back: {todo}{name} to the host yourself (e.g. "
                "tensor.cpu(), cupy.asnumpy(a), np.asarray(jax_array))")
        takes = "host and CUDA arrays" if from_device is not None else "host arrays"
        raise ValueError(f"{name} is a {describe(obj)} on {place}; the {backend.name!r} "
                         f"backend takes {takes}: copy {name} to the host yourself")
    try:
        return from_device(obj)
    except ValueError:
        raise
    except Exception as err:  # e.g. a torch tensor that requires grad: detach() it
        raise TypeError(f"{name} ({describe(obj)} on {_place(where, index)}) cannot be used in "
                        f"place by the {backend.name!r} backend: {err}") from None


# ------------------------------------------------------------------------------ conversions
def _first_bad(arr: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])


def _not_finite(converted: np.ndarray, original: np.ndarray, name: str, message: str) -> ValueError:
    """The error for the first non-finite element of ``converted`` (host copies)."""
    bad = _first_bad(converted)
    index = bad[0] if len(bad) == 1 else list(bad)
    value = original[bad]
    if original.dtype.kind == "f" and not np.isfinite(value):
        return ValueError(message.format(name=name, value=value, index=index))
    return ValueError(f"{name}[{', '.join(map(str, bad))}] = {value} overflows "
                      f"{converted.dtype}, the model's dtype; inputs must be finite in it")


def _host_cast(arr: np.ndarray, dtype: np.dtype, name: str, message: str) -> np.ndarray:
    # ascontiguousarray returns ``arr`` itself when it already is the right kind of array.
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, once
        out = np.ascontiguousarray(arr, dtype=dtype)
    if not np.isfinite(out).all():
        raise _not_finite(out, arr, name, message)
    return out


def _device_cast(dev: Any, backend: Backend, dtype: np.dtype, name: str, message: str) -> Any:
    out = dev
    if dev.dtype != dtype or not dev.flags.c_contiguous:
        out = backend.empty(tuple(dev.shape), dtype)
        backend.copy(dev, out)
    # check_step is the contract's finiteness reduction: halted[0] becomes 1 if any element of
    # its "gradient" (here the whole array) is NaN or inf. One 8-byte read, no host copy.
    halted = backend.zeros((1,), np.int64)
    flat = out.reshape(-1)
    backend.check_step(flat[0:1], flat, 1, halted)
    if int(backend.to_host(halted)[0]):
        raise _not_finite(backend.to_host(out), backend.to_host(dev), name, message)
    return out


_FINITE = "{name} contains {value} at index {index}; inputs must be finite"


def features(X: Any, backend: Backend, dtype: np.dtype, n_features: int,
             name: str = "X") -> Array:
    """``X`` (n, n_features), checked, as a C-contiguous array of ``dtype`` (rules 1-4, 7)."""
    where, _ = locate(X)
    if where == HOST:
        arr = as_host(X, name)
        check_feature_shape(arr.shape, n_features, name)
        return Array(_host_cast(arr, dtype, name, _FINITE), host_backend(backend), False)
    dev = adopt(X, backend, name)
    check_number_kind(dev.dtype, len(dev.shape), name)
    check_feature_shape(tuple(dev.shape), n_features, name)
    return Array(_device_cast(dev, backend, dtype, name, _FINITE), True, True)


def targets(y: Any, backend: Backend, name: str = "y") -> np.ndarray:
    """``y`` as a host NumPy array for losses.prepare_targets (rule 5)."""
    where, _ = locate(y)
    if where == HOST:
        return as_host(y, name)
    return backend.to_host(adopt(y, backend, name))


def parameter(value: Any, backend: Backend, dtype: np.dtype, shape: tuple[int, ...],
              name: str) -> Any:
    """A float array of ``shape`` for set_weights, checked, as the backend's array of
    ``dtype`` (rules 1-4): what ``backend.copy`` writes into the parameter buffer."""
    message = "{name} contains NaN or inf: {value} at index {index}"
    where, _ = locate(value)
    dev = as_host(value, name) if where == HOST else adopt(value, backend, name)
    check_number_kind(dev.dtype, len(dev.shape), name)
    if dev.dtype.kind != "f":
        raise TypeError(f"{name} must be a float array, got dtype {dev.dtype}")
    if tuple(dev.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(dev.shape)}")
    if where != HOST:
        return _device_cast(dev, backend, dtype, name, message)
    arr = _host_cast(dev, dtype, name, message)
    return arr if host_backend(backend) else backend.asarray(arr)
