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
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")


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


def _cold(value: str) -> str:
    if value not in ("gpu", "cpu", "auto"):
        raise typer.BadParameter(f"{value} is not one of gpu, cpu, auto")
    return value


# Options shared by `generate` and `chat`, declared once so that the two verbs agree.
MaxNewTokens = typer.Option(128, "--max-new-tokens", "-n", min=1, help="Most tokens to generate per reply.")
Temperature = typer.Option(0.0, "--temperature", "-t", min=0.0, help="0 means greedy decoding.")
TopP = typer.Option(1.0, "--top-p", callback=_top_p, help="Nucleus sampling mass in (0, 1] (1.0: off).")
TopK = typer.Option(0, "--top-k", min=0, help="Sample among the k likeliest tokens (0: off).")
Seed = typer.Option(None, "--seed", min=0, max=(1 << 63) - 1, help="Random seed for sampling (0 to 2**63-1).")
Bits = typer.Option(16, "--bits", "-b", help="Expert weight bits: 4, 8 or 16.")
Device = typer.Option("auto", "--device", "-d", help="auto, cpu or cuda.")
Vram = typer.Option(None, "--vram", help="Device memory budget, e.g. 12GiB (default: free VRAM minus a reserve).")
Ram = typer.Option(None, "--ram", help="Host memory budget for the expert store, e.g. 32GiB.")
ExpertSlots = typer.Option(None, "--expert-slots", min=1, help="Expert slots per MoE layer (overrides the planner).")
Cold = typer.Option("gpu", "--cold", callback=_cold, help="Where non-resident experts run: gpu (copied in), cpu, or auto.")
Ctx = typer.Option(None, "--ctx", min=16, help="Context length to plan the KV cache for (default: min(model's, 4096)).")
NoPrefetch = typer.Option(False, "--no-prefetch", help="Do not guess and copy the next layer's experts early.")
Dtype = typer.Option("auto", "--dtype", help="Non-expert weights and compute: auto (as stored; float32 on a CPU "
                     "without native bf16/fp16), bfloat16, float16 or float32.")
Threads = typer.Option(None, "--threads", min=1, help="CPU threads for the CPU kernels and torch (default: the cores).")


Force = typer.Option(False, "--force", help="Download and load even when the fit check says it will not fit.")


def _pull_on_first_use(model: str, bits: int, vram, ram, ctx, force: bool) -> None:
    """The library's pull on first use (moerun.api.pull_if_missing), rendered: the fit
    line, then a download bar. Offline, load's own message ("not in the local Hugging
    Face cache") stands."""
    from moerun import hub

    if hub.repo_id_for(model) is None or hub.is_cached(hub.repo_id_for(model)) or hub.is_offline():
        return  # nothing to pull: spare the import of torch
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    from moerun.api import pull_if_missing
    from moerun.plan import gib

    repo_id = hub.repo_id_for(model)

    def notice(report) -> None:
        sys.stderr.write(f"{repo_id} is not in the local cache: {gib(report.meta.download_bytes or 0)} to download; "
                         f"fit at {bits} bits: {_verdict_words(report.plan)}\n")  # fmt: skip

    progress = Progress(
        TextColumn("[bold]pulling {task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=Console(stderr=True), transient=True,
    )  # fmt: skip
    task = None

    def on_start(total: int, done: int) -> None:
        nonlocal task
        progress.start()
        task = progress.add_task(repo_id, total=total, completed=done)

    try:
        pull_if_missing(model, bits, vram, ram, ctx, force, notice, on_start, lambda n: progress.advance(task, n))
    finally:
        if task is not None:  # a bar never started prints nothing, not even a blank line
            progress.stop()


def _verdict_words(p) -> str:
    from moerun.plan import gib

    if p.verdict == "gpu":
        return f"everything on the {'GPU' if p.vram_budget else 'device'} ({gib(p.gpu_bytes)})"
    if p.verdict == "offload":
        return (f"offload: {p.expert_slots_per_layer} of {p.n_experts} expert slots per layer on the device "
                f"({gib(p.gpu_bytes)}), all experts in RAM ({gib(p.cpu_bytes)})")  # fmt: skip
    return f"does not fit: {p.reason}"


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


def _load(model: str, bits: int, device: str, vram=None, ram=None, expert_slots=None, cold="gpu", ctx=None,
          no_prefetch=False, force=False, dtype="auto", threads=None):  # fmt: skip
    if bits not in BITS:
        raise typer.BadParameter(f"{bits} is not one of 4, 8, 16", param_hint="'--bits'")
    if dtype not in DTYPE_CHOICES:
        raise typer.BadParameter(f"{dtype} is not one of {', '.join(DTYPE_CHOICES)}", param_hint="'--dtype'")
    _pull_on_first_use(model, bits, vram, ram, ctx, force)
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
            prefetch=not no_prefetch, ctx=ctx, progress=on_layer, dtype=dtype, threads=threads,
            pull=False,  # _pull_on_first_use did it, with a bar
        )  # fmt: skip
    finally:
        if task is not None:  # a bar never started prints nothing, not even a blank line
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
    force: bool = Force,
    dtype: str = Dtype,
    threads: Optional[int] = Threads,
    raw: bool = typer.Option(False, "--raw", help="Feed the prompt as is, without the chat template."),
    as_json: bool = typer.Option(False, "--json", help='Print one JSON object {"text", "token_ids", "stats"}.'),
) -> None:
    """Generate a reply to PROMPT: text streams to stdout, statistics go to stderr."""
    m = _load(model, bits, device, vram, ram, expert_slots, cold, ctx, no_prefetch, force, dtype, threads)
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
    force: bool = Force,
    dtype: str = Dtype,
    threads: Optional[int] = Threads,
    system: Optional[str] = typer.Option(None, "--system", "-s", help="System prompt, kept across /reset."),
) -> None:
    """Chat with a model in the terminal, like `ollama run` (type /help inside)."""
    from moerun.chat import run_repl

    m = _load(model, bits, device, vram, ram, expert_slots, cold, ctx, no_prefetch, force, dtype, threads)
    run_repl(m, system=system, **_sampling(max_new_tokens, temperature, top_p, top_k, seed))


