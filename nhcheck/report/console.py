"""The one console factory: every rich console nhcheck writes through is made here.

Policy, in one place: the report goes to stdout (rich tables in a terminal; piped, plain rows and no
wrapping, see ``report.print_table``) or to a file (never a terminal: plain rows, no colour); progress
and the one-line summary go to stderr, never wrapped, whatever the width. ``NO_COLOR`` turns colour off
everywhere.

A report destination rich would write plain to (a pipe, a file) is a ``Plain``: plain lines go straight to it, and
rich, whose import is a fifth of a small audit's run time, is imported only when something asks for more.
"""

from __future__ import annotations

import builtins
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

#: The width of a table written to a file or a pipe when ``COLUMNS`` does not say (plain rows ignore it).
_PIPE_WIDTH = 160

#: Text rich might not print as written: a markup tag or escape (``[``, ``\\``) or an emoji code (``:name:``).
_NOT_AS_WRITTEN = re.compile(r"[\[\\]|:\S*?:")


def renders(text: str) -> bool:
    """Whether ``text`` holds something rich renders rather than prints: markup, an escape or an emoji code."""
    return _NOT_AS_WRITTEN.search(text) is not None


def as_written(text: str) -> bool:
    """Whether rich prints ``text`` off a terminal exactly as it is: printable (no control character or tab to
    strip or expand), nothing it renders (``renders``), no trailing space to trim."""
    return text.isprintable() and not renders(text) and not text.endswith(" ")


def _no_color() -> bool | None:
    return bool(os.environ.get("NO_COLOR")) or None


class Plain:
    """A report destination that rich would treat as no terminal (``plain_destination``): ``line`` writes a line
    of plain text to it as rich would print it there; anything else is asked of the rich console ``make`` builds
    (on first need, once), so a renderer that wants rich gets exactly the console it would have had."""

    is_terminal = False

    def __init__(self, file: Callable[[], IO[str]], make: Callable[[], Console]) -> None:
        self._file = file
        self._make = make
        self._rich: Console | None = None

    def line(self, text: str) -> None:
        """``text`` (no markup, no tab, no trailing space: what rich prints unchanged) and a newline."""
        self._file().write(text + "\n")

    def __getattr__(self, name: str):
        if self._rich is None:
            self._rich = self._make()
        return getattr(self._rich, name)


def plain_destination(fh: IO[str]) -> bool:
    """Whether rich's ``Console.is_terminal`` is surely False for ``fh``, answered without importing rich: not a
    tty, and none of what rich lets override that (``TTY_COMPATIBLE``, ``FORCE_COLOR``, IDLE, Jupyter)."""
    if "TTY_COMPATIBLE" in os.environ or "FORCE_COLOR" in os.environ or hasattr(builtins, "get_ipython"):
        return False
    if getattr(sys.stdin, "__module__", "").startswith("idlelib"):
        return False
    isatty = getattr(fh, "isatty", None)
    try:
        return isatty is not None and not isatty()
    except ValueError:
        return False


def stdout() -> Console | Plain:
    """The report console: rich tables in a terminal; piped, plain rows (``report.print_table``), no wrapping."""
    if plain_destination(sys.stdout):
        return Plain(lambda: sys.stdout, _stdout)
    return _stdout()


def _stdout() -> Console:
    from rich.console import Console

    console = Console(
        no_color=_no_color(),
        highlight=False,
        width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else _PIPE_WIDTH,
    )
    if not console.is_terminal:
        console.soft_wrap = True
    return console


def stderr() -> Console:
    """Progress, and the summary line where rich must render it (``summary``)."""
    from rich.console import Console

    return Console(stderr=True, no_color=_no_color(), highlight=False)


def file(fh: IO[str]) -> Console | Plain:
    """The report console for ``-o FILE``: a file is not a terminal, so tables are plain rows."""
    if plain_destination(fh):
        return Plain(lambda: fh, lambda: _file(fh))
    return _file(fh)


def _file(fh: IO[str]) -> Console:
    from rich.console import Console

    return Console(file=fh, width=_PIPE_WIDTH, no_color=True, soft_wrap=True)


def summary(text: str, quiet: bool = False) -> None:
    """The one-line summary on stderr: one line whatever the width (no soft wrap in CI logs or ``2>file``).

    Off a terminal, text rich would print as it is goes straight to stderr: importing rich for one plain line
    was an eighth of a small audit's run (Nano, 24k tensors: 36 ms of 0.29 s, dev VM, 2026-12-06)."""
    if quiet:
        return
    if plain_destination(sys.stderr) and as_written(text):
        sys.stderr.write(text + "\n")
        return
    stderr().print(text, highlight=False, markup=False, soft_wrap=True)


def progress(quiet: bool) -> Callable[[int, int, str], None] | None:
    """Per-shard progress on stderr, only when stderr is a terminal and not ``--quiet``."""
    if quiet or not sys.stderr.isatty():
        return None
    console = stderr()

    def tick(i: int, n: int, name: str) -> None:
        console.print(f"[dim]reading header {i + 1}/{n}: {name}[/]", end="\r")

    return tick


def byte_progress(quiet: bool) -> AbstractContextManager[Callable[[str, int, int], None] | None]:
    """A byte progress bar on stderr (one bar per phase, e.g. prune's copy and verify), or None off a terminal."""
    if quiet or not sys.stderr.isatty():
        return nullcontext(None)
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TaskID,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    @contextmanager
    def bar() -> Iterator[Callable[[str, int, int], None]]:
        tasks: dict[str, TaskID] = {}
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=stderr(),
            transient=True,
        ) as p:

            def advance(phase: str, n: int, total: int) -> None:
                if phase not in tasks:
                    tasks[phase] = p.add_task(phase, total=total)
                p.advance(tasks[phase], n)

            yield advance

    return bar()
