"""`moerun generate`: one reply to a prompt, streamed to stdout; statistics to stderr."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from moerun.cli.loading import load
from moerun.cli.options import LOADING, MaxNewTokens, Seed, Temperature, TopK, TopP, Verbose, loading_options, sampling
from moerun.cli.render import Display, format_expert_stats, format_plan, format_stats
from moerun.errors import MoerunError
from moerun.spec import LoadSpec


@loading_options()
def generate(
    model: str = typer.Argument(..., help="Alias (see `moerun models`), Hub repo id or local folder."),
    prompt: Optional[str] = typer.Argument(None, help="The prompt text; - (or a pipe) reads it from stdin."),
    prompt_file: Optional[Path] = typer.Option(None, "--file", "-f", help="Read the prompt from this file."),
    max_new_tokens: int = MaxNewTokens,
    temperature: float = Temperature,
    top_p: float = TopP,
    top_k: int = TopK,
    seed: Optional[int] = Seed,
    spec: LoadSpec = LOADING,
    raw: bool = typer.Option(
        False,
        "--raw",
        help="Feed the prompt as is, without the chat template "
        "(always, for span-corruption models such as switch-base-8).",
    ),
    as_json: bool = typer.Option(False, "--json", help='Print one JSON object {"text", "token_ids", "stats"}.'),
    verbose: bool = Verbose,
) -> None:
    """Generate a reply to PROMPT (or -f FILE, or stdin): text streams to stdout,
    statistics go to stderr."""
    with Display() as display:
        prompt = read_prompt(prompt, prompt_file)
        t0 = time.perf_counter()
        m = load(model, spec, display)
        if verbose:
            display.spinner.stop()
            sys.stderr.write(format_plan(m, time.perf_counter() - t0) + "\n")
        kwargs = sampling(max_new_tokens, temperature, top_p, top_k, seed)
        chat = not raw and m.is_chat_model  # an encoder-decoder without a chat template: raw
        display.spinner.show("processing the prompt")
        if as_json:
            out = m.generate(prompt, chat=chat, **kwargs)
            display.spinner.stop()
            stats = out.stats.to_dict()
            if m.stats:  # expert-cache counters, in total and per layer
                stats["experts"] = m.stats
            payload = {"text": out.text, "token_ids": list(out.token_ids), "stats": stats}
            sys.stdout.write(json.dumps(payload) + "\n")
            return

        stats = None
        text_ends_with_newline = True
        for resp in m.stream_generate(prompt, chat=chat, **kwargs):
            display.spinner.stop()  # the first token is here
            if resp.text:
                sys.stdout.write(resp.text)
                sys.stdout.flush()
                text_ends_with_newline = resp.text.endswith("\n")
            if resp.stats is not None:
                stats = resp.stats
        if not text_ends_with_newline:
            sys.stdout.write("\n")
        sys.stdout.flush()
        if stats is not None:
            # Plain writes, not Rich: Rich would wrap at 80 columns and colour the numbers.
            sys.stderr.write(format_stats(stats) + "\n")
            if verbose:
                sys.stderr.write(
                    f"time to first token: {stats.prompt_seconds * 1000:.0f} ms "
                    f"({stats.prefilled_tokens} prefilled, {stats.reused_tokens} reused); "
                    f"decode {stats.generation_seconds:.2f} s; stop: {stats.finish_reason}\n"
                )
            if m.stats:
                sys.stderr.write(format_expert_stats(m.stats["total"], stats.generated_tokens) + "\n")


def utf8(text: str, what: str) -> str:
    """`text`, if it is UTF-8: Python hands undecodable bytes of argv (and of a stdin read
    with surrogateescape) over as lone surrogates, which the tokenizer cannot take."""
    from moerun.tokenizer import check_utf8

    check_utf8(text, what)
    return text


def read_prompt(prompt: Optional[str], prompt_file: Optional[Path]) -> str:
    """PROMPT, -f FILE, `-` or a piped stdin, as llama-cli and ollama read them."""
    if prompt is not None and prompt_file is not None:
        raise typer.BadParameter("give PROMPT or -f FILE, not both", param_hint="'--file'")
    if prompt_file is not None:
        try:
            text = prompt_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise MoerunError(
                f"the prompt file {prompt_file} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})"
            ) from None
        except OSError as e:
            raise MoerunError(f"cannot read the prompt file {prompt_file}: {e.strerror or e}") from None
    elif prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        try:
            text = utf8(sys.stdin.read(), "the prompt from stdin")
        except UnicodeDecodeError as e:  # a stdin decoded strictly
            raise MoerunError(
                f"the prompt from stdin is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})"
            ) from None
    elif prompt is None:
        raise typer.BadParameter("give a PROMPT, -f FILE, or pipe the prompt into stdin", param_hint="'PROMPT'")
    else:
        return utf8(prompt, "the PROMPT argument")
    if not text.strip():
        raise MoerunError(f"the prompt from {prompt_file or 'stdin'} is empty")
    return text.removesuffix("\n")  # the newline that ends a file or `echo` is not part of the prompt
