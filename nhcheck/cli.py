"""The ``nhcheck`` command: a thin click layer that wires the pipeline modules together.

Policy lives here and only here: report on stdout (or ``-o``), progress and the summary
line on stderr, exit 0 clean / 1 findings at or above the gate / 2 could not run.
"""

from __future__ import annotations

import gc
import os
import sys
import time

import click

from nhcheck import __version__, engines
from nhcheck.engines.sglang import MOE_BACKENDS
from nhcheck.errors import NhcheckError
from nhcheck.report import format as formats

FORMATS = tuple(formats.FORMATS)
GATES = ("error", "warning", "info", "none")


def _report_options(f):
    """``-f/--format`` and ``-o/--output`` (checked before any work), shared by every verb that writes a report."""
    f = click.option(
        "-o",
        "--output",
        type=click.Path(dir_okay=False),
        default=None,
        callback=_check_output,
        help="Write the report here instead of stdout.",
    )(f)
    return click.option("-f", "--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)(f)


def _check_output(ctx, param, value):
    """``-o FILE`` is checked before any work: a bad path is a usage error (exit 2), not a failure at the end."""
    if value is None:
        return None
    from nhcheck.errors import UsageError

    path = os.path.abspath(value)
    parent = os.path.dirname(path)
    if os.path.isdir(path):
        raise UsageError(f"-o {value}: is a directory; give a file name")
    if not os.path.isdir(parent):
        raise UsageError(f"-o {value}: directory {parent} does not exist")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UsageError(f"-o {value}: file is not writable")
    if not os.path.exists(path) and not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"-o {value}: directory {parent} is not writable")
    return value


def _parse_engine(ctx, param, value):
    """The engine is parsed once, here: everything below the CLI receives an ``EngineId``.

    With ``--live`` / ``--cross-check`` (eager options, parsed first) it is the installed release.
    """
    if ctx.params.get("live") or ctx.params.get("cross_check"):
        from nhcheck import live

        return live.installed_engine(value)
    return engines.parse(value)


def _complete_engine(ctx, param, incomplete: str) -> list[str]:
    """``--engine`` completes to each engine's bare name and every release nhcheck answers for."""
    specs = sorted({e.name for e in engines.known()}) + [str(e) for e in engines.known()]
    return [s for s in specs if s.startswith(incomplete)]


def _complete_device(ctx, param, incomplete: str) -> list[str]:
    """``--device`` completes without importing torch: cpu, cuda and the first eight cuda:N."""
    return [d for d in ("cpu", "cuda", *(f"cuda:{i}" for i in range(8))) if d.startswith(incomplete)]


class _SourceType(click.ParamType):
    """SOURCE: a directory, a ``.safetensors`` file or a Hub repo id, passed on unchanged (the source
    modules check it and say what is wrong in one line). The shell completes it as a path, as it would
    without nhcheck's completion script; a repo id is typed."""

    name = "source"

    def convert(self, value, param, ctx):
        return value

    def shell_complete(self, ctx, param, incomplete):
        from click.shell_completion import CompletionItem

        return [CompletionItem(incomplete, type="file")]


_SOURCE = _SourceType()


class _EngineOption(click.Option):
    """``--engine``, whose help lists every release nhcheck answers for: written when help is shown, not at each
    start (it imports every engine's release table)."""

    @property
    def help(self) -> str:
        return (
            "Engine release to replay: "
            + ", ".join(engines.spans(list(engines.known())))
            + " (sglang@0.5.11 is the last before PR #24434); bare sglang: the installed release, else the newest."
        )

    @help.setter
    def help(self, _value: str | None) -> None:
        """``click.Option.__init__`` sets the help it was given: there is none, the property writes it."""


def _engine_option(f):
    return click.option(
        "--engine",
        cls=_EngineOption,
        default="sglang",
        show_default=True,
        callback=_parse_engine,
        shell_complete=_complete_engine,
    )(f)


