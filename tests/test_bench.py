"""The benchmark's numbers are honest: parity is asserted (never time), the JSON holds one
record per (name, config, dtype) with every documented field, and the floor is real work."""
import json
import math

import numpy as np
import pytest

import bpkernels as bpk
from bpkernels import bench, workload

FIELDS = {"name", "kind", "config", "dtype", "seconds_per_epoch", "epochs_per_sec",
          "samples_per_sec", "gflops", "compile_seconds", "parity_rel_err"}
# Agreement with the float64 NumPy reference after 20 SGD steps from the same weights and
# batches: float64 to rounding, float32 to its precision over a short trajectory.
PARITY = {"float64": 1e-11, "float32": 1e-5}


@pytest.fixture(scope="module")
def quick_run():
    config = bench.parse_config("20-16-4:8:30")
    options = bench.BenchOptions(backends=bpk.available_backends(), configs=[config],
                                 dtypes=["float32", "float64"], peers=["torch", "sklearn"],
                                 repeats=2)
    notes: list[str] = []
    results = bench.run(options, notes=notes)
    return results, notes


def test_every_backend_agrees_with_the_float64_reference(quick_run):
    results, _ = quick_run
    checked = 0
    for r in results:
        if r.kind == "backend" or r.name in ("torch", "sklearn"):
            assert r.parity_rel_err is not None and r.parity_rel_err <= PARITY[r.dtype], r
            checked += 1
    assert checked >= 2 * len(bpk.available_backends())


def test_one_record_per_name_config_dtype_and_json_fields(quick_run, tmp_path):
    results, notes = quick_run
    keys = [(r.name, r.config, r.dtype) for r in results]
    assert len(keys) == len(set(keys))
    assert {("gemm-floor", "20-16-4:8:30", d) for d in ("float32", "float64")} <= set(keys)
    payload = bench.to_json(results, bench.machine_info(), notes)
    path = tmp_path / "bench.json"
    bench.write_json(str(path), payload)
    loaded = json.loads(path.read_text())
    assert {"cpu", "cores", "threads", "blas", "numpy"} <= set(loaded["machine"])
    for record in loaded["results"]:
        assert FIELDS <= set(record)
        assert record["kind"] in ("backend", "peer", "floor")
        assert record["min_seconds"] <= record["seconds_per_epoch"] <= record["max_seconds"]
        assert math.isclose(record["epochs_per_sec"] * record["seconds_per_epoch"], 1.0)
    # Ratios are derivable from the JSON alone (the median of the per-round ratios), and the
    # stored ones agree with that.
    floor = {r["dtype"]: r["round_seconds"] for r in loaded["results"] if r["kind"] == "floor"}
    for record in loaded["results"]:
        assert len(record["round_seconds"]) == record["repeats"] == 2
        if record["kind"] == "backend":
            per_round = [t / f for t, f in zip(record["round_seconds"], floor[record["dtype"]])]
            assert record["floor_ratio"] == pytest.approx(sum(per_round) / 2)


def test_missing_peers_are_noted_not_fatal(quick_run):
    results, notes = quick_run
    names = {r.name for r in results}
    for peer, module in (("torch", "torch"), ("sklearn", "sklearn")):
        try:
            __import__(module)
        except ImportError:
            assert peer not in names
            assert any(note.startswith(f"{peer} skipped") for note in notes)
        else:
            assert peer in names


def test_table_shows_every_record(quick_run):
    results, _ = quick_run
    text = bench.table(results)
    assert len(text.splitlines()) == len(results) + 2
    assert "x floor" in text and "parity" in text


def test_flops_count_the_three_gemms():
    config = bench.Config("t", (3, 5, 2), 4, 10)
    # forward 3*5 + 5*2, dW the same, dX only for the second layer: per row 2 * (15*2 + 10*3)
    assert config.flops_per_epoch() == 2 * (15 * 2 + 10 * 3) * 10
    assert config.batch_rows() == [4, 4, 2]


