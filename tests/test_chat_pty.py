"""`moerun chat`: the ChatSession logic with a fake model, then the real REPL through a pty.

The pty tests drive `python -m moerun chat` as a user would: the terminal's line discipline
turns a written b"\\x03" into SIGINT and b"\\x04" into EOF, exactly as Ctrl-C / Ctrl-D do.
"""

from __future__ import annotations

import io
import os
import signal
import re
import select
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from moerun.chat import ChatSession, run_repl
from moerun.errors import MoerunError

ROOT = Path(__file__).resolve().parents[1]


# --- ChatSession with a fake model -------------------------------------------------------


@dataclass
class FakeStats:
    prompt_tokens: int = 3
    generated_tokens: int = 2
    prompt_seconds: float = 0.1
    generation_seconds: float = 0.1
    prompt_tps: float = 30.0
    generation_tps: float = 20.0
    peak_memory_bytes: int = 0
    finish_reason: str = "stop"

    def to_dict(self) -> dict:
        return asdict(self)


class FakeModel:
    """Replies "reply <n>" in two deltas; `fail_with` raises part-way through a reply."""

    stats = {"expert_hits": 7}

    def __init__(self):
        self.calls: list[list[dict]] = []
        self.kwargs: list[dict] = []
        self.fail_with: BaseException | None = None

    def describe(self) -> str:
        return "fake · mixtral · 1M · cpu · bfloat16"

    def stream_generate(self, prompt, **kwargs):
        self.calls.append([dict(m) for m in prompt])
        self.kwargs.append(kwargs)
        n = len(self.calls)
        yield SimpleNamespace(text="reply ", token_id=1, stats=None)
        if self.fail_with is not None:
            raise self.fail_with
        yield SimpleNamespace(text=str(n), token_id=2, stats=FakeStats())


def roles(messages: list[dict]) -> list[str]:
    return [m["role"] for m in messages]


def test_session_alternates_and_keeps_system_prompt():
    model = FakeModel()
    s = ChatSession(model, system="be brief", max_new_tokens=5, temperature=0.0)
    seen = []
    assert s.send("hi", on_text=seen.append) == "reply 1"
    assert seen == ["reply ", "1"]
    assert s.send("again") == "reply 2"
    # The model saw the whole conversation, system prompt first, ending with the new user turn.
    assert roles(model.calls[1]) == ["system", "user", "assistant", "user"]
    assert model.calls[1][0]["content"] == "be brief"
    assert model.calls[1][2]["content"] == "reply 1"
    assert model.kwargs[0] == {"max_new_tokens": 5, "temperature": 0.0}
    assert roles(s.history) == ["user", "assistant"] * 2
    assert s.last_stats.generated_tokens == 2
    assert ("expert hits", "7") in s.stats()

    s.reset()
    assert s.history == [] and s.last_stats is None
    s.send("fresh")
    assert roles(model.calls[-1]) == ["system", "user"]


def test_session_without_system_prompt():
    model = FakeModel()
    s = ChatSession(model)
    s.send("hi")
    assert roles(model.calls[0]) == ["user"]


def test_interrupt_keeps_partial_reply_as_assistant_turn():
    model = FakeModel()
    s = ChatSession(model)
    model.fail_with = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        s.send("long story")
    assert s.history == [{"role": "user", "content": "long story"}, {"role": "assistant", "content": "reply "}]
    model.fail_with = None
    s.send("next")
    assert roles(model.calls[-1]) == ["user", "assistant", "user"]


def test_error_drops_the_user_turn():
    model = FakeModel()
    s = ChatSession(model)
    model.fail_with = MoerunError("context full")
    with pytest.raises(MoerunError):
        s.send("too long")
    assert s.history == []


