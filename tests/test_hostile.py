"""Every verb on every hostile or broken checkpoint of ``tests/corpus``: never crash, never lose data.

For each case and verb: no traceback and no "internal error"; a broken file is exit 2 with
one stderr line naming it; index/header disagreements in files that parse are findings
(exit 1); the checkpoint is left exactly as it was; nothing is written outside the
output the verb was given; and nothing outside the checkpoint is ever opened.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import make_corpus  # tests/corpus, on the path from conftest.py
import pytest
from click.testing import CliRunner

from nhcheck.cli import cli

CASES = make_corpus.CASES
#: What each verb is run as; ``{ckpt}``/``{work}`` are filled in. A verb the CLI lacks is skipped.
VERB_ARGS = {
    "audit-table": ["audit", "{ckpt}", "-q"],
    "audit-json": ["audit", "{ckpt}", "-q", "--format", "json", "-o", "{work}/report.json"],
    "audit-markdown": ["audit", "{ckpt}", "-q", "--format", "markdown"],
    "audit-values": ["audit", "{ckpt}", "-q", "--values", "--format", "json"],
    "manifest": ["manifest", "{ckpt}", "-q"],
    "prune-dry-run": ["prune", "{ckpt}", "--out", "{work}/out", "--dry-run", "-q"],
    "prune": ["prune", "{ckpt}", "--out", "{work}/out", "-q"],
    "load": ["load", "{ckpt}", "--device", "cpu", "-q"],
}
VERBS = [v for v, args in VERB_ARGS.items() if args[0] in cli.commands]
#: Files each verb may leave in its working directory (beyond ``out/`` for prune).
MAY_WRITE = {"audit-json": {"report.json"}}
#: Known bugs of other verbs, reported to their owners; strict, so a fix shows up as XPASS.
KNOWN: dict[tuple[str, str], str] = {}  # (case, verb) -> why it still fails: strict xfail until fixed


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Case name -> checkpoint dir, each built once (the verbs must not change them; tests check)."""
    root = tmp_path_factory.mktemp("corpus")
    base = root / "_base"
    make_corpus.write_base(base)
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = make_corpus.build_case(name, root / name, base)
        return built[name]

    return get


