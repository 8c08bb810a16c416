"""Data sets for bpkernels: scikit-learn's digits, seeded synthetic sets, and files.

Every loader returns ``(X, y)``: ``X`` a C-contiguous float64 array of shape
(n, features); ``y`` int64 class ids for classification, or float64 targets
for regression (1-D for one target, (n, targets) for several).

Loaders check what they read and fail with one exception whose message names
the path and what was wrong: FileNotFoundError for a missing file or folder,
ValueError for anything unreadable, inconsistent or out of range.  Only numpy
is required; scikit-learn is imported by :func:`load_digits` alone.
"""
from __future__ import annotations

import csv
import gzip
import math
import os
import struct
import zipfile
import zlib
from decimal import Decimal, InvalidOperation
from pathlib import Path

import numpy as np

from . import memory
from .backends import host
from .validation import check_real, shown

PathLike = str | os.PathLike

SPEC_NAMES = ("digits", "synthetic", "synthetic-classification", "synthetic-regression")
_MNIST_PREFIX = {"train": "train", "test": "t10k"}
_IDX_MAGIC = {"images": (0x00000803, 3), "labels": (0x00000801, 1)}
Arrays = tuple[np.ndarray, np.ndarray]


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    # bool is an int subclass, but n_classes=True is always a caller's mistake
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be an integer {allowed}, got {shown(value)}")
    return int(value)


def _check_noise(noise: float) -> float:
    return check_real(noise, "noise", 0.0)


def _as_2d(X, name: str) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (n, features), got shape {X.shape}")
    if X.shape[0] == 0:
        raise ValueError(f"{name}: expected at least 1 row, got 0")
    return np.ascontiguousarray(X)


def _finish(X, y, source: str) -> Arrays:
    """Check shapes and normalise dtypes, so every loader keeps the same contract."""
    X, y = np.asarray(X), np.asarray(y)
    if X.dtype.kind not in "biuf":
        raise ValueError(f"{source}: X must be numeric, got dtype {X.dtype}")
    X = _as_2d(X, source)
    n = X.shape[0]
    if y.ndim not in (1, 2) or y.shape[0] != n:
        raise ValueError(f"{source}: expected y of shape ({n},) or ({n}, targets), got {y.shape}")
    if y.dtype.kind not in "biuf":
        raise ValueError(f"{source}: y must hold integer class ids or float targets, got {y.dtype}")
    y = np.ascontiguousarray(y, dtype=np.float64) if y.dtype.kind == "f" else \
        _class_ids(y, source)
    for name, a in (("X", X), ("y", y)):  # NaN or inf would silently poison every gradient
        bad = np.flatnonzero(~np.isfinite(a).reshape(n, -1).all(axis=1))
        if bad.size:
            raise ValueError(f"{source}: {name} has NaN or inf values (first in row {bad[0]})")
    return X, y


def _class_ids(y: np.ndarray, source: str) -> np.ndarray:
    """Integer labels as int64, refusing (never wrapping) uint64 values above 2**63 - 1."""
    if y.dtype == np.uint64 and y.size:
        big = y > np.iinfo(np.int64).max
        if big.any():
            row = int(np.argmax(big.reshape(len(y), -1).any(axis=1)))
            raise ValueError(f"{source}: y row {row} holds {int(y.reshape(len(y), -1)[row].max())}"
                             f", which no int64 class id holds (at most 2**63 - 1); store "
                             f"regression targets as floats")
    return np.ascontiguousarray(y, dtype=np.int64)


def _existing_file(path: PathLike) -> Path:
    p = Path(path)
    if not p.is_file():
        hint = " (it is a folder)" if p.is_dir() else ""
        raise FileNotFoundError(f"no such file: {p}{hint}")
    return p


