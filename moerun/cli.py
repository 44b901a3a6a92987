"""The `moerun` command: a thin Typer shell over the library, rendered with Rich.

Every verb parses options, calls `moerun.load` / `Model.generate` / `stream_generate`, and
prints. Errors are turned into one `error: <message>` line in `main()`, once for all verbs.
Torch is imported only inside the verbs that need a model, so `--help` and `models` are quick.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys
import typing
from pathlib import Path
from typing import Optional

import typer

from moerun import __version__
from moerun.errors import MoerunError
from moerun.spec import LoadSpec
from moerun.units import gib, params, params_short

def _flag_type(display_type_rich):
    """Typer's help shows `<bool>` after flags, which take no value: show nothing there."""

    def display(self, ctx):
        return None if getattr(self, "is_flag", False) else display_type_rich(self, ctx)

    return display


if hasattr(typer.core.TyperOption, "display_type_rich"):  # Typer >= 0.24 prints option types
    typer.core.TyperOption.display_type_rich = _flag_type(typer.core.TyperOption.display_type_rich)

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


def _top_p(value: float) -> float:
    if not 0 < value <= 1:
        raise typer.BadParameter(f"{value} is not in (0, 1]")
    return value


def _checked(check):
    """An option callback from one of moerun.spec's checks: its refusal as a usage error."""

    def callback(value):
        from moerun.spec import OptionError

        try:
            return check(value)
        except OptionError as e:
            raise typer.BadParameter(e.usage) from None

    return callback


def _cold(value: str) -> str:
    from moerun.spec import check_cold

    return _checked(check_cold)(value)


def _threads(value: Optional[int]) -> Optional[int]:
    from moerun.spec import check_threads

    return _checked(check_threads)(value)


# Options shared by `generate` and `chat`, declared once so that the two verbs agree.
MaxNewTokens = typer.Option(128, "--max-new-tokens", "-n", min=1, help="Most tokens to generate per reply.")
Temperature = typer.Option(0.0, "--temperature", "-t", min=0.0, help="0 means greedy decoding.")
TopP = typer.Option(1.0, "--top-p", callback=_top_p, help="Nucleus sampling mass in (0, 1] (1.0: off).")
TopK = typer.Option(0, "--top-k", min=0, help="Sample among the k likeliest tokens (0: off).")
Seed = typer.Option(None, "--seed", min=0, max=(1 << 63) - 1, help="Random seed for sampling (0 to 2**63-1).")


@dataclasses.dataclass(frozen=True)
class LoadOption:
    """One loading option: the LoadSpec field it sets, the verb parameter's type and Typer
    option, and its name there when the flag says it the other way round (--no-prefetch)."""

    field: str
    annotation: object
    option: object
    param: str = ""  # the field's name unless given
    negated: bool = False

    @property
    def name(self) -> str:
        return self.param or self.field


# The loading options, declared once: each sets one LoadSpec field, which moerun.spec checks.
# A verb takes them with a `spec: LoadSpec = LOADING` parameter (see `loading_options`).
LOAD_OPTIONS = (
    LoadOption("bits", int, typer.Option(16, "--bits", "-b", help="Expert weight bits: 4, 8 or 16.")),
    LoadOption("device", str, typer.Option("auto", "--device", "-d", help="auto, cpu or cuda.")),
    LoadOption("vram", Optional[str], typer.Option(
        None, "--vram", help="Device memory budget, e.g. 12GiB (default: free VRAM minus a reserve).")),
    LoadOption("ram", Optional[str], typer.Option(
        None, "--ram", help="Host memory budget for the expert store, e.g. 32GiB.")),
    LoadOption("expert_slots", Optional[int], typer.Option(
        None, "--expert-slots", min=1, help="Expert slots per MoE layer (overrides the planner).")),
    LoadOption("cold", str, typer.Option(
        "gpu", "--cold", callback=_cold, help="Where non-resident experts run: gpu (copied in), cpu, or auto.")),
    LoadOption("ctx", Optional[int], typer.Option(
        None, "--ctx", min=16, help="Context length to plan the KV cache for (default: min(model's, 4096)).")),
    LoadOption("prefetch", bool, typer.Option(
        False, "--no-prefetch", help="Do not guess and copy the next layer's experts early."),
        param="no_prefetch", negated=True),
    LoadOption("force", bool, typer.Option(
        False, "--force", help="Download and load even when the fit check says it will not fit.")),
    LoadOption("dtype", str, typer.Option("auto", "--dtype", help="Non-expert weights and compute: auto (as stored; "
                                          "float32 on a CPU without native bf16/fp16), bfloat16, float16 or float32.")),
    LoadOption("threads", Optional[int], typer.Option(
        None, "--threads", callback=_threads,
        help="CPU threads for the CPU kernels and torch (default: the cores; at most 4 per core).")),
)
LOADING = object()  # the default of a verb's `spec` parameter: where the loading options go


