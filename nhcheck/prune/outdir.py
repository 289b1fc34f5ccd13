"""The output directory: never the input, and ``--overwrite`` replaces only what nhcheck wrote there.

What nhcheck wrote before is what its receipt lists, and, for a run killed before its receipt,
what that run's journal lists: the journal (a dot-file, ``JOURNAL_NAME``) names every shard a
run may leave behind; it is written before the first shard and removed after the receipt. A
``*.safetensors`` file in ``--out`` that neither lists is someone else's: prune refuses rather
than delete or replace it.
"""

from __future__ import annotations

import json
import os

from nhcheck.checkpoint import INDEX_NAME
from nhcheck.errors import UsageError
from nhcheck.prune.receipt import RECEIPT_NAME, RECEIPT_SCHEMA
from nhcheck.prune.writer import TMP_PREFIX, TMP_SUFFIX, Run, write_json

JOURNAL_NAME = TMP_PREFIX + "journal.json"
JOURNAL_SCHEMA = "nhcheck.prune-journal/1"


def check_output(source_root: str, out_dir: str, overwrite: bool) -> None:
    """Never in place: refuse an output that is the input, inside it or containing it; refuse a non-empty
    one without ``--overwrite``, and with it one that holds shards nhcheck did not write."""
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
    if occupied:
        _refuse_foreign(out_dir, ())


def written_before(out_dir: str) -> frozenset[str]:
    """Shard paths (relative to ``out_dir``) an earlier prune wrote there: its receipt's, its journal's."""
    ours: set[str] = set()
    for name, schema, key in ((RECEIPT_NAME, RECEIPT_SCHEMA, "shards"), (JOURNAL_NAME, JOURNAL_SCHEMA, "shards")):
        try:
            with open(os.path.join(out_dir, name), encoding="utf-8") as fh:
                doc = json.load(fh)
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict) or doc.get("schema") != schema or not isinstance(doc.get(key), list):
            continue
        for entry in doc[key]:
            name_ = entry.get("name") if isinstance(entry, dict) else entry
            if isinstance(name_, str):
                ours.add(os.path.normpath(name_))
    return frozenset(ours)


def _refuse_foreign(out_dir: str, finals: tuple[str, ...]) -> frozenset[str]:
    """Raise if a shard in ``out_dir`` (or at a path prune will write) is not nhcheck's; return nhcheck's."""
    ours = written_before(out_dir)
    present = {fn for fn in os.listdir(out_dir) if fn.endswith(".safetensors")}
    present |= {rel for rel in finals if rel.endswith(".safetensors") and os.path.lexists(os.path.join(out_dir, rel))}
    foreign = sorted(p for p in present if os.path.normpath(p) not in ours)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3:,} more" if len(foreign) > 3 else "")
        raise UsageError(
            f"--out {out_dir} holds {len(foreign):,} *.safetensors file(s) no earlier nhcheck prune wrote "
            f"({shown}); --overwrite replaces only nhcheck's own output: move them away or choose another --out"
        )
    return ours


def prepare(run: Run, out_dir: str, overwrite: bool, shards: tuple[str, ...]) -> None:
    """Create ``out_dir``, journal this run's shards, and with --overwrite clear what nhcheck wrote before.

    The old receipt and index go first: a run killed later must not look complete. Then the
    earlier run's shards this run does not rewrite, and leftover temporary files.
    """
    os.makedirs(out_dir, exist_ok=True)
    ours = _refuse_foreign(out_dir, shards) if overwrite else frozenset()
    journal = {"schema": JOURNAL_SCHEMA, "shards": sorted(ours | {os.path.normpath(s) for s in shards})}
    write_json(run, os.path.join(out_dir, JOURNAL_NAME), journal, indent=1)
    if run.created and run.created[-1] == os.path.join(out_dir, JOURNAL_NAME):
        run.created.pop()  # kept after a failure while it names files that remain (see ``settle``)
    if not overwrite:
        return
    for name in (RECEIPT_NAME, INDEX_NAME):
        if os.path.lexists(os.path.join(out_dir, name)):
            os.unlink(os.path.join(out_dir, name))
    keep = {os.path.normpath(s) for s in shards}
    for rel in sorted(ours - keep):
        path = os.path.join(out_dir, rel)
        if os.path.isfile(path) and not os.path.islink(path):
            os.unlink(path)
    for dirpath, _dirs, files in os.walk(out_dir):
        for fn in files:
            if fn.startswith(TMP_PREFIX) and fn.endswith(TMP_SUFFIX):
                os.unlink(os.path.join(dirpath, fn))


def settle(out_dir: str, *, done: bool) -> None:
    """Remove the journal once the receipt stands, or after a failure once none of the files it names remains."""
    path = os.path.join(out_dir, JOURNAL_NAME)
    if not os.path.lexists(path):
        return
    if not done and any(os.path.lexists(os.path.join(out_dir, rel)) for rel in written_before(out_dir)):
        return
    os.unlink(path)
