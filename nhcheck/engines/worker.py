"""The process shape both live workers share: each checkpoint in a forked child, one result file each.

Building a model leaves global state behind (registries, distributed groups, the host stand-ins), so
every checkpoint gets a fresh fork of a worker that has already imported the engine (the imports are the
slow part). The child writes its answer under a temporary name, fsynced, then renamed: the parent reads
all of it or none. A child that fails writes nothing and prints its traceback; the parent reports the
missing answer with that log's last line.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable, Iterable


def write_json_atomic(path: str, obj: object) -> None:
    """``obj`` as JSON at ``path``: temporary name, fsync, rename."""
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def is_setup_error(exc: BaseException, worker_file: str, setup_errors: tuple[str, ...]) -> bool:
    """Whether an error raised while building the model is the worker's own set-up of the process (raised in
    the worker's file, or a message of its set-up: no CUDA, no distributed group), never a verdict on the
    checkpoint."""
    where = traceback.extract_tb(exc.__traceback__)[-1].filename
    return os.path.abspath(where) == os.path.abspath(worker_file) or any(m in str(exc) for m in setup_errors)


def run_jobs(jobs: Iterable[dict], one: Callable[[dict], dict]) -> None:
    """``one(job)`` for each job in a forked child, its answer written to ``job["out"]``; one at a time."""
    for job in jobs:
        _flush()
        pid = os.fork()
        if pid == 0:
            _child(job, one)
        os.waitpid(pid, 0)


def _child(job: dict, one: Callable[[dict], dict]) -> None:
    """In the forked child: one answer, one result file; never returns."""
    code = 0
    try:
        write_json_atomic(job["out"], one(job))
    except BaseException:  # the parent reports the missing result with this log's last line
        traceback.print_exc()
        code = 3
    finally:
        _flush()
        os._exit(code)


def _flush() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
