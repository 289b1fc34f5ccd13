"""Resolve what the user typed (a directory, a .safetensors file, or a Hub repo id) to a Checkpoint."""

from __future__ import annotations

import os
import re
from collections.abc import Callable

from nhcheck.checkpoint import Checkpoint, open_local
from nhcheck.errors import CheckpointError

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

Progress = Callable[[int, int, str], None]


def looks_like_repo_id(source: str) -> bool:
    return bool(_REPO_ID.match(source)) and not os.path.exists(source)


def open_source(source: str, revision: str | None = None, progress: Progress | None = None) -> Checkpoint:
    """Local paths win over repo ids, so ``./org/model`` never goes to the network."""
    if os.path.exists(source):
        if revision:
            raise CheckpointError(source, "--revision applies to Hub repo ids, not local paths")
        return open_local(source, progress)
    if looks_like_repo_id(source):
        from nhcheck.hub import open_hub

        return open_hub(source, revision, progress)
    raise CheckpointError(source, "no such file or directory, and not a Hub repo id (owner/name)")


def open_for_data(source: str, revision: str | None = None, progress: bool = True) -> str:
    """A local path for commands that read tensor bytes (prune, load): Hub repo ids are downloaded first.

    Local paths come back unchanged; a repo id is fetched into the normal Hugging Face cache
    (only the files those commands need, with huggingface_hub's progress bars unless
    ``progress`` is false) and its snapshot directory returned.
    """
    if os.path.exists(source):
        if revision:
            raise CheckpointError(source, "--revision applies to Hub repo ids, not local paths")
        return source
    if looks_like_repo_id(source):
        from nhcheck.hub import materialize

        return materialize(source, revision, progress)
    raise CheckpointError(source, "no such file or directory, and not a Hub repo id (owner/name)")