@app.command()
def serve(
    model: str = typer.Argument(..., help="Alias (see `moerun models`), Hub repo id or local folder."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", "-p", min=0, max=65535, help="TCP port (0: any free one, printed)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="MOERUN_API_KEY", show_envvar=True,
                                          help="Require Authorization: Bearer KEY on every route but /health."),  # fmt: skip
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", "-n", min=1,
                                                 help="Default reply limit when a request sets none (default: the context)."),  # fmt: skip
    temperature: float = typer.Option(0.0, "--temperature", "-t", min=0.0, help="Default when a request sets none (0: greedy)."),
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
    force: bool = Force,
    dtype: str = Dtype,
    threads: Optional[int] = Threads,
) -> None:
    """Serve MODEL over HTTP: OpenAI's /v1 (chat/completions, completions, models) and
    Ollama's /api (chat, generate, tags, ps); one generation at a time, Ctrl-C stops."""
    try:
        from moerun import serve as server
    except ImportError as e:  # an install without the server's dependencies
        raise MoerunError(f"moerun serve needs {e.name} (pip install 'starlette' 'uvicorn')") from e
    from moerun.server_protocol import Defaults

    sock = server.bind(host, port)
    try:
        m = _load(model, bits, device, vram, ram, expert_slots, cold, ctx, no_prefetch, force, dtype, threads)
    except BaseException:
        sock.close()
        raise
    defaults = Defaults(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_new_tokens, seed=seed)
    server.serve(m, host=host, port=port, api_key=api_key or None, name=server.model_name(model), defaults=defaults,
                 sock=sock)


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
def bench(
    model: Optional[str] = typer.Argument(None, help="Alias, Hub repo id or local folder (or use --synthetic)."),
    prompt_tokens: str = typer.Option("512", "-p", "--n-prompt", help="Prompt tokens for pp tests; a comma list sweeps; 0 skips."),
    gen_tokens: str = typer.Option("128", "-n", "--n-gen", help="Generated tokens for tg tests; a comma list sweeps; 0 skips."),
    repetitions: int = typer.Option(3, "-r", "--repetitions", min=1, help="Timed runs per test (after one warm-up)."),
    bits: str = typer.Option("4", "--bits", "-b", help="Expert bits: 4, 8, 16; a comma list sweeps."),
    vram: Optional[str] = typer.Option(None, "--vram", help="Device budget(s), e.g. 12GiB or 12GiB,24GiB."),
    ram: Optional[str] = Ram,
    cold: str = typer.Option("gpu", "--cold", help="gpu, cpu or auto; a comma list sweeps."),
    cuda_graphs: str = typer.Option("on", "--cuda-graphs", help="on, off or on,off: replay tg decode steps from CUDA graphs (CUDA only)."),
    ctx: Optional[int] = Ctx,
    expert_slots: Optional[int] = ExpertSlots,
    synthetic: Optional[str] = typer.Option(None, "--synthetic", help="Benchmark ALIAS's real shapes with random weights, no download."),
    layers: Optional[int] = typer.Option(None, "--layers", min=1, help="With --synthetic: keep only the first N layers."),
    device: str = Device,
    output: str = typer.Option("md", "-o", "--output", help="md or json."),
    force: bool = typer.Option(False, "--force", help="Download and run even if the fit check says it will not fit."),
    dtype: str = Dtype,
    threads: Optional[int] = Threads,
) -> None:
    """Measure prompt processing (ppN) and generation (tgN) tokens/sec, llama-bench style."""
    if output not in ("md", "json"):
        raise typer.BadParameter("use md or json", param_hint="'-o'")
    bits_list = _int_list(bits, "'--bits'")
    for b in bits_list:
        if b not in BITS:
            raise typer.BadParameter(f"{b} is not one of 4, 8, 16", param_hint="'--bits'")
    pp, tg = _int_list(prompt_tokens, "'-p'"), _int_list(gen_tokens, "'-n'")
    colds = cold.split(",")
    for c in colds:
        _cold(c)
    if model is not None and synthetic is None:
        _pull_on_first_use(model, bits_list[0], vram.split(",")[0] if vram else None, ram, ctx, force)
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
    with Progress(TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(), console=Console(stderr=True),
                  transient=True) as progress:  # fmt: skip
        task = progress.add_task("bench", total=runs)
        report = benchmark.run_bench(
            model=model, synthetic=synthetic, prompt_tokens=pp, gen_tokens=tg, repetitions=repetitions, bits=bits_list,
            vram=vrams, cold=colds, cuda_graphs=graph_modes, ctx=ctx, layers=layers, device=device, expert_slots=expert_slots,
            ram=ram, progress=lambda: progress.advance(task), dtype=dtype, threads=threads,
        )  # fmt: skip
    if output == "json":
        sys.stdout.write(json.dumps(report, default=str) + "\n")
    else:
        sys.stdout.write(benchmark.render_markdown(report) + "\n")


