#!/usr/bin/env python3
"""Long fuzz runs of the shard header parser (CI runs the same properties briefly in tests/test_fuzz.py).

Property: whatever the bytes, ``parse_header_bytes`` / ``read_header`` return a header or
raise ``CheckpointError``; and a header nhcheck accepts is one the safetensors library
(the engine's parser) accepts too.

    python fuzz/fuzz_header.py hypothesis [--examples N]    # the tests/test_fuzz.py properties, N each, random seed
    python fuzz/fuzz_header.py atheris [--runs N] [-- LIBFUZZER_ARGS...]   # coverage-guided (pip install atheris)

Both print how many inputs ran.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_hypothesis(examples: int) -> int:
    """tests/test_fuzz.py with ``examples`` per property and a fresh random seed; sums the counts."""
    env = dict(os.environ, NHCHECK_FUZZ_EXAMPLES=str(examples), NHCHECK_FUZZ_RANDOM="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:warnings",
            str(REPO / "tests" / "test_fuzz.py"),
            "--hypothesis-show-statistics",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    passing = sum(int(n) for n in re.findall(r"- (\d+) passing examples", proc.stdout))
    failing = sum(int(n) for n in re.findall(r", (\d+) failing examples", proc.stdout))
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout[-6000:])
    print(
        f"hypothesis: {passing:,} generated inputs passed, {failing:,} failed "
        f"({examples:,} per property); pytest exit {proc.returncode}"
    )
    return proc.returncode


def write_seeds() -> str:
    """A temporary libFuzzer corpus of valid headers (JSON alone, and whole files) to mutate from."""
    import tempfile

    from nhcheck.safetensors_header import serialize_header

    out = tempfile.mkdtemp(prefix="nhcheck-fuzz-")
    layouts = [
        [("a.weight", "BF16", (2, 2), 0, 8)],
        [
            ("m.weight", "U8", (4, 2), 0, 8),
            ("m.weight_scale", "F8_E4M3", (4, 1), 8, 12),
            ("m.weight_scale_2", "F32", (), 12, 16),
            ("m.input_scale", "F32", (), 16, 20),
        ],
        [("x", "F4", (4,), 0, 2), ("y", "I64", (0,), 2, 2), ("z", "BOOL", (2,), 2, 4)],
    ]
    for i, tensors in enumerate(layouts):
        blob = serialize_header(tensors, {"format": "pt"}, i % 2 == 0)
        Path(out, f"header-{i}").write_bytes(blob[8:])
        Path(out, f"file-{i}").write_bytes(blob + bytes(tensors[-1][4]))
    return out


def run_atheris(runs: int, libfuzzer_args: list[str]) -> int:
    try:
        import atheris
    except ImportError:
        print("atheris is not installed (pip install atheris); nothing run", file=sys.stderr)
        return 2
    with atheris.instrument_imports():
        from nhcheck.errors import CheckpointError
        from nhcheck.safetensors_header import ShardHeader, parse_header_bytes, read_header
    try:
        from safetensors import deserialize
    except ImportError:  # pragma: no cover - a dependency of nhcheck
        deserialize = None

    count = [0]

    def one_input(data: bytes) -> None:
        count[0] += 1
        if count[0] % 100_000 == 0:
            print(f"atheris: {count[0]:,} inputs", file=sys.stderr)
        # the bytes as a whole file, and as header JSON in front of a small data section
        try:
            read_header(io.BytesIO(data), "/f", "f", len(data))
        except CheckpointError:
            pass
        for data_len in (0, 4, 16):
            try:
                h: ShardHeader | None = parse_header_bytes(data, "/f", "f", 8 + len(data) + data_len)
                refusal = ""
            except CheckpointError as exc:
                h, refusal = None, exc.problem
            if deserialize is None:
                continue
            try:
                deserialize(struct.pack("<Q", len(data)) + data + b"\0" * data_len)
                engine_ok = True
            except Exception:  # noqa: BLE001 - any refusal by the engine's parser
                engine_ok = False
            # accepted by nhcheck => opened by the engine; refused only where the engine is lax on purpose
            assert engine_ok or h is None, f"nhcheck accepts what safetensors refuses: {data!r}"
            assert not engine_ok or h is not None or "duplicate key" in refusal, f"{refusal}: {data!r}"

    seeds = write_seeds()
    # crash reproducers go next to the seeds, not into the current directory
    argv = [sys.argv[0], f"-runs={runs}", f"-artifact_prefix={seeds}/", *libfuzzer_args, seeds]
    print(f"atheris: corpus and crash reproducers in {seeds}", file=sys.stderr)
    atheris.Setup(argv, one_input)
    atheris.Fuzz()  # libFuzzer prints "Done N runs" and exits the process
    return 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="engine", required=True)
    h = sub.add_parser("hypothesis")
    h.add_argument("--examples", type=int, default=20_000)
    a = sub.add_parser("atheris")
    a.add_argument("--runs", type=int, default=1_000_000)
    a.add_argument("libfuzzer_args", nargs="*")
    args = ap.parse_args(argv)
    if args.engine == "hypothesis":
        return run_hypothesis(args.examples)
    return run_atheris(args.runs, args.libfuzzer_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
