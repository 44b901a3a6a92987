"""Turn what the user typed (a folder, an alias or a Hub repo id) into a local model folder.

Only local resolution lives here for now: a repo id is looked up in the Hugging Face cache
that `hf download` fills, and nothing is fetched from the network.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

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
            f"download it first with `hf download {repo_id}`"
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
