"""Files written whole or not at all: every file bpkernels writes (checkpoints, benchmark JSON
and plots) goes through :func:`write`.

The content goes to a temporary file beside the target, is flushed to disk, and is renamed
over the target only once complete, so a failed, interrupted or killed write never replaces
a good file. Temporary names are short and fixed-length (a 255-byte target name still has
room for one) and follow a pattern this module owns::

    .bpk-<hash of the target's name>-<hash of the host>-<process id>-<random>.tmp

so the next write of the same target can sweep the ones a killed process left behind, and
never touches any other file: only names of this pattern, for this target, from this host,
whose process is gone (or is this one, and is not writing it now).

A symbolic link (or a chain of them, dangling or not) is kept: the file it finally points to
is the one replaced, as ``open(link, "w")`` would write it. A new file gets the permissions
an ordinary file gets (0666 less the umask); a replaced one keeps its own.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import socket
import stat
import sys
import threading
from pathlib import Path
from typing import Callable, IO

# Temporary files this process is writing now (absolute paths): a sweep leaves them alone.
_writing: set[str] = set()
_writing_lock = threading.Lock()
_TEMP = re.compile(r"\.bpk-([0-9a-f]{10})-([0-9a-f]{6})-([0-9]+)-[0-9a-f]{8}\.tmp")


def target_of(path: str | os.PathLike) -> Path:
    """The file a write to ``path`` replaces: ``path``, or the file its links finally name."""
    path = Path(path)
    if not path.is_symlink():
        return path
    real = Path(os.path.realpath(path))
    if real.is_symlink():  # realpath stops where the links loop
        raise OSError(errno.ELOOP, f"cannot write {path}: its symbolic links form a loop")
    return real


def write(path: str | os.PathLike, fill: Callable[[IO[bytes]], object], what: str = "file") -> None:
    """Write ``path`` atomically: ``fill(f)`` writes the content to a binary file object.

    An OSError names ``what`` and ``path`` (the errno is kept); whatever fails, the previous
    file is intact and no temporary file remains."""
    target = target_of(path)
    folder = _folder(target, path, what)
    keep_mode = _mode_of(target)
    sweep(target)
    tmp = folder / _temp_name(target)
    key = os.path.abspath(tmp)
    with _writing_lock:
        _writing.add(key)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                     0o666)  # the umask decides, as for any new file
        try:
            with os.fdopen(fd, "wb") as f:
                fill(f)
                f.flush()
                if keep_mode is not None:
                    os.chmod(tmp, keep_mode)
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException as err:
            # KeyboardInterrupt included: the old file stays, the partial one goes.
            _unlink(tmp)
            interrupt = _interrupt_behind(err)
            if interrupt is not None:  # (not the error a writer's cleanup raised after it)
                raise interrupt from None
            raise
    except OSError as err:
        raise _named(err, what, path) from None
    finally:
        with _writing_lock:
            _writing.discard(key)
    _sync_folder(folder)


def _interrupt_behind(err: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt (Ctrl-C, or a stop signal acting as one) that ``err`` was raised
    while handling, if any: a signal inside np.savez leaves zipfile's close to raise
    ValueError ("Can't close the ZIP file while there is an open writing handle") over it, and
    the run must still end as stopped, not as an error."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return err
        seen.add(id(err))
        err = err.__context__
    return None


def check_writable(path: str | os.PathLike, what: str = "file") -> None:
    """Fail now, as :func:`write` would later, where ``path`` cannot be written: a missing or
    read-only folder, a name too long for its file system, a folder in the way."""
    target = target_of(path)
    folder = _folder(target, path, what)
    if target.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"cannot write {what} {path}: is a folder")
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):
        limit = 255  # the common limit where the file system does not say
    if len(os.fsencode(target.name)) > limit:
        raise OSError(errno.ENAMETOOLONG, f"cannot write {what} {path}: its name is too long "
                      f"({len(os.fsencode(target.name))} bytes; the file system allows {limit})")
    probe = folder / _temp_name(target)
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as err:
        raise _named(err, what, path) from None
    _unlink(probe)


def sweep(target: Path) -> list[Path]:
    """Remove the temporary files of ``target`` that earlier writes left (a killed process,
    a signal during clean-up); returns them."""
    prefix = f".bpk-{_digest(target.name)}-{_digest(socket.gethostname(), 3)}-"
    folder = target.parent
    try:
        names = [n for n in os.listdir(folder) if n.startswith(prefix)]
    except OSError:
        return []
    removed = []
    for name in names:
        match = _TEMP.fullmatch(name)
        if match is None:
            continue
        tmp = folder / name
        pid = int(match[3])
        with _writing_lock:
            busy = os.path.abspath(tmp) in _writing
        if busy or (pid != os.getpid() and _alive(pid)):
            continue
        if _unlink(tmp):
            removed.append(tmp)
    return removed


def _temp_name(target: Path) -> str:
    return (f".bpk-{_digest(target.name)}-{_digest(socket.gethostname(), 3)}-{os.getpid()}-"
            f"{secrets.token_hex(4)}.tmp")


def _digest(text: str, size: int = 5) -> str:
    return hashlib.blake2b(os.fsencode(text), digest_size=size).hexdigest()


def _folder(target: Path, path, what: str) -> Path:
    folder = target.parent
    if not folder.is_dir():
        raise FileNotFoundError(errno.ENOENT, f"cannot write {what} {path}: folder {folder} "
                                "does not exist")
    return folder


def _mode_of(target: Path) -> int | None:
    """The permission bits of the file being replaced, to keep (None for a new file)."""
    try:
        st = os.stat(target)
    except OSError:
        return None
    return stat.S_IMODE(st.st_mode) & 0o777 if stat.S_ISREG(st.st_mode) else None


def _alive(pid: int) -> bool:
    if sys.platform == "win32":
        return True  # os.kill(pid, 0) would end it there: never sweep another process's files
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's: alive
    return True


def _unlink(path: Path) -> bool:
    try:
        os.unlink(path)
        return True
    except OSError:
        return False


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX): without it a power cut may undo it."""
    if sys.platform == "win32":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _named(err: OSError, what: str, path) -> OSError:
    if err.errno is None:
        return err
    return OSError(err.errno, f"cannot write {what} {path}: {err.strerror or err}")
