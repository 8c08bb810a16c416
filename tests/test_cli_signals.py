"""`bpk train --save` stopped by a signal (issue 18 item 11): SIGTERM and SIGHUP end the run as
Ctrl-C does, with a final loadable checkpoint and no temporary file, whenever they arrive, a
save in progress included; after a SIGKILL mid-save, the next save sweeps what it left.
Real processes, real signals: the signal is sent when the save's temporary file appears."""
import os
import signal
import subprocess
import sys
import time

import pytest

import bpkernels as bpk

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

# Big enough that a save (about 3 MB, fsync'd) lasts a few milliseconds, small enough that an
# epoch is quick.
COMMAND = [sys.executable, "-m", "bpkernels.cli", "train", "--data", "synthetic", "--backend",
           "numpy", "--layers", "512,512", "--epochs", "500", "--no-progress", "--seed", "1"]


def _start(ckpt):
    return subprocess.Popen(COMMAND + ["--save", str(ckpt)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _temporaries(folder):
    return [n for n in os.listdir(folder) if n.endswith(".tmp")]


def _wait_for(condition, process, timeout=120.0, may_end=False):
    """Poll until ``condition()``; False if the process ended first and ``may_end``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            if may_end:
                return False
            pytest.fail(f"bpk train ended early:\n{process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("timed out")
        time.sleep(0.0002)
    return True


def _during_a_save(process, folder):
    """Return while a save's temporary file exists (a save is in progress)."""
    _wait_for(lambda: (folder / "m.npz").exists(), process)  # past the first epoch
    _wait_for(lambda: bool(_temporaries(folder)), process)


def _finish(process):
    out, err = process.communicate(timeout=120)
    return process.returncode, err.strip().splitlines()


@pytest.mark.parametrize("signame, moment", [
    ("SIGTERM", "during a save"), ("SIGTERM", "during a save"), ("SIGHUP", "during a save"),
    ("SIGTERM", "between saves"), ("SIGHUP", "between saves"),
    ("SIGTERM", "twice during a save"), ("SIGHUP", "twice during a save"),
])
def test_a_stop_signal_leaves_a_final_loadable_checkpoint_and_no_temporary(tmp_path, signame,
                                                                          moment):
    number = getattr(signal, signame)
    ckpt = tmp_path / "m.npz"
    process = _start(ckpt)
    if moment == "between saves":
        _wait_for(lambda: ckpt.exists(), process)
        time.sleep(0.05)
    else:
        _during_a_save(process, tmp_path)
    process.send_signal(number)
    if moment.startswith("twice"):
        # The second comes during the final save (or the per-epoch one still running).
        if _wait_for(lambda: bool(_temporaries(tmp_path)), process, may_end=True):
            process.send_signal(number)
    code, err = _finish(process)
    assert code == 128 + number, err
    assert len(err) == 1 and err[0].startswith(f"bpk: stopped by {signame}"), err
    assert str(ckpt) in err[0]
    assert os.listdir(tmp_path) == ["m.npz"]  # no temporary left behind
    model = bpk.load(ckpt)  # the final checkpoint loads (or, when stopped twice, the last one)
    assert model.epochs_trained >= 1 and model.optimizer.step_count > 0
    if not moment.startswith("twice"):
        assert "model saved to" in err[0]


def test_after_sigkill_mid_save_the_next_save_sweeps_the_temporary(tmp_path):
    ckpt = tmp_path / "m.npz"
    left = 0
    for _ in range(3):
        process = _start(ckpt)
        _during_a_save(process, tmp_path)
        process.kill()
        process.wait()
        left += len(_temporaries(tmp_path))
        model = bpk.load(ckpt)  # the last complete save is intact
        model.save(ckpt)  # the next save of the same checkpoint sweeps the dead process's
        assert os.listdir(tmp_path) == ["m.npz"]
    assert left >= 1  # the kill did land mid-save, leaving a temporary to sweep


def test_sigterm_before_training_exits_with_its_code(tmp_path):
    process = subprocess.Popen(COMMAND + ["--save", str(tmp_path / "m.npz")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: bool(process.stdout.readline()), process)  # the settings: loaded
    process.send_signal(signal.SIGTERM)
    code, err = _finish(process)
    assert code == 128 + signal.SIGTERM and len(err) == 1 and "SIGTERM" in err[0], err
    assert [n for n in os.listdir(tmp_path) if n != "m.npz"] == []
