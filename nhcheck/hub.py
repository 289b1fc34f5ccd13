"""Hub repo ids: the same ``Checkpoint`` as a local directory, from shard headers fetched over HTTP.

Everything goes through huggingface_hub's own configuration (``HF_ENDPOINT``, ``HF_TOKEN`` or
``hf auth login``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``): nhcheck has no auth code. Small files
(config, quant config, index) come from ``hf_hub_download`` and land in the normal cache. Shard
headers are read with ranged GETs on huggingface_hub's HTTP session and validated by nhcheck's
own parser, because huggingface_hub's metadata API (``get_safetensors_metadata`` and its sharded
variant) hands back re-serialised JSON: it loses the header length and padding that absolute
byte offsets depend on, and it lets duplicate keys, trailing bytes and the like pass unnoticed.
The first range of each shard is sized from the index's tensor names, so one request usually
covers the whole header; a second fetches the rest when it does not. Shards already in the cache
(after ``prune``/``load`` downloaded them) are read locally.

Offline (``HF_HUB_OFFLINE=1`` or no connection) a repo id resolves from the local cache, and
index-listed shards missing there become findings instead of a failed run. ``prune`` and
``load`` need the bytes: ``materialize`` downloads the needed files with ``snapshot_download``.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from urllib.parse import quote

import msgspec

from nhcheck.checkpoint import (
    CONFIG_NAME,
    INDEX_NAME,
    QUANT_NAME,
    Checkpoint,
    cross_check,
    load_json,
    open_local,
    parse_index,
    read_config,
    read_quant_sidecar,
)
from nhcheck.errors import CheckpointError, NhcheckError
from nhcheck.findings import Finding
from nhcheck.safetensors_header import ShardHeader, read_header, read_shard

Progress = Callable[[int, int, str], None]

#: What prune and load need from a repo: the weights, the files that describe them, and the
#: sidecars a served model keeps (tokenizer, generation config, remote code, model card).
DATA_PATTERNS = [
    "*.safetensors",
    INDEX_NAME,
    CONFIG_NAME,
    QUANT_NAME,
    "tokenizer*",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template*",
    "*.py",
    "README.md",
]

#: Bytes per header entry beyond its name: ``"…":{"dtype":"BF16","shape":[2688,1856],"data_offsets":[…,…]},``
#: with ten-digit offsets; plus a fixed allowance for ``__metadata__`` and padding.
_ENTRY_BYTES = 80
_SLACK_BYTES = 4096
#: First range for a shard the index says nothing about (a single ``model.safetensors``).
_FIRST_RANGE = 1 << 16
_WORKERS = 8
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_LOGIN_HINT = "set HF_TOKEN or run `hf auth login`"


def _headers_hint(revision: str | None) -> str:
    """What an audit needs from the Hub is the configs and the shard headers, never the weights."""
    rev = f" --revision {revision}" if revision else ""
    return f"run it once with network access{rev} (nhcheck then fetches only the configs and the shard headers)"


class _Meter:
    """Response body bytes received, summed across the header-fetching threads."""

    def __init__(self) -> None:
        self.total = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.total += n


def open_hub(repo_id: str, revision: str | None = None, progress: Progress | None = None) -> Checkpoint:
    """Read ``repo_id`` at ``revision`` (branch, tag or commit; default ``main``) from shard headers only."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return open_cached(repo_id, revision, progress, "HF_HUB_OFFLINE is set")
    meter = _Meter()
    with hub_errors(repo_id, revision):
        try:
            sha, files = _repo_files(repo_id, revision, meter)
        except _transport_errors() as exc:
            return open_cached(
                repo_id, revision, progress, f"the Hub at {constants.ENDPOINT} cannot be reached ({type(exc).__name__})"
            )
        return _open_remote(repo_id, revision, sha, files, meter, progress)