def test_floor_does_the_products_of_an_epoch(monkeypatch):
    config = bench.Config("t", (3, 5, 2), 4, 10)
    calls = []
    real = np.matmul
    monkeypatch.setattr(np, "matmul", lambda a, b, out: calls.append((a.shape, b.shape)) or real(a, b, out=out))
    bench.gemm_floor_epoch(config, "float32")()
    # 3 steps x (2 forward + 2 dW + 1 dX)
    assert len(calls) == 15
    assert ((4, 3), (3, 5)) in calls and ((2, 5), (5, 2)) in calls and ((5, 4), (4, 2)) in calls


def _result(name: str, kind: str, seconds: list[float] | None, threads: int | None = 1,
            median: float | None = None) -> bench.Result:
    config = bench.Config("t", (3, 5, 2), 4, 10)
    result = bench.Result.from_times(name, kind, config, "float32", seconds or [median],
                                     compile_seconds=None, parity_rel_err=None, threads=threads)
    result.round_seconds = seconds
    return result


def test_ratios_are_medians_of_the_per_round_ratios():
    # Round 2 ran under load (everything slower), round 3 only the floor was slow. Worked by
    # hand: numpy / floor per round 3/1, 5/2, 4/4 -> median 2.5 (the ratio of the medians,
    # 4/2, would be 2); torch / numpy per round 2/3, 10/5, 2/4 -> median 2/3 (medians: 0.5);
    # torch / floor 2/1, 10/2, 2/4 -> median 2 (so the floor runs at 2x torch's epochs/s).
    results = [_result("gemm-floor", "floor", [1.0, 2.0, 4.0]),
               _result("numpy", "backend", [3.0, 5.0, 4.0]),
               _result("torch", "peer", [2.0, 10.0, 2.0])]
    rel = bench.ratios(results)
    assert rel[0] == (None, pytest.approx(2.0))
    assert rel[1] == (pytest.approx(2.5), pytest.approx(2 / 3))
    assert rel[2] == (pytest.approx(2.0), pytest.approx(1.0))
    records = bench.to_json(results, {})["results"]
    assert [r["floor_ratio"] for r in records] == [None, rel[1][0], rel[2][0]]
    assert records[1]["round_seconds"] == [3.0, 5.0, 4.0]
    assert "2.50" in bench.table(results).splitlines()[3]


def test_ratios_against_an_entry_timed_apart_are_ratios_of_medians():
    # The CUDA floor is timed by CUDA events on its own: no rounds to pair with.
    results = [_result("gemm-floor-cuda", "floor", None, threads=None, median=2.0),
               _result("cupy", "backend", [3.0, 5.0, 4.0], threads=None)]
    assert bench.ratios(results)[1][0] == pytest.approx(4.0 / 2.0)


def test_interleaved_warms_up_each_entry_then_takes_turns_under_its_count():
    calls = []

    def factory(name):
        def make_epoch():
            calls.append(("make", name, bpk.get_num_threads()))
            seconds = iter([10.0, 1.0, 2.0, 3.0])

            def epoch():
                calls.append(("epoch", name, bpk.get_num_threads()))
                return next(seconds)
            return epoch
        return make_epoch

    timed = bench._interleaved([(1, factory("floor")), (1, factory("a")), (2, factory("b"))], 3)
    assert timed == [(10.0, [1.0, 2.0, 3.0])] * 3
    assert calls == [("make", "floor", 1), ("epoch", "floor", 1), ("make", "a", 1),
                     ("epoch", "a", 1), ("make", "b", 2), ("epoch", "b", 2)] + \
        [("epoch", "floor", 1), ("epoch", "a", 1), ("epoch", "b", 2)] * 3


