"""The checkpoint reader trusts nothing in the file (issue 18 items 8, 9, 10): every malformed
checkpoint is one CheckpointError naming the file, from bpk.load and from `bpk train --resume`,
before anything large is allocated. Files are built by hand here (zipfile and the .npy format),
not by the writer under test."""
import contextlib
import io
import json
import os
import tracemalloc
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import bpkernels as bpk
from bpkernels import checkpoint, cli

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
SIZES = [4, 3, 2]
N_PARAMS = 4 * 3 + 3 + 3 * 2 + 2  # 23


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def _meta(**changes):
    meta = {"format": "bpkernels-checkpoint", "version": 1, "sizes": SIZES,
            "activations": ["tanh"], "dtype": "float64", "seed": 3, "backend": "numpy",
            "epochs_trained": 2,
            "optimizer": {"config": {"name": "adam", "lr": 0.01, "betas": [0.9, 0.999],
                                     "eps": 1e-8, "weight_decay": 0.0},
                          "step_count": 8, "state": ["exp_avg", "exp_avg_sq"]}}
    meta.update(changes)
    return meta


def _arrays(n=N_PARAMS, dtype="float64"):
    rng = np.random.default_rng(0)
    return {"params": rng.standard_normal(n).astype(dtype),
            "state.exp_avg": rng.standard_normal(n).astype(dtype),
            "state.exp_avg_sq": rng.random(n).astype(dtype)}


def _build(path, meta=None, arrays=None, meta_text=None, raw=None):
    """A checkpoint from parts: ``meta`` (a dict, or ``meta_text`` as is), ``arrays`` as .npy
    members and ``raw`` members given as bytes."""
    meta = _meta() if meta is None else meta
    arrays = _arrays() if arrays is None else arrays
    text = json.dumps(meta) if meta_text is None else meta_text
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("meta.npy", _npy(np.array(text)))
        for name, array in arrays.items():
            z.writestr(f"{name}.npy", _npy(array))
        for name, data in (raw or {}).items():
            z.writestr(f"{name}.npy", data)
    return path


def _refused(path, *words):
    with pytest.raises(bpk.CheckpointError) as info:
        bpk.load(path)
    text = str(info.value)
    assert str(path) in text and "\n" not in text, text
    for word in words:
        assert word in text, text
    return text