def _auto_is_default(ctx, param, value):
    """``--moe-backend auto`` is SGLang's own default: let the manifest builder pick as SGLang does."""
    return None if value == "auto" else value


def _source_options(f):
    f = click.option("--revision", default=None, help="Hub branch, tag or commit (repo ids only).")(f)
    f = click.option(
        "--moe-backend",
        default=None,
        type=click.Choice(MOE_BACKENDS),
        callback=_auto_is_default,
        help="MoE runner backend (decides the NVFP4 swizzled block-scale parameters); default (auto): "
        "as SGLang picks on Blackwell at TP 1.",
    )(f)
    f = click.option(
        "--mtp",
        is_flag=True,
        help="Replay the MTP draft model (SGLang's NemotronHForCausalLMMTP, vLLM's NemotronHMTP) instead of the main "
        "model.",
    )(f)
    f = click.option(
        "--pp",
        "pp",
        default=None,
        metavar="RANK/SIZE",
        callback=_parse_pp,
        help="One pipeline-parallel rank, e.g. 0/4: its layers as SGLang's get_pp_indices splits them, the "
        "embedding on the first rank, norm and lm_head on the last.",
    )(f)
    return _engine_option(f)


def _parse_pp(ctx, param, value):
    if value is None:
        return None
    try:
        rank, size = (int(x) for x in value.split("/"))
    except ValueError:
        raise click.BadParameter("expected RANK/SIZE, e.g. 0/4") from None
    if size < 1 or not 0 <= rank < size:
        raise click.BadParameter(f"rank must be in 0..SIZE-1, got {value}")
    return rank, size


