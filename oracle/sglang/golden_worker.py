#!/usr/bin/env python3
"""Run sglang_manifest + sglang_replay over many checkpoints with ONE sglang import.

    <release venv>/bin/python golden_worker.py --raw-dir RAW [--platform sm100]
        [--moe-runner-backend auto] NAME=CKPT_DIR [NAME=CKPT_DIR ...]

Run it with the python of the sglang release under test (make_goldens.py does). For every
checkpoint it writes ``RAW/NAME/manifest.json`` and ``RAW/NAME/replay.json`` (exactly what
``sglang_manifest.py`` / ``sglang_replay.py`` write), or ``RAW/NAME/startup_error.json`` when
SGLang refuses to build the model for that checkpoint (the refusal is the golden datum then), and
``RAW/NAME/stderr.log``.

Why a worker: importing sglang costs ~15-20 s, a case ~5 s. The parent imports only what
``sglang_manifest.build`` imports before it states the platform (``preimport``), then forks one
child per checkpoint; each child runs the real build (``sglang_manifest.build``) and the real
replay (``sglang_replay.replay``) in-process and exits. A child starts from the same state as a
fresh ``sglang_manifest.py`` process at that point, so results equal the two-script pipeline's (the
0.5.23 / 0.5.11 conformance files are reproduced byte for byte: see make_goldens.py --check).
If the meta-device build fails, a second child builds on CPU (as sglang_manifest.py --device auto
does) and records ``meta_construction_error``.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import sglang_manifest as M  # noqa: E402


def _err(e: BaseException) -> dict:
    tb = traceback.extract_tb(e.__traceback__)
    where = tb[-1] if tb else None
    return {"error": f"{type(e).__name__}: {e}",
            "at": f"{where.filename}:{where.lineno}" if where else None,
            "traceback": traceback.format_exception(type(e), e, e.__traceback__)[-12:]}


def child(name: str, ckpt: str, out_dir: str, platform: str, backend: str, device: str,
          meta_error: str | None, timeout: int) -> None:
    """Runs in the forked child; never returns."""
    code = 0
    try:
        signal.alarm(timeout)
        os.makedirs(out_dir, exist_ok=True)
        log_f = open(os.path.join(out_dir, "stderr.log"), "a")
        os.dup2(log_f.fileno(), 2)
        os.dup2(log_f.fileno(), 1)

        def log(msg):
            print(f"[worker {name}] {msg}", file=sys.stderr, flush=True)

        stage = "manifest"
        try:
            man = M.build(ckpt, 1, backend, platform, device, log, draft=False)
            if meta_error:
                man["meta_construction_error"] = meta_error
            mpath = os.path.join(out_dir, "manifest.json")
            with open(mpath, "w") as f:
                json.dump(man, f, indent=1)
            stage = "replay"
            import sglang_replay as R

            out = R.replay(ckpt, man, manifest_path=mpath)
            with open(os.path.join(out_dir, "replay.json"), "w") as f:
                json.dump(out, f, indent=1)
            log(f"ok: {out['counts']}")
        except BaseException as e:  # noqa: BLE001 - the failure is the datum
            d = _err(e)
            d["stage"] = stage
            d["device"] = device
            d["progress"] = dict(M.PROGRESS)  # e.g. {"stage": "model_build", "quantization": ...}
            if meta_error:
                d["meta_construction_error"] = meta_error
            with open(os.path.join(out_dir, f"{stage}_error.json"), "w") as f:
                json.dump(d, f, indent=1)
            log(f"{stage} FAILED on {device}: {d['error']}")
            traceback.print_exc()
            code = 3 if stage == "manifest" else 4
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def run_case(name, ckpt, raw_dir, platform, backend, timeout) -> str:
    out_dir = os.path.join(raw_dir, name)
    os.makedirs(out_dir, exist_ok=True)
    for f in ("manifest.json", "replay.json", "manifest_error.json", "replay_error.json",
              "startup_error.json", "stderr.log"):
        if os.path.exists(os.path.join(out_dir, f)):
            os.unlink(os.path.join(out_dir, f))
    meta_error = None
    for device in ("meta", "cpu"):
        os.environ["MASTER_PORT"] = str(M.free_port())
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(name, ckpt, out_dir, platform, backend, device, meta_error, timeout)
        _, status = os.waitpid(pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        if rc == 0:
            return "ok"
        ep = os.path.join(out_dir, "manifest_error.json")
        if rc == 3 and device == "meta" and os.path.exists(ep):
            with open(ep) as f:
                meta_error = f"{json.load(f)['error']}"
            os.rename(ep, os.path.join(out_dir, "meta_error.json"))
            continue
        if rc == 3 and os.path.exists(ep):
            os.rename(ep, os.path.join(out_dir, "startup_error.json"))
            return "startup_error"
        if rc == 4:
            return "replay_error"
        with open(os.path.join(out_dir, "startup_error.json"), "w") as f:
            json.dump({"error": f"worker child died (exit {rc}; -14 = timeout {timeout}s)",
                       "stage": "manifest", "device": device}, f, indent=1)
        return f"died({rc})"
    return "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="+", help="NAME=CKPT_DIR")
    ap.add_argument("--raw-dir", required=True)
    ap.add_argument("--platform", default="sm100", choices=sorted(M.PLATFORMS))
    ap.add_argument("--moe-runner-backend", default="auto")
    ap.add_argument("--timeout", type=int, default=900)
    a = ap.parse_args(argv)
    import logging

    logging.getLogger().setLevel(logging.WARNING)  # as sglang_manifest.main does
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    M.preimport(a.platform)
    import sglang

    summary = {}
    for spec in a.cases:
        name, ckpt = spec.split("=", 1)
        st = run_case(name, os.path.abspath(ckpt), a.raw_dir, a.platform, a.moe_runner_backend,
                      a.timeout)
        summary[name] = st
        print(f"[worker sglang {sglang.__version__}] {name}: {st}", file=sys.stderr, flush=True)
    with open(os.path.join(a.raw_dir, "worker_summary.json"), "w") as f:
        json.dump({"sglang_version": sglang.__version__, "platform": a.platform,
                   "cases": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