def loading_options(*, without: tuple[str, ...] = ()):
    """Give a verb the loading options (less the fields in `without`, which it declares its
    own way) in place of its `spec: LoadSpec = LOADING` parameter, and call it with the one
    LoadSpec they make: a refused value is a usage error naming its flag."""
    options = [o for o in LOAD_OPTIONS if o.field not in without]

    def wrap(verb):
        hints = typing.get_type_hints(verb)
        params = []
        for p in inspect.signature(verb).parameters.values():
            if p.name != "spec":
                params.append(p.replace(kind=p.KEYWORD_ONLY, annotation=hints[p.name]))
                continue
            for o in options:
                params.append(inspect.Parameter(o.name, p.KEYWORD_ONLY, default=o.option, annotation=o.annotation))

        def run(**kwargs):
            values = {o.field: kwargs.pop(o.name) for o in options}
            values.update({o.field: not values[o.field] for o in options if o.negated})
            return verb(spec=_spec(**values), **kwargs)

        run.__name__, run.__doc__, run.__module__ = verb.__name__, verb.__doc__, verb.__module__
        run.__signature__ = inspect.Signature(params)
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run

    return wrap


Verbose = typer.Option(False, "--verbose", "-v", help="Also print the memory plan and timings to stderr.")


class _Spinner:
    """What is loading, on stderr, while nothing else shows: the first seconds (imports,
    weights, the prompt) before the first token. Only when stderr is a terminal."""

    def __init__(self):
        self._live = self._spinner = None

    def show(self, text: str) -> None:
        if not sys.stderr.isatty():
            return
        if self._live is None:
            from rich.console import Console
            from rich.live import Live
            from rich.spinner import Spinner

            self._spinner = Spinner("dots", text)
            self._live = Live(self._spinner, console=Console(stderr=True), transient=True, refresh_per_second=12.5)
            # Drawn now: while `import torch` holds the import lock, the refresh thread may not be.
            self._live.start(refresh=True)
        else:
            self._spinner.update(text=text)
            self._live.refresh()

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = self._spinner = None


SPINNER = _Spinner()


