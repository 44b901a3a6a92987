"""The local library: `moerun ls`, `rm` and `show` (moerun.library does the work)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from moerun.cli.render import WIDTH, cache_words, fit_text
from moerun.errors import MoerunError
from moerun.units import gib, params


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
            rows.append(("  " + cache_words(c), "", gib(c.size), library.ago(c.last_used)))
    tail = 2 + 12 + 2 + 10 + 2 + 14  # revision, size and "59 minutes ago"
    w = min(max([len("NAME")] + [len(n) for n, rev, size, _ in rows if size]), WIDTH - tail)
    lines = [f"{'NAME':<{w}}  {'REVISION':<12}  {'SIZE':<10}  LAST USED"] if rows else []
    for name, rev, size, used in rows:
        if not size:
            lines.append(fit_text(name))
        elif len(name) > w:
            lines += [fit_text(name), f"{'':<{w}}  {rev:<12}  {size:<10}  {used}"]
        else:
            lines.append(f"{name:<{w}}  {rev:<12}  {size:<10}  {used}")
    if others:
        lines += ["" if lines else None, "quantized caches of local folders or removed snapshots (moerun rm FOLDER):"]
        for c in others:
            gone = "" if Path(c.source).exists() else " (source gone)"
            lines.append(f"  {cache_words(c)}, {gib(c.size)}, last used {library.ago(c.last_used)}{gone}")
            lines.append(fit_text("    " + c.source))
    sys.stdout.write("\n".join(line for line in lines if line is not None) + "\n")


def rm_(
    model: str = typer.Argument(
        ...,
        help="Alias or Hub repo id of a pulled model, or a folder whose quantized caches to remove (see `moerun ls`).",
    ),
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
    src = {
        "cache": "the local Hugging Face cache",
        "folder": "a local folder",
        "shipped with moerun": "moerun itself",
        "shipped config": "the config shipped with moerun (not pulled)",
    }[info.source]
    title = info.alias or info.repo_id or info.name
    rows = [("model", title + (f" ({info.repo_id})" if info.alias and info.repo_id else "")), ("from", src)]
    if info.folder is not None:
        rows.append(("folder", str(info.folder)))
    arch = info.model_type or "?"
    rows.append(("architecture", arch + (f" ({', '.join(info.architectures)})" if info.architectures else "")))
    if info.total_params:
        rows.append(("parameters", f"{params(info.total_params)} total, {params(info.active_params)} active per token"))
    if info.n_experts:
        rows.append(
            ("experts", f"{info.n_experts} per MoE layer, {info.experts_per_token} per token; {info.n_layers} layers")
        )
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
        rows.append(("quantized", f"{cache_words(c)}, {gib(c.size)}, last used {library.ago(c.last_used)}"))
    f = info.fit
    if f is None:
        rows.append(("fits here", "n/a (no weights or an unknown family)"))
    else:  # fit's quick verdict: metadata on this machine, no measurement
        from moerun.plan import Verdict

        p, where = f.plan, "GPU" if f.device == "cuda" else "CPU (host RAM)"
        words = {
            Verdict.GPU: f"yes, everything on the {where} ({gib(p.gpu_bytes)})",
            Verdict.RAM: f"yes, everything in RAM ({gib(p.ram_bytes)}; no GPU)",
            Verdict.OFFLOAD: f"offload: {p.expert_slots_per_layer} of {p.n_experts} expert slots per layer on the {where} "
            f"({gib(p.gpu_bytes)}), all experts in RAM ({gib(p.cpu_bytes)})",
            Verdict.NO: f"no: {p.reason}",
        }[p.verdict]
        rows.append(("fits here", f"at {p.bits} bits: {words}"))
        rows.append(("recommended", f"--bits {f.recommended_bits}" if f.recommended_bits else "nothing fits here"))
    lines = []
    for key, value in rows:
        lines += textwrap.wrap(
            value, WIDTH, initial_indent=f"{key:<16}", subsequent_indent=" " * 16, break_on_hyphens=False
        ) or [key]
    sys.stdout.write("\n".join(fit_text(line) for line in lines) + "\n")
