"""How to load: the options of ``nhcheck load`` (no torch)."""

from __future__ import annotations

from dataclasses import dataclass

from nhcheck.errors import UsageError

READERS = ("fast", "safetensors")
DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class LoadOptions:
    """How to load. Sizes are bytes; ``threads`` 0 means min(16, the cores the process may use, ``usable_cores``).

    ``chunk_bytes``: one read; ``pinned_bytes``: the host ring those reads land in (by default a slot
    for each of 16 reader threads: a thread without one waits, ``readers.EARLY_SHARE`` says what it cost);
    ``staging_bytes``: device memory for pieces read but not yet placed (at least one read): the
    load needs the parameters plus this on the device, whatever the shard sizes.
    """

    device: str = "cuda"
    dtype: str = "auto"
    reader: str = "fast"
    threads: int = 0
    chunk_bytes: int = 64 << 20
    pinned_bytes: int = 1 << 30
    samples: int = 4
    staging_bytes: int = 1 << 30


#: The defaults, for signatures (a call in a default argument would be made once anyway).
DEFAULT_OPTIONS = LoadOptions()


def check_options(opts: LoadOptions) -> None:
    """A reader or dtype the load does not know is a usage error (exit 2)."""
    if opts.reader not in READERS:
        raise UsageError(f"--reader {opts.reader!r}: expected one of {', '.join(READERS)}")
    if opts.dtype not in DTYPES:
        raise UsageError(f"--dtype {opts.dtype!r}: expected one of {', '.join(DTYPES)}")
