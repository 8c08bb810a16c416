"""Every file bpkernels writes (checkpoints from the library and `bpk train --save`, benchmark
JSON and plots from `bpk bench`) is written whole or not at all (issue 18 items 11, 12, 13):
faults leave the previous file and no temporary file; stale temporary files of the same target
are swept, and nothing else; permissions as for any new file; long names; symbolic links."""
import errno
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import bpkernels as bpk
from bpkernels import atomic, bench, cli

FAST = ["--epochs", "2", "--layers", "8", "--no-progress"]
BENCH = ["bench", "--quick", "--backends", "numpy", "--configs", "20-16-4:8:30",
         "--dtypes", "float64"]


def _model(seed=1):
    model = bpk.MLP([3, 4, 2], backend="numpy", seed=seed)
    bpk.fit(model, np.ones((4, 3)), np.array([0, 1, 0, 1]), optimizer="adam", epochs=1)
    return model


def _results():
    return [bench.Result(name=name, kind=kind, config="S", dtype="float64",
                         seconds_per_epoch=0.5, epochs_per_sec=2.0, samples_per_sec=100.0,
                         gflops=1.0, compile_seconds=0.0, parity_rel_err=0.0, min_seconds=0.5,
                         max_seconds=0.5, repeats=2, threads=1)
            for name, kind in (("numpy", "backend"), ("gemm-floor", "floor"))]


def _write_json(path):
    bench.write_json(str(path), {"results": [1, 2, 3]})


def _write_plot(path):
    pytest.importorskip("matplotlib")
    bench.plot(_results(), str(path))


def _history():
    return bpk.History([{"epoch": 1, "loss": 0.5, "val_loss": 0.6},
                        {"epoch": 2, "loss": 0.25, "val_loss": 0.5}], best_epoch=2)


def _history_plot(path):
    pytest.importorskip("matplotlib")
    _history().plot(str(path))


# Every library writer: (name, write(path), file name)
WRITERS = [("model.save", lambda p: _model(seed=2).save(p), "m.npz"),
           ("checkpoint.write", lambda p: bpk.checkpoint.write(p, *_model(3).state()), "m.npz"),
           ("bench.write_json", _write_json, "b.json"),
           ("bench.plot", _write_plot, "b.png"),
           ("History.to_csv", lambda p: _history().to_csv(p), "h.csv"),
           ("History.plot", _history_plot, "h.png")]
WRITER_IDS = [w[0] for w in WRITERS]


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def _temps(folder):
    return [n for n in _listing(folder) if n.endswith(".tmp") or ".tmp" in n]


