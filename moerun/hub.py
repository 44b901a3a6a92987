"""Turn what the user typed (a folder, an alias or a Hub repo id) into a local model folder.

Only local resolution lives here for now: a repo id is looked up in the Hugging Face cache
that `hf download` fills, and nothing is fetched from the network.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

from moerun.errors import MoerunError
from moerun.registry import DEMO_DIR, EMBEDDED, lookup

# owner/name with the characters the Hub allows; anything else is not a repo id.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# -- names that become paths: from the user (--revision) or the server (commit, etags, files)
#
# The cache is <cache>/models--o--n/{refs/<revision>, snapshots/<commit>/<file>, blobs/<etag>}:
# each of these is checked before it is joined to a path, so no answer and no argument can
# make moerun write or unlink outside the cache.

_COMMIT = re.compile(r"[0-9a-f]{40}")
_ETAG = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # git blob sha1 (plain files) | sha256 (LFS)
_REF_BAD = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//")  # git check-ref-format's rules
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_revision(revision: str | None) -> str | None:
    """`revision` if it is a valid git ref name or commit (as `git check-ref-format` has it),
    else a MoerunError: it becomes refs/<revision> in the cache."""
    if revision is None:
        return None
    parts = revision.split("/")
    if (
        not revision
        or _REF_BAD.search(revision)
        or revision == "@"
        or revision.startswith("/")
        or revision.endswith(("/", "."))
        or any(p.startswith(".") or p.endswith(".lock") for p in parts)
    ):
        raise MoerunError(
            f"{revision!r} is not a valid revision: give a branch, tag or commit "
            "(no '..', no leading '/', no spaces, control characters or ~^:?*[\\)"
        )
    return revision


def _check_commit(repo_id: str, commit: object) -> str:
    if not isinstance(commit, str) or not _COMMIT.fullmatch(commit):
        raise MoerunError(
            f"the Hub answered commit {commit!r} for {repo_id}: not a 40-hex commit id; nothing was written"
        )
    return commit


def _check_filename(repo_id: str, name: object) -> str:
    """A repo file name: relative, '/'-separated, no empty, '.' or '..' part, no backslash,
    drive letter or control character."""
    ok = isinstance(name, str) and name and not name.startswith("/") and "\\" not in name
    ok = ok and not _CONTROL.search(name) and not re.match(r"[A-Za-z]:", name)
    if not ok or any(part in ("", ".", "..") for part in name.split("/")):
        raise MoerunError(f"the Hub listed a file {name!r} in {repo_id}: not a safe relative path; nothing was written")
    return name


def _check_etag(repo_id: str, name: str, etag: object) -> str:
    if etag is None:
        raise MoerunError(
            f"the Hub gave no blob id or sha256 for {name} of {repo_id}: "
            "it could not be verified, so nothing was written"
        )
    if not isinstance(etag, str) or not _ETAG.fullmatch(etag):
        raise MoerunError(
            f"the Hub gave {name} of {repo_id} the blob id {etag!r}: not a sha1 or sha256; nothing was written"
        )
    return etag


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder, read from the environment at call time.

    huggingface_hub reads these variables once at import; tests and users may set them
    later, so the same precedence is applied here and the result passed explicitly.
    """
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not cache:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        home = os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")
        cache = os.path.join(home, "hub")
    return Path(os.path.expandvars(cache)).expanduser()


def _model_folder(folder: Path) -> Path:
    if not (folder / "config.json").is_file():
        raise MoerunError(f"no config.json in {folder}: not a model folder")
    return folder


def looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or Path(text).expanduser().exists()


def _cached_snapshot(repo_id: str, revision: str | None) -> Path:
    """The snapshot folder of `repo_id` in the local cache; never touches the network."""
    check_revision(revision)
    cache = hub_cache_dir()
    try:
        # local_files_only: resolution must work offline (HF_HUB_OFFLINE or not) and fast.
        snapshot = snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError):
        at = f" at revision {revision}" if revision else ""
        raise MoerunError(
            f"{repo_id}{at} is not in the local Hugging Face cache ({cache}); "
            f"download it first with `moerun pull {repo_id}{f' --revision {revision}' if revision else ''}`"
        ) from None
    return Path(snapshot)


