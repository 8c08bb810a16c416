"""Checkpoint files: one portable, pickle-free file (a NumPy .npz archive) holding the architecture,
dtype, weights, optimizer configuration, state and step count, and the epochs trained.

Saving writes a temporary file beside the target and renames it over the target only once it
is complete, so a failed or interrupted save never replaces a good checkpoint; and it refuses
weights that loading would refuse (NaN or inf), before touching any file.

This module is the file format only: what goes in it is ``MLP.state()``, and
``bpkernels.load`` rebuilds the model with ``MLP.from_state(*read(path))``.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "bpkernels-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is truncated, corrupt, foreign or inconsistent."""


def save(model, path: str | os.PathLike) -> None:
    """Write ``model`` (an MLP) to ``path``: ``write(path, *model.state())``."""
    write(path, *model.state())


def write(path: str | os.PathLike, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Write a model's saved state (``MLP.state()``) to ``path``, atomically."""
    path = Path(path)
    _check_finite_weights(path, arrays["params"])
    meta = {"format": FORMAT, "version": VERSION, **meta}
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(f"cannot save checkpoint {path}: folder {directory} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # KeyboardInterrupt included: the old checkpoint stays, the partial one goes.
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _check_finite_weights(path: Path, params: np.ndarray) -> None:
    bad = params.size - int(np.count_nonzero(np.isfinite(params)))
    if bad:
        kept = f"{path} was left as it was" if path.exists() else "nothing was written"
        raise CheckpointError(f"cannot save checkpoint {path}: {bad} of the {params.size} weights "
                              f"are NaN or inf, which load() refuses; {kept}")


def read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The metadata and host arrays of a checkpoint, validated for completeness."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a bpkernels checkpoint (not an .npz archive: "
                              "truncated, corrupt or another format)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile) or "meta" not in archive.files:
                raise CheckpointError(f"{path} is not a bpkernels checkpoint (no metadata)")
            arrays = {name: archive[name] for name in archive.files}
        meta = json.loads(str(arrays.pop("meta")))
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not a readable bpkernels checkpoint (truncated, corrupt "
                              f"or another format): {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a bpkernels checkpoint (foreign file)")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path} is checkpoint format version {meta.get('version')}; "
                              f"this bpkernels reads version {VERSION}")
    _check_consistent(path, meta, arrays)
    return meta, arrays


def _check_consistent(path: Path, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    try:
        sizes = [int(s) for s in meta["sizes"]]
        n_params = sum(i * o + o for i, o in zip(sizes[:-1], sizes[1:]))
        params = arrays["params"]
        expected = [f"state.{n}" for n in (meta["optimizer"] or {}).get("state", [])]
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: incomplete checkpoint metadata ({err})") from None
    for name in ["params"] + expected:
        arr = arrays.get(name)
        if arr is None:
            raise CheckpointError(f"{path}: checkpoint lacks the array {name!r}")
        if arr.shape != (n_params,) or arr.dtype.name != meta["dtype"]:
            raise CheckpointError(f"{path}: array {name!r} has shape {arr.shape} and dtype "
                                  f"{arr.dtype}, expected ({n_params},) {meta['dtype']}")
    if not np.isfinite(params).all():
        raise CheckpointError(f"{path}: the weights contain NaN or inf")
