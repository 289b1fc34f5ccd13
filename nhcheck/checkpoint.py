"""A checkpoint on disk: shards, index, config files, sidecars, and their cross-checks.

Knows nothing about engines. It answers "what tensors are there, where, and in what
order would a loader see them", and reports index/header disagreements as findings
(exit 1) while files that cannot be parsed or paths that escape the checkpoint are
``CheckpointError`` (exit 2).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from itertools import chain
from operator import itemgetter

import msgspec

from nhcheck.errors import CheckpointError
from nhcheck.findings import Finding
from nhcheck.safetensors_header import ShardHeader, TensorInfo, open_regular, read_shard

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
QUANT_NAME = "hf_quant_config.json"


class Checkpoint(msgspec.Struct, frozen=True):
    """Everything nhcheck knows about one checkpoint, read from headers and small files only.

    ``shards`` are in loader order (index-listed files sorted by name); ``tensors()``
    yields in SGLang's stream order: shard by shard, keys sorted as ``safe_open().keys()``
    returns them.
    """

    source: str
    root: str
    config: dict
    hf_quant_config: dict | None
    shards: tuple[ShardHeader, ...]
    index: dict | None
    findings: tuple[Finding, ...] = ()
    sidecars: tuple[str, ...] = ()
    revision: str | None = None
    bytes_transferred: int | None = None
    missing_shards: tuple[str, ...] = ()
    #: Why ``missing_shards`` were not read (``given alone``, ``not in the local Hugging Face cache``):
    #: the report leads with it, since every parameter they fill shows as unfilled.
    missing_why: str = ""

    def tensors(self) -> Iterator[TensorInfo]:
        return chain.from_iterable(shard.by_name for shard in self.shards)

    @property
    def data_bytes(self) -> int:
        return sum(s.data_bytes for s in self.shards)  # each header is validated to cover its data exactly


def load_json(path: str, what: str) -> object:
    """Read a small JSON file; any failure is a one-line CheckpointError naming the file."""
    try:
        with os.fdopen(open_regular(path), "rb") as fh:
            raw = fh.read(64_000_000)
    except FileNotFoundError:
        raise CheckpointError(path, f"{what} not found") from None
    except IsADirectoryError:
        raise CheckpointError(path, f"{what} is a directory") from None
    except OSError as exc:
        raise CheckpointError(path, f"cannot read {what}: {exc.strerror or exc}") from None
    try:
        obj = _loads(raw)
        # A ``\udcff`` escape decodes to a lone surrogate, which no output encoding accepts:
        # refuse it here rather than crash later while printing a name. (A backslash first: one byte is
        # found ten times as fast as two, and 30 MB of index and configs usually hold none.)
        if b"\\" in raw and b"\\u" in raw:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return obj
    except RecursionError:
        raise CheckpointError(path, f"{what} is nested too deeply") from None
    except UnicodeEncodeError:
        raise CheckpointError(path, f"{what} holds a lone UTF-16 surrogate escape (not Unicode)") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(path, f"{what} is not valid JSON: {exc}") from None


def _loads(raw: bytes) -> object:
    """``json.loads(raw.decode("utf-8"))``, in C where msgspec can: it builds the same objects (ints of any size,
    floats correctly rounded, the last of a repeated key) and refuses a superset of what json refuses (NaN,
    1e400), which the standard library then parses or refuses in its own words."""
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return json.loads(raw.decode("utf-8"))


def display_name(name: str) -> str:
    """A file name as text that can be printed and JSON-encoded.

    ``os.listdir`` hands back undecodable bytes as lone surrogates; those become ``\\xff``
    escapes here. The real name is kept wherever a file must be opened.
    """
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")


def safe_member(root: str, name: str, what: str) -> str:
    """Resolve ``name`` inside ``root`` or refuse it, before anything is opened.

    Refuses absolute names, ``..`` components and symlinks whose target lies outside the
    checkpoint: an index from a stranger must not make us read ``/etc/passwd``. The one
    outside place allowed is the Hugging Face cache's ``blobs/`` next to a snapshot
    directory, which is where every file of a cached snapshot links to.
    """
    if not name or "\x00" in name or os.path.isabs(name) or name.startswith(("/", "\\")):
        raise CheckpointError(os.path.join(root, INDEX_NAME), f"{what} {name!r} is an absolute or empty path; refused")
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise CheckpointError(
            os.path.join(root, INDEX_NAME), f"{what} {name!r} escapes the checkpoint directory; refused"
        )
    path = os.path.join(root, name)
    real = os.path.realpath(path)
    if not any(real.startswith(inside + os.sep) for inside in _inside(root)):
        raise CheckpointError(path, f"{what} is a symlink leading outside the checkpoint ({real}); refused")
    return path


def hub_blobs(root: str) -> str | None:
    """The ``blobs/`` directory of the Hugging Face cache repo whose snapshot ``root`` is, else None.

    A cached snapshot's files are links into it, each blob named by its digest (an LFS file's: its sha256).
    """
    real_root = os.path.realpath(root)
    snapshots = os.path.dirname(real_root)
    repo = os.path.dirname(snapshots)
    if os.path.basename(snapshots) == "snapshots" and os.path.basename(repo).startswith("models--"):
        return os.path.join(repo, "blobs")
    return None


def _inside(root: str) -> tuple[str, ...]:
    """Directories a checkpoint member may resolve into: the root, and a cache snapshot's blobs."""
    blobs = hub_blobs(root)
    return (os.path.realpath(root),) if blobs is None else (os.path.realpath(root), blobs)


