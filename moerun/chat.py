"""The chat REPL behind `moerun chat`, like `ollama run` / `mlx_lm.chat`.

`ChatSession` holds the conversation and talks to the model; it needs no terminal and is
what tests drive. `run_repl` is the terminal loop around it: plain `input()` (with GNU
readline when available: line editing, bracketed paste, a history kept across sessions)
for the prompt so that it behaves through any pty, and `sys.stdout.write` for the streamed
reply. The model's own chat template renders the history on every turn; when the
conversation outgrows the context the oldest turns are dropped, as ollama does.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

from moerun.errors import MoerunError
from moerun.paths import cache_root
from moerun.served_model import ServedModel
from moerun.tokenizer import check_utf8
from moerun.units import params_short

PROMPT = ">>> "
CONTINUATION = "... "
MULTILINE = '"""'  # as in ollama: a line starting with """ opens a block closed by """
PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"  # bracketed paste (xterm's mode 2004)
HISTORY_LINES = 1000

HELP = """\
/clear                     forget the conversation (keeps --system; also /reset)
/set parameter NAME VALUE  temperature, top_p, top_k, seed, num_predict (tokens)
/show info                 the model, its context, bits, device and parameters
/stats                     figures of the last reply and of the expert cache
/help                      this help
/exit                      leave (also /bye or Ctrl-D)
Ctrl-C stops a reply. \"\"\" opens and closes a multi-line message; a paste is one."""

# ollama's parameter names -> stream_generate's keyword, type, check.
PARAMETERS = {
    "temperature": ("temperature", float, lambda v: v >= 0, ">= 0"),
    "top_p": ("top_p", float, lambda v: 0 <= v <= 1, "between 0 and 1"),
    "top_k": ("top_k", int, lambda v: v >= 0, ">= 0 (0: off)"),
    "seed": ("seed", int, lambda v: True, "an integer"),
    "num_predict": ("max_new_tokens", int, lambda v: v >= 1, ">= 1"),
}