def resolve(name_or_path: str, revision: str | None = None) -> Path:
    """The local folder holding the model `name_or_path`: a folder, an alias or a repo id.

    Tried in that order, so a local folder always wins over a same-named alias. Raises
    MoerunError if nothing matches or the match is not a model folder.
    """
    text = name_or_path.strip()
    folder = Path(text).expanduser()
    if text and folder.is_dir():
        return _model_folder(folder)
    if looks_like_path(text):
        raise MoerunError(f"no such folder: {text}")

    alias = lookup(text)
    if alias is not None:
        if alias.repo_id == EMBEDDED:
            return _model_folder(DEMO_DIR)
        text = alias.repo_id
    if _REPO_ID.match(text):
        return _model_folder(_cached_snapshot(text, revision))
    raise MoerunError(f"unknown model '{name_or_path}': not a folder, an alias (see `moerun models`) or a Hub repo id")


def read_config(folder: str | Path) -> dict:
    """The parsed config.json of a model folder."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise MoerunError(f"no config.json in {folder}: not a model folder") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MoerunError(f"{path} is not valid JSON ({e}); re-download it") from None
    if not isinstance(config, dict):
        raise MoerunError(f"{path} is not a JSON object")
    return config


# -- the Hub over the network: metadata (fit) and downloads (pull) ------------------------
#
# huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE once at import; they are read here at
# call time and passed explicitly, like the cache folder above.

# What moerun needs from a repo: weights as safetensors, config, tokenizer, generation
# config and chat template. Sub-folders (`original/`, `metal/`) and other formats are skipped.
NEEDED_FILES = re.compile(
    r"^(?!consolidated)[^/]+\.safetensors$|^model\.safetensors\.index\.json$|^config\.json$"
    r"|^generation_config\.json$|^tokenizer(_config)?\.json$|^tokenizer\.model$|^special_tokens_map\.json$"
    r"|^chat_template\.(jinja|json)$|^vocab\.json$|^merges\.txt$"
)
DOWNLOAD_ATTEMPTS = 5  # per request or file; each file retry resumes from the bytes on disk
MAX_RETRY_AFTER_S = 30.0  # a 429's Retry-After up to this is waited out; longer gives up at once
HUB_TIMEOUT_S = 30.0  # connect and per-read limit of every request; MOERUN_HUB_TIMEOUT_S overrides it


def hub_timeout_s() -> float:
    """Seconds any one connect or read may wait (a Hub that accepts and never answers would
    otherwise hang `pull` and `fit` for ever); MOERUN_HUB_TIMEOUT_S sets it."""
    text = os.environ.get("MOERUN_HUB_TIMEOUT_S", str(HUB_TIMEOUT_S))
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise MoerunError(f"MOERUN_HUB_TIMEOUT_S={text!r} is not a number of seconds above 0 and up to 3600")
    return value


def _retry_base_s() -> float:
    """The first retry's delay (doubled each time); MOERUN_RETRY_BASE_S sets it (tests: ~0)."""
    text = os.environ.get("MOERUN_RETRY_BASE_S", "1")
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 600:
        raise MoerunError(f"MOERUN_RETRY_BASE_S={text!r} is not a number of seconds between 0 and 600")
    return value


