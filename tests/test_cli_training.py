"""`bpk train`'s schedule, early-stopping, history and plot options: the rates recorded are the
ones bpkernels.lr_scheduler gives for the run's steps; early stopping keeps the best epoch's
weights in the checkpoint; every bad value is one line and exit 2."""
import csv
import math
import sys

import numpy as np
import pytest

import bpkernels as bpk
from bpkernels import cli, datasets
from bpkernels import lr_scheduler as S
from test_cli import assert_one_error, run

FAST = ["--backend", "numpy", "--layers", "32", "--no-progress", "--batch-size", "64"]
N_TRAIN = 1437  # digits' 1797 rows less the 20% test split
STEPS = math.ceil(N_TRAIN / 64)


def _column(path, name):
    with open(path, newline="") as f:
        return [float(row[name]) for row in csv.DictReader(f)]


def _last_step_rates(sched, epochs, base):
    sched.start(bpk.Adam(lr=base))
    rates, _ = sched.rates(epochs * STEPS)
    return list(rates[STEPS - 1::STEPS])


@pytest.mark.parametrize("options,schedule", [
    (["--lr-schedule", "cosine"], lambda: S.CosineAnnealingLR(4 * STEPS)),
    (["--lr-schedule", "step:2:0.5"], lambda: S.StepLR(2 * STEPS, 0.5)),
    (["--warmup-epochs", "2"], lambda: S.LinearLR(0.01, 1.0, 2 * STEPS)),
    (["--lr-schedule", "cosine", "--warmup-epochs", "1"],
     lambda: S.SequentialLR([S.LinearLR(0.01, 1.0, STEPS), S.CosineAnnealingLR(3 * STEPS)],
                            [STEPS])),
    (["--lr-schedule", "onecycle"], lambda: S.OneCycleLR(0.01, 4 * STEPS)),
])
def test_the_recorded_rates_are_the_schedules(capsys, tmp_path, options, schedule):
    history = tmp_path / "h.csv"
    code, out, _ = run(capsys, "train", *FAST, "--epochs", 4, "--lr", 0.01, *options,
                       "--history", history)
    assert code == 0 and "learning rate: " in out
    assert _column(history, "lr") == pytest.approx(_last_step_rates(schedule(), 4, 0.01),
                                                   rel=1e-12)


def test_a_resumed_run_continues_the_checkpoints_schedule(capsys, tmp_path):
    ck, h1, h2 = tmp_path / "m.npz", tmp_path / "1.csv", tmp_path / "2.csv"
    assert run(capsys, "train", *FAST, "--epochs", 2, "--lr", 0.01, "--lr-schedule",
               "step:1:0.5", "--save", ck, "--history", h1)[0] == 0
    code, out, _ = run(capsys, "train", *FAST, "--epochs", 2, "--resume", ck, "--history", h2)
    assert code == 0 and "StepLR (the checkpoint's, continued)" in out
    whole = _last_step_rates(S.StepLR(STEPS, 0.5), 4, 0.01)
    assert _column(h1, "lr") + _column(h2, "lr") == pytest.approx(whole, rel=1e-12)


def test_early_stopping_keeps_the_best_epoch_in_the_checkpoint(capsys, tmp_path):
    ck, history = tmp_path / "m.npz", tmp_path / "h.csv"
    code, out, _ = run(capsys, "train", *FAST, "--epochs", 60, "--lr", 0.02,
                       "--early-stopping", 2, "--save", ck, "--history", history)
    assert code == 0
    assert "split: 1293 train / 144 validation / 360 test" in out
    val = _column(history, "val_loss")
    best = int(np.argmin(val)) + 1
    assert len(val) < 60 and f"kept the weights of epoch {best} (best val_loss)" in out
    # The checkpoint holds the best epoch's weights: its loss on the validation rows is the
    # best one recorded (the split and standardization redone as the run did them).
    X, y = datasets.load("digits")
    X_tr, _, y_tr, _ = datasets.train_test_split(X, y, 0.2, seed=0, stratify=True)
    X_tr, X_val, y_tr, y_val = datasets.train_test_split(X_tr, y_tr, 0.1, seed=0, stratify=True)
    X_tr, X_val = datasets.standardize(X_tr, X_val)
    model = bpk.load(ck)
    assert model.evaluate(X_val, y_val, loss="cross_entropy")["loss"] == \
        pytest.approx(val[best - 1], rel=1e-5)


