"""`moerun fit`: will a model fit, and how fast could it run, here or on another card."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from moerun.cli.options import spec_of
from moerun.cli.render import say
from moerun.units import gib, params_short


def fit(
    model: Optional[str] = typer.Argument(None, help="Alias, Hub repo id or local folder."),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="Plan for this card, e.g. rtx-3060 (list: --gpu list)."),
    vram: Optional[str] = typer.Option(None, "--vram", help="Device memory budget, e.g. 12GiB (default: free VRAM)."),
    ram: Optional[str] = typer.Option(None, "--ram", help="Host RAM: 32GiB, ddr5-5600x2 or both (default: free RAM)."),
    ram_bandwidth: Optional[str] = typer.Option(None, "--ram-bandwidth", help="Host RAM bandwidth, e.g. 90GB/s."),
    bits: Optional[int] = typer.Option(
        None, "--bits", "-b", help="Expert bits 4, 8 or 16 (default: the recommendation)."
    ),
    ctx: Optional[int] = typer.Option(
        None, "--ctx", min=1, help="Context to plan the KV cache for (default: min(model's, 4096))."
    ),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch, tag or commit on the Hub."),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help="Non-expert weights' dtype (default: as load would choose)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Will MODEL fit, and how fast could it run, here or on another card? Reads
    config.json and the safetensors headers only (HTTP range requests), never the weights."""
    if gpu == "list":
        render_gpus(as_json)
        return
    if model is None:
        raise typer.BadParameter("give a MODEL (an alias, a Hub repo id or a folder)", param_hint="'MODEL'")
    if bits is not None:
        spec_of(bits=bits)
    from moerun import fit as fitting

    report = fitting.fit(
        model,
        bits=bits,
        vram=vram,
        ram=ram,
        ctx=ctx,
        revision=revision,
        dtype=dtype,
        gpu=gpu,
        ram_bandwidth=ram_bandwidth,
    )
    if as_json:
        sys.stdout.write(json.dumps(report.to_dict()) + "\n")
        return
    render_fit(report)


def render_gpus(as_json: bool) -> None:
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


def render_fit(r) -> None:
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from moerun.plan import ROLES, Verdict

    con = Console()
    s, p, d = r.summary, r.plan, r.to_dict()
    src = {
        "hub": "config.json and safetensors headers from the Hub",
        "folder": "a local folder",
        "cache": "the local Hugging Face cache",
        "shipped config": "the config shipped with moerun",
    }[r.meta.source]
    con.print(f"[bold]{escape(r.meta.name)}[/] · {r.meta.config.get('model_type')}", soft_wrap=True)
    say(con, f"from {src}" + (f" ({gib(r.meta.bytes_read)} read)" if r.meta.bytes_read else ""))
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
    say(
        con,
        f"active per token: {params_short(s.active_params)} of {params_short(s.total_params)} "
        f"({s.experts_per_token} of {p.n_experts} experts in {p.n_moe_layers} MoE layers)",
    )
    if s.unused_params:
        say(con, f"not loaded (vision tower / multi-token prediction): {params_short(s.unused_params)}")
    say(con, f"stored in the checkpoint: {gib(d['stored_bytes'])}")
    if r.meta.download_bytes:
        say(con, f"`moerun pull` downloads {gib(r.meta.download_bytes)}")
    words = {"kv": "GQA", "mla": "MLA latent", "kv+window": "sliding-window ring"}
    kinds = [k for k in s.kv_kind.split(", ") if k in words]
    recurrent = [k for k in s.kv_kind.split(", ") if k not in words and k != "none"]
    say(con, f"KV cache ({', '.join(words[k] for k in kinds) or 'none'}) at {p.ctx} tokens: {gib(p.kv_cache_bytes)}")
    if recurrent:
        say(
            con,
            f"of which {gib(d['fixed_state_bytes'])} is recurrent state ({', '.join(recurrent)}): "
            "a fixed size, not per token",
            2,
        )
    if r.gpu is not None:
        g = r.gpu
        target = f"{g.name}: {g.memory_gib} GiB, {g.bandwidth_gbs:.0f} GB/s, {g.link}"
    elif r.device == "cuda":
        target = f"a GPU with {gib(p.vram_budget)} for moerun"
    else:
        target = "this machine's CPU, no GPU"
    say(con, f"plan for {target}")
    if r.device == "cpu" or r.device == "unified":
        say(con, f"memory: {gib(p.ram_budget)}, holding weights, KV cache and experts", 2)
    else:
        say(con, f"VRAM budget {gib(p.vram_budget)}, host RAM budget {gib(p.ram_budget)}", 2)
    if p.verdict is Verdict.GPU:
        say(con, f"fits: everything on the GPU ({gib(p.gpu_bytes)})", 2)
    elif p.verdict is Verdict.RAM:
        say(con, f"fits: everything in {'unified memory' if r.device == 'unified' else 'RAM'} ({gib(p.ram_bytes)})", 2)
    elif p.verdict is Verdict.OFFLOAD:
        say(
            con,
            f"offload: {p.expert_slots_per_layer} of {p.n_experts} expert slots per layer on the GPU "
            f"({gib(p.gpu_bytes)}); the expert store in RAM needs {gib(p.cpu_bytes)}",
            2,
        )
    else:
        short = f", short by {gib(d['short_by_bytes'])}" if d["short_by_bytes"] else ""
        say(con, f"does not fit: {p.reason}{short}", 2)
    if p.verdict is not Verdict.NO:
        lo, hi = r.tok_s
        bw = r.bw
        say(con, f"decode at batch 1: {lo:.1f}-{hi:.1f} tok/s")
        parts = [f"RAM {bw.ram / 1e9:.0f} GB/s {bw.source['ram']}"]
        if r.device == "cuda":
            parts[:0] = [
                f"VRAM {bw.vram / 1e9:.0f} GB/s {bw.source['vram']}",
                f"PCIe {bw.pcie / 1e9:.0f} GB/s {bw.source['pcie']}",
            ]
        say(con, f"(bounds from bytes per token; {', '.join(parts)})", 2)
    verdicts = ", ".join(f"{b}-bit: {q.verdict}" for b, q in r.plans.items())
    rec = f"recommended: --bits {r.recommended_bits}" if r.recommended_bits else "nothing fits these budgets"
    say(con, f"{verdicts}; {rec}")
    if r.suggestions:
        con.print("to make it fit:")
        for line in r.suggestions:
            say(con, line, 2)
    for w in r.warnings:
        say(con, f"warning: {w}")
