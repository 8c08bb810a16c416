"""Tests for the `bpk` command line: run in-process through bpkernels.cli.main (fast), plus one
subprocess run of `python -m bpkernels.cli` for the real exit codes and streams."""
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bpkernels
from bpkernels import backends, cli
from bpkernels.backends.numpy_backend import NumpyBackend
from bpkernels.progress import epoch_line
from bpkernels import datasets as ds

# (the CLI trains by fit(); on the Numba backend kernel by kernel here: conftest.py)
pytestmark = pytest.mark.usefixtures("numba_kernel_by_kernel")

# Small and quick: enough to see learning, not to tune anything.
FAST = ["--epochs", "3", "--layers", "32", "--no-progress"]


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def metric(out, name):
    match = re.search(rf"^{re.escape(name)}: ([0-9.]+)$", out, re.MULTILINE)
    assert match, f"no {name!r} line in:\n{out}"
    return float(match.group(1))


def assert_one_error(err, prefix="bpk: error:"):
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    assert lines[0].startswith(prefix), lines[0]
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def needs_digits():
    pytest.importorskip("sklearn", reason="the digits data set needs scikit-learn")


# ------------------------------------------------------------------ training
def test_default_command_reaches_97_percent_on_digits(capsys, needs_digits):
    # The exact command a new user types first: its defaults are tuned to pass this.
    code, out, _ = run(capsys, "train")
    assert code == 0
    assert metric(out, "test accuracy") >= 0.97
    assert "data set: digits" in out and "dtype: float32" in out
    assert f"backend: {bpkernels.available_backends()[0]}" in out  # "auto": the fastest here


def test_train_digits_few_epochs_summary(capsys, needs_digits):
    code, out, err = run(capsys, "train", *FAST, "--seed", "1", "--optimizer", "sgd",
                         "--lr", "0.1", "--dtype", "float64", "--activation", "tanh")
    assert code == 0 and err == ""
    assert metric(out, "test accuracy") > 0.9
    for line in ("split: 1437 train / 360 test (seed 1)", "dtype: float64",
                 "epochs: 3 run, 3 in total", "optimizer: SGD(lr=0.1"):
        assert line in out
    for name in ("final train loss", "test loss", "seconds", "samples/s"):
        metric(out.replace(",", ""), name)


def test_quiet_prints_nothing(capsys):
    code, out, err = run(capsys, "train", "--data", "synthetic", *FAST, "--quiet")
    assert (code, out, err) == (0, "", "")


def test_save_then_resume_counts_epochs_on(capsys, tmp_path):
    ckpt = tmp_path / "model.npz"
    args = ["--data", "synthetic", "--layers", "16", "--no-progress", "--save", ckpt]
    assert run(capsys, "train", *args, "--epochs", "2", "--seed", "3")[0] == 0
    first = bpkernels.load(ckpt)
    assert first.epochs_trained == 2 and first.optimizer.name == "adam"
    steps = first.optimizer.step_count

    code, out, _ = run(capsys, "train", *args, "--resume", ckpt, "--epochs", "3")
    assert code == 0
    assert "epochs: 3 run, 5 in total" in out
    # Without --seed the checkpoint's seed splits the data, so the old test rows stay unseen.
    assert "(seed 3)" in out
    resumed = bpkernels.load(ckpt)
    assert resumed.epochs_trained == 5
    # The restored optimizer continued (its step count ran on) instead of a fresh one.
    assert resumed.optimizer.step_count == steps * 5 // 2

    # --lr alone keeps the restored optimizer (and its state), with the new step size.
    code, out, _ = run(capsys, "train", *args, "--resume", ckpt, "--epochs", "1", "--lr", "0.0005")
    assert code == 0 and "optimizer: Adam(lr=0.0005" in out
    assert bpkernels.load(ckpt).optimizer.step_count == steps * 6 // 2


