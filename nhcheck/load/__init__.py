"""``nhcheck load``: prove on real hardware that a checkpoint fills the runtime parameters.

The audit says, from headers, what the engine does with every tensor. This package does it:
allocate every runtime parameter of the manifest on the device with the engine's layout
(fused ``qkv_proj``, fused expert tensors, per-expert scale slots, Mamba ``A``), poison the
memory, stream the shard bytes in the engine's order and apply the audit's decisions with the
engine's loader semantics (q/k/v row block, one expert's slice, a scalar scale into its slot or
broadcast over the partitions, ``A = -exp(A_log)``). Where the chosen engine raises, stop
there. Then check the memory itself: coverage of every parameter, poison left behind, and a
read-back sample of every write compared with the bytes in the file (a misplaced slice shows
up there, not in any bookkeeping).

The rooms, in pipeline order:

- ``options``: how to load (``LoadOptions``);
- ``plan``: every copy, decided from the audit before any byte moves (no torch);
- ``memory``: the poisoned parameter arenas on the device and ``apply``, the one write rule;
- ``readers``: the shard bytes on their way (``fast`` and the ``safetensors`` reference);
- ``kernel``: on CUDA, one kernel launch places every byte range of a staged read (and one scans an arena for poison);
- ``checks``: coverage, read-back against the files;
- ``run``: the whole load in order, and its report;
- ``tp``: the same load cut to tensor-parallel ranks (``load --tp N``), sharing all of the above.

Rendering is ``nhcheck.report``'s (``LOAD``, ``TP_LOAD``). torch is imported inside functions
only: nothing ``audit`` imports may pay for it.
"""

from nhcheck.load.memory import Arenas, resolve_device, start_device
from nhcheck.load.options import DTYPES, READERS, LoadOptions
from nhcheck.load.plan import Op, Plan, plan_load, runtime_params, stream_order
from nhcheck.load.run import (
    LoadReport,
    LoadResult,
    ParamLoad,
    load_audited,
    load_checkpoint,
    load_path,
    load_source,
)

__all__ = [
    "DTYPES",
    "READERS",
    "Arenas",
    "LoadOptions",
    "LoadReport",
    "LoadResult",
    "Op",
    "ParamLoad",
    "Plan",
    "load_audited",
    "load_checkpoint",
    "load_path",
    "load_source",
    "plan_load",
    "resolve_device",
    "runtime_params",
    "start_device",
    "stream_order",
]