def snapshot(top: Path) -> dict[str, tuple]:
    """Every entry under ``top`` (links not followed): type, size, mtime, link target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            link = os.readlink(p) if os.path.islink(p) else None
            out[os.path.relpath(p, top)] = (st.st_mode, st.st_size if not os.path.isdir(p) else 0, st.st_mtime_ns, link)
    return out


def files_under(top: Path) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), top) for d, _, fs in os.walk(top) for f in fs}


@pytest.fixture
def opened(monkeypatch):
    """Real paths of every file the process opens by name while the verb runs."""
    paths: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def rec(file) -> None:
        if isinstance(file, (str, bytes, os.PathLike)):
            paths.append(os.path.realpath(os.fsdecode(file)))

    def open_(file, *a, **k):
        rec(file)
        return real_open(file, *a, **k)

    def os_open(path, *a, **k):
        rec(path)
        return real_os_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(os, "open", os_open)
    return paths


def run_verb(args: list[str]) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, args, catch_exceptions=False, env={"COLUMNS": "400", "NHCHECK_DEBUG": None})
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("verb", VERBS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_verb_on_case(case, verb, corpus, tmp_path, monkeypatch, opened, request):
    if (case.name, verb) in KNOWN:
        request.applymarker(pytest.mark.xfail(strict=True, reason=KNOWN[case.name, verb]))
    ckpt = corpus(case.name)
    case_dir = ckpt.parent
    before = snapshot(case_dir)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    args = [a.format(ckpt=ckpt, work=work) for a in VERB_ARGS[verb]]

    opened.clear()  # building the case copied the sentinel; only the verb's opens count
    code, out, err = run_verb(args)

    assert "Traceback" not in err and "internal error" not in err, err
    assert "\x1b" not in err and "\x1b" not in out, "raw control characters reached the terminal"
    # issue 16, item 14: manifest builds from config.json and the quant config alone, no shard needed
    configs_only = case.name == "no-shards" and verb == "manifest"
    if case.outcome == "error" and not configs_only:
        assert code == 2, (code, err)
        assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
        assert err.startswith("nhcheck: error: ")
        assert case.names in err and case.says in err, err
        assert out == ""
    elif verb.startswith("audit"):
        assert code == (1 if case.outcome == "findings" else 0), (code, err, out[-2000:])
    elif verb == "manifest":
        assert code == 0, err
    else:
        assert code in (0, 1), (code, err)

    # never lose data: the checkpoint is untouched, and nothing lands outside the verb's output
    assert snapshot(case_dir) == before
    written = files_under(work)
    if verb == "prune":
        stray = {f for f in written if not f.startswith("out" + os.sep)}
        assert not stray, stray
        if code == 2:
            finals = {os.path.basename(f) for f in written}
            assert not finals & {"config.json", make_corpus.INDEX, make_corpus.S1, make_corpus.S2}, finals
    else:
        assert written <= (MAY_WRITE.get(verb, set()) if code != 2 else set()), written

    # never open anything outside the checkpoint (the sentinel shard next to it, /etc/passwd)
    outside = os.path.realpath(case_dir / "outside")
    assert not [p for p in opened if p.startswith(outside + os.sep) or p.startswith("/etc/")], opened


def test_audit_finds_the_expected_codes(corpus, tmp_path):
    """Each findings case reports what it is about, in JSON, with the exact checkpoint names."""
    for case in CASES:
        if case.outcome == "error":
            continue
        code, out, err = run_verb(["audit", str(corpus(case.name)), "-q", "--format", "json"])
        codes = {f["code"] for f in json.loads(out)["findings"] if f["severity"] != "info"}
        assert set(case.codes) <= codes, (case.name, codes)
        if case.outcome == "clean":
            assert code == 0 and not codes, (case.name, codes)


HOSTILE_NAMES = {
    "control-chars-in-name": (
        "backbone.layers.0.mixer.in\x1b[31m_proj\n.weight\x07",
        "in\\x1b[31m_proj\\x0a.weight\\x07",
    ),
    "markup-in-name": ("backbone.layers.0.mixer.[bold]in_proj[/bold].weight", "[bold]in_proj[/bold]"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_NAMES))
def test_hostile_names_are_escaped_in_table_and_markdown_and_exact_in_json(case, corpus):
    ckpt = str(corpus(case))
    name, shown = HOSTILE_NAMES[case]
    _, out, _ = run_verb(["audit", ckpt, "-q", "--format", "json"])
    assert name in {t["name"] for t in json.loads(out)["tensors"]}
    for fmt in ("table", "markdown"):
        _, out, _ = run_verb(["audit", ckpt, "-q", "--format", fmt])
        assert shown in out, (fmt, out)
        assert "\x1b" not in out and "\x07" not in out


def test_unknown_quant_algo_is_reported_and_the_audit_goes_on(corpus):
    _, out, _ = run_verb(["audit", str(corpus("quant-unknown-algo")), "-q", "--format", "json", "--fail-on", "error"])
    rep = json.loads(out)
    assert rep["crash"]["tensor"] is None and "NVFP7" in rep["crash"]["error"]
    # the refusal is the crash, stated once: no second finding repeats it
    assert [f["code"] for f in rep["findings"] if "only supports" in f["message"]] == ["crash"]
    assert rep["summary"]["load"] > 0 and rep["summary"]["tensors"] == len(make_corpus.base_tensors()[2])


@pytest.mark.parametrize("case", ["header-nesting-bomb", "weight-map-dotdot", "control-chars-in-error"])
def test_real_process_prints_one_line_and_no_traceback(case, corpus):
    """The in-process runner above could hide what a real interpreter prints on the way out."""
    proc = subprocess.run(
        [sys.executable, "-m", "nhcheck", "audit", str(corpus(case))],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "NHCHECK_DEBUG"},
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("nhcheck: error: "), proc.stderr
    assert proc.stdout == ""


# ---------------------------------------------------------------------------
# The table written without rich (``report.console.Plain``) is the table rich writes, byte for byte (issue 17)

ROOT = Path(__file__).resolve().parent.parent


def _table_plain_and_rich(source: str, engine: str, show_loaded: bool) -> tuple[str, str]:
    """The audit table as ``-o FILE`` writes it now (a ``Plain``) and as rich wrote it there before."""
    from rich.console import Console

    from nhcheck import report
    from nhcheck.pipeline import audit_path
    from nhcheck.report import console

    rep = audit_path(source, engine)
    plain, rich = io.StringIO(), io.StringIO()
    destination = console.file(plain)
    assert isinstance(destination, console.Plain)
    report.render_table(rep, destination, show_loaded=show_loaded)
    report.render_table(rep, Console(file=rich, width=160, no_color=True, soft_wrap=True), show_loaded=show_loaded)
    return plain.getvalue(), rich.getvalue()


@pytest.mark.parametrize("show_loaded", [False, True])
@pytest.mark.parametrize("case", [c.name for c in CASES if c.outcome != "error"])
def test_plain_table_is_what_rich_writes(case, show_loaded, corpus):
    plain, rich = _table_plain_and_rich(str(corpus(case)), "sglang@0.5.23", show_loaded)
    assert plain == rich


@pytest.mark.parametrize("dirname", ["a:fire:b", "[bold]x[/bold]", "back\\slash\\", "trailing ", "plain"])
def test_plain_table_is_what_rich_writes_whatever_the_source_is_called(dirname, tmp_path):
    """The source path is printed in the headline, where rich renders markup and emoji codes: such a line goes
    through rich, every other one is written as it is."""
    import shutil

    src = tmp_path / dirname
    shutil.copytree(ROOT / "examples" / "omni-nvfp4-24137", src)
    for engine in ("sglang@0.5.11", "vllm@0.34.0"):
        plain, rich = _table_plain_and_rich(str(src), engine, False)
        assert plain == rich, engine


def test_piped_table_does_not_import_rich(tmp_path):
    """rich is a fifth of a small audit's time: a table written to a pipe or a file, and the summary line on a
    stderr that is no terminal, do without it."""
    code = (
        "import sys; from nhcheck.cli import cli\n"
        "try:\n    cli(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "assert 'rich' not in sys.modules, sorted(m for m in sys.modules if m.startswith('rich'))"
    )
    ex = str(ROOT / "examples" / "nano3-nvfp4")
    for args in (
        ["audit", ex, "-q"],
        ["audit", ex, "-q", "-o", str(tmp_path / "t.txt")],
        ["audit", ex],  # the summary line on stderr too
        ["audit", ex, "--format", "json"],
    ):
        env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "text",
    [
        "Scanned 24,147 tensors in 4 shards (0.19 s): verdict clean; 0 orphans, 0 raise, 0 params unfilled, 0 partial.",
        "Wrote 3 shards to /tmp/a:fire:b (1.2 GB, 0.50 s).",
        "Wrote to /tmp/[bold]x[/bold].",
        "back\\slash",
        "tab\there",
        "bell\x07 and return\r",
        "trailing ",
        "é ü 中文 plain",
        "",
    ],
)
def test_summary_is_what_rich_writes(text, monkeypatch):
    """The summary line on a stderr that is no terminal: written as it is where rich would print it so, through
    rich otherwise; either way the bytes rich writes."""
    from nhcheck.report import console

    for var in ("FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(var, raising=False)
    plain, rich = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", plain)
    console.summary(text)
    console.summary(text, quiet=True)
    monkeypatch.setattr(sys, "stderr", rich)
    console.stderr().print(text, highlight=False, markup=False, soft_wrap=True)
    assert plain.getvalue() == rich.getvalue()