def _transient(exc: BaseException, connect_too: bool) -> tuple[str, float | None] | None:
    """(why, the server's Retry-After) when `exc` is worth retrying: a 5xx, a 429, a cut or
    timed-out transfer; refused or unresolvable connections too when `connect_too` (during a
    download the host was just there; a first metadata request that cannot connect means
    offline, answered at once so that `fit` falls back without waiting)."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, (httpx2.ConnectError, httpx2.ConnectTimeout)) and not connect_too:
        return None
    if isinstance(exc, httpx2.TimeoutException):
        return f"no answer within {hub_timeout_s():g} s, MOERUN_HUB_TIMEOUT_S", None
    if isinstance(exc, httpx2.TransportError):
        return type(exc).__name__, None
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        code = exc.response.status_code
        if code == 429 or code >= 500:
            try:
                after = float(exc.response.headers.get("retry-after", ""))
            except ValueError:  # absent, or an HTTP date: our own backoff
                after = None
            return f"HTTP {code}", after if after is not None and after >= 0 else None
    return None


def _pause(attempt: int, why: str, after: float | None, what: str) -> None:
    """Sleep before retry number `attempt` + 1: the server's Retry-After when it asks for a
    short wait, else exponential backoff."""
    if after is not None and after > MAX_RETRY_AFTER_S:
        raise MoerunError(f"the Hub answered {why} for {what} and asks to wait {after:.0f} s: try again later")
    time.sleep(after if after is not None else min(_retry_base_s() * 2**attempt, 60.0))


def _with_retries(what: str, fn: Callable[[], object]):
    """fn(), retried on transient errors (metadata requests); one line after the last try."""
    for attempt in range(DOWNLOAD_ATTEMPTS):
        try:
            return fn()
        except Exception as e:
            t = _transient(e, connect_too=False)
            if t is None:
                raise
            if attempt + 1 == DOWNLOAD_ATTEMPTS:
                raise MoerunError(
                    f"{what} failed {DOWNLOAD_ATTEMPTS} times ({t[0]} from {endpoint()}): the Hub is having trouble; "
                    "try again later"
                ) from None
            _pause(attempt, t[0], t[1], what)


def endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def is_offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    return value.upper() in ("1", "ON", "YES", "TRUE") if value is not None else bool(constants.HF_HUB_OFFLINE)


def repo_id_for(name: str) -> str | None:
    """The Hub repo id `name` stands for (an alias or a repo id), or None for a folder or
    the embedded demo."""
    text = name.strip()
    if text and (Path(text).expanduser().is_dir() or looks_like_path(text)):
        return None
    alias = lookup(text)
    if alias is not None:
        return None if alias.repo_id == EMBEDDED else alias.repo_id
    return text if _REPO_ID.match(text) else None


def is_cached(repo_id: str, revision: str | None = None) -> bool:
    try:
        _cached_snapshot(repo_id, revision)
        return True
    except MoerunError:
        return False


class HubUnreachable(MoerunError):
    """The Hub could not be reached (no network, DNS, refused connection)."""


class _HubErrors:
    """Turn huggingface_hub and transport errors into one-line MoerunErrors."""

    def __init__(self, repo_id: str, revision: str | None = None):
        self.repo_id, self.revision = repo_id, revision

    def __enter__(self):
        if is_offline():
            raise MoerunError(
                f"offline mode (HF_HUB_OFFLINE=1): cannot reach the Hub for {self.repo_id}; "
                "unset HF_HUB_OFFLINE, or use a model already in the local cache"
            )
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or isinstance(exc, MoerunError):
            return False
        import httpx2
        from huggingface_hub import errors

        repo, page = self.repo_id, f"{endpoint()}/{self.repo_id}"
        if isinstance(exc, httpx2.TransportError):
            raise HubUnreachable(
                f"cannot reach {endpoint()} ({type(exc).__name__}: {exc}); "
                "check the connection, or set HF_HUB_OFFLINE=1 to use cached models only"
            ) from None
        if isinstance(exc, errors.GatedRepoError):
            message = f"{repo} is gated: accept its terms on {page} and log in (`hf auth login` or HF_TOKEN)"
        elif isinstance(exc, errors.RevisionNotFoundError):
            message = f"{repo} has no revision '{self.revision}'"
        elif isinstance(exc, errors.RepositoryNotFoundError):
            message = (
                f"{repo} was not found on the Hub ({endpoint()}): check the name; "
                "a private repo also needs `hf auth login` or HF_TOKEN"
            )
        elif isinstance(exc, errors.OfflineModeIsEnabled):
            message = f"offline mode (HF_HUB_OFFLINE=1): cannot reach the Hub for {repo}"
        elif isinstance(exc, errors.HfHubHTTPError):
            message = f"the Hub answered {exc.response.status_code} for {repo}: {str(exc).splitlines()[0]}"
        else:
            return False
        raise MoerunError(message) from None


@dataclasses.dataclass
class RemoteRepo:
    """One revision of a Hub repo: its commit and the files moerun needs, with sizes."""

    repo_id: str
    commit: str
    files: dict[str, tuple[int, str]]  # name -> (size, etag: the LFS sha256 or the git blob id)

    @property
    def size(self) -> int:
        return sum(size for size, _ in self.files.values())

    @property
    def weight_files(self) -> list[str]:
        return sorted(f for f in self.files if f.endswith(".safetensors"))

    def url(self, filename: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_id, filename, revision=self.commit, endpoint=endpoint())


def remote_repo(repo_id: str, revision: str | None = None) -> RemoteRepo:
    """The commit and needed files of `repo_id` at `revision`: one model-info request."""
    from huggingface_hub import HfApi

    check_revision(revision)
    api = HfApi(endpoint=endpoint())
    with _HubErrors(repo_id, revision):
        try:
            info = _with_retries(
                f"the model info of {repo_id}",
                lambda: api.model_info(repo_id, revision=revision, files_metadata=True, timeout=hub_timeout_s()),
            )
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:  # huggingface_hub's parse
            raise MoerunError(f"the Hub's model info for {repo_id} is malformed ({type(e).__name__}: {e})") from None
    commit = _check_commit(repo_id, info.sha)
    files = {}
    for s in info.siblings or []:
        name = _check_filename(repo_id, s.rfilename)  # every name, needed or not: a hostile list is refused
        if NEEDED_FILES.match(name):
            etag = _check_etag(repo_id, name, s.lfs.sha256 if s.lfs else s.blob_id)
            size = s.size if s.size is not None else (s.lfs.size if s.lfs else None)
            if not isinstance(size, int) or size < 0:
                raise MoerunError(f"the Hub gave {name} of {repo_id} the size {size!r}; nothing was written")
            files[name] = (size, etag)
    return RemoteRepo(repo_id, commit, files)


class ByteCounter:
    """Bytes received by metadata reads (fit promises they stay tiny)."""

    def __init__(self):
        self.n = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.n += n


def _ranged_get(repo: RemoteRepo, filename: str, start: int, end: int, counter: ByteCounter) -> bytes:
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    headers = {**build_hf_headers(), "Range": f"bytes={start}-{end}", "Accept-Encoding": "identity"}

    def get():
        r = get_session().get(repo.url(filename), headers=headers, follow_redirects=True, timeout=hub_timeout_s())
        hf_raise_for_status(r)
        return r

    r = _with_retries(f"bytes {start}-{end} of {filename} of {repo.repo_id}", get)
    data = r.content
    counter.add(len(data))
    if r.status_code == 200:  # the server ignored the range: keep only what was asked for
        data = data[start : end + 1]
    return data


def read_remote_json(repo: RemoteRepo, filename: str, counter: ByteCounter) -> dict:
    """A small JSON file of the repo (config.json), fetched whole."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    def get():
        r = get_session().get(
            repo.url(filename), headers=build_hf_headers(), follow_redirects=True, timeout=hub_timeout_s()
        )
        hf_raise_for_status(r)
        return r

    with _HubErrors(repo.repo_id):
        r = _with_retries(f"{filename} of {repo.repo_id}", get)
    counter.add(len(r.content))
    try:
        return json.loads(r.content)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MoerunError(f"{filename} of {repo.repo_id} is not valid JSON ({e})") from None


