"""Prune: turn an audit into a fixed copy of the checkpoint that the chosen engine loads cleanly.

Two halves. ``plan_prune`` decides, from the audit alone, which tensors are safe to drop and
says why for each (the README's prune rule): only tensors the engine would not load
anyway, and only when their absence cannot change the loaded model. Anything it cannot prove
safe, and any quantization mismatch, makes the plan a refusal: stripping scales would hide a
model that does not load correctly. ``execute`` writes the plan: per shard a new header and
the kept byte ranges copied by the kernel (no tensor is decoded, memory stays flat), every
file written to a temporary name, fsynced and renamed, the index and the receipt last; then
it re-audits the output with the same engine.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import queue
import re
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from nhcheck import __version__, collapse, engines
from nhcheck.audit import AuditOptions, AuditReport
from nhcheck.checkpoint import INDEX_NAME, open_local, safe_member
from nhcheck.engines.base import EngineId
from nhcheck.errors import CheckpointError, NhcheckError, UsageError
from nhcheck.safetensors_header import ShardHeader, TensorInfo, serialize_header

RECEIPT_NAME = "nhcheck-prune.json"
RECEIPT_SCHEMA = "nhcheck.prune/1"
#: Temporary files start with a dot so no checkpoint reader (shard glob, sidecar walk) sees them.
TMP_PREFIX = ".nhcheck-prune-"
TMP_SUFFIX = ".tmp"
#: Copy and read-back granularity: two buffers of this size are all the memory prune holds.
CHUNK = 4 << 20

SCALE_SUFFIXES = ("input_scale", "weight_scale", "weight_scale_2", "k_scale", "v_scale", "kv_scale", "pre_quant_scale")
_KV_SUFFIXES = ("k_scale", "v_scale", "kv_scale")
_FLOAT_PARAM = frozenset({"bfloat16", "float16", "float32", "float64"})
_FLOAT_CKPT = frozenset({"BF16", "F16", "F32", "F64"})
_STRUCTURE = ("shard-", "index-", "tensor-")
_GROUPED = re.compile(r"^\S+ ×[\d,]+: ")  # audit's grouped findings start "name ×count: "
_STATUS_RANK = {"unfilled": 0, "partial": 1, "filled": 2, "unreachable": 2}

#: ``progress(phase, advance, total)``: phase is ``copy``, then ``verify`` (or ``hash`` without verification); bytes.
Progress = Callable[[str, int, int], None]


# ---------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class Drop:
    """One tensor to leave out, what the engine does with it, and why leaving it out is safe."""

    tensor: TensorInfo
    outcome: str  # warn | skip | raise
    reason: str


@dataclass(frozen=True)
class DropGroup:
    """Drops (or unsafe orphans) collapsed like the audit table: ``layers.{1,49}.…input_scale ×24``."""

    name: str
    count: int
    nbytes: int
    outcome: str
    reason: str


@dataclass(frozen=True)
class ShardPlan:
    """What happens to one shard: ``rewrite`` (some tensors dropped), ``copy`` (none), ``omit`` (all)."""

    name: str
    tensors: int
    dropped: int
    bytes_saved: int
    action: str


@dataclass(frozen=True)
class PrunePlan:
    """What prune would do to ``report.checkpoint`` for ``report.engine``, or why it refuses."""

    report: AuditReport
    drops: tuple[Drop, ...]
    groups: tuple[DropGroup, ...]
    shards: tuple[ShardPlan, ...]
    refusal: str | None = None
    unsafe: tuple[DropGroup, ...] = ()
    loads_as_is: tuple[str, ...] = ()

    @property
    def engine(self) -> EngineId:
        return self.report.engine

    @property
    def bytes_saved(self) -> int:
        return sum(s.bytes_saved for s in self.shards)

    @property
    def dropped_names(self) -> frozenset[str]:
        return frozenset(d.tensor.name for d in self.drops)


def _action(outcome: str, message: str | None, engine: EngineId) -> str:
    if outcome == "raise":
        return f"{engine.label} raises {message or 'on it'}"
    if outcome == "warn":
        return f"{engine.label} warns and drops it"
    return f"{engine.label} drops it silently"


class _Classifier:
    """Applies the safety rule to one orphan; returns (safe?, why)."""

    def __init__(self, report: AuditReport) -> None:
        self.report = report
        self.manifest = report.manifest
        self.weights = {r.tensor.name: r for r in report.records if r.tensor.name.endswith(".weight")}
        self.kv_quantized = any(p.name.endswith((".attn.k_scale", ".attn.v_scale")) for p in self.manifest.params)
        self._modules: frozenset[str] | None = None

    def runtime_modules(self) -> frozenset[str]:
        """Every dotted prefix of every runtime parameter name (built once, only when needed)."""
        if self._modules is None:
            mods: set[str] = set()
            for p in self.manifest.params:
                name = p.name
                i = name.rfind(".")
                while i > 0:
                    name = name[:i]
                    if name in mods:
                        break
                    mods.add(name)
                    i = name.rfind(".")
            self._modules = frozenset(mods)
        return self._modules

    def classify(self, t: TensorInfo, outcome, engine: EngineId) -> tuple[bool, str]:
        reason = outcome.reason
        act = _action(outcome.outcome, outcome.message, engine)
        if reason == "pp-range":  # an orphan pp-range skip is a layer index past the model
            return True, f"{act}; safe: the model has no such layer, so nothing can read it"
        if reason not in engines.get(engine).no_param_reasons():
            return False, (
                f"the engine handles it outside the language-model loader ({reason}); nhcheck cannot say what it is for"
            )
        if self.manifest.lm_prefix and not t.name.startswith("language_model"):
            return False, "the wrapper routes it outside the language model; nhcheck cannot say what it is for"
        suffix = t.name.rpartition(".")[2]
        if suffix in _KV_SUFFIXES:
            if reason == "kv-drop" and not self.kv_quantized:
                return True, (
                    f"{act}; safe: the runtime KV cache is not quantized (no attn.k_scale/attn.v_scale "
                    "parameters), so no KV-cache scale is ever read"
                )
            return False, (
                "KV-cache scale the engine drops although the runtime keeps KV-cache scales: "
                "its name is wrong, not its presence"
            )
        engine_name = outcome.engine_name or ""
        module = self.manifest.lm_prefix + engine_name.rpartition(".")[0]
        if engine_name and module not in self.runtime_modules():
            return True, f"{act}; safe: the runtime has no module {module}, so nothing can read it"
        if suffix not in SCALE_SUFFIXES:
            return False, "not a scale or auxiliary tensor, and its module exists at runtime"
        wname = t.name[: -len(suffix)] + "weight"
        w = self.weights.get(wname)
        if w is None:
            return False, "its module has no weight in the checkpoint to tell whether it is quantized"
        if w.outcome.outcome != "load" or w.param is None:
            return False, f"its module's weight {wname} does not load either"
        p = self.manifest.by_name.get(w.param)
        if p is None:
            return False, f"its module's weight loads into {w.param}, which nhcheck's manifest does not describe"
        if p.dtype not in _FLOAT_PARAM or w.tensor.dtype not in _FLOAT_CKPT:
            return False, (
                f"load-bearing: the runtime keeps the module quantized ({p.name} is {p.dtype}), never dropped"
            )
        return True, (
            f"{act}; safe: its module's weight loads unquantized into {p.name} ({p.dtype}), which takes no {suffix}"
        )


def _groups(items: list[tuple[TensorInfo, str, str]]) -> tuple[DropGroup, ...]:
    """Collapse (tensor, outcome, reason) by outcome, reason shape and name shape."""
    out = []
    for (outcome, _), name, count, members in collapse.group(
        ((o, collapse.template(r)[0]), t.name, (t, r)) for t, o, r in items
    ):
        reason = collapse.group((0, r, None) for _, r in members)[0][1]
        out.append(DropGroup(name, count, sum(t.nbytes for t, _ in members), outcome, reason))
    return tuple(out)


def _finding_text(f) -> str:
    """A finding with its tensor named once (grouped findings already start with the collapsed name)."""
    return f.message if _GROUPED.match(f.message) else f"{f.tensor}: {f.message}"


def _mismatch_refusal(report: AuditReport, clean: tuple[str, ...]) -> str:
    found = [f for f in report.findings if f.code == "quant-mismatch"]
    first = found[0]
    lines = [
        f"quantization mismatch on {report.engine}: {_finding_text(first)}"
        + (f" (and {len(found) - 1} more tensor famil{'y' if len(found) == 2 else 'ies'})" if len(found) > 1 else ""),
        f"Stripping scales would hide a model that {report.engine.label} cannot load correctly; prune refuses.",
    ]
    if clean:
        lines.append("Loads as is (audit clean): " + ", ".join(clean) + ".")
    elif report.other_versions:
        lines.append(
            f"No {report.engine.name} version in nhcheck's table loads it as is: "
            + "; ".join(f"{v}: {s}" for v, s in report.other_versions.items())
            + "."
        )
    else:
        lines.append("Audit it with the other --engine versions to find one that loads it as is.")
    return "\n".join(lines)


def plan_prune(report: AuditReport) -> PrunePlan:
    """Decide what to drop and why, or why prune must refuse (the CLI exits 1 on a refusal)."""
    ckpt = report.checkpoint
    engine = report.engine
    clean = tuple(engines.spans([v for v, s in report.other_versions.items() if s.startswith("clean")]))
    shards = tuple(ShardPlan(s.name, len(s.tensors), 0, 0, "copy") for s in ckpt.shards)
    structure = [f for f in ckpt.findings if f.severity == "error" and f.code.startswith(_STRUCTURE)]
    if structure:
        f = structure[0]
        return PrunePlan(
            report,
            (),
            (),
            shards,
            "the checkpoint's files disagree ("
            + f.code
            + ": "
            + (f.tensor or f.shard or "")
            + ": "
            + f.message
            + "); fix the index or shards first",
            (),
            clean,
        )
    if any(f.code == "quant-mismatch" for f in report.findings):
        return PrunePlan(report, (), (), shards, _mismatch_refusal(report, clean), (), clean)
    shape = next((f for f in report.findings if f.code == "shape-mismatch"), None)
    if shape is not None:
        return PrunePlan(
            report,
            (),
            (),
            shards,
            f"shape mismatch on {report.engine}: {_finding_text(shape)}; dropping tensors cannot fix it",
            (),
            clean,
        )
    if report.crash is not None and report.crash.tensor is None:
        return PrunePlan(
            report,
            (),
            (),
            shards,
            f"{engine.label} fails while building the model "
            f"({report.crash.error}); dropping tensors cannot fix the quant config",
            (),
            clean,
        )

    classifier = _Classifier(report)
    drops: list[Drop] = []
    unsafe: list[tuple[TensorInfo, str, str]] = []
    for r in report.records:
        o = r.outcome
        if o.outcome in ("load", "routed") or not r.orphan:
            continue
        ok, why = classifier.classify(r.tensor, o, engine)
        if ok:
            drops.append(Drop(r.tensor, o.outcome, why))
        else:
            unsafe.append((r.tensor, o.outcome, why))
    groups = _groups([(d.tensor, d.outcome, d.reason) for d in drops])
    per_shard: dict[str, list[Drop]] = {}
    for d in drops:
        per_shard.setdefault(d.tensor.shard, []).append(d)
    shards = tuple(
        ShardPlan(
            s.name,
            len(s.tensors),
            len(per_shard.get(s.name, ())),
            sum(d.tensor.nbytes for d in per_shard.get(s.name, ())),
            "copy" if not per_shard.get(s.name) else "omit" if len(per_shard[s.name]) == len(s.tensors) else "rewrite",
        )
        for s in ckpt.shards
    )
    refusal = None
    unsafe_groups = _groups(unsafe)
    if unsafe_groups:
        refusal = (
            f"{len(unsafe):,} tensor(s) {engine.label} does not load cannot be proven safe to drop, so the "
            "output would not load cleanly either:\n"
            + "\n".join(f"  {g.name} ×{g.count}: {g.reason}" for g in unsafe_groups)
        )
    return PrunePlan(report, tuple(drops), groups, shards, refusal, unsafe_groups, clean)


def plan_checkpoint(inputs) -> PrunePlan:
    """Audit ``inputs`` (``pipeline.Inputs``) and plan; the other engine versions are audited only
    when the plan refuses for a quantization mismatch, to name the one that loads it as is."""
    from nhcheck import pipeline

    plan = plan_prune(pipeline.audit(inputs, AuditOptions(compare_versions=False)))
    if plan.refusal is not None and any(f.code == "quant-mismatch" for f in plan.report.findings):
        plan = plan_prune(pipeline.audit(inputs, AuditOptions()))
    return plan


def render_plan(plan: PrunePlan, console) -> None:
    """The plan as the audit table shows tensors: collapsed groups, then bytes saved per shard."""
    from rich.markup import escape
    from rich.table import Table

    from nhcheck.report import print_table, safe

    e = lambda s: escape(safe(s))  # noqa: E731
    rep = plan.report
    console.print(
        f"[bold]nhcheck prune[/] {e(rep.source)} · {rep.engine} · audit verdict {rep.verdict} · "
        f"{len(rep.records):,} tensors in {len(plan.shards)} shard(s)"
    )
    if plan.groups:
        t = Table(title="Tensors to drop", title_justify="left")
        for col in ("outcome", "checkpoint tensors", "count", "bytes", "why it is safe"):
            t.add_column(col, overflow="fold")
        for g in plan.groups:
            t.add_row(g.outcome, e(g.name), f"×{g.count:,}", f"{g.nbytes:,}", e(g.reason))
        print_table(console, t)
    elif plan.refusal is None:
        console.print("Nothing to drop: the output is a byte-identical copy.")
    if plan.refusal is None:
        t = Table(title="Shards", title_justify="left")
        for col in ("shard", "tensors", "dropped", "bytes saved", "action"):
            t.add_column(col, overflow="fold")
        for s in plan.shards:
            t.add_row(e(s.name), f"{s.tensors:,}", f"{s.dropped:,}", f"{s.bytes_saved:,}", s.action)
        print_table(console, t)
        console.print(f"{len(plan.drops):,} tensor(s) dropped, {plan.bytes_saved:,} bytes saved.")


# ---------------------------------------------------------------------------
# Output directory checks


def check_output(source_root: str, out_dir: str, overwrite: bool) -> None:
    """Never in place: refuse an output that is the input, inside it or containing it; refuse a non-empty one."""
    src = os.path.realpath(source_root)
    out = os.path.realpath(out_dir)
    if out == src or out.startswith(src.rstrip(os.sep) + os.sep):
        raise UsageError(
            f"--out {out_dir} is {'the input' if out == src else 'inside the input'} {source_root}; "
            "prune never writes in place"
        )
    if src.startswith(out.rstrip(os.sep) + os.sep):
        raise UsageError(f"--out {out_dir} contains the input {source_root}; choose a directory outside it")
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"--out {out_dir} exists and is not a directory")
    try:
        occupied = os.path.isdir(out_dir) and bool(os.listdir(out_dir))
    except OSError as exc:
        raise UsageError(f"--out {out_dir}: cannot list it: {exc.strerror or exc}") from None
    if occupied and not overwrite:
        raise UsageError(f"--out {out_dir} is not empty; pass --overwrite to replace its checkpoint files")


# ---------------------------------------------------------------------------
# Execution


@dataclass(frozen=True)
class Verification:
    """Result of re-auditing the output and comparing every written byte with its source."""

    problems: tuple[str, ...]
    verdict: str
    bytes_compared: int

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class PruneResult:
    out_dir: str
    receipt: dict
    verification: Verification | None


class _Shrunk(Exception):
    """The source ended before the bytes its header promised (it changed during the run)."""


_ERRNO_TEXT = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (file size limit reached)",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
_NO_CFR = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF})


class _Copier:
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
                raise _Shrunk()
            src_off += k
            dst_off += k
            n -= k


class _Hasher(Protocol):
    """A running digest (``hashlib.sha256()``)."""

    def update(self, data: bytes | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


@dataclass
class _OutFile:
    """One output shard in flight: where it goes, what it must contain, its running hash."""

    final: str
    tmp: str
    src_path: str
    src_stat: tuple[int, int]
    write_fd: int
    read_fd: int = -1
    src_fd: int = -1
    sha: _Hasher = field(default_factory=hashlib.sha256)
    header: bytes = b""
    digest: str = ""


class _Run:
    """Bookkeeping of one execution: temporary paths to remove on failure, the file being written."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.tmps: set[str] = set()
        self.fds: set[int] = set()
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
        os.replace(tmp, final)
        self.tmps.discard(tmp)

    def cleanup(self) -> None:
        for fd in list(self.fds):
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()
        for tmp in self.tmps:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        self.tmps.clear()