def _pull_on_first_use(model: str, spec) -> None:
    """The library's pull on first use (moerun.api.pull_if_missing), rendered: the fit
    line, then a download bar. Offline, load's own message ("not in the local Hugging
    Face cache") stands."""
    from moerun import hub

    if hub.repo_id_for(model) is None or hub.is_cached(hub.repo_id_for(model)) or hub.is_offline():
        return  # nothing to pull: spare the import of torch
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    from moerun.api import pull_if_missing

    repo_id = hub.repo_id_for(model)

    from moerun.progress import Downloaded, FitChecked

    progress = Progress(
        TextColumn("[bold]pulling {task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=Console(stderr=True), transient=True,
    )  # fmt: skip
    task = None

    def on_event(event) -> None:
        nonlocal task
        if isinstance(event, FitChecked):
            sys.stderr.write(f"{repo_id} is not in the local cache: {gib(event.report.meta.download_bytes or 0)} to "
                             f"download; fit at {event.bits} bits: {event.report.plan.describe()}\n")
        elif isinstance(event, Downloaded):
            if task is None:
                progress.start()
                task = progress.add_task(repo_id, total=event.total, completed=event.done)
            progress.update(task, completed=event.done)

    try:
        pull_if_missing(model, spec, on_event)
    finally:
        if task is not None:  # a bar never started prints nothing, not even a blank line
            progress.stop()


def _pull(repo_id: str, revision: Optional[str], repo=None):
    """Download with a Rich bar (bytes, speed, ETA) on stderr; returns the snapshot folder."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    from moerun import hub

    progress = Progress(
        TextColumn("[bold]pulling {task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=Console(stderr=True), transient=True,
    )  # fmt: skip
    task = None

    def on_start(total: int, done: int) -> None:
        nonlocal task
        progress.start()
        task = progress.add_task(repo_id, total=total, completed=done)

    def on_bytes(n: int) -> None:
        progress.advance(task, n)

    try:
        return hub.pull(repo_id, revision, repo=repo, on_start=on_start, on_bytes=on_bytes)
    finally:
        progress.stop()


def _spec(**options) -> LoadSpec:
    from moerun.spec import OptionError

    try:
        return LoadSpec(**options)
    except OptionError as e:
        raise typer.BadParameter(e.usage, param_hint=f"'{e.flag}'") from None


def _load(model: str, spec: LoadSpec):
    _pull_on_first_use(model, spec)
    SPINNER.show(f"loading {model}: starting torch")
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), transient=True,
    )  # fmt: skip
    task = None

    def on_layer(event) -> None:
        nonlocal task
        if task is None:
            SPINNER.stop()  # one live display at a time: the bar says what happens now
            progress.start()
            task = progress.add_task(f"preparing {event.bits}-bit experts (once; cached)", total=event.total)
        progress.update(task, completed=event.done)

    SPINNER.show(f"loading {model} ({spec.bits}-bit experts)")
    try:
        from moerun.api import load_spec  # the API (and torch) only now, when a model is really needed

        return load_spec(model, dataclasses.replace(spec, pull=False), on_layer)  # pulled above, with a bar
    finally:
        if task is not None:  # a bar never started prints nothing, not even a blank line
            progress.stop()


def _sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int, seed: Optional[int]) -> dict:
    return dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)


def format_stats(stats) -> str:
    """The three lines `generate` prints to stderr, as mlx_lm.generate does."""
    return (
        f"prompt: {stats.prompt_tokens} tokens, {stats.prompt_tps:.1f} tok/s\n"
        f"generation: {stats.generated_tokens} tokens, {stats.generation_tps:.1f} tok/s\n"
        f"peak memory: {gib(stats.peak_memory_bytes)}"
    )


def format_expert_stats(total: dict, tokens: int) -> str:
    uses = total["hits"] + total["misses"]
    rate = total["hits"] / uses if uses else 0.0
    return (
        f"experts: {rate:.0%} hit rate ({total['hits']} hits, {total['misses']} misses, "
        f"{total['prefetch_hits']} prefetched, {total['cpu_experts']} on CPU), "
        f"{gib(total['bytes_copied'] / max(tokens, 1))} copied per token"
    )


@app.command()
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
    raw: bool = typer.Option(False, "--raw", help="Feed the prompt as is, without the chat template "
                             "(always, for span-corruption models such as switch-base-8)."),
    as_json: bool = typer.Option(False, "--json", help='Print one JSON object {"text", "token_ids", "stats"}.'),
    verbose: bool = Verbose,
) -> None:
    """Generate a reply to PROMPT (or -f FILE, or stdin): text streams to stdout,
    statistics go to stderr."""
    import time

    prompt = _read_prompt(prompt, prompt_file)
    t0 = time.perf_counter()
    m = _load(model, spec)
    if verbose:
        SPINNER.stop()
        sys.stderr.write(format_plan(m, time.perf_counter() - t0) + "\n")
    kwargs = _sampling(max_new_tokens, temperature, top_p, top_k, seed)
    chat = not raw and m.is_chat_model  # an encoder-decoder without a chat template: raw
    SPINNER.show("processing the prompt")
    if as_json:
        out = m.generate(prompt, chat=chat, **kwargs)
        SPINNER.stop()
        stats = out.stats.to_dict()
        if m.stats:  # expert-cache counters, in total and per layer
            stats["experts"] = m.stats
        payload = {"text": out.text, "token_ids": list(out.token_ids), "stats": stats}
        sys.stdout.write(json.dumps(payload) + "\n")
        return

    stats = None
    text_ends_with_newline = True
    for resp in m.stream_generate(prompt, chat=chat, **kwargs):
        SPINNER.stop()  # the first token is here
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
            sys.stderr.write(f"time to first token: {stats.prompt_seconds * 1000:.0f} ms "
                             f"({stats.prefilled_tokens} prefilled, {stats.reused_tokens} reused); "
                             f"decode {stats.generation_seconds:.2f} s; stop: {stats.finish_reason}\n")  # fmt: skip
        if m.stats:
            sys.stderr.write(format_expert_stats(m.stats["total"], stats.generated_tokens) + "\n")


def _utf8(text: str, what: str) -> str:
    """`text`, if it is UTF-8: Python hands undecodable bytes of argv (and of a stdin read
    with surrogateescape) over as lone surrogates, which the tokenizer cannot take."""
    from moerun.tokenizer import check_utf8

    check_utf8(text, what)
    return text


def _read_prompt(prompt: Optional[str], prompt_file: Optional[Path]) -> str:
    """PROMPT, -f FILE, `-` or a piped stdin, as llama-cli and ollama read them."""
    if prompt is not None and prompt_file is not None:
        raise typer.BadParameter("give PROMPT or -f FILE, not both", param_hint="'--file'")
    if prompt_file is not None:
        try:
            text = prompt_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise MoerunError(f"the prompt file {prompt_file} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at "
                              f"offset {e.start})") from None  # fmt: skip
        except OSError as e:
            raise MoerunError(f"cannot read the prompt file {prompt_file}: {e.strerror or e}") from None
    elif prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        try:
            text = _utf8(sys.stdin.read(), "the prompt from stdin")
        except UnicodeDecodeError as e:  # a stdin decoded strictly
            raise MoerunError(f"the prompt from stdin is not UTF-8 text (byte 0x{e.object[e.start]:02x} at "
                              f"offset {e.start})") from None  # fmt: skip
    elif prompt is None:
        raise typer.BadParameter("give a PROMPT, -f FILE, or pipe the prompt into stdin", param_hint="'PROMPT'")
    else:
        return _utf8(prompt, "the PROMPT argument")
    if not text.strip():
        raise MoerunError(f"the prompt from {prompt_file or 'stdin'} is empty")
    return text.removesuffix("\n")  # the newline that ends a file or `echo` is not part of the prompt


def format_plan(m, load_seconds: float) -> str:
    """--verbose: where the model went, and how long loading took."""
    p = m.plan
    where = {"gpu": "everything on the device", "ram": "everything in RAM (no GPU)"}.get(p.verdict) or (
        f"{p.expert_slots_per_layer} of {p.n_experts} expert slots per layer on the device, the rest in RAM")
    return (f"loaded {m.name} in {load_seconds:.1f} s: {m.device}, {p.dtype}, {p.bits}-bit experts, ctx {p.ctx}\n"
            f"plan: {where}; device {gib(p.gpu_bytes)}, host "
            f"{gib(p.cpu_bytes) if p.verdict == 'offload' else 'n/a'}, KV cache {gib(p.kv_cache_bytes)}")  # fmt: skip


@app.command()
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

    m = _load(model, spec)
    SPINNER.stop()
    if not m.is_chat_model:
        raise MoerunError(f"{model} is a span-corruption encoder-decoder model, not a chat model (its checkpoint "
                          "ships no chat template); use `moerun generate`, e.g. with <extra_id_0> in the prompt")
    failed = run_repl(m, system=system, **_sampling(max_new_tokens, temperature, top_p, top_k, seed))
    if failed and not sys.stdin.isatty():
        raise typer.Exit(1)  # `echo hi | moerun chat demo` in a script: a failed turn is a failure


@app.command()
@loading_options()
def serve(
    model: str = typer.Argument(..., help="Alias (see `moerun models`), Hub repo id or local folder."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", "-p", min=0, max=65535, help="TCP port (0: any free one, printed)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="MOERUN_API_KEY", show_envvar=True,
                                          help="Require Authorization: Bearer KEY on every route but /health."),  # fmt: skip
    origins: Optional[str] = typer.Option(None, "--origins", envvar="MOERUN_ORIGINS", show_envvar=True,
                                          help="Browser origins allowed beside loopback pages, comma list "
                                               "(https://app.example.com, https://*.example.com, *)."),  # fmt: skip
    max_body: str = typer.Option("16MiB", "--max-body", help="Largest request body read; larger ones get 413."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", "-n", min=1,
                                                 help="Default reply limit when a request sets none (default: the context)."),  # fmt: skip
    temperature: float = typer.Option(0.0, "--temperature", "-t", min=0.0, help="Default when a request sets none (0: greedy)."),
    top_p: float = TopP,
    top_k: int = TopK,
    seed: Optional[int] = Seed,
    spec: LoadSpec = LOADING,
) -> None:
    """Serve MODEL over HTTP: OpenAI's /v1 (chat/completions, completions, models) and
    Ollama's /api (chat, generate, show, tags, ps); one generation at a time, Ctrl-C or SIGTERM stops."""
    try:
        from moerun import serve as server
    except ImportError as e:  # an install without the server's dependencies
        raise MoerunError(f"moerun serve needs {e.name} (pip install 'starlette' 'uvicorn')") from e
    from moerun.spec import parse_size
    from moerun.server_protocol import Defaults

    if api_key and not api_key.strip():
        raise typer.BadParameter("the key is blank: every client would be refused", param_hint="'--api-key'")
    api_key = api_key.strip() if api_key else None  # as the server strips the token a client sends
    try:
        allowed_origins = server.parse_origins(origins)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="'--origins'") from None
    try:
        body_limit = parse_size(max_body)
    except MoerunError as e:
        raise typer.BadParameter(str(e), param_hint="'--max-body'") from None
    if body_limit < 1024:
        raise typer.BadParameter(f"{max_body} is too small for a request (at least 1KiB)", param_hint="'--max-body'")
    sock = server.bind(host, port)
    try:
        m = _load(model, spec)
    except BaseException:
        sock.close()
        raise
    finally:
        SPINNER.stop()
    defaults = Defaults(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_new_tokens, seed=seed)
    server.serve(m, host=host, port=port, api_key=api_key, name=server.model_name(model), defaults=defaults,
                 sock=sock, origins=allowed_origins, max_body=body_limit)