class ChatSession:
    """A conversation with one model: a system prompt plus alternating user/assistant turns."""

    def __init__(self, model: ServedModel, system: Optional[str] = None, **gen_kwargs):
        self.model = model
        self.system = system
        self.gen_kwargs = gen_kwargs  # max_new_tokens, temperature, top_p, top_k, seed
        self.history: list[dict] = []
        self.last_stats = None  # GenerationStats of the last reply that finished
        # True when the template rejects a system message: it is then prefixed to the first
        # user turn instead (what transformers' users do for Mixtral-Instruct v0.1).
        self.merge_system = False
        self.dropped = 0  # turns dropped by the last send() to fit the context

    def context_length(self) -> int:
        """The positions the model's states can hold (the planned --ctx), else its max context."""
        caches = self.model.kv_caches
        if caches:
            from moerun.layers import context_of

            return context_of(caches)
        return int(self.model.max_context)

    def check_system(self) -> Optional[str]:
        """Try the system prompt through the template once, at start. If the template rejects
        it but takes the conversation without it, merge it into the first user turn from now
        on and return a warning to show; else None."""
        tok = self.model.tokenizer
        if not self.system:
            return None
        probe = [{"role": "user", "content": "hi"}]
        try:
            tok.apply_chat_template([{"role": "system", "content": self.system}] + probe)
            return None
        except MoerunError as exc:
            reason = " ".join(str(exc).split())
        try:
            tok.apply_chat_template(probe)
        except MoerunError:
            return None  # the template is broken for plain turns too: each turn will say so
        self.merge_system = True
        return f"warning: the chat template rejects a system prompt ({reason}); it goes at the start of the first user message instead"

    def messages(self) -> list[dict]:
        """What the template sees: the system prompt (if any) then the history."""
        if not self.system:
            return list(self.history)
        if not self.merge_system:
            return [{"role": "system", "content": self.system}] + self.history
        out = [dict(m) for m in self.history]
        if out and out[0]["role"] == "user":
            out[0]["content"] = f"{self.system}\n\n{out[0]['content']}"
        return out

    def reset(self) -> None:
        self.history.clear()
        self.last_stats = None

    def _fit_context(self) -> None:
        """Drop the oldest user/assistant pairs while the prompt plus room for a reply does not
        fit the context. It drops down to half the room, so that the next turns extend the
        held sequence (prefix reuse) instead of dropping again on every turn."""
        self.dropped = 0
        tok, ctx = self.model.tokenizer, self.context_length()
        reserve = min(int(self.gen_kwargs.get("max_new_tokens") or ctx // 4), ctx // 4)
        limit = ctx - reserve

        def length(messages: list[dict]) -> int:
            return len(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))

        if length(self.messages()) <= limit:
            return
        # The message alone (with the system prompt) must fit, or dropping turns is no help.
        alone = length(self._alone())
        if alone >= ctx:
            most = self.model.max_context
            if alone < most:
                raise MoerunError(
                    f"the message is {alone} tokens, over the {ctx}-token context (try --ctx {min(2 * alone, most)})"
                )
            raise MoerunError(f"the message is {alone} tokens, over the model's {most}-token context; shorten it")
        while len(self.history) >= 3 and (self.dropped == 0 or length(self.messages()) > limit // 2):
            del self.history[:2]
            self.dropped += 1

    def _alone(self) -> list[dict]:
        """The messages the template would see were the last user turn the only one."""
        history, self.history = self.history, self.history[-1:]
        try:
            return self.messages()
        finally:
            self.history = history

    def send(
        self,
        text: str,
        on_text: Optional[Callable[[str], None]] = None,
        on_drop: Optional[Callable[[int], None]] = None,
    ) -> str:
        """Add a user turn, stream the reply through `on_text`, record it and return it.

        When the conversation outgrows the context the oldest turns are dropped first and
        `on_drop` hears how many.

        On KeyboardInterrupt the partial reply is kept as the assistant turn, so the history
        still alternates user/assistant and the model sees what the user saw. On any other
        error the user turn is dropped, as if it had never been sent.
        """
        self.history.append({"role": "user", "content": text})
        parts: list[str] = []
        stream = None
        try:
            self._fit_context()
            if self.dropped and on_drop is not None:
                on_drop(self.dropped)
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
        if stream is not None:
            stream.close()

    def set_parameter(self, name: str, value: str) -> str:
        """`/set parameter NAME VALUE` with ollama's names; returns the line to show."""
        if name not in PARAMETERS:
            raise MoerunError(f"no parameter {name!r}; try {', '.join(PARAMETERS)}")
        key, kind, ok, expect = PARAMETERS[name]
        try:
            parsed = kind(value)
        except ValueError:
            parsed = None
        if parsed is None or not ok(parsed):
            raise MoerunError(f"{name} must be {expect}, got {value!r}")
        self.gen_kwargs[key] = parsed
        return f"Set parameter '{name}' to '{parsed}'"

    def parameters(self) -> dict:
        """The sampling parameters under ollama's names."""
        return {name: self.gen_kwargs.get(key) for name, (key, *_rest) in PARAMETERS.items()}

    def info(self) -> list[tuple[str, str]]:
        """Rows for `/show info`."""
        m = self.model
        rows = [("model", m.name)]
        if m.config.get("model_type"):
            rows.append(("architecture", str(m.config["model_type"])))
        n = m.num_parameters
        if n:
            rows.append(("parameters", params_short(n)))
        ctx, most = self.context_length(), m.max_context
        rows.append(("context", f"{ctx} tokens" + (f" (model: {most})" if most != ctx else "")))
        if m.plan is not None and m.plan.bits:
            rows.append(("expert bits", str(m.plan.bits)))
        rows += [("device", str(m.device)), ("dtype", str(m.dtype).removeprefix("torch."))]
        if self.system:
            rows.append(("system", self.system + (" (merged into the first user turn)" if self.merge_system else "")))
        rows += [(name, "default" if v is None else str(v)) for name, v in self.parameters().items()]
        return rows

    def stats(self) -> list[tuple[str, str]]:
        """Rows for `/stats`: the last reply's GenerationStats, then the expert-cache counters."""
        rows: list[tuple[str, str]] = []
        s = self.last_stats
        if s is None:
            rows.append(("last reply", "none yet"))
        else:
            reused = s.reused_tokens
            rows += [
                ("prompt tokens", f"{s.prompt_tokens}" + (f" ({reused} reused)" if reused else "")),
                ("prompt eval", f"{s.prompt_seconds:.2f} s · {s.prompt_tps:.1f} tok/s"),
                ("generated tokens", str(s.generated_tokens)),
                ("generation", f"{s.generation_seconds:.2f} s · {s.generation_tps:.1f} tok/s"),
                ("finish", str(s.finish_reason)),
            ]
            if s.peak_memory_bytes:
                rows.append(("peak memory", f"{s.peak_memory_bytes / 2**20:.1f} MiB"))
        model_stats = self.model.stats
        counters = model_stats.get("total", model_stats)
        hits, misses = counters.get("hits"), counters.get("misses")
        if isinstance(hits, int) and isinstance(misses, int) and hits + misses:
            rows.append(("expert hit rate", f"{hits / (hits + misses):.1%}"))
        for key, value in counters.items():
            if isinstance(value, float):
                value = f"{value:.3g}"
            rows.append((key.replace("_", " "), str(value)))
        return rows


def format_rows(rows: list[tuple[str, str]]) -> str:
    """A two-column table, the names padded to one width."""
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _stats_line(stats) -> str:
    # The history before this turn is already in the model's states (prefix reuse): only
    # the rest of the prompt was computed, at prompt_tps.
    reused = stats.reused_tokens
    prompt = f"prompt {stats.prompt_tokens} tokens" + (f", {reused} reused" if reused else "")
    return (
        f"{stats.generated_tokens} tokens · {stats.generation_tps:.1f} tok/s ({prompt} · {stats.prompt_tps:.1f} tok/s)"
    )


def _read_message(input_fn: Callable[[str], str], prompt: str = PROMPT, continuation: str = CONTINUATION) -> str:
    """One user message: a line, a \"\"\"-delimited block of lines, or a bracketed paste.

    GNU readline handles bracketed paste itself (the pasted lines come back as one string);
    without it the terminal's ESC[200~ ... ESC[201~ markers arrive in the lines and are
    parsed here."""
    line = input_fn(prompt)
    if PASTE_START in line:
        lines = [line.replace(PASTE_START, "")]
        while PASTE_END not in lines[-1]:
            lines.append(input_fn(""))
        lines[-1] = lines[-1].replace(PASTE_END, "")
        return "\n".join(lines).strip()
    stripped = line.strip()
    if not stripped.startswith(MULTILINE):
        return line
    body = stripped[len(MULTILINE) :]
    if body.endswith(MULTILINE):  # """the whole block on one line"""
        return body[: -len(MULTILINE)]
    lines = [body]
    while True:
        line = input_fn(continuation).rstrip()
        if line.endswith(MULTILINE):
            lines.append(line[: -len(MULTILINE)])
            return "\n".join(lines).strip()
        lines.append(line)


def history_path() -> Path:
    """Where typed messages are kept across sessions: <moerun cache>/history."""
    return cache_root() / "history"


class LineEditor:
    """GNU readline for input(): line editing, bracketed paste, and a history file that the
    next session recalls with Up. Where readline is missing or is libedit, bracketed paste
    is switched on by hand and parsed by _read_message.

    The file holds one message a line, newlines and backslashes escaped, so that a pasted
    or \"\"\"-block message comes back whole (readline's own file would split it)."""

    def __init__(self, path: Optional[Path]):
        self.path = path
        self.readline = None
        self.manual_paste = False
        try:
            import readline
        except ImportError:  # Windows
            readline = None
        if readline is not None and "libedit" not in (readline.__doc__ or ""):
            self.readline = readline
            # CPython turns readline's bracketed paste off (bpo-42819); a paste of several
            # lines must be one message, not one turn per line.
            readline.parse_and_bind("set enable-bracketed-paste on")
            readline.set_history_length(HISTORY_LINES)
            for entry in self._load():
                readline.add_history(entry)
        elif sys.stdout.isatty():
            self.manual_paste = True
            sys.stdout.write("\x1b[?2004h")

    def _load(self) -> list[str]:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines() if self.path is not None else []
        except (OSError, UnicodeDecodeError):
            return []
        return [_unescape(line) for line in lines[-HISTORY_LINES:] if line]

    def read(self, input_fn: Callable[[str], str]) -> str:
        rl = self.readline
        before = rl.get_current_history_length() if rl else 0
        text = _read_message(input_fn)
        if rl is None:
            return text
        # Whatever lines readline added for this message become one entry: the message.
        for _ in range(rl.get_current_history_length() - before):
            rl.remove_history_item(rl.get_current_history_length() - 1)
        entry = text.strip()
        if entry:
            rl.add_history(entry)
            self._append(entry)
        return text

    def _append(self, entry: str) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # What people type is theirs: the file is readable by its owner only, as bash's.
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with open(fd, "a", encoding="utf-8") as f:
                f.write(_escape(entry) + "\n")
        except OSError:
            pass  # a read-only cache: no history, the chat goes on

    def close(self) -> None:
        if self.readline is not None and self.path is not None:
            try:  # keep the file to the last HISTORY_LINES messages
                lines = self.path.read_text(encoding="utf-8").splitlines()
                if len(lines) > HISTORY_LINES:
                    tmp = self.path.with_suffix(".tmp")
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                    with open(fd, "w", encoding="utf-8") as f:
                        f.write("\n".join(lines[-HISTORY_LINES:]) + "\n")
                    os.replace(tmp, self.path)
            except (OSError, UnicodeDecodeError):
                pass
        if self.manual_paste:
            sys.stdout.write("\x1b[?2004l")
            sys.stdout.flush()


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _unescape(line: str) -> str:
    out, i = [], 0
    while i < len(line):
        if line[i] == "\\" and i + 1 < len(line):
            out.append("\n" if line[i + 1] == "n" else line[i + 1])
            i += 2
        else:
            out.append(line[i])
            i += 1
    return "".join(out)


@contextmanager
def _no_echo(fd: Optional[int]):
    """While a reply streams, keys typed are neither echoed into it nor kept for the next
    prompt (ISIG stays on: Ctrl-C still stops the reply)."""
    if fd is None:
        yield
        return
    import termios

    try:
        saved = termios.tcgetattr(fd)
    except termios.error:
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~(termios.ECHO | termios.ECHONL)
    try:
        termios.tcsetattr(fd, termios.TCSANOW, quiet)
        yield
    finally:
        termios.tcflush(fd, termios.TCIFLUSH)
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def run_repl(
    model: ServedModel,
    *,
    system: Optional[str] = None,
    input_fn: Callable[[str], str] = input,
    out=None,
    interactive: Optional[bool] = None,
    history: Optional[Path] = None,
    **gen_kwargs,
) -> int:
    """Run the loop until /exit, /bye or EOF (Ctrl-D); return how many turns failed.

    interactive (default: stdin is a terminal, or a scripted input_fn): banner, prompts,
    status lines and history. Otherwise (`echo hi | moerun chat demo`) stdout gets only the
    replies and errors go to stderr."""
    from rich.console import Console

    real_input = input_fn is input
    if interactive is None:
        interactive = not real_input or sys.stdin.isatty()
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C must stop a reply even when moerun was started with SIGINT ignored (a
        # background job of a non-interactive shell inherits that, and Python then
        # installs no KeyboardInterrupt handler of its own).
        signal.signal(signal.SIGINT, signal.default_int_handler)
    out = out or sys.stdout
    # soft_wrap and no highlighting: status lines stay one line of plain, greppable text.
    console = Console(file=out, soft_wrap=True, highlight=False, markup=False)
    errors = Console(file=sys.stderr, soft_wrap=True, highlight=False, markup=False)
    session = ChatSession(model, system=system, **gen_kwargs)
    editor = None
    tty_fd = None
    if real_input and interactive:
        editor = LineEditor(history if history is not None else history_path())
        tty_fd = sys.stdin.fileno() if sys.stdin.isatty() else None

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    def notice(text: str, style: str = "dim", wrap: bool = False) -> None:
        # In a terminal a long warning or error is wrapped at its width, between words;
        # piped, each stays one greppable line on stderr.
        if interactive:
            console.print(text, style=style, soft_wrap=not wrap)
        else:
            errors.print(text, style=style)

    if interactive:
        console.print(model.describe(), style="bold")
        console.print("Type /help for commands, /exit or Ctrl-D to leave.", style="dim")
    warning = session.check_system()
    if warning:
        notice(warning, style="yellow", wrap=True)

    failed = 0
    try:
        while True:
            try:
                if editor is not None:
                    text = editor.read(input_fn)
                elif interactive:
                    text = _read_message(input_fn)
                else:
                    text = _read_message(input_fn, "", "")
                text = text.strip()
            except EOFError:
                if interactive:
                    write("\n")
                return failed
            except UnicodeDecodeError as exc:  # a stdin decoded strictly: that message is lost, the next is read
                failed += 1
                notice(
                    ("error: " if interactive else "moerun: ") + f"the message is not UTF-8 text "
                    f"(byte 0x{exc.object[exc.start]:02x} at offset {exc.start})",
                    style="red",
                    wrap=True,
                )
                continue
            except KeyboardInterrupt:
                write("\n")
                console.print("use /exit or Ctrl-D to leave", style="dim")
                continue
            if not text:
                continue

            if text.startswith("/"):
                words = text.split()
                command = words[0].lower()
                if command in ("/exit", "/bye", "/quit"):
                    return failed
                if command in ("/clear", "/reset"):
                    session.reset()
                    console.print("history cleared" + (" (system prompt kept)" if system else ""), style="dim")
                elif command == "/stats":
                    console.print(format_rows(session.stats()))
                elif command == "/set" and len(words) == 4 and words[1] == "parameter":
                    try:
                        console.print(session.set_parameter(words[2], words[3]))
                    except MoerunError as exc:
                        notice(f"error: {exc}", style="red", wrap=True)
                elif command == "/set":
                    console.print("usage: /set parameter NAME VALUE (" + ", ".join(PARAMETERS) + ")", style="dim")
                elif command == "/show" and words[1:] == ["info"]:
                    console.print(format_rows(session.info()))
                elif command == "/show":
                    console.print("usage: /show info", style="dim")
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

            def on_drop(n: int) -> None:
                turns = "turn" if n == 1 else f"{n} turns"
                notice(
                    f"(the conversation outgrew the {session.context_length()}-token context: "
                    f"dropped the oldest {turns})"
                )

            try:
                check_utf8(text, "the message")  # bytes a terminal or pipe sent that are not UTF-8
                with _no_echo(tty_fd):
                    session.send(text, on_text=on_text, on_drop=on_drop)
            except KeyboardInterrupt:
                write("\n[interrupted]\n")
                continue
            except MoerunError as exc:
                failed += 1
                if not ends_with_newline:
                    write("\n")
                message = " ".join(str(exc).split())
                notice(("error: " if interactive else "moerun: ") + message, style="red", wrap=True)
                continue
            if not ends_with_newline:
                write("\n")
            if interactive and session.last_stats is not None:
                console.print(_stats_line(session.last_stats), style="dim")
    finally:
        if editor is not None:
            editor.close()
