"""A loopback server speaking the parts of the Hugging Face Hub HTTP API that
huggingface_hub 2.4 and moerun use, for tests (point HF_ENDPOINT at `server.url`):

    GET  /api/models/{repo}[/revision/{rev}]      model info: sha, siblings with sizes, lfs
    GET  /api/models/{repo}/tree/{rev}[/{path}]   file listing
    HEAD /{repo}/resolve/{rev}/{file}             ETag, X-Repo-Commit, X-Linked-Size/Etag
    GET  /{repo}/resolve/{rev}/{file}             whole file, or 206 for `Range: bytes=a-b`

Gated repos answer 401 with `X-Error-Code: GatedRepo` without a token; unknown repos 404
with `X-Error-Code: RepoNotFound`. Files can be virtual (a real safetensors header followed
by zeros, never materialised), so header-only repos of 90 GB checkpoints cost nothing.
As on the Hub, `.safetensors` / `.model` files are LFS (named by sha256) and the others plain
git blobs (named by git's sha1 of "blob <len>\\0" + bytes). `bytes_sent` and `requests`
record traffic.

Fault switches (tests set them and `reset()` clears them):
    cut_after, cuts_left, cut_file   cut the next `cuts_left` transfers after N bytes
    wrong_bytes                      file names whose bytes are served wrong (right length)
    fail_status, fails_left, fail_path, retry_after
                                     answer the next `fails_left` requests whose path contains
                                     `fail_path` with `fail_status` (500, 429 + Retry-After)
    ignore_range                     answer 200 with the whole file to every Range request
    chunk_delay_s                    sleep between 64 KiB chunks of a file (slow links, races)
    hostile_sha, no_blob_ids         model info with this commit / with no blobId nor lfs
    raw_info                         model info answered with these bytes (malformed JSON)
    extra_bytes                      this many bytes appended to every file body
    hang_path                        requests whose path contains it are read and never answered
                                     (until `reset()` or 120 s), as a stalled Hub does
Hostile file names are just repos added with such names.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote


@dataclass
class File:
    head: bytes  # real bytes
    size: int  # total size; bytes past `head` read as zeros
    sha256: str = ""
    lfs: bool = True  # else a plain git file, named by its git blob id
    git_sha1: str = ""

    def read(self, start: int, end: int) -> bytes:  # inclusive end
        out = self.head[start : end + 1]
        return out + bytes(end + 1 - start - len(out))

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_sha1


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
    # The true sha256 up to 64 MiB (such a file can be pulled and verified); beyond, a
    # stand-in that costs nothing (those repos are for header reads only).
    size = len(head) + offset
    if size <= 1 << 26:
        sha = hashlib.sha256(head + bytes(offset)).hexdigest()
    else:
        sha = hashlib.sha256(head + str(offset).encode()).hexdigest()
    return File(head, size, sha)


def real_file(data: bytes, lfs: bool = True) -> File:
    git = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    return File(data, len(data), hashlib.sha256(data).hexdigest(), lfs, git)


def use_hub(monkeypatch, url: str, folder: Path, **more: str) -> dict[str, str]:
    """Point huggingface_hub and moerun at the Hub at `url`, their caches under `folder`
    (hub/, moerun/), online and without a token, plus `more`; the variables set, as a dict."""
    env = {
        "HF_ENDPOINT": url,
        "HF_HUB_CACHE": str(folder / "hub"),
        "HF_HUB_OFFLINE": "0",
        "HF_TOKEN": "",
        "MOERUN_CACHE": str(folder / "moerun"),
        **more,
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def is_lfs(name: str) -> bool:
    return name.endswith((".safetensors", ".model", ".bin"))


class HubServer:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.bytes_sent = 0
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        self.reset()
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

    def reset(self) -> None:
        """Every fault switch off."""
        self.cut_after: int | None = None  # cut each file transfer after this many bytes
        self.cuts_left = 0
        self.cut_file: str | None = None  # only this file's transfers are cut (None: any)
        self.wrong_bytes: set[str] = set()
        self.fail_status, self.fails_left, self.fail_path = 500, 0, ""
        self.retry_after: str | None = None
        self.ignore_range = False
        self.chunk_delay_s = 0.0
        self.hostile_sha: str | None = None
        self.no_blob_ids = False
        self.raw_info: bytes | None = None
        self.extra_bytes = 0
        old = getattr(self, "_unhang", None)
        if old is not None:
            old.set()  # let handlers stalled by an earlier test finish
        self._unhang = threading.Event()
        self.hang_path: str | None = None

    def gets(self, filename: str) -> list[str | None]:
        """The Range header of each GET of `filename` so far."""
        return [r for m, p, r in self.requests if m == "GET" and "/resolve/" in p and p.endswith("/" + filename)]

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
        files = {p.name: real_file(p.read_bytes(), is_lfs(p.name)) for p in sorted(folder.iterdir()) if p.is_file()}
        return self.add_repo(repo_id, files, gated)

    # -- request handling ------------------------------------------------------------------

    def _send(
        self,
        h,
        status: int,
        body: bytes = b"",
        headers: dict | None = None,
        head: bool = False,
        length: int | None = None,
    ) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, str(v))
        h.send_header("Content-Length", str(len(body) if length is None else length))
        h.end_headers()
        if not head and body:
            h.wfile.write(body)
            with self._lock:
                self.bytes_sent += len(body)

    def _send_slowly(self, h, status: int, body: bytes, headers: dict) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, str(v))
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        for i in range(0, len(body), 1 << 16):
            h.wfile.write(body[i : i + (1 << 16)])
            h.wfile.flush()
            time.sleep(self.chunk_delay_s)
        with self._lock:
            self.bytes_sent += len(body)

    def _error(self, h, status: int, code: str, message: str, head: bool) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(
            h,
            status,
            body,
            {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"},
            head,
        )

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
            fail = self.fails_left > 0 and self.fail_path in path
            if fail:
                self.fails_left -= 1
        if self.hang_path is not None and self.hang_path in path:
            self._unhang.wait(120)
            h.close_connection = True
            return
        if fail:
            extra = {"Retry-After": self.retry_after} if self.retry_after is not None else {}
            body = json.dumps({"error": "injected fault"}).encode()
            self._send(h, self.fail_status, body, {"Content-Type": "application/json", **extra}, head)
            return
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if m:
            repo = self._repo(h, m.group(1), head)
            if repo and self.raw_info is not None:
                self._send(h, 200, self.raw_info, {"Content-Type": "application/json"}, head)
            elif repo:
                siblings = []
                for n, f in repo.files.items():
                    sib = {"rfilename": n, "size": f.size}
                    if not self.no_blob_ids:
                        sib["blobId"] = f.git_sha1 or hashlib.sha1(f.sha256.encode()).hexdigest()
                        if f.lfs:
                            sib["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": 134}
                    siblings.append(sib)
                sha = self.hostile_sha if self.hostile_sha is not None else repo.sha
                body = json.dumps(
                    {
                        "id": m.group(1),
                        "modelId": m.group(1),
                        "sha": sha,
                        "private": False,
                        "gated": "manual" if repo.gated else False,
                        "disabled": False,
                        "siblings": siblings,
                        "tags": [],
                    }
                ).encode()
                self._send(h, 200, body, {"Content-Type": "application/json"}, head)
            return
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
        if m:
            repo = self._repo(h, m.group(1), head)
            if repo:
                body = json.dumps(
                    [
                        {
                            "type": "file",
                            "path": n,
                            "size": f.size,
                            "oid": f.sha256[:40],
                            "lfs": {"oid": f.sha256, "size": f.size, "pointerSize": 134},
                        }
                        for n, f in repo.files.items()
                    ]
                ).encode()
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
        name = unquote(m.group(3))
        f = repo.files.get(name)
        if f is None:
            self._error(h, 404, "EntryNotFound", "Entry not found", head)
            return
        headers = {"ETag": f'"{f.etag}"', "X-Repo-Commit": repo.sha, "Accept-Ranges": "bytes"}
        if f.lfs:
            headers.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": f.size})
        start, end, status = 0, f.size - 1, 200
        rng = re.fullmatch(r"bytes=(\d+)-(\d*)", h.headers.get("range") or "")
        if rng and not self.ignore_range:
            start = int(rng.group(1))
            end = min(int(rng.group(2)), f.size - 1) if rng.group(2) else f.size - 1
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
        if head:
            self._send(h, 200, b"", headers, head=True, length=f.size)
            return
        body = f.read(start, end)
        if name in self.wrong_bytes:  # the right length, every byte wrong
            body = bytes(b ^ 0x5A for b in body)
        body += b"x" * self.extra_bytes
        with self._lock:
            cut = self.cut_after is not None and self.cuts_left > 0 and len(body) > self.cut_after
            cut = cut and self.cut_file in (None, name)
            if cut:
                self.cuts_left -= 1
        if not cut and self.chunk_delay_s:
            self._send_slowly(h, status, body, headers)
            return
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
