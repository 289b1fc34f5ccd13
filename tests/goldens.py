"""Reading the committed golden data (tests/conformance/): expectation files are stored gzipped."""

from __future__ import annotations

import gzip
import json
from pathlib import Path


def read_golden(path: Path) -> dict:
    """``expected-*.json`` or, as committed, ``expected-*.json.gz`` (the goldens of every release are large)."""
    gz = path.with_name(path.name + ".gz")
    if gz.exists():
        return json.loads(gzip.decompress(gz.read_bytes()))
    return json.loads(path.read_text())
