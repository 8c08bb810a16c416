"""Tests for bpkernels.datasets: loaders, generators, preprocessing and their errors."""
import gzip
import re
import struct
import sys
import warnings

import numpy as np
import pytest

from bpkernels import datasets as ds


def _check_contract(X, y, n=None, d=None):
    assert X.dtype == np.float64 and X.ndim == 2 and X.flags.c_contiguous
    assert y.shape[0] == X.shape[0] and y.flags.c_contiguous
    if n is not None:
        assert X.shape == (n, d)


def _path_re(p):
    return re.escape(str(p))


# ------------------------------------------------------------------ digits
def test_digits_shape_dtype_labels():
    pytest.importorskip("sklearn")
    X, y = ds.load_digits()
    _check_contract(X, y, 1797, 64)
    assert y.dtype == np.int64
    assert set(np.unique(y)) == set(range(10))
    assert X.min() == 0 and X.max() == 16


def test_digits_without_sklearn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"scikit-learn.*bpkernels\[sklearn\]"):
        ds.load_digits()


# --------------------------------------------------------------- synthetic
def test_make_classification_deterministic_and_shaped():
    X1, y1 = ds.make_classification(300, 7, 3, seed=5)
    X2, y2 = ds.make_classification(300, 7, 3, seed=5)
    X3, y3 = ds.make_classification(300, 7, 3, seed=6)
    _check_contract(X1, y1, 300, 7)
    assert y1.dtype == np.int64 and y1.ndim == 1
    assert np.array_equal(X1, X2) and np.array_equal(y1, y2)
    assert not np.array_equal(X1, X3)
    assert set(np.unique(y1)) == {0, 1, 2}


def test_make_classification_balanced_and_learnable():
    X, y = ds.make_classification(601, 10, 4, seed=1)
    counts = np.bincount(y)
    assert counts.max() - counts.min() <= 1
    # 1-nearest-neighbour on held-out rows, in the 4 informative columns the
    # docstring promises: the classes must actually be separable there
    Xtr, Xte, ytr, yte = ds.train_test_split(X[:, :4], y, seed=0)
    d2 = ((Xte[:, None, :] - Xtr[None, :, :]) ** 2).sum(axis=2)
    assert (ytr[d2.argmin(axis=1)] == yte).mean() > 0.9


def test_make_classification_noise_makes_it_harder():
    def nn_acc(noise):
        X, y = ds.make_classification(400, 5, 3, noise=noise, seed=2)
        Xtr, Xte, ytr, yte = ds.train_test_split(X, y, seed=0)
        d2 = ((Xte[:, None, :] - Xtr[None, :, :]) ** 2).sum(axis=2)
        return (ytr[d2.argmin(axis=1)] == yte).mean()
    assert nn_acc(0.05) > nn_acc(2.0) + 0.2


def test_make_regression_deterministic_and_shaped():
    X1, y1 = ds.make_regression(200, 6, seed=3)
    X2, y2 = ds.make_regression(200, 6, seed=3)
    X3, y3 = ds.make_regression(200, 6, seed=4)
    _check_contract(X1, y1, 200, 6)
    assert y1.dtype == np.float64 and y1.shape == (200,)
    assert np.array_equal(X1, X2) and np.array_equal(y1, y2)
    assert not np.array_equal(y1, y3)
    X, Y = ds.make_regression(50, 4, 3, seed=0)
    assert Y.shape == (50, 3) and Y.dtype == np.float64


def test_make_regression_noise_is_additive_on_a_fixed_function():
    X0, y0 = ds.make_regression(4000, 5, noise=0.0, seed=9)
    X1, y1 = ds.make_regression(4000, 5, noise=0.5, seed=9)
    assert np.array_equal(X0, X1)
    assert y0.std() > 0.3
    assert abs((y1 - y0).std() - 0.5) < 0.03


def test_make_regression_is_not_linear():
    X, y = ds.make_regression(2000, 5, noise=0.0, seed=0)
    A = np.c_[X, np.ones(len(X))]
    resid = y - A @ np.linalg.lstsq(A, y, rcond=None)[0]
    assert resid.std() > 0.05 * y.std()


