"""The History of a fit kept as columns, a CSV file that reads back exactly, and a figure whose
lines are the recorded numbers (faults while writing: tests/test_atomic_writes.py)."""
import csv
import sys

import numpy as np
import pytest

import bpkernels as bpk


@pytest.fixture(scope="module")
def history():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(90, 4)), rng.integers(0, 3, 90)
    return bpk.fit(bpk.MLP([4, 8, 3], seed=0), X, y, epochs=4, batch_size=16,
                   validation_data=(X[:30], y[:30]),
                   lr_scheduler=bpk.lr_scheduler.StepLR(2))


def test_columns_are_the_records(history):
    columns = history.to_dict()
    assert list(columns) == list(history.epochs[0])
    for key, values in columns.items():
        assert values == [r[key] for r in history.epochs]
    assert columns["epoch"] == [1, 2, 3, 4] and columns["lr"] == [1e-3, 1e-3, 1e-4, 1e-4]
    assert history.history == columns


def test_csv_reads_back_exactly(history, tmp_path):
    path = tmp_path / "run.csv"
    history.to_csv(path)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == history.keys()
    assert [[float(v) for v in row] for row in rows[1:]] == \
        [[float(r[k]) for k in rows[0]] for r in history.epochs]


def test_records_missing_from_some_epochs_are_empty_cells(tmp_path):
    h = bpk.History([{"epoch": 1, "loss": 1.0}, {"epoch": 2, "loss": 0.5, "val_loss": 0.7}])
    assert h.to_dict() == {"epoch": [1, 2], "loss": [1.0, 0.5], "val_loss": [None, 0.7]}
    h.to_csv(tmp_path / "h.csv")
    assert (tmp_path / "h.csv").read_text() == "epoch,loss,val_loss\n1,1.0,\n2,0.5,0.7\n"


def test_plot_draws_the_recorded_numbers(history, tmp_path):
    pytest.importorskip("matplotlib")
    history.best_epoch = 3
    path = tmp_path / "curves.png"
    fig = history.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["loss", "accuracy"]
    for ax in fig.axes:
        lines = {line.get_label(): line for line in ax.get_lines()}
        name = ax.get_title()
        np.testing.assert_array_equal(lines["train"].get_ydata(), history[name])
        np.testing.assert_array_equal(lines["validation"].get_ydata(), history["val_" + name])
        np.testing.assert_array_equal(lines["train"].get_xdata(), history["epoch"])
        assert list(lines["best epoch (3)"].get_xdata()) == [3, 3]
    assert [ax.get_title() for ax in history.plot(metrics=["accuracy"]).axes] == ["accuracy"]


def test_plot_errors_name_what_is_wrong(history, monkeypatch):
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match="cannot plot \\['f1'\\]: the history has loss, accuracy"):
        history.plot(metrics=["f1"])
    with pytest.raises(ValueError, match="the history is empty"):
        bpk.History().plot()
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="History.plot needs matplotlib"):
        history.plot()
