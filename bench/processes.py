"""Whole processes for the benches: timed, and failing loudly.

A bench times ``python -m nhcheck ...`` as a user runs it, so it must never time a process that died: exit 1 is an
audit with findings and also Python's exit for an uncaught exception, so a traceback on stderr fails the bench (the
GPU machine once had every audit die on import, timed as a fast audit). A tree's nhcheck runs compiled, as an
installed one is, first on the caller's ``PYTHONPATH`` rather than instead of it (where msgspec may be).
"""

from __future__ import annotations

import compileall
import os
import subprocess
import time


def timed(cmd: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system) of one whole process that exits 0 or 1 without a traceback.

    Run from ``cwd`` outside any source tree where ``env`` names one: ``-m`` and ``-c`` put the working directory
    first on ``sys.path``, which would shadow ``PYTHONPATH``. CPU time is what a shared machine disturbs least:
    wall time also counts the moments another process held the core.
    """
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=cwd)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    dt = time.perf_counter() - t
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1) or b"Traceback (most recent call last)" in err:
        raise SystemExit(f"{cmd} failed ({code}): {err.decode()[-500:]}")
    return dt, usage.ru_utime + usage.ru_stime


def tree_env(tree: str) -> dict[str, str]:
    """The environment that runs ``-m nhcheck`` from ``tree``, whatever copy is installed, its bytecode compiled.

    An installed nhcheck has its ``.pyc`` files (pip compiles them); ``PYTHONDONTWRITEBYTECODE`` in the caller's
    environment would make every timed run compile every module again, a cost no user pays.
    """
    compileall.compile_dir(os.path.join(tree, "nhcheck"), quiet=1)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, (tree, env.get("PYTHONPATH"))))}
