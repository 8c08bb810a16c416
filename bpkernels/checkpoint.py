"""Checkpoint files: one portable, pickle-free file (a NumPy .npz archive) holding the architecture,
dtype, weights, optimizer configuration, state and step count, and the epochs trained.

Saving goes through :mod:`bpkernels.atomic`: a temporary file beside the target, renamed over
it only once complete, so a failed, interrupted or killed save never replaces a good checkpoint;
and it refuses weights that loading would refuse (NaN or inf), before touching any file.

Reading trusts nothing in the file: every field of the metadata is checked for type and range,
every array's header (shape, dtype, size) against the metadata and the file's own size before
any array is allocated, and the values (finite weights, non-negative second moments) after.
Whatever is wrong is one :class:`CheckpointError` naming the file.

This module is the file format only: what goes in it is ``MLP.state()``, and
``bpkernels.load`` rebuilds the model with ``MLP.from_state(*read(path))``.
"""
from __future__ import annotations

import json
import os
import reprlib
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from . import atomic
from .memory import n_parameters
from .backends.base import LOSSES, PRECISIONS

FORMAT = "bpkernels-checkpoint"
VERSION = 2
# Versions read: 1 (before dropout: a file of it has no "dropout" and loads as none).
READABLE = (1, 2)
MAX_STEPS = 2 ** 53  # step counts beyond float64's exact integers are corrupt, not long runs
_MAX_META_BYTES = 1 << 20
# Deflate cannot expand data more than ~1032-fold: a member claiming more is lying about its size.
_MAX_DEFLATE_RATIO = 1100
# Everything a damaged archive, .npy header or JSON text can raise while being parsed.
_PARSE_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError,
                 KeyError, TypeError, IndexError, SyntaxError, NotImplementedError, RecursionError,
                 OverflowError, MemoryError, struct.error, zlib.error, UnicodeError,
                 RuntimeError)  # (zipfile's for a member it cannot decrypt)


class CheckpointError(ValueError):
    """A checkpoint file is truncated, corrupt, foreign or inconsistent."""


def save(model, path: str | os.PathLike) -> None:
    """Write ``model`` (an MLP) to ``path``: ``write(path, *model.state())``."""
    write(path, *model.state())


def write(path: str | os.PathLike, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Write a model's saved state (``MLP.state()``) to ``path``, atomically (a symbolic link
    is kept and the file it points to replaced)."""
    path = Path(path)
    _check_finite_weights(path, arrays)
    meta = {"format": FORMAT, "version": VERSION, **meta}
    text = np.array(json.dumps(meta))
    atomic.write(path, lambda f: np.savez(f, meta=text, **arrays), what="checkpoint")


def check_writable(path: str | os.PathLike) -> None:
    """Fail now where a checkpoint could not be saved to ``path`` (see atomic.check_writable)."""
    atomic.check_writable(path, what="checkpoint")


def _check_finite_weights(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Refuse to save what load() would refuse (the one test of values, _value_problem)."""
    problem = _value_problem(arrays)
    if problem:
        kept = f"{path} was left as it was" if path.exists() else "nothing was written"
        raise CheckpointError(f"cannot save checkpoint {path}: {problem}, which load() refuses; "
                              f"{kept}")


