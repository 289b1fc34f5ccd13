"""Errors that end a run with exit code 2 and one line naming the file and the problem."""

from __future__ import annotations


class NhcheckError(Exception):
    """Something nhcheck could not do; the CLI prints ``str(err)`` and exits 2."""


class CheckpointError(NhcheckError):
    """A checkpoint file that cannot be parsed or must not be opened.

    Carries the path so every message names the file: users audit directories of
    dozens of shards and need to know which one is broken.
    """

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class UsageError(NhcheckError):
    """Bad options or an unsupported engine/config combination."""