def read_quant_sidecar(root: str) -> dict | None:
    path = os.path.join(root, QUANT_NAME)
    if not os.path.lexists(path):
        return None
    obj = load_json(safe_member(root, QUANT_NAME, QUANT_NAME), QUANT_NAME)
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"{QUANT_NAME} is not a JSON object")
    return obj


def read_config(root: str) -> dict:
    path = os.path.join(root, CONFIG_NAME)
    if not os.path.exists(path):
        raise CheckpointError(path, "config.json not found; nhcheck needs it to build the runtime manifest")
    obj = load_json(safe_member(root, CONFIG_NAME, CONFIG_NAME), CONFIG_NAME)
    if not isinstance(obj, dict):
        raise CheckpointError(path, "config.json is not a JSON object")
    return obj


def parse_index(path: str, obj: object) -> dict:
    """Validate the shape of ``model.safetensors.index.json``; returns it unchanged."""
    if not isinstance(obj, dict):
        raise CheckpointError(path, "index is not a JSON object")
    wm = obj.get("weight_map")
    # Types counted in C (165k names on Super); JSON makes no str subclasses, so this is isinstance(x, str).
    if not isinstance(wm, dict) or not {*map(type, wm), *map(type, wm.values())} <= {str}:
        raise CheckpointError(path, "index has no weight_map mapping tensor names to shard files")
    md = obj.get("metadata")
    if md is not None and not isinstance(md, dict):
        raise CheckpointError(path, "index metadata is not an object")
    return obj


def cross_check(index: dict | None, shards: list[ShardHeader], missing: list[str], stray: list[str]) -> list[Finding]:
    """Index ↔ header disagreements, each a finding (the files themselves still parse)."""
    out: list[Finding] = []
    for name in missing:
        out.append(
            Finding("error", "shard-missing", f"shard {name} is listed in the index but does not exist", shard=name)
        )
    for name in stray:
        out.append(
            Finding("warning", "shard-stray", f"{name} is not listed in the index; SGLang will not load it", shard=name)
        )
    if index is not None and _index_agrees(index["weight_map"], shards):
        return out + _total_size_findings(index, shards)
    first: dict[str, str] = {}
    dups: dict[str, list[str]] = {}
    for s in shards:  # in C: a name in two shards shows as fewer names than tensors, then the loop below finds it
        first.update(dict.fromkeys(map(_NAME, s.tensors), s.name))
    if len(first) != sum(len(s.tensors) for s in shards):
        first = {}
        for s in shards:
            for t in s.tensors:
                prev = first.setdefault(t.name, s.name)
                if prev != s.name:
                    dups.setdefault(t.name, [prev]).append(s.name)
    for name, files in dups.items():
        out.append(
            Finding(
                "error",
                "tensor-duplicate",
                f"tensor is present in {len(files)} shards ({', '.join(files)}); which copy wins depends on load order",
                shard=files[0],
                tensor=name,
            )
        )
    if index is None:
        return out
    wm: dict[str, str] = index["weight_map"]
    present = {s.name for s in shards}
    if wm != first:  # the common case is exact agreement: one dict comparison
        for name, shard in wm.items():
            where = first.get(name)
            if shard not in present or where == shard or (where is not None and shard in dups.get(name, ())):
                continue  # a missing shard is reported once as shard-missing
            if where is None:
                out.append(
                    Finding(
                        "error",
                        "index-tensor-missing",
                        f"index maps it to {shard} but no shard contains it",
                        shard=shard,
                        tensor=name,
                    )
                )
            else:
                out.append(
                    Finding(
                        "error",
                        "index-wrong-shard",
                        f"index maps it to {shard} but it is in {where}",
                        shard=where,
                        tensor=name,
                    )
                )
        for name, where in first.items():
            if name not in wm:
                out.append(
                    Finding(
                        "warning",
                        "index-tensor-unlisted",
                        f"tensor is in {where} but not in the index weight_map",
                        shard=where,
                        tensor=name,
                    )
                )
    return out + _total_size_findings(index, shards)


