"""Writes that a kill or a full disk cannot corrupt, and locks that name their holder.

Every file a user depends on (checkpoints, resume state, `model.keras`, `history.csv`, metrics,
predictions) is written to a temporary file in the same folder, flushed to disk and renamed over
the target: a reader sees the old file or the new one, never half of one.

Fault injection for tests: `CENTERMASK_FAULT=<action>:<point>[:<n>]` fires at the n-th (default
first) write through the named point, after the temporary file is written and before the rename
(the moment a kill or a full disk does the most damage). Actions: `kill` (SIGKILL this process),
`raise` (`InjectedFault`, a crash that tests can catch in-process) and `enospc` (the `OSError` a
full disk raises).
"""

import collections
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import time

from centermask_tf.errors import UserError

logger = logging.getLogger("centermask_tf.files")

FAULT_ENV = "CENTERMASK_FAULT"
_fault_hits = collections.Counter()
# Headroom beyond a file's expected size before writing starts: h5py can segfault (not raise)
# when the disk fills up under it, so a write that would not fit is refused up front.
_SPACE_MARGIN = 16 << 20


class DiskFullError(UserError):
    """Not enough free space to write a file; what was there before is left as it was."""


class BusyError(UserError):
    """Another live process holds the lock on a workdir or dataset."""


class InjectedFault(RuntimeError):
    """Raised by `CENTERMASK_FAULT=raise:...` (tests only)."""


def _inject(point):
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    action, target, *nth = spec.split(":")
    if target != point:
        return
    _fault_hits[point] += 1
    if _fault_hits[point] != int(nth[0] if nth else 1):
        return
    logger.warning("injected fault %s at write point %s", action, point)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    raise InjectedFault(f"injected fault at write point {point}")


def disk_full(error):
    """Whether an error (an `OSError`, or a TensorFlow/h5py error that wraps one in its text)
    means the disk or the quota is full."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(text in str(error) for text in (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT)))


def ensure_space(directory, needed):
    """Raises `DiskFullError` unless `directory` has `needed` bytes free plus a margin."""
    free = shutil.disk_usage(directory).free
    if free < needed + _SPACE_MARGIN:
        raise DiskFullError(
            f"only {free / 1e6:.1f} MB free in '{directory}', {(needed + _SPACE_MARGIN) / 1e6:.1f} MB "
            "needed; free some space and rerun the same command (earlier files are intact)."
        )


def fsync_directory(directory):
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write, point=None, expected_size=0):
    """Writes `path` through `write(tmp_path)` so that it is replaced whole or not at all.

    Args:
        path: the target file.
        write: callable that writes the complete file at the path it is given (same suffix as
            `path`, same folder: Keras checks suffixes and a rename must not cross file systems).
        point: name of this write point for fault injection (default: the file name).
        expected_size: bytes the file will take, checked against the free space first
            (default: the size of the file it replaces).
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    if os.path.exists(path):
        expected_size = max(expected_size, os.path.getsize(path))
    ensure_space(directory, expected_size)
    tmp = os.path.join(directory, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _inject(point or os.path.basename(path))
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if disk_full(e):
            raise DiskFullError(
                f"disk full while writing '{path}'; files written before are intact. Free some "
                "space and rerun the same command."
            ) from None
        raise
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_directory(directory)
    return path


def write_bytes(path, data, point=None):
    """`atomic_write` of a file's whole content."""

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write, point, expected_size=len(data))


def write_text(path, text, point=None):
    """`atomic_write` of a text file (UTF-8)."""
    return write_bytes(path, text.encode("utf-8"), point)


def write_json(path, data, point=None, indent=1):
    """`atomic_write` of a JSON file."""
    return write_text(path, json.dumps(data, indent=indent), point)


def sha256_of(path):
    """The SHA-256 hex digest of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(directory):
    """Deletes the temporary files and folders (`.tmp-<pid>-...`) that killed writes left in
    `directory`; those of live processes, still being written, are left alone."""
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        match = re.match(r"\.tmp-(\d+)-", name)
        if not match or (_alive(int(match.group(1))) and int(match.group(1)) != os.getpid()):
            continue
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(path)


def _holder(path, attempts=40):
    """Who holds the lock: the holder writes itself into the file right after taking the lock,
    so an empty file means it is about to; wait for it briefly."""
    for _ in range(attempts):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read().strip()
        except OSError:
            break
        if text:
            return text
        time.sleep(0.05)
    return "an unknown process"


@contextlib.contextmanager
def locked(path, what, wait=False):
    """Holds an exclusive lock on `path` (created if needed) for the `with` block.

    The kernel drops the lock when its process dies, so a lock file left by a killed process is
    simply taken over. With `wait=False` a live holder makes this raise `BusyError` naming it;
    with `wait=True` this waits for the holder to finish.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            if not wait:
                raise BusyError(
                    f"{what} is in use by {holder}; wait for it to finish or stop it "
                    f"(lock file '{path}')."
                ) from None
            logger.info("waiting for %s, which holds %s", holder, what)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} ({' '.join(_command_line())})".encode())
        yield
    finally:
        os.close(fd)


def _command_line():
    try:
        with open(f"/proc/{os.getpid()}/cmdline", "rb") as f:
            return [part.decode(errors="replace") for part in f.read().split(b"\0") if part][:6]
    except OSError:
        return ["?"]