def open_cached(repo_id: str, revision: str | None, progress: Progress | None, reason: str) -> Checkpoint:
    """The snapshot of ``repo_id`` in the local cache; index-listed shards absent there become warnings."""
    from huggingface_hub import constants, try_to_load_from_cache

    at = f"@{revision}" if revision else ""
    path = try_to_load_from_cache(repo_id, CONFIG_NAME, revision=revision)
    if not isinstance(path, str):
        raise NhcheckError(
            f"{repo_id}{at}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
            f"{reason}; {_headers_hint(revision)}"
        )
    root = os.path.dirname(path)
    if not os.path.exists(os.path.join(root, INDEX_NAME)) and not any(
        fn.endswith(".safetensors") for fn in os.listdir(root)
    ):
        raise NhcheckError(
            f"{repo_id}{at}: no shard headers in the local Hugging Face cache ({root}) and {reason}; "
            f"{_headers_hint(revision)}"
        )
    ckpt = open_local(root, progress)
    if not ckpt.shards:
        raise NhcheckError(
            f"{repo_id}{at}: none of its {len(ckpt.missing_shards)} shards is in the local Hugging Face "
            f"cache ({root}) and {reason}; {_headers_hint(revision)}"
        )
    findings = tuple(
        Finding(
            "warning",
            "shard-not-cached",
            f"shard {f.shard} is listed in the index but not in the local Hugging Face cache ({reason}); "
            "its tensors are not audited",
            shard=f.shard,
        )
        if f.code == "shard-missing"
        else f
        for f in ckpt.findings
    )
    return msgspec.structs.replace(
        ckpt,
        source=repo_id,
        revision=os.path.basename(root),
        bytes_transferred=0,
        findings=findings,
        missing_why=f"not in the local Hugging Face cache ({reason})",
    )