def read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The metadata and host arrays of a checkpoint, every field validated."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:  # an unreadable file is its own error, not a corrupt one
        size = os.fstat(f.fileno()).st_size
        try:
            with zipfile.ZipFile(f) as archive:
                members = {info.filename[:-4]: info for info in archive.infolist()
                           if info.filename.endswith(".npy")}
                if "meta" not in members:
                    raise CheckpointError(f"{path} is not a bpkernels checkpoint (no metadata)")
                meta = _read_meta(path, archive, members["meta"], size)
                shape, dtype, names = _check_meta(path, meta)
                unexpected = sorted(set(members) - {"meta", *names})
                if unexpected:
                    raise CheckpointError(f"{path}: checkpoint holds unexpected arrays "
                                          f"{', '.join(map(repr, unexpected))}")
                for name in names:
                    if name not in members:
                        raise CheckpointError(f"{path}: checkpoint lacks the array {name!r}")
                for name in names:  # every header and size before any array is allocated
                    _check_header(path, archive, members[name], size, shape, dtype, meta)
                _check_memory(path, meta, shape[0] * dtype.itemsize * len(names))
                arrays = {name: _read_array(path, archive, members[name], dtype)
                          for name in names}
        except CheckpointError:
            raise
        except _PARSE_ERRORS as err:
            raise CheckpointError(f"{path} is not a readable bpkernels checkpoint (truncated, "
                                  f"corrupt or another format): {_why(err)}") from None
    _check_values(path, arrays)
    return meta, arrays


# ---------------------------------------------------------------------------- metadata
def _read_meta(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, size: int) -> dict:
    if info.file_size > _MAX_META_BYTES:
        raise CheckpointError(f"{path}: checkpoint metadata of {info.file_size} bytes "
                              f"(at most {_MAX_META_BYTES}); not a bpkernels checkpoint")
    _check_member(path, info, size)
    with archive.open(info) as f:
        shape, dtype, data = _header(path, f, info)
    if shape != () or dtype.kind != "U" or data != dtype.itemsize:
        raise CheckpointError(f"{path} is not a bpkernels checkpoint (metadata is not text)")
    meta = json.loads(_read_array(path, archive, info, dtype).item())
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a bpkernels checkpoint (foreign file)")
    if meta.get("version") not in READABLE:
        raise CheckpointError(f"{path} is checkpoint format version {_show(meta.get('version'))}; "
                              f"this bpkernels reads versions "
                              f"{', '.join(map(str, READABLE))}")
    if meta["version"] == 1 and "dropout" in meta:
        raise CheckpointError(f"{path}: a version 1 checkpoint has no field 'dropout'")
    return meta