def test_run_times_floor_backends_and_peers_in_turns(monkeypatch):
    """bench.run with fake epochs: one warm-up each, then rounds of floor, backend A, backend
    B, peer, count by count; the reported ratios are those of the rounds."""
    from bpkernels import peers
    calls = []
    seconds = {"gemm-floor": [1.0, 2.0, 4.0], "numpy": [3.0, 5.0, 4.0],
               "numba": [2.0, 2.0, 2.0], "torch": [2.0, 10.0, 2.0]}

    def fake(name):
        def make_epoch():
            count = bpk.get_num_threads()
            times = iter([9.0] + seconds[name])
            return lambda: calls.append((name, count)) or next(times)
        return make_epoch

    trajectory = bench.Trajectory([1.0], [np.ones(2)])
    monkeypatch.setattr(bench, "backend_trajectory", lambda *args, **kwargs: trajectory)
    monkeypatch.setattr(bench, "floor_epochs", lambda config, dtype: fake("gemm-floor"))
    monkeypatch.setattr(bench, "backend_epochs", lambda name, *args: fake(name))
    monkeypatch.setattr(peers, "peer_entries", lambda peer, config, dtype, threads, data: [
        peers.PeerEntry(peer, threads, fake(peer), lambda reference: (0.0, ""))])
    options = bench.BenchOptions(backends=["numpy", "numba"], configs=[bench.Config("t", (3, 5, 2), 4, 10)],
                                 dtypes=["float32"], peers=["torch"], repeats=3, threads=[1, 2])
    results = bench.run(options)
    block = [(name, count) for count in (1, 2) for name in ("gemm-floor", "numpy", "numba", "torch")]
    assert calls == block * 4  # the warm-up round, then 3 timed rounds
    assert [(r.name, r.threads) for r in results] == [
        ("gemm-floor", 1), ("gemm-floor", 2), ("numpy", 1), ("numpy", 2), ("numba", 1),
        ("numba", 2), ("torch", 1), ("torch", 2)]
    rel = bench.ratios(results)
    numpy_1 = results.index(next(r for r in results if r.name == "numpy"))
    assert rel[numpy_1] == (pytest.approx(2.5), pytest.approx(2 / 3))
    assert all(r.parity_rel_err == 0.0 for r in results if r.kind != "floor")
    assert [r.compile_seconds for r in results if r.name == "numpy"] == [5.0, 5.0]


@pytest.mark.parametrize("spec, match", [("X", "unknown config"), ("10-5:8", "unknown config"),
                                         ("10-0-2:8:100", "positive"), ("10:8:100", "two positive")])
def test_bad_configs(spec, match):
    with pytest.raises(ValueError, match=match):
        bench.parse_config(spec)