def read_remote_headers(repo: RemoteRepo, counter: ByteCounter) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor's (shape, dtype) from the safetensors headers, read with two small HTTP
    range requests per file (the 8-byte length, then the JSON header), never the weights."""

    def header(filename: str) -> dict:
        n = struct.unpack("<Q", _ranged_get(repo, filename, 0, 7, counter))[0]
        if not 0 < n <= 100_000_000:
            raise MoerunError(f"{filename} of {repo.repo_id} is not a safetensors file (header length {n})")
        return json.loads(_ranged_get(repo, filename, 8, 8 + n - 1, counter))

    files = repo.weight_files
    if not files:
        raise MoerunError(f"{repo.repo_id} has no safetensors weights: moerun reads safetensors only")
    with _HubErrors(repo.repo_id), ThreadPoolExecutor(8) as pool:
        headers = list(pool.map(header, files))
    tensors = {}
    for h in headers:
        for name, info in h.items():
            if name != "__metadata__":
                tensors[name] = (tuple(info["shape"]), info["dtype"])
    return tensors


# -- pull -----------------------------------------------------------------------------------
#
# The cache layout is huggingface_hub's: blobs/<etag> named by content (sha256 for LFS files,
# the git blob sha1 for plain ones), snapshots/<commit>/<file> symlinks to them, refs/<name>
# holding a commit, and .locks/models--o--n/<etag>.lock, the very file huggingface_hub flocks,
# so `moerun pull` and `hf download` into one cache also wait for each other.

CHUNK = 1 << 20


def _storage(cache: Path, repo_id: str) -> Path:
    return cache / f"models--{repo_id.replace('/', '--')}"


def _inside(base: Path, path: Path) -> Path:
    """`path`, after checking that it lies under `base` (the names were validated: this is
    the last guard, not the first)."""
    if not os.path.abspath(path).startswith(os.path.abspath(base) + os.sep):
        raise MoerunError(f"refusing to write {path}: it is outside {base}")
    return path


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # a concurrent reader sees the old ref or the new one, never half


def _write_ref(storage: Path, revision: str | None, commit: str) -> None:
    if revision and revision != commit:
        _atomic_write(_inside(storage / "refs", storage / "refs" / check_revision(revision)), commit)
    elif not revision:
        _atomic_write(storage / "refs" / "main", commit)


def _link(blob: Path, pointer: Path) -> None:
    """Point snapshots/<commit>/<file> at its blob; built beside and renamed over, so that
    concurrent pulls never see a missing pointer or collide while making one."""
    pointer.parent.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(blob, pointer.parent)
    if pointer.is_symlink() and os.readlink(pointer) == target:
        return
    tmp = pointer.with_name(f".{pointer.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.symlink_to(target)
    except OSError:  # no symlinks (some Windows set-ups): the cache then holds copies
        shutil.copyfile(blob, tmp)
    os.replace(tmp, pointer)


@contextlib.contextmanager
def _blob_lock(cache: Path, repo_id: str, etag: str):
    """An exclusive flock on .locks/models--o--n/<etag>.lock while one blob is checked or
    fetched: a second pull of the same blob waits, then finds it done and verified."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no cross-process exclusion
        yield
        return
    path = cache / ".locks" / _storage(cache, repo_id).name / f"{etag}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o664)  # group-writable, as huggingface_hub's
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock; the lock file stays (unlinking it would race)