@app.command()
def models() -> None:
    """List the model aliases: repo id, total / active parameters, and whether each fits
    this machine (from the cache or the config shipped with moerun; no network)."""
    from rich.console import Console
    from rich.table import Table

    from moerun import fit as fitting
    from moerun.registry import ALIASES

    table = Table(title="moerun models")
    table.add_column("alias", style="bold", no_wrap=True)
    table.add_column("repo id", no_wrap=True)
    table.add_column("params", justify="right", no_wrap=True)
    table.add_column("active", justify="right", no_wrap=True)
    table.add_column("fits here", no_wrap=True)
    for key in sorted(ALIASES):
        a = ALIASES[key]
        r = fitting.quick_verdict(key)
        if r is None:
            params = active = verdict = "?"
        else:
            params, active = _params(r.summary.total_params), _params(r.summary.active_params)
            verdict = {"gpu": "yes", "offload": "offload", "no": "no"}[r.plan.verdict]
            if r.recommended_bits:
                verdict += f" ({r.recommended_bits}-bit)"
        table.add_row(key, a.repo_id, params, active, verdict)
    # Piped output would be cut at 80 columns; the table is meant to be read whole.
    Console(width=None if sys.stdout.isatty() else 110).print(table)


def _params(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


@app.command()
def fit(
    model: str = typer.Argument(..., help="Alias, Hub repo id or local folder."),
    vram: Optional[str] = typer.Option(None, "--vram", help="Device memory budget, e.g. 12GiB (default: free VRAM)."),
    ram: Optional[str] = typer.Option(None, "--ram", help="Host memory budget, e.g. 32GiB (default: free RAM)."),
    bits: Optional[int] = typer.Option(None, "--bits", "-b", help="Expert bits 4, 8 or 16 (default: the recommendation)."),
    ctx: Optional[int] = typer.Option(None, "--ctx", min=1, help="Context to plan the KV cache for (default: min(model's, 4096))."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch, tag or commit on the Hub."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Non-expert weights' dtype (default: as load would choose)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Will MODEL fit, and how fast could it run? Reads config.json and the safetensors
    headers only (HTTP range requests), never the weights."""
    if bits is not None and bits not in BITS:
        raise typer.BadParameter(f"{bits} is not one of 4, 8, 16", param_hint="'--bits'")
    from moerun import fit as fitting

    report = fitting.fit(model, bits=bits, vram=vram, ram=ram, ctx=ctx, revision=revision, dtype=dtype)
    if as_json:
        sys.stdout.write(json.dumps(report.to_dict()) + "\n")
        return
    _render_fit(report)


def _render_fit(r) -> None:
    from rich.console import Console
    from rich.table import Table

    from moerun.plan import ROLES, gib

    con = Console()
    s, p, d = r.summary, r.plan, r.to_dict()
    src = {"hub": "config.json and safetensors headers from the Hub", "folder": "a local folder",
           "cache": "the local Hugging Face cache", "shipped config": "the config shipped with moerun"}[r.meta.source]  # fmt: skip
    con.print(f"[bold]{r.meta.name}[/] · {r.meta.config.get('model_type')} · from {src}"
              + (f" ({gib(r.meta.bytes_read)} read)" if r.meta.bytes_read else ""))  # fmt: skip
    t = Table(title=f"weights at {p.bits} bits (experts), {p.dtype} (the rest)")
    t.add_column("role")
    t.add_column("params", justify="right")
    t.add_column("bytes", justify="right")
    for role in ROLES:
        n = s.params_by_role.get(role, 0)
        if n:
            t.add_row(role.replace("_", " "), _params(n), gib(p.weight_bytes_by_role[role]))
    t.add_row("[bold]total", f"[bold]{_params(s.total_params)}", f"[bold]{gib(p.weight_bytes)}")
    con.print(t)
    con.print(f"active per token: {_params(s.active_params)} of {_params(s.total_params)} "
              f"({s.experts_per_token} of {p.n_experts} experts in {p.n_moe_layers} MoE layers)")  # fmt: skip
    if s.unused_params:
        con.print(f"not loaded (vision tower / multi-token prediction): {_params(s.unused_params)}")
    stored = d["stored_bytes"]
    line = f"stored in the checkpoint: {gib(stored)}"
    if r.meta.download_bytes:
        line += f"; `moerun pull` downloads {gib(r.meta.download_bytes)}"
    con.print(line)
    words = {"kv": "GQA", "mla": "MLA latent", "kv+window": "sliding-window ring"}
    kinds = [k for k in s.kv_kind.split(", ") if k in words]
    recurrent = [k for k in s.kv_kind.split(", ") if k not in words and k != "none"]
    line = f"KV cache ({', '.join(words[k] for k in kinds) or 'none'}) at {p.ctx} tokens: {gib(p.kv_cache_bytes)}"
    if recurrent:
        line += (f", of which {gib(d['fixed_state_bytes'])} is recurrent state ({', '.join(recurrent)}): "
                 "a fixed size, not per token")  # fmt: skip
    con.print(line)
    budget = f"VRAM budget {gib(p.vram_budget)}" if r.device == "cuda" else f"device = host RAM, budget {gib(p.vram_budget)}"
    if p.ram_budget is not None:
        budget += f", RAM budget {gib(p.ram_budget)}"
    con.print(f"plan ({budget}):")
    if p.verdict == "gpu":
        con.print(f"  [green]fits[/]: everything on the {r.device} ({gib(p.gpu_bytes)})")
    elif p.verdict == "offload":
        con.print(f"  [yellow]offload[/]: {p.expert_slots_per_layer} of {p.n_experts} expert slots per layer "
                  f"on the device ({gib(p.gpu_bytes)}), the expert store in RAM needs {gib(p.cpu_bytes)}")  # fmt: skip
    else:
        short = f", short by {gib(d['short_by_bytes'])}" if d["short_by_bytes"] else ""
        con.print(f"  [red]does not fit[/]: {p.reason}{short}")
    if p.verdict != "no":
        lo, hi = r.tok_s
        bw = r.bw
        con.print(f"decode at batch 1: {lo:.1f}-{hi:.1f} tok/s (bounds from bytes per token; VRAM "
                  f"{bw.vram / 1e9:.0f} GB/s {bw.source['vram']}, PCIe {bw.pcie / 1e9:.0f} GB/s {bw.source['pcie']}, "
                  f"RAM {bw.ram / 1e9:.0f} GB/s {bw.source['ram']})")  # fmt: skip
    verdicts = ", ".join(f"{b}-bit: {q.verdict}" for b, q in r.plans.items())
    rec = f"recommended: --bits {r.recommended_bits}" if r.recommended_bits else "nothing fits these budgets"
    con.print(f"{verdicts}; [bold]{rec}[/]")
    for w in r.warnings:
        con.print(f"[yellow]warning:[/] {w}")


@app.command()
def pull(
    model: str = typer.Argument(..., help="Alias or Hub repo id."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch, tag or commit."),
) -> None:
    """Download what moerun needs (safetensors, config, tokenizer, generation config, chat
    template) into the Hugging Face cache; an interrupted pull resumes."""
    from moerun import hub
    from moerun.plan import gib

    repo_id = hub.repo_id_for(model)
    if repo_id is None:
        raise MoerunError(f"'{model}' is not an alias or a Hub repo id (a folder or the demo needs no pull)")
    repo = hub.remote_repo(repo_id, revision)
    folder = _pull(repo_id, revision, repo=repo)
    sys.stderr.write(f"pulled {repo_id} ({gib(repo.size)}, {len(repo.files)} files) into {folder}\n")


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
        code = app(standalone_mode=False)
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