def _refused_by_cli(capsys, path):
    code = cli.main(["train", "--data", "synthetic", "--resume", str(path), "--epochs", "1",
                     "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("bpk: error:"), err
    assert str(path) in err[0] and "Traceback" not in err[0]


def test_the_hand_built_file_loads(tmp_path):
    model = bpk.load(_build(tmp_path / "ok.npz"))
    assert model.sizes == tuple(SIZES) and model.optimizer.step_count == 8
    np.testing.assert_array_equal(model.backend.to_host(model.params), _arrays()["params"])


# ------------------------------------------------------------------ item 8: optimizer state
def _poisoned(name, value):
    arrays = _arrays()
    arrays[name] = arrays[name].copy()
    arrays[name][5] = value
    return arrays


BAD_STATES = [
    ("state.exp_avg_sq", np.nan, "NaN"), ("state.exp_avg_sq", -1e-3, "negative"),
    ("state.exp_avg_sq", np.inf, "inf"), ("state.exp_avg", np.nan, "NaN"),
    ("state.exp_avg", -np.inf, "inf"), ("params", np.nan, "NaN"),
]


@pytest.mark.parametrize("name, value, word", BAD_STATES)
def test_nonfinite_or_negative_state_is_refused(tmp_path, capsys, name, value, word):
    path = _build(tmp_path / "state.npz", arrays=_poisoned(name, value))
    _refused(path, name.removeprefix("state."), word)
    _refused_by_cli(capsys, path)


@pytest.mark.parametrize("name, value, word", BAD_STATES)
def test_what_load_refuses_is_never_saved(tmp_path, name, value, word):
    """Save and load apply one test of the values: a model whose state load would refuse is
    not written, and the previous file stays."""
    good = _build(tmp_path / "m.npz")
    before = good.read_bytes()
    model = bpk.load(good)
    buffer = model.params if name == "params" else model.optimizer.state[name[6:]]
    buffer[5] = value
    with pytest.raises(bpk.CheckpointError, match="which load\\(\\) refuses; .* left as it was"):
        model.save(good)
    assert good.read_bytes() == before


def test_rmsprop_square_avg_must_not_be_negative(tmp_path):
    meta = _meta(optimizer={"config": bpk.RMSprop(lr=0.01).config(), "step_count": 3,
                            "state": ["square_avg"]})
    arrays = {"params": np.zeros(N_PARAMS), "state.square_avg": -np.ones(N_PARAMS)}
    _refused(_build(tmp_path / "r.npz", meta, arrays), "square_avg", "negative")


OPT = _meta()["optimizer"]
BAD_FIELDS = [
    ("epochs_trained", -1), ("epochs_trained", 2.5), ("epochs_trained", None),
    ("epochs_trained", True), ("epochs_trained", "2"),
    ("optimizer", {**OPT, "step_count": -1}), ("optimizer", {**OPT, "step_count": 1.5}),
    ("optimizer", {**OPT, "step_count": 2 ** 60}), ("optimizer", {**OPT, "step_count": "8"}),
    ("seed", -1), ("seed", 1.0), ("dtype", "int8"), ("dtype", ["float64"]), ("backend", 3),
    ("sizes", [4, 0, 2]), ("sizes", [4]), ("sizes", "4,3,2"), ("sizes", [4, 3.5, 2]),
    ("sizes", [[4], 3, 2]), ("activations", ["nope"]), ("activations", "tanh"),
    ("activations", ["tanh", "relu"]), ("activations", [1]),
    # item 10: the optimizer entry of the wrong type or shape
    ("optimizer", "adam"), ("optimizer", 3), ("optimizer", [1, 2]), ("optimizer", {}),
    ("optimizer", {**OPT, "config": "adam"}), ("optimizer", {**OPT, "extra": 1}),
    ("optimizer", {**OPT, "config": {**OPT["config"], "foo": 1}}),  # unknown key: TypeError
    ("optimizer", {**OPT, "config": {"lr": 0.01}}),                  # no name: KeyError
    ("optimizer", {**OPT, "config": {"name": "lbfgs"}}),
    ("optimizer", {**OPT, "config": {"name": 7}}),
    ("optimizer", {**OPT, "config": {**OPT["config"], "lr": -1}}),
    ("optimizer", {**OPT, "config": {**OPT["config"], "betas": 0.9}}),
    ("optimizer", {**OPT, "config": {**OPT["config"], "betas": [0.9, "0.999"]}}),
    ("optimizer", {**OPT, "config": {"name": "adam", "lr": 0.01}}),  # keys missing
    ("optimizer", {**OPT, "config": {"name": "sgd", "lr": 0.1, "momentum": 0.0, "dampening": 0.0,
                                     "nesterov": "no", "weight_decay": 0.0}, "state": []}),
    ("optimizer", {**OPT, "state": ["exp_avg"]}), ("optimizer", {**OPT, "state": "exp_avg"}),
    ("optimizer", {**OPT, "state": ["exp_avg", "exp_avg_sq", "extra"]}),
]


@pytest.mark.parametrize("field, value", BAD_FIELDS, ids=[f"{f}={v!r}"[:40] for f, v in BAD_FIELDS])
def test_every_metadata_field_is_validated(tmp_path, capsys, field, value):
    path = _build(tmp_path / "bad.npz", _meta(**{field: value}))
    _refused(path)
    _refused_by_cli(capsys, path)


@pytest.mark.parametrize("field", ["sizes", "activations", "dtype", "seed", "backend",
                                   "epochs_trained", "optimizer"])
def test_a_missing_field_is_named(tmp_path, field):
    meta = _meta()
    del meta[field]
    _refused(_build(tmp_path / "m.npz", meta), field)


def _schedule(**state_changes):
    """A saved SequentialLR (warm-up then cosine) three steps in, as MLP.state() writes it."""
    from bpkernels.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR
    sched = SequentialLR([LinearLR(0.5, total_iters=2), CosineAnnealingLR(5)], [2])
    sched.start(bpk.SGD(lr=0.1))
    sched.rates(3)
    return {"config": sched.config(), "state": {**sched.state_dict(), **state_changes},
            "interval": "step"}


def test_a_saved_schedule_loads(tmp_path):
    model = bpk.load(_build(tmp_path / "m.npz", _meta(lr_scheduler=_schedule())))
    assert model.lr_scheduler.state_dict() == _schedule()["state"]
    assert model.lr_scheduler_interval == "step"


GROUP = _schedule()["state"]["group"]
BAD_SCHEDULES = [
    "cosine", 3, [], {}, {**_schedule(), "extra": 1}, {**_schedule(), "interval": "batch"},
    {**_schedule(), "config": "SequentialLR"}, {**_schedule(), "config": {"name": "CyclicLR"}},
    {**_schedule(), "config": {"name": "StepLR"}},                       # step_size missing
    {**_schedule(), "config": {"name": "StepLR", "step_size": 0, "gamma": 0.1}},
    {**_schedule(), "config": {"name": "StepLR", "step_size": 2, "gamma": 0.1, "x": 1}},
    {**_schedule(), "config": {"name": "ExponentialLR", "gamma": "0.9"}},
    _schedule(last_epoch=-5), _schedule(last_epoch=1.5), _schedule(step_count="3"),
    _schedule(base_lr=-0.1), _schedule(base_lr=float("nan")), _schedule(group=[]),
    _schedule(group={**GROUP, "lr": float("inf")}), _schedule(group={**GROUP, "lr": -1}),
    _schedule(group={"lr": 0.1}), _schedule(schedulers=[{}]), _schedule(schedulers="x"),
    _schedule(schedulers=[{}, {}]),
]


@pytest.mark.parametrize("saved", BAD_SCHEDULES, ids=[repr(s)[:40] for s in BAD_SCHEDULES])
def test_every_schedule_field_is_validated(tmp_path, capsys, saved):
    path = _build(tmp_path / "bad.npz", _meta(lr_scheduler=saved))
    _refused(path, "lr_scheduler")
    _refused_by_cli(capsys, path)


def test_a_negative_step_count_never_reaches_training(tmp_path):
    # On main it loaded, and Adam's bias correction 1 - beta2**-5 < 0 failed in the next fit.
    path = _build(tmp_path / "s.npz", _meta(optimizer={**OPT, "step_count": -5}))
    _refused(path, "step_count", "-5")


# ------------------------------------------------------------------ item 10: crafted metadata
@pytest.mark.parametrize("text", [
    '{"format": "bpkernels-checkpoint", "version": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "[" * 100_000 + "]" * 100_000,
    '{"format": "bpkernels-checkpoint", "version": 1, "sizes": ' + "1" * 5000 + "}",
    '{"format": "bpkernels-checkpoint", "version": 1, "sizes": [NaN, Infinity]}',
    "not json", '"a string"', "null", '{"format": "bpkernels-checkpoint", "version": [1]}',
], ids=["nested-100k", "nested-list", "5000-digit-int", "nan", "not-json", "string", "null",
        "version-list"])
def test_crafted_json_is_a_checkpoint_error(tmp_path, capsys, text):
    path = _build(tmp_path / "deep.npz", meta_text=text)
    _refused(path)
    _refused_by_cli(capsys, path)


def test_metadata_that_is_no_text_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "m.npz", "w") as z:
        z.writestr("meta.npy", _npy(np.zeros((2, 2))))
        z.writestr("params.npy", _npy(np.zeros(N_PARAMS)))
    with _at_most(10 ** 7):
        _refused(tmp_path / "m.npz", "metadata")


# ------------------------------------------------------------------ item 9: huge claims
@contextlib.contextmanager
def _at_most(nbytes):
    """Fails if the block allocates more than ``nbytes`` at once (NumPy reports to tracemalloc)."""
    tracemalloc.start()
    try:
        yield
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= nbytes, f"{peak} bytes allocated"


def _claiming_header(shape, dtype="<f8", data=b"\0" * 64) -> bytes:
    """A .npy member whose header claims ``shape`` over only ``data``."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue() + data


def test_a_checkpoint_claiming_10_12_parameters_is_refused_before_allocating(tmp_path, capsys):
    sizes = [10 ** 6, 10 ** 6 - 1]  # (10**6 + 1) * (10**6 - 1) = 10**12 - 1 parameters
    claim = _claiming_header((10 ** 12 - 1,))
    for name, raw in [("claims.npz", {"params": claim}),  # header and sizes agree
                      ("sizes-only.npz", {})]:            # the sizes alone claim it
        arrays = {} if raw else {"params": np.zeros(N_PARAMS)}
        path = _build(tmp_path / name, _meta(sizes=sizes, activations=[], optimizer=None),
                      arrays, raw=raw)
        with _at_most(10 ** 7):
            _refused(path, "params", "sizes [1000000, 999999]")
        _refused_by_cli(capsys, path)


def test_a_claim_beyond_this_machines_memory_is_refused_before_allocating(tmp_path, monkeypatch):
    path = _build(tmp_path / "big.npz")
    real = os.sysconf
    small = {"SC_PAGE_SIZE": 1, "SC_PHYS_PAGES": 100}  # 100 bytes; the arrays need 552
    monkeypatch.setattr(os, "sysconf", lambda name: small.get(name) or real(name))
    read = checkpoint._read_array

    def only_the_metadata(path, archive, info, dtype):
        assert info.filename == "meta.npy", f"{info.filename} was read"
        return read(path, archive, info, dtype)
    monkeypatch.setattr(checkpoint, "_read_array", only_the_metadata)
    _refused(path, "sizes [4, 3, 2]", "memory")


def test_metadata_claiming_more_than_it_holds_is_refused_before_allocating(tmp_path):
    with zipfile.ZipFile(tmp_path / "m.npz", "w") as z:
        z.writestr("meta.npy", _claiming_header((), dtype="<U100000000"))  # 400 MB of text
        z.writestr("params.npy", _npy(np.zeros(N_PARAMS)))
    with _at_most(10 ** 7):
        _refused(tmp_path / "m.npz", "metadata")


def test_a_member_larger_than_the_file_is_refused(tmp_path):
    path = _build(tmp_path / "m.npz", raw={"params": _claiming_header((N_PARAMS,), data=b"")},
                  arrays={k: v for k, v in _arrays().items() if k != "params"})
    _refused(path, "params")


def test_foreign_arrays_and_formats(tmp_path):
    arrays = _arrays()
    arrays["params"] = arrays["params"].astype(np.float32)  # dtype against the metadata
    _refused(_build(tmp_path / "a.npz", arrays=arrays), "float32")
    arrays = {**_arrays(), "extra": np.zeros(3)}
    _refused(_build(tmp_path / "b.npz", arrays=arrays), "extra")
    arrays = _arrays()
    arrays["params"] = arrays["params"].reshape(23, 1)
    _refused(_build(tmp_path / "c.npz", arrays=arrays), "shape")
    objects = _claiming_header((N_PARAMS,), dtype="|O")
    _refused(_build(tmp_path / "d.npz", raw={"params": objects},
                    arrays={k: v for k, v in _arrays().items() if k != "params"}))


def test_an_unreadable_file_is_not_called_corrupt(tmp_path, monkeypatch):
    path = _build(tmp_path / "m.npz")
    real_open = open

    def denied(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(PermissionError, match="m.npz"):
        bpk.load(path)


# ------------------------------------------------------------------ property tests
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A real checkpoint (written by bpkernels) and the model that wrote it."""
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((40, 5)), rng.integers(0, 3, 40)
    model = bpk.MLP([5, 4, 3], activation="tanh", backend="numpy", dtype="float64", seed=1)
    bpk.fit(model, X, y, optimizer=bpk.RMSprop(lr=1e-2, momentum=0.5, centered=True), epochs=2,
            batch_size=16)
    path = tmp_path_factory.mktemp("saved") / "good.npz"
    model.save(path)
    return path.read_bytes(), model


def _loads_as_saved_or_refused(path, model):
    """The property: a CheckpointError naming the file, or exactly the saved model."""
    try:
        loaded = bpk.load(path)
    except bpk.CheckpointError as err:
        assert str(path) in str(err) and "\n" not in str(err)
        return False
    assert loaded.sizes == model.sizes and loaded.activations == model.activations
    assert loaded.optimizer.config() == model.optimizer.config()
    assert loaded.optimizer.step_count == model.optimizer.step_count
    assert loaded.epochs_trained == model.epochs_trained
    np.testing.assert_array_equal(loaded.params, model.params)
    for name, buf in model.optimizer.state.items():
        np.testing.assert_array_equal(loaded.optimizer.state[name], buf)
    return True


@SETTINGS
@given(data=st.binary(max_size=2048))
def test_random_bytes_are_refused(tmp_path, data):
    path = tmp_path / "random.npz"
    path.write_bytes(data)
    _refused(path)


@SETTINGS
@given(zip_header=st.booleans(), data=st.binary(max_size=512))
def test_random_bytes_inside_a_zip_are_refused(tmp_path, zip_header, data):
    path = tmp_path / "zip.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("meta.npy", (b"\x93NUMPY\x01\x00" if zip_header else b"") + data)
        z.writestr("params.npy", data)
    _refused(path)


@SETTINGS
@given(cut=st.floats(0, 1, exclude_max=True))
def test_every_truncation_is_refused(tmp_path, saved, cut):
    data, _ = saved
    path = tmp_path / "cut.npz"
    path.write_bytes(data[:int(cut * len(data))])
    _refused(path)


@SETTINGS
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
                      min_size=1, max_size=3))