@pytest.mark.parametrize("kwargs, word", [
    (dict(n_samples=0), "n_samples"),
    (dict(n_features=0), "n_features"),
    (dict(n_classes=1), "n_classes"),
    (dict(n_features=3, informative=4), "informative"),
    (dict(noise=-1.0), "noise"),
    (dict(n_samples=2.5), "n_samples"),
])
def test_make_classification_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ds.make_classification(**kwargs)


@pytest.mark.parametrize("kwargs, word", [
    (dict(n_samples=0), "n_samples"), (dict(n_targets=0), "n_targets"),
    (dict(noise=float("nan")), "noise"),
])
def test_make_regression_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ds.make_regression(**kwargs)


# --------------------------------------------------------------------- npz
def test_npz_round_trip(tmp_path):
    X = np.arange(12, dtype=np.float32).reshape(4, 3)
    y = np.array([0, 1, 1, 2], dtype=np.uint8)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    X2, y2 = ds.load_npz(tmp_path / "d.npz")
    _check_contract(X2, y2, 4, 3)
    assert np.array_equal(X2, X) and y2.dtype == np.int64 and np.array_equal(y2, y)


def test_npz_float_targets_stay_float(tmp_path):
    np.savez_compressed(tmp_path / "r.npz", X=np.ones((3, 2)), y=np.array([1.0, 2.0, 3.0]))
    _, y = ds.load_npz(str(tmp_path / "r.npz"))
    assert y.dtype == np.float64


def test_npz_missing_file(tmp_path):
    p = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError, match=_path_re(p)):
        ds.load_npz(p)


def test_npz_without_y(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, X=np.ones((3, 2)), labels=np.zeros(3))
    with pytest.raises(ValueError, match=_path_re(p) + r".*'y'.*labels"):
        ds.load_npz(p)


def test_npz_not_a_zip(tmp_path):
    p = tmp_path / "d.npz"
    p.write_text("hello, I am not an archive\n")
    with pytest.raises(ValueError, match=_path_re(p) + ".*not an .npz"):
        ds.load_npz(p)


def test_npz_truncated(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, X=np.ones((50, 5)), y=np.zeros(50))
    p.write_bytes(p.read_bytes()[:300])
    with pytest.raises(ValueError, match=_path_re(p)):
        ds.load_npz(p)


def test_npy_instead_of_npz(tmp_path):
    p = tmp_path / "d.npz"
    with open(p, "wb") as f:
        np.save(f, np.ones((2, 2)))
    with pytest.raises(ValueError, match="single .npy array"):
        ds.load_npz(p)


@pytest.mark.parametrize("flag", [0x1, 0x20, 0x40])  # encrypted, patched, strong encryption
def test_npz_with_damaged_zip_flags_is_a_value_error(tmp_path, flag):
    # Found by tests/test_properties.py: zipfile raises RuntimeError / NotImplementedError here.
    p = tmp_path / "d.npz"
    np.savez(p, X=np.zeros((2, 2)), y=np.zeros(2))
    raw = bytearray(p.read_bytes())
    entry = raw.index(b"PK\x01\x02")  # X.npy's central directory entry; its flags at +8
    raw[entry + 8] |= flag
    p.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=_path_re(p)):
        ds.load_npz(p)


def test_npz_object_arrays_are_refused(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, X=np.ones((2, 2)), y=np.array(["a", None], dtype=object))
    with pytest.raises(ValueError, match=_path_re(p)):
        ds.load_npz(p)


@pytest.mark.parametrize("X, y, words", [
    (np.ones(4), np.zeros(4), r"2-D.*got shape \(4,\)"),
    (np.ones((4, 2)), np.zeros(3), r"expected y of shape \(4,\).*got \(3,\)"),
    (np.ones((0, 2)), np.zeros(0), r"at least 1 row, got 0"),
    (np.array([[1.0, np.nan]]), np.zeros(1), r"NaN"),
    (np.ones((2, 2)), np.array(["a", "b"]), r"y must hold"),
])
def test_npz_bad_shapes(tmp_path, X, y, words):
    p = tmp_path / "d.npz"
    np.savez(p, X=X, y=y)
    with pytest.raises(ValueError, match=_path_re(p) + ".*" + words):
        ds.load_npz(p)


