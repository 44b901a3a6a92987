"""Turn what the user typed (a folder, an alias or a Hub repo id) into a local model folder.

Only local resolution lives here for now: a repo id is looked up in the Hugging Face cache
that `hf download` fills, and nothing is fetched from the network.
"""

from __future__ import annotations

import dataclasses
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


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or Path(text).expanduser().exists()


def _cached_snapshot(repo_id: str, revision: str | None) -> Path:
    """The snapshot folder of `repo_id` in the local cache; never touches the network."""
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
    if _looks_like_path(text):
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
DOWNLOAD_ATTEMPTS = 5  # per file; each retry resumes from the bytes already on disk
RETRY_SLEEP_S = 1.0


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
    if text and (Path(text).expanduser().is_dir() or _looks_like_path(text)):
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
        if isinstance(exc, errors.GatedRepoError):
            raise MoerunError(
                f"{repo} is gated: accept its terms on {page} and log in (`hf auth login` or HF_TOKEN)"
            ) from None
        if isinstance(exc, errors.RevisionNotFoundError):
            raise MoerunError(f"{repo} has no revision '{self.revision}'") from None
        if isinstance(exc, errors.RepositoryNotFoundError):
            raise MoerunError(
                f"{repo} was not found on the Hub ({endpoint()}): check the name; "
                "a private repo also needs `hf auth login` or HF_TOKEN"
            ) from None
        if isinstance(exc, errors.OfflineModeIsEnabled):
            raise MoerunError(f"offline mode (HF_HUB_OFFLINE=1): cannot reach the Hub for {repo}") from None
        if isinstance(exc, errors.HfHubHTTPError):
            raise MoerunError(f"the Hub answered {exc.response.status_code} for {repo}: {str(exc).splitlines()[0]}") from None
        if isinstance(exc, httpx2.TransportError):
            raise HubUnreachable(
                f"cannot reach {endpoint()} ({type(exc).__name__}: {exc}); "
                "check the connection, or set HF_HUB_OFFLINE=1 to use cached models only"
            ) from None
        return False



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

    with _HubErrors(repo_id, revision):
        info = HfApi(endpoint=endpoint()).model_info(repo_id, revision=revision, files_metadata=True)
    files = {}
    for s in info.siblings or []:
        if NEEDED_FILES.match(s.rfilename):
            etag = s.lfs.sha256 if s.lfs else s.blob_id
            files[s.rfilename] = (int(s.size or 0), str(etag))
    return RemoteRepo(repo_id, info.sha, files)


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
    r = get_session().get(repo.url(filename), headers=headers, follow_redirects=True, timeout=30)
    hf_raise_for_status(r)
    data = r.content
    counter.add(len(data))
    if r.status_code == 200:  # the server ignored the range: keep only what was asked for
        data = data[start : end + 1]
    return data


def read_remote_json(repo: RemoteRepo, filename: str, counter: ByteCounter) -> dict:
    """A small JSON file of the repo (config.json), fetched whole."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    with _HubErrors(repo.repo_id):
        r = get_session().get(repo.url(filename), headers=build_hf_headers(), follow_redirects=True, timeout=30)
        hf_raise_for_status(r)
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


def _write_ref(storage: Path, revision: str | None, commit: str) -> None:
    if revision and revision != commit:
        ref = storage / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)
    elif not revision:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / "main").write_text(commit)


def _link(blob: Path, pointer: Path) -> None:
    pointer.parent.mkdir(parents=True, exist_ok=True)
    if pointer.is_symlink() or pointer.exists():
        pointer.unlink()
    try:
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    except OSError:  # no symlinks (some Windows set-ups): the cache then holds copies
        shutil.copyfile(blob, pointer)


def _download(url: str, partial: Path, size: int, on_bytes: Callable[[int], None], filename: str = "") -> None:
    """GET `url` into `partial`, resuming from the bytes already there with a Range request,
    and retrying a cut connection from where it stopped."""
    import httpx2
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    last_error: Exception | None = None
    for attempt in range(DOWNLOAD_ATTEMPTS):
        have = partial.stat().st_size if partial.exists() else 0
        if have > size:  # not the file we expect: start over
            partial.unlink()
            have = 0
        if have == size:
            return
        headers = {**build_hf_headers(), "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with get_session().stream("GET", url, headers=headers, follow_redirects=True, timeout=60) as r:
                if r.status_code >= 400:
                    r.read()
                    hf_raise_for_status(r)
                if have and r.status_code != 206:  # the server ignored the range: start over
                    on_bytes(-have)
                    have = 0
                with open(partial, "ab" if have else "wb") as f:
                    for chunk in r.iter_bytes():  # as they arrive: a cut loses nothing received
                        f.write(chunk)
                        on_bytes(len(chunk))
        except httpx2.TransportError as e:  # a cut connection or a timeout: resume
            last_error = e
            if attempt + 1 < DOWNLOAD_ATTEMPTS:
                time.sleep(RETRY_SLEEP_S)
    have = partial.stat().st_size if partial.exists() else 0
    if have != size:
        why = f" ({type(last_error).__name__})" if last_error else ""
        raise MoerunError(
            f"download of {filename or partial.name} stopped at {have} of {size} bytes after "
            f"{DOWNLOAD_ATTEMPTS} attempts{why}; the partial file is kept in the cache and "
            "`moerun pull` resumes it"
        )


def check_disk(repo: RemoteRepo, cache: Path) -> int:
    """Bytes still to download; raise if the cache's disk cannot hold them."""
    storage = cache / f"models--{repo.repo_id.replace('/', '--')}"
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
        from moerun.plan import gib

        raise MoerunError(
            f"not enough disk space for {repo.repo_id}: {gib(todo)} to download, {gib(free)} free in {cache}"
        )
    return todo


def pull(
    repo_id: str,
    revision: str | None = None,
    repo: RemoteRepo | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> Path:
    """Download what moerun needs of `repo_id` into the Hugging Face cache; return the
    snapshot folder. Files already in the cache are skipped; a partial file
    (blobs/<etag>.incomplete) left by an interrupted pull is resumed, not restarted.
    on_start(total_bytes, already_done) and on_bytes(n) drive a progress bar."""
    repo = repo or remote_repo(repo_id, revision)
    cache = hub_cache_dir()
    todo = check_disk(repo, cache)
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / repo.commit
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    if on_start:
        on_start(repo.size, repo.size - todo)
    on_bytes = on_bytes or (lambda n: None)
    # Small files first: a gated or broken repo fails before any big transfer starts.
    for filename in sorted(repo.files, key=lambda f: repo.files[f][0]):
        size, etag = repo.files[filename]
        blob = storage / "blobs" / etag
        if not blob.exists():
            partial = blob.with_name(etag + ".incomplete")
            with _HubErrors(repo_id, revision):
                _download(repo.url(filename), partial, size, on_bytes, filename)
            os.replace(partial, blob)
        _link(blob, snapshot / filename)
    _write_ref(storage, revision, repo.commit)
    return snapshot
