"""A small fake Hugging Face Hub on 127.0.0.1 for tests: real HTTP, no network beyond loopback.

Serves what huggingface_hub asks for: model info (``/api/models/{repo}[/revision/{rev}]``), the
tree listing ``snapshot_download`` uses, and ``/{repo}/resolve/{rev}/{file}`` with HEAD, GET, Range
(206 + Content-Range), ETag and X-Repo-Commit. Errors carry the ``X-Error-Code`` header that
``hf_raise_for_status`` classifies on: RepoNotFound, RevisionNotFound, EntryNotFound, and
GatedRepo (401) for a gated repo asked without ``Authorization``. Every response body byte is
counted per path, so tests can prove an audit read only the headers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class Repo:
    """Refs (branch or tag name → commit) and, per commit, the local directory served as its files."""

    refs: dict[str, str]
    trees: dict[str, str]
    gated: bool = False
    files: dict[str, dict[str, str]] = field(default_factory=dict)  # commit -> {repo path: local path}

    def resolve(self, rev: str) -> str | None:
        return self.refs.get(rev) or (rev if rev in self.trees else None)


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """A client that hangs up mid-body (as nhcheck does when a server ignores Range) is not an error."""
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


def commit_sha(*parts: str) -> str:
    return hashlib.sha1("/".join(parts).encode()).hexdigest()


class FakeHub:
    """Start with ``with FakeHub() as hub``; add repos with ``add_repo``; ``hub.url`` is the endpoint."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.served: Counter[str] = Counter()  # "/repo/resolve/rev/file" or API path -> body bytes
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.honour_range = True  # False: answer 200 with the whole file, as some proxies do
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_repo(self, repo_id: str, refs: dict[str, str], gated: bool = False) -> dict[str, str]:
        """Serve each local directory of ``refs`` (ref name → directory) as one commit; returns ref → commit."""
        trees = {commit_sha(repo_id, ref): d for ref, d in refs.items()}
        shas = {ref: commit_sha(repo_id, ref) for ref in refs}
        repo = Repo(shas, trees, gated)
        for sha, d in trees.items():
            repo.files[sha] = {
                os.path.relpath(os.path.join(dp, fn), d): os.path.join(dp, fn)
                for dp, _, fns in os.walk(d)
                for fn in fns
            }
        self.repos[repo_id] = repo
        return shas

    def reset(self) -> None:
        with self._lock:
            self.served.clear()
            self.requests.clear()

    def served_for(self, repo_id: str, suffix: str) -> int:
        """Body bytes served for files of ``repo_id`` whose name ends with ``suffix``."""
        return sum(n for p, n in self.served.items() if p.startswith(f"/{repo_id}/resolve/") and p.endswith(suffix))

    def _count(self, method: str, path: str, rng: str | None, nbytes: int) -> None:
        with self._lock:
            self.requests.append((method, path, rng))
            self.served[path] += nbytes


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self._route(body=False)

        def do_GET(self) -> None:
            self._route(body=True)

        # -- routing ---------------------------------------------------------------------------
        def _route(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?/?$", path)
            if m:
                return self._model_info(path, m.group(1), m.group(2) or "main", body)
            m = re.match(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)/?$", path)
            if m:
                return self._tree(path, m.group(1), m.group(2), body)
            m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
            if m:
                return self._resolve(path, m.group(1), m.group(2), m.group(3), body)
            self._send(path, 404, b"Not Found", {}, body)

        def _repo(self, path: str, repo_id: str, rev: str, body: bool, file_access: bool):
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(path, 404, "RepoNotFound", "Repository not found", body)
                return None, None
            if file_access and repo.gated and not self.headers.get("Authorization"):
                self._error(
                    path,
                    401,
                    "GatedRepo",
                    f"Access to model {repo_id} is restricted. You must have access "
                    "to it and be authenticated to access it. Please log in.",
                    body,
                )
                return None, None
            sha = repo.resolve(rev)
            if sha is None:
                self._error(path, 404, "RevisionNotFound", f"Invalid rev id: {rev}", body)
                return None, None
            return repo, sha

        def _model_info(self, path: str, repo_id: str, rev: str, body: bool) -> None:
            repo, sha = self._repo(path, repo_id, rev, body, file_access=False)
            if repo is None:
                return
            blobs = "blobs=true" in (urlsplit(self.path).query or "").lower()
            siblings = [
                {"rfilename": rel, **({"size": os.path.getsize(p), "blobId": commit_sha(p)} if blobs else {})}
                for rel, p in sorted(repo.files[sha].items())
            ]
            info = {
                "_id": commit_sha(repo_id),
                "id": repo_id,
                "modelId": repo_id,
                "sha": sha,
                "private": False,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "siblings": siblings,
            }
            self._send(path, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)

        def _tree(self, path: str, repo_id: str, rev: str, body: bool) -> None:
            repo, sha = self._repo(path, repo_id, rev, body, file_access=True)
            if repo is None:
                return
            tree = [
                {"type": "file", "oid": commit_sha(p), "size": os.path.getsize(p), "path": rel}
                for rel, p in sorted(repo.files[sha].items())
            ]
            self._send(path, 200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, body)

        def _resolve(self, path: str, repo_id: str, rev: str, name: str, body: bool) -> None:
            repo, sha = self._repo(path, repo_id, rev, body, file_access=True)
            if repo is None:
                return
            local = repo.files[sha].get(name)
            if local is None:
                self._error(
                    path, 404, "EntryNotFound", f'{name} does not exist on "{rev}"', body, {"X-Repo-Commit": sha}
                )
                return
            size = os.path.getsize(local)
            headers = {
                "X-Repo-Commit": sha,
                "ETag": f'"{commit_sha(sha, name, str(size))}"',
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
            }
            start, end, status = 0, size - 1, 200
            rng = self.headers.get("Range") if hub.honour_range else None
            if rng:
                m = _RANGE.match(rng.strip())
                if m is None or int(m.group(1)) >= size:
                    headers["Content-Range"] = f"bytes */{size}"
                    self._send(path, 416, b"", headers, body)
                    return
                start = int(m.group(1))
                end = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            self._send_file(path, status, local, start, end - start + 1, headers, body)

        # -- responses ---------------------------------------------------------------------------
        def _error(
            self, path: str, status: int, code: str, message: str, body: bool, extra: dict[str, str] | None = None
        ) -> None:
            payload = json.dumps({"error": message}).encode()
            self._send(
                path,
                status,
                payload,
                {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message, **(extra or {})},
                body,
            )

        def _send(self, path: str, status: int, payload: bytes, headers: dict[str, str], body: bool) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if body:
                self.wfile.write(payload)
            hub._count(self.command, path, self.headers.get("Range"), len(payload) if body else 0)

        def _send_file(
            self, path: str, status: int, local: str, start: int, length: int, headers: dict[str, str], body: bool
        ) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            sent = 0
            if body:
                with open(local, "rb") as fh:
                    fh.seek(start)
                    try:
                        while sent < length:
                            chunk = fh.read(min(1 << 20, length - sent))
                            if not chunk:
                                break
                            self.wfile.write(chunk)
                            sent += len(chunk)
                    except (BrokenPipeError, ConnectionResetError):
                        self.close_connection = True
            hub._count(self.command, path, self.headers.get("Range"), sent)

    return Handler
