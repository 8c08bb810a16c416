"""`bpk train --class-weight` and `--metrics`: they reach fit() as class_weight and metrics, the
metrics are recorded per epoch and reported on the test split; a bad value is one line and
exit 2."""
import csv

import pytest

from bpkernels import cli
from test_cli import assert_one_error, run

FAST = ["--backend", "numpy", "--layers", "16", "--no-progress", "--batch-size", "128",
        "--epochs", "1"]


@pytest.mark.parametrize("text, expected", [("balanced", "balanced"),
                                            ("0:2,3:0.5", {0: 2.0, 3: 0.5})])
def test_class_weight_reaches_fit(capsys, monkeypatch, text, expected):
    pytest.importorskip("sklearn", reason="the digits data set needs scikit-learn")
    seen = []
    real_fit = cli.fit

    def spy(*args, **kwargs):
        seen.append(kwargs.get("class_weight"))
        return real_fit(*args, **kwargs)
    monkeypatch.setattr(cli, "fit", spy)
    code, out, err = run(capsys, "train", *FAST, "--class-weight", text)
    assert code == 0, err
    assert seen == [expected]


@pytest.mark.parametrize("text", ["heavy", "0:-1", "0:1,0:2", "a:1", "1", "0:nan", "-1:2"])
def test_bad_class_weight_is_one_line_and_exit_2(capsys, text):
    code, out, err = run(capsys, "train", *FAST, "--class-weight", text)
    assert code == 2 and out == ""
    assert "--class-weight" in assert_one_error(err)


def test_a_class_the_data_lacks_is_one_line_and_exit_2(capsys):
    pytest.importorskip("sklearn", reason="the digits data set needs scikit-learn")
    code, _, err = run(capsys, "train", *FAST, "--quiet", "--class-weight", "12:1")
    assert code == 2
    assert "class_weight has an unknown class 12" in assert_one_error(err)


def test_metrics_are_recorded_and_reported(capsys, tmp_path):
    pytest.importorskip("sklearn", reason="the digits data set needs scikit-learn")
    history = tmp_path / "h.csv"
    code, out, err = run(capsys, "train", *FAST, "--epochs", 2, "--metrics", "f1_macro,top5",
                         "--history", history)
    assert code == 0, err
    with open(history, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for name in ("f1_macro", "top5", "val_f1_macro", "val_top5"):
        assert all(0.0 <= float(row[name]) <= 1.0 for row in rows), name
    line = [x for x in out.splitlines() if x.startswith("test metrics: ")]
    assert len(line) == 1 and "f1_macro 0." in line[0] and "top5 " in line[0]


@pytest.mark.parametrize("text", ["f1_micro", "", "top0", "f1_macro,f1_macro", "mse,,nope"])
def test_bad_metrics_are_one_line_and_exit_2(capsys, text):
    code, out, err = run(capsys, "train", *FAST, "--metrics", text)
    assert code == 2 and out == ""
    assert "--metrics" in assert_one_error(err)


def test_a_metric_the_loss_lacks_is_one_line_and_exit_2(capsys):
    pytest.importorskip("sklearn", reason="the digits data set needs scikit-learn")
    code, _, err = run(capsys, "train", *FAST, "--quiet", "--metrics", "r2")
    assert code == 2
    assert "metrics: 'r2' compares outputs with targets" in assert_one_error(err)


@pytest.mark.parametrize("command", ["train", "bench", "info"])
def test_help_prints_every_option(capsys, command):
    """argparse expands % in help texts: a literal one must be written %% (a "10% of" once
    made `bpk train --help` raise TypeError instead of printing)."""
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and "usage: bpk " + command in out
