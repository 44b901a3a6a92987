"""How the CLI shows things: the spinner and the one progress bar a command run owns
(`Display`, fed the typed progress events of moerun.progress), the ticker for pipes, and
the text of statistics, plans and wrapped report lines. Rich is imported only to draw."""

from __future__ import annotations

import os
import sys

from moerun.progress import Downloaded, ExpertsPrepared, FitChecked, ProgressEvent
from moerun.units import gib

WIDTH = 80  # what `ls` and `show` fit in, whatever the terminal


class Spinner:
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
            from rich.spinner import Spinner as RichSpinner

            self._spinner = RichSpinner("dots", text)
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


class Display:
    """What one command run shows on stderr while it works: a spinner, and one progress
    bar (built once, on first use) for its progress events: a pull's bytes, the experts
    prepared, bench's runs. One live display at a time: the bar stops the spinner. A
    context manager: both are gone when the run ends, before any error line."""

    def __init__(self):
        self.spinner = Spinner()
        self._progress = None
        self._task = None  # the bar's one task: one phase at a time

    def __enter__(self) -> Display:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.spinner.stop()
        self.end_phase()

    def on_event(self, event: ProgressEvent) -> None:
        if isinstance(event, FitChecked):
            self.spinner.stop()
            size = gib(event.report.meta.download_bytes or 0)
            sys.stderr.write(
                f"{event.repo_id} is not in the local cache: {size} to download; "
                f"fit at {event.bits} bits: {event.report.plan.describe()}\n"
            )
        elif isinstance(event, Downloaded):
            self.show_phase(f"pulling {event.repo_id}", event.done, event.total, in_bytes=True)
        elif isinstance(event, ExpertsPrepared):
            self.show_phase(f"preparing {event.bits}-bit experts (once; cached)", event.done, event.total)

    def counter(self, description: str, total: int):
        """A phase of `total` steps: returns the callable that counts one."""
        done = 0

        def advance() -> None:
            nonlocal done
            done += 1
            self.show_phase(description, done, total)

        self.show_phase(description, 0, total)
        return advance

    def show_phase(self, description: str, done: int, total: int, in_bytes: bool = False) -> None:
        """Draw `done` of `total` on the bar, starting it (and a new phase) when needed."""
        if self._progress is None:
            self._progress = _progress_bar()
        if self._task is None:
            self.spinner.stop()
            self._progress.start()
            self._task = self._progress.add_task(description, total=total, completed=done, in_bytes=in_bytes)
        self._progress.update(self._task, description=description, total=total, completed=done)

    def end_phase(self) -> None:
        """Take the bar down (it is transient: nothing stays on the screen)."""
        if self._task is not None:  # a bar never started prints nothing, not even a blank line
            self._progress.remove_task(self._task)
            self._progress.stop()
            self._task = None


def _progress_bar():
    """The one Rich bar: a description, the bar, bytes and speed for a download or done/total
    for counted steps, and the time left."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    from rich.text import Text

    class Amount(ProgressColumn):
        def __init__(self):
            super().__init__()
            self.size, self.speed, self.count = DownloadColumn(), TransferSpeedColumn(), MofNCompleteColumn()

        def render(self, task):
            if task.fields.get("in_bytes"):
                return Text.assemble(self.size.render(task), " ", self.speed.render(task))
            return self.count.render(task)

    columns = TextColumn("[bold]{task.description}"), BarColumn(), Amount(), TimeRemainingColumn()
    return Progress(*columns, console=Console(stderr=True), transient=True)


class Ticker:
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


def format_plan(m, load_seconds: float) -> str:
    """--verbose: where the model went, and how long loading took."""
    from moerun.plan import Verdict

    p = m.plan
    where = {Verdict.GPU: "everything on the device", Verdict.RAM: "everything in RAM (no GPU)"}.get(p.verdict) or (
        f"{p.expert_slots_per_layer} of {p.n_experts} expert slots per layer on the device, the rest in RAM"
    )
    host = gib(p.cpu_bytes) if p.verdict is Verdict.OFFLOAD else "n/a"
    return (
        f"loaded {m.name} in {load_seconds:.1f} s: {m.device}, {p.dtype}, {p.bits}-bit experts, ctx {p.ctx}\n"
        f"plan: {where}; device {gib(p.gpu_bytes)}, host {host}, KV cache {gib(p.kv_cache_bytes)}"
    )


def say(con, text: str, indent: int = 0) -> None:
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
            words = textwrap.wrap(phrase, width - len(rest), break_long_words=False, break_on_hyphens=False)
            lines += [rest + w for w in words[:-1]]
            line = rest + words[-1]
    lines.append(line)
    for out in lines:
        con.print(out, soft_wrap=True, highlight=False)


def fit_text(text: str, width: int = WIDTH) -> str:
    """Cut a line to `width` characters, keeping its end (paths end with what matters)."""
    return text if len(text) <= width else "…" + text[len(text) - width + 1 :]


def cache_words(c) -> str:
    return f"{c.bits}-bit experts ({c.formats})" if c.bits else f"experts ({c.formats})"