def test_repl_commands_with_scripted_input():
    model = FakeModel()
    script = iter(["hello", "/stats", "/help", "/nope", "", '"""', "line one", 'line two"""', "/reset", "/bye"])

    def input_fn(prompt: str) -> str:
        out.write(prompt)
        return next(script)

    out = io.StringIO()
    run_repl(model, system="sys", input_fn=input_fn, out=out, max_new_tokens=4)
    text = out.getvalue()
    assert "fake · mixtral" in text
    assert "reply 1\n" in text and "tok/s" in text
    assert re.search(r"\n  expert hits +7\n", text) and re.search(r"\n  generated tokens +2\n", text)
    assert "/clear" in text and "/exit" in text  # the help
    assert "unknown command /nope" in text
    assert model.calls[1][-1] == {"role": "user", "content": "line one\nline two"}
    assert "history cleared" in text


def test_repl_eof_and_ctrl_c_at_prompt():
    model = FakeModel()
    events = iter([KeyboardInterrupt(), EOFError()])

    def input_fn(prompt: str) -> str:
        raise next(events)

    out = io.StringIO()
    run_repl(model, input_fn=input_fn, out=out)  # returns: EOF ends the loop cleanly
    assert "use /exit or Ctrl-D to leave" in out.getvalue()


def test_repl_shows_errors_and_carries_on():
    model = FakeModel()
    model.fail_with = MoerunError("context\nfull")
    script = iter(["hi", "/exit"])
    out = io.StringIO()
    run_repl(model, input_fn=lambda p: next(script), out=out)
    assert "error: context full" in out.getvalue()


# --- the real REPL through a pseudo-terminal ---------------------------------------------

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


