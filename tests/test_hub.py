"""Hub repo ids against a real HTTP server on 127.0.0.1 (tests/fakehub.py), through the real CLI.

Each run is a subprocess with ``HF_ENDPOINT`` pointed at the fake Hub and a fresh ``HF_HUB_CACHE``,
because huggingface_hub reads both at import time: this is the path users take. Results over
HTTP must equal the local-directory audit exactly (apart from source, revision and bytes
transferred), and the fake Hub's byte counts prove that only headers were read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from fakehub import FakeHub

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "tests" / "conformance"
NANO = CONF / "nano3_nvfp4" / "checkpoint"
NANO_EXCLUDED = CONF / "nano3_nvfp4_experts_excluded" / "checkpoint"
OMNI = CONF / "omni_nvfp4_mixed" / "checkpoint"
H8B = CONF / "h8b_dense" / "checkpoint"
LEFTOVER = ROOT / "examples" / "nano3-24434-leftover-expert-scales"
FULL_REPO = "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-NVFP4"


@pytest.fixture(scope="module")
def full_nano(tmp_path_factory) -> Path:
    """The full-size Nano-3 NVFP4 layout (real header, 19 GB of sparse data) from examples/generate.py."""
    out = tmp_path_factory.mktemp("full") / "nano3-nvfp4"
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "generate.py"), "full", "nano3-nvfp4", str(out)],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="module")
def hub(tmp_path_factory, full_nano):
    bin_only = tmp_path_factory.mktemp("bin-only")
    shutil.copy(NANO / "config.json", bin_only / "config.json")
    (bin_only / "pytorch_model.bin").write_bytes(b"\0" * 4096)
    with FakeHub() as h:
        h.shas = {
            "nvidia/nano3-nvfp4": h.add_repo(
                "nvidia/nano3-nvfp4", {"main": str(NANO), "excluded": str(NANO_EXCLUDED), "leftover": str(LEFTOVER)}
            ),
            "nvidia/omni-nvfp4": h.add_repo("nvidia/omni-nvfp4", {"main": str(OMNI)}),
            "nvidia/gated-h8b": h.add_repo("nvidia/gated-h8b", {"main": str(H8B)}, gated=True),
            "nvidia/bin-only": h.add_repo("nvidia/bin-only", {"main": str(bin_only)}),
            FULL_REPO: h.add_repo(FULL_REPO, {"main": str(full_nano)}),
        }
        yield h


@pytest.fixture
def env(hub, tmp_path):
    """A clean huggingface_hub environment: the fake Hub, an empty cache, no token, no user config."""
    hub.reset()
    e = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    e.update(
        HF_ENDPOINT=hub.url,
        HF_HUB_CACHE=str(tmp_path / "cache"),
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        NO_COLOR="1",
        COLUMNS="200",
    )
    return e


def nhcheck(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nhcheck", *args], env=env, capture_output=True, text=True, cwd=ROOT, timeout=120
    )


_LOCAL: dict[tuple, tuple[int, dict]] = {}


def local_audit(path: Path, *args: str) -> tuple[int, dict]:
    """The reference: the same audit of the directory (memoised: several tests compare against it)."""
    key = (str(path), args)
    if key not in _LOCAL:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        p = nhcheck(env, "audit", str(path), "--format", "json", "-q", *args)
        _LOCAL[key] = (p.returncode, json.loads(p.stdout))
    return _LOCAL[key]


def comparable(doc: dict) -> dict:
    """An audit JSON without the fields that name where the checkpoint came from."""
    doc = json.loads(json.dumps(doc))
    for k in ("source", "revision"):
        doc.pop(k)
    doc["summary"].pop("bytes_transferred")
    return doc


def hub_audit(env: dict, repo: str, *args: str) -> tuple[int, dict, str]:
    p = nhcheck(env, "audit", repo, "--format", "json", *args)
    assert p.stdout, p.stderr
    return p.returncode, json.loads(p.stdout), p.stderr


def header_sizes(d: Path) -> dict[str, tuple[int, int]]:
    """shard name -> (8 + header length, file size)."""
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
        out[f.name] = (8 + n, f.stat().st_size)
    return out


def assert_headers_only(hub: FakeHub, repo: str, d: Path, slack: float) -> None:
    """Every shard was read through its header and no further than ``slack`` × the header, always by Range."""
    for name, (head, size) in header_sizes(d).items():
        served = hub.served_for(repo, "/" + name)
        assert head <= served <= slack * head, (name, head, served, size)
        reqs = [r for r in hub.requests if r[1].endswith("/" + name)]
        assert reqs and all(method == "GET" and rng and rng.startswith("bytes=") for method, _, rng in reqs), reqs
        assert all(int(rng[6:].split("-")[0]) < head for _, _, rng in reqs), reqs


# ----------------------------------------------------------------------------------------------
# Online: same result as the directory, headers only


@pytest.mark.parametrize(
    "repo, path, engine",
    [
        ("nvidia/omni-nvfp4", OMNI, "sglang@0.5.11"),
        ("nvidia/omni-nvfp4", OMNI, "sglang@0.5.23"),
        ("nvidia/nano3-nvfp4", NANO, "sglang@0.5.23"),
    ],
)
def test_hub_audit_equals_local_audit_headers_only(hub, env, repo, path, engine):
    code, doc, err = hub_audit(env, repo, "--engine", engine)
    want_code, want = local_audit(path, "--engine", engine)
    assert code == want_code
    assert comparable(doc) == comparable(want)
    assert doc["source"] == repo and doc["revision"] == hub.shas[repo]["main"]
    # Bytes transferred = every response body the fake Hub sent for this repo (API, small files, header ranges).
    repo_bytes = sum(n for p, n in hub.served.items() if f"/{repo}/" in p or p.endswith(f"/{repo}"))
    assert doc["summary"]["bytes_transferred"] == repo_bytes
    assert f"{repo_bytes:,} bytes transferred" in err
    assert_headers_only(hub, repo, path, slack=1.5)


def test_full_size_layout_reads_a_tiny_fraction(hub, env, full_nano):
    """The real Nano-3 NVFP4 layout (4 shards, 19.3 GB): the audit reads about 0.03 % of it."""
    code, doc, _ = hub_audit(env, FULL_REPO)
    want_code, want = local_audit(full_nano)
    assert (code, comparable(doc)) == (want_code, comparable(want))
    sizes = header_sizes(full_nano)
    shard_bytes = sum(size for _, size in sizes.values())
    served = sum(hub.served_for(FULL_REPO, "/" + n) for n in sizes)
    assert served < 0.05 * shard_bytes and served < 0.001 * shard_bytes, (served, shard_bytes)
    assert doc["summary"]["bytes_transferred"] < 0.001 * shard_bytes
    assert_headers_only(hub, FULL_REPO, full_nano, slack=1.1)


def test_revision_branch_and_commit(hub, env):
    code, doc, _ = hub_audit(env, "nvidia/nano3-nvfp4", "--revision", "excluded")
    want_code, want = local_audit(NANO_EXCLUDED)
    assert (code, comparable(doc)) == (want_code, comparable(want))
    assert doc["revision"] == hub.shas["nvidia/nano3-nvfp4"]["excluded"]
    main_sha = hub.shas["nvidia/nano3-nvfp4"]["main"]
    code, doc, _ = hub_audit(env, "nvidia/nano3-nvfp4", "--revision", main_sha)
    want_code, want = local_audit(NANO)
    assert (code, comparable(doc)) == (want_code, comparable(want))
    assert doc["revision"] == main_sha


def test_gated_repo_with_token_from_hf_config(hub, env):
    code, doc, _ = hub_audit({**env, "HF_TOKEN": "hf_fake"}, "nvidia/gated-h8b")
    want_code, want = local_audit(H8B)
    assert (code, comparable(doc)) == (want_code, comparable(want))


def test_manifest_on_repo_id_equals_local(env):
    p = nhcheck(env, "manifest", "nvidia/omni-nvfp4", "--format", "json", "--engine", "sglang@0.5.11")
    q = nhcheck(
        {k: v for k, v in env.items() if k != "HF_ENDPOINT"},
        "manifest",
        str(OMNI),
        "--format",
        "json",
        "--engine",
        "sglang@0.5.11",
    )
    assert p.returncode == q.returncode == 0, p.stderr
    assert json.loads(p.stdout) == json.loads(q.stdout)


def test_server_ignoring_range_is_not_read_to_the_end(hub, env, full_nano):
    """A server that answers 200 to a Range request: the client stops reading after the header."""
    hub.honour_range = False
    try:
        code, doc, _ = hub_audit(env, FULL_REPO)
    finally:
        hub.honour_range = True
    want_code, want = local_audit(full_nano)
    assert (code, comparable(doc)) == (want_code, comparable(want))
    shard_bytes = sum(size for _, size in header_sizes(full_nano).values())
    assert doc["summary"]["bytes_transferred"] < 0.001 * shard_bytes


# ----------------------------------------------------------------------------------------------
# Errors: one line, exit 2, a hint


@pytest.mark.parametrize(
    "args, extra, expected",
    [
        (["nvidia/no-such-model"], {}, ["repository not found", "HF_TOKEN", "hf auth login"]),
        (["nvidia/gated-h8b"], {}, ["gated repo", "HF_TOKEN", "hf auth login"]),
        (
            ["nvidia/omni-nvfp4", "--revision", "no-such-branch"],
            {},
            ["revision 'no-such-branch' not found", "check the revision"],
        ),
        (["nvidia/bin-only"], {}, ["no safetensors weights (.bin only)"]),
    ],
)
def test_hub_errors_are_one_line_exit_2(env, args, extra, expected):
    p = nhcheck({**env, **extra}, "audit", *args)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nhcheck: error: "), p.stderr
    for text in expected:
        assert text in lines[0]
    assert p.stdout == ""


# ----------------------------------------------------------------------------------------------
# Offline: the local Hugging Face cache


def cache_snapshot(cache: Path, repo: str, src: Path, sha: str, ref: str = "main", skip: tuple[str, ...] = ()) -> None:
    """The cache layout huggingface_hub writes: blobs/, snapshots/<sha>/ symlinks into blobs, refs/<ref>."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / sha
    snap.mkdir(parents=True)
    (repo_dir / "blobs").mkdir(exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.name in skip:
            continue
        blob = repo_dir / "blobs" / hashlib.sha256(f"{sha}/{f.name}".encode()).hexdigest()
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / ref).write_text(sha)