def load_digits() -> Arrays:
    """scikit-learn's bundled 8x8 digits: 1797 x 64 pixels (0..16), labels 0..9."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] != "sklearn":
            raise ImportError(f"the digits data set needs scikit-learn, which is installed but "
                              f"failed to import: {err}") from None
        raise ImportError('the digits data set needs scikit-learn: '
                          'pip install "bpkernels[sklearn]"') from None
    except (ImportError, OSError, MemoryError) as err:
        # Installed but broken or starved (a library that cannot be mapped under a low
        # ``ulimit -v``): say what failed, not that it is missing.
        failed = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        if isinstance(err, MemoryError):
            raise MemoryError("importing scikit-learn for the digits data set ran out of "
                              "memory") from None
        raise ImportError(f"the digits data set needs scikit-learn, which is installed but "
                          f"failed to import: {failed}") from None
    bunch = sk_load_digits()
    return _finish(bunch.data, bunch.target, "digits")


def make_classification(n_samples: int = 1000, n_features: int = 20, n_classes: int = 2, *,
                        informative: int | None = None, noise: float = 0.1,
                        seed: int = 0) -> Arrays:
    """Seeded synthetic classification.

    Each class is a mixture of two Gaussian blobs with N(0, 1) centres in the
    first ``informative`` features (default ``min(n_features, max(2, n_classes))``),
    so the class boundaries are not linear; the other features are N(0, 1)
    noise.  ``noise`` is the blobs' standard deviation relative to the spread
    of the centres: 0.1 is easy, 1.0 overlaps heavily.  Classes are balanced
    to within one sample.  Same arguments give the same arrays, bit for bit.
    """
    n_samples = _check_int("n_samples", n_samples, 1)
    n_features = _check_int("n_features", n_features, 1)
    n_classes = _check_int("n_classes", n_classes, 2)
    if informative is None:
        informative = min(n_features, max(2, n_classes))
    informative = _check_int("informative", informative, 1, n_features)
    noise = _check_noise(noise)
    rng = np.random.default_rng(_check_int("seed", seed, 0))
    centres = rng.standard_normal((n_classes, 2, informative))
    y = rng.permutation(np.arange(n_samples) % n_classes)
    blob = rng.integers(0, 2, n_samples)
    X = rng.standard_normal((n_samples, n_features))
    X[:, :informative] = centres[y, blob] + noise * X[:, :informative]
    return _finish(X, y, "make_classification")


def make_regression(n_samples: int = 1000, n_features: int = 20, n_targets: int = 1, *,
                    noise: float = 0.1, seed: int = 0) -> Arrays:
    """Seeded synthetic regression: y = tanh(X W + b) V + X A + noise * N(0, 1).

    X is N(0, 1); four random tanh ridges (the bias keeps them off their linear
    middle, so an MLP beats a linear fit) plus a linear part; the signal's std
    is near 1.  Weights come before X and the noise last in the random stream,
    so one seed is one function whatever ``n_samples`` or ``noise`` is.
    """
    n_samples = _check_int("n_samples", n_samples, 1)
    n_features = _check_int("n_features", n_features, 1)
    n_targets = _check_int("n_targets", n_targets, 1)
    noise = _check_noise(noise)
    rng = np.random.default_rng(_check_int("seed", seed, 0))
    W = rng.standard_normal((n_features, 4)) * (2.0 / math.sqrt(n_features))
    b = rng.standard_normal(4)
    V = rng.standard_normal((4, n_targets)) / 2.0
    A = rng.standard_normal((n_features, n_targets)) * (0.5 / math.sqrt(n_features))
    X = rng.standard_normal((n_samples, n_features))
    y = np.tanh(X @ W + b) @ V + X @ A + noise * rng.standard_normal((n_samples, n_targets))
    return _finish(X, y[:, 0] if n_targets == 1 else y, "make_regression")


# What reading a damaged zip raises: zipfile meets damaged flag bits and version fields with
# NotImplementedError ("strong encryption", "zip file version 6.4") and RuntimeError
# ("password required"), a damaged stream with zlib.error: a corrupt file all the same.
_ZIP_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error,
               NotImplementedError, RuntimeError)


def load_npz(path: PathLike) -> Arrays:
    """Arrays named ``X`` and ``y`` from an ``.npz`` archive (pickled objects refused)."""
    p = _existing_file(path)
    bad = _ZIP_ERRORS
    _check_npz_sizes(p)
    try:
        data = np.load(p, allow_pickle=False)
    except bad as err:
        # numpy's ValueError here is advice to allow pickles: wrong for a foreign file
        why = "expected a zip of .npy arrays" if type(err) is ValueError else f"{err}"
        raise ValueError(f"{p}: not an .npz archive ({why})") from None
    if not hasattr(data, "files"):
        raise ValueError(f"{p}: holds a single .npy array, expected an .npz with 'X' and 'y'")
    with data:
        missing = [k for k in ("X", "y") if k not in data.files]
        if missing:
            raise ValueError(f"{p}: no array named {' or '.join(map(repr, missing))}; "
                             f"found {sorted(data.files)}, expected 'X' and 'y'")
        try:
            X, y = data["X"], data["y"]
        except bad as err:
            raise ValueError(f"{p}: bad array in .npz ({type(err).__name__}: {err})") from None
    return _finish(X, y, str(p))


# A member that expands more than this many times over, to more than _BOMB_BYTES, is refused:
# zlib cannot pass ~1032:1, which only long runs of one byte reach; real data sets (even
# one-hot or mostly-zero ones) stay well below 100:1.
_MAX_RATIO = 200
_BOMB_BYTES = 256 * 2**20


def _check_npz_sizes(p: Path) -> None:
    """Refuse an archive before anything is decompressed, from the sizes it declares: a member
    whose .npy header claims more elements than its bytes hold, one that expands far beyond
    the file (a zip bomb), or data that cannot fit in the memory available (the members as
    stored, plus X and y converted to float64/int64). Only the few bytes of each .npy header
    are decompressed; anything unreadable is left for np.load to report."""
    try:
        archive = zipfile.ZipFile(p)
    except _ZIP_ERRORS:
        return
    parts: dict[str, int] = {}
    with archive:
        for info in archive.infolist():
            name = info.filename
            if info.file_size > _BOMB_BYTES and \
                    info.file_size > _MAX_RATIO * max(1, info.compress_size):
                raise ValueError(f"{p}: member {name} expands from {_size(info.compress_size)} "
                                 f"to {_size(info.file_size)} (over {_MAX_RATIO}:1): refused "
                                 "as a zip bomb")
            if name not in ("X.npy", "y.npy"):
                continue
            shape, dtype, header = _npy_header(archive, info)
            if shape is None or dtype.hasobject:  # pickles: np.load refuses them
                continue
            count = math.prod(shape)
            if count * dtype.itemsize != info.file_size - header:
                raise ValueError(f"{p}: {name}'s header claims shape {shape} of {dtype} "
                                 f"({_size(count * dtype.itemsize)}), but the member holds "
                                 f"{_size(info.file_size - header)} of data")
            parts[f"{name} as stored"] = count * dtype.itemsize
            parts[f"{name[0]} converted to 64 bits"] = count * 8
    memory.check(f"loading {p}", parts, host.memory_available())


def _npy_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo):
    """(shape, dtype, header bytes) of an .npy member, or (None, None, 0) where unreadable."""
    try:
        with archive.open(info) as f:
            version = np.lib.format.read_magic(f)
            # 3.0 differs from 2.0 only in the header's text encoding (utf-8, not latin-1).
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read(f, max_header_size=2**20)
            return tuple(int(n) for n in shape), np.dtype(dtype), f.tell()
    except (*_ZIP_ERRORS, TypeError):
        # left for np.load, whose caller reports every unreadable archive alike
        return None, None, 0


def _size(nbytes: int) -> str:
    return memory.size_text(nbytes)


def _read_rows(p: Path, delimiter: str) -> list[tuple[int, list[str]]]:
    # keep the file's line numbers so errors point where an editor would
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=delimiter)
            return [(reader.line_num, [c.strip() for c in row])
                    for row in reader if any(c.strip() for c in row)]
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{p}: not a readable UTF-8 CSV file ({err})") from None


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _col(c: int, names: list[str] | None) -> str:
    return f"column index {c} ({names[c]!r})" if names else f"column index {c}"


def _label_column(label: int | str, names: list[str] | None, ncols: int, p: Path) -> int:
    if isinstance(label, str):
        if names is None:
            raise ValueError(f"{p}: label={label!r} names a column, but no header row was "
                             f"found; pass header=True or a column index")
        if label not in names:
            raise ValueError(f"{p}: label={label!r} is not a column; the header has {names}")
        return names.index(label)
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) \
            or not -ncols <= label < ncols:
        raise ValueError(f"{p}: label={label!r} out of range; allowed: a column index in "
                         f"{-ncols}..{ncols - 1} or a header name")
    return int(label) % ncols


def _parse_features(p: Path, body, cols: list[int], names) -> np.ndarray:
    cells = [[row[c] for c in cols] for _, row in body]
    try:
        return np.array(cells, dtype=np.float64)
    except ValueError:
        pass  # find the offending cell, so the message can point at it
    for line, row in body:
        for c in cols:
            if not _is_number(row[c]):
                raise ValueError(f"{p}: line {line}, {_col(c, names)}: {row[c]!r} is not a number")
    return np.array([[float(v) for v in r] for r in cells])


def _parse_labels(p: Path, body, col: int, names) -> np.ndarray:
    """int64 class ids when every label is an integer int64 holds exactly (``3`` or
    ``3.0``), else float64 targets: a label such as 1e19 or 2**63 stays a float (a regression
    target; as a class id cross_entropy refuses it, naming the row), never wrapped around."""
    for line, row in body:
        if not _is_number(row[col]):
            raise ValueError(f"{p}: label {_col(col, names)} holds non-numeric value "
                             f"{row[col]!r} on line {line}; encode classes as integers 0..k-1")
    cells = [row[col] for _, row in body]
    try:
        return np.array(cells).astype(np.int64)  # exact; OverflowError beyond int64, no wrapping
    except (ValueError, OverflowError):
        pass
    y = np.array(cells).astype(np.float64)
    if not (np.isfinite(y) & (y >= -2.0**63) & (y <= 2.0**63)).all():
        return y
    # "3.0" and "5.099719603424333e+16" write integers too: Decimal reads them exactly (a float
    # would round the second, and make "2.0000000000000001" integral)
    try:
        exact = [Decimal(c) for c in cells]
    except InvalidOperation:
        return y
    if all(d == d.to_integral_value() and -2**63 <= d < 2**63 for d in exact):
        return np.array([int(d) for d in exact], dtype=np.int64)
    return y


def load_csv(path: PathLike, label: int | str = -1, *, delimiter: str = ",",
             header: bool | None = None) -> Arrays:
    """A numeric CSV; ``label`` picks the label column by index or by header name.

    ``header=None`` treats the first row as a header when any of its cells is
    not a number.  Labels that all write integers int64 holds (``3`` or ``3.0``,
    read exactly) become int64 class ids, other numbers float64 targets (never
    wrapped around); text labels are refused.
    """
    p = _existing_file(path)
    rows = _read_rows(p, delimiter)
    if not rows:
        raise ValueError(f"{p}: empty CSV, no rows")
    if header is None:
        header = not all(_is_number(c) for c in rows[0][1])
    names = rows[0][1] if header else None
    body = rows[1:] if header else rows
    if not body:
        raise ValueError(f"{p}: CSV has a header row but no data rows")
    ncols = len(rows[0][1])
    for line, row in rows:
        if len(row) != ncols:
            raise ValueError(f"{p}: ragged CSV, line {line} has {len(row)} columns, "
                             f"expected {ncols} like line {rows[0][0]}")
    if ncols < 2:
        raise ValueError(f"{p}: expected at least 2 columns (features and a label), got {ncols}")
    col = _label_column(label, names, ncols, p)
    X = _parse_features(p, body, [c for c in range(ncols) if c != col], names)
    return _finish(X, _parse_labels(p, body, col, names), str(p))


def _find_idx(root: Path, split: str, kind: str) -> Path:
    code = "idx3" if kind == "images" else "idx1"
    names = [f"{_MNIST_PREFIX[split]}-{kind}{sep}{code}-ubyte{gz}"
             for sep in ("-", ".") for gz in ("", ".gz")]
    for name in names:
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"{root}: no MNIST {split} {kind} file; looked for {', '.join(names)}")


def _read_idx(p: Path, kind: str) -> np.ndarray:
    magic, ndim = _IDX_MAGIC[kind]
    start = 4 + 4 * ndim
    gz = p.name.endswith(".gz")
    try:
        with (gzip.open(p, "rb") if gz else open(p, "rb")) as f:
            raw = f.read(start)
            if len(raw) < start:
                raise ValueError(f"{p}: {len(raw)} bytes, too short for an IDX {kind} header "
                                 f"({start})")
            got = struct.unpack_from(">I", raw)[0]
            if got != magic:
                raise ValueError(f"{p}: bad magic number 0x{got:08x}, expected 0x{magic:08x} "
                                 f"({kind})")
            dims = struct.unpack_from(f">{ndim}I", raw, 4)
            need = math.prod(dims)
            _check_idx_size(p, need, gz)
            payload = f.read(need)
            have = len(payload) + _count_rest(f)
    except (OSError, EOFError, zlib.error) as err:
        what = "corrupt or truncated gzip file" if gz else "unreadable file"
        raise ValueError(f"{p}: {what} ({err})") from None
    if have != need:
        why = "truncated" if have < need else "trailing bytes"
        raise ValueError(f"{p}: payload is {have} bytes but the header's dims {dims} "
                         f"need {need} ({why})")
    return np.frombuffer(payload, np.uint8).reshape(dims)


def _check_idx_size(p: Path, need: int, gz: bool) -> None:
    """Before the payload is read: a gzip file whose header claims far more than it could
    expand to (a gzip bomb), or pixels (plus their float64 copy) that cannot fit, are refused."""
    stored = p.stat().st_size
    if gz and need > _BOMB_BYTES and need > _MAX_RATIO * stored:
        raise ValueError(f"{p}: the IDX header claims {_size(need)} from a gzip file of "
                         f"{_size(stored)} (over {_MAX_RATIO}:1): refused")
    memory.check(f"loading {p}", {"the IDX payload": need, "its float64 copy": 8 * need},
                 host.memory_available())


def _count_rest(f) -> int:
    """Bytes left in ``f``, read in bounded chunks (only to say how many trail the payload)."""
    count = 0
    while chunk := f.read(2**20):
        count += len(chunk)
    return count


def load_mnist(folder: PathLike, split: str = "train") -> Arrays:
    """MNIST IDX files (raw or ``.gz``) from a folder; pixels scaled to [0, 1]."""
    if split not in _MNIST_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"no such MNIST folder: {root}")
    img_path, lab_path = (_find_idx(root, split, k) for k in ("images", "labels"))
    images, labels = _read_idx(img_path, "images"), _read_idx(lab_path, "labels")
    if images.size == 0:  # no image, or images of 0 pixels: nothing to train on
        raise ValueError(f"{img_path}: holds no data: {images.shape[0]} images of "
                         f"{images.shape[1]}x{images.shape[2]} pixels; the split is empty")
    if len(images) != len(labels):
        raise ValueError(f"{root}: {img_path.name} has {len(images)} images but "
                         f"{lab_path.name} has {len(labels)} labels; counts must match")
    X = images.reshape(len(images), -1).astype(np.float64) / 255.0
    return _finish(X, labels, str(root))


def load(spec: PathLike, *, label: int | str = -1, seed: int = 0) -> Arrays:
    """Resolve a data set named on a command line: a built-in name or a path.

    ``digits``; ``synthetic`` / ``synthetic-classification`` (2000 x 20, 4
    classes); ``synthetic-regression`` (2000 x 20, one target); a ``.npz`` or
    ``.csv`` file (``label`` picks the CSV label column); a folder of MNIST IDX
    files (the training split).  ``seed`` seeds the synthetic sets only.
    """
    key = spec.strip().lower() if isinstance(spec, str) else None
    if key == "digits":
        return load_digits()
    if key in ("synthetic", "synthetic-classification"):
        return make_classification(2000, 20, 4, seed=seed)
    if key == "synthetic-regression":
        return make_regression(2000, 20, seed=seed)
    p = Path(spec)
    suffix = p.suffix.lower()
    if suffix == ".npz":
        return load_npz(p)
    if suffix == ".csv":
        return load_csv(p, label=label)
    if p.is_dir():
        return load_mnist(p)
    accepted = (f"valid names are {', '.join(SPEC_NAMES)}; also accepted: a path to a "
                f".npz or .csv file, or a folder holding MNIST IDX files")
    if p.exists():
        raise ValueError(f"{p}: unsupported file type {p.suffix!r}; {accepted}")
    if "/" in str(spec) or os.sep in str(spec):
        raise FileNotFoundError(f"no such file or folder: {p}; {accepted}")
    raise ValueError(f"unknown data set {str(spec)!r}; {accepted}")


def standardize(X_train: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
    """Scale X_train and each of ``others`` by X_train's column mean and std.

    Constant columns are only centred.  The relative tolerance catches a
    constant column whose std is rounding noise rather than exactly 0.
    """
    X_train = _as_2d(X_train, "X_train")
    mean, std = X_train.mean(axis=0), X_train.std(axis=0)
    scale = np.where((std > 0) & (std > 1e-12 * np.abs(mean)), std, 1.0)
    out = [(X_train - mean) / scale]
    for i, X in enumerate(others):
        X = _as_2d(X, f"others[{i}]")
        if X.shape[1] != X_train.shape[1]:
            raise ValueError(f"others[{i}]: expected {X_train.shape[1]} columns, got {X.shape[1]}")
        out.append((X - mean) / scale)
    return tuple(out)


def _test_count(test_size, n: int) -> int:
    is_int = isinstance(test_size, (int, np.integer)) and not isinstance(test_size, bool)
    is_frac = isinstance(test_size, (float, np.floating)) and 0 < test_size < 1
    count = int(test_size) if is_int else math.ceil(test_size * n) if is_frac else 0
    if not (is_int or is_frac) or not 1 <= count <= n - 1:
        raise ValueError(f"test_size must be a fraction in (0, 1) or a count in 1..{n - 1} "
                         f"leaving both sides non-empty for {n} rows, got {shown(test_size)}")
    return count


def _stratified(y: np.ndarray, n_test: int, rng: np.random.Generator):
    if y.ndim != 1 or y.dtype.kind not in "biu":
        raise ValueError(f"stratify=True needs 1-D integer labels, got {y.dtype} {y.shape}")
    classes, counts = np.unique(y, return_counts=True)
    ideal = n_test * counts / len(y)
    take = np.floor(ideal).astype(np.int64)
    # largest remainders get the leftover test rows, so the total is exact
    order = np.argsort(-(ideal - take), kind="stable")
    take[order[: n_test - take.sum()]] += 1
    groups = [rng.permutation(np.flatnonzero(y == c)) for c in classes]
    train = np.concatenate([g[k:] for g, k in zip(groups, take)])
    test = np.concatenate([g[:k] for g, k in zip(groups, take)])
    return rng.permutation(train), rng.permutation(test)


def train_test_split(X: np.ndarray, y: np.ndarray, test_size: float | int = 0.2, *,
                     seed: int = 0, stratify: bool = False
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeded split into ``(X_train, X_test, y_train, y_test)``.

    ``stratify=True`` keeps each class's share in both sides (integer labels).
    """
    X, y = _as_2d(X, "X"), np.asarray(y)
    n = X.shape[0]
    if y.ndim == 0 or y.shape[0] != n:
        raise ValueError(f"expected y with {n} rows like X, got shape {y.shape}")
    n_test = _test_count(test_size, n)
    rng = np.random.default_rng(seed)
    if stratify:
        train, test = _stratified(y, n_test, rng)
    else:
        perm = rng.permutation(n)
        train, test = perm[n_test:], perm[:n_test]
    return X[train], X[test], y[train], y[test]