def _int_list(text: str, hint: str) -> list[int]:
    """'512' or '128,256' -> whole numbers, none negative."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a whole number or a comma list of them, e.g. 512 or 128,256",
                                 param_hint=hint) from None  # fmt: skip
    if any(v < 0 for v in values):
        raise typer.BadParameter(f"{text!r}: counts cannot be negative", param_hint=hint)
    return values


@app.command()
@loading_options(without=("bits", "vram", "cold", "prefetch"))
def bench(
    model: Optional[str] = typer.Argument(None, help="Alias, Hub repo id or local folder (or use --synthetic)."),
    prompt_tokens: str = typer.Option("512", "-p", "--n-prompt", help="Prompt tokens for pp tests; a comma list sweeps; 0 skips."),
    gen_tokens: str = typer.Option("128", "-n", "--n-gen", help="Generated tokens for tg tests; a comma list sweeps; 0 skips."),
    repetitions: int = typer.Option(3, "-r", "--repetitions", min=1, max=1000,
                                    help="Timed runs per test (after one warm-up), 1 to 1000."),
    bits: str = typer.Option("4", "--bits", "-b", help="Expert bits: 4, 8, 16; a comma list sweeps."),
    vram: Optional[str] = typer.Option(None, "--vram", help="Device budget(s), e.g. 12GiB or 12GiB,24GiB."),
    cold: str = typer.Option("gpu", "--cold", help="gpu, cpu or auto; a comma list sweeps."),
    cuda_graphs: str = typer.Option("on", "--cuda-graphs", help="on, off or on,off: replay tg decode steps from CUDA graphs (CUDA only)."),
    synthetic: Optional[str] = typer.Option(None, "--synthetic", help="Benchmark ALIAS's real shapes with random weights, no download."),
    layers: Optional[int] = typer.Option(None, "--layers", min=1, help="With --synthetic: keep only the first N layers."),
    output: str = typer.Option("md", "-o", "--output", help="md or json."),
    spec: LoadSpec = LOADING,
) -> None:
    """Measure prompt processing (ppN) and generation (tgN) tokens/sec, llama-bench style."""
    if output not in ("md", "json"):
        raise typer.BadParameter("use md or json", param_hint="'-o'")
    bits_list = _int_list(bits, "'--bits'")
    for b in bits_list:
        _spec(bits=b)
    pp, tg = _int_list(prompt_tokens, "'-p'"), _int_list(gen_tokens, "'-n'")
    colds = cold.split(",")
    for c in colds:
        _cold(c)
    if model is not None and synthetic is None:
        _pull_on_first_use(model, dataclasses.replace(spec, bits=bits_list[0], vram=vram.split(",")[0] if vram else None))
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from moerun import bench as benchmark

    vrams = vram.split(",") if vram else [None]
    graph_flags = cuda_graphs.split(",")
    if any(g not in ("on", "off") for g in graph_flags):
        raise typer.BadParameter("use on, off or on,off", param_hint="'--cuda-graphs'")
    graph_modes = [g == "on" for g in graph_flags]
    # pp runs once per combination, tg once per graph mode (an estimate on the CPU, where graphs are off).
    tests = sum(1 for v in pp if v) + sum(1 for v in tg if v) * len(set(graph_modes))
    runs = len(bits_list) * len(vrams) * len(colds) * tests * repetitions
    if sys.stderr.isatty():
        progress = Progress(TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(), console=Console(stderr=True),
                            transient=True)  # fmt: skip
        task = progress.add_task("bench", total=runs)
        advance = lambda: progress.advance(task)  # noqa: E731
    else:  # piped: a Rich bar would stay silent until the end, so plain lines every few seconds
        progress = _Ticker("bench", runs)
        advance = progress.advance
    with progress:
        report = benchmark.run_bench(
            model=model, synthetic=synthetic, prompt_tokens=pp, gen_tokens=tg, repetitions=repetitions, bits=bits_list,
            vram=vrams, cold=colds, cuda_graphs=graph_modes, layers=layers, spec=spec, progress=advance,
        )  # fmt: skip
    if output == "json":
        sys.stdout.write(json.dumps(report, default=str) + "\n")
    else:
        sys.stdout.write(benchmark.render_markdown(report) + "\n")


class _Ticker:
    """Progress for a pipe or a log: `NAME: done/total runs, elapsed` on stderr every
    MOERUN_PROGRESS_S seconds (default 10) while work is under way, from a thread, so a
    long first run (a full-size synthetic model) still shows signs of life."""

    def __init__(self, name: str, total: int):
        import threading

        self.name, self.total, self.done = name, total, 0
        self.every = float(os.environ.get("MOERUN_PROGRESS_S") or 10)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def advance(self) -> None:
        self.done += 1

    def _run(self) -> None:
        import time

        t0 = time.monotonic()
        while not self._stop.wait(self.every):
            sys.stderr.write(f"{self.name}: {self.done}/{self.total} runs done, {time.monotonic() - t0:.0f} s\n")
            sys.stderr.flush()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@app.command()
def models() -> None:
    """List the model aliases: total / active parameters, and whether each fits this
    machine (from the cache or the config shipped with moerun; no network)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from moerun import fit as fitting
    from moerun.registry import ALIASES

    con = Console()  # as wide as the terminal (or COLUMNS); 80 when piped
    wide = con.width >= 110  # the repo ids only when they fit
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    table.add_column("alias", style="bold", no_wrap=True)
    if wide:
        table.add_column("repo id", no_wrap=True)
    table.add_column("params", justify="right", no_wrap=True, min_width=6)
    table.add_column("active", justify="right", no_wrap=True, min_width=6)
    table.add_column("fits here", no_wrap=True)
    words = {"gpu": "yes, GPU", "ram": "yes", "offload": "offload", "no": "no"}
    device = None
    for key in sorted(ALIASES):
        a = ALIASES[key]
        r = fitting.quick_verdict(key)
        if r is None:
            total = active = verdict = "?"
        else:
            device = device or r
            total, active = params_short(r.summary.total_params), params_short(r.summary.active_params)
            verdict = words[r.plan.verdict]
            if r.recommended_bits:
                verdict += f" ({r.recommended_bits}-bit)"
        table.add_row(key, *([a.repo_id] if wide else []), total, active, verdict)
    con.print(table)
    if device is not None:
        where = "in RAM, on the CPU" if device.device == "cpu" else "on this GPU, experts offloaded to RAM"
        con.print(f"fits here: {where} (RAM budget {gib(device.plan.ram_budget)})")
        con.print("`moerun fit ALIAS` says why; `--gpu NAME` plans another card", style="dim")
    if not wide:
        con.print("repo ids: in a terminal of 110 columns or more", style="dim")