class Terminal:
    """A child process on a pty, read with select and timeouts (no pexpect needed)."""

    def __init__(self, args: list[str], env: dict):
        import fcntl
        import pty
        import struct
        import termios

        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child: become the program; never return into pytest
            try:
                os.chdir(ROOT)
                # Start with SIGINT ignored, as a background job of a non-interactive shell
                # (or a CI runner) would: Ctrl-C must still stop a reply, so `moerun chat`
                # installs its own handler.
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                os.execve(sys.executable, [sys.executable, "-m", "moerun", *args], env)
            finally:
                os._exit(127)
        # A wide window so that readline never wraps what we type.
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 250, 0, 0))
        self.raw = b""  # everything read so far
        self.pos = 0  # cleaned text before this index has been matched already
        self.status: int | None = None

    @property
    def text(self) -> str:
        return ANSI.sub(b"", self.raw).decode("utf-8", "replace")

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            data = b""
        self.raw += data
        return bool(data)

    def expect(self, pattern: str, timeout: float = 120) -> re.Match:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            match = regex.search(self.text, self.pos)
            if match:
                self.pos = match.end()
                return match
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {pattern!r}; output so far:\n{self.text}")
            if not self._read(min(1.0, max(0.0, deadline - time.monotonic()))):
                match = regex.search(self.text, self.pos)
                if match:
                    self.pos = match.end()
                    return match
                raise AssertionError(f"the program ended before {pattern!r}; output:\n{self.text}")

    def wait_for_output(self, nbytes: int, timeout: float = 60) -> None:
        """Wait until at least `nbytes` more bytes of cleaned output arrive after the match point."""
        deadline = time.monotonic() + timeout
        while len(self.text) - self.pos < nbytes:
            assert time.monotonic() < deadline, f"no output; so far:\n{self.text}"
            if not self._read(0.5):
                raise AssertionError(f"the program ended; output:\n{self.text}")

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def sendline(self, line: str) -> None:
        self.send(line.encode() + b"\r")

    def wait(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = status
                return os.waitstatus_to_exitcode(status)
            self._read(0.2)  # keep draining so the child never blocks on a full pty
        raise AssertionError(f"the program did not exit; output:\n{self.text}")

    def close(self) -> None:
        if self.status is None:
            try:
                os.kill(self.pid, 9)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        os.close(self.fd)


def _checkpoint(folder: Path, **overrides) -> Path:
    import importlib.util

    if importlib.util.find_spec("moerun.api") is None:
        pytest.skip("moerun/api.py (moerun.load) is not written yet")
    try:
        from tests.model_fixtures import make_checkpoint
    except ImportError:
        try:
            from model_fixtures import make_checkpoint
        except ImportError:
            pytest.skip("tests/model_fixtures.py (make_checkpoint) is not written yet")
    import torch

    return Path(make_checkpoint(folder, arch="mixtral", dtype=torch.bfloat16, shards=2, **overrides))


def _never_stop(folder: Path) -> None:
    """Edit a tiny Mixtral checkpoint so that no eos id can ever be sampled.

    Residual dimension 0 is made a positive constant (the embedding sets it, no o_proj or
    expert w2 ever writes to it), so the final normed hidden state has h[0] > 0 at every
    position; each eos row of lm_head is then -100 * e0, an eos logit of about -500.
    A reply then runs to max_new_tokens, long enough to be interrupted mid-stream.
    """
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((folder / "config.json").read_text())
    eos = config["eos_token_id"]
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            metadata = f.metadata() or {"format": "pt"}
            tensors = {n: f.get_tensor(n) for n in f.keys()}
        for name, t in tensors.items():
            if name.endswith("embed_tokens.weight"):
                t[:, 0] = 4.0
            elif name.endswith(("o_proj.weight", "w2.weight")):
                t[0, :] = 0.0
            elif name.endswith("lm_head.weight"):
                for i in eos_ids:
                    t[i, :] = 0.0
                    t[i, 0] = -100.0
        save_file(tensors, str(shard), metadata=metadata)


def _env(tmp_path: Path) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
        "MOERUN_CACHE": str(tmp_path / "moerun-cache"),  # the chat history file lives there
        "MOERUN_DEBUG": "",
        "TERM": "xterm",
        "PYTHONUNBUFFERED": "1",
        # A 0.3M-parameter model decodes ~100x faster on one thread than on many busy ones.
        "OMP_NUM_THREADS": "1",
    }


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pty")
def test_chat_through_a_pty(tmp_path):
    ckpt = _checkpoint(tmp_path / "tiny")
    term = Terminal(["chat", str(ckpt), "--max-new-tokens", "200", "--device", "cpu", "--system", "be brief"], _env(tmp_path))
    try:
        term.expect(r">>> ")
        term.sendline("Hello there")
        term.expect(r"tok/s")
        term.expect(r">>> ")
        term.sendline("How are you?")
        term.expect(r"tok/s")
        term.expect(r">>> ")
        term.sendline("/reset")
        term.expect(r"history cleared")
        term.expect(r">>> ")
        # A person presses Ctrl-C well after the prompt shows; right at once it can land
        # before readline waits for input, where CPython only notices it on the next key.
        time.sleep(0.5)
        term.send(b"\x03")  # Ctrl-C at the prompt: a hint, not an exit
        term.expect(r"use /exit or Ctrl-D to leave")
        term.expect(r">>> ")
        term.sendline("/stats")
        term.expect(r">>> ")
        term.sendline("/exit")
        assert term.wait() == 0, term.text
        assert "Traceback" not in term.text, term.text
    finally:
        term.close()


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pty")
def test_ctrl_c_stops_a_reply_and_ctrl_d_exits(tmp_path):
    ckpt = _checkpoint(tmp_path / "tiny", max_position_embeddings=131072)
    _never_stop(ckpt)
    args = ["chat", str(ckpt), "--max-new-tokens", "100000", "--temperature", "1.0", "--seed", "0", "--device", "cpu"]
    term = Terminal(args, _env(tmp_path))
    try:
        term.expect(r">>> ")
        term.sendline("Tell me a very long story")
        term.expect(r"Tell me a very long story\n")  # the echo; the reply streams after it
        term.wait_for_output(20)
        term.send(b"\x03")
        reply = term.expect(r"\[interrupted\]")
        assert "tok/s" not in term.text[: reply.start()], "the reply ended before Ctrl-C; pick a longer one"
        term.expect(r">>> ")
        term.send(b"\x04")  # Ctrl-D on an empty line: EOF, a clean exit
        assert term.wait() == 0, term.text
        assert "Traceback" not in term.text, term.text
    finally:
        term.close()
