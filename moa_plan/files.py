"""Files on disk, read and written safely: every input (plans, configs, result files, profiles) is
read by ``read_bytes_limited`` (only regular files, never more than a limit, so a FIFO or a link to
/dev/zero cannot hang a command); every write goes to a temporary file in the target folder and is
renamed into place; ``exclusive`` keeps two runs from writing one result file.
"""

from __future__ import annotations

import contextlib
import glob
import os
import stat
import tempfile
import time
from pathlib import Path

from moa_plan.plan import PlanError

MAX_PLAN_BYTES = 64 * 1024 * 1024


MAX_CONFIG_BYTES = 16 * 1024 * 1024


MAX_RESULT_BYTES = 1024 * 1024 * 1024  # result files and profile metadata


STALE_TMP_SECONDS = 600  # a writer renames its temporary file within seconds; older ones were orphaned by a kill


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def read_bytes_limited(path: str | os.PathLike, limit: int | None = MAX_PLAN_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (None: no limit); errors as PlanError.

    Anything else (a FIFO, a device such as /dev/zero, a folder) is refused before it is read,
    since its ``st_size`` says nothing; the read itself stops after ``limit + 1`` bytes, so a
    file that grows meanwhile (or a /proc file, whose size is 0) is still bounded.
    """
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise PlanError([("", f"cannot read: {_kind(st.st_mode)}, not a regular file")])
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))  # a FIFO swapped in cannot block
    except OSError as exc:
        raise PlanError([("", f"cannot read: {exc.strerror or exc}")]) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PlanError([("", f"cannot read: {_kind(st.st_mode)}, not a regular file")])
        if limit is not None and st.st_size > limit:
            raise PlanError([("", f"file is {st.st_size} bytes, larger than the {limit}-byte limit")])
        chunks, total = [], 0
        while limit is None or total <= limit:
            chunk = os.read(fd, 1 << 20 if limit is None else min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise PlanError([("", f"cannot read: {exc.strerror or exc}")]) from None
    finally:
        os.close(fd)
    if limit is not None and total > limit:
        raise PlanError([("", f"file is larger than the {limit}-byte limit")])
    return b"".join(chunks)


def read_text_limited(path: str | os.PathLike, limit: int = MAX_PLAN_BYTES) -> str:
    """Read a UTF-8 text file (``read_bytes_limited``; a BOM is dropped); errors as PlanError."""
    raw = read_bytes_limited(path, limit).removeprefix(b"\xef\xbb\xbf")
    if not raw.strip():
        raise PlanError([("", "file is empty")])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PlanError([("", f"not UTF-8 text (byte {exc.start})")]) from None


def _file_mode(path: Path) -> int:
    """The mode of the file being replaced, else 0666 less the process umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _remove_stale_temporaries(path: Path) -> None:
    """Delete ``.NAME.*.tmp`` siblings left by a writer that was killed before its rename."""
    cutoff = time.time() - STALE_TMP_SECONDS
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            if tmp.lstat().st_mtime < cutoff:
                tmp.unlink()


def check_writable_target(path: str | os.PathLike) -> None:
    """OSError unless ``path`` is absent or a regular file: a rename must never replace a folder,
    a device (``/dev/null``) or a FIFO."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise OSError(0, f"{_kind(st.st_mode)}, not a regular file")


def write_atomic(path: str | os.PathLike, text: str | bytes) -> None:
    """Write a file through a temporary sibling and rename, so no half-written file is ever seen;
    the folder is synced after the rename, so the new name survives a crash."""
    path = Path(path)
    check_writable_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600; give the file ordinary permissions
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8") if isinstance(text, str) else text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # not every file system can sync a folder
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def exclusive(path: str | os.PathLike):
    """Hold an exclusive lock on ``path`` (a result file several runs might resume) for the block.

    A second writer would otherwise overwrite the first one's cells with its own; it is refused
    instead. The lock (``flock`` on a hidden ``.NAME.lock`` sibling) ends with the process, kill -9
    included.
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{path.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PlanError(
                [("", "another moa-plan run is writing this file now; wait for it or choose another output")],
                source=str(path),
            ) from None
        yield
    finally:
        os.close(fd)
