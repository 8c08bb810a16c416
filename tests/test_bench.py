"""The benchmark's numbers are honest: parity is asserted (never time), the JSON holds one
record per (name, config, dtype) with every documented field, and the floor is real work."""
import json
import math

import numpy as np
import pytest

import bpkernels as bpk
from bpkernels import bench

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
    # Ratios are derivable from the JSON alone, and the stored ones agree with that.
    floor = {r["dtype"]: r["seconds_per_epoch"] for r in loaded["results"] if r["kind"] == "floor"}
    for record in loaded["results"]:
        if record["kind"] == "backend":
            assert record["floor_ratio"] == pytest.approx(record["seconds_per_epoch"] / floor[record["dtype"]])


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
    (["--backends", "tpu"], "--backends: unknown backend 'tpu'"),
    (["--configs", "Q"], "--configs: unknown config 'Q'"),
    (["--dtypes", "int8"], "--dtypes: unsupported dtype"),
    (["--peers", "jax"], "--peers: unknown peer 'jax'"),
    (["--repeats", "0"], "must be >= 1"),
    (["--json", "/no/such/folder/b.json"], "does not exist"),
])
def test_bpk_bench_bad_options(args, match, capsys):
    from bpkernels.cli import main
    assert main(["bench", "--quick", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bpk: error:") and match in err[0]