def _hasher(etag: str, size: int):
    """What names a blob: sha256 of the bytes for LFS files, git's sha1 of "blob <len>\\0"
    and the bytes for plain ones."""
    if len(etag) == 64:
        return hashlib.sha256()
    h = hashlib.sha1()
    h.update(b"blob %d\0" % size)
    return h


def _file_digest(path: Path, etag: str, size: int, h=None):
    h = h or _hasher(etag, size)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h


def verifies(blob: Path, etag: str, size: int) -> bool:
    """Whether `blob` holds exactly the bytes its name promises."""
    try:
        return blob.stat().st_size == size and _file_digest(blob, etag, size).hexdigest() == etag
    except OSError:
        return False


class _Mismatch(MoerunError):
    pass


def _fetch(url: str, partial: Path, size: int, etag: str, on_bytes: Callable[[int], None], filename: str) -> None:
    """GET `url` into `partial`, hashing as the bytes arrive; resume from the bytes already
    there with a Range request (rehashed once), retrying 5xx, 429 and cut or failed
    connections with backoff. Raises _Mismatch if the bytes are not the ones `etag` names."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    have = partial.stat().st_size if partial.exists() else 0
    if have > size:  # not the file we expect: start over
        partial.unlink()
        have = 0
    h = _file_digest(partial, etag, size) if have else _hasher(etag, size)
    last_error = ""
    for attempt in range(DOWNLOAD_ATTEMPTS):
        if have == size:
            break
        headers = {**build_hf_headers(), "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with get_session().stream("GET", url, headers=headers, follow_redirects=True, timeout=hub_timeout_s()) as r:
                if r.status_code >= 400:
                    r.read()
                    hf_raise_for_status(r)
                if have and r.status_code != 206:  # the server ignored the range: start over
                    on_bytes(-have)
                    have, h = 0, _hasher(etag, size)
                with open(partial, "ab" if have else "wb") as f:
                    for chunk in r.iter_bytes():  # as they arrive: a cut loses nothing received
                        if have + len(chunk) > size:
                            raise _Mismatch(f"the Hub sent more than the {size} bytes of {filename}")
                        f.write(chunk)
                        h.update(chunk)
                        have += len(chunk)
                        on_bytes(len(chunk))
        except _Mismatch:
            raise
        except Exception as e:
            t = _transient(e, connect_too=True)
            if t is None:
                raise
            last_error = t[0]
            if attempt + 1 < DOWNLOAD_ATTEMPTS:
                _pause(attempt, t[0], t[1], filename)
    if have != size:
        why = f" ({last_error})" if last_error else ""
        raise MoerunError(
            f"download of {filename} stopped at {have} of {size} bytes after {DOWNLOAD_ATTEMPTS} attempts{why}; "
            "the partial file is kept in the cache and `moerun pull` resumes it"
        )
    if h.hexdigest() != etag:
        kind = "sha256" if len(etag) == 64 else "git blob id"
        raise _Mismatch(f"{filename}: the bytes received do not match the Hub's {kind} {etag}")


def _fetch_verified(
    url: str, partial: Path, size: int, etag: str, on_bytes: Callable[[int], None], filename: str
) -> None:
    """_fetch, and a verified `partial` when it returns. A mismatch deletes the partial; if
    it had resumed an earlier partial (which may have been the bad part), once more from 0."""
    resumed = partial.exists() and partial.stat().st_size > 0
    for fresh in (False, True):
        try:
            _fetch(url, partial, size, etag, on_bytes, filename)
            return
        except _Mismatch as e:
            got = partial.stat().st_size if partial.exists() else 0
            partial.unlink(missing_ok=True)
            on_bytes(-got)
            if fresh or not resumed:
                raise MoerunError(f"{e}; the download was deleted, nothing was kept: try `moerun pull` again") from None


def check_disk(repo: RemoteRepo, cache: Path) -> int:
    """Bytes still to download; raise if the cache's disk cannot hold them."""
    storage = _storage(cache, repo.repo_id)
    todo = 0
    for size, etag in repo.files.values():
        blob = storage / "blobs" / etag
        if not blob.exists():
            partial = blob.with_name(etag + ".incomplete")
            todo += size - (partial.stat().st_size if partial.exists() else 0)
    probe = cache
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if todo > free:
        from moerun.units import gib

        raise MoerunError(
            f"not enough disk space for {repo.repo_id}: {gib(todo)} to download, {gib(free)} free in {cache}"
        )
    return todo