def test_plateau_watches_a_validation_split(capsys, tmp_path):
    code, out, _ = run(capsys, "train", *FAST, "--epochs", 2, "--lr-schedule", "plateau")
    assert code == 0 and "validation / 360 test" in out and "val_loss" in out


def test_a_plot_is_written(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    code, _, _ = run(capsys, "train", *FAST, "--epochs", 2, "--plot", tmp_path / "c.png")
    assert code == 0 and (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_a_diverged_run_leaves_its_history(capsys, tmp_path):
    history = tmp_path / "h.csv"
    code, _, err = run(capsys, "train", *FAST, "--epochs", 3, "--optimizer", "sgd", "--lr",
                       "1e30", "--history", history)
    assert code == 3 and history.exists()


@pytest.mark.parametrize("options,words", [
    (["--lr-schedule", "linear"], "expected cosine, onecycle, plateau or step:STEP_SIZE:GAMMA"),
    (["--lr-schedule", "step:0:0.5"], "step:STEP_SIZE:GAMMA takes epochs >= 1"),
    (["--lr-schedule", "step:2:1.5"], "a gamma in [0, 1]"),
    (["--lr-schedule", "plateau", "--warmup-epochs", "1"], "does not combine"),
    (["--lr-schedule", "cosine", "--warmup-epochs", "3", "--epochs", "3"],
     "leaves none of the 3 epochs"),
    (["--warmup-epochs", "-1"], "must be >= 0"),
    (["--early-stopping", "x"], "expected an integer >= 0"),
    (["--clip-grad-norm", "0"], "expected a finite number > 0, got '0'"),
    (["--clip-grad-norm", "-1"], "expected a finite number > 0"),
    (["--clip-grad-norm", "nan"], "expected a finite number > 0"),
    (["--clip-grad-norm", "inf"], "expected a finite number > 0"),
    (["--clip-grad-norm", "x"], "expected a finite number > 0"),
    (["--history", "{tmp}/m.npz", "--save", "{tmp}/m.npz"], "is the --save checkpoint"),
    (["--history", "{tmp}/nowhere/h.csv"], "h.csv"),
    (["--plot", "{tmp}"], "is a folder"),
])
def test_bad_values_are_one_line(capsys, tmp_path, options, words):
    options = [o.replace("{tmp}", str(tmp_path)) for o in options]
    code, _, err = run(capsys, "train", *FAST, *options)
    assert code == 2
    assert words in assert_one_error(err)


def test_clip_grad_norm_reaches_fit(capsys, monkeypatch):
    """--clip-grad-norm X trains with fit(clip_grad_norm=X), and says so."""
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["clip_grad_norm"])
        return fit(*args, **kwargs)
    fit = cli.fit
    monkeypatch.setattr(cli, "fit", spy)
    code, out, _ = run(capsys, "train", *FAST, "--epochs", 1, "--clip-grad-norm", "0.25")
    assert code == 0 and seen == [0.25] and "gradient clipping: to L2 norm 0.25" in out
    seen.clear()
    assert run(capsys, "train", *FAST, "--epochs", 1)[0] == 0 and seen == [None]


def test_history_naming_the_data_file_is_refused(capsys, tmp_path):
    data = tmp_path / "d.npz"
    np.savez(data, X=np.zeros((20, 3)), y=np.arange(20) % 2)
    before = data.read_bytes()
    code, _, err = run(capsys, "train", *FAST, "--data", data, "--history", data)
    assert code == 2 and "--history" in assert_one_error(err)
    assert data.read_bytes() == before


def test_plot_without_matplotlib_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = run(capsys, "train", *FAST, "--plot", tmp_path / "c.png")
    assert code == 2 and "--plot needs matplotlib" in assert_one_error(err)
