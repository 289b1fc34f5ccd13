"""What many test modules share, offered once: the example generator and the common tiny configs.

``examples/generate.py`` (the synthetic Nemotron-H checkpoint writer) and ``tests/corpus/make_corpus.py``
(the hostile-input corpus) are scripts, not packages; their directories are put on ``sys.path`` here,
once, so a test module may ``import generate`` at module level (for parametrization) or take the
``generate`` fixture. The config fixtures are factories: call them with overrides.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
CONFORMANCE = ROOT / "tests" / "conformance"

for _scripts in (EXAMPLES, ROOT / "tests" / "corpus"):
    if str(_scripts) not in sys.path:
        sys.path.insert(0, str(_scripts))

import generate as _generate  # noqa: E402  (examples/generate.py, on the path from the line above)


@pytest.fixture(scope="session")
def generate() -> ModuleType:
    """``examples/generate.py``: tiny and full-size checkpoint layouts, ``write_checkpoint``."""
    return _generate


@pytest.fixture(params=[True, False], ids=["collecting", "not-collecting"])
def collector_setting(request) -> Iterator[bool]:
    """The cyclic collector on (then off) for a test, as a library caller may have set it; the session's after."""
    before = gc.isenabled()
    (gc.enable if request.param else gc.disable)()
    try:
        yield request.param
    finally:
        (gc.enable if before else gc.disable)()


@pytest.fixture
def h8b_cfg() -> Callable[..., dict]:
    """The tiny dense (Nemotron-H 8B-shaped) config of the shipped examples, with overrides."""
    return lambda **over: {**_generate.h8b_tiny_config(), **over}


@pytest.fixture
def nano_cfg() -> Callable[..., dict]:
    """The tiny Nano-3 (MoE) config of the shipped examples; ``nano_cfg(True)`` for the quantized one."""
    return lambda quantized=False, **over: {**_generate.nano3_tiny_config(quantized), **over}


@pytest.fixture
def nano_quant() -> dict:
    """The tiny Nano-3 NVFP4 ``hf_quant_config.json``."""
    return _generate.nano3_tiny_quant()
