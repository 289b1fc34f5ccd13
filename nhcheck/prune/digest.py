"""Which digest each output shard's receipt entry carries, and whether it has to be computed.

- A **copied or linked** shard is byte-identical to its source, so its digest is the one people compare
  with the Hub's: the sha256 of the LFS pointer. It stays sha256. When the source already names that
  sha256 it is not computed again: a Hugging Face cache blob is stored under its LFS sha256
  (``…/models--org--name/blobs/<sha256>``, what ``nhcheck prune org/name`` and ``hf download`` leave), and
  an ``hf download --local-dir`` copy keeps it as the etag in ``.cache/huggingface/download/<file>.metadata``
  (trusted, as huggingface_hub trusts it, only while the file is not newer than that record). The copy
  itself is still read back and compared byte for byte with the source; what is not recomputed is the
  source's own digest, and the receipt says so (``digest_from``).
- A **rewritten** shard is a new file that no one else has a digest of: BLAKE3, which hashes several
  times faster than sha256 on one core and splits one file's hashing over several (``max_threads``),
  so the digest is no longer the slowest stage of a rewrite. Where the ``blake3`` package (a dependency)
  cannot be imported the rewritten shard gets sha256 instead; the entry names its algorithm either way.

Dropped tensors keep sha256 (a few MB, hashed once).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from types import ModuleType
from typing import Literal, Protocol

from nhcheck.checkpoint import hub_blobs

Algorithm = Literal["sha256", "blake3"]
#: Where a shard's digest came from: hashed by this run, or named by the Hub's cache / download record.
Origin = Literal["computed", "hub-cache-blob", "hub-download-metadata"]

_SHA256 = re.compile(r"[0-9a-f]{64}")


class Hasher(Protocol):
    def update(self, data: memoryview, /) -> object: ...

    def hexdigest(self) -> str: ...


@dataclass(frozen=True)
class DigestPlan:
    """The algorithm of one shard's digest; ``known``: its hex digest where the source names it (nothing to hash)."""

    algorithm: Algorithm
    origin: Origin = "computed"
    known: str = ""


def plan_digest(root: str, rel: str, path: str, rewritten: bool) -> DigestPlan:
    """The digest of output shard ``rel`` whose source is ``path`` inside checkpoint ``root``."""
    if rewritten:
        return DigestPlan("blake3" if _blake3() is not None else "sha256")
    blobs = hub_blobs(root)
    if blobs is not None:
        real = os.path.realpath(path)
        name = os.path.basename(real)
        if os.path.dirname(real) == blobs and _SHA256.fullmatch(name):
            return DigestPlan("sha256", "hub-cache-blob", name)
    etag = _download_metadata_etag(root, rel, path)
    if etag:
        return DigestPlan("sha256", "hub-download-metadata", etag)
    return DigestPlan("sha256")


def new_hasher(algorithm: Algorithm) -> Hasher:
    """A streaming hasher; BLAKE3's spreads each large update over the cores (it releases the GIL)."""
    if algorithm == "blake3":
        blake3 = _blake3()
        assert blake3 is not None  # plan_digest picks blake3 only where it imports
        return blake3.blake3(max_threads=blake3.blake3.AUTO)
    import hashlib

    return hashlib.sha256()


def _blake3() -> ModuleType | None:
    try:
        import blake3
    except ImportError:
        return None
    return blake3


def _download_metadata_etag(root: str, rel: str, path: str) -> str:
    """The LFS sha256 ``hf download --local-dir`` recorded for ``rel``, if the file is not newer than the record.

    The record is three lines: commit, etag, the time it was written; huggingface_hub itself trusts it
    while the file's mtime is at most one second past that time, and so does this.
    """
    record = os.path.join(root, ".cache", "huggingface", "download", rel + ".metadata")
    try:
        with open(record, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
        etag, stamp = lines[1].strip(), float(lines[2])
        mtime = os.stat(path).st_mtime
    except (OSError, ValueError, IndexError):
        return ""
    if not _SHA256.fullmatch(etag) or mtime - 1 > stamp:
        return ""
    return etag
