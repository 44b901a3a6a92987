"""`moerun chat`: a conversation in the terminal, like `ollama run`."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from moerun.cli.loading import load
from moerun.cli.options import LOADING, Seed, Temperature, TopK, TopP, loading_options, sampling
from moerun.cli.render import Display
from moerun.errors import MoerunError
from moerun.spec import LoadSpec


@loading_options()
def chat(
    model: str = typer.Argument(..., help="Alias (see `moerun models`), Hub repo id or local folder."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", "-n", min=1, help="Most tokens per reply."),
    temperature: float = Temperature,
    top_p: float = TopP,
    top_k: int = TopK,
    seed: Optional[int] = Seed,
    spec: LoadSpec = LOADING,
    system: Optional[str] = typer.Option(None, "--system", "-s", help="System prompt, kept across /clear."),
) -> None:
    """Chat with a model in the terminal, like `ollama run` (type /help inside)."""
    from moerun.chat import run_repl

    with Display() as display:
        m = load(model, spec, display)
    if not m.is_chat_model:
        raise MoerunError(
            f"{model} is a span-corruption encoder-decoder model, not a chat model (its checkpoint "
            "ships no chat template); use `moerun generate`, e.g. with <extra_id_0> in the prompt"
        )
    failed = run_repl(m, system=system, **sampling(max_new_tokens, temperature, top_p, top_k, seed))
    if failed and not sys.stdin.isatty():
        raise typer.Exit(1)  # `echo hi | moerun chat demo` in a script: a failed turn is a failure