# --------------------------------------------------------------------- csv
def test_csv_header_and_label_by_name(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("a,target,b\n1,0,2\n3,1,4\n5.5,2,6\n")
    X, y = ds.load_csv(p, label="target")
    assert np.array_equal(X, [[1, 2], [3, 4], [5.5, 6]])
    assert y.dtype == np.int64 and list(y) == [0, 1, 2]


def test_csv_no_header_negative_index(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("1,2,0\n3,4,1\n\n5,6,1\n")  # the blank line is skipped
    X, y = ds.load_csv(p, label=-1)
    _check_contract(X, y, 3, 2)
    assert np.array_equal(X, [[1, 2], [3, 4], [5, 6]]) and list(y) == [0, 1, 1]
    X0, y0 = ds.load_csv(p, label=0)
    assert list(y0) == [1, 3, 5] and np.array_equal(X0, [[2, 0], [4, 1], [6, 1]])


def test_csv_float_integral_labels_become_int(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("x;y;label\n0.1;0.2;1.0\n0.3;0.4;0.0\n", encoding="utf-8")
    X, y = ds.load_csv(p, delimiter=";")
    assert y.dtype == np.int64 and list(y) == [1, 0]


def test_csv_fractional_labels_stay_float(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("1,2,0.5\n3,4,1.25\n")
    _, y = ds.load_csv(p)
    assert y.dtype == np.float64 and list(y) == [0.5, 1.25]


@pytest.mark.parametrize("labels, expected", [
    # beyond int64: float targets, the value as a float holds it, never wrapped around
    (["0", "1e19"], [0.0, 1e19]),
    (["0", "9223372036854775808"], [0.0, 2.0**63]),
    (["0", "-9223372036854775809"], [0.0, -(2.0**63)]),
    (["1", "99999999999999999999999"], [1.0, 1e23]),
    (["1", "2.0", "9.3e18"], [1.0, 2.0, 9.3e18]),
    (["1", "2.0000000000000001"], [1.0, 2.0]),  # the float is integral, the label is not
])
def test_csv_labels_beyond_int64_stay_floats(tmp_path, labels, expected):
    p = tmp_path / "d.csv"
    p.write_text("".join(f"{i},{v}\n" for i, v in enumerate(labels)))
    with np.errstate(all="raise"), warnings.catch_warnings():
        warnings.simplefilter("error")  # the wrap-around came with only a RuntimeWarning
        _, y = ds.load_csv(p)
    assert y.dtype == np.float64 and y.tolist() == expected


@pytest.mark.parametrize("labels, expected", [
    (["9223372036854775807", "-9223372036854775808"], [2**63 - 1, -2**63]),
    (["3.0", "-9223372036854775808.0", "4e0"], [3, -2**63, 4]),
    # found by tests/test_properties.py: the floats of these round, the integers written do not
    (["0", "9007199254740993"], [0, 2**53 + 1]),
    (["0.0", "5.099719603424333e+16"], [0, 50997196034243330]),
])
def test_csv_integer_labels_parse_exactly_up_to_the_int64_limits(tmp_path, labels, expected):
    p = tmp_path / "d.csv"
    p.write_text("".join(f"{i},{v}\n" for i, v in enumerate(labels)))
    _, y = ds.load_csv(p)
    assert y.dtype == np.int64 and y.tolist() == expected


def test_csv_huge_labels_are_refused_as_class_ids_naming_the_row(tmp_path, capsys):
    import bpkernels as bpk
    from bpkernels import cli
    p = tmp_path / "d.csv"
    p.write_text("".join(f"{i},{i % 2}\n" for i in range(6)) + "6,1e19\n")
    X, y = ds.load_csv(p)
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.1 .*; y\[6\] = 1e\+19$"):
        bpk.fit(bpk.MLP([1, 2]), X, y, loss="cross_entropy")
    # regression trains on the float target as it is
    model = bpk.MLP([1, 1], dtype="float64")
    _, T = model.prepare(X, y, "mse")
    assert T[6, 0] == 1e19
    assert cli.main(["train", "--data", str(p), "--loss", "cross_entropy", "--quiet"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "labels are floats (row 6 holds 1e+19)" in err


@pytest.mark.parametrize("y, row, value", [
    (np.array([0, 1, 2**64 - 1], dtype=np.uint64), 2, 2**64 - 1),
    (np.array([[0, 2**63], [1, 1], [0, 0]], dtype=np.uint64), 0, 2**63),
])
def test_npz_uint64_labels_beyond_int64_are_refused_naming_the_row(tmp_path, y, row, value):
    p = tmp_path / "d.npz"
    np.savez(p, X=np.zeros((3, 2)), y=y)
    with pytest.raises(ValueError, match=_path_re(p) + f": y row {row} holds {value}, which no "
                       "int64 class id holds"):
        ds.load_npz(p)
    np.savez(p, X=np.zeros((3, 2)), y=y % 7)
    assert ds.load_npz(p)[1].tolist() == (y % 7).tolist()


def test_npz_float_labels_beyond_int64_stay_float(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, X=np.zeros((2, 2)), y=np.array([1e19, -1e300]))
    _, y = ds.load_npz(p)
    assert y.dtype == np.float64 and y.tolist() == [1e19, -1e300]


def test_csv_explicit_header_with_numeric_names(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("10,20,30\n1,2,3\n")
    X, y = ds.load_csv(p, label="30", header=True)
    assert X.shape == (1, 2) and list(y) == [3]


@pytest.mark.parametrize("text, words", [
    ("a,b,c\n1,2,3\n4,5\n", r"ragged.*line 3 has 2 columns, expected 3"),
    ("a,b,c\n1,2,3\n4,x,6\n", r"line 3, column index 1 \('b'\): 'x' is not a number"),
    ("1,2,3\n4,,6\n", r"line 2, column index 1: '' is not a number"),
    ("", r"empty CSV"),
    ("\n\n", r"empty CSV"),
    ("a,b,c\n", r"header row but no data rows"),
    ("a,b\n1,cat\n2,dog\n", r"non-numeric value 'cat' on line 2"),
    ("1\n2\n", r"at least 2 columns"),
])
def test_csv_bad_content(tmp_path, text, words):
    p = tmp_path / "d.csv"
    p.write_text(text)
    with pytest.raises(ValueError, match=_path_re(p) + ".*" + words):
        ds.load_csv(p)


def test_csv_not_utf8(tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes(b"\xff\xfe\x00\x81,\x9c\n")
    with pytest.raises(ValueError, match=_path_re(p) + ".*UTF-8"):
        ds.load_csv(p)


@pytest.mark.parametrize("label, words", [
    (3, r"label=3 out of range.*-3\.\.2"),
    (-4, r"label=-4 out of range"),
    ("nope", r"label='nope' is not a column"),
])
def test_csv_bad_label(tmp_path, label, words):
    p = tmp_path / "d.csv"
    p.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match=words):
        ds.load_csv(p, label=label)


def test_csv_label_name_without_header(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("1,2,3\n")
    with pytest.raises(ValueError, match="no header row"):
        ds.load_csv(p, label="c")


def test_csv_missing_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=_path_re(tmp_path / "x.csv")):
        ds.load_csv(tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError, match="it is a folder"):
        ds.load_csv(tmp_path)


# ------------------------------------------------------------------- mnist
def _idx_images(images):
    n, rows, cols = images.shape
    return struct.pack(">IIII", 2051, n, rows, cols) + images.astype(np.uint8).tobytes()


def _idx_labels(labels):
    return struct.pack(">II", 2049, len(labels)) + np.asarray(labels, np.uint8).tobytes()


def _write_mnist(folder, split="train", n=5, gz=False, sep="-", images=None, labels=None):
    prefix = "train" if split == "train" else "t10k"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 3, 4)) if images is None else images
    labels = np.arange(n) % 10 if labels is None else labels
    opener = gzip.compress if gz else bytes
    ext = ".gz" if gz else ""
    (folder / f"{prefix}-images{sep}idx3-ubyte{ext}").write_bytes(opener(_idx_images(images)))
    (folder / f"{prefix}-labels{sep}idx1-ubyte{ext}").write_bytes(opener(_idx_labels(labels)))
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("sep", ["-", "."])
def test_mnist_round_trip(tmp_path, gz, sep):
    images, labels = _write_mnist(tmp_path, gz=gz, sep=sep)
    X, y = ds.load_mnist(tmp_path)
    _check_contract(X, y, 5, 12)
    assert np.allclose(X, images.reshape(5, 12) / 255.0)
    assert X.min() >= 0 and X.max() <= 1
    assert y.dtype == np.int64 and list(y) == list(labels)


def test_mnist_test_split(tmp_path):
    _write_mnist(tmp_path, split="train", n=5)
    images, labels = _write_mnist(tmp_path, split="test", n=3, labels=np.array([7, 8, 9]))
    X, y = ds.load_mnist(tmp_path, split="test")
    assert X.shape == (3, 12) and list(y) == [7, 8, 9]
    assert X[0, 0] == images[0, 0, 0] / 255.0


def test_mnist_exact_pixel_scaling(tmp_path):
    images = np.zeros((2, 3, 4), np.uint8)
    images[0, 0, 0], images[1, 2, 3] = 255, 51
    _write_mnist(tmp_path, images=images, labels=np.array([3, 4]))
    X, y = ds.load_mnist(tmp_path)
    assert X[0, 0] == 1.0 and X[1, 11] == pytest.approx(0.2) and X.sum() == pytest.approx(1.2)


def test_mnist_missing_folder(tmp_path):
    p = tmp_path / "mnist"
    with pytest.raises(FileNotFoundError, match=_path_re(p)):
        ds.load_mnist(p)


def test_mnist_missing_files_lists_names(tmp_path):
    _write_mnist(tmp_path, split="train")
    with pytest.raises(FileNotFoundError, match=r"t10k-images-idx3-ubyte, .*t10k-images\.idx3"):
        ds.load_mnist(tmp_path, split="test")


def test_mnist_bad_split(tmp_path):
    with pytest.raises(ValueError, match=r"split must be 'train' or 'test', got 'valid'"):
        ds.load_mnist(tmp_path, split="valid")


def test_mnist_truncated_gzip(tmp_path):
    _write_mnist(tmp_path, gz=True, n=50)
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:-20])
    with pytest.raises(ValueError, match=_path_re(p) + ".*truncated gzip"):
        ds.load_mnist(tmp_path)


def test_mnist_not_gzip(tmp_path):
    _write_mnist(tmp_path)
    p = tmp_path / "train-labels-idx1-ubyte.gz"
    (tmp_path / "train-labels-idx1-ubyte").rename(p)
    with pytest.raises(ValueError, match=_path_re(p) + ".*gzip"):
        ds.load_mnist(tmp_path)


def test_mnist_wrong_magic(tmp_path):
    _write_mnist(tmp_path)
    p = tmp_path / "train-labels-idx1-ubyte"
    p.write_bytes(struct.pack(">II", 2051, 5) + bytes(5))  # an images magic on labels
    with pytest.raises(ValueError, match=_path_re(p) + ".*magic number 0x00000803, expected 0x00000801"):
        ds.load_mnist(tmp_path)


def test_mnist_short_payload(tmp_path):
    _write_mnist(tmp_path)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-7])
    with pytest.raises(ValueError, match=_path_re(p) + r".*payload is 53 bytes.*need 60 \(truncated\)"):
        ds.load_mnist(tmp_path)


def test_mnist_trailing_bytes(tmp_path):
    _write_mnist(tmp_path)
    p = tmp_path / "train-labels-idx1-ubyte"
    p.write_bytes(p.read_bytes() + b"\x00\x01")
    with pytest.raises(ValueError, match=_path_re(p) + r".*payload is 7 bytes.*need 5"):
        ds.load_mnist(tmp_path)


def test_mnist_header_too_short(tmp_path):
    _write_mnist(tmp_path)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(b"\x00\x00\x08")
    with pytest.raises(ValueError, match=_path_re(p) + ".*too short"):
        ds.load_mnist(tmp_path)


@pytest.mark.parametrize("shape", [(0, 28, 28), (3, 0, 28), (3, 28, 0)])
def test_mnist_without_pixels_says_it_is_empty(tmp_path, shape):
    _write_mnist(tmp_path, images=np.zeros(shape, np.uint8), labels=np.zeros(shape[0]))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: holds no data: "
                       f"{shape[0]} images of {shape[1]}x{shape[2]} pixels; the split is empty"):
        ds.load_mnist(tmp_path)


