"""`moerun models`: the aliases, their sizes, and whether each fits this machine."""

from __future__ import annotations

from moerun.units import gib, params_short


def models() -> None:
    """List the model aliases: total / active parameters, and whether each fits this
    machine (from the cache or the config shipped with moerun; no network)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from moerun import fit as fitting
    from moerun.plan import Verdict
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
    words = {Verdict.GPU: "yes, GPU", Verdict.RAM: "yes", Verdict.OFFLOAD: "offload", Verdict.NO: "no"}
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