SHA = "0123456789abcdef0123456789abcdef01234567"


def test_offline_audit_from_cache_equals_local(env):
    cache_snapshot(Path(env["HF_HUB_CACHE"]), "acme/omni", OMNI, SHA)
    code, doc, err = hub_audit({**env, "HF_HUB_OFFLINE": "1"}, "acme/omni", "--engine", "sglang@0.5.11")
    want_code, want = local_audit(OMNI, "--engine", "sglang@0.5.11")
    assert (code, comparable(doc)) == (want_code, comparable(want))
    assert (doc["source"], doc["revision"], doc["summary"]["bytes_transferred"]) == ("acme/omni", SHA, 0)
    assert "0 bytes transferred" in err


def test_unreachable_hub_falls_back_to_cache(env):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    cache_snapshot(Path(env["HF_HUB_CACHE"]), "acme/nano3", NANO, SHA)
    code, doc, _ = hub_audit({**env, "HF_ENDPOINT": dead}, "acme/nano3")
    want_code, want = local_audit(NANO)
    assert (code, comparable(doc)) == (want_code, comparable(want))


def test_offline_revision_by_commit(env):
    cache_snapshot(Path(env["HF_HUB_CACHE"]), "acme/nano3", NANO, SHA)
    code, doc, _ = hub_audit({**env, "HF_HUB_OFFLINE": "1"}, "acme/nano3", "--revision", SHA)
    assert (code, comparable(doc)) == (local_audit(NANO)[0], comparable(local_audit(NANO)[1]))