def test_plot_writes_a_png(quick_run, tmp_path):
    pytest.importorskip("matplotlib")
    results, _ = quick_run
    path = tmp_path / "bench.png"
    bench.plot(results, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bpk_bench_quick_writes_table_json_and_plot(tmp_path, capsys):
    from bpkernels.cli import main
    args = ["bench", "--quick", "--configs", "S,20-16-4:8:30", "--dtypes", "float32,float64",
            "--json", str(tmp_path / "b.json")]
    try:
        import matplotlib  # noqa: F401
        args += ["--plot", str(tmp_path / "b.png")]
    except ImportError:
        pass
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "gemm-floor" in out and "numpy" in out
    payload = json.loads((tmp_path / "b.json").read_text())
    names = {(r["name"], r["config"], r["dtype"]) for r in payload["results"]}
    for backend in bpk.available_backends():
        assert (backend, "S", "float64") in names
    assert all(r["parity_rel_err"] <= PARITY[r["dtype"]]
               for r in payload["results"] if r["kind"] == "backend")


@pytest.mark.parametrize("args, match", [
    (["--training", "foo"], "--training: unknown training 'foo'; valid: sgd, cosine-clip"),
    (["--training", "sgd,cosine-clip", "--ranks", "1"], "--ranks times plain SGD only"),
    (["--backends", "tpu"], "--backends: unknown backend 'tpu'"),
    (["--configs", "Q"], "--configs: unknown config 'Q'"),
    (["--dtypes", "int8"], "--dtypes: unsupported dtype"),
    (["--peers", "mxnet"], "--peers: unknown peer 'mxnet'"),
    (["--repeats", "0"], "must be >= 1"),
    (["--json", "/no/such/folder/b.json"], "does not exist"),
])
def test_bpk_bench_bad_options(args, match, capsys):
    from bpkernels.cli import main
    assert main(["bench", "--quick", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bpk: error:") and match in err[0]


# --------------------------------------------------------------------------- training variants
@pytest.fixture(scope="module")
def variant_run(tmp_path_factory):
    """``bpk bench --training sgd,cosine-clip`` on a quick config: its table and JSON."""
    import contextlib
    import io
    from bpkernels.cli import main
    path = tmp_path_factory.mktemp("variants") / "b.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["bench", "--quick", "--configs", "20-16-4:8:30", "--dtypes",
                     "float32,float64", "--training", "sgd,cosine-clip",
                     "--json", str(path)]) == 0
    return out.getvalue(), json.loads(path.read_text())["results"]


def test_every_backend_has_a_variant_entry_that_agrees(variant_run):
    _, records = variant_run
    found = {(r["name"], r["dtype"]): r for r in records}
    for backend in bpk.available_backends():
        for dtype in ("float32", "float64"):
            r = found[f"{backend}+cosine-clip", dtype]
            assert r["kind"] == "backend" and r["training"] == "cosine-clip"
            assert r["parity_rel_err"] <= PARITY[dtype], r
            assert len(r["round_seconds"]) == 2
            assert "training" not in found[backend, dtype]


def test_variant_ratio_is_the_median_of_the_rounds_against_plain_sgd(variant_run):
    text, records = variant_run
    plain = {(r["name"], r["dtype"]): r for r in records if "training" not in r}
    variants = [r for r in records if "training" in r]
    assert variants
    for r in variants:
        base = plain[r["name"].split("+")[0], r["dtype"]]
        per_round = [b / v for b, v in zip(base["round_seconds"], r["round_seconds"])]
        assert r["training_ratio"] == pytest.approx(sum(per_round) / 2)
        assert f"{r['training_ratio']:.3f}" in text
    assert "x sgd" in text


def test_the_default_run_trains_plain_sgd_only(quick_run):
    results, notes = quick_run
    assert not [r for r in results if "+" in r.name or r.extra.get("training")]
    records = bench.to_json(results, {}, notes)["results"]
    assert not [r for r in records if "training" in r or "training_ratio" in r]
    assert "x sgd" not in bench.table(results)


def test_variants_take_turns_beside_their_backend_and_peers_stay_plain(monkeypatch):
    """bench.run with fake epochs: each backend's variant runs right after it in every round,
    peers get no variant, and each parity is against the reference trained the same way."""
    from bpkernels import peers
    calls, parities = [], []
    seconds = {"gemm-floor": [1.0, 1.0, 1.0], "numpy": [3.0, 4.0, 2.0],
               "numpy+cosine-clip": [3.0, 8.0, 4.0], "torch": [1.0, 1.0, 1.0]}

    def fake(name):
        def make_epoch():
            times = iter([9.0] + seconds[name])
            return lambda: calls.append(name) or next(times)
        return make_epoch

    def trajectory(backend, config, dtype, comm=None, training="sgd"):
        return bench.Trajectory([1.0], [np.ones(2) * (2.0 if training == "sgd" else 3.0)])

    monkeypatch.setattr(bench, "backend_trajectory", trajectory)
    monkeypatch.setattr(bench, "floor_epochs", lambda config, dtype: fake("gemm-floor"))
    monkeypatch.setattr(bench, "backend_epochs", lambda name, config, dtype, data,
                        training="sgd": fake(name if training == "sgd" else f"{name}+{training}"))
    monkeypatch.setattr(peers, "peer_entries", lambda peer, config, dtype, threads, data: [
        peers.PeerEntry(peer, threads, fake(peer), lambda ref: parities.append(ref) or (0.0, ""))])
    options = bench.BenchOptions(backends=["numpy"], configs=[bench.Config("t", (3, 5, 2), 4, 10)],
                                 dtypes=["float32"], peers=["torch"], repeats=3, threads=1,
                                 training=["cosine-clip", "sgd", "cosine-clip"])
    results = bench.run(options)
    assert calls == ["gemm-floor", "numpy", "numpy+cosine-clip", "torch"] * 4
    assert [r.name for r in results] == ["gemm-floor", "numpy", "numpy+cosine-clip", "torch"]
    assert results[2].extra == {"training": "cosine-clip"}
    assert all(r.parity_rel_err == 0.0 for r in results if r.kind != "floor")
    assert parities[0].weights[0][0] == 2.0  # the peer: against plain SGD's reference
    # per round 3/3, 4/8, 2/4 -> median 0.5 (the ratio of the medians would be 3/4)
    assert bench.training_ratios(results) == {2: results[1]}
    assert bench.to_json(results, {})["results"][2]["training_ratio"] == pytest.approx(0.5)
    assert "0.500-1.000" in bench.table(results)


def test_bad_training_in_options():
    options = bench.BenchOptions(backends=["numpy"], configs=[], dtypes=[], peers=[],
                                 training=["sgd", "adam"])
    with pytest.raises(ValueError, match="unknown training 'adam'; valid: sgd, cosine-clip"):
        bench.run(options)


def test_the_timed_variant_trains_as_fit_does():
    """The timed epochs (bench._open_fit) feed the per-step schedule and clipping as fit(...,
    lr_scheduler_interval="step") does: the same weights after two epochs."""
    config = bench.parse_config("20-16-4:8:30")
    X, y = bench.workload(config, "float64")
    timed = bpk.MLP(config.sizes, dtype="float64", seed=bench.SEED)
    epoch = bench._open_fit(timed, X, y, bpk.SGD(lr=bench.LEARNING_RATE), config.batch,
                            "cosine-clip")
    epoch(), epoch()
    fitted = bpk.MLP(config.sizes, dtype="float64", seed=bench.SEED)
    options = bench.training_options("cosine-clip", config.steps)
    assert options["lr_scheduler"].T_max == 20 * config.steps
    bpk.fit(fitted, X, y, optimizer=bpk.SGD(lr=bench.LEARNING_RATE), epochs=2,
            batch_size=config.batch, seed=bench.SEED, **options)
    plain = bpk.MLP(config.sizes, dtype="float64", seed=bench.SEED)
    bpk.fit(plain, X, y, optimizer=bpk.SGD(lr=bench.LEARNING_RATE), epochs=2,
            batch_size=config.batch, seed=bench.SEED)
    for (W, b), (W2, b2), (W3, _) in zip(timed.get_weights(), fitted.get_weights(),
                                          plain.get_weights()):
        np.testing.assert_array_equal(W, W2)
        np.testing.assert_array_equal(b, b2)
        assert not np.allclose(W, W3)  # the schedule and the clipping changed the steps


# --------------------------------------------------------------------------- LayerNorm and dropout
REG = "20-16-4:8:30+reg"


def test_reg_configs_add_layer_norm_and_dropout_and_leave_the_others_alone():
    m, m_reg = bench.parse_config("M"), bench.parse_config("M+reg")
    assert (m.dropout, m.norm) == (0.0, None)
    assert (m_reg.sizes, m_reg.batch, m_reg.samples) == (m.sizes, m.batch, m.samples)
    assert (m_reg.dropout, m_reg.norm) == (0.1, "layer")
    custom = bench.parse_config(REG)
    assert (custom.name, custom.sizes, custom.batch, custom.samples) == (REG, (20, 16, 4), 8, 30)
    assert (custom.dropout, custom.norm) == (0.1, "layer")
    assert bench.parse_config("S+reg").sizes == bench.CONFIGS["S"].sizes
    # a "+" inside a custom config is int()'s sign, as before: no suffix there
    plus = bench.parse_config("784-10:+128:600")
    assert (plus.batch, plus.samples, plus.dropout, plus.norm) == (128, 600, 0.0, None)
    quick = m_reg.quick()
    assert (quick.samples, quick.dropout, quick.norm) == (3 * 128 + 1, 0.1, "layer")


@pytest.mark.parametrize("spec, match", [
    ("+reg", "unknown config"), ("X+reg", "unknown config 'X\\+reg'"),
    ("M+reg+reg", "already has"), ("10:8:100+reg", "two positive")])
def test_bad_reg_configs(spec, match):
    with pytest.raises(ValueError, match=match):
        bench.parse_config(spec)


@pytest.fixture(scope="module")
def reg_run(tmp_path_factory):
    """``bpk bench --configs 20-16-4:8:30+reg`` on NumPy and Numba with the peers: its table
    and JSON."""
    import contextlib
    import io
    from bpkernels.cli import main
    path = tmp_path_factory.mktemp("reg") / "b.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["bench", "--quick", "--configs", REG, "--dtypes", "float32,float64",
                     "--backends", "numpy,numba", "--peers", "torch,sklearn",
                     "--json", str(path)]) == 0
    return out.getvalue(), json.loads(path.read_text())


