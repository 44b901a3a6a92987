"""`moerun pull`: download a model into the Hugging Face cache."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from moerun.cli.render import Display
from moerun.errors import MoerunError
from moerun.progress import download_callbacks
from moerun.units import gib


def pull(
    model: str = typer.Argument(..., help="Alias or Hub repo id."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch, tag or commit."),
) -> None:
    """Download what moerun needs (safetensors, config, tokenizer, generation config, chat
    template) into the Hugging Face cache; an interrupted pull resumes."""
    from moerun import hub

    repo_id = hub.repo_id_for(model)
    if repo_id is None:
        raise MoerunError(f"'{model}' is not an alias or a Hub repo id (a folder or the demo needs no pull)")
    repo = hub.remote_repo(repo_id, revision)
    with Display() as display:  # a bar of bytes, speed and time left, on stderr
        on_start, on_bytes = download_callbacks(repo_id, display.on_event)
        folder = hub.pull(repo_id, revision, repo=repo, on_start=on_start, on_bytes=on_bytes)
    sys.stderr.write(f"pulled {repo_id} ({gib(repo.size)}, {len(repo.files)} files) into {folder}\n")
