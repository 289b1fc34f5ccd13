"""Prune's atomic writer: every file under a temporary name, fsynced, then renamed; nothing half-written.

A file appears under its final name only complete and durable (``Run.commit`` after an fsync);
the directory entries are fsynced before the receipt is written. On any error ``Run.cleanup``
closes what is open, removes the temporary files, and removes the final-named files this run
created where none stood before, so a failed run into a fresh directory leaves it empty.
"""

from __future__ import annotations

import errno
import json
import os
import stat

from nhcheck.errors import CheckpointError, NhcheckError

#: Temporary files start with a dot so no checkpoint reader (shard glob, sidecar walk) sees them.
TMP_PREFIX = ".nhcheck-prune-"
TMP_SUFFIX = ".tmp"
#: Kernel copy granularity (sidecars, the fallback path).
CHUNK = 4 << 20

_ERRNO_TEXT = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (file size limit reached)",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
_NO_CFR = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF})


class Shrunk(Exception):
    """The source ended before the bytes its header promised (it changed during the run).

    ``path``: the source, where the reader knows it (a stream thread does; the main thread's is ``Run.source``).
    """

    def __init__(self, path: str | None = None) -> None:
        super().__init__(path)
        self.path = path


def stat_key(path: str) -> tuple[int, int]:
    """(size, mtime) of a source file: compared at the end of its copy to catch a change during the run."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


class Run:
    """Bookkeeping of one execution: temporary paths and open descriptors to clean up, files created."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.tmps: set[str] = set()
        self.fds: set[int] = set()
        self.created: list[str] = []
        self.current = out_dir
        self.source = ""
        self.dirs: set[str] = {out_dir}

    def tmp_for(self, final: str) -> str:
        d, base = os.path.split(final)
        tmp = os.path.join(d, f"{TMP_PREFIX}{os.getpid()}-{base}{TMP_SUFFIX}")
        self.tmps.add(tmp)
        self.dirs.add(d)
        self.current = final
        return tmp

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        fd = os.open(path, flags, mode)
        self.fds.add(fd)
        return fd

    def close(self, fd: int) -> None:
        if fd in self.fds:
            self.fds.discard(fd)
            os.close(fd)

    def commit(self, tmp: str, final: str) -> None:
        """Rename a complete, fsynced temporary file to its final name."""
        fresh = not os.path.lexists(final)
        os.replace(tmp, final)
        self.tmps.discard(tmp)
        if fresh:
            self.created.append(final)

    def cleanup(self, *, failed: bool) -> None:
        """Close, remove temporaries; after a failure also the final-named files this run created."""
        for fd in list(self.fds):
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()
        for path in list(self.tmps) + (self.created if failed else []):
            try:
                os.unlink(path)
            except OSError:
                pass
        self.tmps.clear()


class Copier:
    """Kernel byte-range copy: ``copy_file_range``, else ``sendfile``, else a buffered loop.

    The mode degrades once per run on the first "not supported here" error, never on a
    real I/O error (ENOSPC, EIO…), which propagates.
    """

    def __init__(self) -> None:
        self.mode = "copy_file_range" if hasattr(os, "copy_file_range") else "sendfile"

    def copy(self, src: int, dst: int, src_off: int, dst_off: int, n: int) -> None:
        while n > 0:
            want = min(n, CHUNK)
            if self.mode == "copy_file_range":
                try:
                    k = os.copy_file_range(src, dst, want, src_off, dst_off)
                except OSError as exc:
                    if exc.errno not in _NO_CFR:
                        raise
                    self.mode = "sendfile"
                    continue
            elif self.mode == "sendfile":
                try:
                    os.lseek(dst, dst_off, os.SEEK_SET)
                    k = os.sendfile(dst, src, src_off, want)
                except OSError as exc:
                    if exc.errno not in _NO_CFR:
                        raise
                    self.mode = "buffered"
                    continue
            else:
                data = os.pread(src, want, src_off)
                k = len(data)
                view = memoryview(data)
                done = 0
                while done < k:
                    done += os.pwrite(dst, view[done:], dst_off + done)
            if k == 0:
                raise Shrunk()
            src_off += k
            dst_off += k
            n -= k


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_file(run: Run, copier: Copier, src: str, final: str) -> None:
    """Copy a config/tokenizer/code file unchanged (a symlink inside the checkpoint becomes a file)."""
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = run.tmp_for(final)
    src_fd = run.open(src, os.O_RDONLY)
    size = os.fstat(src_fd).st_size
    dst_fd = run.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    copier.copy(src_fd, dst_fd, 0, 0, size)
    os.fchmod(dst_fd, stat.S_IMODE(os.fstat(src_fd).st_mode))
    os.fsync(dst_fd)
    run.close(dst_fd)
    run.close(src_fd)
    run.commit(tmp, final)


def json_bytes(obj: object, indent: int) -> bytes:
    """How prune writes JSON (UTF-8, not ASCII-escaped, a final newline)."""
    return (json.dumps(obj, indent=indent, ensure_ascii=False) + "\n").encode("utf-8")


def write_json(run: Run, final: str, obj: object, indent: int) -> None:
    write_bytes(run, final, json_bytes(obj, indent))


def write_bytes(run: Run, final: str, data: bytes) -> None:
    run.commit(stage_bytes(run, final, data), final)


def stage_bytes(run: Run, final: str, data: bytes) -> str:
    """``data`` written and fsynced under ``final``'s temporary name, returned; ``run.commit`` renames it.

    Staged early, a file costs its fsync while other work runs and appears under its final name when due.
    """
    tmp = run.tmp_for(final)
    fd = run.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    view = memoryview(data)
    done = 0
    while done < len(data):
        done += os.write(fd, view[done:])
    os.fsync(fd)
    run.close(fd)
    return tmp


def io_error(exc: OSError, run: Run) -> NhcheckError:
    """One line naming the file and the failure (exit 2)."""
    text = _ERRNO_TEXT.get(exc.errno or 0, exc.strerror or str(exc))
    return CheckpointError(
        exc.filename or run.current,
        f"{text}; prune stopped, temporary files removed, nothing final-named left half-written",
    )