def test_reg_config_trains_on_numpy_and_numba_and_agrees_with_the_reference(reg_run):
    _, payload = reg_run
    found = {(r["name"], r["dtype"]): r for r in payload["results"]}
    for backend in ("numpy", "numba"):
        for dtype in ("float32", "float64"):
            r = found[backend, dtype]
            # same seed, steps and rows: the same dropout masks as the float64 reference
            assert r["parity_rel_err"] <= PARITY[dtype], r
    for r in payload["results"]:
        assert (r["config"], r["dropout"], r["norm"]) == (REG, 0.1, "layer")


def test_torch_parity_is_na_under_dropout(reg_run):
    pytest.importorskip("torch")
    text, payload = reg_run
    for r in payload["results"]:
        if r["name"] == "torch":
            assert r["parity_rel_err"] is None and r["note"].startswith("parity n/a: dropout")
    rows = [line.split() for line in text.splitlines() if line.startswith("torch ")]
    assert rows and all(row[-1] == "n/a" for row in rows)
    assert f"note: torch {REG} float32: parity n/a: dropout masks differ" in text


def test_sklearn_skips_reg_configs_with_a_note(reg_run):
    pytest.importorskip("sklearn")
    text, payload = reg_run
    assert "sklearn" not in {r["name"] for r in payload["results"]}
    assert any(n.startswith(f"sklearn skipped on {REG}: MLPClassifier has no LayerNorm")
               for n in payload["notes"])