def test_save_over_the_data_is_refused_before_training(capsys, tmp_path):
    X, y = ds.make_classification(60, 3, 2, seed=1)
    npz, csv = tmp_path / "mydata.npz", tmp_path / "mydata.csv"
    np.savez(npz, X=X, y=y)
    csv.write_text("\n".join(",".join(f"{v:.6f}" for v in row) + f",{label}"
                             for row, label in zip(X, y)) + "\n")
    link = tmp_path / "link.npz"
    link.symlink_to(npz)
    mnist = tmp_path / "mnist"
    mnist.mkdir()
    (mnist / "train-images-idx3-ubyte").write_bytes(b"images")
    cases = [(npz, npz, "the --data file"), (csv, csv, "the --data file"),
             (npz, link, "the --data file"),
             (mnist, mnist / "train-images-idx3-ubyte", "a file of the --data folder")]
    for data, save, what in cases:
        before = {p: p.read_bytes() for p in (npz, csv, mnist / "train-images-idx3-ubyte")}
        code, out, err = run(capsys, "train", "--data", data, "--save", save, *FAST)
        assert code == 2 and out == "", (data, save)
        line = assert_one_error(err)
        assert f"--save {save}: is {what}" in line and "overwrite the data set" in line
        assert {p: p.read_bytes() for p in before} == before  # nothing written, nothing trained
    # A new file beside the data is no input: allowed.
    assert run(capsys, "train", "--data", npz, "--save", tmp_path / "model.npz", *FAST)[0] == 0


def test_resume_rejects_data_of_another_shape(capsys, tmp_path):
    ckpt = tmp_path / "m.npz"
    assert run(capsys, "train", "--data", "synthetic", *FAST, "--save", ckpt)[0] == 0
    code, _, err = run(capsys, "train", "--data", "synthetic-regression", "--resume", ckpt, *FAST)
    assert code == 2
    line = assert_one_error(err)
    assert str(ckpt) in line and "20 inputs and 4 outputs" in line


def test_resume_rejects_conflicting_architecture(capsys, tmp_path):
    ckpt = tmp_path / "m.npz"
    assert run(capsys, "train", "--data", "synthetic", *FAST, "--save", ckpt)[0] == 0
    code, _, err = run(capsys, "train", "--data", "synthetic", "--resume", ckpt, "--layers", "64")
    assert code == 2 and "--layers 64" in assert_one_error(err)


def test_csv_file_with_named_label_column(capsys, tmp_path):
    X, y = ds.make_classification(300, 5, 3, seed=2)
    path = tmp_path / "data.csv"
    lines = ["kind," + ",".join(f"f{i}" for i in range(5))]
    lines += [f"{label}," + ",".join(f"{v:.6f}" for v in row) for row, label in zip(X, y)]
    path.write_text("\n".join(lines) + "\n")
    code, out, _ = run(capsys, "train", "--data", path, "--label", "kind", *FAST, "--epochs", "10")
    assert code == 0
    assert "(300 rows, 5 features, 3 classes)" in out
    assert metric(out, "test accuracy") > 0.6
    # The same column by index.
    assert run(capsys, "train", "--dataset", path, "--label", "0", *FAST)[0] == 0


def test_npz_file_with_two_regression_targets(capsys, tmp_path):
    X, y = ds.make_regression(400, 6, n_targets=2, seed=3)
    path = tmp_path / "data.npz"
    np.savez(path, X=X, y=y)
    code, out, _ = run(capsys, "train", "--data", path, *FAST)
    assert code == 0
    assert "(400 rows, 6 features, 2 outputs)" in out and "loss: mse" in out
    assert "test accuracy" not in out


def test_regression_data_set_uses_mse(capsys):
    code, out, _ = run(capsys, "train", "--data", "synthetic-regression", *FAST, "--epochs", "10")
    assert code == 0
    assert "loss: mse" in out and "test accuracy" not in out
    # A trained model beats predicting the mean (loss ~ the targets' variance, ~1).
    assert metric(out, "test loss") < 0.5


