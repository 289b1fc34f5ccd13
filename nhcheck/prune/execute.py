"""Carry out a prune plan: shards streamed and proven, the other files copied, the index, the receipt last."""

from __future__ import annotations

import errno
import hashlib
import os

from nhcheck.checkpoint import INDEX_NAME, safe_member
from nhcheck.errors import CheckpointError, UsageError
from nhcheck.prune import outdir
from nhcheck.prune.digest import plan_digest
from nhcheck.prune.plan import PrunePlan
from nhcheck.prune.receipt import RECEIPT_NAME, PruneResult, build_receipt, reaudit
from nhcheck.prune.stream import Progress, ShardJob, Streamer, compacted, whole_file
from nhcheck.prune.writer import (
    CHUNK,
    Copier,
    Run,
    Shrunk,
    copy_file,
    fsync_dir,
    io_error,
    json_bytes,
    stage_bytes,
    stat_key,
    write_json,
)
from nhcheck.safetensors_header import ShardHeader


def _sha256_range(fd: int, start: int, n: int) -> str:
    h = hashlib.sha256()
    while n > 0:
        data = os.pread(fd, min(n, CHUNK), start)
        if not data:
            raise Shrunk()
        h.update(data)
        start += len(data)
        n -= len(data)
    return h.hexdigest()


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


def _link(job: ShardJob) -> bool:
    """Hard-link the source shard at the job's temporary name; False where the file system will not.

    The link is to the file a symlinked shard resolves to (a Hub cache snapshot's files are links into
    its blobs): Linux's link(2), which ``os.link`` calls, would link the symlink itself.
    """
    try:
        os.link(os.path.realpath(job.src_path), job.tmp)
        return True
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        return False


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
        raise UsageError("prune refused: " + plan.refusal.text.splitlines()[0])
    ckpt = plan.report.checkpoint
    outdir.check_output(ckpt.root, out_dir, overwrite)
    out_dir = os.path.abspath(out_dir)
    # Validate everything before writing anything: sidecar paths stay inside the checkpoint,
    # shards are the size their headers were parsed at.
    sidecars = [(rel, safe_member(ckpt.root, rel, "file")) for rel in ckpt.sidecars]
    stats = {}
    for s in ckpt.shards:
        stats[s.name] = stat_key(s.path)
        if stats[s.name][0] != s.file_size:
            raise CheckpointError(
                s.path, f"changed size since it was audited ({s.file_size} → {stats[s.name][0]} bytes)"
            )
    dropped = plan.dropped_names
    actions = {sp.name: sp.action for sp in plan.shards}
    layouts = {
        s.name: compacted(s, dropped) if actions[s.name] == "rewrite" else whole_file(s.file_size)
        for s in ckpt.shards
        if actions[s.name] != "omit"
    }
    total = sum(layout.size for layout in layouts.values())

    run = Run(out_dir)
    streamer: Streamer | None = None
    done = False
    try:
        outdir.prepare(run, out_dir, overwrite, tuple(layouts))
        streamer = Streamer(run, verify, progress, total)
        copier = Copier()
        outs: list[tuple[ShardHeader, ShardJob | None]] = []
        reasons = {d.tensor.name: (d.outcome, d.reason) for d in plan.drops}
        dropped_rows: list[dict[str, object]] = []
        for shard in ckpt.shards:  # every shard in flight first: the main thread's own reads come after
            if shard.name not in layouts:
                outs.append((shard, None))
                continue
            how = plan_digest(ckpt.root, shard.name, shard.path, actions[shard.name] == "rewrite")
            job = ShardJob(os.path.join(out_dir, shard.name), shard.path, stats[shard.name], layouts[shard.name], how)
            job.tmp = run.tmp_for(job.final)
            if os.path.lexists(job.tmp):
                os.unlink(job.tmp)
            job.linked = link and actions[shard.name] == "copy" and _link(job)
            streamer.submit(job)
            outs.append((shard, job))
        for shard in ckpt.shards:
            if not any(t.name in dropped for t in shard.tensors):
                continue
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
            run.close(src_fd)
        for rel, src in sidecars:
            run.source = src
            copy_file(run, copier, src, os.path.join(out_dir, rel))
        # The new index (~16 MB of JSON at Super size, 165k tensors) is written and fsynced under its
        # temporary name while the shards stream; it takes its final name after them.
        index = None if ckpt.index is None else _new_index(ckpt.index, dropped, plan)
        index_path = os.path.join(out_dir, INDEX_NAME)
        staged = None if index is None or index == ckpt.index else stage_bytes(run, index_path, json_bytes(index, 2))
        streamer.wait()
        if staged is not None:
            run.commit(staged, index_path)
        elif index is not None:  # nothing to change: keep the file byte for byte
            copy_file(run, copier, os.path.join(ckpt.root, INDEX_NAME), os.path.join(out_dir, INDEX_NAME))
        for d in run.dirs:
            fsync_dir(d)
        compared = sum(job.compared for _, job in outs if job is not None)
        verification = reaudit(plan, out_dir, compared) if verify else None
        receipt = build_receipt(plan, outs, dropped_rows, sidecars, verification, link)
        write_json(run, os.path.join(out_dir, RECEIPT_NAME), receipt, indent=1)
        done = True
        outdir.settle(out_dir, done=True)
        fsync_dir(out_dir)
        return PruneResult(out_dir, receipt, verification)
    except Shrunk as exc:
        raise CheckpointError(
            exc.path or run.source,
            "changed size during the run (it ended early); prune stopped, temporary files removed",
        ) from None
    except OSError as exc:
        raise io_error(exc, run) from None
    finally:
        if streamer is not None and not done:  # after an error: stop the threads before their files go
            streamer.abort()
        run.cleanup(failed=not done)
        if not done and os.path.isdir(out_dir):
            outdir.settle(out_dir, done=False)
