"""A model for a verb: the library's pull on first use and load, drawn on the command
run's Display (the fit line, a download bar, the experts' bar, a spinner between)."""

from __future__ import annotations

import dataclasses

from moerun.cli.render import Display
from moerun.spec import LoadSpec


def pull_on_first_use(model: str, spec: LoadSpec, display: Display) -> None:
    """The library's pull on first use (moerun.api.pull_if_missing), drawn: the fit line,
    then a download bar. Offline, load's own message ("not in the local Hugging Face
    cache") stands."""
    from moerun import hub

    repo_id = hub.repo_id_for(model)
    if repo_id is None or hub.is_cached(repo_id) or hub.is_offline():
        return  # nothing to pull: spare the import of torch
    from moerun.api import pull_if_missing

    try:
        pull_if_missing(model, spec, display.on_event)
    finally:
        display.end_phase()


def load(model: str, spec: LoadSpec, display: Display):
    """moerun.api.load_spec, pulled first if missing, with a spinner until the first bar."""
    pull_on_first_use(model, spec, display)
    display.spinner.show(f"loading {model}: starting torch")
    from moerun.api import load_spec  # the API (and torch) only now, when a model is really needed

    display.spinner.show(f"loading {model} ({spec.bits}-bit experts)")
    try:
        return load_spec(model, dataclasses.replace(spec, pull=False), display.on_event)  # pulled above, with a bar
    finally:
        display.end_phase()