def test_bit_flips_are_refused_or_harmless(tmp_path, saved, flips):
    data, model = saved
    damaged = bytearray(data)
    for where, bit in flips:
        damaged[int(where * len(data))] ^= 1 << bit
    path = tmp_path / "flipped.npz"
    path.write_bytes(bytes(damaged))
    _loads_as_saved_or_refused(path, model)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) |
                    st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) |
                    st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
FIELDS = ["sizes", "activations", "dtype", "seed", "backend", "epochs_trained", "optimizer"]


@SETTINGS
@given(field=st.sampled_from(FIELDS + ["optimizer.config", "optimizer.step_count",
                                        "optimizer.state", "optimizer.config.lr",
                                        "optimizer.config.betas", "optimizer.config.name"]),
       value=JSON | st.sampled_from([-1, 0, 1, 2 ** 53, [4, 3, 2], ["relu"], "float32",
                                     "float64", "numba", "adam", []]))
def test_crafted_metadata_is_refused_or_loads_as_it_says(tmp_path, capsys, field, value):
    meta = _meta()
    *parents, key = field.split(".")
    node = meta
    for name in parents:
        node = node[name]
    node[key] = value
    path = _build(tmp_path / "crafted.npz", meta)
    try:
        model = bpk.load(path)
    except bpk.CheckpointError as err:
        assert str(path) in str(err) and "\n" not in str(err)
        return
    # It loaded: the model is what the metadata says (the backend falls back where unknown).
    state = model.state()[0]
    for name in ("sizes", "activations", "dtype", "seed", "epochs_trained"):
        assert state[name] == meta[name], name
    assert state["optimizer"]["step_count"] == meta["optimizer"]["step_count"]
    expected = bpk.optim.optimizer_from_config(meta["optimizer"]["config"]).config()
    assert state["optimizer"]["config"] == expected
    np.testing.assert_array_equal(model.params, _arrays()["params"])


