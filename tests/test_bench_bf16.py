"""`bpk bench --dtypes bf16`: the backends that run bf16, the torch peer under torch.autocast,
the GEMM floor by MKL's bf16 GEMM (or a note where it cannot run), scikit-learn skipped with a
note; every entry's agreement with the float64 reference is bfloat16's, not float32's."""
from __future__ import annotations

import pytest

import bpkernels as bpk
from bpkernels import bench
from bpkernels.backends import get_backend
from bpkernels.floor import floor_unavailable

# After the parity steps the bf16 runs sit ~1e-3 from the float64 reference (8 significant bits
# in every product's inputs); float32 runs ~1e-7 (test_bench.PARITY): both bounds are asserted,
# so an entry that silently trained in float32 fails.
BF16_PARITY = (1e-5, 2e-2)


@pytest.fixture(scope="module")
def bf16_run():
    config = bench.parse_config("20-16-4:8:30")
    backends = [name for name in bpk.available_backends()
                if get_backend(name).bf16_unavailable() is None]
    options = bench.BenchOptions(backends=backends, configs=[config], dtypes=["bf16"],
                                 peers=["torch", "sklearn"], repeats=2)
    notes: list[str] = []
    return bench.run(options, notes=notes), notes, backends


def test_bf16_entries_agree_with_the_reference_to_bf16_not_float32(bf16_run):
    results, _, backends = bf16_run
    low, high = BF16_PARITY
    seen = set()
    for r in results:
        assert r.dtype == "bf16"
        if r.kind == "backend" or r.name == "torch":
            assert low < r.parity_rel_err < high, r
            seen.add(r.name)
    assert set(backends) <= seen and "numpy" in seen


def test_torch_runs_under_autocast(bf16_run):
    pytest.importorskip("torch")
    results, _, _ = bf16_run
    torch_runs = [r for r in results if r.name == "torch"]
    assert torch_runs and all(BF16_PARITY[0] < r.parity_rel_err for r in torch_runs)


def test_floor_is_mkl_or_a_note(bf16_run):
    results, notes, _ = bf16_run
    floors = [r for r in results if r.kind == "floor"]
    why = floor_unavailable("bf16")
    if why is None:
        assert floors and all(r.seconds_per_epoch > 0 for r in floors)
    else:
        assert not floors and why in notes and why.startswith("gemm-floor skipped in bf16: ")


def test_sklearn_is_skipped_with_a_note(bf16_run):
    pytest.importorskip("sklearn")
    results, notes, _ = bf16_run
    assert "sklearn" not in {r.name for r in results}
    assert any(n.startswith("sklearn skipped in bf16") for n in notes)


def test_a_backend_without_bf16_is_noted(monkeypatch):
    from bpkernels.backends.numpy_backend import NumpyBackend
    monkeypatch.setattr(NumpyBackend, "bf16_unavailable", lambda self: "no bf16 here (test)")
    config = bench.parse_config("20-16-4:8:30")
    notes: list[str] = []
    results = bench.run(bench.BenchOptions(backends=["numpy"], configs=[config],
                                           dtypes=["bf16"], peers=[], repeats=1), notes=notes)
    assert not [r for r in results if r.name == "numpy"]
    assert "numpy skipped in bf16: no bf16 here (test)" in notes


def test_jax_runs_bf16_products_with_float32_accumulation():
    """Both jax entries (a jitted step per batch, and the epoch as one scan) trained with bf16
    products: bfloat16's agreement, not float32's, and float32 master weights."""
    jax = pytest.importorskip("jax")
    from bpkernels import peers_jax
    config = bench.parse_config("20-16-4:8:30")
    reference = bench.backend_trajectory("numpy", config, "float64")
    low, high = BF16_PARITY
    for scan in (False, True):
        error, note = peers_jax.parity(jax, config, "bf16", scan)(reference)
        assert low < error < high and note == ""
        train, weights = peers_jax.trainer(jax, config, "bf16", *bench.workload(config, "bf16"),
                                           scan)
        train()
        assert {w.dtype.name for w in weights()} == {"float32"}