@app.command()
def fit(
    model: Optional[str] = typer.Argument(None, help="Alias, Hub repo id or local folder."),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="Plan for this card, e.g. rtx-3060 (list: --gpu list)."),
    vram: Optional[str] = typer.Option(None, "--vram", help="Device memory budget, e.g. 12GiB (default: free VRAM)."),
    ram: Optional[str] = typer.Option(None, "--ram", help="Host RAM: 32GiB, ddr5-5600x2 or both (default: free RAM)."),
    ram_bandwidth: Optional[str] = typer.Option(None, "--ram-bandwidth", help="Host RAM bandwidth, e.g. 90GB/s."),
    bits: Optional[int] = typer.Option(None, "--bits", "-b", help="Expert bits 4, 8 or 16 (default: the recommendation)."),
    ctx: Optional[int] = typer.Option(None, "--ctx", min=1, help="Context to plan the KV cache for (default: min(model's, 4096))."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch, tag or commit on the Hub."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Non-expert weights' dtype (default: as load would choose)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Will MODEL fit, and how fast could it run, here or on another card? Reads
    config.json and the safetensors headers only (HTTP range requests), never the weights."""
    if gpu == "list":
        _render_gpus(as_json)
        return
    if model is None:
        raise typer.BadParameter("give a MODEL (an alias, a Hub repo id or a folder)", param_hint="'MODEL'")
    if bits is not None:
        _spec(bits=bits)
    from moerun import fit as fitting

    report = fitting.fit(model, bits=bits, vram=vram, ram=ram, ctx=ctx, revision=revision, dtype=dtype, gpu=gpu,
                         ram_bandwidth=ram_bandwidth)  # fmt: skip
    if as_json:
        sys.stdout.write(json.dumps(report.to_dict()) + "\n")
        return
    _render_fit(report)


def _render_gpus(as_json: bool) -> None:
    import dataclasses

    from rich import box
    from rich.console import Console
    from rich.table import Table

    from moerun import gpus

    if as_json:
        sys.stdout.write(json.dumps([dataclasses.asdict(g) for g in gpus.GPUS.values()]) + "\n")
        return
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    t.add_column("--gpu", no_wrap=True)
    t.add_column("card", no_wrap=True)
    t.add_column("memory", justify="right", no_wrap=True)
    t.add_column("bandwidth", justify="right", no_wrap=True)
    t.add_column("link", no_wrap=True)
    for g in gpus.GPUS.values():
        name = g.name.removeprefix("GeForce ").removeprefix("Radeon ")
        t.add_row(g.key, name, f"{g.memory_gib} GiB", f"{g.bandwidth_gbs:.0f} GB/s", g.link)
    con = Console()
    con.print(t)
    con.print("unified: Apple's one memory, no offload; the largest sold (--ram sets yours)", style="dim")


def _say(con, text: str, indent: int = 0) -> None:
    """Print `text` in lines no wider than the console, broken between phrases (after
    ", ", "; " or ": ") where it can be, else between words; continuation lines indented
    two more than the first."""
    import re
    import textwrap

    width = max(con.width, 40)
    first, rest = " " * indent, " " * (indent + 2)
    phrases = re.split(r"(?<=[,;:]) ", text)
    lines, line = [], first
    for phrase in phrases:
        joined = phrase if line.strip() == "" else f"{line} {phrase}"
        if line.strip() == "":
            joined = line + phrase
        if len(joined) <= width:
            line = joined
            continue
        if line.strip():
            lines.append(line)
        line = rest + phrase
        if len(line) > width:  # one phrase wider than the line: between words
            wrapped = textwrap.wrap(phrase, width=width, initial_indent=rest, subsequent_indent=rest,
                                    break_long_words=False, break_on_hyphens=False)  # fmt: skip
            lines += wrapped[:-1]
            line = wrapped[-1]
    lines.append(line)
    for out in lines:
        con.print(out, soft_wrap=True, highlight=False)


def _render_fit(r) -> None:
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from moerun.plan import ROLES

    con = Console()
    s, p, d = r.summary, r.plan, r.to_dict()
    src = {"hub": "config.json and safetensors headers from the Hub", "folder": "a local folder",
           "cache": "the local Hugging Face cache", "shipped config": "the config shipped with moerun"}[r.meta.source]  # fmt: skip
    con.print(f"[bold]{escape(r.meta.name)}[/] · {r.meta.config.get('model_type')}", soft_wrap=True)
    _say(con, f"from {src}" + (f" ({gib(r.meta.bytes_read)} read)" if r.meta.bytes_read else ""))
    con.print(f"weights at {p.bits} bits (experts), {p.dtype} (the rest):", highlight=False)
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    t.add_column("role", no_wrap=True)
    t.add_column("params", justify="right", no_wrap=True)
    t.add_column("bytes", justify="right", no_wrap=True)
    for role in ROLES:
        n = s.params_by_role.get(role, 0)
        if n:
            t.add_row(role.replace("_", " "), params_short(n), gib(p.weight_bytes_by_role[role]))
    t.add_row("[bold]total", f"[bold]{params_short(s.total_params)}", f"[bold]{gib(p.weight_bytes)}")
    con.print(t)
    _say(con, f"active per token: {params_short(s.active_params)} of {params_short(s.total_params)} "
              f"({s.experts_per_token} of {p.n_experts} experts in {p.n_moe_layers} MoE layers)")  # fmt: skip
    if s.unused_params:
        _say(con, f"not loaded (vision tower / multi-token prediction): {params_short(s.unused_params)}")
    _say(con, f"stored in the checkpoint: {gib(d['stored_bytes'])}")
    if r.meta.download_bytes:
        _say(con, f"`moerun pull` downloads {gib(r.meta.download_bytes)}")
    words = {"kv": "GQA", "mla": "MLA latent", "kv+window": "sliding-window ring"}
    kinds = [k for k in s.kv_kind.split(", ") if k in words]
    recurrent = [k for k in s.kv_kind.split(", ") if k not in words and k != "none"]
    _say(con, f"KV cache ({', '.join(words[k] for k in kinds) or 'none'}) at {p.ctx} tokens: {gib(p.kv_cache_bytes)}")
    if recurrent:
        _say(con, f"of which {gib(d['fixed_state_bytes'])} is recurrent state ({', '.join(recurrent)}): "
                  "a fixed size, not per token", 2)  # fmt: skip
    if r.gpu is not None:
        g = r.gpu
        target = f"{g.name}: {g.memory_gib} GiB, {g.bandwidth_gbs:.0f} GB/s, {g.link}"
    elif r.device == "cuda":
        target = f"a GPU with {gib(p.vram_budget)} for moerun"
    else:
        target = "this machine's CPU, no GPU"
    _say(con, f"plan for {target}")
    if r.device == "cpu" or r.device == "unified":
        _say(con, f"memory: {gib(p.ram_budget)}, holding weights, KV cache and experts", 2)
    else:
        _say(con, f"VRAM budget {gib(p.vram_budget)}, host RAM budget {gib(p.ram_budget)}", 2)
    if p.verdict == "gpu":
        _say(con, f"fits: everything on the GPU ({gib(p.gpu_bytes)})", 2)
    elif p.verdict == "ram":
        _say(con, f"fits: everything in {'unified memory' if r.device == 'unified' else 'RAM'} ({gib(p.ram_bytes)})", 2)
    elif p.verdict == "offload":
        _say(con, f"offload: {p.expert_slots_per_layer} of {p.n_experts} expert slots per layer on the GPU "
                  f"({gib(p.gpu_bytes)}); the expert store in RAM needs {gib(p.cpu_bytes)}", 2)  # fmt: skip
    else:
        short = f", short by {gib(d['short_by_bytes'])}" if d["short_by_bytes"] else ""
        _say(con, f"does not fit: {p.reason}{short}", 2)
    if p.verdict != "no":
        lo, hi = r.tok_s
        bw = r.bw
        _say(con, f"decode at batch 1: {lo:.1f}-{hi:.1f} tok/s")
        parts = [f"RAM {bw.ram / 1e9:.0f} GB/s {bw.source['ram']}"]
        if r.device == "cuda":
            parts[:0] = [f"VRAM {bw.vram / 1e9:.0f} GB/s {bw.source['vram']}", f"PCIe {bw.pcie / 1e9:.0f} GB/s {bw.source['pcie']}"]
        _say(con, f"(bounds from bytes per token; {', '.join(parts)})", 2)
    verdicts = ", ".join(f"{b}-bit: {q.verdict}" for b, q in r.plans.items())
    rec = f"recommended: --bits {r.recommended_bits}" if r.recommended_bits else "nothing fits these budgets"
    _say(con, f"{verdicts}; {rec}")
    if r.suggestions:
        con.print("to make it fit:")
        for line in r.suggestions:
            _say(con, line, 2)
    for w in r.warnings:
        _say(con, f"warning: {w}")


@app.command()
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
    folder = _pull(repo_id, revision, repo=repo)
    sys.stderr.write(f"pulled {repo_id} ({gib(repo.size)}, {len(repo.files)} files) into {folder}\n")


# -- the local library: ls, rm, show (moerun.library does the work) --------------------------

WIDTH = 80  # what `ls` and `show` fit in, whatever the terminal


def _fit_text(text: str, width: int = WIDTH) -> str:
    """Cut a line to `width` characters, keeping its end (paths end with what matters)."""
    return text if len(text) <= width else "…" + text[len(text) - width + 1 :]


def _cache_words(c) -> str:
    return f"{c.bits}-bit experts ({c.formats})" if c.bits else f"experts ({c.formats})"


@app.command("ls")
def ls_(as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """List the models pulled into the Hugging Face cache: revision, size on disk, their
    quantized expert caches and when each was last used."""
    from moerun import library

    revisions = library.pulled()
    others = library.other_caches(revisions)
    if as_json:
        payload = {"models": [r.to_dict() for r in revisions], "other_quantized_caches": [c.to_dict() for c in others]}
        sys.stdout.write(json.dumps(payload) + "\n")
        return
    if not revisions and not others:
        sys.stderr.write(f"no models pulled into {library.hub.hub_cache_dir()} (try `moerun pull ALIAS`)\n")
        return
    rows = []  # (name, revision, size, last used); a blank revision for sub-rows
    for r in revisions:
        rev = r.commit[:12]
        rows.append((r.alias or r.repo_id, rev, gib(r.size), library.ago(r.last_used)))
        if r.alias:
            rows.append(("  " + r.repo_id, "", "", ""))
        for c in r.caches:
            rows.append(("  " + _cache_words(c), "", gib(c.size), library.ago(c.last_used)))
    tail = 2 + 12 + 2 + 10 + 2 + 14  # revision, size and "59 minutes ago"
    w = min(max([len("NAME")] + [len(n) for n, rev, size, _ in rows if size]), WIDTH - tail)
    lines = [f"{'NAME':<{w}}  {'REVISION':<12}  {'SIZE':<10}  LAST USED"] if rows else []
    for name, rev, size, used in rows:
        if not size:
            lines.append(_fit_text(name))
        elif len(name) > w:
            lines += [_fit_text(name), f"{'':<{w}}  {rev:<12}  {size:<10}  {used}"]
        else:
            lines.append(f"{name:<{w}}  {rev:<12}  {size:<10}  {used}")
    if others:
        lines += ["" if lines else None, "quantized caches of local folders or removed snapshots (moerun rm FOLDER):"]
        for c in others:
            gone = "" if Path(c.source).exists() else " (source gone)"
            lines.append(f"  {_cache_words(c)}, {gib(c.size)}, last used {library.ago(c.last_used)}{gone}")
            lines.append(_fit_text("    " + c.source))
    sys.stdout.write("\n".join(line for line in lines if line is not None) + "\n")


@app.command("rm")
def rm_(
    model: str = typer.Argument(..., help="Alias or Hub repo id of a pulled model, or a folder whose quantized "
                                          "caches to remove (see `moerun ls`)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Only this revision (commit, prefix or ref)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before deleting."),
) -> None:
    """Remove a pulled model: its snapshots, the blobs no other revision uses, and the
    quantized expert caches built from it. Given a folder (or a cache's path, as `ls`
    prints them), remove only the quantized caches built from it, even if it is gone."""
    from moerun import library

    removal = library.plan_removal(model, revision)
    n = len(removal.caches)
    caches = f"{n} quantized cache{'s' if n != 1 else ''}"
    if removal.loose_caches and not removal.revisions:  # caches alone, named by a path or the demo
        what = f"{caches} of {removal.repo_id} ({gib(removal.bytes)})"
    else:
        revs = ", ".join(r.commit[:12] for r in removal.revisions) or "partial download"
        what = f"{removal.repo_id} ({revs}" + (f"; {caches}" if n else "") + f"; {gib(removal.bytes)})"
    if not yes:
        if not sys.stdin.isatty():
            raise MoerunError(f"not removing {what} without asking: stdin is not a terminal; pass -y")
        sys.stderr.write(f"remove {what}? [y/N] ")
        sys.stderr.flush()
        answer = sys.stdin.readline().strip().lower()
        if answer not in ("y", "yes"):
            sys.stderr.write("nothing removed\n")
            return
    removal.apply()
    sys.stderr.write(f"removed {what}\n")


@app.command("show")
def show_(
    model: str = typer.Argument(..., help="Alias, Hub repo id or local folder."),
    revision: Optional[str] = typer.Option(None, "--revision", help="A revision in the cache."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Describe a model from the files on this machine: architecture, parameters, context,
    chat template, license, quantized caches, and whether it fits here."""
    import textwrap

    from moerun import library

    info = library.show(model, revision)
    if as_json:
        sys.stdout.write(json.dumps(info.to_dict()) + "\n")
        return
    src = {"cache": "the local Hugging Face cache", "folder": "a local folder", "shipped with moerun": "moerun itself",
           "shipped config": "the config shipped with moerun (not pulled)"}[info.source]  # fmt: skip
    title = info.alias or info.repo_id or info.name
    rows = [("model", title + (f" ({info.repo_id})" if info.alias and info.repo_id else "")), ("from", src)]
    if info.folder is not None:
        rows.append(("folder", str(info.folder)))
    arch = info.model_type or "?"
    rows.append(("architecture", arch + (f" ({', '.join(info.architectures)})" if info.architectures else "")))
    if info.total_params:
        rows.append(("parameters", f"{params(info.total_params)} total, "
                                   f"{params(info.active_params)} active per token"))  # fmt: skip
    if info.n_experts:
        rows.append(("experts", f"{info.n_experts} per MoE layer, {info.experts_per_token} per token; "
                                f"{info.n_layers} layers"))  # fmt: skip
    rows.append(("context", f"{info.context} tokens" if info.context else "n/a"))
    if info.folder is None:
        rows.append(("chat template", "n/a (not pulled)"))
    elif info.chat_template is None:
        rows.append(("chat template", "none (prompts are sent as plain text)"))
    else:
        rows.append(("chat template", "yes, it starts:"))
        rows += [("", line) for line in library.template_head(info.chat_template, width=WIDTH - 18)]
    rows.append(("license", info.license or "not in the local files (see the model card)"))
    for c in info.caches:
        rows.append(("quantized", f"{_cache_words(c)}, {gib(c.size)}, "
                                  f"last used {library.ago(c.last_used)}"))  # fmt: skip
    f = info.fit
    if f is None:
        rows.append(("fits here", "n/a (no weights or an unknown family)"))
    else:  # fit's quick verdict: metadata on this machine, no measurement
        p, where = f.plan, "GPU" if f.device == "cuda" else "CPU (host RAM)"
        words = {"gpu": f"yes, everything on the {where} ({gib(p.gpu_bytes)})",
                 "ram": f"yes, everything in RAM ({gib(p.ram_bytes)}; no GPU)",
                 "offload": f"offload: {p.expert_slots_per_layer} of {p.n_experts} expert slots per layer on the {where} "
                            f"({gib(p.gpu_bytes)}), all experts in RAM ({gib(p.cpu_bytes)})",
                 "no": f"no: {p.reason}"}[p.verdict]  # fmt: skip
        rows.append(("fits here", f"at {p.bits} bits: {words}"))
        rows.append(("recommended", f"--bits {f.recommended_bits}" if f.recommended_bits else "nothing fits here"))
    lines = []
    for key, value in rows:
        lines += textwrap.wrap(value, WIDTH, initial_indent=f"{key:<16}", subsequent_indent=" " * 16,
                               break_on_hyphens=False) or [key]  # fmt: skip
    sys.stdout.write("\n".join(_fit_text(line) for line in lines) + "\n")


def _one_line(exc: BaseException) -> str:
    # Exactly one line, whatever the message: scripts grep for `error:`.
    msg = " ".join(str(exc).split())
    return msg or type(exc).__name__


def main() -> None:
    """Console-script entry: run the app, turning every exception into one `error:` line
    (usage errors too: exit code 2, as click gives them, but one line, not a box)."""
    # Typer's own click (vendored in typer._click, or click itself), found without naming it.
    clicks = sys.modules[typer.BadParameter.__module__]

    debug = os.environ.get("MOERUN_DEBUG", "") not in ("", "0")
    try:
        try:
            code = app(standalone_mode=False)
        finally:
            SPINNER.stop()  # before any error line
        if isinstance(code, int) and code:  # typer.Exit(code) from a verb
            sys.exit(code)
    except clicks.NoArgsIsHelpError as exc:  # bare `moerun` or a bare group: the help
        exc.show()
        sys.exit(exc.exit_code)
    except clicks.ClickException as exc:
        sys.stderr.write(f"error: {_one_line(exc.format_message())}\n")
        sys.exit(exc.exit_code)
    except typer.Abort:  # Ctrl-C or EOF outside a verb's own handling
        sys.stderr.write("Aborted!\n")
        sys.exit(1)
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
