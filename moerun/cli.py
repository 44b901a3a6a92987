"""The `moerun` command: a thin Typer shell over the library, rendered with Rich.

Every verb parses options, calls `moerun.load` / `Model.generate` / `stream_generate`, and
prints. Errors are turned into one `error: <message>` line in `main()`, once for all verbs.
Torch is imported only inside the verbs that need a model, so `--help` and `models` are quick.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

import typer

from moerun import __version__
from moerun.errors import MoerunError

app = typer.Typer(
    name="moerun",
    help="Run Mixture-of-Experts language models on one consumer GPU (or the CPU).",
    no_args_is_help=True,
    add_completion=False,
    # Tracebacks are main()'s business (MOERUN_DEBUG=1); Typer must not pretty-print them.
    pretty_exceptions_enable=False,
)

# Errors a user can cause with a bad path or option; anything else is a bug in moerun.
USER_ERRORS = (MoerunError, FileNotFoundError, ValueError)
BITS = (4, 8, 16)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"moerun {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version_callback, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """Run Mixture-of-Experts language models on one consumer GPU (or the CPU)."""


# Options shared by `generate` and `chat`, declared once so that the two verbs agree.
MaxNewTokens = typer.Option(128, "--max-new-tokens", "-n", min=1, help="Most tokens to generate per reply.")
Temperature = typer.Option(0.0, "--temperature", "-t", min=0.0, help="0 means greedy decoding.")
TopP = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (1.0: off).")
TopK = typer.Option(0, "--top-k", min=0, help="Sample among the k likeliest tokens (0: off).")
Seed = typer.Option(None, "--seed", help="Random seed for sampling.")
Bits = typer.Option(16, "--bits", "-b", help="Expert weight bits: 4, 8 or 16.")
Device = typer.Option("auto", "--device", "-d", help="auto, cpu or cuda.")
Vram = typer.Option(None, "--vram", help="Device memory budget, e.g. 12GiB (default: free VRAM minus a reserve).")
Ram = typer.Option(None, "--ram", help="Host memory budget for the expert store, e.g. 32GiB.")
ExpertSlots = typer.Option(None, "--expert-slots", min=1, help="Expert slots per MoE layer (overrides the planner).")
Cold = typer.Option("gpu", "--cold", help="Where non-resident experts run: gpu (copied in), cpu, or auto.")
Ctx = typer.Option(None, "--ctx", min=16, help="Context length to plan the KV cache for (default: min(model's, 4096)).")
NoPrefetch = typer.Option(False, "--no-prefetch", help="Do not guess and copy the next layer's experts early.")


def _load(model: str, bits: int, device: str, vram=None, ram=None, expert_slots=None, cold="gpu", ctx=None,
          no_prefetch=False):  # fmt: skip
    if bits not in BITS:
        raise typer.BadParameter(f"{bits} is not one of 4, 8, 16", param_hint="'--bits'")
    import moerun  # the API (and torch) only now, when a model is really needed
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), transient=True,
    )  # fmt: skip
    task = None

    def on_layer(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            progress.start()
            task = progress.add_task(f"preparing {bits}-bit experts (once; cached)", total=total)
        progress.update(task, completed=done)

    try:
        return moerun.load(
            model, bits=bits, device=device, vram=vram, ram=ram, expert_slots=expert_slots, cold=cold,
            prefetch=not no_prefetch, ctx=ctx, progress=on_layer,
        )  # fmt: skip
    finally:
        progress.stop()


def _sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int, seed: Optional[int]) -> dict:
    return dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"  # unreachable; keeps type checkers quiet


def format_stats(stats) -> str:
    """The three lines `generate` prints to stderr, as mlx_lm.generate does."""
    return (
        f"prompt: {stats.prompt_tokens} tokens, {stats.prompt_tps:.1f} tok/s\n"
        f"generation: {stats.generated_tokens} tokens, {stats.generation_tps:.1f} tok/s\n"
        f"peak memory: {_human_bytes(stats.peak_memory_bytes)}"
    )


def format_expert_stats(total: dict, tokens: int) -> str:
    uses = total["hits"] + total["misses"]
    rate = total["hits"] / uses if uses else 0.0
    return (
        f"experts: {rate:.0%} hit rate ({total['hits']} hits, {total['misses']} misses, "
        f"{total['prefetch_hits']} prefetched, {total['cpu_experts']} on CPU), "
        f"{_human_bytes(total['bytes_copied'] / max(tokens, 1))} copied per token"
    )


@app.command()
def generate(
    model: str = typer.Argument(..., help="Alias (see `moerun models`), Hub repo id or local folder."),
    prompt: str = typer.Argument(..., help="The prompt text."),
    max_new_tokens: int = MaxNewTokens,
    temperature: float = Temperature,
    top_p: float = TopP,
    top_k: int = TopK,
    seed: Optional[int] = Seed,
    bits: int = Bits,
    device: str = Device,
    vram: Optional[str] = Vram,
    ram: Optional[str] = Ram,
    expert_slots: Optional[int] = ExpertSlots,
    cold: str = Cold,
    ctx: Optional[int] = Ctx,
    no_prefetch: bool = NoPrefetch,
    raw: bool = typer.Option(False, "--raw", help="Feed the prompt as is, without the chat template."),
    as_json: bool = typer.Option(False, "--json", help='Print one JSON object {"text", "token_ids", "stats"}.'),
) -> None:
    """Generate a reply to PROMPT: text streams to stdout, statistics go to stderr."""
    m = _load(model, bits, device, vram, ram, expert_slots, cold, ctx, no_prefetch)
    kwargs = _sampling(max_new_tokens, temperature, top_p, top_k, seed)
    chat = not raw
    if as_json:
        out = m.generate(prompt, chat=chat, **kwargs)
        stats = out.stats.to_dict()
        if m.stats:  # expert-cache counters, in total and per layer
            stats["experts"] = m.stats
        payload = {"text": out.text, "token_ids": list(out.token_ids), "stats": stats}
        sys.stdout.write(json.dumps(payload) + "\n")
        return

    stats = None
    text_ends_with_newline = True
    for resp in m.stream_generate(prompt, chat=chat, **kwargs):
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
        if m.stats:
            sys.stderr.write(format_expert_stats(m.stats["total"], stats.generated_tokens) + "\n")


@app.command()
def chat(
    model: str = typer.Argument(..., help="Alias (see `moerun models`), Hub repo id or local folder."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", "-n", min=1, help="Most tokens per reply."),
    temperature: float = Temperature,
    top_p: float = TopP,
    top_k: int = TopK,
    seed: Optional[int] = Seed,
    bits: int = Bits,
    device: str = Device,
    vram: Optional[str] = Vram,
    ram: Optional[str] = Ram,
    expert_slots: Optional[int] = ExpertSlots,
    cold: str = Cold,
    ctx: Optional[int] = Ctx,
    no_prefetch: bool = NoPrefetch,
    system: Optional[str] = typer.Option(None, "--system", "-s", help="System prompt, kept across /reset."),
) -> None:
    """Chat with a model in the terminal, like `ollama run` (type /help inside)."""
    from moerun.chat import run_repl

    m = _load(model, bits, device, vram, ram, expert_slots, cold, ctx, no_prefetch)
    run_repl(m, system=system, **_sampling(max_new_tokens, temperature, top_p, top_k, seed))


@app.command()
def models() -> None:
    """List the model aliases moerun knows."""
    from rich.console import Console
    from rich.table import Table

    from moerun.registry import ALIASES

    table = Table(title="moerun models")
    table.add_column("alias", style="bold", no_wrap=True)
    table.add_column("repo id", no_wrap=True)
    table.add_column("family", no_wrap=True)
    table.add_column("description")
    for key in sorted(ALIASES):
        a = ALIASES[key]
        table.add_row(key, a.repo_id, a.family, a.description)
    Console().print(table)


def _one_line(exc: BaseException) -> str:
    # Exactly one line, whatever the message: scripts grep for `error:`.
    msg = " ".join(str(exc).split())
    return msg or type(exc).__name__


def main() -> None:
    """Console-script entry: run the app, turning every exception into one `error:` line."""
    debug = os.environ.get("MOERUN_DEBUG", "") not in ("", "0")
    try:
        app()  # standalone mode: Typer/click usage errors print and exit 2 on their own
    except USER_ERRORS as exc:
        if debug:
            raise
        sys.stderr.write(f"error: {_one_line(exc)}\n")
        sys.exit(1)
    except Exception as exc:  # a bug: still no traceback for users, but say how to get one
        if debug:
            raise
        sys.stderr.write(f"error: {type(exc).__name__}: {_one_line(exc)} (set MOERUN_DEBUG=1 for a traceback)\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
