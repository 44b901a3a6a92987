"""The chat REPL behind `moerun chat`, like `ollama run` / `mlx_lm.chat`.

`ChatSession` holds the conversation and talks to the model; it needs no terminal and is
what tests drive. `run_repl` is the terminal loop around it: plain `input()` (with readline
when available) for the prompt so that it behaves through any pty, and `sys.stdout.write`
for the streamed reply. The model's own chat template renders the history on every turn.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from typing import Callable, Optional

from moerun.errors import MoerunError

PROMPT = ">>> "
CONTINUATION = "... "
MULTILINE = '"""'  # as in ollama: a line starting with """ opens a block closed by """

HELP = """\
/reset   clear the conversation (the --system prompt is kept)
/stats   show statistics of the last reply and of the model
/help    show this help
/exit    leave (also /bye or Ctrl-D)
Ctrl-C stops a reply; \"\"\" starts and ends a multi-line message."""


class ChatSession:
    """A conversation with one model: a system prompt plus alternating user/assistant turns."""

    def __init__(self, model, system: Optional[str] = None, **gen_kwargs):
        self.model = model
        self.system = system
        self.gen_kwargs = gen_kwargs  # max_new_tokens, temperature, top_p, top_k, seed
        self.history: list[dict] = []
        self.last_stats = None  # GenerationStats of the last reply that finished

    def messages(self) -> list[dict]:
        """What the template sees: the system prompt (if any) then the history."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def reset(self) -> None:
        self.history.clear()
        self.last_stats = None

    def send(self, text: str, on_text: Optional[Callable[[str], None]] = None) -> str:
        """Add a user turn, stream the reply through `on_text`, record it and return it.

        On KeyboardInterrupt the partial reply is kept as the assistant turn, so the history
        still alternates user/assistant and the model sees what the user saw. On any other
        error the user turn is dropped, as if it had never been sent.
        """
        self.history.append({"role": "user", "content": text})
        parts: list[str] = []
        stream = None
        try:
            stream = self.model.stream_generate(self.messages(), **self.gen_kwargs)
            for resp in stream:
                if resp.text:
                    parts.append(resp.text)
                    if on_text is not None:
                        on_text(resp.text)
                if resp.stats is not None:
                    self.last_stats = resp.stats
        except KeyboardInterrupt:
            # Record first: a second Ctrl-C while closing must not leave a dangling user turn.
            self.history.append({"role": "assistant", "content": "".join(parts)})
            self._close(stream)
            raise
        except BaseException:
            self.history.pop()
            self._close(stream)
            raise
        reply = "".join(parts)
        self.history.append({"role": "assistant", "content": reply})
        return reply

    @staticmethod
    def _close(stream) -> None:
        # Closing early is safe by contract; doing it now frees the KV cache for the next turn.
        close = getattr(stream, "close", None)
        if close is not None:
            close()

    def stats(self) -> dict:
        """The last reply's GenerationStats plus the model's counters, for `/stats`."""
        out = {"last reply": self.last_stats.to_dict() if self.last_stats is not None else None}
        model_stats = getattr(self.model, "stats", None)
        if model_stats:
            out["model"] = dict(model_stats)
        return out


def _stats_line(stats) -> str:
    # The history before this turn is already in the model's states (prefix reuse): only
    # the rest of the prompt was computed, at prompt_tps.
    reused = getattr(stats, "reused_tokens", 0)
    prompt = f"prompt {stats.prompt_tokens} tokens" + (f", {reused} reused" if reused else "")
    return (
        f"{stats.generated_tokens} tokens · {stats.generation_tps:.1f} tok/s "
        f"({prompt} · {stats.prompt_tps:.1f} tok/s)"
    )


def _read_message(input_fn: Callable[[str], str]) -> str:
    """One user message: a line, or a \"\"\"-delimited block of lines."""
    line = input_fn(PROMPT)
    stripped = line.strip()
    if not stripped.startswith(MULTILINE):
        return line
    body = stripped[len(MULTILINE):]
    if body.endswith(MULTILINE):  # """the whole block on one line"""
        return body[: -len(MULTILINE)]
    lines = [body]
    while True:
        line = input_fn(CONTINUATION).rstrip()
        if line.endswith(MULTILINE):
            lines.append(line[: -len(MULTILINE)])
            return "\n".join(lines).strip()
        lines.append(line)


def run_repl(
    model,
    *,
    system: Optional[str] = None,
    input_fn: Callable[[str], str] = input,
    out=None,
    **gen_kwargs,
) -> None:
    """Run the interactive loop until /exit, /bye or EOF (Ctrl-D)."""
    from rich.console import Console

    if threading.current_thread() is threading.main_thread():
        # Ctrl-C must stop a reply even when moerun was started with SIGINT ignored (a
        # background job of a non-interactive shell inherits that, and Python then
        # installs no KeyboardInterrupt handler of its own).
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if input_fn is input:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:  # Windows
            pass
    out = out or sys.stdout
    # soft_wrap and no highlighting: status lines stay one line of plain, greppable text.
    console = Console(file=out, soft_wrap=True, highlight=False, markup=False)
    session = ChatSession(model, system=system, **gen_kwargs)

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    describe = getattr(model, "describe", None)
    if describe is not None:
        console.print(describe(), style="bold")
    console.print("Type /help for commands, /exit or Ctrl-D to leave.", style="dim")

    while True:
        try:
            text = _read_message(input_fn).strip()
        except EOFError:
            write("\n")
            return
        except KeyboardInterrupt:
            write("\n")
            console.print("use /exit or Ctrl-D to leave", style="dim")
            continue
        if not text:
            continue

        if text.startswith("/"):
            command = text.split()[0].lower()
            if command in ("/exit", "/bye", "/quit"):
                return
            if command == "/reset":
                session.reset()
                console.print("history cleared" + (" (system prompt kept)" if system else ""), style="dim")
            elif command == "/stats":
                console.print(json.dumps(session.stats(), indent=2, default=str))
            elif command in ("/help", "/?"):
                console.print(HELP)
            else:
                console.print(f"unknown command {command}; type /help", style="dim")
            continue

        ends_with_newline = True

        def on_text(delta: str) -> None:
            nonlocal ends_with_newline
            write(delta)
            ends_with_newline = delta.endswith("\n")

        try:
            session.send(text, on_text=on_text)
        except KeyboardInterrupt:
            write("\n[interrupted]\n")
            continue
        except MoerunError as exc:
            if not ends_with_newline:
                write("\n")
            console.print("error: " + " ".join(str(exc).split()), style="red")
            continue
        if not ends_with_newline:
            write("\n")
        if session.last_stats is not None:
            console.print(_stats_line(session.last_stats), style="dim")
