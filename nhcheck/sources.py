"""Resolve what the user typed (a directory, a .safetensors file, or a Hub repo id) to a Checkpoint.

One decision for every command: a local path wins over a repo id (``./org/model`` never goes to
the network), ``--revision`` applies to repo ids only, anything else is one clear error. Commands
that read headers only open a repo remotely; commands that read tensor bytes (prune, load) have
the repo downloaded into the normal Hugging Face cache first.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Literal

import msgspec

from nhcheck.checkpoint import Checkpoint, open_local
from nhcheck.errors import CheckpointError

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

Progress = Callable[[int, int, str], None]


def looks_like_repo_id(source: str) -> bool:
    return bool(_REPO_ID.match(source)) and not os.path.exists(source)


def _kind(source: str, revision: str | None) -> Literal["local", "hub"]:
    if os.path.exists(source):
        if revision:
            raise CheckpointError(source, "--revision applies to Hub repo ids, not local paths")
        return "local"
    if looks_like_repo_id(source):
        return "hub"
    raise CheckpointError(source, "no such file or directory, and not a Hub repo id (owner/name)")


def open_source(
    source: str, revision: str | None = None, progress: Progress | None = None, *, data: bool = False
) -> Checkpoint:
    """The checkpoint ``source`` names; with ``data`` (the command reads tensor bytes) a Hub repo is
    downloaded first and opened from the local cache, still named by its repo id and revision."""
    if _kind(source, revision) == "local":
        return open_local(source, progress)
    if not data:
        from nhcheck.hub import open_hub

        return open_hub(source, revision, progress)
    ckpt = open_local(open_for_data(source, revision, progress is not None), progress)
    return msgspec.structs.replace(ckpt, source=source, revision=revision)


def open_for_data(source: str, revision: str | None = None, progress: bool = True) -> str:
    """A local path for commands that read tensor bytes (prune, load): Hub repo ids are downloaded first.

    Local paths come back unchanged; a repo id is fetched into the normal Hugging Face cache
    (only the files those commands need, with huggingface_hub's progress bars unless
    ``progress`` is false) and its snapshot directory returned.
    """
    if _kind(source, revision) == "local":
        return source
    from nhcheck.hub import materialize

    return materialize(source, revision, progress)