def _check_meta(path: Path, meta: dict) -> tuple[tuple[int], np.dtype, list[str]]:
    """Every field's type and range; returns the arrays' shape and dtype and the arrays' names."""
    from .activations import hidden_activations
    from .optim import optimizer_from_config

    def bad(field: str, allowed: str) -> CheckpointError:
        return CheckpointError(f"{path}: checkpoint field {field!r} is "
                               f"{_show(meta.get(field, ...))}; expected {allowed}")

    sizes = meta.get("sizes")
    if not isinstance(sizes, list) or len(sizes) < 2 or \
            not all(_is_int(s) and s >= 1 for s in sizes):
        raise bad("sizes", "a list of at least 2 positive integer layer widths")
    activations = meta.get("activations")
    if not isinstance(activations, list) or not all(isinstance(a, str) for a in activations):
        raise bad("activations", "a list of activation names")
    try:
        hidden_activations(activations, len(sizes) - 2)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: checkpoint field 'activations': {err}") from None
    if meta.get("dtype") not in PRECISIONS:
        raise bad("dtype", " or ".join(map(repr, PRECISIONS)))
    if not (_is_int(meta.get("seed")) and meta["seed"] >= 0):
        raise bad("seed", "a non-negative integer")
    if not isinstance(meta.get("backend"), str):
        raise bad("backend", "a backend name")
    if meta.get("norm") not in (None, "layer"):
        raise bad("norm", "absent, null or \"layer\"")
    if meta["version"] == 1 and "norm" in meta:
        raise CheckpointError(f"{path}: a version 1 checkpoint has no field 'norm'")
    dropout = meta.get("dropout", [0.0] * (len(sizes) - 2))
    if not isinstance(dropout, list) or len(dropout) != len(sizes) - 2 or not all(
            isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p < 1
            for p in dropout):
        raise bad("dropout", f"a list of {len(sizes) - 2} probabilities in [0, 1), one per "
                             "hidden layer")
    if any(dropout) and meta["seed"] >= 2 ** 64:
        raise bad("seed", "an integer < 2**64 (the model has dropout)")
    if not (_is_int(meta.get("epochs_trained")) and meta["epochs_trained"] >= 0):
        raise bad("epochs_trained", "a non-negative integer")
    names = ["params"]
    saved = meta.get("optimizer", ...)
    if saved is not None:
        if not isinstance(saved, dict) or set(saved) != {"config", "step_count", "state"}:
            raise bad("optimizer", "null or {\"config\": ..., \"step_count\": ..., \"state\": ...}")
        config = saved["config"]
        if not isinstance(config, dict) or not isinstance(config.get("name"), str):
            raise CheckpointError(f"{path}: checkpoint optimizer config is {_show(config)}; "
                                  "expected {\"name\": ..., <hyper-parameters>}")
        try:
            optimizer = optimizer_from_config(config)
        except (ValueError, TypeError) as err:
            raise CheckpointError(f"{path}: checkpoint optimizer config {_show(config)}: "
                                  f"{err}") from None
        if optimizer.config() != config:  # a value coerced ("yes" for True) or a key missing
            raise CheckpointError(f"{path}: checkpoint optimizer config {_show(config)} is not "
                                  f"one bpkernels writes; expected {_show(optimizer.config())}")
        step = saved["step_count"]
        if not (_is_int(step) and 0 <= step <= MAX_STEPS):
            raise CheckpointError(f"{path}: checkpoint optimizer step_count is {_show(step)}; "
                                  f"expected an integer in [0, 2**53]")
        needed = sorted(optimizer.needed_states())
        if saved["state"] != needed:
            raise CheckpointError(f"{path}: checkpoint optimizer state {_show(saved['state'])} "
                                  f"does not match its config, which needs {needed}")
        names += [f"state.{n}" for n in needed]
    if meta.get("loss") not in (None, *LOSSES):
        raise bad("loss", "absent, null or one of " + ", ".join(map(repr, LOSSES)))
    _check_schedule(path, meta.get("lr_scheduler"))
    # bf16 models store float32 (their master weights and optimizer state)
    storage = np.dtype("float32" if meta["dtype"] == "bf16" else meta["dtype"])
    return (n_parameters(sizes, meta.get("norm")),), storage, names


def _check_schedule(path: Path, saved: Any) -> None:
    """The learning-rate schedule, if one was saved: a config bpkernels writes and a state
    every field of which is in range (a copy of the scheduler is loaded to see)."""
    from .lr_scheduler import scheduler_from_config
    if saved is None:
        return
    if not isinstance(saved, dict) or set(saved) != {"config", "state", "interval"}:
        raise CheckpointError(f"{path}: checkpoint field 'lr_scheduler' is {_show(saved)}; "
                              "expected null or {\"config\": ..., \"state\": ..., "
                              "\"interval\": ...}")
    if saved["interval"] not in ("epoch", "step"):
        raise CheckpointError(f"{path}: checkpoint lr_scheduler interval is "
                              f"{_show(saved['interval'])}; expected \"epoch\" or \"step\"")
    try:
        scheduler = scheduler_from_config(saved["config"])
        if scheduler.config() != saved["config"]:
            raise ValueError(f"it is not one bpkernels writes; expected "
                             f"{_show(scheduler.config())}")
        scheduler.load_state_dict(saved["state"])
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: checkpoint lr_scheduler {_show(saved['config'])}: "
                              f"{err}") from None


