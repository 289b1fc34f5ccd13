"""Write one output shard and prove what landed on disk, in one pass over the source.

Per window of ``WINDOW`` bytes the source bytes (the new header, then the kept byte ranges) are
read once into a page-aligned buffer. Three stages, each on its own thread, then take it while the
next windows are read (hash beside write, prove after write):

- **hash**: the receipt's digest of the buffer, in window order (``digest``: BLAKE3 for a rewritten
  shard, sha256 for a copy; no hash stage for a copy whose sha256 the Hub's records already name);
- **write**: the buffer goes to the temporary file with ``O_DIRECT`` (no page cache, no dirty-page
  throttling, no second copy in memory);
- **prove**: the same range is read back with ``O_DIRECT`` — from the device, not from a cache
  of what we wrote — and compared byte for byte with the buffer.

The argument: the digest is computed over the very buffer that was written, and every written
byte read back from the device equals that buffer, so the bytes on disk are the source's bytes
and hash to the receipt's digest (for a copy whose sha256 the Hub names, the buffer is the source's
bytes: the file on disk equals the source, whose digest the receipt takes from the Hub's record). A
disk's own volatile cache may serve the read; the fsync before the rename flushes it. Where the file
system refuses ``O_DIRECT`` (tmpfs on older kernels, some FUSE mounts) the write is buffered and each
window is written back with ``fdatasync`` and dropped from the page cache (``POSIX_FADV_DONTNEED``)
before it is read back.

Several shards stream at once (one per core the process may use, at most ``MAX_FILES``): a file's
sha256 is sequential, so parallel sha256 comes from parallel files; BLAKE3 also spreads each window of
one file over the cores. Memory is at most ``BUFFER_BYTES`` of windows (each file's ring and its
read-back window), whatever the shard size and the core count.

What "verified" means, exactly: for every shard prune writes, every byte of the output file (new
header and kept ranges) was compared, after its write returned, with the buffer the receipt's digest
was computed from (a Hub-named copy: with the source bytes the Hub's sha256 names), by reading it back
from the file with ``O_DIRECT`` (or after ``fdatasync`` and ``POSIX_FADV_DONTNEED``); the source's size
and mtime did not change during the copy; and the file was fsynced before its rename. A write that
lands other bytes, never lands, or whose bytes change in the file before the read-back fails the run
(``tests/test_prune.py``). A hard-linked shard (``--link``) is the source's own inode: hashed, not
compared (not even read where the Hub names its sha256). The comparison is ``memcmp``, not a digest:
cheaper than any hash, and the one digest computed is the receipt's.

Why not the kernel's ``copy_file_range`` for the kept ranges: the bytes then never reach user space,
so hashing and proving them costs a second read of every byte on top of the copy, and the copy goes
through the page cache and its writeback: ``bench/prune.py --write-paths`` measured a durable copy of
the shards 1.5× slower by ``copy_file_range`` + fsync and 6.5× by buffered writes + fsync than by
``O_DIRECT`` on the development VM (docs/performance.md). It stays the copier of the small files (``writer.Copier``).
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import errno
import mmap
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from nhcheck.errors import CheckpointError
from nhcheck.fileio import usable_cores
from nhcheck.prune.digest import DigestPlan, new_hasher
from nhcheck.prune.writer import Run, Shrunk, stat_key
from nhcheck.safetensors_header import ShardHeader, serialize_header

#: Bytes per read / write / read-back step (a multiple of ``ALIGN``).
WINDOW = 4 << 20
#: Windows of one file in flight between the reader and the hash / write / prove stages (``ring_windows``: fewer
#: where several files stream at once).
RING = 4
#: O_DIRECT offset and length granularity (covers 512- and 4096-byte logical blocks).
ALIGN = 4096
#: Shards streamed at once.
MAX_FILES = 4
#: Bytes of windows the files streaming at once hold together, whatever the core count: four files of ``RING + 1``
#: windows took a prune's peak RSS to 117.5 MB (four cores or more, 2026-12-07), over its 100 MB bound; rings of two
#: and three windows streamed as fast as of four (two files, dev VM).
BUFFER_BYTES = 48 << 20
O_DIRECT = getattr(os, "O_DIRECT", 0)

#: ``progress(phase, advance, total)``: phase is ``copy``, then ``verify`` (or ``hash`` without verification); bytes.
Progress = Callable[[str, int, int], None]

_libc_name = ctypes.util.find_library("c")
_memcmp = ctypes.CDLL(_libc_name).memcmp if _libc_name else None
if _memcmp is not None:
    _memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
    _memcmp.restype = ctypes.c_int


@dataclass(frozen=True)
class Layout:
    """What one output file holds: ``header`` at offset 0, then (src_off, dst_off, n) ranges of the source."""

    size: int
    header: bytes
    ranges: tuple[tuple[int, int, int], ...]

    @cached_property
    def ends(self) -> list[int]:
        """Output offset where each range ends (ascending): a window finds its first range by bisection
        instead of walking every range before it (windows × ranges on a large rewritten shard)."""
        return [dst_off + n for _, dst_off, n in self.ranges]


def whole_file(size: int) -> Layout:
    """A byte-identical copy."""
    return Layout(size, b"", ((0, 0, size),) if size else ())


def compacted(shard: ShardHeader, dropped: frozenset[str]) -> Layout:
    """New header (same key order, offsets compacted) and merged copy ranges of the kept tensors."""
    kept = [t for t in shard.tensors if t.name not in dropped]
    offsets: dict[str, tuple[int, int]] = {}
    ranges: list[list[int]] = []
    pos = 0
    for t in sorted(kept, key=lambda t: t.start):
        offsets[t.name] = (pos, pos + t.nbytes)
        if ranges and ranges[-1][0] + ranges[-1][2] == t.start:
            ranges[-1][2] += t.nbytes
        elif t.nbytes:
            ranges.append([t.start, pos, t.nbytes])
        pos += t.nbytes
    header = serialize_header(
        [(t.name, t.dtype, t.shape, *offsets[t.name]) for t in kept], shard.metadata, shard.has_metadata
    )
    return Layout(len(header) + pos, header, tuple((s, len(header) + d, n) for s, d, n in ranges))


@dataclass
class ShardJob:
    """One output shard: its source, where it goes, what it holds, which digest it gets; the digest and
    bytes proven once done."""

    final: str
    src_path: str
    src_stat: tuple[int, int]
    layout: Layout
    how: DigestPlan
    linked: bool = False
    tmp: str = ""
    digest: str = ""
    compared: int = 0
    direct: bool = False  # written with O_DIRECT (set when the file is opened)


def _same(a: mmap.mmap, b: mmap.mmap, n: int) -> bool:
    """memcmp of the first ``n`` bytes of two buffers, outside the GIL where libc is reachable."""
    if _memcmp is not None:
        pa = ctypes.addressof(ctypes.c_char.from_buffer(a))
        pb = ctypes.addressof(ctypes.c_char.from_buffer(b))
        return _memcmp(pa, pb, n) == 0
    return a[:n] == b[:n]


class _Stage:
    """One thread consuming items in order; after an error it only releases what it is handed."""

    def __init__(self, work: Callable[[_Item], None], release: Callable[[_Item], None], errors: list) -> None:
        self.work, self.release, self.errors = work, release, errors
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def put(self, item: _Item | None) -> None:
        self.q.put(item)

    def join(self) -> None:
        self.q.put(None)
        self.thread.join()

    def _loop(self) -> None:
        while (item := self.q.get()) is not None:
            try:
                if not self.errors:
                    self.work(item)
            except BaseException as exc:  # re-raised by the file's driver
                self.errors.append(exc)
            finally:
                self.release(item)


@dataclass
class _Item:
    buf: int
    start: int
    n: int
    refs: int


def ring_windows(files: int) -> int:
    """Windows each of ``files`` shards streaming at once fills ahead of its stages: ``RING``, fewer where they and
    the files' read-back windows would pass ``BUFFER_BYTES``, and never under two (one filled while one is written)."""
    return max(2, min(RING, BUFFER_BYTES // (files * WINDOW) - 1))


class Streamer:
    """Streams shards to disk, several at once; ``submit`` queues one, ``wait`` joins them all."""

    def __init__(self, run: Run, verify: bool, progress: Progress | None, total: int) -> None:
        self.run, self.verify, self.progress, self.total = run, verify, progress, total
        self.files = max(1, min(MAX_FILES, usable_cores()))
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.drivers = [threading.Thread(target=self._drive, daemon=True) for _ in range(self.files)]
        for t in self.drivers:
            t.start()

    def submit(self, job: ShardJob) -> None:
        if self.errors:
            raise self.errors[0]
        self.jobs.put(job)

    def wait(self) -> None:
        """Join every driver; re-raise the first error of any stage."""
        self._join()
        if self.errors:
            raise self.errors[0]

    def abort(self) -> None:
        """Stop after an error elsewhere: drivers finish their current window and exit."""
        self.errors.append(CheckpointError(self.run.out_dir, "aborted"))
        self._join()

    def _join(self) -> None:
        for _ in self.drivers:
            self.jobs.put(None)
        for t in self.drivers:
            t.join()

    def _report(self, phase: str, n: int) -> None:
        if self.progress is not None:
            with self.lock:  # stages of several files report at once
                self.progress(phase, n, self.total)

    def _drive(self) -> None:
        bufs = [mmap.mmap(-1, WINDOW) for _ in range(ring_windows(self.files))]
        back = mmap.mmap(-1, WINDOW)
        while (job := self.jobs.get()) is not None:
            if self.errors:
                continue
            try:
                self._stream(job, bufs, back)
            except OSError as exc:  # name the file: the main thread has moved on to another one
                self.errors.append(exc if exc.filename else OSError(exc.errno, exc.strerror, job.final))
            except BaseException as exc:  # re-raised by the main thread at its next submit or at wait
                self.errors.append(exc)

    def _stream(self, job: ShardJob, bufs: list[mmap.mmap], back: mmap.mmap) -> None:
        run = self.run
        size = job.layout.size
        if job.linked and job.how.known:  # the source's own inode, its digest named by the Hub: nothing to read
            self._report("verify" if self.verify else "hash", size)
            job.digest = job.how.known
            self._finish(job, ())
            return
        src_fd = run.open(job.src_path, os.O_RDONLY)
        out_fd = back_fd = -1
        if not job.linked:
            out_fd, job.direct = self._open_out(job.tmp, back)
            if self.verify:
                back_fd = run.open(job.tmp, os.O_RDONLY | (O_DIRECT if job.direct else 0))
        digest = None if job.how.known else new_hasher(job.how.algorithm)
        errors: list[BaseException] = []
        free: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(len(bufs)):
            free.put(i)
        lock = threading.Lock()

        def release(item: _Item) -> None:
            with lock:
                item.refs -= 1
                last = item.refs == 0
            if last:
                free.put(item.buf)

        def hash_(item: _Item) -> None:
            assert digest is not None
            digest.update(memoryview(bufs[item.buf])[: item.n])
            if not self.verify:
                self._report("hash", item.n)

        def write(item: _Item) -> None:
            buf = bufs[item.buf]
            length = item.n
            if job.direct and item.n % ALIGN:
                length = -(-item.n // ALIGN) * ALIGN
                buf[item.n : length] = bytes(length - item.n)
            view = memoryview(buf)[:length]
            done = 0
            try:
                while done < length:
                    done += os.pwrite(out_fd, view[done:], item.start + done)
            except OSError as exc:
                if not (job.direct and exc.errno == errno.EINVAL):
                    raise
                # The kernel cut the direct write short of a block boundary (a file size limit):
                # write the window the buffered way, which ends in the real error (EFBIG).
                if not plain:
                    plain.append(run.open(job.tmp, os.O_WRONLY))
                done = 0
                while done < item.n:
                    done += os.pwrite(plain[0], view[done : item.n], item.start + done)
            written[0] = max(written[0], item.start + item.n)
            self._report("copy", item.n)
            if prover is not None:
                with lock:
                    item.refs += 1
                prover.put(item)

        def prove(item: _Item) -> None:
            end = item.start + item.n
            if not job.direct:  # the window reaches the disk and leaves the cache before it is read back
                if end > synced[0]:  # one fdatasync covers every window written before it
                    mark = written[0]
                    os.fdatasync(out_fd)
                    synced[0] = mark
                os.posix_fadvise(back_fd, item.start, item.n, os.POSIX_FADV_DONTNEED)
            length = -(-item.n // ALIGN) * ALIGN if job.direct else item.n
            got = os.preadv(back_fd, [memoryview(back)[:length]], item.start)
            if got < item.n:
                raise CheckpointError(job.tmp, "output is shorter than what was written")
            if not _same(back, bufs[item.buf], item.n):
                raise CheckpointError(job.final, f"output bytes at offset {item.start} differ from the source")
            job.compared += item.n
            self._report("verify", item.n)

        plain: list[int] = []  # a buffered descriptor, opened only if a direct write is refused
        written, synced = [0], [0]  # buffered: bytes handed to the kernel, bytes known on disk
        hasher = _Stage(hash_, release, errors) if digest is not None else None
        prover = _Stage(prove, release, errors) if back_fd >= 0 else None
        writer = _Stage(write, release, errors) if out_fd >= 0 else None
        try:
            for start in range(0, size, WINDOW):
                i = free.get()
                if errors or self.errors:
                    free.put(i)
                    break
                n = min(WINDOW, size - start)
                self._fill(job, src_fd, bufs[i], start, n)
                item = _Item(i, start, n, (hasher is not None) + (writer is not None))
                if hasher is not None:
                    hasher.put(item)
                elif not self.verify:  # the digest is known: these bytes need no hashing
                    self._report("hash", n)
                if writer is not None:
                    writer.put(item)
                elif self.verify:  # a hard link: nothing written, hashed only
                    self._report("verify", n)
        finally:
            for stage in (writer, prover, hasher):
                if stage is not None:
                    stage.join()
        if errors:
            raise errors[0]
        if self.errors:
            return
        if out_fd >= 0:
            if job.direct:  # the last window was written padded to a whole block (and so was the probe)
                os.ftruncate(out_fd, size)
            os.fsync(out_fd)
        job.digest = digest.hexdigest() if digest is not None else job.how.known
        self._finish(job, (out_fd, back_fd, src_fd, *plain))

    def _finish(self, job: ShardJob, fds: tuple[int, ...]) -> None:
        """The source unchanged since it was audited: close the file's descriptors and give it its final name."""
        if stat_key(job.src_path) != job.src_stat:
            raise CheckpointError(
                job.src_path,
                "changed during the run (size or modification time); prune stopped, temporary files removed",
            )
        for fd in fds:
            if fd >= 0:
                self.run.close(fd)
        self.run.commit(job.tmp, job.final)

    def _open_out(self, tmp: str, probe: mmap.mmap) -> tuple[int, bool]:
        """The temporary file for writing, with O_DIRECT where the file system takes it.

        Some file systems accept the flag at open and refuse the I/O: one aligned block is written
        and read back first (window 0 overwrites it).
        """
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        if O_DIRECT:
            fd = -1
            try:
                fd = self.run.open(tmp, flags | O_DIRECT, 0o644)
                block = memoryview(probe)[:ALIGN]
                os.pwrite(fd, block, 0)
                check = self.run.open(tmp, os.O_RDONLY | O_DIRECT)
                try:
                    os.preadv(check, [block], 0)
                finally:
                    self.run.close(check)
                return fd, True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                if fd >= 0:
                    self.run.close(fd)
                if os.path.lexists(tmp):
                    os.unlink(tmp)
        return self.run.open(tmp, flags, 0o644), False

    @staticmethod
    def _fill(job: ShardJob, src_fd: int, buf: mmap.mmap, start: int, n: int) -> None:
        """Output bytes [start, start+n): the header's part, then each kept source range's part."""
        end = start + n
        view = memoryview(buf)
        header = job.layout.header
        if start < len(header):
            k = min(end, len(header)) - start
            view[:k] = header[start : start + k]
        ranges = job.layout.ranges
        for i in range(bisect.bisect_right(job.layout.ends, start), len(ranges)):
            src_off, dst_off, size = ranges[i]
            if dst_off >= end:
                break
            lo, hi = max(start, dst_off), min(end, dst_off + size)
            want = hi - lo
            got = os.preadv(src_fd, [view[lo - start : hi - start]], src_off + (lo - dst_off))
            while got < want:
                more = os.preadv(src_fd, [view[lo - start + got : hi - start]], src_off + (lo - dst_off) + got)
                if more == 0:
                    raise Shrunk(job.src_path)
                got += more