def test_torch_peer_builds_layer_norm_and_dropout():
    torch = pytest.importorskip("torch")
    from bpkernels import peers
    model = peers._torch_model(torch, bench.parse_config(REG), "float32", "cpu")
    assert [type(m).__name__ for m in model] == ["Linear", "LayerNorm", "ReLU", "Dropout", "Linear"]
    norm, dropout = model[1], model[3]
    assert norm.eps == 1e-5 and norm.normalized_shape == (16,) and dropout.p == 0.1
    assert torch.equal(norm.weight, torch.ones(16)) and torch.equal(norm.bias, torch.zeros(16))
    W = workload.initial_weights(bench.parse_config(REG))[0][0]
    np.testing.assert_array_equal(model[0].weight.detach().numpy(), W.T.astype(np.float32))


def test_torch_peer_with_layer_norm_alone_is_compared_step_for_step():
    """Without dropout nothing is drawn: torch's LayerNorm network follows our reference."""
    torch = pytest.importorskip("torch")
    from bpkernels import peers
    config = bench.Config("t", (20, 16, 12, 4), 8, 30, norm="layer")
    reference = bench.backend_trajectory("numpy", config, "float64")
    error, note = peers._torch_parity(torch, "cpu", config, "float64", None)(reference)
    assert error <= PARITY["float64"] and note == ""


