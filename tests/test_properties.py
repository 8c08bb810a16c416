"""Property tests (Hypothesis) of the data loaders and of fit's argument checks: for any input
(random bytes, truncated files, any shape, dtype and value) the answer is either one clear
error of the documented type (ValueError or TypeError; FileNotFoundError is not in play here)
or a correct result, checked against a reference written here from the documented rules: the
file's numbers parsed by plain Python, IDX headers unpacked with struct, losses computed by
tests/reference.py in float64.

Each property runs a bounded number of examples (EXAMPLES, with no deadline) so that the whole
file stays well under a minute on a shared 2-core machine.
"""
from __future__ import annotations

import gzip
import io
import math
import operator
import struct
from decimal import Decimal, InvalidOperation

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

import bpkernels as bpk  # noqa: E402
import reference as ref  # noqa: E402
from bpkernels import datasets as ds  # noqa: E402

EXAMPLES = 150
PROPERTY = settings(max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
INT64 = (-2**63, 2**63 - 1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("properties")


def check_contract(X, y):
    """What every loader promises of a result, whatever the file held."""
    assert X.dtype == np.float64 and X.ndim == 2 and X.shape[0] >= 1 and X.flags.c_contiguous
    assert y.dtype in (np.int64, np.float64) and y.ndim in (1, 2) and y.shape[0] == X.shape[0]
    assert np.isfinite(X).all() and np.isfinite(y).all()


# ------------------------------------------------------------------------------------- CSV
def _as_float(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def _exact_int(cell: str) -> int | None:
    """The integer a label cell writes exactly (``3``, ``3.0``, ``4e0``), else None."""
    try:
        value = Decimal(cell)
    except InvalidOperation:
        return None
    return int(value) if value.is_finite() and value == value.to_integral_value() else None


def reference_csv(text: str, label: int):
    """(X, y) by the documented rules, or None where load_csv must refuse the file."""
    rows = [[c.strip() for c in line.split(",")] for line in text.splitlines()]
    rows = [r for r in rows if any(r)]
    if not rows:
        return None
    header = any(_as_float(c) is None for c in rows[0])
    body = rows[1:] if header else rows
    ncols = len(rows[0])
    if not body or any(len(r) != ncols for r in rows) or ncols < 2 or not -ncols <= label < ncols:
        return None
    col = label % ncols
    values = [[_as_float(c) for c in r] for r in body]
    if any(v is None for r in values for v in r):
        return None
    X = np.array([[v for c, v in enumerate(r) if c != col] for r in values])
    ints = [_exact_int(r[col]) for r in body]
    if all(i is not None and INT64[0] <= i <= INT64[1] for i in ints):
        y = np.array(ints, dtype=np.int64)
    else:
        y = np.array([r[col] for r in values])
    if not (np.isfinite(X).all() and np.isfinite(y).all()):
        return None
    return X, y


CELLS = st.one_of(
    st.integers(-2**70, 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(-1e25, 1e25).map(lambda v: f"{v:.17e}"),
    st.integers(-3, 3).map(lambda v: f"{v}.0"),
    st.sampled_from(["0", "-0", "1e19", "9223372036854775807", "9223372036854775808",
                     "-9223372036854775809", "2.0000000000000001", "1_000", "", "x", "nan",
                     "1e400", "0x10", "3.", ".5", "+7"]))


# Cells of a file that should load: integers (some beyond int64) and finite floats.
CLEAN_CELLS = st.one_of(st.integers(-2**65, 2**65).map(str), st.integers(0, 3).map(str),
                        st.floats(allow_nan=False, allow_infinity=False).map(repr))


@st.composite
def csv_files(draw):
    clean = draw(st.booleans())  # half the files are valid, so that results get compared
    ncols = draw(st.integers(2 if clean else 1, 4))
    cells = CLEAN_CELLS if clean else CELLS
    rows = draw(st.lists(st.lists(cells, min_size=ncols, max_size=ncols), min_size=1 if clean
                         else 0, max_size=6))
    lines = [",".join(r) for r in rows]
    if draw(st.booleans()):
        lines.insert(0, ",".join(f"c{i}" for i in range(ncols)))
    text = "\n".join(lines) + "\n"
    if not clean and draw(st.booleans()):
        text = text[:draw(st.integers(0, len(text)))]  # truncated anywhere
    return text, draw(st.integers(-ncols, ncols - 1) if clean else st.integers(-5, 4))


@PROPERTY
@given(csv_files())
def test_csv_gives_a_clear_error_or_the_numbers_written(folder, case):
    text, label = case
    path = folder / "table.csv"
    path.write_text(text, encoding="utf-8")
    expected = reference_csv(text, label)
    event("refused" if expected is None else f"loaded, labels {expected[1].dtype}")
    if expected is None:
        with pytest.raises(ValueError):
            ds.load_csv(path, label=label)
        return
    X, y = ds.load_csv(path, label=label)
    check_contract(X, y)
    assert np.array_equal(X, expected[0])
    assert y.dtype == expected[1].dtype and np.array_equal(y, expected[1])


@PROPERTY
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_csv_of_any_bytes_gives_a_clear_error_or_a_valid_result(folder, raw):
    path = folder / "bytes.csv"
    path.write_bytes(raw)
    try:
        X, y = ds.load_csv(path)
    except ValueError:
        return
    check_contract(X, y)


# ------------------------------------------------------------------------------------- NPZ
DTYPES = st.sampled_from([np.bool_, np.int8, np.uint8, np.int32, np.int64, np.uint64,
                          np.float16, np.float32, np.float64, np.complex64, "U2"])
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)


def arrays(dtype_strategy=DTYPES, shapes=SHAPES):
    return dtype_strategy.flatmap(lambda dt: hnp.arrays(dt, shapes))


NUMERIC = st.sampled_from([np.bool_, np.uint8, np.int32, np.int64, np.uint64, np.float16,
                           np.float32, np.float64])


@st.composite
def npz_pairs(draw):
    """(X, y): any two arrays, or (half the time) a pair of the documented shapes."""
    if not draw(st.booleans()):
        return draw(arrays()), draw(arrays())
    n, features = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    y_shape = draw(st.sampled_from([(n,), (n, 2)]))
    return tuple(draw(NUMERIC.flatmap(lambda dt: hnp.arrays(dt, shape, elements=_finite(dt))))
                 for shape in ((n, features), y_shape))


def _finite(dtype):
    return st.floats(allow_nan=False, allow_infinity=False, width=np.dtype(dtype).itemsize * 8) \
        if np.dtype(dtype).kind == "f" else None


def reference_npz(X: np.ndarray, y: np.ndarray):
    """(X, y) by load_npz's documented contract, or None where it must refuse them."""
    if X.dtype.kind not in "biuf" or y.dtype.kind not in "biuf" or X.ndim != 2 or \
            X.shape[0] == 0 or y.ndim not in (1, 2) or y.shape[0] != X.shape[0]:
        return None
    if y.dtype == np.uint64 and (y > INT64[1]).any():
        return None
    X = X.astype(np.float64)
    y = y.astype(np.float64) if y.dtype.kind == "f" else y.astype(np.int64)
    return (X, y) if np.isfinite(X).all() and np.isfinite(y).all() else None


def _npz_bytes(arrays: dict) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@PROPERTY
@given(npz_pairs(), st.sampled_from(["whole", "whole", "truncated", "flipped", "no y"]),
       st.data())
def test_npz_gives_a_clear_error_or_the_arrays_saved(folder, pair, damage, data):
    X, y = pair
    raw = _npz_bytes({"X": X} if damage == "no y" else {"X": X, "y": y})
    if damage == "truncated":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    elif damage == "flipped":
        at = data.draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + bytes([raw[at] ^ data.draw(st.integers(1, 255))]) + raw[at + 1:]
    path = folder / "arrays.npz"
    path.write_bytes(raw)
    expected = reference_npz(X, y) if damage == "whole" else None
    event(f"{damage}, {'refused' if expected is None else 'loaded'}")
    if damage != "flipped" and expected is None:
        with pytest.raises(ValueError):
            ds.load_npz(path)
        return
    try:
        got = ds.load_npz(path)
    except ValueError:
        assert expected is None
        return
    check_contract(*got)
    if damage == "whole":
        assert got[0].dtype == expected[0].dtype and np.array_equal(got[0], expected[0])
        assert got[1].dtype == expected[1].dtype and np.array_equal(got[1], expected[1])


def test_npz_whose_zip_claims_an_unknown_version_is_a_clear_error(tmp_path):
    """The property's find (CI, 2026-12-07): one flipped bit of the central directory's
    'version needed' field made zipfile raise NotImplementedError before np.load ran."""
    raw = bytearray(_npz_bytes({"X": np.array([], bool), "y": np.array([], bool)}))
    raw[423] ^= 64
    path = tmp_path / "arrays.npz"
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"not an \.npz archive \(zip file version"):
        ds.load_npz(path)


@PROPERTY
@given(st.sampled_from([b"", b"PK\x03\x04", b"PK\x05\x06", b"\x93NUMPY\x01\x00"]),
       st.binary(max_size=300))
def test_npz_of_any_bytes_gives_a_clear_error(folder, prefix, tail):
    path = folder / "bytes.npz"
    path.write_bytes(prefix + tail)
    try:
        got = ds.load_npz(path)
    except ValueError:
        return
    check_contract(*got)


# ------------------------------------------------------------------------------------- IDX
@st.composite
def mnist_folders(draw):
    n, rows, cols = draw(st.integers(0, 4)), draw(st.integers(0, 3)), draw(st.integers(0, 3))
    if draw(st.integers(0, 3)):  # mostly images with pixels
        n, rows, cols = max(n, 1), max(rows, 1), max(cols, 1)
    pixels = draw(st.binary(min_size=n * rows * cols, max_size=n * rows * cols))
    n_labels = draw(st.sampled_from([n] * 4 + [n + 1, max(n - 1, 0)]))
    labels = draw(st.binary(min_size=n_labels, max_size=n_labels))
    images = struct.pack(">IIII", 0x803, n, rows, cols) + pixels
    label_file = struct.pack(">II", 0x801, n_labels) + labels
    damage = draw(st.sampled_from(["none"] * 5 + ["cut", "extra", "magic", "garbage"]))
    which = draw(st.sampled_from(["images", "labels"]))
    files = {"images": images, "labels": label_file}
    raw = files[which]
    if damage == "cut":
        files[which] = raw[:draw(st.integers(0, len(raw) - 1))]
    elif damage == "extra":
        files[which] = raw + draw(st.binary(min_size=1, max_size=5))
    elif damage == "magic":
        files[which] = struct.pack(">I", draw(st.sampled_from([0x801, 0x803, 0x802, 0]))
                                   ^ (0x2 if which == "images" else 0x0)) + raw[4:]
    elif damage == "garbage":
        files[which] = draw(st.binary(max_size=40))
    gz = draw(st.booleans())
    return files, gz, (n, rows, cols, pixels, labels)


def reference_mnist(files: dict, source):
    """(X, y) unpacked here from the files as written, or None where they are not valid."""
    n, rows, cols, pixels, labels = source
    images = struct.pack(">IIII", 0x803, n, rows, cols) + pixels
    label_file = struct.pack(">II", 0x801, len(labels)) + labels
    if files != {"images": images, "labels": label_file} or n != len(labels) or \
            n * rows * cols == 0:
        return None  # damaged, mismatched counts, or no pixel at all
    X = np.array(list(pixels), dtype=np.float64).reshape(n, rows * cols) / 255.0
    return X, np.array(list(labels), dtype=np.int64)


@PROPERTY
@given(mnist_folders())
def test_mnist_gives_a_clear_error_or_the_pixels_written(tmp_path_factory, case):
    files, gz, source = case
    root = tmp_path_factory.mktemp("mnist")
    for kind, raw in files.items():
        name = f"train-{kind}-{'idx3' if kind == 'images' else 'idx1'}-ubyte"
        (root / (name + (".gz" if gz else ""))).write_bytes(gzip.compress(raw) if gz else raw)
    expected = reference_mnist(files, source)
    event("refused" if expected is None else "loaded")
    if expected is None:
        with pytest.raises(ValueError):
            ds.load_mnist(root)
        return
    X, y = ds.load_mnist(root)
    check_contract(X, y)
    assert np.array_equal(X, expected[0]) and np.array_equal(y, expected[1])


# ------------------------------------------------------------------------------ fit's checks
LOSSES = ("cross_entropy", "binary_cross_entropy", "mse")
COUNTS = st.one_of(st.integers(-1, 3), st.integers(1, 3).map(np.int64),
                   st.integers(0, 3).map(np.int32), st.sampled_from([True, 2.0, None, "2"]))
RATES = st.one_of(st.floats(-1, 10),
                  st.floats(0, 1).map(np.float32), st.integers(0, 2).map(np.int64),
                  st.sampled_from([0.0, 0, True, np.True_, None, "0.1", float("nan")]))
X_DTYPES = st.sampled_from([np.float64, np.float32, np.int64, np.uint8, np.bool_, "U1"])
Y_DTYPES = st.sampled_from([np.int64, np.int32, np.uint64, np.float64, np.float32, np.bool_,
                            "U1"])
SPECIAL = {  # values drawn besides small ones: huge, non-finite, beyond int64, overflowing float32
    "f8": [0.5, 1.0, np.nan, np.inf, -np.inf, 1e39, 2.0**63, 1e19, -1e300],
    "f4": [0.5, 1.0, np.nan, np.inf, 3e38], "i8": [2**62, -2**63], "i4": [2**31 - 1],
    "u8": [2**64 - 1, 2**63], "u1": [255]}


def _elements(dtype):
    dtype = np.dtype(dtype)
    special = SPECIAL.get(dtype.str[1:])
    if special is None:
        return None  # bool and text: any value
    small = st.floats(-3, 3, width=dtype.itemsize * 8) if dtype.kind == "f" else \
        st.integers(0 if dtype.kind == "u" else -1, 3)
    return st.one_of(small, st.sampled_from(special))


def any_array(dtypes, shape):
    return dtypes.flatmap(lambda dt: hnp.arrays(dt, shape, elements=_elements(dt)))


def _count_problem(value, low: int):
    if isinstance(value, (bool, np.bool_)):
        return TypeError
    try:
        value = operator.index(value)
    except TypeError:
        return TypeError
    return ValueError if value < low else None


def _rate_problem(value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        return TypeError
    return ValueError if not (math.isfinite(value) and value >= 0) else None


def _cast(a, dtype):
    with np.errstate(over="ignore", invalid="ignore"):
        return a.astype(dtype)


def fit_problems(X, y, loss, sizes, dtype, hp) -> tuple[set, np.ndarray | None]:
    """The exception types fit's documented checks call for (none: a valid call; any one of
    them where several things are wrong), and the targets as the kernels would get them."""
    problems = {p for p in (_count_problem(hp["epochs"], 0), _count_problem(hp["batch_size"], 1),
                            _count_problem(hp["seed"], 0), _rate_problem(hp["lr"])) if p}
    outputs, n = sizes[-1], X.shape[0] if X.ndim else 0
    if X.dtype.kind not in "biuf":
        problems.add(TypeError)
    elif X.ndim != 2 or n == 0 or X.shape[1] != sizes[0] or not np.isfinite(_cast(X, dtype)).all():
        problems.add(ValueError)
    if y.dtype.kind not in "biuf":
        return problems | {TypeError}, None
    if y.ndim == 0 or y.shape[0] != n or not np.isfinite(y.astype(np.float64)).all():
        return problems | {ValueError}, None
    T = None
    if loss == "cross_entropy" and y.ndim == 1:
        ok = outputs >= 2 and all(float(v).is_integer() and 0 <= v < outputs for v in y.tolist())
        T = y.astype(np.int64) if ok else None
    elif not (loss == "cross_entropy" and outputs < 2):
        shaped = y.reshape(-1, 1) if y.ndim == 1 and outputs == 1 else y
        if shaped.shape == (n, outputs) and (loss != "binary_cross_entropy" or (
                (shaped >= 0) & (shaped <= 1)).all()):
            T = _cast(shaped, dtype)
            T = T if np.isfinite(T).all() else None
    return (problems if T is not None else problems | {ValueError}), T


VALID_COUNT = st.one_of(st.integers(1, 3), st.integers(1, 3).map(np.int64))
VALID_RATE = st.one_of(st.sampled_from([0.0, 0]), st.floats(0, 0.5), st.floats(0, 0.5).map(
    np.float32), st.just(np.int32(0)))


def _valid_targets(loss: str, n: int, outputs: int):
    if loss == "cross_entropy":
        return st.one_of(hnp.arrays(st.sampled_from([np.int64, np.int32, np.uint64]), (n,),
                                    elements=st.integers(0, max(outputs - 1, 0))),
                         hnp.arrays(np.float64, (n,), elements=st.integers(
                             0, max(outputs - 1, 0)).map(float)),
                         hnp.arrays(np.float32, (n, outputs), elements=st.floats(0, 1, width=32)))
    low, high = (0, 1) if loss == "binary_cross_entropy" else (-3, 3)
    shapes = [(n, outputs)] + ([(n,)] if outputs == 1 else [])
    return st.sampled_from(shapes).flatmap(lambda shape: st.one_of(
        hnp.arrays(st.sampled_from([np.float64, np.float32]), shape,
                   elements=st.floats(low, high, width=32)),
        hnp.arrays(np.int64, shape, elements=st.integers(low, high)),
        hnp.arrays(np.bool_, shape)))


@st.composite
def fit_calls(draw):
    """A valid call half the time (a few of those diverge or fail on one detail), else
    anything: shapes, dtypes (text too), values (NaN, inf, beyond int64, overflowing float32)
    and hyper-parameters (bools, floats for counts, strings, None, NumPy scalars)."""
    sizes = [draw(st.integers(1, 3)), 3, draw(st.integers(1, 3))]
    loss, dtype = draw(st.sampled_from(LOSSES)), draw(st.sampled_from(["float32", "float64"]))
    clean = draw(st.booleans())
    n = draw(st.integers(1 if clean else 0, 5))
    if clean:
        X = draw(hnp.arrays(st.sampled_from([np.float64, np.float32, np.int64]), (n, sizes[0]),
                            elements=st.integers(-3, 3)))
        y = draw(_valid_targets(loss, n, sizes[-1]))
        counts, rates = VALID_COUNT, VALID_RATE
    else:
        X_shape = draw(st.sampled_from([(n, sizes[0]), (n, sizes[0]), (n, sizes[0] + 1), (n,),
                                        ()]))
        y_shape = draw(st.sampled_from([(n,), (n,), (n, sizes[-1]), (n + 1,), (n, 1), ()]))
        X, y = draw(any_array(X_DTYPES, X_shape)), draw(any_array(Y_DTYPES, y_shape))
        counts, rates = COUNTS, RATES
    hp = {"epochs": draw(counts), "batch_size": draw(counts), "seed": draw(counts),
          "lr": draw(rates)}
    return X, y, loss, sizes, dtype, hp


@PROPERTY
@given(fit_calls())
def test_fit_gives_a_clear_error_or_trains_on_the_data_as_documented(call):
    X, y, loss, sizes, dtype, hp = call
    problems, T = fit_problems(X, y, loss, sizes, np.dtype(dtype), hp)
    event(f"{', '.join(sorted(p.__name__ for p in problems))} expected" if problems else "valid")
    model = bpk.MLP(sizes, dtype=dtype, seed=1)
    before = model.get_weights()
    try:
        optimizer = bpk.SGD(lr=hp["lr"])
        history = bpk.fit(model, X, y, loss=loss, optimizer=optimizer, epochs=hp["epochs"],
                          batch_size=hp["batch_size"], seed=hp["seed"])
    except (ValueError, TypeError) as err:
        assert problems, f"a valid call refused: {type(err).__name__}: {err}"
        assert len(problems) > 1 or isinstance(err, problems.pop()), f"{type(err).__name__}: {err}"
        assert model.epochs_trained == 0  # refused before training: nothing changed
        for (W, b), (W0, b0) in zip(model.get_weights(), before):
            assert np.array_equal(W, W0) and np.array_equal(b, b0)
        return
    except bpk.TrainingDiverged:
        assert not problems
        return
    assert not problems, f"{problems} expected, but fit trained"
    assert len(history) == operator.index(hp["epochs"])
    # the data taken as documented: the loss of the final weights, by the float64 reference
    weights = [(ref.f64(W), ref.f64(b)) for W, b in model.get_weights()]
    layers = ref.mlp_forward(weights, _cast(X, np.dtype(dtype)), ["relu", "identity"])
    expected = ref.loss(loss, layers[-1][1], T)[0]
    largest = max([abs(expected)] + [float(np.abs(Z).max()) for Z, _ in layers])
    if largest > (1e30 if dtype == "float32" else 1e300):
        return  # the model's own dtype overflows on the way (after a wild step): no reference
    rel = 1e-4 if dtype == "float32" else 1e-9
    got = model.evaluate(X, y, loss)["loss"]
    assert math.isclose(got, expected, rel_tol=rel, abs_tol=rel)
    if hp["epochs"] and float(hp["lr"]) == 0.0:  # the weights never moved: the epoch saw these
        assert math.isclose(history["loss"][0], expected, rel_tol=rel, abs_tol=rel)
