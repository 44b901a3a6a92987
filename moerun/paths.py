"""Where moerun keeps its own files (quantized caches, chat history, last-used stamps);
torch-free, so that `ls` and `rm` start without torch."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """MOERUN_CACHE, else $XDG_CACHE_HOME/moerun, else ~/.cache/moerun."""
    if os.environ.get("MOERUN_CACHE"):
        return Path(os.environ["MOERUN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moerun"