def _index_agrees(weight_map: dict[str, str], shards: list[ShardHeader]) -> bool:
    """Whether the index maps exactly the headers' names, each to its shard: the common case, checked in C.

    Exact: when the weight map has as many names as the headers hold tensors and maps every one of them to
    the shard holding it, no name is in two shards (the map gives each one shard) and the map holds no other
    name, so ``cross_check``'s full comparison would find nothing.
    """
    if len(weight_map) != sum(len(s.tensors) for s in shards):
        return False
    for s in shards:
        if len(s.tensors) < 2:  # ``itemgetter`` of one key answers the value itself, not a tuple
            if any(weight_map.get(t.name) != s.name for t in s.tensors):
                return False
            continue
        try:  # every name's shard looked up at once, in C, and counted
            if itemgetter(*map(_NAME, s.tensors))(weight_map).count(s.name) != len(s.tensors):
                return False
        except KeyError:
            return False
    return True


def _total_size_findings(index: dict, shards: list[ShardHeader]) -> list[Finding]:
    total = (index.get("metadata") or {}).get("total_size")
    actual = sum(s.data_bytes for s in shards)  # headers are validated to cover their data exactly
    if isinstance(total, int) and not isinstance(total, bool) and total != actual:
        return [
            Finding(
                "warning",
                "index-total-size",
                f"index metadata.total_size is {total:,} but the shards hold {actual:,} data bytes",
            )
        ]
    return []


_NAME = itemgetter(0)  # TensorInfo.name


def list_sidecars(root: str, skip: set[str]) -> list[str]:
    """Every other regular file of the checkpoint (config, tokenizer, code, README), relative paths."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") or d == ".")
        for fn in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, fn), root)
            if rel in skip or fn.startswith("."):
                continue
            out.append(rel)
    return out


def _index_siblings(root: str, shard: str) -> tuple[str, ...]:
    """The other shards the index beside a single shard lists (none when there is no usable index)."""
    index_path = os.path.join(root, INDEX_NAME)
    if not os.path.isfile(index_path):
        return ()
    try:
        index = parse_index(index_path, load_json(index_path, "index"))
    except CheckpointError:
        return ()  # a single file is audited on its own; a broken index beside it is not its problem
    listed = set(index["weight_map"].values())
    return tuple(sorted(listed - {shard})) if shard in listed else ()


def _names(names: tuple[str, ...] | list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f", … ({len(names)} in all)" if len(names) > limit else "")


def open_local(source: str, progress=None, *, configs_only_ok: bool = False) -> Checkpoint:
    """Read a local directory or single ``.safetensors`` file, headers only.

    ``configs_only_ok``: a directory with ``config.json`` (and a quant config) but no shards and no
    index opens as a checkpoint without tensors, for ``manifest``, which builds from the configs.
    """
    if os.path.isfile(source):
        if not source.endswith(".safetensors"):
            raise CheckpointError(source, "not a directory or a .safetensors file")
        root = os.path.dirname(os.path.abspath(source))
        shard_names = [os.path.basename(source)]
        index = None
        others = _index_siblings(root, shard_names[0])
    elif os.path.isdir(source):
        others = ()
        root = os.path.abspath(source)
        index_path = os.path.join(root, INDEX_NAME)
        if os.path.lexists(index_path):
            index = parse_index(index_path, load_json(safe_member(root, INDEX_NAME, "index"), "index"))
            shard_names = sorted(set(index["weight_map"].values()))
        else:
            index = None
            shard_names = sorted(fn for fn in os.listdir(root) if fn.endswith(".safetensors"))
            if not shard_names and not (configs_only_ok and os.path.exists(os.path.join(root, CONFIG_NAME))):
                raise CheckpointError(root, "no model.safetensors.index.json and no *.safetensors files")
    else:
        raise CheckpointError(source, "no such file or directory")

    config = read_config(root)
    quant = read_quant_sidecar(root)
    shards: list[ShardHeader] = []
    missing: list[str] = []
    for i, name in enumerate(shard_names):
        path = safe_member(root, name, "shard")
        if display_name(name) != name:
            raise CheckpointError(display_name(path), "shard file name is not valid UTF-8; SGLang cannot open it")
        if index is not None and not os.path.lexists(path):
            missing.append(name)
            continue
        if progress is not None:
            progress(i, len(shard_names), name)
        shards.append(read_shard(path, name))
    stray: list[str] = []
    if index is not None:
        listed = set(shard_names)
        stray = sorted(display_name(fn) for fn in os.listdir(root) if fn.endswith(".safetensors") and fn not in listed)
    findings = cross_check(index, shards, missing, stray)
    why = ""
    if others:
        missing = list(others)
        why = f"not given (the index beside {shard_names[0]} lists {len(others) + 1})"
        findings.append(
            Finding(
                "warning",
                "shards-not-given",
                f"{shard_names[0]} was given alone but {INDEX_NAME} beside it lists {len(others)} more shard(s) "
                f"({_names(others)}): their tensors are not audited; audit the directory for the whole checkpoint",
                shard=shard_names[0],
            )
        )
    skip = set(shard_names) | {INDEX_NAME}
    return Checkpoint(
        source=source,
        root=root,
        config=config,
        hf_quant_config=quant,
        shards=tuple(shards),
        index=index,
        findings=tuple(findings),
        sidecars=tuple(list_sidecars(root, skip)),
        missing_shards=tuple(missing),
        missing_why=why,
    )
