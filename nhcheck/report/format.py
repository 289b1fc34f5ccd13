"""The format object: one report, in the format asked for, to stdout or ``-o FILE``.

As pip-audit's ``_format/`` does for its result, every verb hands its report and the renderer for
that kind of report to one ``Format`` (``get(name, output)``); the format decides which of the
renderer's three functions runs — only the asked one is built — and where its output goes (a file
is opened only then, so a report that cannot be rendered leaves no empty file behind).

A renderer is a ``report.Renderer``: ``json(report) -> str`` (or UTF-8 bytes), ``markdown(report) -> str``,
``table(report, console)`` (and the one-line summary, which the CLI prints on stderr).
"""

from __future__ import annotations

import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, ClassVar

from nhcheck.errors import NhcheckError
from nhcheck.report import Renderer, console


class Format(ABC):
    """Writes one report: table, JSON or markdown, to stdout or to ``output``."""

    name: ClassVar[str]

    def __init__(self, output: str | None = None) -> None:
        self.output = output

    @abstractmethod
    def write(self, renderer: Renderer, report: Any) -> None:
        """Render ``report`` with ``renderer`` in this format and write it out."""

    def _open(self, binary: bool = False):
        assert self.output is not None
        try:
            return open(self.output, "wb") if binary else open(self.output, "w", encoding="utf-8")
        except OSError as exc:
            raise NhcheckError(f"-o {self.output}: cannot write the report: {exc.strerror or exc}") from None

    def _text(self, text: str | bytes | bytearray | Iterable[bytes | memoryview]) -> None:
        """Text, or UTF-8 bytes, or UTF-8 pieces (a 61 MB JSON document, a chunk at a time): bytes skip the text
        layer's re-encoding."""
        if isinstance(text, str):
            if self.output:
                with self._open() as fh:
                    fh.write(text)
            else:
                sys.stdout.write(text)
                sys.stdout.flush()
            return
        pieces = (text,) if isinstance(text, (bytes, bytearray)) else text
        if os.linesep != "\n":  # what the text layer would have written
            pieces = (bytes(p).replace(b"\n", os.linesep.encode()) for p in pieces)
        if self.output:
            with self._open(binary=True) as fh:
                for piece in pieces:
                    fh.write(piece)
        else:
            sys.stdout.flush()
            for piece in pieces:
                sys.stdout.buffer.write(piece)
            sys.stdout.buffer.flush()


class JsonFormat(Format):
    name = "json"

    def write(self, renderer: Renderer, report: Any) -> None:
        self._text(renderer.json(report))


class MarkdownFormat(Format):
    name = "markdown"

    def write(self, renderer: Renderer, report: Any) -> None:
        self._text(renderer.markdown(report))


class TableFormat(Format):
    """Rich tables in a terminal; plain rows piped or in a file (``console``)."""

    name = "table"

    def write(self, renderer: Renderer, report: Any) -> None:
        if self.output:
            with self._open() as fh:
                renderer.table(report, console.file(fh))
        else:
            renderer.table(report, console.stdout())


FORMATS: dict[str, type[Format]] = {f.name: f for f in (TableFormat, JsonFormat, MarkdownFormat)}


def get(name: str, output: str | None = None) -> Format:
    """The format called ``name`` (``table``, ``json``, ``markdown``), writing to ``output`` or stdout."""
    return FORMATS[name](output)
