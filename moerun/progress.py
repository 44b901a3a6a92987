"""What a load tells its caller while it works: one typed stream of events, handed to one
`on_event` callable (the CLI renders them with one Rich bar; a library caller may ignore
them). Events say what happened; how it is drawn is the caller's business."""

from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class FitChecked:
    """Before pulling a model that is not in the local cache: its fit from the Hub's
    headers (a moerun.fit.FitReport) and what the download will take."""

    repo_id: str
    bits: int
    report: object


@dataclasses.dataclass(frozen=True)
class Downloaded:
    """Bytes of a pull so far (a resumed pull starts above 0)."""

    repo_id: str
    done: int
    total: int


@dataclasses.dataclass(frozen=True)
class ExpertsPrepared:
    """MoE layers whose quantized experts are ready, the first time a model is loaded at
    `bits` (later loads read them from the on-disk cache)."""

    bits: int
    done: int
    total: int


ProgressEvent = FitChecked | Downloaded | ExpertsPrepared
OnEvent = Callable[[ProgressEvent], None]


def download_callbacks(repo_id: str, on_event: OnEvent | None):
    """hub.pull's two callbacks, on_start(total, already there) and on_bytes(n) (n < 0 when
    a bad partial file is dropped), as one stream of Downloaded events."""
    done = total = 0

    def on_start(size: int, have: int) -> None:
        nonlocal done, total
        done, total = have, size
        if on_event is not None:
            on_event(Downloaded(repo_id, done, total))

    def on_bytes(n: int) -> None:
        nonlocal done
        done += n
        if on_event is not None:
            on_event(Downloaded(repo_id, done, total))

    return on_start, on_bytes