def test_mnist_count_mismatch(tmp_path):
    _write_mnist(tmp_path, n=5, labels=np.arange(4))
    with pytest.raises(ValueError, match=r"5 images but .* 4 labels"):
        ds.load_mnist(tmp_path)


# --------------------------------------------------------------------- load
def test_load_synthetic_specs():
    X, y = ds.load("synthetic")
    _check_contract(X, y, 2000, 20)
    assert set(np.unique(y)) == {0, 1, 2, 3}
    X2, y2 = ds.load("synthetic-classification")
    assert np.array_equal(X, X2) and np.array_equal(y, y2)
    assert not np.array_equal(ds.load("synthetic", seed=1)[0], X)
    Xr, yr = ds.load("synthetic-regression")
    _check_contract(Xr, yr, 2000, 20)
    assert yr.dtype == np.float64 and yr.ndim == 1


def test_load_digits_spec():
    pytest.importorskip("sklearn")
    X, y = ds.load("digits")
    assert X.shape == (1797, 64)


def test_load_paths(tmp_path):
    np.savez(tmp_path / "d.npz", X=np.ones((3, 2)), y=np.array([0, 1, 0]))
    assert ds.load(str(tmp_path / "d.npz"))[0].shape == (3, 2)
    (tmp_path / "d.csv").write_text("lab,a,b\n1,2,3\n0,5,6\n")
    X, y = ds.load(tmp_path / "d.csv", label="lab")
    assert list(y) == [1, 0] and X.shape == (2, 2)
    mnist = tmp_path / "mnist"
    mnist.mkdir()
    _write_mnist(mnist, gz=True)
    assert ds.load(str(mnist))[0].shape == (5, 12)