# ------------------------------------------------------------------ fault injection
class _FailingFile:
    """A file object whose writes fail as a full disk's do."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _inject(monkeypatch, fault, folder):
    """Make the next write into ``folder`` fail at one of its system calls."""
    folder = str(folder)
    if fault == "ENOSPC on write":
        real = os.fdopen
        monkeypatch.setattr(os, "fdopen", lambda *a, **k: _FailingFile(real(*a, **k)))
    elif fault == "EIO on fsync":
        def fsync(fd):
            raise OSError(errno.EIO, "Input/output error")
        monkeypatch.setattr(os, "fsync", fsync)
    elif fault == "EACCES on create":
        real_open = os.open

        def denied(path, *args, **kwargs):
            if os.path.dirname(os.path.abspath(path)) == folder:
                raise PermissionError(errno.EACCES, "Permission denied")
            return real_open(path, *args, **kwargs)
        monkeypatch.setattr(os, "open", denied)
    elif fault == "rename fails":
        def replace(src, dst):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        monkeypatch.setattr(os, "replace", replace)


FAULTS = ["ENOSPC on write", "EIO on fsync", "EACCES on create", "rename fails"]
ERRNO = {"ENOSPC on write": errno.ENOSPC, "EIO on fsync": errno.EIO,
         "EACCES on create": errno.EACCES, "rename fails": errno.EXDEV}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("name, write, filename", WRITERS, ids=WRITER_IDS)
def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(
        tmp_path, monkeypatch, name, write, filename, fault):
    path = tmp_path / filename
    path.write_bytes(b"the previous file")
    before = _listing(tmp_path)
    with monkeypatch.context() as patch:
        _inject(patch, fault, tmp_path)
        with pytest.raises(OSError) as info:
            write(path)
    assert info.value.errno == ERRNO[fault] and str(path) in str(info.value)
    assert path.read_bytes() == b"the previous file"
    assert _listing(tmp_path) == before  # no temporary left behind
    write(path)  # and the next write, without the fault, works
    assert path.read_bytes() != b"the previous file" and _listing(tmp_path) == before


@pytest.mark.parametrize("fault", ["ENOSPC on write", "EIO on fsync", "rename fails"])
def test_bpk_train_save_fault_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch, fault):
    ckpt = tmp_path / "m.npz"
    assert cli.main(["train", "--data", "synthetic", *FAST, "--save", str(ckpt)]) == 0
    before, listing = ckpt.read_bytes(), _listing(tmp_path)
    capsys.readouterr()
    _inject(monkeypatch, fault, tmp_path)
    code = cli.main(["train", "--data", "synthetic", *FAST, "--resume", str(ckpt)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("bpk: error:"), err
    assert str(ckpt) in err[0] and os.strerror(ERRNO[fault]) in err[0]
    assert ckpt.read_bytes() == before and _listing(tmp_path) == listing
    monkeypatch.undo()
    assert bpk.load(ckpt).epochs_trained == 2


def test_bpk_train_save_to_an_unwritable_folder_fails_before_training(tmp_path, capsys,
                                                                     monkeypatch):
    ckpt = tmp_path / "m.npz"
    ckpt.write_bytes(b"previous")
    _inject(monkeypatch, "EACCES on create", tmp_path)
    code = cli.main(["train", "--data", "synthetic", *FAST, "--save", str(ckpt)])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""  # nothing printed, nothing trained
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(ckpt) in lines[0] and "Permission denied" in lines[0]
    assert ckpt.read_bytes() == b"previous" and _listing(tmp_path) == ["m.npz"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes into read-only folders")
def test_bpk_train_save_to_a_read_only_folder_fails_before_training(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        code = cli.main(["train", "--data", "synthetic", *FAST, "--save", str(folder / "m.npz")])
    finally:
        folder.chmod(0o755)
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("fault", FAULTS)
def test_bpk_bench_json_fault_keeps_the_previous_file(tmp_path, capsys, monkeypatch, fault):
    path = tmp_path / "b.json"
    path.write_text('{"previous": true}')
    monkeypatch.setattr(bench, "run", lambda *a, **k: _results())
    _inject(monkeypatch, fault, tmp_path)
    code = cli.main([*BENCH, "--json", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(path) in err[0], err
    assert path.read_text() == '{"previous": true}' and _listing(tmp_path) == ["b.json"]


@pytest.mark.parametrize("option, filename", [("--json", "b.json"), ("--plot", "b.png")])
def test_bpk_bench_to_an_unwritable_folder_fails_before_the_benchmark(tmp_path, capsys,
                                                                     monkeypatch, option,
                                                                     filename):
    ran = []
    monkeypatch.setattr(bench, "run", lambda *a, **k: ran.append(1) or _results())
    _inject(monkeypatch, "EACCES on create", tmp_path)
    code = cli.main([*BENCH, option, str(tmp_path / filename)])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and ran == [] and len(err.strip().splitlines()) == 1
    assert str(tmp_path / filename) in err and "Permission denied" in err


# ------------------------------------------------------------------ item 12: modes and names
@pytest.mark.parametrize("name, write, filename", WRITERS, ids=WRITER_IDS)
def test_new_files_get_the_umask_and_replaced_ones_keep_their_mode(tmp_path, name, write,
                                                                   filename):
    if sys.platform == "win32":
        pytest.skip("POSIX permissions")
    old = os.umask(0o022)
    try:
        write(tmp_path / filename)
        assert (tmp_path / filename).stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        write(tmp_path / ("2" + filename))
        assert (tmp_path / ("2" + filename)).stat().st_mode & 0o777 == 0o600
        (tmp_path / filename).chmod(0o640)
        write(tmp_path / filename)
        assert (tmp_path / filename).stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


@pytest.mark.parametrize("length", [250, 255])
@pytest.mark.parametrize("name, write, filename", WRITERS, ids=WRITER_IDS)
def test_the_longest_names_save_again_and_again(tmp_path, name, write, filename, length):
    path = tmp_path / (filename[0] * (length - len(filename)) + filename)
    assert len(path.name) == length
    write(path)
    write(path)  # the second replaces the first through a temporary of a short name
    assert _listing(tmp_path) == [path.name]


def test_bpk_train_with_a_250_character_name_saves_every_epoch(tmp_path, capsys):
    ckpt = tmp_path / ("c" * 246 + ".npz")
    assert cli.main(["train", "--data", "synthetic", *FAST, "--save", str(ckpt)]) == 0
    assert bpk.load(ckpt).epochs_trained == 2 and _listing(tmp_path) == [ckpt.name]


def test_bpk_train_with_a_name_too_long_fails_before_training(tmp_path, capsys):
    ckpt = tmp_path / ("c" * 296 + ".npz")
    code = cli.main(["train", "--data", "synthetic", *FAST, "--save", str(ckpt)])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert "too long" in err and ckpt.name[:20] in err


def test_temporary_names_are_short_and_of_the_owned_pattern(tmp_path, monkeypatch):
    created = []
    real_open = os.open

    def spy(path, *args, **kwargs):
        created.append(os.path.basename(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(os, "open", spy)
    _model().save(tmp_path / ("x" * 255))
    temps = [n for n in created if n.endswith(".tmp")]
    assert len(temps) == 1 and len(temps[0]) <= 64 and atomic._TEMP.fullmatch(temps[0])


# ------------------------------------------------------------------ item 11: the sweep
def _temp_of(target, pid, host=None, rand="0123abcd"):
    host = host or atomic._digest(socket.gethostname(), 3)
    return target.parent / f".bpk-{atomic._digest(target.name)}-{host}-{pid}-{rand}.tmp"


def _dead_pid():
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_the_next_save_sweeps_only_its_own_stale_temporaries(tmp_path):
    target = tmp_path / "ck.npz"
    stale = [_temp_of(target, _dead_pid()),            # a killed process's
             _temp_of(target, os.getpid(), rand="ffff0000")]  # ours, not being written
    kept = [_temp_of(target, os.getppid()),            # a live process may be writing it
            _temp_of(target, _dead_pid(), host="abcdef"),  # another host's, on a shared folder
            _temp_of(tmp_path / "other.npz", _dead_pid()),  # another checkpoint's
            tmp_path / ".ck.npz.a1b2c3d4.tmp",         # not our pattern (an older version's)
            tmp_path / "ck.npz.tmp", tmp_path / ".bpk-notes.tmp",
            tmp_path / (_temp_of(target, _dead_pid()).name + ".keep"),
            tmp_path / ("x" + _temp_of(target, _dead_pid()).name)]
    for path in stale + kept:
        path.write_bytes(b"partial")
    _model().save(target)
    assert sorted(_listing(tmp_path)) == sorted([target.name] + [p.name for p in kept])
    assert all(p.read_bytes() == b"partial" for p in kept)


def test_a_sweep_spares_a_temporary_this_process_is_writing(tmp_path, monkeypatch):
    target = tmp_path / "ck.npz"
    seen = []

    def fill(f):
        atomic.sweep(target)  # as another thread's save of the same file would, meanwhile
        seen.append(_listing(tmp_path))
        f.write(b"content")
    atomic.write(target, fill)
    assert len(seen[0]) == 1 and atomic._TEMP.fullmatch(seen[0][0])
    assert target.read_bytes() == b"content" and _listing(tmp_path) == ["ck.npz"]


# ------------------------------------------------------------------ item 13: symbolic links
@pytest.mark.skipif(sys.platform == "win32", reason="symbolic links")
@pytest.mark.parametrize("name, write, filename", WRITERS, ids=WRITER_IDS)
def test_saving_through_links_keeps_them(tmp_path, name, write, filename):
    store, links = tmp_path / "store", tmp_path / "links"
    store.mkdir(), links.mkdir()
    real = store / filename
    real.write_bytes(b"old")
    link = links / ("link-" + filename)
    link.symlink_to(real)
    chain = links / ("chain-" + filename)
    chain.symlink_to(os.path.relpath(link, links))  # a relative link to a link
    for path in (link, chain):
        write(path)
        assert path.is_symlink() and real.read_bytes() != b"old"
        real.write_bytes(b"old")
    assert _listing(links) == sorted([link.name, chain.name])  # no temporary beside the links
    assert _listing(store) == [filename]
    dangling = links / ("dangling-" + filename)
    dangling.symlink_to(store / ("new-" + filename))
    write(dangling)  # creates the file the link names, as open(link, "w") would
    assert dangling.is_symlink() and (store / ("new-" + filename)).stat().st_size > 0


@pytest.mark.skipif(sys.platform == "win32", reason="symbolic links")
def test_links_that_lead_nowhere_are_named(tmp_path):
    loop_a, loop_b = tmp_path / "a.npz", tmp_path / "b.npz"
    loop_a.symlink_to(loop_b)
    loop_b.symlink_to(loop_a)
    with pytest.raises(OSError, match="loop") as info:
        _model().save(loop_a)
    assert info.value.errno == errno.ELOOP and str(loop_a) in str(info.value)
    into_nothing = tmp_path / "c.npz"
    into_nothing.symlink_to(tmp_path / "no" / "such" / "m.npz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _model().save(into_nothing)
    assert _listing(tmp_path) == ["a.npz", "b.npz", "c.npz"]


@pytest.mark.skipif(sys.platform == "win32", reason="symbolic links")
def test_bpk_train_save_through_a_link_keeps_the_link(tmp_path, capsys):
    real = tmp_path / "store" / "model.npz"
    real.parent.mkdir()
    link = tmp_path / "link.npz"
    link.symlink_to(real)
    assert cli.main(["train", "--data", "synthetic", *FAST, "--save", str(link)]) == 0
    assert link.is_symlink() and bpk.load(real).epochs_trained == 2
    assert cli.main(["train", "--data", "synthetic", *FAST, "--resume", str(link)]) == 0
    assert link.is_symlink() and bpk.load(real).epochs_trained == 4
    assert _listing(tmp_path) == ["link.npz", "store"] and _listing(real.parent) == ["model.npz"]


def test_bench_json_through_a_link(tmp_path):
    real = tmp_path / "results.json"
    link = tmp_path / "latest.json"
    link.symlink_to(real.name)
    bench.write_json(str(link), {"results": []})
    assert link.is_symlink() and json.loads(real.read_text()) == {"results": []}


def test_an_interrupt_inside_a_writer_stays_an_interrupt(tmp_path):
    """A stop signal inside np.savez: zipfile's close then raises ValueError over the
    KeyboardInterrupt ("Can't close the ZIP file while there is an open writing handle"); the
    write must still end as interrupted (the CLI's exit 128 + signal), the old file intact."""
    from bpkernels import atomic
    path = tmp_path / "f.zip"
    path.write_bytes(b"old")

    def fill(f):
        f.write(b"partial")
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:  # what zipfile's close raises over it
            raise ValueError("Can't close the ZIP file while there is an open writing handle")
    with pytest.raises(KeyboardInterrupt):
        atomic.write(path, fill)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.zip"]
