"""``nhcheck load``: the checkpoint really lands in the engine's runtime parameters.

CPU tests run in the normal suite (``--device cpu``: same planner, same readers, plain host
memory). Tests marked ``cuda`` need a GPU and skip without one; run them on a GPU machine with
``pytest -m cuda tests/test_load.py``.

The placement is checked against an oracle written here from the checkpoint names alone
(q/k/v rows stacked in order, expert e at index e, scalar scales broadcast or slotted,
``A = -exp(A_log)``), so a wrong planner cannot agree with itself.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import generate  # examples/generate.py, on the path from conftest.py
import pytest
import torch
from click.testing import CliRunner
from goldens import read_golden
from safetensors.torch import load_file

from nhcheck import fileio, prune
from nhcheck import load as loading
from nhcheck.checkpoint import open_local
from nhcheck.cli import cli
from nhcheck.errors import UsageError
from nhcheck.load import LoadOptions, checks, load_path, readers, run
from nhcheck.load.plan import ByShard
from nhcheck.manifest import Param
from nhcheck.pipeline import audit_path
from nhcheck.sources import open_source

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
CONFORMANCE = REPO / "tests" / "conformance"

CPU = LoadOptions(device="cpu")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.numel() == b.numel() and torch.equal(_bytes(a), _bytes(b))


def assert_matches_reference(ref, got) -> None:
    """Every tensor of a CUDA load equals the CPU reference load's (``A = -exp()`` on the GPU may differ in the
    last bit)."""
    for n, t in ref.tensors.items():
        if n.endswith(".mixer.A"):
            assert torch.allclose(got.tensors[n].cpu(), t, rtol=1e-6, atol=0.0), n
        else:
            assert same(t, got.tensors[n]), n


def poison_everywhere(t: torch.Tensor) -> bool:
    return bool((_bytes(t) == 0xFF).all())


def sources(root: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(root.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def oracle(root: Path, loaded: dict[str, torch.Tensor], lm_prefix: str = "") -> set[str]:
    """Check every language-model/projector tensor of ``root`` against where the engine must put it.

    Written from the checkpoint names, independent of nhcheck's planner; expert tensors whose
    target the engine did not build are skipped (orphans). Returns the runtime parameters it
    verified, so a caller can demand that every allocated parameter was among them.
    """
    checked: set[str] = set()
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for name, x in sources(root).items():
        if "mtp" in name or name.startswith(("vision_model.", "sound_")):
            continue
        if lm_prefix and name.startswith(lm_prefix):
            name = name[len(lm_prefix) :]
        n = name.replace("backbone", "model", 1).replace("embeddings", "embed_tokens")
        n = n.replace("k_proj.k_scale", "attn.k_scale").replace("v_proj.v_scale", "attn.v_scale")
        if not n.startswith("mlp1."):
            n = lm_prefix + n
        if n.endswith(".A_log"):
            p = n[: -len("_log")]
            assert torch.allclose(loaded[p], -torch.exp(x.float()), rtol=1e-6), p
            checked.add(p)
            continue
        m = re.fullmatch(r"(.*)\.experts\.(\d+)\.(up|down)_proj\.(\w+)", n)
        if m:
            base, e, proj, suffix = m.group(1), int(m.group(2)), m.group(3), m.group(4)
            p = f"{base}.experts.{'w13' if proj == 'up' else 'w2'}_{suffix}"
            if p not in loaded:
                continue  # an orphan the engine drops (0.5.12+)
            slot = loaded[p][e]
            assert same(slot.reshape(-1), x.reshape(-1).to(slot.dtype)), f"{name} → {p}[{e}]"
            checked.add(p)
            continue
        m = re.fullmatch(r"(.*)\.([qkv])_proj\.(\w+)", n)
        if m:
            qkv.setdefault(f"{m.group(1)}.qkv_proj.{m.group(3)}", {})[m.group(2)] = x
            continue
        p = loaded[n]
        if p.numel() == x.numel():
            assert same(p.reshape(-1), x.reshape(-1).to(p.dtype)), n
        else:
            assert x.numel() == 1 and p.dim() == 1, n  # a scalar scale over every partition
            assert same(p, x.reshape(1).to(p.dtype).expand(p.numel()).contiguous()), n
        checked.add(n)
    for p, parts in qkv.items():
        want = torch.cat(
            [parts[s].reshape(-1 if parts[s].dim() == 0 else parts[s].shape[0], *parts[s].shape[1:]) for s in "qkv"]
        )
        assert same(loaded[p], want.to(loaded[p].dtype)), p
        checked.add(p)
    return checked


def assert_all_checked(result, checked: set[str]) -> None:
    defaults = {p.param.name for p in result.report.params if p.param.informational and p.status == "unfilled"}
    assert set(result.tensors) - defaults == checked


def write(tmp_path: Path, tensors, config, quant=None, shards=2) -> Path:
    out = tmp_path / "ckpt"
    generate.write_checkpoint(str(out), tensors, config, quant, shards=shards)
    return out


def nano3_bf16(tmp_path: Path, edit=lambda ts: ts) -> Path:
    c = generate.nano3_tiny_config()
    return write(tmp_path, edit(generate.nemotron_h_tensors(c, None)), c)


# ---------------------------------------------------------------------------
# The placement is the engine's


@pytest.mark.parametrize(
    "example, engine",
    [
        ("nano3-nvfp4", "0.5.23"),
        ("nano3-bf16", "0.5.11"),
        ("h8b-dense", "0.5.23"),
        ("nano3-24434-leftover-expert-scales", "0.5.23"),
    ],
)
def test_every_parameter_holds_its_checkpoint_tensor(example, engine):
    res = load_path(str(EXAMPLES / example), f"sglang@{engine}", CPU)
    assert res.report.verdict == "clean" and res.report.exit_code() == 0
    assert_all_checked(res, oracle(EXAMPLES / example, res.tensors))
    kv = [p for p in res.report.params if p.param.informational]
    assert all(p.status == "unfilled" and bool((res.tensors[p.param.name] == -1).all()) for p in kv)


def test_quantized_attention_fills_stacked_scale_slots_and_kv_scales(tmp_path):
    c = generate.nano3_tiny_config(quantized=True)
    q = generate.nano3_tiny_quant()
    q["quantization"]["exclude_modules"] = [
        e for e in q["quantization"]["exclude_modules"] if not re.search(r"\.(q|k|v|o)_proj$", e)
    ]
    root = write(tmp_path, generate.nemotron_h_tensors(c, q, kv_scales=True), c, q, shards=3)
    res = load_path(str(root), "sglang@0.5.23", CPU)
    assert res.report.verdict == "clean"
    qkv = res.report.audit.manifest.by_name["model.layers.5.mixer.qkv_proj.input_scale"]
    assert qkv.shape == (3,) and qkv.loader == "stacked"
    checked = oracle(root, res.tensors)
    assert {"model.layers.5.mixer.qkv_proj.weight_scale_2", "model.layers.5.mixer.attn.k_scale"} <= checked
    assert_all_checked(res, checked)


def test_omni_fp8_mamba_nvfp4_experts_and_projector_on_0_5_23():
    res = load_path(str(EXAMPLES / "omni-nvfp4-24137"), "sglang@0.5.23", CPU)
    assert res.report.verdict == "clean" and res.report.exit_code() == 0
    checked = oracle(EXAMPLES / "omni-nvfp4-24137", res.tensors, "language_model.")
    assert "language_model.model.layers.0.mixer.in_proj.weight_scale" in checked  # FP8 scalar over 5 partitions
    assert "mlp1.1.weight" in checked
    assert_all_checked(res, checked)


@pytest.mark.parametrize(
    "example, engine",
    [
        ("nano3-nvfp4", "0.5.23"),
        ("nano3-bf16", "0.5.23"),
        ("omni-nvfp4-24137", "0.5.23"),
        ("omni-nvfp4-24137", "0.5.12"),
    ],
)
def test_readers_agree_byte_for_byte(example, engine):
    """Reference safe_open reader vs the fast reader cut into 1000-byte reads through a 4-slot ring,
    one shard on the device at a time (readers wait for the plan to free landing memory)."""
    ref = load_path(str(EXAMPLES / example), f"sglang@{engine}", LoadOptions(device="cpu", reader="safetensors"))
    fast = load_path(
        str(EXAMPLES / example),
        f"sglang@{engine}",
        LoadOptions(device="cpu", chunk_bytes=1000, pinned_bytes=4000, threads=3, staging_bytes=1),
    )
    assert ref.report.verdict == fast.report.verdict
    assert set(ref.tensors) == set(fast.tensors)
    assert all(same(ref.tensors[n], fast.tensors[n]) for n in ref.tensors)
    assert fast.report.bytes_read <= sum(s.file_size - s.data_start for s in open_local(str(EXAMPLES / example)).shards)


def _prefetched(
    monkeypatch, tmp_path, budget: int | None, cached=(), gate: threading.Event | None = None, threads: int = 1
):
    """``readers.prefetch`` over two files in 4 KB steps with ``budget`` and ``threads``, the bytes at ``cached``
    (path, offset) in the page cache: its stop and its reads (path, offset, length), recorded when the threads
    have ended."""
    spans = []
    for name, size, data in (("a.safetensors", 10240, 100), ("b.safetensors", 7000, 50)):
        (tmp_path / name).write_bytes(bytes(size))
        spans.append(readers.Span(str(tmp_path / name), data, size))
    reads: list[tuple[str, int, int]] = []
    real = os.preadv

    def preadv(fd, bufs, off, flags=0):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path not in {s.path for s in spans}:
            return real(fd, bufs, off, flags)
        if flags == os.RWF_NOWAIT:
            if (path, off) in cached:
                return 1
            raise BlockingIOError
        reads.append((path, off, len(bufs[0])))
        if gate is not None:
            gate.wait(10)
        return len(bufs[0])

    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(readers, "_PREFETCH_STEP", 4096)
    monkeypatch.setattr(readers, "_prefetch_budget", lambda: budget)
    monkeypatch.setattr(readers, "_prefetch_threads", lambda: threads)
    stop = readers.prefetch(spans)
    return stop, reads, spans


def _prefetch_thread_ends() -> None:
    for t in threading.enumerate():
        if t.name == "nhcheck-prefetch":
            t.join(10)


@pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT"), reason="no preadv2 flags")
def test_prefetch_reads_the_data_sections_in_order_within_its_budget_skipping_cached_steps(monkeypatch, tmp_path):
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    stop, reads, _ = _prefetched(monkeypatch, tmp_path, 12288, cached={(a, 4196 + 4095)})
    _prefetch_thread_ends()
    # a's data section in steps (the second's last byte is cached: skipped, still counted against the budget),
    # then b's until the budget is spent (10,140 bytes of a, 2,148 of b)
    assert reads == [(a, 100, 4096), (a, 8292, 1948), (b, 50, 2148)]
    stop()  # after the end: nothing to stop
    (tmp_path / "none").mkdir()
    _, none, _ = _prefetched(monkeypatch, tmp_path / "none", None)
    _prefetch_thread_ends()
    assert none == []  # the kernel says nothing of its memory: nothing read


@pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT"), reason="no preadv2 flags")
def test_prefetch_threads_read_each_step_once_within_the_budget(monkeypatch, tmp_path):
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    _, reads, _ = _prefetched(monkeypatch, tmp_path, 12288, cached={(a, 4196 + 4095)}, threads=3)
    _prefetch_thread_ends()
    assert sorted(reads) == [(a, 100, 4096), (a, 8292, 1948), (b, 50, 2148)]
    _, every, _ = _prefetched(monkeypatch, tmp_path, 1 << 30, threads=3)
    _prefetch_thread_ends()
    assert sorted(every) == [(a, 100, 4096), (a, 4196, 4096), (a, 8292, 1948), (b, 50, 4096), (b, 4146, 2854)]


def test_prefetch_threads_scale_with_the_cores_the_process_may_use(monkeypatch, tmp_path):
    monkeypatch.setattr(fileio, "_CGROUP_V2", str(tmp_path / "none"))
    monkeypatch.setattr(fileio, "_CGROUP_V1", (str(tmp_path / "none"), str(tmp_path / "none")))
    for cores, threads in ((1, 1), (2, 1), (7, 1), (8, 2), (15, 3), (16, 4), (128, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert readers._prefetch_threads() == threads, cores


@pytest.mark.parametrize("cores, threads", [(1, 1), (3, 3), (8, 8), (64, 16)])
def test_reader_threads_default_to_the_cores_the_process_may_use(monkeypatch, cores, threads):
    """``threads`` 0: as many readers as the process has usable cores, up to 16 (``os.cpu_count`` counts the host's:
    16 readers on 8 usable cores read slower than 8, README)."""
    monkeypatch.setattr(readers, "usable_cores", lambda: cores)
    started: list[str] = []
    start = threading.Thread.start
    monkeypatch.setattr(threading.Thread, "start", lambda self: (started.append(self.name), start(self))[1])
    res = load_path(str(EXAMPLES / "h8b-dense"), "sglang@0.5.23", LoadOptions(device="cpu", chunk_bytes=4096))
    assert res.report.verdict == "clean"
    assert sum(name.startswith("nhcheck-load-") for name in started) == threads


def test_usable_cores_are_the_affinity_within_the_cgroup_quota(monkeypatch, tmp_path):
    """A container's CPU quota (cgroup v2 ``cpu.max``, else v1's quota and period) caps the affinity's count."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(64)))
    v2, quota, period = tmp_path / "cpu.max", tmp_path / "quota", tmp_path / "period"
    monkeypatch.setattr(fileio, "_CGROUP_V2", str(v2))
    monkeypatch.setattr(fileio, "_CGROUP_V1", (str(quota), str(period)))
    assert fileio.usable_cores() == 64  # no cgroup files: the affinity
    for text, cores in (("800000 100000\n", 8), ("150000 100000\n", 2), ("max 100000\n", 64), ("9000000 100000", 64)):
        v2.write_text(text)
        assert fileio.usable_cores() == cores, text
    v2.unlink()
    period.write_text("100000\n")
    for text, cores in (("400000\n", 4), ("-1\n", 64), ("50000\n", 1)):
        quota.write_text(text)
        assert fileio.usable_cores() == cores, text
    assert readers._prefetch_threads() == 1  # half a CPU of quota on a 64-core host: one prefetch thread


@pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT"), reason="no preadv2 flags")
def test_prefetch_stops_when_the_readers_take_over(monkeypatch, tmp_path):
    gate = threading.Event()
    stop, reads, (a, _) = _prefetched(monkeypatch, tmp_path, 1 << 30, gate=gate)
    deadline = time.monotonic() + 10
    while not reads and time.monotonic() < deadline:
        time.sleep(0.001)
    stop()
    gate.set()
    _prefetch_thread_ends()
    assert reads == [(a.path, 100, 4096)]


@pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT"), reason="no preadv2 flags")
def test_prefetch_knows_a_page_just_read_is_cached(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(bytes(range(256)) * 64)
    with open(f, "rb", buffering=0) as fh:
        assert fh.read() and readers._cached(fh.fileno(), 8191)
    stop = readers.prefetch([readers.Span(str(f), 8, f.stat().st_size)])  # the real thing, to its end
    _prefetch_thread_ends()
    stop()


def test_a_load_stops_its_prefetch_once_the_readers_start(monkeypatch):
    seen = []
    real = readers.Transfer.__init__

    def prefetch(spans):
        seen.append(("prefetch", len(spans)))
        return lambda: seen.append(("stop",))

    def init(self, *args):
        seen.append(("readers",))
        real(self, *args)

    monkeypatch.setattr(readers, "prefetch", prefetch)
    monkeypatch.setattr(readers.Transfer, "__init__", init)
    assert load_path(str(EXAMPLES / "nano3-nvfp4"), "sglang@0.5.23", CPU).report.verdict == "clean"
    assert seen == [("prefetch", 4), ("readers",), ("stop",)]  # its 4 shards


def test_a_load_audits_without_the_recipe_check(monkeypatch):
    """The load reports what memory holds: the audit it decides by skips the recipe check (findings only)."""
    from nhcheck import audit as audit_module

    asked = []
    monkeypatch.setattr(audit_module, "_recipe_findings", lambda *a: asked.append(a) or [])
    assert load_path(str(EXAMPLES / "nano3-nvfp4"), "sglang@0.5.23", CPU).report.verdict == "clean"
    assert asked == []
    audit_path(str(EXAMPLES / "nano3-nvfp4"), "sglang@0.5.23")
    assert len(asked) == 1


def test_reads_cover_every_data_section_in_pieces():
    shards = open_local(str(EXAMPLES / "nano3-bf16")).shards
    reads = readers.plan_reads(list(shards), 1000)
    for i, s in enumerate(shards):
        mine = [r for r in reads if r.shard == i]
        assert mine[0].start == s.data_start and mine[-1].end == s.file_size
        assert all(a.end == b.start for a, b in zip(mine, mine[1:], strict=False)) and all(
            r.end - r.start <= 1000 for r in mine
        )


@pytest.mark.parametrize("staging", [1, 5000, 1 << 30])
def test_staging_area_is_bounded_whatever_the_shard_size(staging):
    """The device memory beside the parameters is the staging area: ``staging_bytes`` (at least one read),
    never more than the data, not the shards' sizes."""
    shards = open_local(str(EXAMPLES / "nano3-bf16")).shards
    opts = LoadOptions(device="cpu", chunk_bytes=1000, staging_bytes=staging, threads=1)
    with readers.Transfer(readers.spans_of(shards), torch.device("cpu"), opts, torch) as t:
        assert t.staging.numel() <= max(staging, t.slot) and t.staging.numel() <= len(t.reads) * t.slot
        assert t.staging.numel() == t.slot * max(1, min(len(t.reads), staging // t.slot))


@pytest.mark.parametrize("staging", [1, 1 << 30])
def test_reads_land_while_the_plan_is_made_and_stay_in_the_staging_area(monkeypatch, staging):
    """The plan (its first installment: the first shard's ops) is held back until a read has landed: the reads do
    not wait for it (they start from the length prefixes), fill at most the staging area, and the load completes
    once the plan arrives."""
    seen = {}
    real_transfer, real_first = run.Transfer, ByShard.first

    def spy(*a):
        seen["transfer"] = real_transfer(*a)
        return seen["transfer"]

    def late_plan(self):
        t = seen["transfer"]
        with t.lock:
            assert t.lock.wait_for(lambda: t.bytes_read > 0, timeout=30), "no read landed while the plan waited"
        time.sleep(0.2)  # time for the readers to run ahead as far as they may
        with t.lock:
            seen["before_plan"] = t.bytes_read
        return real_first(self)

    monkeypatch.setattr(run, "Transfer", spy)
    monkeypatch.setattr(ByShard, "first", late_plan)
    opts = LoadOptions(device="cpu", chunk_bytes=1000, staging_bytes=staging, threads=3)
    res = load_path(str(EXAMPLES / "nano3-nvfp4"), "sglang@0.5.23", opts)
    t = seen["transfer"]
    assert res.report.verdict == "clean"
    assert 0 < seen["before_plan"] <= t.nstage * t.slot
    if staging == 1:
        assert seen["before_plan"] <= 1000 < res.report.bytes_read  # one slot ahead, then the rest after the plan
    ref = load_path(str(EXAMPLES / "nano3-nvfp4"), "sglang@0.5.23", LoadOptions(device="cpu", reader="safetensors"))
    assert all(same(ref.tensors[n], res.tensors[n]) for n in ref.tensors)


class _FakeCudart:
    """``cudaHostRegister`` / ``cudaHostUnregister`` recorded (and failed where asked), for ``readers._pin``."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at = fail_at
        self.registered: dict[int, int] = {}
        self.lock = threading.Lock()

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:  # noqa: N802 - the CUDA name
        with self.lock:
            if ptr == self.fail_at:
                return 712  # cudaErrorHostMemoryAlreadyRegistered: any non-zero code
            assert ptr not in self.registered and flags == 0
            self.registered[ptr] = size
            return 0

    def cudaHostUnregister(self, ptr: int) -> int:  # noqa: N802
        with self.lock:
            del self.registered[ptr]
            return 0


def _torch_with(cudart: _FakeCudart, pinned: list[int]):
    """torch as ``readers._pin`` sees it, with ``cudart`` as CUDA's runtime and ``pin_memory`` noted, not done."""
    from types import SimpleNamespace

    def empty(size, dtype, pin_memory=False):
        if pin_memory:
            pinned.append(size)
        return torch.full((size,), 255, dtype=dtype)  # not zero: a part left unwritten shows

    return SimpleNamespace(empty=empty, uint8=torch.uint8, cuda=SimpleNamespace(cudart=lambda: cudart))


def test_pinned_ring_is_registered_in_page_aligned_parts_each_faulted_in():
    cudart, pinned = _FakeCudart(), []
    size = 7 * 4096 + 100
    ring, parts = readers._pin(_torch_with(cudart, pinned), size, None, 3 * 4096)
    assert ring.numel() == size and ring.data_ptr() % 4096 == 0 and not pinned
    assert parts == [(0, 3 * 4096), (3 * 4096, 3 * 4096), (6 * 4096, 4096 + 100)]
    assert cudart.registered == {ring.data_ptr() + o: n for o, n in parts}  # every byte, no page twice
    assert not ring.any()  # each part was written (its pages faulted in) before it was registered
    readers._unpin(_torch_with(cudart, pinned), ring, parts)
    assert cudart.registered == {}


def test_pinned_ring_falls_back_to_torch_pinning_when_a_part_will_not_register():
    cudart, pinned = _FakeCudart(), []
    real_empty = torch.empty
    seen = []

    def empty(size, dtype, pin_memory=False):
        t = real_empty(size, dtype=dtype)
        seen.append(t)
        if len(seen) == 1:
            cudart.fail_at = t.data_ptr() + (-t.data_ptr() % 4096) + 2 * 4096  # the third part
        if pin_memory:
            pinned.append(size)
        return t

    fake = _torch_with(cudart, pinned)
    fake.empty = empty
    ring, parts = readers._pin(fake, 5 * 4096, None, 4096)
    assert parts == [] and pinned == [5 * 4096] and ring is seen[-1]
    assert cudart.registered == {}  # the parts that did register were let go


def test_ring_parts_hold_whole_slots_and_a_ring_of_other_slots_is_pinned_afresh(monkeypatch):
    """An asynchronous copy from one ring slot never spans two registrations: each registered part holds whole
    slots, whatever the slot size (the read size, rounded to a page); a later load with slots of another size
    gets a ring of its own, the old one let go."""
    monkeypatch.setattr(readers, "_CACHE", {})
    monkeypatch.setattr(readers, "_PIN_PART", 5 * 4096)
    cudart, pinned = _FakeCudart(), []
    fake = _torch_with(cudart, pinned)
    rings = []
    for stride, slots in ((2 * 4096, 7), (8 * 4096, 3), (3 * 4096, 4), (3 * 4096, 2)):
        rings.append(readers._host_ring(fake, slots * stride, True, None, stride))
        parts = readers._CACHE["ring_parts"]
        assert cudart.registered == {rings[-1].data_ptr() + o: n for o, n in parts}  # only this ring's parts
        for h in range(slots):
            a = h * stride
            assert any(o <= a and a + stride <= o + n for o, n in parts), (stride, h)
        assert not pinned
    assert len({r.data_ptr() for r in rings}) == 3 and rings[-1] is rings[-2]  # the last ring reused
    assert readers._CACHE["ring_part"] == 3 * 4096 and len(parts) == 4


def test_the_cyclic_collector_is_paused_for_the_load_and_restored(monkeypatch, collector_setting):
    """As the CLI does for its whole run, a load (the library's too) pauses the cyclic collector, whose passes
    over its small acyclic objects hold the interpreter, and gives the caller its setting back."""
    import gc

    seen: list[bool] = []
    plan = ByShard.next
    monkeypatch.setattr(ByShard, "next", lambda self: seen.append(gc.isenabled()) or plan(self))
    res = load_path(str(EXAMPLES / "nano3-nvfp4"), "sglang@0.5.23", LoadOptions(device="cpu"))
    assert res.report.verdict == "clean" and seen == [False] * 4 and gc.isenabled() == collector_setting


@pytest.mark.parametrize("early", [None, 5e-3])
def test_the_switch_interval_is_the_loads_after_the_handover_and_the_callers_after_the_load(monkeypatch, early):
    """Until the plan reaches the readers the interpreter switches at ``EARLY_SWITCH_INTERVAL`` where set (else at
    ``SWITCH_INTERVAL``), then at ``SWITCH_INTERVAL``; the caller's interval comes back after the load."""
    seen: dict[str, float] = {}
    real_plan, real_finish = ByShard.first, readers.Transfer.finish

    def planning(self):
        seen["plan"] = sys.getswitchinterval()
        return real_plan(self)

    def finishing(self, more=None):
        seen["finish"] = sys.getswitchinterval()
        return real_finish(self, more)

    monkeypatch.setattr(readers, "EARLY_SWITCH_INTERVAL", early)
    monkeypatch.setattr(ByShard, "first", planning)
    monkeypatch.setattr(readers.Transfer, "finish", finishing)
    caller = sys.getswitchinterval()
    res = load_path(str(EXAMPLES / "nano3-nvfp4"), "sglang@0.5.23", LoadOptions(device="cpu"))
    assert res.report.verdict == "clean" and sys.getswitchinterval() == caller
    want = {"plan": early or readers.SWITCH_INTERVAL, "finish": readers.SWITCH_INTERVAL}
    assert seen == pytest.approx(want)  # the interpreter keeps the interval in whole microseconds


def test_until_the_plan_arrives_only_the_early_share_of_readers_read(monkeypatch):
    """Before the plan at most ``early`` reads are in flight at once (the main thread keeps the interpreter);
    after it every reader thread reads, and the load is the same."""
    seen = {"now": 0, "before": 0, "after": 0}
    real_transfer, real_plan, real_read = run.Transfer, ByShard.first, readers.read_into
    guard = threading.Lock()

    def spy(*a):
        seen["transfer"] = real_transfer(*a)
        return seen["transfer"]

    def slow_read(*a):
        with guard:
            seen["now"] += 1
            t = seen.get("transfer")  # None: still in Transfer(), before any plan
            key = "before" if t is None or t.needed is None else "after"
            seen[key] = max(seen[key], seen["now"])
        time.sleep(0.01)
        real_read(*a)
        with guard:
            seen["now"] -= 1

    def late_plan(self):
        time.sleep(0.2)  # time for every idle reader to try
        return real_plan(self)

    monkeypatch.setattr(run, "Transfer", spy)
    monkeypatch.setattr(ByShard, "first", late_plan)
    monkeypatch.setattr(readers, "read_into", slow_read)
    opts = LoadOptions(device="cpu", chunk_bytes=1000, staging_bytes=1 << 30, threads=4)
    res = load_path(str(EXAMPLES / "nano3-nvfp4"), "sglang@0.5.23", opts)
    assert seen["transfer"].early == 2 and res.report.verdict == "clean"
    assert seen["before"] == 2 and seen["after"] > 2
    ref = load_path(str(EXAMPLES / "nano3-nvfp4"), "sglang@0.5.23", LoadOptions(device="cpu", reader="safetensors"))
    assert all(same(ref.tensors[n], res.tensors[n]) for n in ref.tensors)


def test_reads_not_landed_are_compiled_while_the_main_thread_waits_and_placed_as_compiled(monkeypatch):
    """With every installment handed over and the reads slow to land, the main thread compiles the next reads
    ahead of their landing: each read compiled once, placed with that placement, and the load the reference
    reader's."""
    seen: dict[int, int] = {}  # read → compiles
    steps: list[str] = []
    real_read, real_compiled, real_apply = readers.read_into, readers.Transfer._compiled, readers.apply_placement

    def slow_read(*a):
        time.sleep(0.02)
        real_read(*a)

    def compiled(self, j):
        seen[j] = seen.get(j, 0) + 1
        steps.append("compile")
        return real_compiled(self, j)

    def placing(*a, **k):
        steps.append("place")
        return real_apply(*a, **k)

    monkeypatch.setattr(readers, "apply_placement", placing)
    monkeypatch.setattr(readers, "read_into", slow_read)
    monkeypatch.setattr(readers.Transfer, "_compiled", compiled)
    opts = LoadOptions(device="cpu", chunk_bytes=1 << 16, staging_bytes=1 << 20, threads=2)
    res = load_path(str(EXAMPLES / "nano3-nvfp4"), "sglang@0.5.23", opts)
    assert res.report.verdict == "clean" and set(seen.values()) == {1} and len(seen) == steps.count("place")
    lead = [steps[: i + 1].count("compile") - steps[: i + 1].count("place") for i in range(len(steps))]
    assert min(lead) >= 0 and max(lead) > 1  # placed only once compiled, and some compiled before the last placed
    ref = load_path(str(EXAMPLES / "nano3-nvfp4"), "sglang@0.5.23", LoadOptions(device="cpu", reader="safetensors"))
    assert all(same(ref.tensors[n], res.tensors[n]) for n in ref.tensors)


def test_placements_are_decided_read_by_read_and_the_checks_bookkeeping_follows_the_handover(monkeypatch):
    """The plan is cut into the reads' rows as it reaches the readers, a shard at a time, each installment before
    the checks' bookkeeping notes it (which runs beside the transfer), the merge after the last; each staged read's
    byte ranges are computed once, before that read is placed (ahead of its landing where the main thread waits);
    each placement holds its read's byte ranges in source order, every op's source bytes exactly once."""
    events: list[str] = []
    placed: list = []
    cut, compile_, apply = readers.cut_plan, readers.compile_cut, readers.apply_placement
    note, merge = checks.Bookkeeping.add, checks.Bookkeeping.result

    def cutting(*a, **k):
        events.append("cut")
        return cut(*a, **k)

    def compiling(*a, **k):
        events.append("compile")
        return compile_(*a, **k)

    def placing(placement, src, arenas, stream=None, batch=None):
        events.append("place")
        placed.append(placement)
        apply(placement, src, arenas, stream, batch)

    def noting(books, ops):  # on the side thread
        cuts = events.count("cut")
        note(books, ops)
        events.append(("noted", len(ops), cuts))

    def merging(books):
        events.append("merge")
        return merge(books)

    transfers = []
    real_transfer = run.Transfer
    monkeypatch.setattr(run, "Transfer", lambda *a: transfers.append(real_transfer(*a)) or transfers[-1])
    monkeypatch.setattr(readers, "cut_plan", cutting)
    monkeypatch.setattr(readers, "compile_cut", compiling)
    monkeypatch.setattr(readers, "apply_placement", placing)
    monkeypatch.setattr(checks.Bookkeeping, "add", noting)
    monkeypatch.setattr(checks.Bookkeeping, "result", merging)
    opts = LoadOptions(device="cpu", chunk_bytes=4096, staging_bytes=3 * 4096, threads=2)
    res = load_path(str(EXAMPLES / "nano3-nvfp4"), "sglang@0.5.23", opts)
    assert res.report.verdict == "clean"
    shards = len(res.report.audit.checkpoint.shards)
    last_cut = len(events) - 1 - events[::-1].index("cut")
    assert shards > 1 and events.count("cut") == shards and events.index("merge") > last_cut
    noted = [e for e in events if isinstance(e, tuple)]
    assert [cuts >= i + 1 for i, (_, _, cuts) in enumerate(noted)] == [True] * shards
    assert events.index("merge") > events.index(noted[-1])
    steps = [e for e in events if e in ("compile", "place")]
    assert len(placed) > 1 and steps.count("compile") == steps.count("place") == len(placed)
    assert all(steps[: i + 1].count("compile") >= steps[: i + 1].count("place") for i in range(len(steps)))
    got: dict[int, int] = {}
    parts = [pc for cut in transfers[-1].cuts.values() for pc in cut.parts]  # non-copy ops gathered across reads
    assert parts and all(pc.op.kind != "copy" for pc in parts)
    audit = audit_path(str(EXAMPLES / "nano3-nvfp4"), "sglang@0.5.23")
    ops = {op.idx: op for op in loading.plan_load(audit).ops}
    for placement in placed:
        assert all(list(c.src) == sorted(c.src) for c in placement.copies)
        idx = [pc.op.idx for pc in placement.others]
        assert idx == sorted(idx) and all(ops[i].kind == "copy" for c in placement.copies for i in c.idx)
        for c in placement.copies:
            for i, n in zip(c.idx, c.size, strict=True):
                got[i] = got.get(i, 0) + n
    for pc in [pc for pl in placed for pc in pl.others] + parts:
        got[pc.op.idx] = got.get(pc.op.idx, 0) + pc.nbytes
    assert sum(n for _, n, _ in noted) == len(ops)
    assert got == {op.idx: readers.ITEMSIZE[op.src] * op.src_elements for op in ops.values()}


def _nano_cuts():
    """The tiny Nano NVFP4 example's plan cut into staged reads of 4 KB: (plan, spans, reads, cuts, whole)."""
    audit = audit_path(str(EXAMPLES / "nano3-nvfp4"), "sglang@0.5.23")
    plan = loading.plan_load(audit)
    spans = readers.spans_of(audit.checkpoint.shards)
    reads = readers.plan_reads(spans, 4096)
    of_shard: list[list[int]] = [[] for _ in spans]
    for j, r in enumerate(reads):
        of_shard[r.shard].append(j)
    where = loading.Arenas(plan.params, torch.device("meta"), torch).where
    cuts, whole = readers.cut_plan(plan.ops, spans, reads, of_shard, where)
    return plan, spans, reads, cuts, whole


def _edited(placement, ops: dict, arenas, edit):
    """``placement`` with each op as ``edit`` makes it (None: dropped), compiled again: how a test plants a wrong
    placement (``ops``: the plan's ops by ``idx``)."""
    rows: dict[str, list] = {}
    for c in placement.copies:
        for so, do, n, i in zip(c.src, c.dst, c.size, c.idx, strict=True):
            op = edit(ops[i])
            if op is not None:
                shift = (op.start - ops[i].start) * readers.ITEMSIZE[op.src]
                rows.setdefault(c.dtype, []).append((so, do + shift, n, i))
    others = [pc._replace(op=op) for pc in placement.others if (op := edit(pc.op)) is not None]
    return readers.compile_cut(readers.Cut(rows, others, []), arenas)


def _plan_ops() -> dict:
    """The tiny Nano NVFP4 example's plan (SGLang 0.5.23), its ops by ``idx``."""
    return {op.idx: op for op in loading.plan_load(audit_path(str(EXAMPLES / "nano3-nvfp4"), "sglang@0.5.23")).ops}


def _staged(spans, r) -> torch.Tensor:
    """Read ``r``'s bytes, as a staging slot holds them."""
    with open(spans[r.shard].path, "rb") as fh:
        fh.seek(r.start)
        return torch.frombuffer(bytearray(fh.read(r.end - r.start)), dtype=torch.uint8)


def test_driver_copy_path_places_what_the_views_place(monkeypatch):
    """The CUDA driver path's address arithmetic, run on the host: a stand-in driver function moves the
    ranges it is handed (what ``cuMemcpyDtoDAsync`` does on a GPU), and the arenas must end byte for byte
    as the views path leaves them."""
    import ctypes

    plan, spans, reads, cuts, whole = _nano_cuts()
    calls = {"memcpy": 0}

    def memcpy(dst, src, n, handle):
        calls["memcpy"] += 1
        ctypes.memmove(dst, src, n)
        return 0

    class Stream:
        cuda_stream = 0

    monkeypatch.setattr(readers, "_driver_memcpy", lambda: memcpy)

    with_copies = []

    def placed(stream) -> dict[str, torch.Tensor]:
        arenas = loading.Arenas(plan.params, torch.device("cpu"), torch)
        with_copies.clear()
        for j, cut in sorted(cuts.items()):
            r = reads[j]
            src = _staged(spans, r)
            placement = readers.compile_cut(cut, arenas, r.end - r.start)
            readers.apply_placement(placement, src, arenas, stream)
            with_copies.append(sum(len(c.size) for c in placement.copies))
        return {d: t.clone() for d, t in arenas.raw.items()}

    views = placed(None)
    assert calls == {"memcpy": 0}
    driver = placed(Stream())
    assert views.keys() == driver.keys() and all(torch.equal(views[d], driver[d]) for d in views)
    assert calls["memcpy"] == sum(with_copies) > len(plan.ops) // 2


@pytest.mark.parametrize("example", ["nano3-bf16", "omni-nvfp4-24137", "h8b-dense"])
def test_reads_start_from_the_length_prefixes_alone(example):
    assert readers.quick_spans(str(EXAMPLES / example)) == readers.spans_of(open_local(str(EXAMPLES / example)).shards)


def test_early_reads_of_a_stray_shard_are_dropped_and_the_load_starts_over(tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    shutil.copytree(EXAMPLES / "nano3-bf16", root)
    shutil.copy(root / "model-00001-of-00003.safetensors", root / "stray.safetensors")  # not in the index
    started = []
    real = run.Transfer

    def spy(spans, *a):
        started.append([Path(s.path).name for s in spans])
        return real(spans, *a)

    monkeypatch.setattr(run, "Transfer", spy)
    res = load_path(str(root), "sglang@0.5.23", CPU)
    assert started[0][-1] == "stray.safetensors" and "stray.safetensors" not in started[1]
    assert res.report.verdict == "clean"
    assert any(f.code == "shard-stray" for f in res.report.findings)


def test_load_with_decisions_already_made_equals_the_full_load():
    audit = audit_path(str(EXAMPLES / "omni-nvfp4-24137"), "sglang@0.5.23")
    given = loading.load_audited(audit, CPU)
    full = load_path(str(EXAMPLES / "omni-nvfp4-24137"), "sglang@0.5.23", CPU)
    assert given.report.verdict == full.report.verdict == "clean"
    assert given.report.audit is audit  # the decisions were reused, not remade (speed lives in bench/)
    assert all(same(full.tensors[n], t) for n, t in given.tensors.items())


def test_dtype_override_casts_model_dtype_parameters_only():
    res = load_path(str(EXAMPLES / "nano3-nvfp4"), "sglang@0.5.23", LoadOptions(device="cpu", dtype="float32"))
    assert res.report.verdict == "clean"
    t = res.tensors
    assert t["model.embed_tokens.weight"].dtype == torch.float32
    assert t["model.layers.1.mixer.experts.w13_weight"].dtype == torch.uint8
    assert t["model.layers.0.mixer.in_proj.input_scale"].dtype == torch.float32
    src = sources(EXAMPLES / "nano3-nvfp4")
    assert torch.equal(t["model.embed_tokens.weight"], src["backbone.embeddings.weight"].float())


# ---------------------------------------------------------------------------
# Before and after: PR #24434 and issue #24137


@pytest.fixture(scope="module")
def pruned_24434(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pruned") / "ckpt"
    plan = prune.plan_prune(audit_path(str(EXAMPLES / "nano3-24434-leftover-expert-scales"), "sglang@0.5.11"))
    assert plan.refusal is None and len(plan.drops) == 144
    prune.execute(plan, str(out))
    return out


@pytest.mark.parametrize("reader", loading.READERS)
def test_24434_original_raises_where_audit_says_and_pruned_loads_clean(pruned_24434, reader):
    original = EXAMPLES / "nano3-24434-leftover-expert-scales"
    opts = LoadOptions(device="cpu", reader=reader)
    audit = audit_path(str(original), "sglang@0.5.11")
    before = load_path(str(original), "sglang@0.5.11", opts).report
    assert before.verdict == "crash" and before.exit_code() == 1
    assert before.crash.tensor == audit.crash.tensor == "backbone.layers.1.mixer.experts.0.down_proj.input_scale"
    assert before.crash.error == audit.crash.error == "KeyError: 'model.layers.1.mixer.experts.w2_input_scale'"
    # how far it got: every tensor before the crash in stream order, nothing after
    stream = [r.tensor.name for r in audit.records]
    upto = stream.index(audit.crash.tensor)
    assert before.crash.tensors_loaded == sum(1 for r in audit.records[:upto] if r.outcome.outcome == "load") > 0
    assert before.crash.bytes_loaded > 0 and before.crash.seconds > 0
    for engine in ("0.5.11", "0.5.12", "0.5.23"):
        after = load_path(str(pruned_24434), f"sglang@{engine}", opts)
        if engine == "0.5.23":
            assert after.report.verdict == "clean" and after.report.exit_code() == 0, engine
            continue
        # ≤0.5.12 MergedColumnParallelLinear.weight_loader_v2 puts the fused in_proj's scalar NVFP4 scales
        # into slot 0 only (tests/test_load_review.py): those, and nothing else, stay partly written
        errors = [f for f in after.report.findings if f.severity == "error"]
        assert after.report.verdict == "incomplete" and errors and {f.code for f in errors} == {"scale-slot0-only"}, (
            engine
        )
        assert all("slot 0 only" in f.message and "0.5.16 and later fill every slot" in f.message for f in errors)
        partial = {p.param.name for p in after.report.params if p.status != "filled" and not p.param.informational}
        assert partial and all(re.search(r"\.mixer\.in_proj\.(input_scale|weight_scale_2)$", n) for n in partial)
    assert_all_checked(after, oracle(pruned_24434, after.tensors))


def test_24137_raises_on_0_5_11_at_the_tensor_sglang_names():
    expected = read_golden(CONFORMANCE / "omni_nvfp4_mixed" / "expected-sglang-0.5.11.json")["crash"]
    for opts in (CPU, LoadOptions(device="cpu", reader="safetensors")):
        r = load_path(str(EXAMPLES / "omni-nvfp4-24137"), "sglang@0.5.11", opts).report
        assert r.verdict == "crash"
        assert (r.crash.tensor, r.crash.error) == (expected["tensor"], expected["error"])
        # the 0.5.11 wrapper buffers: the projector loads before any language-model tensor
        assert 0 < r.crash.tensors_loaded < 20


def test_24137_on_0_5_12_reports_packed_bytes_into_bf16_and_copies_nothing():
    res = load_path(str(EXAMPLES / "omni-nvfp4-24137"), "sglang@0.5.12", CPU)
    r = res.report
    assert r.verdict == "broken" and r.exit_code() == 1 and r.crash is None
    mism = [f for f in r.findings if f.code == "quant-mismatch"]
    assert any("experts" in f.message and "(U8)" in f.message and "bfloat16" in f.message for f in mism)
    w13 = "language_model.model.layers.1.mixer.experts.w13_weight"
    assert res.tensors[w13].dtype == torch.bfloat16 and poison_everywhere(res.tensors[w13])
    status = {p.param.name: p.status for p in r.params}
    assert status[w13] == "unfilled"
    assert {f.code for f in r.findings} >= {"quant-mismatch", "param-unfilled"}


# ---------------------------------------------------------------------------
# What the checks catch


def test_file_samples_are_the_files_bytes_at_each_tensors_first_last_and_middle_elements():
    """The read-back's file side, taken from the headers alone before any plan: for every tensor with data, its
    first k, last k and k seeded middle elements, byte for byte as the file holds them (read here independently)."""
    from nhcheck.dtypes import TORCH_DTYPE
    from nhcheck.load.checks import file_samples

    ckpt = open_local(str(EXAMPLES / "nano3-nvfp4"))
    k = 3
    got = file_samples(ckpt.shards, k)
    tensors = [t for s in ckpt.shards for t in s.tensors]
    assert sum(len(of) for _, of in got.rows.values()) == sum(1 for t in tensors if t.end > t.start) > 2000
    for t in tensors:
        b, of = got.rows[t.shard]
        row = of[t.start]
        es, width = readers.ITEMSIZE[TORCH_DTYPE[t.dtype]], got.width[b]
        n = (t.end - t.start) // es
        rel = got.rel[b][row].tolist()
        assert rel[:k] == [min(i, n - 1) for i in range(k)] and rel[k : 2 * k] == [max(n - 1 - i, 0) for i in range(k)]
        assert all(0 <= r < n for r in rel) and rel[2 * k :] == sorted(rel[2 * k :])
        with open(next(s.path for s in ckpt.shards if s.name == t.shard), "rb") as fh:
            want = b""
            for r in rel:
                fh.seek(t.start + r * es)
                want += fh.read(es)
        row_bytes = bytes(got.data[b][row].tolist())
        assert b"".join(row_bytes[i : i + es] for i in range(0, len(row_bytes), width)) == want, t.name


def test_the_checks_tensor_work_beside_the_readers_runs_on_one_core(monkeypatch):
    """The file samples and the bookkeeping run on the side thread with torch's intra-op threads at one (a
    parallel team would spin beside the reader threads); the caller's own count is left as it was."""
    seen: dict[str, int] = {}
    real_files, real_note, real_merge = run.file_samples, checks.Bookkeeping.add, checks.Bookkeeping.result

    def files(*a):
        seen["files"] = torch.get_num_threads()
        return real_files(*a)

    def note(*a):
        seen["note"] = torch.get_num_threads()
        return real_note(*a)

    def merge(*a):
        seen["merge"] = torch.get_num_threads()
        return real_merge(*a)

    monkeypatch.setattr(run, "file_samples", files)
    monkeypatch.setattr(checks.Bookkeeping, "add", note)
    monkeypatch.setattr(checks.Bookkeeping, "result", merge)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        res = load_path(str(EXAMPLES / "nano3-nvfp4"), "sglang@0.5.23", CPU)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert res.report.verdict == "clean" and seen == {"files": 1, "note": 1, "merge": 1}


def test_misplaced_expert_slice_is_caught_by_read_back(monkeypatch):
    """The executor puts expert 0's bytes into slot 1 and expert 1's into slot 0 of one parameter:
    coverage and bookkeeping are complete, only the memory shows it."""
    apply = readers.apply_placement
    target = "model.layers.1.mixer.experts.w2_weight"
    ops = _plan_ops()

    def swapped(op):
        if op.param == target and op.slot in ("expert 0", "expert 1"):
            return op._replace(start=op.n if op.slot == "expert 0" else 0)
        return op

    def misplace(placement, src, arenas, stream=None, batch=None):  # the read's kernel table not used
        apply(_edited(placement, ops, arenas, swapped), src, arenas, stream)

    monkeypatch.setattr(readers, "apply_placement", misplace)
    r = load_path(str(EXAMPLES / "nano3-nvfp4"), "sglang@0.5.23", CPU).report
    bad = {p.param.name: p for p in r.params if p.mismatches}
    assert set(bad) == {target} and bad[target].status == "filled" and not bad[target].double_writes
    assert not bad[target].poisoned
    assert r.verdict == "broken" and [f.tensor for f in r.findings if f.code == "readback-mismatch"] == [target]


def test_missing_q_block_and_missing_expert_are_partial(tmp_path):
    gone = {"backbone.layers.5.mixer.k_proj.weight", "backbone.layers.3.mixer.experts.7.up_proj.weight"}
    root = nano3_bf16(tmp_path, lambda ts: [t for t in ts if t[0] not in gone])
    res = load_path(str(root), "sglang@0.5.23", CPU)
    r = res.report
    partial = {p.param.name: p for p in r.params if p.status == "partial"}
    assert set(partial) == {"model.layers.5.mixer.qkv_proj.weight", "model.layers.3.mixer.experts.w13_weight"}
    assert partial["model.layers.5.mixer.qkv_proj.weight"].missing == ("shard k",)
    assert partial["model.layers.3.mixer.experts.w13_weight"].missing == ("expert 7",)
    qkv = res.tensors["model.layers.5.mixer.qkv_proj.weight"]
    q_rows = 64  # tiny geometry: 4 heads × 16
    assert poison_everywhere(qkv[q_rows : q_rows + 32]) and not (_bytes(qkv[:q_rows]) == 0xFF).all()
    assert poison_everywhere(res.tensors["model.layers.3.mixer.experts.w13_weight"][7])
    assert r.verdict == "incomplete" and r.exit_code() == 1


def test_lost_write_leaves_poison_that_is_caught(monkeypatch):
    """The loader claims a write that never reached memory: coverage says filled, the memory says poison."""
    apply = readers.apply_placement
    target = "model.layers.0.mixer.in_proj.weight"
    ops = _plan_ops()
    monkeypatch.setattr(
        readers,
        "apply_placement",
        lambda placement, src, arenas, stream=None, batch=None: apply(  # the read's kernel table not used
            _edited(placement, ops, arenas, lambda op: None if op.param == target else op), src, arenas, stream
        ),
    )
    r = load_path(str(EXAMPLES / "nano3-nvfp4"), "sglang@0.5.23", CPU).report
    p = next(p for p in r.params if p.param.name == target)
    assert p.status == "filled" and p.poisoned > 0 and p.mismatches > 0
    codes = {f.code for f in r.findings if f.tensor == target}
    assert codes == {"poison-left", "readback-mismatch"} and r.verdict == "broken"


def test_unfilled_parameter_stays_poisoned_and_fails(tmp_path):
    root = nano3_bf16(tmp_path, lambda ts: [t for t in ts if t[0] != "backbone.layers.0.mixer.D"])
    res = load_path(str(root), "sglang@0.5.23", CPU)
    assert poison_everywhere(res.tensors["model.layers.0.mixer.D"])
    assert [(f.code, f.tensor) for f in res.report.findings if f.severity == "error"] == [
        ("param-unfilled", "model.layers.0.mixer.D")
    ]


def test_double_write_is_reported(tmp_path):
    """``model.…`` names pass the replay unchanged, so this checkpoint writes ``D`` twice."""
    root = nano3_bf16(tmp_path, lambda ts: ts + [("model.layers.0.mixer.D", "BF16", [8])])
    r = load_path(str(root), "sglang@0.5.23", CPU).report
    assert [(f.code, f.tensor) for f in r.findings if f.severity == "error"] == [
        ("double-write", "model.layers.0.mixer.D")
    ]
    assert r.verdict == "broken"


def test_shape_mismatch_is_refused_not_copied(tmp_path):
    def edit(ts):
        return [(n, d, [s[0], s[1] // 2] if n == "backbone.layers.0.mixer.out_proj.weight" else s) for n, d, s in ts]

    res = load_path(str(nano3_bf16(tmp_path, edit)), "sglang@0.5.23", CPU)
    f = next(f for f in res.report.findings if f.code == "shape-mismatch")
    assert f.tensor == "backbone.layers.0.mixer.out_proj.weight"
    assert poison_everywhere(res.tensors["model.layers.0.mixer.out_proj.weight"])


def test_names_only_manifest_is_a_usage_error(tmp_path):
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["model.embed_tokens.weight"]))
    with pytest.raises(UsageError, match="shapes and dtypes"):
        loading.load_checkpoint(open_local(str(EXAMPLES / "h8b-dense")), None, CPU, manifest_file=str(names))


# ---------------------------------------------------------------------------
# CLI


def invoke(*args: str):
    return CliRunner(env={"COLUMNS": "300"}).invoke(cli, [str(a) for a in args])


def test_cli_json_report():
    res = invoke("load", EXAMPLES / "nano3-nvfp4", "--device", "cpu", "--format", "json", "-q")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    s = d["summary"]
    assert d["schema"] == "nhcheck.load/1" and s["verdict"] == "clean" and d["device"]["name"] == "cpu"
    assert s["tensors_loaded"] == s["tensors"] == 2803 and s["bytes_loaded"] == 2028032
    assert s["params_partial"] == 0 and s["params_unfilled"] == 12 and s["params_unreachable"] == 0
    assert s["poisoned_elements"] == 0 and s["sample_mismatches"] == 0 and s["samples_checked"] > 2803 * 4
    assert s["seconds"] > 0 and s["gb_per_s"] > 0 and s["peak_device_bytes"] is None


def test_cli_reader_sizes_default_to_the_load_options(monkeypatch):
    """Unset, --pinned-mb and --staging-mb are LoadOptions' (what bench/load.py times), and the help says so."""
    seen = []
    real = loading.load_source

    def spy(source, revision, engine, opts, **kw):
        seen.append(opts)
        return real(source, revision, engine, opts, **kw)

    monkeypatch.setattr(loading, "load_source", spy)
    assert invoke("load", EXAMPLES / "nano3-nvfp4", "--device", "cpu", "-q").exit_code == 0
    args = ("--pinned-mb", "64", "--staging-mb", "32")
    assert invoke("load", EXAMPLES / "nano3-nvfp4", "--device", "cpu", "-q", *args).exit_code == 0
    default = loading.LoadOptions()
    assert (seen[0].pinned_bytes, seen[0].staging_bytes) == (default.pinned_bytes, default.staging_bytes)
    assert (seen[1].pinned_bytes, seen[1].staging_bytes) == (64 << 20, 32 << 20)
    help_text = " ".join(invoke("load", "--help").output.split())
    assert f"default {default.pinned_bytes >> 20}: a slot per reader thread" in help_text
    assert f"plus this; default {default.staging_bytes >> 20}" in help_text


def test_cli_crash_table_and_markdown():
    src = EXAMPLES / "nano3-24434-leftover-expert-scales"
    res = invoke("load", src, "--device", "cpu", "--engine", "sglang@0.5.11", "-q")
    assert res.exit_code == 1
    assert "CRASH" in res.stdout and "KeyError: 'model.layers.1.mixer.experts.w2_input_scale'" in res.stdout
    md = invoke("load", src, "--device", "cpu", "--engine", "sglang@0.5.11", "--format", "markdown", "-q")
    assert md.exit_code == 1 and md.stdout.startswith("### nhcheck load:") and "| error | crash |" in md.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")
def test_cli_missing_cuda_is_exit_2_one_line():
    res = invoke("load", EXAMPLES / "h8b-dense", "--device", "cuda")
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr.startswith("nhcheck: error: --device cuda: CUDA is not available") and res.stderr.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")
def test_cli_starting_cuda_early_on_a_machine_without_it_changes_nothing():
    """A fresh CLI process (torch not yet imported) starts the CUDA context in a thread (and the page-cache prefetch
    in another); with no driver or no GPU the thread ends quietly and torch's own answer stands: the same one line,
    exit 2."""
    code = (
        "import atexit, sys, threading\n"
        "started, start = [], threading.Thread.start\n"
        "threading.Thread.start = lambda self: (started.append(self.name), start(self))[1]\n"
        "atexit.register(lambda: print(*started))\n"
        "from nhcheck.cli import main\n"
        "sys.argv = ['nhcheck', 'load', sys.argv[1], '--device', 'cuda']\n"
        "main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(EXAMPLES / "h8b-dense")], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    started = done.stdout.split()
    assert done.returncode == 2 and started[0] == "nhcheck-cuda-start", done.stdout
    assert set(started[1:]) == {"nhcheck-prefetch"} and len(started) - 1 == readers._prefetch_threads()
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("nhcheck: error: --device cuda: CUDA is not available")


def test_starting_cuda_early_is_only_for_a_cuda_device_before_torch(monkeypatch):
    started = []
    monkeypatch.setattr(threading.Thread, "start", lambda self: started.append(self.name))
    for spec in ("cpu", "tpu", "cuda:x", "cuda"):  # torch is imported in this process: CUDA is torch's to start
        loading.start_device(spec)
    monkeypatch.delitem(sys.modules, "torch")
    for spec in ("cpu", "tpu", "cuda:x"):
        loading.start_device(spec)
    assert started == []
    monkeypatch.setattr("atexit.register", lambda fn: None)
    loading.start_device(" cuda:1 ")
    assert started == ["nhcheck-cuda-start"]


def test_cli_bad_device_is_exit_2():
    res = invoke("load", EXAMPLES / "h8b-dense", "--device", "tpu")
    assert res.exit_code == 2 and "expected cpu, cuda or cuda:N" in res.stderr


def test_repo_id_is_downloaded_then_loaded(monkeypatch):
    import huggingface_hub

    seen = {}

    def fake(repo_id, revision=None, allow_patterns=None):
        seen.update(repo=repo_id, revision=revision, patterns=allow_patterns)
        return str(EXAMPLES / "h8b-dense")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    ckpt = open_source("nvidia/Nemotron-H-8B-Base-8K", "main", data=True)
    assert ckpt.source == "nvidia/Nemotron-H-8B-Base-8K" and ckpt.revision == "main"
    assert seen["repo"] == "nvidia/Nemotron-H-8B-Base-8K" and seen["revision"] == "main"
    assert "*.safetensors" in seen["patterns"]
    assert loading.load_checkpoint(ckpt, None, CPU).report.verdict == "clean"


def test_audit_and_cli_import_no_torch():
    code = (
        "import sys, nhcheck.cli, nhcheck.audit, nhcheck.pipeline, nhcheck.load; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------
# On a GPU (run on the device machine: pytest -m cuda tests/test_load.py)


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize(
    "example, engine",
    [
        ("nano3-nvfp4", "0.5.23"),
        ("nano3-bf16", "0.5.11"),
        ("omni-nvfp4-24137", "0.5.23"),
        ("omni-nvfp4-24137", "0.5.12"),
        ("nano3-24434-leftover-expert-scales", "0.5.23"),
    ],
)
@pytest.mark.parametrize(
    "opts",
    [
        LoadOptions(device="cuda"),
        LoadOptions(device="cuda", reader="safetensors"),
        LoadOptions(device="cuda:0", chunk_bytes=1000, pinned_bytes=4000, threads=4, staging_bytes=1),
    ],
    ids=["fast", "safetensors", "ring-reuse"],
)
def test_cuda_matches_cpu_reference(example, engine, opts):
    ref = load_path(str(EXAMPLES / example), f"sglang@{engine}", LoadOptions(device="cpu", reader="safetensors"))
    got = load_path(str(EXAMPLES / example), f"sglang@{engine}", opts)
    r = got.report
    assert r.device.startswith("cuda") and r.device_name and r.peak_device_bytes > 0
    assert r.verdict == ref.report.verdict
    assert all(t.is_cuda for t in got.tensors.values())
    assert_matches_reference(ref, got)


_PRIMARY = """
import ctypes, sys, threading
from nhcheck.load import memory
memory.start_device("cuda")
for t in threading.enumerate():
    if t.name == "nhcheck-cuda-start":
        t.join()
cuda = ctypes.CDLL("libcuda.so.1")
dev, flags, active, ctx, cur = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int(), ctypes.c_void_p(), ctypes.c_void_p()
assert cuda.cuDeviceGet(ctypes.byref(dev), 0) == 0
assert cuda.cuDevicePrimaryCtxGetState(dev, ctypes.byref(flags), ctypes.byref(active)) == 0 and active.value == 1
assert "torch" not in sys.modules
import torch
x = torch.arange(1000, device="cuda").sum().item()
assert cuda.cuCtxGetCurrent(ctypes.byref(cur)) == 0
assert cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) == 0
print(x, cur.value == ctx.value)
"""


@pytest.mark.cuda
@CUDA
def test_cuda_started_early_is_the_context_torch_then_uses():
    """``start_device`` makes the device's primary context before torch is imported, and torch computes in that
    very context (made once, not twice)."""
    done = subprocess.run([sys.executable, "-c", _PRIMARY], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["499500", "True"]


@pytest.mark.cuda
@CUDA
def test_cuda_oracle_and_crash_points(pruned_24434):
    res = load_path(str(EXAMPLES / "omni-nvfp4-24137"), "sglang@0.5.23", LoadOptions(device="cuda"))
    assert res.report.verdict == "clean"
    assert_all_checked(
        res, oracle(EXAMPLES / "omni-nvfp4-24137", {n: t.cpu() for n, t in res.tensors.items()}, "language_model.")
    )
    for example, engine in (("omni-nvfp4-24137", "0.5.11"), ("nano3-24434-leftover-expert-scales", "0.5.11")):
        audit = audit_path(str(EXAMPLES / example), f"sglang@{engine}")
        r = load_path(str(EXAMPLES / example), f"sglang@{engine}", LoadOptions(device="cuda")).report
        assert r.verdict == "crash" and r.crash.tensor == audit.crash.tensor
        assert r.crash.error == audit.crash.error
    assert load_path(str(pruned_24434), "sglang@0.5.23", LoadOptions(device="cuda")).report.verdict == "clean"
    # ≤0.5.12: the fused in_proj's scalar NVFP4 scales fill slot 0 only (tests/test_load_review.py)
    assert load_path(str(pruned_24434), "sglang@0.5.11", LoadOptions(device="cuda")).report.verdict == "incomplete"


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("driver", [True, False], ids=["driver", "torch"])
def test_cuda_readers_stage_through_the_driver_or_torch(monkeypatch, driver):
    """The readers enqueue each staged piece with the driver's calls (the interpreter kept), or torch's where
    libcuda cannot be bound: many small pieces through a few slots each way (event waits between reuses), the
    bytes as the CPU reference's; run from a fresh thread too (the driver needs the context made current)."""
    if not driver:
        monkeypatch.setitem(readers._CACHE, "stager", None)
    small = LoadOptions(device="cuda", chunk_bytes=4096, pinned_bytes=3 * 4096, staging_bytes=2 * 4096, threads=3)
    ref = load_path(str(EXAMPLES / "nano3-nvfp4"), "sglang@0.5.23", LoadOptions(device="cpu", reader="safetensors"))
    with ThreadPoolExecutor(1) as pool:
        got = pool.submit(load_path, str(EXAMPLES / "nano3-nvfp4"), "sglang@0.5.23", small).result()
    assert (readers._CACHE["stager"] is not None) == driver
    assert got.report.verdict == "clean" == ref.report.verdict
    assert_matches_reference(ref, got)


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("switch", ["KERNEL", "DRIVER_COPIES"], ids=["per-range", "views"])
def test_cuda_placement_fallbacks_match_the_reference(monkeypatch, switch):
    """Where the kernel cannot be had, each staged byte range goes to the driver on its own (``KERNEL`` off);
    without driver copies, through tensor views (``DRIVER_COPIES`` off): the same bytes either way."""
    monkeypatch.setattr(readers, switch, False)
    ref = load_path(str(EXAMPLES / "nano3-nvfp4"), "sglang@0.5.23", LoadOptions(device="cpu", reader="safetensors"))
    got = load_path(str(EXAMPLES / "nano3-nvfp4"), "sglang@0.5.23", LoadOptions(device="cuda", chunk_bytes=1 << 16))
    assert got.report.verdict == "clean" == ref.report.verdict
    assert_matches_reference(ref, got)


#: cudaErrorHostMemoryAlreadyRegistered
ALREADY_REGISTERED = 712


@pytest.mark.cuda
@CUDA
def test_cuda_ring_is_registered_page_locked_in_parts_and_released():
    dev = torch.device("cuda", 0)
    size = 2 * readers._PIN_PART + 12345
    ring, parts = readers._pin(torch, size, dev)
    cudart = torch.cuda.cudart()

    def register_again(o: int, n: int) -> int:
        """Register a part once more, from a thread of its own: a failed call leaves its error as the calling
        thread's last CUDA error, which torch's next call in that thread would raise."""
        with ThreadPoolExecutor(1) as pool:
            return int(pool.submit(cudart.cudaHostRegister, ring.data_ptr() + o, n, 0).result())

    # torch's is_pinned() knows only its own allocator's blocks (False here on torch 2.11): the driver is asked
    # instead, and registering a part a second time fails (cudaErrorHostMemoryAlreadyRegistered) while it is pinned
    assert parts and ring.numel() == size and ring.data_ptr() % 4096 == 0
    for o, n in parts:
        assert register_again(o, n) == ALREADY_REGISTERED, o
    assert [o for o, _ in parts] == [0, readers._PIN_PART, 2 * readers._PIN_PART] and sum(n for _, n in parts) == size
    ring.random_(0, 256, generator=torch.Generator().manual_seed(0))
    stream = torch.cuda.Stream(dev)
    with torch.cuda.stream(stream):  # a copy per part, as a load copies a slot (never across two parts)
        got = [ring[o : o + n].to(dev, non_blocking=True) for o, n in parts]
    stream.synchronize()
    assert torch.equal(torch.cat(got).cpu(), ring)
    readers._unpin(torch, ring, parts)
    for o, n in parts:  # released: each part registers afresh
        assert int(cudart.cudaHostRegister(ring.data_ptr() + o, n, 0)) == 0, o
        assert int(cudart.cudaHostUnregister(ring.data_ptr() + o)) == 0, o


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("chunk", [8192, 5000])
def test_cuda_ring_slots_never_straddle_two_registrations(monkeypatch, chunk):
    """A copy from host memory spanning two ``cudaHostRegister`` registrations fails ("invalid argument": H100,
    driver 580, 2026-12-06). With parts of 3 pages, slots of 2 pages (8,192-byte reads) or of 5,000 bytes would
    straddle them; each part holds whole page-aligned slots instead, and the load lands every byte."""
    monkeypatch.setattr(readers, "_PIN_PART", 3 * 4096)
    monkeypatch.setattr(readers, "_CACHE", {})
    example = str(EXAMPLES / "nano3-nvfp4")
    ref = load_path(example, "sglang@0.5.23", LoadOptions(device="cpu", reader="safetensors"))
    try:
        got = load_path(example, "sglang@0.5.23", LoadOptions(device="cuda", chunk_bytes=chunk, pinned_bytes=9 * chunk))
        parts = readers._CACHE["ring_parts"]
        assert len(parts) > 1 and {n for _, n in parts[:-1]} == {8192}
    finally:
        if "ring" in readers._CACHE:
            readers._unpin(torch, readers._CACHE["ring"], readers._CACHE["ring_parts"])
    assert got.report.verdict == ref.report.verdict == "clean"
    assert_matches_reference(ref, got)


@pytest.mark.cuda
@CUDA
def test_cuda_lost_write_caught(monkeypatch):
    apply = readers.apply_placement
    target = "model.layers.1.mixer.experts.w13_weight"
    ops = _plan_ops()

    def lost(op):
        return None if op.param == target and op.slot == "expert 4" else op

    monkeypatch.setattr(
        readers,
        "apply_placement",
        lambda placement, src, arenas, stream=None, batch=None: apply(  # the read's kernel table not used
            _edited(placement, ops, arenas, lost), src, arenas, stream
        ),
    )
    r = load_path(str(EXAMPLES / "nano3-nvfp4"), "sglang@0.5.23", LoadOptions(device="cuda")).report
    p = next(p for p in r.params if p.param.name == target)
    assert p.status == "filled" and p.poisoned > 0 and p.mismatches > 0 and r.verdict == "broken"


# ---------------------------------------------------------------------------
# Loader semantics checked against SGLang's own weight loaders, per release: each test names the SGLang
# function whose behaviour it pins (read in the 0.5.11 and 0.5.23 wheels).
MAMBA_QUANT = "model.layers.0.mixer.in_proj"  # layer 0 is not in the Nano-3 exclude list: quantized in_proj


def _file_scalar(root: Path, name: str) -> torch.Tensor:
    for f in sorted(root.glob("*.safetensors")):
        t = load_file(str(f))
        if name in t:
            return t[name]
    raise KeyError(name)


def _quant(algo: str) -> dict:
    q = copy.deepcopy(generate.nano3_tiny_quant())
    q["quantization"]["quant_algo"] = algo
    q["quantization"].pop("kv_cache_quant_algo", None)
    return q


def _ckpt(tmp_path: Path, algo: str) -> Path:
    c = generate.nano3_tiny_config(quantized=True)
    q = _quant(algo)
    return write(tmp_path, generate.nemotron_h_tensors(c, q), c, q)


# ---------------------------------------------------------------------------
# Mamba in_proj: a MergedColumnParallelLinear (5 logical partitions z, x, B, C, dt) whose weight
# is fused in the checkpoint, so NemotronH's default branch calls its loader with no shard id.
# A scalar per-tensor scale (PerTensorScaleParameter of shape (5,)) then lands:
#   0.5.11/0.5.12 MergedColumnParallelLinear.weight_loader_v2 → load_merged_column_weight(shard_id=0): slot 0 only;
#   0.5.23        MergedColumnParallelLinear.weight_loader_v2 → every slot ("Fill every logical slot");
#   0.5.23 W4A16  (ModelOptNvFp4A16LinearMethod is not in WEIGHT_LOADER_V2_SUPPORTED) → weight_loader →
#                 adjust_scalar_to_fused_array(param, w, 0): slot 0 only.


@pytest.mark.parametrize("engine", ["0.5.11", "0.5.12"])
def test_nvfp4_in_proj_scalar_scales_fill_only_slot_0_before_0_5_23(engine):
    """ModelOptFp4LinearMethod allocates input_scale/weight_scale_2 with torch.empty; ≤0.5.12 writes
    slot 0 and leaves 1..4 uninitialised, which process_weights_after_loading then reduces with max()."""
    root = EXAMPLES / "nano3-nvfp4"
    res = load_path(str(root), f"sglang@{engine}", CPU)
    r = res.report
    for suffix in ("input_scale", "weight_scale_2"):
        name = f"{MAMBA_QUANT}.{suffix}"
        got = res.tensors[name]
        assert got.shape == (5,)
        want = _file_scalar(root, name.replace("model.", "backbone.", 1)).reshape(1)
        assert torch.equal(got[:1], want.to(got.dtype)), name
        assert poison_everywhere(got[1:]), name
        p = next(p for p in r.params if p.param.name == name)
        assert p.status == "partial" and p.written == 1 and p.missing == ("elements 1..4",)
    partial = [f for f in r.findings if f.code == "scale-slot0-only"]
    assert partial and all(f.severity == "error" and f"sglang {engine} writes" in f.message for f in partial)
    assert r.verdict == "incomplete"


def test_nvfp4_in_proj_scalar_scales_fill_every_slot_on_0_5_23():
    root = EXAMPLES / "nano3-nvfp4"
    res = load_path(str(root), "sglang@0.5.23", CPU)
    assert res.report.verdict == "clean"
    for suffix in ("input_scale", "weight_scale_2"):
        name = f"{MAMBA_QUANT}.{suffix}"
        want = _file_scalar(root, name.replace("model.", "backbone.", 1))
        assert torch.equal(res.tensors[name], want.reshape(1).expand(5)), name


@pytest.mark.parametrize("engine, every_slot", [("0.5.11", False), ("0.5.12", False), ("0.5.23", True)])
def test_fp8_in_proj_scalar_scales_slot_0_keeps_the_engine_sentinel_elsewhere(tmp_path, engine, every_slot):
    """ModelOptFp8LinearMethod fills weight_scale/input_scale with finfo(float32).min; ≤0.5.12 loads the
    scalar into slot 0 and requantize_with_max_scale treats the sentinel as "fused in checkpoint":
    by design, so the untouched slots are reported as information, not as an error."""
    root = _ckpt(tmp_path, "FP8")
    res = load_path(str(root), f"sglang@{engine}", CPU)
    r = res.report
    for suffix in ("input_scale", "weight_scale"):
        name = f"{MAMBA_QUANT}.{suffix}"
        got = res.tensors[name]
        want = _file_scalar(root, name.replace("model.", "backbone.", 1)).reshape(1).to(got.dtype)
        if every_slot:
            assert torch.equal(got, want.expand(5)), name
        else:
            assert torch.equal(got[:1], want) and poison_everywhere(got[1:]), name
            p = next(p for p in r.params if p.param.name == name)
            assert p.status == "partial" and p.missing == ("elements 1..4",)
    assert not [f for f in r.findings if f.severity == "error"], r.findings
    assert r.verdict == "clean"
    if not every_slot:
        info = [f for f in r.findings if f.code == "param-partial"]
        assert info and all(f.severity == "info" and "finfo" in f.message for f in info)


def test_w4a16_in_proj_weight_scale_2_fills_only_slot_0_on_0_5_23(tmp_path):
    """ModelOptNvFp4A16LinearMethod is loaded by the v1 MergedColumnParallelLinear.weight_loader:
    a fused-in-checkpoint scalar goes through adjust_scalar_to_fused_array(param, w, 0)."""
    root = _ckpt(tmp_path, "W4A16_NVFP4")
    res = load_path(str(root), "sglang@0.5.23", CPU)
    name = f"{MAMBA_QUANT}.weight_scale_2"
    got = res.tensors[name]
    want = _file_scalar(root, name.replace("model.", "backbone.", 1)).reshape(1)
    assert torch.equal(got[:1], want) and poison_everywhere(got[1:])
    p = next(p for p in res.report.params if p.param.name == name)
    assert p.status == "partial" and p.missing == ("elements 1..4",)
    assert res.report.verdict == "incomplete"
    slot0 = [f for f in res.report.findings if f.code == "scale-slot0-only"]
    assert slot0 and all("v1 weight_loader on every version" in f.message for f in slot0)
    # the non-fused linears (RowParallelLinear out_proj) still take the scalar into their one slot
    out = res.tensors["model.layers.0.mixer.out_proj.weight_scale_2"]
    assert out.shape == (1,) and not poison_everywhere(out)


# ---------------------------------------------------------------------------
# One-element scales of rank > 1. FusedMoE's _load_single_value / _load_per_tensor_weight_scale
# assign ``param[e] = w`` (any one-element tensor broadcasts), and default_weight_loader fills a
# one-element parameter from any one-element tensor; but the linear loaders only reshape a 0-d
# scale to (1,) and then assert equal shapes (ColumnParallelLinear/RowParallelLinear/
# ReplicatedLinear.weight_loader(_v2), PerTensorScaleParameter._load_into_shard_id asserts
# ``loaded_weight.shape[0] == 1`` and compares ``loaded_weight[0]`` with the 0-d slot).


def _reshape_scales(tensors, names, shape):
    return [(n, d, list(shape) if n in names else s) for n, d, s in tensors]


def test_rank_2_one_element_linear_scale_is_refused_not_copied(tmp_path):
    c = generate.nano3_tiny_config(quantized=True)
    q = _quant("FP8")
    q["quantization"]["exclude_modules"] = [
        e for e in q["quantization"]["exclude_modules"] if not e.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))
    ]
    bad = {
        "backbone.layers.0.mixer.out_proj.weight_scale",  # RowParallelLinear: (1,) slot
        "backbone.layers.5.mixer.k_proj.input_scale",
    }  # QKVParallelLinear: slot k of (3,)
    tensors = generate.nemotron_h_tensors(c, q)
    assert bad <= {n for n, _, _ in tensors}
    root = write(tmp_path, _reshape_scales(tensors, bad, (1, 1)), c, q)
    r = load_path(str(root), "sglang@0.5.23", CPU).report
    refused = [f for f in r.findings if f.code == "shape-mismatch"]
    assert refused and all(f.tensor in bad and f.severity == "error" for f in refused)
    assert r.verdict == "broken"
    by = {p.param.name: p for p in r.params}
    assert by["model.layers.0.mixer.out_proj.weight_scale"].status == "unfilled"
    assert by["model.layers.5.mixer.qkv_proj.input_scale"].missing == ("shard k",)


def test_rank_2_one_element_expert_scale_still_lands_in_its_slot(tmp_path):
    c = generate.nano3_tiny_config(quantized=True)
    q = _quant("FP8")
    tensors = generate.nemotron_h_tensors(c, q)
    name = "backbone.layers.1.mixer.experts.0.down_proj.input_scale"
    assert name in {n for n, _, _ in tensors}
    root = write(tmp_path, _reshape_scales(tensors, {name}, (1, 1)), c, q)
    res = load_path(str(root), "sglang@0.5.23", CPU)
    assert not [f for f in res.report.findings if f.code == "shape-mismatch"]
    got = res.tensors["model.layers.1.mixer.experts.w2_input_scale"][0]
    assert torch.equal(got.reshape(1), _file_scalar(root, name).reshape(1))


def test_audit_flags_the_rank_2_linear_scale_from_headers_alone(tmp_path):
    """The header replay agrees with the load: the same [1, 1] linear scales are shape mismatches,
    the expert one is not."""
    from nhcheck.pipeline import audit_path

    c = generate.nano3_tiny_config(quantized=True)
    q = _quant("FP8")
    q["quantization"]["exclude_modules"] = [
        e for e in q["quantization"]["exclude_modules"] if not e.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))
    ]
    bad = {"backbone.layers.0.mixer.out_proj.weight_scale", "backbone.layers.5.mixer.k_proj.input_scale"}
    expert = "backbone.layers.1.mixer.experts.0.down_proj.input_scale"
    tensors = _reshape_scales(generate.nemotron_h_tensors(c, q), bad | {expert}, (1, 1))
    rep = audit_path(str(write(tmp_path, tensors, c, q)), "sglang@0.5.23")
    flagged = [f for f in rep.findings if f.code == "shape-mismatch"]
    text = " ".join(f.message + " " + (f.tensor or "") for f in flagged)
    assert flagged and "reshapes only a 0-d scale" in text and rep.verdict == "broken"
    assert "out_proj" in text and "k_proj" in text and "experts" not in text


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float8_e4m3fn", "uint8"])
def test_poison_scan_finds_one_element_left_anywhere(monkeypatch, dtype):
    """The first pass (any poison at all?) and the count agree on every slice boundary: one poisoned
    element left in the first, a middle or the last slice is found and counted, none is not; the sliced first
    pass too, which CUDA takes for every dtype (the CPU asks a float arena's max instead)."""
    from nhcheck.load import memory

    monkeypatch.setattr(memory, "_SCAN", 64)
    monkeypatch.setattr(memory, "_SCAN_ANY", 96)  # slices that do not divide the arena
    shape = (1000,) if dtype != "uint8" else (1000, 16)
    param = Param("p", shape, dtype, None, "default", (), 0, (), True, False)
    arenas = loading.Arenas((param,), torch.device("cpu"), torch)
    flat = arenas.raw[dtype]
    width = 16 if dtype == "uint8" else flat.numel() // 1000
    flat.zero_()
    assert arenas.poisoned() == {} and not arenas._any_sliced(dtype, flat)
    for at in (0, 137, 999):
        flat.zero_()
        flat[at * width : (at + 1) * width] = 0xFF
        assert arenas.poisoned() == {"p": 16 if dtype == "uint8" else 1}  # integer storage: bytes of the run
        assert arenas._any_sliced(dtype, flat)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_poison_scan_counts_no_other_nan_or_infinity(dtype):
    """On the CPU the first pass asks a float arena's max, which any NaN makes NaN: a NaN that is not all-ones,
    and infinities, leave the count at zero; one all-ones element beside them is still the one counted."""
    param = Param("p", (1000,), dtype, None, "default", (), 0, (), True, False)
    arenas = loading.Arenas((param,), torch.device("cpu"), torch)
    typed = arenas.typed[dtype]
    typed.zero_()
    typed[3], typed[500], typed[998] = float("nan"), float("inf"), float("-inf")
    assert typed.view(getattr(torch, f"int{typed.element_size() * 8}"))[3] != -1  # torch's NaN is not all-ones
    assert arenas.poisoned() == {}
    arenas.raw[dtype][7 * typed.element_size() : 8 * typed.element_size()] = 0xFF
    assert arenas.poisoned() == {"p": 1}


@pytest.mark.cuda
@CUDA
def test_cuda_poison_scan_by_kernel_answers_as_torchs_scan():
    """``kernel.find_poison`` (one launch an arena, ``Arenas.find_poison(finder)``) finds what torch's scan finds, in
    arenas of every kind side by side: one all-ones element at the start, in the middle and after the last whole
    16 bytes (sizes that leave such a tail), a 16-byte run of 0xFF in integer storage; and not a NaN that is not
    all-ones, a run of 15 bytes, or 16 bytes of 0xFF that straddle two runs."""
    from nhcheck.load import kernel

    device = torch.device("cuda")
    kinds = {"bfloat16": (1001,), "float32": (1001,), "float16": (7,), "float8_e4m3fn": (1001,), "uint8": (63, 16)}
    params = tuple(Param(d, shape, d, None, "default", (), 0, (), True, False) for d, shape in kinds.items())
    arenas = loading.Arenas(params, device, torch)
    with torch.cuda.device(device):
        finder = kernel.Kernel.load()
    assert isinstance(finder, kernel.Kernel), finder

    def by_kernel() -> dict[str, int]:
        return arenas.poisoned(arenas.find_poison(finder))

    for raw in arenas.raw.values():
        raw.zero_()
    assert by_kernel() == arenas.poisoned() == {}
    for dtype, raw in arenas.raw.items():
        width = 16 if dtype == "uint8" else readers.ITEMSIZE[dtype]
        n = raw.numel() // width
        for at in (0, n // 2, n - 1):
            raw.zero_()
            raw[at * width : (at + 1) * width] = 0xFF
            want = {dtype: 16 if dtype == "uint8" else 1}
            assert by_kernel() == arenas.poisoned() == want, (dtype, at)
        raw.zero_()
        if dtype == "uint8":
            raw[16:31] = 0xFF  # 15 bytes
            raw[40:56] = 0xFF  # 16 bytes across two runs
        else:
            arenas.typed[dtype][n // 3] = float("nan")  # torch's NaN: not all-ones
        assert by_kernel() == arenas.poisoned() == {}, dtype
        raw.zero_()


def test_a_range_past_its_arena_or_its_read_fails_before_any_byte_is_placed():
    """``compile_cut`` checks every row against its arena's and its read's bounds: a wrong offset is an internal
    error naming the op, raised before the placement, never a write past an arena."""
    plan, spans, reads, cuts, whole = _nano_cuts()
    arenas = loading.Arenas(plan.params, torch.device("cpu"), torch)
    j, cut = next((j, cut) for j, cut in sorted(cuts.items()) if cut.rows)
    size = reads[j].end - reads[j].start
    assert readers.compile_cut(cut, arenas, size).copies  # as planned: within bounds
    dtype, rows = next(iter(cut.rows.items()))
    so, do, n, idx = rows[-1]
    limit = arenas.raw[dtype].numel()
    for bad in ((so, limit - n + 1, n, idx), (size - n + 1, do, n, idx), (-1, do, n, idx), (so, -1, n, idx)):
        planted = readers.Cut({**cut.rows, dtype: [*rows[:-1], bad]}, cut.others, cut.parts)
        with pytest.raises(RuntimeError, match=rf"placement out of bounds: .* \(op {idx}\)"):
            readers.compile_cut(planted, arenas, size)


def test_overlap_is_an_end_past_the_next_start_in_the_arena():
    """Ranges that touch do not overlap; one byte in common does, whatever order the ranges come in."""

    def c(*spans):
        at = tuple(range(len(spans)))
        return readers.Copies("u8", at, tuple(d for d, _ in spans), tuple(n for _, n in spans), at)

    assert not readers._overlap(c()) and not readers._overlap(c((5, 10)))
    assert not readers._overlap(c((20, 5), (0, 10), (10, 10)))  # back to back, given out of order
    assert readers._overlap(c((20, 5), (0, 11), (10, 10)))  # [0, 11) and [10, 20) share byte 10
    assert readers._overlap(c((0, 30), (10, 5)))  # one inside another
    assert readers._overlap(c((7, 1), (7, 1)))  # the same byte twice


def test_kernel_table_places_what_the_views_place(monkeypatch):
    """The kernel path's table, run on the host: a stand-in for ``place_ranges`` copies each row it is
    handed (source offset in the staged read, destination address, bytes), as the kernel's thread blocks
    do on a GPU; the arenas must end byte for byte as the views path leaves them. Small chunks, so ranges
    are cut into several rows; a read whose ranges overlap in the arenas keeps the range-by-range path."""
    import ctypes

    from nhcheck.load import kernel

    monkeypatch.setattr(kernel, "CHUNK", 256)
    plan, spans, reads, cuts, whole = _nano_cuts()
    rows_placed: list[int] = []
    nranges: list[int] = []

    class StandIn:
        def place(self, rows_ptr, nrows, chunks, src_ptr, stream):
            rows = (ctypes.c_uint64 * (4 * nrows)).from_address(rows_ptr)
            blocks = 0
            for i in range(nrows):
                so, dst, n, first = rows[4 * i : 4 * i + 4]
                assert n > 0 and first == blocks  # the kernel's search needs the first chunks in order
                for off in range(0, n, kernel.CHUNK):  # one thread block a chunk
                    ctypes.memmove(dst + off, src_ptr + so + off, min(kernel.CHUNK, n - off))
                    blocks += 1
            assert blocks == chunks
            rows_placed.append(blocks)

    monkeypatch.setattr(kernel.Kernel, "load", staticmethod(lambda: StandIn()))
    monkeypatch.delitem(readers._CACHE, ("kernel", "cpu"), raising=False)

    def placed(use_kernel: bool, overlap: int | None = None):
        arenas = loading.Arenas(plan.params, torch.device("cpu"), torch)
        placements = {
            j: readers.compile_cut(cut, arenas, reads[j].end - reads[j].start) for j, cut in sorted(cuts.items())
        }
        if overlap is not None:  # the read's first range written twice: a double write
            p = placements[overlap]
            c = p.copies[0]
            dup = readers.Copies(
                c.dtype, (c.src[0], *c.src), (c.dst[0], *c.dst), (c.size[0], *c.size), (c.idx[0], *c.idx)
            )
            placements[overlap] = readers.Placement((dup, *p.copies[1:]), p.others)
        nranges.append(sum(len(c.size) for p in placements.values() for c in p.copies))
        ranges = readers.Ranges.open(torch, nranges[-1], torch.device("cpu")) if use_kernel else None
        for j, placement in placements.items():
            batch = ranges.launcher(placement, arenas, 0) if ranges else None
            if use_kernel and placement.copies:
                assert (batch is None) == (j == overlap)
            readers.apply_placement(placement, _staged(spans, reads[j]), arenas, None, batch)
        readers._CACHE.pop(("kernel", "cpu"), None)
        return {d: t.clone() for d, t in arenas.raw.items()}

    views = placed(False)
    by_kernel = placed(True)
    assert views.keys() == by_kernel.keys() and all(torch.equal(views[d], by_kernel[d]) for d in views)
    assert sum(rows_placed) > nranges[-1] > len(plan.ops) // 2  # every range placed, some in several chunks
    rows_placed.clear()
    overlap = next(j for j, cut in sorted(cuts.items()) if cut.rows)
    again = placed(True, overlap)
    assert all(torch.equal(views[d], again[d]) for d in views)


def test_kernel_source_compiles_to_the_shipped_ptx():
    """``kernel.PTX`` is what NVRTC makes of ``kernel.SOURCE`` (where an NVRTC 11.8 is installed), as
    ``python -m nhcheck.load.kernel LIBNVRTC`` prints it."""
    from nhcheck.load import kernel

    libs = (os.path.join(p, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so.11.2") for p in sys.path)
    found = [lib for lib in libs if os.path.exists(lib)]
    if not found:
        pytest.skip("NVRTC 11.8 (pip install nvidia-cuda-nvrtc-cu11==11.8.89) is not installed")
    # in a child process: NVRTC leaves the process's locale codeset at ASCII
    out = subprocess.run([sys.executable, "-m", "nhcheck.load.kernel", found[0]], capture_output=True, check=True)
    assert out.stdout.decode() == kernel.PTX