def test_partially_cached_repo_audits_what_is_there_and_names_the_rest(env):
    missing = "model-00002-of-00004.safetensors"
    cache_snapshot(Path(env["HF_HUB_CACHE"]), "acme/nano3", NANO, SHA, skip=(missing,))
    code, doc, _ = hub_audit({**env, "HF_HUB_OFFLINE": "1"}, "acme/nano3")
    assert code == 1
    assert doc["summary"]["shards"] == 3
    assert {t["shard"] for t in doc["tensors"]} == set(header_sizes(NANO)) - {missing}
    [f] = [f for f in doc["findings"] if f["code"] == "shard-not-cached"]
    assert (
        f["severity"] == "warning" and f["shard"] == missing and "not in the local Hugging Face cache" in f["message"]
    )
    assert not [f for f in doc["findings"] if f["code"] == "shard-missing"]
    # The headline leads with the cause, not with "silent garbage" (issue 16, item 6).
    table = nhcheck({**env, "HF_HUB_OFFLINE": "1"}, "audit", "acme/nano3")
    head = table.stdout.splitlines()[1]
    assert head.startswith(
        f"INCOMPLETE only 3 of 4 shards audited — {missing} not in the local Hugging Face cache (HF_HUB_OFFLINE"
    ), head
    assert "silent garbage" not in table.stdout
    assert "verdict incomplete (3 of 4 shards)" in table.stderr