class _Worker:
    """One background thread running submitted jobs in order.

    Errors go to a list shared by all workers of a run: after the first, every worker skips
    its remaining jobs and the main thread re-raises it at its next submit or at ``join``.
    """

    def __init__(self, name: str, errors: list[BaseException], maxsize: int = 8) -> None:
        self.errors = errors
        self.q: queue.Queue = queue.Queue(maxsize)
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        if self.errors:
            raise self.errors[0]
        self.q.put(job)

    def join(self) -> None:
        self.q.put(None)
        self.thread.join()

    def abort(self) -> None:
        while True:
            try:
                self.q.get_nowait()
            except queue.Empty:
                break
        self.join()

    def _loop(self) -> None:
        while True:
            job = self.q.get()
            if job is None:
                return
            if self.errors:
                continue
            try:
                job()
            except BaseException as exc:  # re-raised by the main thread
                self.errors.append(exc)


class _Reader:
    """Read-back state of one checker thread: two fixed buffers, all the memory prune holds."""

    def __init__(self, compare: bool) -> None:
        self.out_buf = bytearray(CHUNK)
        self.src_buf = bytearray(CHUNK) if compare else bytearray()
        self.compared = 0


class _Pipeline:
    """Copy on the main thread; read back, compare and hash on checker threads; fsync and rename on a committer.

    sha256 (~1.3 GB/s) is the slowest step, so each shard goes to one of ``n`` checker threads
    (round robin; a shard's hash is sequential) while the main thread's kernel copy runs ahead;
    the fsync of a finished shard waits on the disk off the checkers' path.
    """

    def __init__(self, run: _Run, compare: bool, progress: Progress | None, total: int, n: int) -> None:
        self.run = run
        self.compare = compare
        self.progress = progress
        self.total = total
        self.errors: list[BaseException] = []
        self.checkers = [(_Worker(f"nhcheck-prune-check-{i}", self.errors), _Reader(compare)) for i in range(n)]
        self.committer = _Worker("nhcheck-prune-commit", self.errors, maxsize=0)
        self.turn = 0

    @property
    def compared(self) -> int:
        return sum(r.compared for _, r in self.checkers)

    def next_checker(self) -> tuple[_Worker, _Reader]:
        c = self.checkers[self.turn % len(self.checkers)]
        self.turn += 1
        return c

    def check(
        self, c: tuple[_Worker, _Reader], f: _OutFile, dst_off: int, src_off: int | None, n: int, compare: bool = True
    ) -> None:
        worker, reader = c
        worker.submit(lambda: self._check(reader, f, dst_off, src_off, n, compare))

    def done(self, c: tuple[_Worker, _Reader], f: _OutFile) -> None:
        c[0].submit(lambda: self.committer.submit(lambda: self._finish(f)))

    def close(self) -> None:
        for worker, _ in self.checkers:
            worker.join()
        self.committer.join()
        if self.errors:
            raise self.errors[0]

    def abort(self) -> None:
        self.errors.append(NhcheckError("aborted"))
        for worker, _ in self.checkers:
            worker.abort()
        self.committer.abort()

    def _check(self, r: _Reader, f: _OutFile, dst_off: int, src_off: int | None, n: int, compare: bool) -> None:
        """Hash output bytes [dst_off, dst_off+n); compare them with the header (``src_off`` None) or the source.

        Compares whole bytearrays (memcmp, ~13 GB/s), not memoryviews (element-wise, ~1 GB/s).
        """
        compare = compare and self.compare
        while n > 0:
            k = min(n, CHUNK)
            out = memoryview(r.out_buf)[:k]
            if os.preadv(f.read_fd, [out], dst_off) != k:
                raise CheckpointError(f.tmp, "output is shorter than what was written")
            if compare:
                if src_off is None:
                    same = out.tobytes() == f.header[dst_off : dst_off + k]
                else:
                    if os.preadv(f.src_fd, [memoryview(r.src_buf)[:k]], src_off) != k:
                        raise CheckpointError(
                            f.src_path,
                            "changed size during the run (it ended early); prune stopped, temporary files removed",
                        )
                    same = r.out_buf == r.src_buf if k == CHUNK else r.out_buf[:k] == r.src_buf[:k]
                if not same:
                    raise CheckpointError(f.final, f"output bytes at offset {dst_off} differ from the source")
                r.compared += k
            f.sha.update(out)
            if self.progress is not None:
                self.progress("verify" if self.compare else "hash", k, self.total)
            dst_off += k
            if src_off is not None:
                src_off += k
            n -= k

    def _finish(self, f: _OutFile) -> None:
        try:
            os.fsync(f.write_fd)
        except OSError as exc:  # name the file: the main thread has moved on to another one
            raise OSError(exc.errno, exc.strerror, f.final) from None
        if _stat_key(f.src_path) != f.src_stat:
            raise CheckpointError(
                f.src_path, "changed during the run (size or modification time); prune stopped, temporary files removed"
            )
        f.digest = f.sha.hexdigest()
        for fd in (f.write_fd, f.read_fd, f.src_fd):
            self.run.close(fd)
        self.run.commit(f.tmp, f.final)