def test_binary_cross_entropy_reports_accuracy(capsys, tmp_path):
    X, y = ds.make_classification(300, 4, 2, seed=4)
    path = tmp_path / "binary.npz"
    np.savez(path, X=X, y=y)
    code, out, _ = run(capsys, "train", "--data", path, "--loss", "binary_cross_entropy", *FAST)
    assert code == 0 and "sizes [4, 32, 1]" in out
    assert 0.0 <= metric(out, "test accuracy") <= 1.0


# ------------------------------------------------------------------ user errors: exit 2, one line
@pytest.mark.parametrize("argv, expected", [
    ([], "required"),
    (["fly"], "invalid choice"),
    (["train", "--no-such-option"], "unrecognized"),
    (["train", "--backend", "tpu"], "numpy"),
    (["train", "--activation", "swish"], "relu"),
    (["train", "--loss", "hinge"], "cross_entropy"),
    (["train", "--optimizer", "lbfgs"], "adamw"),
    (["train", "--dtype", "float16"], "float32"),
    (["train", "--epochs", "-1"], "--epochs"),
    (["train", "--epochs", "many"], "--epochs"),
    (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--layers", "0"], "--layers"),
    (["train", "--layers", "128,x"], "--layers"),
    (["train", "--layers", ""], "--layers"),
    (["train", "--lr", "-1"], "--lr"),
    (["train", "--seed", "-3"], "--seed"),
    (["train", "--label", "2"], ".csv"),
    (["train", "--data", "no-such-set"], "synthetic-regression"),
    (["train", "--data", "synthetic", "--test-size", "1.5"], "test_size"),
])
def test_bad_arguments(capsys, argv, expected):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert expected in assert_one_error(err)


def test_missing_files_are_named(capsys, tmp_path):
    for option in ("--data", "--resume"):
        missing = tmp_path / "absent" / "file.npz"
        code, _, err = run(capsys, "train", option, missing, *FAST)
        assert code == 2 and str(missing) in assert_one_error(err)
    code, _, err = run(capsys, "train", "--data", "synthetic", "--save", tmp_path / "no" / "m.npz")
    assert code == 2 and str(tmp_path / "no") in assert_one_error(err)


@pytest.mark.parametrize("content", [b"not a data file", b"PK\x03\x04 truncated zip"])
def test_corrupt_data_file(capsys, tmp_path, content):
    path = tmp_path / "broken.npz"
    path.write_bytes(content)
    code, _, err = run(capsys, "train", "--data", path, *FAST)
    assert code == 2 and str(path) in assert_one_error(err)


def test_ragged_csv(capsys, tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("1,2,0\n3,4\n")
    code, _, err = run(capsys, "train", "--data", path, *FAST)
    assert code == 2 and "ragged" in assert_one_error(err)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_checkpoint(capsys, tmp_path, damage):
    ckpt = tmp_path / "m.npz"
    if damage == "garbage":
        ckpt.write_bytes(b"\x00" * 64)
    else:
        assert run(capsys, "train", "--data", "synthetic", *FAST, "--save", ckpt)[0] == 0
        ckpt.write_bytes(ckpt.read_bytes()[:200])
    code, _, err = run(capsys, "train", "--data", "synthetic", "--resume", ckpt, *FAST)
    assert code == 2 and str(ckpt) in assert_one_error(err)


@pytest.fixture
def fake_missing_backend(monkeypatch):
    """A registered backend whose module cannot be imported, as when its extra is missing."""
    entry = ("no_such_gpu_package", "Fake", "cuda12")  # (module, class, pip extra)
    monkeypatch.setitem(backends._REGISTRY, "fakegpu", entry)
    monkeypatch.setattr(backends, "_unavailable", {})
    return "fakegpu"


def test_backend_not_installed_names_the_extra(capsys, fake_missing_backend):
    code, _, err = run(capsys, "train", "--backend", fake_missing_backend, *FAST)
    assert code == 2 and 'bpkernels[cuda12]' in assert_one_error(err)


# ------------------------------------------------------------------ what a run prints
SETTINGS = ("data set:", "split:", "model:", "backend:", "dtype:", "threads:", "optimizer:",
            "loss:", "checkpoint:")


def test_settings_print_before_training(capsys):
    code, out, err = run(capsys, "train", "--data", "synthetic", "--epochs", "2",
                         "--layers", "8,8", "--backend", "numpy", "--dtype", "float64",
                         "--threads", "1")
    assert code == 0
    lines = out.splitlines()
    assert [line.split(":")[0] + ":" for line in lines[:len(SETTINGS)]] == list(SETTINGS)
    assert "model: sizes [20, 8, 8, 4] (hidden 8,8, relu,relu activation)" in out
    assert "backend: numpy (--backend numpy)" in out and "dtype: float64" in out
    assert "threads: 1 (--threads 1)" in out
    assert "checkpoint: none" in out
    # The results follow, after training.
    assert lines[len(SETTINGS)] == "epochs: 2 run, 2 in total"


def test_auto_backend_says_why(capsys):
    code, out, _ = run(capsys, "train", "--data", "synthetic", *FAST, "--backend", "auto")
    fastest = bpkernels.available_backends()[0]
    assert code == 0 and f"backend: {fastest} (auto: the fastest available here)" in out


def test_settings_come_before_the_first_epoch_line(tmp_path):
    """As a terminal shows the two streams: the settings (stdout), then one line per epoch
    (stderr), then the results."""
    done = subprocess.run(
        [sys.executable, "-m", "bpkernels.cli", "train", "--data", "synthetic", "--epochs", "3",
         "--layers", "8", "--backend", "numpy"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert done.returncode == 0, done.stdout
    lines = done.stdout.splitlines()
    epochs = [i for i, line in enumerate(lines) if line.startswith("epoch ")]
    assert len(epochs) == 3
    assert max(i for i, line in enumerate(lines) if line.startswith("checkpoint:")) < epochs[0]
    assert lines.index("epochs: 3 run, 3 in total") > epochs[-1]


def _shown_lines(text: str) -> list[str]:
    """The lines a terminal keeps: each line's text after its last carriage return, with the
    erase-line escape dropped."""
    return [line.split("\r")[-1].replace("\x1b[K", "") for line in text.split("\n")]


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal (so the live bar is drawn)."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [False, True], ids=["log", "terminal"])
def test_each_epoch_leaves_one_line_of_at_most_80_columns(capsys, monkeypatch, terminal):
    if terminal:
        pytest.importorskip("tqdm")
        monkeypatch.setattr(sys, "stderr", _Terminal())
        monkeypatch.setenv("COLUMNS", "120")  # wider than 80: the lines still fit 80
    code, out, err = run(capsys, "train", "--data", "synthetic", "--epochs", "4", "--layers",
                         "8", "--backend", "numpy", "--batch-size", "4")
    if terminal:
        err = sys.stderr.getvalue()
        assert "\r" in err  # the live bar was drawn, then erased
        for segment in err.replace("\n", "\r").split("\r"):
            assert len(segment.replace("\x1b[K", "").rstrip()) <= 80, segment
    assert code == 0
    shown = [line for line in _shown_lines(err) if line.strip()]
    assert len(shown) == 4 and all(line.startswith(f"epoch {i + 1}/4 ")
                                   for i, line in enumerate(shown)), shown
    assert all("val_acc" in line for line in shown)
    for line in out.splitlines() + shown:
        assert len(line) <= 80, line


def test_epoch_lines_fit_80_columns_whatever_the_numbers():
    record = {"loss": 123456.789, "accuracy": 0.5, "val_loss": 98765.4321,
              "val_accuracy": 0.25, "samples_per_sec": 123456789.0}
    for epochs in (1, 40, 99999):
        line = epoch_line(epochs, epochs, record)
        assert len(line) <= 80 and line.startswith(f"epoch {epochs}/{epochs} loss 1.235e+05")
    assert "samples/s" in epoch_line(1, 3, {"loss": 0.5, "samples_per_sec": 1e6})


class _CompilingBackend(NumpyBackend):
    """A NumPy backend that says it compiles code for a model on its first epoch."""

    name = "numpy"

    def __init__(self) -> None:
        super().__init__()
        self.callbacks: list = []

    def on_compile(self, callback):
        self.callbacks.append(callback)
        return lambda: self.callbacks.remove(callback)

    def dense_forward(self, *args, **kwargs):
        for callback in list(self.callbacks):
            callback()  # every kernel call: the CLI must still say it once
        return super().dense_forward(*args, **kwargs)


def test_first_compile_is_announced_once(capsys, monkeypatch):
    backend = _CompilingBackend()
    monkeypatch.setattr(cli, "get_backend", lambda name: backend)
    real_mlp = cli.MLP
    monkeypatch.setattr(cli, "MLP", lambda *a, **kw: real_mlp(*a, **dict(kw, backend=backend)))
    code, out, _ = run(capsys, "train", "--data", "synthetic", *FAST, "--backend", "numpy")
    assert code == 0
    lines = out.splitlines()
    assert lines.count("compiling kernels for this model, first run only") == 1
    notice = lines.index("compiling kernels for this model, first run only")
    assert notice > max(i for i, line in enumerate(lines) if line.startswith("checkpoint:"))
    assert backend.callbacks == []  # unregistered once training is over


def test_no_compile_notice_from_a_backend_that_compiles_nothing(capsys):
    code, out, _ = run(capsys, "train", "--data", "synthetic", *FAST, "--backend", "numpy")
    assert code == 0 and "compiling" not in out


def test_resume_without_save_saves_back_to_the_resumed_file(capsys, tmp_path):
    ckpt = tmp_path / "model.npz"
    args = ["--data", "synthetic", "--layers", "8", "--no-progress", "--backend", "numpy"]
    assert run(capsys, "train", *args, "--epochs", "2", "--save", ckpt)[0] == 0
    code, out, _ = run(capsys, "train", *args, "--epochs", "3", "--resume", ckpt)
    assert code == 0
    assert bpkernels.load(ckpt).epochs_trained == 5  # the work of the resumed run was kept
    assert f"checkpoint: {ckpt} (the resumed file), saved after every epoch" in out
    assert f"checkpoint: saved to {ckpt} (the resumed file), 5 epochs in total" in out


def test_summary_names_the_checkpoint_only_when_saved(capsys, tmp_path):
    code, out, _ = run(capsys, "train", "--data", "synthetic", *FAST)
    assert code == 0 and "saved to" not in out and "checkpoint: none" in out
    ckpt = tmp_path / "m.npz"
    code, out, _ = run(capsys, "train", "--data", "synthetic", *FAST, "--save", ckpt)
    assert code == 0 and f"checkpoint: saved to {ckpt}, 3 epochs in total" in out


def test_gitignore_covers_every_venv_folder():
    root = Path(__file__).resolve().parents[1]
    names = [".venv", ".venv-gpu", ".venv312"]
    done = subprocess.run(["git", "check-ignore", *[f"{n}/x" for n in names]], cwd=root,
                          capture_output=True, text=True)
    if done.returncode not in (0, 1):
        pytest.skip("not a git checkout")
    assert done.stdout.split() == [f"{n}/x" for n in names]


# ------------------------------------------------------------------ divergence and Ctrl-C
def test_divergence_exits_3_and_keeps_finite_weights(capsys, tmp_path):
    ckpt = tmp_path / "diverged.npz"
    code, out, err = run(capsys, "train", "--data", "synthetic-regression", "--optimizer", "sgd",
                         "--lr", "1e6", *FAST, "--save", ckpt)
    # The settings were printed before training; no summary of a run that failed.
    assert code == 3 and out.startswith("data set:") and "test loss" not in out
    line = assert_one_error(err)
    assert "diverged" in line and str(ckpt) in line
    model = bpkernels.load(ckpt)  # load() refuses non-finite weights
    assert all(np.isfinite(W).all() for W, _ in model.get_weights())


def _interrupting_fit(monkeypatch, at_epoch):
    """Make the CLI's fit() raise KeyboardInterrupt after ``at_epoch`` epochs, before the CLI's
    own per-epoch save runs, as a Ctrl-C in the middle of training would."""
    real_fit = cli.fit

    def fit(*args, callbacks=(), **kwargs):
        def ctrl_c(epoch, record):
            if epoch == at_epoch:
                raise KeyboardInterrupt
        return real_fit(*args, callbacks=[ctrl_c, *callbacks], **kwargs)

    monkeypatch.setattr(cli, "fit", fit)


def test_ctrl_c_saves_the_current_model(capsys, tmp_path, monkeypatch):
    _interrupting_fit(monkeypatch, at_epoch=1)
    ckpt = tmp_path / "interrupted.npz"
    code, out, err = run(capsys, "train", "--data", "synthetic", *FAST, "--epochs", "5",
                         "--save", ckpt)
    assert code == 130 and out.startswith("data set:") and "test loss" not in out
    assert str(ckpt) in assert_one_error(err, prefix="bpk: interrupted")
    # Written by the interrupt handler: the per-epoch save of epoch 1 never ran.
    model = bpkernels.load(ckpt)
    assert model.epochs_trained == 1 and model.optimizer.step_count > 0


def test_ctrl_c_without_save(capsys, monkeypatch):
    _interrupting_fit(monkeypatch, at_epoch=1)
    code, out, err = run(capsys, "train", "--data", "synthetic", *FAST)
    assert code == 130 and "nothing saved" in assert_one_error(err, prefix="bpk: interrupted")


# ------------------------------------------------------------------ bpk info
def test_info_text(capsys):
    code, out, err = run(capsys, "info")
    assert code == 0 and err == ""
    for label in ("bpkernels: ", "Python: ", "NumPy: ", "platform: ", "CPU: ", "cores: ", "BLAS: "):
        assert f"\n{label}" in f"\n{out}", label
    assert "  numpy: available" in out


def test_info_json(capsys, fake_missing_backend):
    code, out, _ = run(capsys, "info", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["bpkernels"] == bpkernels.__version__
    assert info["packages"]["numpy"] == np.__version__
    assert info["backends"]["numpy"]["available"] is True
    missing = info["backends"][fake_missing_backend]
    assert missing["available"] is False and "bpkernels[cuda12]" in missing["reason"]


def test_info_shows_why_a_backend_is_unavailable(capsys, fake_missing_backend):
    code, out, _ = run(capsys, "info")
    assert code == 0
    assert re.search(r"^  fakegpu: unavailable: .*bpkernels\[cuda12\]", out, re.MULTILINE)


# ------------------------------------------------------------------ the real process
def test_module_entry_point_exit_codes_and_streams():
    base = [sys.executable, "-m", "bpkernels.cli", "train", "--data", "synthetic"]
    ok = subprocess.run(base + FAST, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "test accuracy: " in ok.stdout and ok.stderr == ""
    bad = subprocess.run(base + ["--epochs", "-2"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert_one_error(bad.stderr)
    # The installed console script, where this interpreter's environment has one.
    script = Path(sys.executable).with_name("bpk")
    if script.exists():
        version = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
        assert version.returncode == 0 and bpkernels.__version__ in version.stdout
