"""Device memory of a load: the runtime parameters, poisoned, and the one rule that writes into them.

Every parameter of the plan lives in one allocation per dtype (an arena), as a contiguous view
with the engine's shape, filled with a poison pattern before any byte lands; the checks scan
the arenas for poison left behind. ``apply`` is the loader semantics on one destination view,
shared by the one-device load and every tensor-parallel rank. torch is imported inside
functions only.
"""

from __future__ import annotations

import atexit
import ctypes
import sys
import threading
from typing import Any

from nhcheck.dtypes import FLOAT_PARAM, INT_OF_SIZE, ITEMSIZE, numel
from nhcheck.errors import UsageError
from nhcheck.manifest import Param

#: Integer parameters hold any byte legitimately; poison there is a run of this many 0xFF bytes.
_POISON_RUN = 16
#: Elements per slice of the poison count (bounds its temporaries: a bool mask, and the int64 copy the
#: sum of a mask makes, 9 bytes an element).
_SCAN = 1 << 23
#: Elements per slice of the first pass, whether any poison is left at all: a bool mask (and for integer
#: storage its per-run reduction) is all it makes, so eight times as many elements within the same bound.
_SCAN_ANY = _SCAN * 8


def _float_storage(dtype: str) -> bool:
    """Whether poison in ``dtype``'s arena is one all-ones element (a float, float8 included: a NaN no value
    loaded is), not a run of ``_POISON_RUN`` 0xFF bytes (integer storage, where any byte is a legitimate value)."""
    return dtype in FLOAT_PARAM or dtype.startswith("float8")


def word_dtype(torch, dtype: str):
    """The integer torch dtype of ``dtype``'s width: its elements as bits, which any indexing kernel gathers and
    compares (float8 included), and where a NaN equals itself."""
    return getattr(torch, INT_OF_SIZE[ITEMSIZE[dtype]])


def torch_module():
    """torch, imported on first use (nothing ``audit`` imports may pay for it)."""
    import torch

    return torch


def start_device(spec: str) -> None:
    """Begin making ``spec``'s CUDA context now, in a thread, while the main thread imports torch.

    A CLI load otherwise pays, one after the other, for Python importing torch and for the CUDA driver's start
    and the device's primary context. The driver's calls made through ctypes give the interpreter away, so
    here they run beside the import; torch's runtime then takes that primary context as it is (the runtime
    API works in each device's primary context) instead of making it. Nothing is started for any other spec,
    where torch is already imported, or where the driver library is missing: torch then starts CUDA as
    before, and ``resolve_device`` reports what is wrong. The interpreter's exit waits for the thread (a
    driver call cut off by the process's teardown could crash it).
    """
    spec = spec.strip()
    if "torch" in sys.modules or not _is_cuda(spec):
        return
    index = int(spec[5:]) if ":" in spec else 0  # torch's current device in a fresh process
    thread = threading.Thread(target=_primary_context, args=(index,), name="nhcheck-cuda-start", daemon=True)
    thread.start()
    atexit.register(thread.join)


def _is_cuda(spec: str) -> bool:
    """``cuda`` or ``cuda:N``, the CUDA specs ``--device`` takes."""
    return spec == "cuda" or (spec.startswith("cuda:") and spec[5:].isdigit())