def test_a_backend_without_the_configs_kernels_is_skipped_with_a_note(monkeypatch):
    """As the CuPy backend without LayerNorm (played here by Numba): the run goes on
    without it."""
    real = bench.Config.model

    def model(self, backend="numpy", dtype="float32"):
        if backend == "numba":
            raise ValueError("backend 'numba' has no LayerNorm kernels")
        return real(self, backend, dtype)

    monkeypatch.setattr(bench.Config, "model", model)
    monkeypatch.setattr(bench, "backend_trajectory",
                        lambda *args, **kwargs: bench.Trajectory([1.0], [np.ones(2)]))
    monkeypatch.setattr(bench, "backend_epochs", lambda *args, **kwargs: lambda: lambda: 1.0)
    notes: list[str] = []
    options = bench.BenchOptions(backends=["numba", "numpy"], configs=[bench.parse_config(REG)],
                                 dtypes=["float32", "float64"], peers=[], repeats=1,
                                 threads=[1, 2])
    results = bench.run(options, notes=notes)
    assert [r.name for r in results] == ["gemm-floor", "gemm-floor", "numpy", "numpy"] * 2
    assert notes == [f"numba skipped on {REG}: backend 'numba' has no LayerNorm kernels"]


# --------------------------------------------------------------------------- the JAX peer
@pytest.fixture(scope="module")
def jax_run():
    """The jax entries on config S (a few batches: --quick's), float32 and float64."""
    pytest.importorskip("jax")
    from bpkernels import peers_jax
    options = bench.BenchOptions(backends=["numpy"], configs=[bench.parse_config("S").quick()],
                                 dtypes=["float32", "float64"], peers=["jax"], repeats=2,
                                 threads=peers_jax.xla_threads())
    notes: list[str] = []
    return bench.run(options, notes=notes), notes


def test_jax_entries_agree_with_the_float64_reference(jax_run):
    results, notes = jax_run
    found = {(r.name, r.dtype): r for r in results if r.kind == "peer"}
    assert set(found) == {(name, dtype) for name in ("jax", "jax-scan")
                          for dtype in ("float32", "float64")}
    for (name, dtype), r in found.items():
        assert r.parity_rel_err is not None and r.parity_rel_err <= PARITY[dtype], r
        assert r.threads is not None and r.extra["jax"] and len(r.round_seconds) == 2
    assert not notes


def test_jax_peer_with_layer_norm_alone_is_compared_step_for_step():
    jax = pytest.importorskip("jax")
    from bpkernels import peers_jax
    config = bench.Config("t", (20, 16, 12, 4), 8, 30, norm="layer")
    reference = bench.backend_trajectory("numpy", config, "float64")
    for scan in (False, True):
        error, note = peers_jax.parity(jax, config, "float64", scan)(reference)
        assert error <= PARITY["float64"] and note == ""


def test_jax_is_skipped_at_a_count_xla_does_not_run(monkeypatch):
    pytest.importorskip("jax")
    from bpkernels import peers, peers_jax
    monkeypatch.setattr(peers_jax, "xla_threads", lambda: 2)
    config = bench.parse_config("20-16-4:8:30")
    data = bench.workload(config, "float32")
    with pytest.raises(peers.PeerUnavailable, match="jax skipped at 1 thread") as why:
        peers.peer_entries("jax", config, "float32", 1, data)
    assert why.value.count_only
    assert [e.threads for e in peers.peer_entries("jax", config, "float32", 2, data)] == [2, 2]


def test_jax_missing_is_a_note_naming_the_install(monkeypatch):
    import builtins
    real = builtins.__import__

    def no_jax(name, *args, **kwargs):
        if name == "jax" or name.startswith("jax."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_jax)
    options = bench.BenchOptions(backends=["numpy"], configs=[bench.parse_config("20-16-4:8:30")],
                                 dtypes=["float32"], peers=["jax"], repeats=1, threads=[1, 2])
    notes: list[str] = []
    results = bench.run(options, notes=notes)
    assert not [r for r in results if r.kind == "peer"]
    assert notes == ["jax skipped: JAX is not installed (pip install jax)"]