def test_load_unknown_name():
    with pytest.raises(ValueError, match=r"unknown data set 'mnist-fashion'.*digits.*\.npz.*MNIST"):
        ds.load("mnist-fashion")


def test_load_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match=_path_re(tmp_path / "x.npz")):
        ds.load(str(tmp_path / "x.npz"))
    with pytest.raises(FileNotFoundError, match=_path_re(tmp_path / "nothing")):
        ds.load(str(tmp_path / "nothing"))


def test_load_unsupported_file(tmp_path):
    p = tmp_path / "d.txt"
    p.write_text("1,2\n")
    with pytest.raises(ValueError, match=_path_re(p) + ".*unsupported file type '.txt'"):
        ds.load(str(p))


# -------------------------------------------------------------- standardize
def test_standardize():
    rng = np.random.default_rng(0)
    Xtr = rng.normal(5.0, 3.0, (200, 4))
    Xtr[:, 2] = 7.0  # constant column
    Xtr[:, 3] = 0.1  # constant, with a mean that is not exact in binary
    Xte = rng.normal(5.0, 3.0, (50, 4))
    Ztr, Zte = ds.standardize(Xtr, Xte)
    assert np.allclose(Ztr.mean(axis=0), 0) and np.allclose(Ztr.std(axis=0)[:2], 1)
    assert np.all(np.isfinite(Ztr)) and np.all(np.isfinite(Zte))
    assert np.allclose(Ztr[:, 2:], 0) and np.allclose(Zte[:, 2], Xte[:, 2] - 7.0)
    mean, std = Xtr[:, 0].mean(), Xtr[:, 0].std()
    assert np.allclose(Zte[:, 0], (Xte[:, 0] - mean) / std)  # train statistics, not test ones
    assert Ztr.flags.c_contiguous and Ztr.dtype == np.float64