def _primary_context(index: int) -> None:
    """The driver started and device ``index``'s primary context retained (kept for the process's life: the
    runtime retains it too); any failure leaves the start to torch."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return
    device, context = ctypes.c_int(), ctypes.c_void_p()
    if cuda.cuInit(0) == 0 and cuda.cuDeviceGet(ctypes.byref(device), index) == 0:
        cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), device)


def resolve_device(spec: str):
    """``cpu``, ``cuda`` or ``cuda:N`` → a torch device; a missing GPU is a usage error (exit 2)."""
    torch = torch_module()
    spec = spec.strip()
    if spec == "cpu":
        return torch.device("cpu")
    if _is_cuda(spec):
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {spec}: CUDA is not available (torch {torch.__version__}); "
                "use --device cpu to check the placement logic without a GPU"
            )
        index = int(spec[5:]) if ":" in spec else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device("cuda", index)
    raise UsageError(f"--device {spec!r}: expected cpu, cuda or cuda:N")


def layout(params: tuple[Param, ...]) -> tuple[dict[str, tuple[str, int]], dict[str, int]]:
    """Where each parameter lives: (dtype arena, first element); and each arena's element count."""
    where: dict[str, tuple[str, int]] = {}
    totals: dict[str, int] = {}
    for p in params:
        off = totals.get(p.dtype, 0)
        where[p.name] = (p.dtype, off)
        totals[p.dtype] = off + numel(p.shape)
    return where, totals