@SETTINGS
@given(shape=st.lists(st.integers(0, 30), max_size=3).map(tuple),
       dtype=st.sampled_from(["float64", "float32", "<f8", ">f8", "int64", "float16", "complex128",
                              "bool", "<U3", "uint8"]))
def test_arrays_of_any_shape_and_dtype_are_refused_or_right(tmp_path, shape, dtype):
    arrays = _arrays()
    arrays["params"] = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape).astype(dtype)
    path = _build(tmp_path / "shape.npz", arrays=arrays)
    try:
        model = bpk.load(path)
    except bpk.CheckpointError as err:
        assert str(path) in str(err) and "\n" not in str(err)
        assert shape != (N_PARAMS,) or np.dtype(dtype).name != "float64"
        return
    assert shape == (N_PARAMS,) and np.dtype(dtype).name == "float64"
    np.testing.assert_array_equal(model.params, arrays["params"].astype(np.float64))


def test_a_member_marked_encrypted_is_a_clear_error(tmp_path):
    """A flipped bit found by the property test above: the central directory's flag saying a
    member is encrypted made zipfile raise RuntimeError (asking for a password)."""
    path = tmp_path / "m.npz"
    bpk.MLP([5, 4, 3], seed=1).save(path)
    data = bytearray(path.read_bytes())
    central = data.rindex(b"PK\x01\x02")  # the last member's central directory record
    data[central + 8] |= 0x1  # its general-purpose flags: encrypted
    path.write_bytes(bytes(data))
    with pytest.raises(bpk.CheckpointError, match="marked encrypted"):
        bpk.load(path)