def test_standardize_returns_tuple_and_checks_columns():
    (Z,) = ds.standardize(np.arange(6.0).reshape(3, 2))
    assert Z.shape == (3, 2)
    with pytest.raises(ValueError, match=r"others\[0\]: expected 2 columns, got 3"):
        ds.standardize(np.ones((3, 2)), np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"X_train.*2-D"):
        ds.standardize(np.ones(3))


# -------------------------------------------------------------------- split
def _ids(n, d=3):
    X = np.arange(n * d, dtype=np.float64).reshape(n, d)
    return X, np.arange(n) % 3


def test_split_sizes_and_disjoint_union():
    X, y = _ids(101)
    Xtr, Xte, ytr, yte = ds.train_test_split(X, y, 0.2, seed=4)
    assert len(Xte) == 21 and len(Xtr) == 80 and len(ytr) == 80 and len(yte) == 21
    rows_tr, rows_te = set(Xtr[:, 0]), set(Xte[:, 0])
    assert not rows_tr & rows_te
    assert sorted(rows_tr | rows_te) == list(X[:, 0])
    assert np.array_equal(ytr, (Xtr[:, 0] // 3) % 3)  # y stays paired with its row
    Xtr, Xte, _, _ = ds.train_test_split(X, y, 10)
    assert len(Xte) == 10 and len(Xtr) == 91


def test_split_deterministic():
    X, y = _ids(50)
    a = ds.train_test_split(X, y, seed=1)
    b = ds.train_test_split(X, y, seed=1)
    c = ds.train_test_split(X, y, seed=2)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not np.array_equal(a[1], c[1])


def test_split_stratified_keeps_proportions():
    X = np.arange(200.0).reshape(100, 2)
    y = np.array([0] * 70 + [1] * 20 + [2] * 10)
    Xtr, Xte, ytr, yte = ds.train_test_split(X, y, 0.3, seed=0, stratify=True)
    assert list(np.bincount(yte)) == [21, 6, 3]
    assert list(np.bincount(ytr)) == [49, 14, 7]
    assert sorted(set(Xtr[:, 0]) | set(Xte[:, 0])) == list(X[:, 0])


def test_split_stratified_rounds_to_the_exact_test_size():
    # ideal test shares 1.87 / 1.33 / 0.8 of 4: the two largest remainders get a row
    y = np.array([0] * 7 + [1] * 5 + [2] * 3)
    X = np.arange(15.0)[:, None]
    _, _, ytr, yte = ds.train_test_split(X, y, 0.25, seed=3, stratify=True)
    assert list(np.bincount(yte)) == [2, 1, 1] and list(np.bincount(ytr)) == [5, 4, 2]


def test_split_stratified_needs_integer_labels():
    with pytest.raises(ValueError, match="stratify=True needs 1-D integer"):
        ds.train_test_split(np.ones((10, 2)), np.linspace(0, 1, 10), stratify=True)


@pytest.mark.parametrize("test_size", [0, 0.0, 1.0, 1.5, -0.1, 10, 11, True, "0.2", 0.999])
def test_split_bad_test_size(test_size):
    with pytest.raises(ValueError, match=r"test_size must be .*1\.\.9"):
        ds.train_test_split(np.ones((10, 2)), np.zeros(10), test_size=test_size)


def test_split_row_mismatch():
    with pytest.raises(ValueError, match=r"expected y with 10 rows like X, got shape \(9,\)"):
        ds.train_test_split(np.ones((10, 2)), np.zeros(9))