class Arenas:
    """One allocation per dtype, poisoned with 0xFF bytes (NaN in every float format, 255 in uint8).

    Each parameter is a contiguous view with the engine's shape, so placement is the engine's;
    poisoning and the poison scan are one kernel per dtype instead of one per parameter.
    Parameters the engine initialises itself (KV scales at -1, A16 input-scale placeholders at
    1, spec §5.1 quirk 9) get that value instead of poison.
    """

    def __init__(self, params: tuple[Param, ...], device, torch) -> None:
        self.torch = torch
        self.params = {p.name: p for p in params}
        self.where, totals = layout(params)
        self.raw = {
            d: torch.empty(n * ITEMSIZE[d], dtype=torch.uint8, device=device).fill_(0xFF) for d, n in totals.items()
        }
        self.typed = {d: b.view(getattr(torch, d)) for d, b in self.raw.items()}
        for p in params:
            if p.informational:
                self.flat(p.name).fill_(-1.0 if p.name.endswith(("k_scale", "v_scale")) else 1.0)

    def flat(self, name: str):
        dtype, off = self.where[name]
        return self.typed[dtype][off : off + numel(self.params[name].shape)]

    def view(self, name: str, box: tuple[tuple[int, int], ...] = ()):
        """Parameter ``name`` with its shape, or the box ``box`` ((start, end) per dim) of it."""
        v = self.flat(name).view(self.params[name].shape)
        return v[tuple(slice(a, b) for a, b in box)] if box else v

    def tensors(self) -> dict[str, Any]:
        return {n: self.flat(n).view(p.shape) for n, p in self.params.items()}

    def find_poison(self, finder: Any = None):
        """Start the scan that asks, per arena, only whether any poison is left: a device tensor of one flag an
        arena, with no host sync, so the scan runs on the device while the host does other work.

        On CUDA with ``finder`` (a loaded ``kernel.Kernel``) one ``find_poison`` launch per arena, one read of
        every byte; else a mask and its ``any`` (a few bytes of memory traffic per element, where a count also
        writes and reads an int64 per element). None where there is no arena.
        """
        torch = self.torch
        items = list(self.raw.items())
        if not items:
            return None
        if finder is not None and all(r.is_cuda and r.data_ptr() % 16 == 0 for _, r in items):
            device = items[0][1].device
            with torch.cuda.device(device):
                hits = torch.zeros(len(items), dtype=torch.int32, device=device)
                stream = torch.cuda.current_stream(device).cuda_stream
                for i, (dtype, raw) in enumerate(items):
                    lane = ITEMSIZE[dtype] if _float_storage(dtype) else _POISON_RUN
                    finder.find_poison(raw.data_ptr(), raw.numel(), lane, hits.data_ptr() + 4 * i, stream)
            return hits
        return torch.stack([self._any(dtype, raw) for dtype, raw in items])

    def poisoned(self, found: Any = None) -> dict[str, int]:
        """Elements still holding the poison pattern, per parameter: ``found`` (``find_poison``'s flags, started
        earlier; else started now) says which arenas to count in, and their parameters are counted one by one."""
        torch = self.torch
        out: dict[str, int] = {}
        flags = self.find_poison() if found is None else found
        hits = flags.tolist() if flags is not None else []
        for dtype, hit in zip(self.raw, hits, strict=True):
            if not hit:
                continue
            for name, (d, _) in self.where.items():
                if d == dtype:
                    flat = self.flat(name)
                    n = int(self._count(dtype, flat.view(torch.uint8))) if flat.numel() else 0
                    if n:
                        out[name] = n
        return out

    def _any(self, dtype: str, raw):
        """Whether the bytes ``raw`` may hold a poisoned element (a 0-d bool tensor on the device, no host
        sync): exact by the rule of ``_count``, but for floats on the CPU, where it may also say so of other NaNs
        (``_count`` then counts exactly)."""
        torch = self.torch
        if raw.device.type == "cpu" and raw.numel() and _float_storage(dtype):
            # torch's CPU comparisons make their bool masks at about 1 GB/s, its max reductions run at memory speed
            # (dev VM, torch 2.13.0+cpu, 1 GB: eq and any 0.65-1.1 s, amax 0.03-0.07 s). Poison is all-ones: a
            # NaN in every float format, which amax passes on; in a one-byte format, a byte of 255.
            if ITEMSIZE[dtype] == 1:
                return raw.amax() == 0xFF
            return raw.view(getattr(torch, dtype)).amax().isnan()
        return self._any_sliced(dtype, raw)

    def _any_sliced(self, dtype: str, raw):
        """Whether ``raw`` holds a poisoned element, exactly: the words compared with -1 a slice at a time."""
        torch = self.torch
        hits = [torch.zeros((), dtype=torch.bool, device=raw.device)]
        words, run = self._words(dtype, raw)
        step = _SCAN_ANY // (run + 1) if run > 1 else _SCAN_ANY  # mask bytes per row: the words', then the row's
        for i in range(0, words.shape[0], step):
            part = words[i : i + step].eq(-1)
            hits.append((part.all(dim=1) if run > 1 else part).any())
        return torch.stack(hits).any()

    def _words(self, dtype: str, raw):
        """``raw`` as the integer words the poison rule compares with -1, and how many form one element:
        (elements,) words of the float's size, or (runs, 2) int64 words for integer storage."""
        torch = self.torch
        if _float_storage(dtype):
            return raw.view(word_dtype(torch, dtype)), 1
        head = -raw.data_ptr() % 8
        n = max(0, (raw.numel() - head) // _POISON_RUN * _POISON_RUN)
        return raw[head : head + n].view(torch.int64).view(-1, _POISON_RUN // 8), _POISON_RUN // 8

    def _count(self, dtype: str, raw):
        """Poisoned elements in the bytes ``raw`` (a 0-d tensor on the device, no host sync): all-ones
        floats, or 16-byte runs of 0xFF in integer storage. Scanned in slices so the temporaries stay small."""
        torch = self.torch
        total = torch.zeros((), dtype=torch.int64, device=raw.device)
        words, run = self._words(dtype, raw)
        if run == 1:
            for i in range(0, words.numel(), _SCAN):
                total += (words[i : i + _SCAN] == -1).sum()
            return total
        for i in range(0, words.shape[0], _SCAN):
            part = words[i : i + _SCAN]
            hit = part[:, 0] == -1
            for j in range(1, run):
                hit &= part[:, j] == -1
            total += hit.sum() * _POISON_RUN
        return total


def apply(kind: str, dst, x) -> None:
    """Write the typed source ``x`` into the view ``dst`` with the loader semantics of an op's ``kind``:
    copy or cast (``corner`` too: ``dst`` is then the box of the slot the tensor fills, and ``copy_``
    converts any dtype, as the engine's does), one scalar over every element (``broadcast``),
    ``A = -exp(A_log)`` (``mamba_A``)."""
    if kind == "broadcast":
        dst.copy_(x.reshape(1).expand(dst.shape))
        return
    dst.copy_(x.reshape(dst.shape))
    if kind == "mamba_A":
        dst.exp_().neg_()