def _check_memory(path: Path, meta: dict, needed: int) -> None:
    """A claim no machine here could hold is refused before anything is allocated."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return
    if memory > 0 and needed > memory:
        raise CheckpointError(f"{path}: checkpoint sizes {_show(meta['sizes'])} need "
                              f"{needed / 2**30:.3g} GiB of arrays, more than this machine's "
                              f"{memory / 2**30:.3g} GiB of memory")


# ---------------------------------------------------------------------------- arrays
def _check_member(path: Path, info: zipfile.ZipInfo, size: int) -> None:
    """The archive's own sizes of a member agree with the file before it is read."""
    name = info.filename
    if info.flag_bits & 0x1:  # (zipfile would ask for a password: a RuntimeError)
        raise CheckpointError(f"{path}: corrupt checkpoint (array {name!r} is marked "
                              f"encrypted, which bpkernels never writes)")
    if info.header_offset + info.compress_size > size:
        raise CheckpointError(f"{path}: truncated checkpoint (array {name!r} ends past the end "
                              f"of the file)")
    if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size or \
            info.file_size > max(info.compress_size, 1) * _MAX_DEFLATE_RATIO:
        raise CheckpointError(f"{path}: corrupt checkpoint (array {name!r} claims "
                              f"{info.file_size} bytes from {info.compress_size} stored)")


def _check_header(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, size: int,
                  shape: tuple[int], dtype: np.dtype, meta: dict) -> None:
    name = info.filename[:-4]
    _check_member(path, info, size)
    with archive.open(info) as f:
        got_shape, got_dtype, data = _header(path, f, info)
    if got_shape != shape or got_dtype.name != dtype.name:
        raise CheckpointError(f"{path}: array {name!r} has shape {got_shape} and dtype "
                              f"{got_dtype}, but the checkpoint's sizes "
                              f"{_show(meta['sizes'])} need {shape} {dtype}")
    if data != shape[0] * dtype.itemsize:
        raise CheckpointError(f"{path}: array {name!r} holds {data} bytes of data; the "
                              f"checkpoint's sizes {_show(meta['sizes'])} need "
                              f"{shape[0] * dtype.itemsize}")


def _header(path: Path, f, info: zipfile.ZipInfo) -> tuple[tuple, np.dtype, int]:
    """A member's .npy header, (shape, dtype, bytes of data the archive says follow it), read
    without allocating what it claims."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise CheckpointError(f"{path}: array {info.filename[:-4]!r} is in .npy format "
                              f"{version}, which bpkernels never writes")
    return shape, dtype, info.file_size - f.tell()


def _read_array(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo,
                dtype: np.dtype) -> np.ndarray:
    name = info.filename[:-4]
    with archive.open(info) as f:
        array = np.lib.format.read_array(f, allow_pickle=False)
        if f.read(1):  # also makes zipfile check the CRC at the end of the data
            raise CheckpointError(f"{path}: array {name!r} has trailing data")
    return array.astype(dtype.newbyteorder("="), copy=False)


def _check_values(path: Path, arrays: dict[str, np.ndarray]) -> None:
    problem = _value_problem(arrays)
    if problem:
        raise CheckpointError(f"{path}: {problem}")


def _value_problem(arrays: dict[str, np.ndarray]) -> str | None:
    """What is wrong with the saved values, or None: non-finite weights or state, negative
    running averages of squares."""
    from .optim import NONNEGATIVE_STATES
    for name, array in arrays.items():
        bad = array.size - int(np.count_nonzero(np.isfinite(array)))
        if bad:
            what = "weights ('params')" if name == "params" else \
                f"values of the optimizer state {name!r}"
            return f"{bad} of the {array.size} {what} are NaN or inf"
        if name.removeprefix("state.") in NONNEGATIVE_STATES and (array < 0).any():
            return (f"the optimizer state {name!r} holds negative values (a running average of "
                    f"squares is never negative)")
    return None


# ---------------------------------------------------------------------------- helpers
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = _repr.maxlong = 60


def _show(value: Any) -> str:
    """A value from the file, bounded in length and depth (it may be crafted)."""
    return "missing" if value is ... else _repr.repr(value)


def _why(err: BaseException) -> str:
    text = str(err)
    if isinstance(err, RecursionError):
        text = "structure nested too deeply"
    elif isinstance(err, MemoryError):
        text = "it claims more memory than there is"
    return (text[:200] + "...") if len(text) > 200 else (text or type(err).__name__)