class _Group(click.Group):
    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Turn every anticipated failure into one line on stderr and exit 2, never a traceback."""
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(2)
        except click.exceptions.Abort:
            click.echo("nhcheck: aborted", err=True)
            sys.exit(130)
        except NhcheckError as exc:
            click.echo(f"nhcheck: error: {_oneline(exc)}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("nhcheck: interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:
            sys.exit(1)
        except Exception as exc:  # a bug in nhcheck, still one line unless asked
            if os.environ.get("NHCHECK_DEBUG"):
                raise
            click.echo(
                f"nhcheck: internal error: {type(exc).__name__}: {_oneline(exc)} (set NHCHECK_DEBUG=1 for a traceback)",
                err=True,
            )
            sys.exit(2)

    def format_commands(self, ctx, formatter):
        """Each command's first sentence in full (click's default cuts it at about 45 characters)."""
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit=1000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _oneline(exc: BaseException) -> str:
    from nhcheck.report import safe

    return safe(str(exc).replace("\n", " "))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="nhcheck")
def cli() -> None:
    """Check a Nemotron-H checkpoint against the inference engine's loader before you start a server.

    \b
    Shell completion (bash): eval "$(_NHCHECK_COMPLETE=bash_source nhcheck)"
    (zsh: zsh_source, fish: fish_source).
    """


@cli.command()
@click.argument("source", type=_SOURCE)
@_source_options
@_report_options
@click.option(
    "--manifest",
    "manifest_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Use this runtime manifest (nhcheck JSON, or a live engine's named_parameters() dump).",
)
@click.option(
    "--ignore", multiple=True, metavar="PATTERN", help="Glob of tensor/parameter names to ignore (repeatable)."
)
@click.option(
    "--fail-on",
    type=click.Choice(GATES),
    default="warning",
    show_default=True,
    help="Lowest finding severity that makes the exit code 1. info fails on notes too, some of which hold for "
    "most checkpoints on purpose (kv-scales-absent: an FP8 KV cache without k/v scales runs on the engine's "
    "default scales; moe-backend-assumed): use info to review, warning to gate.",
)
@click.option("--show-loaded", is_flag=True, help="List the tensors that load too, not only the problems.")
@click.option(
    "--values",
    is_flag=True,
    help="Also read the scale tensors (only those) and flag zero, negative or non-finite scales.",
)
@click.option(
    "--tp",
    "tp_sizes",
    default=None,
    metavar="SIZES",
    help="Also check the engine's tensor-parallel sharding at these TP sizes (e.g. 2,4,8): tp-indivisible findings.",
)
@click.option(
    "--ep",
    is_flag=True,
    help="With --tp and --engine vllm: vLLM's --enable-expert-parallel (each expert whole on one rank).",
)
@click.option(
    "--live",
    is_flag=True,
    is_eager=True,
    help="Answer with the installed engine's own code (its start-up and load_weights on meta-device recorder "
    "parameters) instead of nhcheck's release table: SGLang, or vLLM with --engine vllm; needs that engine and "
    "torch in this environment.",
)
@click.option(
    "--cross-check",
    is_flag=True,
    is_eager=True,
    help="Run the table replay and the live replay (as --live) and report every disagreement as an error.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress or summary on stderr.")
def audit(
    source,
    engine,
    revision,
    moe_backend,
    mtp,
    pp,
    fmt,
    output,
    manifest_file,
    ignore,
    fail_on,
    show_loaded,
    values,
    tp_sizes,
    ep,
    live,
    cross_check,
    quiet,
):
    """Replay the engine's loader over SOURCE's shard headers and report both directions.

    SOURCE is a checkpoint directory, a .safetensors file or a Hub repo id. No tensor
    data is read, except the scale tensors with --values.

    \b
    Examples:
      nhcheck audit examples/omni-nvfp4-24137 --engine sglang@0.5.11
      nhcheck audit ./ckpt --format json -o audit.json
      nhcheck audit ./ckpt --values
      nhcheck audit ./ckpt --tp 2,4,8
      nhcheck audit ./ckpt --engine vllm --tp 4 --ep
      nhcheck audit nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-NVFP4 --format markdown
      nhcheck audit ./ckpt --live          # the installed sglang's own load_weights
      nhcheck audit ./ckpt --cross-check   # table and live replay must agree
      nhcheck audit ./ckpt --engine vllm --live   # the installed vllm's own load_weights
    """
    from nhcheck import pipeline, report
    from nhcheck.audit import AuditOptions
    from nhcheck.report import console
    from nhcheck.sources import open_source

    sizes: tuple[int, ...] = ()
    if tp_sizes is not None:  # imported only when asked: every module costs start-up time on each run
        from nhcheck.tp import parse_tp_sizes

        sizes = parse_tp_sizes(tp_sizes)
    _ep_needs_tp(ep, bool(sizes))
    t0 = time.perf_counter()
    ckpt = open_source(source, revision, console.progress(quiet))
    if live or cross_check:
        from nhcheck import live as live_replay
        from nhcheck.errors import UsageError

        if manifest_file or pp or sizes or mtp:
            raise UsageError("--live and --cross-check replay the main model at TP 1: no --manifest, --pp, --tp, --mtp")
        rep = live_replay.audit(ckpt, engine, moe_backend=moe_backend, ignore=tuple(ignore), cross_check=cross_check)
    else:
        inputs = pipeline.prepare(ckpt, engine, manifest_file=manifest_file, moe_backend=moe_backend, mtp=mtp, pp=pp)
        rep = pipeline.audit(inputs, AuditOptions(ignore=tuple(ignore)))
    if values:
        from nhcheck import values as scale_values

        rep = scale_values.with_values(rep, scale_values.scan(rep))
    if sizes:
        from nhcheck import tp as tensor_parallel

        rep = tensor_parallel.with_findings(rep, sizes, ep)
    formats.get(fmt, output).write(report.audit_renderer(show_loaded=show_loaded), rep)
    if not quiet:
        console.summary(report.summary_line(rep, time.perf_counter() - t0))
    sys.exit(rep.exit_code(fail_on))


@cli.command()
@click.argument("source", type=_SOURCE)
@click.option("--revision", default=None, help="Hub branch, tag or commit (repo ids only).")
@click.option(
    "--moe-backend",
    default=None,
    type=click.Choice(MOE_BACKENDS),
    callback=_auto_is_default,
    help="MoE runner backend; default (auto): as each release picks on Blackwell at TP 1.",
)
@click.option("--mtp", is_flag=True, help="The MTP draft model instead of the main model.")
@_report_options
def matrix(source, revision, moe_backend, mtp, fmt, output):
    """Audit SOURCE against every release nhcheck answers for, headers read once: one row per range.

    Exit 0 when some release of every engine loads it clean, 1 otherwise.

    \b
    Examples:
      nhcheck matrix examples/omni-nvfp4-24137
      nhcheck matrix ./ckpt --format markdown -o compat.md
    """
    from nhcheck import matrix as compat
    from nhcheck import report
    from nhcheck.sources import open_source

    m = compat.build(open_source(source, revision, None), moe_backend=moe_backend, mtp=mtp)
    formats.get(fmt, output).write(report.MATRIX, m)
    sys.exit(m.exit_code())


@cli.command()
@click.argument("source", type=_SOURCE)
@_source_options
@click.option("-f", "--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    callback=_check_output,
    help="Write the manifest here instead of stdout.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
def manifest(source, engine, revision, moe_backend, mtp, pp, fmt, output, quiet):
    """Print the runtime parameters the engine builds for SOURCE's config and quant config.

    SOURCE may be a directory holding only config.json (and hf_quant_config.json): no
    shard is needed.

    \b
    Examples:
      nhcheck manifest examples/nano3-nvfp4
      nhcheck manifest examples/omni-nvfp4-24137 --engine sglang@0.5.11 --format json -o m.json
    """
    from nhcheck import pipeline, report
    from nhcheck.audit import check_mtp_draft
    from nhcheck.checkpoint import open_local
    from nhcheck.report import console
    from nhcheck.sources import open_source

    if os.path.isdir(source) and not revision:
        ckpt = open_local(source, console.progress(quiet), configs_only_ok=True)
    else:
        ckpt = open_source(source, revision, console.progress(quiet))
    inputs = pipeline.prepare(ckpt, engine, moe_backend=moe_backend, mtp=mtp, pp=pp)
    if mtp:
        check_mtp_draft(ckpt, inputs.config)
    formats.get(fmt, output).write(report.MANIFEST, inputs.manifest)


@cli.command()
@click.argument("source", type=_SOURCE)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory for the fixed checkpoint; never the input, inside it, or containing it.",
)
@_engine_option
@click.option("--dry-run", is_flag=True, help="Print the plan (groups, counts, bytes saved per shard); write nothing.")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Write into a non-empty --out, replacing what an earlier prune wrote there (refuses other shards).",
)
@click.option("--link", is_flag=True, help="Hard-link shards with nothing to drop instead of copying them.")
@click.option(
    "--copy-anyway", is_flag=True, help="With nothing to drop, still write a verified copy (default: write nothing)."
)
@click.option(
    "--no-verify", is_flag=True, help="Skip the read-back of the written bytes and the re-audit of the output."
)
@click.option(
    "--revision", default=None, help="Hub branch, tag or commit (repo ids only; downloaded to the cache first)."
)
@click.option("-q", "--quiet", is_flag=True, help="No progress or summary on stderr.")
def prune(source, out_dir, engine, dry_run, overwrite, link, copy_anyway, no_verify, revision, quiet):
    """Write a copy of SOURCE without the tensors the engine would not load anyway, and say why each is safe.

    Drops only what cannot change the loaded model (scales of modules the engine builds
    unquantized, tensors of modules it does not have); never load-bearing scales. Refuses
    (exit 1) on a quantization mismatch, naming the engine version that loads SOURCE as is.
    With nothing to drop it writes nothing (exit 0) unless --copy-anyway or --link.
    Kept tensors are copied byte for byte, read back from disk and compared; the output is
    re-audited (exit 1 if not clean).

    \b
    Examples:
      nhcheck prune examples/nano3-24434-leftover-expert-scales --out fixed/ --engine sglang@0.5.11
      nhcheck prune ./ckpt --out ./ckpt-pruned --dry-run
      nhcheck prune nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-NVFP4 --out ./nano-pruned --dry-run
    """
    from nhcheck import pipeline, report
    from nhcheck import prune as pruning
    from nhcheck.checkpoint import open_local
    from nhcheck.errors import UsageError
    from nhcheck.report import console
    from nhcheck.sources import open_for_data

    source = open_for_data(source, revision, progress=not quiet and sys.stderr.isatty())
    if not os.path.isdir(source):
        raise UsageError(f"{source}: prune needs a checkpoint directory, not a single file")
    t0 = time.perf_counter()
    pruning.check_output(source, out_dir, overwrite)
    plan = pruning.plan_checkpoint(pipeline.prepare(open_local(source, console.progress(quiet)), engine))
    report.render_prune_plan(plan, console.stdout())
    sys.stdout.flush()
    if plan.refusal is not None:
        click.echo("nhcheck: prune refused: " + plan.refusal.text, err=True)
        sys.exit(1)
    if dry_run:
        console.summary("dry run: nothing written", quiet)
        sys.exit(0)
    if plan.nothing_to_drop and not (copy_anyway or link):
        console.summary(report.prune_nothing_written(plan), quiet)
        sys.exit(0)
    with console.byte_progress(quiet) as progress:
        result = pruning.execute(plan, out_dir, overwrite=overwrite, link=link, verify=not no_verify, progress=progress)
    console.summary(report.prune_summary(plan, result, time.perf_counter() - t0), quiet)
    v = result.verification
    if v is not None and not v.ok:
        for problem in v.problems:
            click.echo(f"nhcheck: verification failed: {problem}", err=True)
        sys.exit(1)


@cli.command()
@click.argument("source", type=_SOURCE)
@_source_options
@click.option(
    "--device", default="cuda", show_default=True, shell_complete=_complete_device, help="cuda, cuda:N or cpu."
)
@click.option(
    "--manifest",
    "manifest_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Use this runtime manifest (nhcheck JSON, or a {name: {shape, dtype}} dump of a live engine).",
)
@click.option(
    "--dtype",
    type=click.Choice(("auto", "bfloat16", "float16", "float32")),
    default="auto",
    show_default=True,
    help="Model dtype, as the engine's --dtype (quantized storage and fp32 scales keep theirs).",
)
@click.option(
    "--reader",
    type=click.Choice(("fast", "safetensors")),
    default="fast",
    show_default=True,
    help="fast: parallel byte-range reads into pinned buffers; safetensors: safe_open, tensor by tensor (reference).",
)
@click.option(
    "--threads",
    type=click.IntRange(0, 256),
    default=0,
    help="Reader threads (0: min(16, the cores this process may use); with --tp, each rank's: min(8, its share "
    "of those cores among the host's ranks)).",
)
@click.option(
    "--pinned-mb",
    type=click.IntRange(16, 65536),
    default=None,
    help="Host ring the fast reader reads into (pinned on CUDA); default 1024: a slot per reader thread.",
)
@click.option(
    "--staging-mb",
    type=click.IntRange(16, 1 << 20),
    default=None,
    help="Device memory for bytes read but not yet placed: the load needs the parameters plus this; default 1024.",
)
@_report_options
@click.option(
    "--tp",
    "tp_size",
    type=click.IntRange(1, 1024),
    default=None,
    metavar="N",
    help="Tensor parallel: N ranks (torch.distributed, NCCL on cuda, gloo on cpu; started for you unless "
    "already under torchrun), each loading only its partition through safetensors slices.",
)
@click.option(
    "--ep",
    is_flag=True,
    help="With --tp and --engine vllm: vLLM's --enable-expert-parallel (each rank allocates and reads only the "
    "experts it owns, whole).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress or summary on stderr.")
def load(
    source,
    engine,
    revision,
    moe_backend,
    mtp,
    pp,
    device,
    manifest_file,
    dtype,
    reader,
    threads,
    pinned_mb,
    staging_mb,
    fmt,
    output,
    tp_size,
    ep,
    quiet,
):
    """Load SOURCE into the engine's runtime parameters on a real device and check every element.

    Allocates every parameter the engine builds (fused qkv_proj, fused experts, scale slots),
    poisons it, streams the shards and applies the engine's loader decisions; stops where the
    engine version raises. Reports coverage, double writes, poison left, a read-back sample
    of every write against the file, and speed. Exit 0 only when every reachable parameter
    is fully written and nothing raised. Hub repo ids are downloaded to the local cache first.

    \b
    Examples:
      nhcheck load examples/nano3-24434-leftover-expert-scales --engine sglang@0.5.11 --device cuda
      nhcheck load ./ckpt --device cpu --format json -o load.json
      nhcheck load ./ckpt --engine vllm --device cpu --tp 2 --ep
    """
    _require_load_extra()
    from nhcheck import load as loading
    from nhcheck import report
    from nhcheck.report import console

    t0 = time.perf_counter()
    _ep_needs_tp(ep, tp_size is not None)
    if tp_size is None:  # the ranks of --tp are processes of their own
        loading.start_device(device)
    else:
        from nhcheck.load import tp as load_tp
        from nhcheck.sources import open_source

        ckpt = open_source(source, revision, console.progress(quiet), data=True)
        _render_load(
            report.TP_LOAD,
            load_tp.run(
                load_tp.Job(
                    ckpt.root, source, tp_size, device, engine, dtype, moe_backend, mtp, pp, manifest_file, threads, ep
                )
            ),
            fmt,
            output,
            quiet,
        )
    sizes = {"pinned_bytes": pinned_mb, "staging_bytes": staging_mb}  # unset: LoadOptions' defaults
    opts = loading.LoadOptions(
        device=device,
        dtype=dtype,
        reader=reader,
        threads=threads,
        **{k: mb << 20 for k, mb in sizes.items() if mb is not None},
    )
    rep = loading.load_source(
        source,
        revision,
        engine,
        opts,
        progress=console.progress(quiet),
        t0=t0,
        manifest_file=manifest_file,
        moe_backend=moe_backend,
        mtp=mtp,
        pp=pp,
    ).report
    _render_load(report.LOAD, rep, fmt, output, quiet)


def _ep_needs_tp(ep: bool, tp: bool) -> None:
    if ep and not tp:
        from nhcheck.errors import UsageError

        raise UsageError("--ep shards the experts over the TP ranks: give --tp too")


def _require_load_extra() -> None:
    """``load`` is the one verb that needs torch; the base install (audit, manifest, prune) does not ship it."""
    import importlib.util

    missing = [m for m in ("torch", "safetensors") if importlib.util.find_spec(m) is None]
    if missing:
        raise NhcheckError(
            f"load needs {', '.join(missing)}, which the base install leaves out: pip install 'nhcheck[load]'"
        )


def _render_load(renderer, rep, fmt: str, output: str | None, quiet: bool) -> None:
    """Report a load (``renderer``: ``report.LOAD``, or ``report.TP_LOAD`` whose non-zero torchrun ranks
    pass None) and exit."""
    if rep is None:
        sys.exit(0)
    from nhcheck.report import console

    formats.get(fmt, output).write(renderer, rep)
    if not quiet and renderer.summary is not None:
        console.summary(renderer.summary(rep))
    sys.exit(rep.exit_code())


def main() -> None:
    """Console-script entry point.

    An audit of a 165k-tensor checkpoint builds about a million small acyclic objects;
    the cyclic GC's repeated passes over them cost a third of the run, and freeing them
    at exit another tenth. The process is short-lived, so the collector is off and,
    once output is flushed, the interpreter exits without the teardown (except after
    torch was loaded, whose CUDA state deserves an orderly shutdown).
    """
    gc.disable()
    code: str | int | None = 0
    try:
        cli()
    except SystemExit as exc:
        code = exc.code
    if "torch" in sys.modules:
        sys.exit(code)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):
        pass
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


if __name__ == "__main__":
    main()