def _stat_key(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _layout(shard: ShardHeader, dropped: frozenset[str]) -> tuple[bytes, list[tuple[int, int, int]], int]:
    """New header (same key order, offsets compacted) and merged (src, dst, n) copy ranges; data size."""
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
    return header, [(s, len(header) + d, n) for s, d, n in ranges], pos


def _sha256_range(fd: int, start: int, n: int) -> str:
    h = hashlib.sha256()
    while n > 0:
        data = os.pread(fd, min(n, CHUNK), start)
        if not data:
            raise _Shrunk()
        h.update(data)
        start += len(data)
        n -= len(data)
    return h.hexdigest()


def _prepare_out(out_dir: str, overwrite: bool, finals: set[str]) -> None:
    """Create ``out_dir``; with --overwrite remove our leftovers and checkpoint files we will not rewrite.

    The old receipt and index go first: a run killed later must not look complete.
    """
    os.makedirs(out_dir, exist_ok=True)
    if not overwrite:
        return
    for name in (RECEIPT_NAME, INDEX_NAME):
        if os.path.lexists(os.path.join(out_dir, name)):
            os.unlink(os.path.join(out_dir, name))
    for dirpath, _dirs, files in os.walk(out_dir):
        for fn in files:
            path = os.path.join(dirpath, fn)
            stale_shard = dirpath == out_dir and fn.endswith(".safetensors") and path not in finals
            if (fn.startswith(TMP_PREFIX) and fn.endswith(TMP_SUFFIX)) or stale_shard:
                os.unlink(path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _io_error(exc: OSError, run: _Run) -> NhcheckError:
    text = _ERRNO_TEXT.get(exc.errno or 0, exc.strerror or str(exc))
    return CheckpointError(
        exc.filename or run.current,
        f"{text}; prune stopped, temporary files removed, nothing final-named left half-written",
    )


def execute(
    plan: PrunePlan,
    out_dir: str,
    *,
    overwrite: bool = False,
    link: bool = False,
    verify: bool = True,
    progress: Progress | None = None,
) -> PruneResult:
    """Write the pruned checkpoint into ``out_dir``; raise ``NhcheckError`` (exit 2) on any I/O failure."""
    if plan.refusal is not None:
        raise UsageError("prune refused: " + plan.refusal.splitlines()[0])
    ckpt = plan.report.checkpoint
    check_output(ckpt.root, out_dir, overwrite)
    out_dir = os.path.abspath(out_dir)
    # Validate everything before writing anything: sidecar paths stay inside the checkpoint,
    # shards are the size their headers were parsed at.
    sidecars = [(rel, safe_member(ckpt.root, rel, "file")) for rel in ckpt.sidecars]
    stats = {}
    for s in ckpt.shards:
        stats[s.name] = _stat_key(s.path)
        if stats[s.name][0] != s.file_size:
            raise CheckpointError(
                s.path, f"changed size since it was audited ({s.file_size} → {stats[s.name][0]} bytes)"
            )
    dropped = plan.dropped_names
    actions = {sp.name: sp.action for sp in plan.shards}
    layouts = {s.name: _layout(s, dropped) for s in ckpt.shards if actions[s.name] == "rewrite"}
    sizes = {
        s.name: (len(layouts[s.name][0]) + layouts[s.name][2] if s.name in layouts else s.file_size)
        for s in ckpt.shards
        if actions[s.name] != "omit"
    }
    finals = {os.path.join(out_dir, n) for n in sizes} | {os.path.join(out_dir, rel) for rel, _ in sidecars}
    if ckpt.index is not None:
        finals.add(os.path.join(out_dir, INDEX_NAME))
    total = sum(sizes.values())

    run = _Run(out_dir)
    pipe: _Pipeline | None = None
    try:
        _prepare_out(out_dir, overwrite, finals)
        pipe = _Pipeline(run, verify, progress, total, n=max(1, min(2, os.cpu_count() or 1)))
        copier = _Copier()
        outs: list[tuple[ShardHeader, _OutFile | None]] = []
        reasons = {d.tensor.name: (d.outcome, d.reason) for d in plan.drops}
        dropped_rows: list[dict[str, object]] = []
        for shard in ckpt.shards:
            action = actions[shard.name]
            run.source = shard.path
            src_fd = run.open(shard.path, os.O_RDONLY)
            for t in shard.tensors:
                if t.name in dropped:
                    dropped_rows.append(
                        {
                            "name": t.name,
                            "shard": shard.name,
                            "dtype": t.dtype,
                            "shape": list(t.shape),
                            "sha256": _sha256_range(src_fd, t.start, t.nbytes),
                            "outcome": reasons[t.name][0],
                            "reason": reasons[t.name][1],
                        }
                    )
            if action == "omit":
                run.close(src_fd)
                outs.append((shard, None))
                continue
            final = os.path.join(out_dir, shard.name)
            f = _write_shard(
                run,
                pipe,
                copier,
                shard,
                src_fd,
                final,
                layouts.get(shard.name),
                link,
                stats[shard.name],
                progress,
                total,
            )
            outs.append((shard, f))
        pipe.close()
        for rel, src in sidecars:
            run.source = src
            _copy_sidecar(run, copier, src, os.path.join(out_dir, rel))
        if ckpt.index is not None:
            index = _new_index(ckpt.index, dropped, plan)
            if index == ckpt.index:  # nothing to change: keep the file byte for byte
                _copy_sidecar(run, copier, os.path.join(ckpt.root, INDEX_NAME), os.path.join(out_dir, INDEX_NAME))
            else:
                _write_json(run, os.path.join(out_dir, INDEX_NAME), index, indent=2)
        for d in run.dirs:
            _fsync_dir(d)
        verification = _verify(plan, out_dir, pipe.compared) if verify else None
        receipt = _receipt(plan, outs, dropped_rows, sidecars, verification, link)
        _write_json(run, os.path.join(out_dir, RECEIPT_NAME), receipt, indent=1)
        _fsync_dir(out_dir)
        return PruneResult(out_dir, receipt, verification)
    except _Shrunk:
        raise CheckpointError(
            run.source, "changed size during the run (it ended early); prune stopped, temporary files removed"
        ) from None
    except OSError as exc:
        raise _io_error(exc, run) from None
    finally:
        if pipe is not None:  # after an error: stop the threads before their temporary files go
            pipe.abort()
        run.cleanup()


def _write_shard(
    run: _Run,
    pipe: _Pipeline,
    copier: _Copier,
    shard: ShardHeader,
    src_fd: int,
    final: str,
    layout: tuple[bytes, list[tuple[int, int, int]], int] | None,
    link: bool,
    src_stat: tuple[int, int],
    progress: Progress | None,
    total: int,
) -> _OutFile:
    tmp = run.tmp_for(final)
    if os.path.lexists(tmp):
        os.unlink(tmp)
    linked = False
    if layout is None and link:
        try:
            os.link(shard.path, tmp)
            linked = True
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
    write_fd = run.open(tmp, os.O_RDONLY if linked else os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    f = _OutFile(final, tmp, shard.path, src_stat, write_fd, run.open(tmp, os.O_RDONLY), src_fd)
    c = pipe.next_checker()
    if linked:
        pipe.check(c, f, 0, 0, shard.file_size, compare=False)
    elif layout is None:
        pos = 0
        while pos < shard.file_size:
            n = min(CHUNK, shard.file_size - pos)
            copier.copy(src_fd, write_fd, pos, pos, n)
            if progress is not None:
                progress("copy", n, total)
            pipe.check(c, f, pos, pos, n)
            pos += n
    else:
        header, ranges, _ = layout
        f.header = header
        done = 0
        while done < len(header):
            done += os.pwrite(write_fd, header[done:], done)
        if progress is not None:
            progress("copy", len(header), total)
        pipe.check(c, f, 0, None, len(header))
        for src_off, dst_off, n in ranges:
            while n > 0:
                k = min(CHUNK, n)
                copier.copy(src_fd, write_fd, src_off, dst_off, k)
                if progress is not None:
                    progress("copy", k, total)
                pipe.check(c, f, dst_off, src_off, k)
                src_off += k
                dst_off += k
                n -= k
    pipe.done(c, f)
    return f


def _copy_sidecar(run: _Run, copier: _Copier, src: str, final: str) -> None:
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


def _write_json(run: _Run, final: str, obj: object, indent: int) -> None:
    data = (json.dumps(obj, indent=indent, ensure_ascii=False) + "\n").encode("utf-8")
    tmp = run.tmp_for(final)
    fd = run.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    view = memoryview(data)
    done = 0
    while done < len(data):
        done += os.write(fd, view[done:])
    os.fsync(fd)
    run.close(fd)
    run.commit(tmp, final)


def _new_index(index: dict, dropped: frozenset[str], plan: PrunePlan) -> dict:
    """The source index minus the dropped names, ``total_size`` recomputed; every other key kept."""
    out = dict(index)
    out["weight_map"] = {k: v for k, v in index["weight_map"].items() if k not in dropped}
    meta = dict(index.get("metadata") or {})
    meta["total_size"] = sum(
        t.nbytes for s in plan.report.checkpoint.shards for t in s.tensors if t.name not in dropped
    )
    out["metadata"] = meta
    return out


def _verify(plan: PrunePlan, out_dir: str, compared: int) -> Verification:
    """Re-audit the output with the same engine: no orphans, no crash, no parameter less filled than before."""
    from nhcheck import pipeline

    before = plan.report
    ckpt = open_local(out_dir)
    after = pipeline.audit(
        pipeline.prepare(ckpt, before.engine, moe_backend=before.manifest.moe_backend),
        AuditOptions(compare_versions=False),
    )
    problems: list[str] = []
    if after.crash is not None:
        problems.append(f"{after.engine} still raises {after.crash.error} at {after.crash.tensor}")
    orphans = after.counts()["orphans"]
    if orphans:
        problems.append(f"{orphans:,} orphan tensor(s) remain on {after.engine}")
    was = {s.name: s for s in before.params}
    for s in after.params:
        b = was.get(s.name)
        if b is None:
            continue
        worse = _STATUS_RANK[s.status] < _STATUS_RANK[b.status] or (
            s.status == b.status == "partial" and not set(s.missing) <= set(b.missing)
        )
        if worse:
            problems.append(f"{s.name} is {s.status} after pruning (was {b.status})")
    for f in ckpt.findings:
        if f.severity == "error":
            problems.append(f"output {f.code}: {f.tensor or f.shard or ''} {f.message}")
    expected = [
        (t.name, t.dtype, t.shape)
        for s in before.checkpoint.shards
        for t in s.tensors
        if t.name not in plan.dropped_names
    ]
    got = [(t.name, t.dtype, t.shape) for s in ckpt.shards for t in s.tensors]
    if got != expected:
        problems.append("the output's tensors are not the source's minus the dropped ones")
    return Verification(tuple(problems), after.verdict, compared)


def _json_path(rel: str) -> str:
    """A file name for JSON.

    Names that are not UTF-8 (``surrogateescape`` from the OS) keep their bytes as ``\\xNN``.
    """
    try:
        rel.encode("utf-8")
        return rel
    except UnicodeEncodeError:
        return os.fsencode(rel).decode("utf-8", "backslashreplace")


def _receipt(
    plan: PrunePlan,
    outs: list[tuple[ShardHeader, _OutFile | None]],
    dropped_rows: list[dict[str, object]],
    sidecars: list[tuple[str, str]],
    verification: Verification | None,
    link: bool,
) -> dict:
    shards = []
    plans = {sp.name: sp for sp in plan.shards}
    for shard, f in outs:
        sp = plans[shard.name]
        action = sp.action if not (link and sp.action == "copy") else "link"
        shards.append(
            {
                "name": shard.name,
                "action": action,
                "tensors": sp.tensors - sp.dropped,
                "dropped": sp.dropped,
                "bytes": os.path.getsize(f.final) if f else 0,
                "sha256": f.digest if f else None,
            }
        )
    return {
        "schema": RECEIPT_SCHEMA,
        "nhcheck_version": __version__,
        "source": plan.report.source,
        "source_root": plan.report.checkpoint.root,
        "engine": str(plan.engine),
        "moe_backend": plan.report.manifest.moe_backend,
        "moe_backend_requested": plan.report.manifest.moe_backend_requested,
        "audit_verdict": plan.report.verdict,
        "dropped": dropped_rows,
        "shards": shards,
        "files": [_json_path(rel) for rel, _ in sidecars],
        "verification": None
        if verification is None
        else {
            "ok": verification.ok,
            "verdict": verification.verdict,
            "bytes_compared": verification.bytes_compared,
            "problems": list(verification.problems),
        },
    }
