"""The files a run writes in its --output_dir: one run per folder at a time, and writes that
either happen whole or fail with an error naming the file, never leaving half a file behind.

lock_output_dir takes an exclusive lock (fcntl.flock) on OUTPUT_DIR/.smca-train.lock for the
run's life. The operating system drops it when the process ends, however it ends, so a killed
run never blocks its own --resume; a second run into the folder meanwhile is refused. The lock
file stays (empty) after the run.

write_atomically writes a temporary file beside the target, flushed to disk, and renames it over
the target; append_line appends one line or nothing. A failure (a full disk, a quota, a
read-only folder) removes what was half written and raises OutputError with the file and the
operating system's reason ("No space left on device").
"""

import errno
import fcntl
import os
import socket
import sys
import time
from typing import Callable, Optional

__all__ = [
    "LOCK_NAME",
    "OutputError",
    "OutputDirLock",
    "check_not_in_use",
    "lock_output_dir",
    "write_atomically",
    "write_text",
    "append_line",
]

LOCK_NAME = ".smca-train.lock"


class OutputError(OSError):
    """A file of the run's output cannot be written (path, and the OSError as cause: its errno
    is this one's), or the output folder is in use by another run (path: the folder, cause None)."""

    def __init__(self, message: str, path: str, cause: Optional[OSError] = None) -> None:
        super().__init__(message)
        self.errno = cause.errno if cause is not None else None
        self.path = path
        self.cause = cause


def _reason(err: OSError) -> str:
    """"No space left on device" (the OSError's text without its number and file name)."""
    return err.strerror or str(err) or type(err).__name__


def _write_error(path: str, err: OSError) -> OutputError:
    return OutputError(f"cannot write {path}: {_reason(err)}", path, err)


class OutputDirLock:
    """The lock of one run on its output folder: held until release() or the process's end.
    Processes forked from this one (data loader workers) drop their copy of it, so that the lock
    ends with the run's own process."""

    def __init__(self, output_dir: str, fd: int) -> None:
        self.output_dir = output_dir
        self.fd: Optional[int] = fd
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # the child's copy; the parent keeps the lock
            self.fd = None

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)  # the holder's line is for a refused run to read
            except OSError:
                pass
            os.close(self.fd)  # closing the last copy drops the flock
            self.fd = None


def _holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""


def _in_use(output_dir: str, path: str, holder: str) -> OutputError:
    return OutputError(
        f"--output_dir {output_dir} is in use by another run ({holder or 'its lock ' + path + ' is held'}): "
        "wait until it ends (continue it then with --resume), or give another --output_dir",
        output_dir,
    )


def check_not_in_use(output_dir: str) -> None:
    """OutputError when another run holds `output_dir`'s lock, found without writing anything (the
    checks before a run writes; lock_output_dir then takes the lock). Not for a process that
    holds the lock itself: its own lock would read as another run's."""
    path = os.path.join(output_dir, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # no run has locked it (or it is unreadable: lock_output_dir says so)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise _in_use(output_dir, path, _holder(fd)) from None
    finally:
        os.close(fd)  # drops the shared lock taken by the probe


def lock_output_dir(output_dir: str) -> Optional[OutputDirLock]:
    """Make `output_dir` (as os.makedirs) and lock it for this run. Returns the lock, or None
    where the file system has no locks (a warning says so; the run goes on unguarded).
    Raises OutputError when another run holds it (naming its process) or the folder cannot be
    made."""
    path = os.path.join(output_dir, LOCK_NAME)
    try:
        os.makedirs(output_dir, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise OutputError(f"--output_dir {output_dir}: cannot write {path}: {_reason(err)}", output_dir, err) from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):  # e.g. ENOLCK, EOPNOTSUPP: no locks here
            os.close(fd)
            print(
                f"smca-train: warning: --output_dir {output_dir} cannot be locked ({_reason(err)}): another run "
                "started into it meanwhile would not be stopped",
                file=sys.stderr,
            )
            return None
        holder = _holder(fd)
        os.close(fd)
        raise _in_use(output_dir, path, holder) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}, since {time.ctime()}\n".encode(), 0)
    except OSError:
        pass  # the line only helps a refused run's message; a full disk shows at the first real write
    return OutputDirLock(output_dir, fd)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class _Recorded:
    """A file whose first failed write is kept: torch.save's zip writer turns it into errors of
    its own ("unexpected pos ...") that no longer say why."""

    def __init__(self, f) -> None:
        self._f = f
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def write_atomically(path: str, write: Callable) -> None:
    """write(f) into a binary file that then replaces `path` whole: a crash or a failure leaves
    the old file (or none) and no temporary file. Raises OutputError naming `path` and the
    operating system's reason when a write, the flush or the rename fails."""
    # Same directory, so os.replace is an atomic rename; the process id keeps writers apart.
    tmp_path = f"{path}.tmp{os.getpid()}"
    recorded = None
    try:
        with open(tmp_path, "wb") as f:
            recorded = _Recorded(f)
            write(recorded)
            f.flush()
            os.fsync(f.fileno())  # a full disk may only show here (delayed allocation, NFS)
        os.replace(tmp_path, path)
    except BaseException as err:
        _remove(tmp_path)
        cause = recorded.error if recorded is not None and recorded.error is not None else err
        if isinstance(cause, OSError):
            raise _write_error(path, cause) from cause
        raise


def write_text(path: str, text: str) -> None:
    """`text` (UTF-8) to `path` atomically, as write_atomically."""
    write_atomically(path, lambda f: f.write(text.encode()))


def append_line(path: str, line: str) -> None:
    """Append `line` and a newline to `path` (made when absent), flushed to disk: all of it or,
    on failure, none (the file is cut back). Raises OutputError as write_atomically."""
    data = memoryview((line + "\n").encode())
    try:
        f = open(path, "ab", buffering=0)  # unbuffered: each write is the operating system's
    except OSError as err:
        raise _write_error(path, err) from err
    with f:
        start = f.seek(0, os.SEEK_END)
        try:
            while data:
                data = data[f.write(data) :]
            os.fsync(f.fileno())
        except OSError as err:
            try:
                f.truncate(start)
            except OSError:
                pass
            raise _write_error(path, err) from err
