"""A loopback server speaking the parts of the Hugging Face Hub HTTP API that
huggingface_hub 2.4 and moerun use, for tests (point HF_ENDPOINT at `server.url`):

    GET  /api/models/{repo}[/revision/{rev}]      model info: sha, siblings with sizes, lfs
    GET  /api/models/{repo}/tree/{rev}[/{path}]   file listing
    HEAD /{repo}/resolve/{rev}/{file}             ETag, X-Repo-Commit, X-Linked-Size/Etag
    GET  /{repo}/resolve/{rev}/{file}             whole file, or 206 for `Range: bytes=a-b`

Gated repos answer 401 with `X-Error-Code: GatedRepo` without a token; unknown repos 404
with `X-Error-Code: RepoNotFound`. Files can be virtual (a real safetensors header followed
by zeros, never materialised), so header-only repos of 90 GB checkpoints cost nothing.
`cut_after` cuts the next transfers after N bytes; `bytes_sent` and `requests` record traffic.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class File:
    head: bytes  # real bytes
    size: int  # total size; bytes past `head` read as zeros
    sha256: str = ""

    def read(self, start: int, end: int) -> bytes:  # inclusive end
        out = self.head[start : end + 1]
        return out + bytes(end + 1 - start - len(out))


@dataclass
class Repo:
    files: dict[str, File]
    sha: str
    gated: bool = False


def safetensors_header_file(tensors: dict[str, tuple[tuple[int, ...], str]]) -> File:
    """A virtual safetensors file: the real header, then zeros for the data."""
    widths = {"F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "U8": 1, "I8": 1}
    meta, offset = {}, 0
    for name, (shape, dtype) in tensors.items():
        n = widths[dtype]
        for d in shape:
            n *= d
        meta[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header = json.dumps(meta, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    head = struct.pack("<Q", len(header)) + header
    return File(head, len(head) + offset, hashlib.sha256(head + str(offset).encode()).hexdigest())


def real_file(data: bytes) -> File:
    return File(data, len(data), hashlib.sha256(data).hexdigest())


class HubServer:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.bytes_sent = 0
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        self.cut_after: int | None = None  # cut each file transfer after this many bytes
        self.cuts_left = 0
        self.cut_file: str | None = None  # only this file's transfers are cut (None: any)
        self.token = "hf_test_token"
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                server._handle(self, head=True)

            def do_GET(self):
                server._handle(self, head=False)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def add_repo(self, repo_id: str, files: dict[str, File], gated: bool = False) -> Repo:
        sha = hashlib.sha1(repo_id.encode() + b"".join(f.sha256.encode() for f in files.values())).hexdigest()
        self.repos[repo_id] = Repo(files, sha, gated)
        return self.repos[repo_id]

    def add_folder(self, repo_id: str, folder: Path, gated: bool = False) -> Repo:
        return self.add_repo(repo_id, {p.name: real_file(p.read_bytes()) for p in sorted(folder.iterdir()) if p.is_file()}, gated)

    # -- request handling ------------------------------------------------------------------

    def _send(self, h, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False,
              length: int | None = None) -> None:  # fmt: skip
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, str(v))
        h.send_header("Content-Length", str(len(body) if length is None else length))
        h.end_headers()
        if not head and body:
            h.wfile.write(body)
            with self._lock:
                self.bytes_sent += len(body)

    def _error(self, h, status: int, code: str, message: str, head: bool) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(h, status, body, {"X-Error-Code": code, "X-Error-Message": message,
                                     "Content-Type": "application/json"}, head)  # fmt: skip

    def _repo(self, h, repo_id: str, head: bool) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(h, 404, "RepoNotFound", "Repository not found", head)
            return None
        if repo.gated and h.headers.get("authorization") != f"Bearer {self.token}":
            self._error(h, 401, "GatedRepo", "Access to this model is restricted; you must be authenticated", head)
            return None
        return repo

    def _handle(self, h, head: bool) -> None:
        path = h.path.split("?")[0]
        with self._lock:
            self.requests.append(("HEAD" if head else "GET", path, h.headers.get("range")))
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if m:
            repo = self._repo(h, m.group(1), head)
            if repo:
                siblings = [{"rfilename": n, "size": f.size, "blobId": hashlib.sha1(f.sha256.encode()).hexdigest(),
                             "lfs": {"sha256": f.sha256, "size": f.size, "pointerSize": 134}}
                            for n, f in repo.files.items()]  # fmt: skip
                body = json.dumps({"id": m.group(1), "modelId": m.group(1), "sha": repo.sha, "private": False,
                                   "gated": "manual" if repo.gated else False, "disabled": False,
                                   "siblings": siblings, "tags": []}).encode()  # fmt: skip
                self._send(h, 200, body, {"Content-Type": "application/json"}, head)
            return
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
        if m:
            repo = self._repo(h, m.group(1), head)
            if repo:
                body = json.dumps([{"type": "file", "path": n, "size": f.size, "oid": f.sha256[:40],
                                    "lfs": {"oid": f.sha256, "size": f.size, "pointerSize": 134}}
                                   for n, f in repo.files.items()]).encode()  # fmt: skip
                self._send(h, 200, body, {"Content-Type": "application/json"}, head)
            return
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if not m:
            self._error(h, 404, "EntryNotFound", "not found", head)
            return
        repo = self._repo(h, m.group(1), head)
        if repo is None:
            return
        if m.group(2) not in ("main", repo.sha):
            self._error(h, 404, "RevisionNotFound", "Invalid rev id", head)
            return
        f = repo.files.get(m.group(3))
        if f is None:
            self._error(h, 404, "EntryNotFound", "Entry not found", head)
            return
        headers = {"ETag": f'"{f.sha256}"', "X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": f.size,
                   "X-Repo-Commit": repo.sha, "Accept-Ranges": "bytes"}  # fmt: skip
        start, end, status = 0, f.size - 1, 200
        rng = re.fullmatch(r"bytes=(\d+)-(\d*)", h.headers.get("range") or "")
        if rng:
            start = int(rng.group(1))
            end = min(int(rng.group(2)), f.size - 1) if rng.group(2) else f.size - 1
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
        if head:
            self._send(h, 200, b"", headers, head=True, length=f.size)
            return
        body = f.read(start, end)
        with self._lock:
            cut = self.cut_after is not None and self.cuts_left > 0 and len(body) > self.cut_after
            cut = cut and self.cut_file in (None, m.group(3))
            if cut:
                self.cuts_left -= 1
        if not cut:
            self._send(h, status, body, headers)
            return
        # Promise the whole body, send part of it, and drop the connection.
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, str(v))
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body[: self.cut_after])
        h.wfile.flush()
        with self._lock:
            self.bytes_sent += self.cut_after
        h.close_connection = True
        import socket

        h.connection.shutdown(socket.SHUT_RDWR)