@pytest.mark.parametrize("revision", [None, "v1.0"])
def test_offline_hint_asks_for_headers_not_weights_and_keeps_the_revision(env, revision):
    extra = ["--revision", revision] if revision else []
    p = nhcheck({**env, "HF_HUB_OFFLINE": "1"}, "audit", "acme/nano3", *extra)
    line = p.stderr.strip()
    assert p.returncode == 2 and "hf download" not in line and "only the configs and the shard headers" in line
    assert ("--revision v1.0" in line) == bool(revision), line


@pytest.mark.parametrize("verb, cached", [("audit", "nothing"), ("audit", "config only"), ("prune", "nothing")])
def test_offline_uncached_repo_is_exit_2(env, verb, cached):
    if cached == "config only":
        cache_snapshot(
            Path(env["HF_HUB_CACHE"]),
            "acme/nano3",
            NANO,
            SHA,
            skip=tuple(p.name for p in NANO.iterdir() if p.name != "config.json"),
        )
    extra = ["--out", str(Path(env["HF_HOME"]) / "out")] if verb == "prune" else []
    p = nhcheck({**env, "HF_HUB_OFFLINE": "1"}, verb, "acme/nano3", *extra)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "local Hugging Face cache" in lines[0] and "HF_HUB_OFFLINE" in lines[0], p.stderr


def test_audit_after_download_reads_cached_shards_locally(hub, env):
    """Once prune/load downloaded a repo, a later audit reads its headers from the cache: 0 shard bytes."""
    p = nhcheck(env, "prune", "nvidia/nano3-nvfp4", "--out", str(Path(env["HF_HOME"]) / "out"), "--dry-run", "-q")
    assert p.returncode == 0, p.stderr
    hub.reset()
    code, doc, _ = hub_audit(env, "nvidia/nano3-nvfp4")
    assert (code, comparable(doc)) == (local_audit(NANO)[0], comparable(local_audit(NANO)[1]))
    assert not [r for r in hub.requests if r[1].endswith(".safetensors")]


# ----------------------------------------------------------------------------------------------
# prune / load download what they need first


def test_prune_on_repo_id_downloads_then_prunes(hub, env, tmp_path):
    """The PR #24434 example on a branch: downloaded with snapshot_download, pruned as the directory is."""
    out, ref = tmp_path / "pruned", tmp_path / "pruned-local"
    p = nhcheck(
        env,
        "prune",
        "nvidia/nano3-nvfp4",
        "--revision",
        "leftover",
        "--out",
        str(out),
        "--engine",
        "sglang@0.5.11",
        "-q",
    )
    q = nhcheck(env, "prune", str(LEFTOVER), "--out", str(ref), "--engine", "sglang@0.5.11", "-q")
    assert p.returncode == q.returncode == 0, (p.stderr, q.stderr)
    assert "144 tensor(s) dropped" in p.stdout
    for name in header_sizes(LEFTOVER):  # whole shards came from the fake Hub
        assert hub.served_for("nvidia/nano3-nvfp4", "/" + name) >= (LEFTOVER / name).stat().st_size
    names = sorted(os.listdir(ref))
    assert sorted(os.listdir(out)) == names
    for name in names:
        if name != "nhcheck-prune.json":  # the receipt names its source
            assert (out / name).read_bytes() == (ref / name).read_bytes(), name


def test_load_on_repo_id(env):
    pytest.importorskip("torch")
    p = nhcheck(env, "load", "nvidia/nano3-nvfp4", "--device", "cpu", "--format", "json", "-q")
    q = nhcheck(env, "load", str(NANO), "--device", "cpu", "--format", "json", "-q")
    assert p.returncode == q.returncode == 0, p.stderr
    got, want = json.loads(p.stdout), json.loads(q.stdout)
    assert got["source"] == "nvidia/nano3-nvfp4"
    for doc in (got, want):
        for timing in ("seconds", "gb_per_s", "timings"):
            doc["summary"].pop(timing)
    assert (got["summary"], got["params"], got["findings"]) == (want["summary"], want["params"], want["findings"])
    assert got["summary"]["verdict"] == "clean" and got["summary"]["bytes_loaded"] == 2028032


def test_prune_revision_on_local_path_is_refused(env, tmp_path):
    p = nhcheck(env, "prune", str(NANO), "--revision", "main", "--out", str(tmp_path / "o"), "--dry-run")
    assert p.returncode == 2 and "--revision applies to Hub repo ids" in p.stderr