def _check_repo(repo: RemoteRepo) -> None:
    _check_commit(repo.repo_id, repo.commit)
    for name, (_, etag) in repo.files.items():
        _check_etag(repo.repo_id, _check_filename(repo.repo_id, name), etag)


def pull(
    repo_id: str,
    revision: str | None = None,
    repo: RemoteRepo | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> Path:
    """Download what moerun needs of `repo_id` into the Hugging Face cache; return the
    snapshot folder. Every blob is verified against its name (sha256 or git blob id): as it
    is written, and again when it is already in the cache (a bad one is fetched again). A
    partial file (blobs/<etag>.incomplete) left by an interrupted pull is resumed, not
    restarted. Concurrent pulls into one cache wait for each other blob by blob.
    on_start(total_bytes, already_done) and on_bytes(n) drive a progress bar."""
    check_revision(revision)
    repo = repo or remote_repo(repo_id, revision)
    _check_repo(repo)
    cache = hub_cache_dir()
    todo = check_disk(repo, cache)
    storage = _storage(cache, repo_id)
    snapshot = _inside(storage / "snapshots", storage / "snapshots" / repo.commit)
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    if on_start:
        on_start(repo.size, repo.size - todo)
    on_bytes = on_bytes or (lambda n: None)
    # Small files first: a gated or broken repo fails before any big transfer starts.
    for filename in sorted(repo.files, key=lambda f: repo.files[f][0]):
        size, etag = repo.files[filename]
        blob = storage / "blobs" / etag
        with _blob_lock(cache, repo_id, etag):
            if blob.exists() and not verifies(blob, etag, size):
                blob.unlink()  # corrupt (an old pull, a disk fault): fetched again below
                on_bytes(-size)
            if not blob.exists():
                partial = blob.with_name(etag + ".incomplete")
                with _HubErrors(repo_id, revision):
                    _fetch_verified(repo.url(filename), partial, size, etag, on_bytes, filename)
                os.replace(partial, blob)
            _link(blob, _inside(snapshot, snapshot / filename))
    _write_ref(storage, revision, repo.commit)
    return snapshot