def materialize(repo_id: str, revision: str | None = None, progress: bool = True) -> str:
    """Download what prune and load need into the normal cache (huggingface_hub's progress bars); the snapshot dir."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    silence = not progress and not are_progress_bars_disabled()
    if silence:
        disable_progress_bars()
    try:
        with hub_errors(repo_id, revision):
            root = snapshot_download(repo_id, revision=revision, allow_patterns=DATA_PATTERNS)
    finally:
        if silence:
            enable_progress_bars()
    if not any(fn.endswith(".safetensors") for fn in os.listdir(root)):
        raise NhcheckError(f"{repo_id}: this repo has no safetensors weights (.bin only?); nhcheck reads safetensors")
    return root


@contextmanager
def hub_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one line with a hint (exit 2)."""
    from huggingface_hub import constants, errors
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    IncompleteSnapshotError = getattr(errors, "IncompleteSnapshotError", ())  # huggingface_hub >= 1.x only

    at = f"@{revision}" if revision else ""
    try:
        yield
    except GatedRepoError:
        raise NhcheckError(f"{repo_id}: gated repo; request access on its Hub page, then {_LOGIN_HINT}") from None
    except RepositoryNotFoundError:
        raise NhcheckError(
            f"{repo_id}: repository not found on {constants.ENDPOINT} "
            f"(check the id; if it is private or gated, {_LOGIN_HINT})"
        ) from None
    except RevisionNotFoundError:
        raise NhcheckError(
            f"{repo_id}: revision {revision or 'main'!r} not found; check the revision "
            "(a branch, tag or commit of the repo)"
        ) from None
    except IncompleteSnapshotError as exc:
        raise NhcheckError(f"{repo_id}{at}: {_first_line(exc)}") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        why = (
            "HF_HUB_OFFLINE is set"
            if constants.is_offline_mode()
            else f"the Hub at {constants.ENDPOINT} cannot be reached"
        )
        raise NhcheckError(
            f"{repo_id}{at}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}; "
            f"run once with network access, or `hf download {repo_id}{' --revision ' + revision if revision else ''}`"
        ) from None
    except EntryNotFoundError as exc:
        raise NhcheckError(f"{repo_id}{at}: file not found in the repo: {_first_line(exc)}") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise NhcheckError(f"{repo_id}{at}: the Hub answered HTTP {status}: {_first_line(exc)}") from None
    except _transport_errors() as exc:
        raise NhcheckError(
            f"{repo_id}{at}: lost the connection to {constants.ENDPOINT}: {type(exc).__name__}: {_first_line(exc)}"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The connection-level exception base of huggingface_hub's HTTP client (httpx, or httpx2 in 2.x)."""
    from huggingface_hub.utils import get_session

    package = sys.modules[type(get_session()).__module__.split(".")[0]]
    return (package.TransportError,)


def _repo_files(repo_id: str, revision: str | None, meter: _Meter) -> tuple[str, dict[str, int | None]]:
    """The commit ``revision`` resolves to and the repo's files with their sizes (model-info API)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = f"{constants.ENDPOINT}/api/models/{repo_id}"
    if revision:
        url += f"/revision/{quote(revision, safe='')}"
    r = get_session().get(
        url, headers=build_hf_headers(), params={"blobs": True}, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT
    )
    meter.add(r.num_bytes_downloaded)
    hf_raise_for_status(r)
    try:
        info = r.json()
        sha = info["sha"]
        files = {s["rfilename"]: s.get("size") for s in info["siblings"]}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise NhcheckError(
            f"{repo_id}: {constants.ENDPOINT} gave an unexpected model-info answer (is HF_ENDPOINT a Hugging Face Hub?)"
        ) from None
    if (
        not isinstance(sha, str)
        or not _COMMIT.match(sha)
        or not all(isinstance(k, str) and (v is None or type(v) is int) for k, v in files.items())
    ):
        raise NhcheckError(
            f"{repo_id}: {constants.ENDPOINT} gave an unexpected model-info answer (is HF_ENDPOINT a Hugging Face Hub?)"
        )
    return sha, files


def _open_remote(
    repo_id: str, revision: str | None, sha: str, files: dict[str, int | None], meter: _Meter, progress: Progress | None
) -> Checkpoint:
    top_shards = sorted(n for n in files if "/" not in n and n.endswith(".safetensors"))
    if not top_shards and INDEX_NAME not in files:
        others = sorted(
            {os.path.splitext(n)[1] for n in files if n.endswith((".bin", ".pt", ".pth", ".gguf", ".ckpt"))}
        )
        what = f"{', '.join(others)} only" if others else "no weight files"
        raise NhcheckError(
            f"{repo_id}: this repo has no safetensors weights ({what}); nhcheck reads safetensors "
            "shard headers (look for a safetensors variant of the model)"
        )
    where = f"{repo_id}@{sha[:12]}"
    if CONFIG_NAME not in files:
        raise CheckpointError(f"{where}/{CONFIG_NAME}", "not found; nhcheck needs it to build the runtime manifest")
    fetch = _small_file_fetcher(repo_id, revision, sha, meter)
    root = os.path.dirname(fetch(CONFIG_NAME))
    config = read_config(root)
    if QUANT_NAME in files:
        fetch(QUANT_NAME)
    quant = read_quant_sidecar(root)
    index = None
    shard_names = top_shards
    if INDEX_NAME in files:
        index_path = fetch(INDEX_NAME)
        index = parse_index(index_path, load_json(index_path, "index"))
        shard_names = sorted(set(index["weight_map"].values()))
    missing = [n for n in shard_names if n not in files]
    present = [n for n in shard_names if n in files]
    stray = sorted(set(top_shards) - set(shard_names)) if index is not None else []
    shards = _fetch_headers(repo_id, sha, present, files, _first_ranges(index, present), meter, progress)
    skip = set(shard_names) | {INDEX_NAME}
    sidecars = sorted(n for n in files if n not in skip and not any(p.startswith(".") for p in n.split("/")))
    return Checkpoint(
        source=repo_id,
        root=root,
        config=config,
        hf_quant_config=quant,
        shards=tuple(shards),
        index=index,
        findings=tuple(cross_check(index, shards, missing, stray)),
        sidecars=tuple(sidecars),
        revision=sha,
        bytes_transferred=meter.total,
        missing_shards=tuple(missing),
    )


def _small_file_fetcher(repo_id: str, revision: str | None, sha: str, meter: _Meter) -> Callable[[str], str]:
    """``hf_hub_download`` of one small file at ``revision`` (so the cache learns the ref), counted when not cached."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from tqdm.auto import tqdm

    class Silent(tqdm):  # a few KB per file: a progress bar each would only be noise
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    def fetch(name: str) -> str:
        cached = try_to_load_from_cache(repo_id, name, revision=sha)
        path = hf_hub_download(repo_id, name, revision=revision, tqdm_class=Silent)
        if os.path.basename(os.path.dirname(path)) != sha:
            raise NhcheckError(
                f"{repo_id}: revision {revision or 'main'!r} moved to a new commit during the run; "
                "run again (or pass --revision COMMIT)"
            )
        if not isinstance(cached, str):
            meter.add(os.path.getsize(path))
        return path

    return fetch


def _first_ranges(index: dict | None, shards: list[str]) -> dict[str, int]:
    """Bytes to ask for first per shard: an upper estimate of its header from the index's tensor names."""
    if index is None:
        return {}
    est = {n: 8 + _SLACK_BYTES for n in shards}
    for name, shard in index["weight_map"].items():
        if shard in est:
            est[shard] += len(name.encode("utf-8", "surrogatepass")) + _ENTRY_BYTES
    return est


def _fetch_headers(
    repo_id: str,
    sha: str,
    names: list[str],
    files: dict[str, int | None],
    first: dict[str, int],
    meter: _Meter,
    progress: Progress | None,
) -> list[ShardHeader]:
    """Every shard header, in loader order: read from the cache when the shard is there, else fetched in parallel."""
    from huggingface_hub import hf_hub_url, try_to_load_from_cache

    out: dict[str, ShardHeader] = {}
    remote = []
    for n in names:
        cached = try_to_load_from_cache(repo_id, n, revision=sha)
        if isinstance(cached, str):
            out[n] = read_shard(cached, n)
        else:
            remote.append(n)
    with ThreadPoolExecutor(max_workers=max(1, min(_WORKERS, len(remote)))) as pool:
        jobs = {
            pool.submit(
                _fetch_header, hf_hub_url(repo_id, n, revision=sha), n, first.get(n, _FIRST_RANGE), files[n], meter
            ): n
            for n in remote
        }
        try:
            for done, job in enumerate(as_completed(jobs)):
                out[jobs[job]] = job.result()
                if progress is not None:
                    progress(done, len(remote), jobs[job])
        except BaseException:
            for job in jobs:
                job.cancel()
            raise
    return [out[n] for n in names]


def _fetch_header(url: str, name: str, first: int, listed_size: int | None, meter: _Meter) -> ShardHeader:
    body, total = _get_range(url, 0, first - 1, meter)
    size = total if total is not None else listed_size
    if size is None:
        raise CheckpointError(url, "the server gave no file size (no Content-Range, none in the repo listing)")
    return read_header(_RangeReader(url, body, meter), url, name, size)


class _RangeReader:
    """Just enough of a binary file for ``read_header``: sequential reads, the missing part by ranged GET."""

    def __init__(self, url: str, prefix: bytes, meter: _Meter) -> None:
        self._url = url
        self._buf = prefix
        self._pos = 0
        self._meter = meter

    def read(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._buf):
            more, _ = _get_range(self._url, len(self._buf), end - 1, self._meter)
            self._buf += more
        out = self._buf[self._pos : end]
        self._pos += len(out)
        return out


def _get_range(url: str, start: int, end: int, meter: _Meter) -> tuple[bytes, int | None]:
    """Bytes ``start..end`` (inclusive) of ``url`` and the file size, reading no more than asked for.

    A server that ignores ``Range`` answers 200 with the whole file; the body is then read
    only up to ``end`` and the connection dropped, so a shard is never downloaded by accident.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    headers = {**build_hf_headers(), "Range": f"bytes={start}-{end}", "Accept-Encoding": "identity"}
    with get_session().stream("GET", url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as r:
        if r.status_code == 416:  # asked past the end: an empty or short file
            r.read()
            meter.add(r.num_bytes_downloaded)
            m = _CONTENT_RANGE.match("bytes 0-0/" + r.headers.get("Content-Range", "").rpartition("/")[2])
            return b"", int(m.group(3)) if m and m.group(3) != "*" else None
        if r.status_code >= 400:
            r.read()
            meter.add(r.num_bytes_downloaded)
            hf_raise_for_status(r)
        if r.status_code == 206:
            m = _CONTENT_RANGE.match(r.headers.get("Content-Range", ""))
            if m is None or int(m.group(1)) != start:
                raise CheckpointError(
                    url,
                    f"asked for bytes {start}-{end}, the server answered Content-Range "
                    f"{r.headers.get('Content-Range')!r}",
                )
            total = int(m.group(3)) if m.group(3) != "*" else None
            skip = 0
        else:
            length = r.headers.get("Content-Length", "")
            total = int(length) if length.isdigit() else None
            skip = start
        want = skip + end - start + 1
        buf = bytearray()
        for chunk in r.iter_bytes():
            buf += chunk
            if len(buf) >= want:
                break
        meter.add(r.num_bytes_downloaded)
    return bytes(buf[skip:want]), total
