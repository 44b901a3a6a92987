"""Tool calls (and reasoning) in a model's reply, by the format its chat template writes.

A family file names its format (`TOOL_CALL_FORMAT` in moerun/models/<family>.py); this
module knows how to read each one, as a whole reply and while streaming:

- "qwen": Qwen / Hermes `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, and
  the XML body of Qwen3-Coder / Qwen3.5 templates
  (`<tool_call><function=NAME><parameter=KEY>value</parameter></function></tool_call>`);
  a `<think>...</think>` block first is the reasoning (read with or without tools).
- "mistral": `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]` of the v3 templates
  and `[TOOL_CALLS]NAME[ARGS]{...}` (optionally `[CALL_ID]id` before `[ARGS]`) of the
  v11+ ones.
- "harmony": gpt-oss. The reply is a run of messages on channels: `analysis` is the
  reasoning, `final` (and `commentary` without a recipient) the content, and a message
  to `functions.NAME` a call: `<|channel|>commentary to=functions.NAME <|constrain|>json
  <|message|>{...}<|call|>` (the recipient may also come before the channel).
- "llama4": Llama 4's JSON `{"name": ..., "parameters": {...}}` (one or more, `;`
  apart) and the pythonic `[func(a=1, b="x"), other()]`, either bare at the start of
  the reply or inside `<|python_start|>...<|python_end|>`.

Streaming: `parser.feed(text)` returns the pieces safe to send now, as ("content" | "reasoning",
text); text that may begin a call is held back; `parser.finish()` returns the rest and the
calls. Content before a call goes out as it comes; a call goes out whole once parsed;
text that looked like a call but does not parse goes out as content. Markers such as
[TOOL_CALLS] or <|channel|> are special tokens in their tokenizers: `ToolFormat.markers`
are the ones decoding must keep (see Tokenizer.stream_decoder(keep_special=...)).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from typing import Callable

Piece = tuple[str, str]  # ("content" | "reasoning", text)
Call = dict  # {"name": str, "arguments": dict | str}


def held_tail(text: str, marks) -> int:
    """Length of the longest end of `text` that could still grow into one of `marks`."""
    keep = 0
    for mark in marks:
        for k in range(min(len(mark) - 1, len(text)), keep, -1):
            if text.endswith(mark[:k]):
                keep = k
                break
    return keep


def _arguments(value):
    # A JSON string of arguments (some models write them so) becomes the object it holds.
    if isinstance(value, str):
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:
            return value
        return decoded if isinstance(decoded, dict) else value
    return value if value is not None else {}


def _call(obj) -> Call | None:
    """{"name", "arguments" | "parameters"} -> a call, else None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return {"name": obj["name"], "arguments": _arguments(args)}


def _json_values(text: str) -> tuple[list, str] | None:
    """Consecutive JSON values at the start of `text` (whitespace, `;` or `,` between) ->
    (values, the text after them); None when the first is not JSON."""
    decoder, values, pos = json.JSONDecoder(), [], 0
    while True:
        while pos < len(text) and (text[pos].isspace() or (values and text[pos] in ";,")):
            pos += 1
        if pos >= len(text) or text[pos] not in "[{":
            break
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break
        values.append(value)
    return (values, text[pos:]) if values else None


# -- the parsers ----------------------------------------------------------------------------------


class ReplyParser:
    """The base: content streams until one of `markers` starts a call; from there on
    everything is held for `parse_held`, which returns (content, calls)."""

    markers: tuple[str, ...] = ()

    def __init__(self, tools: list | None = None, prompt: str = "", find_calls: bool = True):
        """tools: the request's (their parameter types guide some formats); prompt: the end
        of the rendered prompt (a template may open a block the reply closes); find_calls:
        False reads reasoning and content only (no tools were offered)."""
        self.tools = tools or []
        self.prompt = prompt
        self.find_calls = find_calls
        self.buf = ""
        self.held = False

    def feed(self, text: str) -> list[Piece]:
        self.buf += text
        if self.held:
            return []
        at = self.call_start(self.buf)
        if at is not None:
            out, self.buf, self.held = self.buf[:at], self.buf[at:], True
            return [("content", out)] if out else []
        keep = self.undecided_tail(self.buf)
        out, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep :]
        return [("content", out)] if out else []

    def call_start(self, buf: str) -> int | None:
        if not self.find_calls:
            return None
        found = [i for i in (buf.find(m) for m in self.markers) if i >= 0]
        return min(found) if found else None

    def undecided_tail(self, buf: str) -> int:
        return held_tail(buf, self.markers) if self.find_calls else 0

    def finish(self) -> tuple[list[Piece], list[Call]]:
        text, self.buf = self.buf, ""
        if not self.held:
            return ([("content", text)] if text else []), []
        content, calls = self.parse_held(text)
        return ([("content", content)] if content else []), calls

    def parse_held(self, text: str) -> tuple[str, list[Call]]:
        raise NotImplementedError


def _param_types(tools: list) -> dict[str, dict[str, str]]:
    """function name -> {parameter: JSON-schema type} from the request's tools."""
    out = {}
    for tool in tools:
        fn = tool.get("function", tool) if isinstance(tool, dict) else {}
        props = (fn.get("parameters") or {}).get("properties") or {} if isinstance(fn, dict) else {}
        if isinstance(fn, dict) and isinstance(fn.get("name"), str) and isinstance(props, dict):
            out[fn["name"]] = {k: v.get("type") for k, v in props.items() if isinstance(v, dict)}
    return out


_XML_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|$)", re.S)
_XML_PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?(?:</parameter>|(?=<parameter=)|$)", re.S)


class QwenParser(ReplyParser):
    """`<tool_call>` blocks holding JSON or Qwen3-Coder's XML; an unclosed last block counts.
    A `<think>...</think>` block first is the reasoning; a prompt that ends in `<think>`
    (Qwen3.5's, thinking on) leaves the reply inside one."""

    markers = ("<tool_call>",)
    _BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)

    def __init__(self, tools: list | None = None, prompt: str = "", find_calls: bool = True):
        super().__init__(tools, prompt, find_calls)
        # "maybe": the reply may open a think block; "in": inside one; "after": just closed; "no": past it.
        self.think = "in" if prompt.rstrip().endswith("<think>") else "maybe"
        self.tbuf = ""

    def feed(self, text: str) -> list[Piece]:
        if self.think == "no":
            return super().feed(text)
        self.tbuf += text
        if self.think == "maybe":
            start = self.tbuf.lstrip()
            if start.startswith("<think>"):
                self.think, self.tbuf = "in", start[len("<think>") :]
            elif "<think>".startswith(start):
                return []  # not yet known
            else:
                self.think = "no"
                rest, self.tbuf = self.tbuf, ""
                return super().feed(rest)
        out: list[Piece] = []
        if self.think == "in":
            i = self.tbuf.find("</think>")
            if i < 0:
                keep = held_tail(self.tbuf, ["</think>"])
                thought, self.tbuf = self.tbuf[: len(self.tbuf) - keep], self.tbuf[len(self.tbuf) - keep :]
                return [("reasoning", thought)] if thought else []
            if i:
                out.append(("reasoning", self.tbuf[:i]))
            self.think, self.tbuf = "after", self.tbuf[i + len("</think>") :]
        rest, self.tbuf = self.tbuf.lstrip("\n"), ""  # templates put blank lines after </think>
        if rest:
            self.think = "no"
            out += super().feed(rest)
        return out

    def finish(self) -> tuple[list[Piece], list[Call]]:
        out: list[Piece] = []
        if self.think == "in" and self.tbuf:  # cut off while thinking
            out.append(("reasoning", self.tbuf))
        elif self.think == "maybe" and self.tbuf:
            out += super().feed(self.tbuf)
        self.tbuf = ""
        rest, calls = super().finish()
        return out + rest, calls

    def parse_held(self, text: str) -> tuple[str, list[Call]]:
        calls, kept, pos = [], [], 0
        for m in self._BLOCK.finditer(text):
            found = self._body(m.group(1).strip())
            if not found:
                continue
            calls += found
            kept.append(text[pos : m.start()])
            pos = m.end()
        kept.append(text[pos:])
        return ("".join(kept).strip() if calls else text), calls

    def _body(self, body: str) -> list[Call]:
        if body.startswith("{"):
            try:
                call = _call(json.loads(body))
            except json.JSONDecodeError:
                return []
            return [call] if call else []
        types = _param_types(self.tools)
        calls = []
        for fm in _XML_FUNCTION.finditer(body):
            name, declared = fm.group(1).strip(), types.get(fm.group(1).strip(), {})
            args = {}
            for pm in _XML_PARAMETER.finditer(fm.group(2)):
                key, raw = pm.group(1).strip(), pm.group(2)
                args[key] = raw if declared.get(key) == "string" else _xml_value(raw)
            calls.append({"name": name, "arguments": args})
        return calls


def _xml_value(raw: str):
    # Undeclared or non-string parameters are written as JSON (numbers, objects); anything else is text.
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


class MistralParser(ReplyParser):
    """`[TOOL_CALLS]` then a JSON list (v3) or NAME[ARGS]{...} (v11+), repeated."""

    markers = ("[TOOL_CALLS]",)

    def parse_held(self, text: str) -> tuple[str, list[Call]]:
        calls, rest = [], []
        for seg in text.split("[TOOL_CALLS]")[1:]:
            got = self._segment(seg)
            if got is None:
                rest.append("[TOOL_CALLS]" + seg)
                continue
            calls += got[0]
            rest.append(got[1])
        return ("".join(rest).strip() if calls else text), calls

    @staticmethod
    def _segment(seg: str) -> tuple[list[Call], str] | None:
        body = seg.lstrip()
        if body[:1] in ("[", "{"):  # v3: a JSON list of calls (or one call)
            got = _json_values(body)
            if got is None:
                return None
            values = [v for value in got[0] for v in (value if isinstance(value, list) else [value])]
            calls = [_call(v) for v in values]
            return (calls, got[1]) if calls and all(calls) else None
        m = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(?:\[CALL_ID\]\s*[A-Za-z0-9]+\s*)?(?:\[ARGS\])?", seg)
        if not m or not m.group(1):
            return None
        got = _json_values(seg[m.end() :])
        if got is None or not isinstance(got[0][0], dict):
            return None
        return [{"name": m.group(1), "arguments": got[0][0]}], got[1]


class Llama4Parser(ReplyParser):
    """A reply that starts with JSON calls or a pythonic call list, or has them in
    <|python_start|>...<|python_end|>."""

    markers = ("<|python_start|>",)
    _PYTHONIC = re.compile(r"\[\s*[A-Za-z_][\w.]*\s*\(")
    _JSON = re.compile(r'\{\s*"(?:name|type)"')
    # Starts that may still grow into one of the two (`[get_wea`, `{"na`).
    _PYTHONIC_SO_FAR = re.compile(r"\[\s*(?:[A-Za-z_][\w.]*\s*)?")
    _JSON_SO_FAR = re.compile(r'\{\s*(?:"(?:n(?:a(?:m(?:e)?)?)?|t(?:y(?:p(?:e)?)?)?)?)?')

    def __init__(self, tools: list | None = None, prompt: str = "", find_calls: bool = True):
        super().__init__(tools, prompt, find_calls)
        self.began = False  # the reply has begun with something that is not a call

    def call_start(self, buf: str) -> int | None:
        if not self.began and self.find_calls:
            start = buf.lstrip()
            if self._PYTHONIC.match(start) or self._JSON.match(start):
                return 0
            if not start or self._PYTHONIC_SO_FAR.fullmatch(start) or self._JSON_SO_FAR.fullmatch(start):
                return None  # undecided: undecided_tail holds it all
            self.began = True
        return super().call_start(buf)

    def undecided_tail(self, buf: str) -> int:
        return len(buf) if not self.began and self.find_calls else super().undecided_tail(buf)

    def parse_held(self, text: str) -> tuple[str, list[Call]]:
        body = text.replace("<|python_start|>", "").replace("<|python_end|>", "").strip()
        calls = _llama_json_calls(body) or _pythonic_calls(body)
        return ("", calls) if calls else (text, [])


def _llama_json_calls(body: str) -> list[Call]:
    got = _json_values(body)
    if got is None or got[1].strip():
        return []
    values = [v for value in got[0] for v in (value if isinstance(value, list) else [value])]
    calls = [_call(v) for v in values]
    return calls if calls and all(calls) else []


def _literal(node: ast.AST):
    # JSON's spellings too: models trained on JSON write true/false/null in pythonic calls.
    if isinstance(node, ast.Name) and node.id in ("true", "false", "null"):
        return {"true": True, "false": False, "null": None}[node.id]
    return ast.literal_eval(node)


def _pythonic_calls(body: str) -> list[Call]:
    """`[f(a=1, b="x"), g()]` -> calls, read with ast (never evaluated)."""
    try:
        tree = ast.parse(body, mode="eval").body
    except SyntaxError:
        return []
    if not isinstance(tree, ast.List) or not tree.elts:
        return []
    calls = []
    for node in tree.elts:
        if not isinstance(node, ast.Call) or node.args:
            return []
        name = ast.unparse(node.func)
        if not re.fullmatch(r"[A-Za-z_][\w.]*", name):
            return []
        try:
            args = {kw.arg: _literal(kw.value) for kw in node.keywords if kw.arg}
        except (ValueError, SyntaxError, TypeError):
            return []
        calls.append({"name": name, "arguments": args})
    return calls


class HarmonyParser(ReplyParser):
    """gpt-oss harmony messages. The generation prompt ends with `<|start|>assistant`, so
    the reply begins inside a message header."""

    markers = ("<|start|>", "<|channel|>", "<|constrain|>", "<|message|>", "<|end|>", "<|call|>", "<|return|>")
    _ENDS = ("<|end|>", "<|call|>", "<|return|>", "<|start|>")

    def __init__(self, tools: list | None = None, prompt: str = "", find_calls: bool = True):
        super().__init__(tools, prompt, True)  # a message to functions.* is a call whatever was offered
        self.in_header = True
        self.kind = "content"  # where the current message's text goes: content, reasoning, call
        self.body = ""  # a call's arguments so far
        self.calls: list[Call] = []
        self.recipient = None

    def feed(self, text: str) -> list[Piece]:
        self.buf += text
        out: list[Piece] = []
        while self.buf:
            if self.in_header:
                i = self.buf.find("<|message|>")
                if i < 0:
                    return out  # the header is short: hold it whole
                self._open(self.buf[:i])
                self.buf = self.buf[i + len("<|message|>") :]
                continue
            ends = [(j, m) for m in self._ENDS if (j := self.buf.find(m)) >= 0]
            if ends:
                j, mark = min(ends)
                self._emit(self.buf[:j], out)
                self._close()
                self.buf = self.buf[j + len(mark) :]
                continue
            keep = held_tail(self.buf, self._ENDS)
            self._emit(self.buf[: len(self.buf) - keep], out)
            self.buf = self.buf[len(self.buf) - keep :]
            return out
        return out

    def _open(self, header: str) -> None:
        header = header.replace("<|start|>", " ").replace("<|constrain|>", " ")
        m = re.search(r"<\|channel\|>\s*(\w+)", header)
        channel = m.group(1) if m else "final"
        r = re.search(r"to=([^\s<]+)", header)
        self.recipient = r.group(1) if r else None
        if self.recipient:
            self.kind = "call"
        else:
            self.kind = "reasoning" if channel == "analysis" else "content"
        self.in_header, self.body = False, ""

    def _emit(self, text: str, out: list[Piece]) -> None:
        if not text:
            return
        if self.kind == "call":
            self.body += text
        elif out and out[-1][0] == self.kind:
            out[-1] = (self.kind, out[-1][1] + text)
        else:
            out.append((self.kind, text))

    def _close(self) -> None:
        if self.kind == "call":
            name = self.recipient.removeprefix("functions.")
            self.calls.append({"name": name, "arguments": _arguments(self.body.strip() or "{}")})
        self.in_header, self.kind, self.body, self.recipient = True, "content", "", None

    def finish(self) -> tuple[list[Piece], list[Call]]:
        out: list[Piece] = []
        if self.in_header:
            # A reply with no header at all (a template without channels): its text is content.
            rest = self.buf.strip()
            if rest and "<|" not in rest:
                out.append(("content", rest))
        else:
            self._emit(self.buf, out)
            if self.kind == "call" or self.body:
                self._close()
        self.buf = ""
        return out, self.calls


@dataclasses.dataclass(frozen=True)
class ToolFormat:
    """A chat-template family's output format: its parser, the special tokens decoding
    must keep for it, and whether the reply needs parsing even without tools (for its
    reasoning: harmony's channels, Qwen's think blocks)."""

    name: str
    parser: Callable[..., ReplyParser]
    markers: tuple[str, ...]
    always: bool = False


FORMATS = {
    "qwen": ToolFormat("qwen", QwenParser, ("<tool_call>", "</tool_call>", "<think>", "</think>"), always=True),
    "mistral": ToolFormat("mistral", MistralParser, ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]")),
    "harmony": ToolFormat("harmony", HarmonyParser, HarmonyParser.markers, always=True),
    "llama4": ToolFormat("llama4", Llama4Parser, ("<|python_start|>", "<|python_end|>")),
}


def format_for(config: dict | None) -> ToolFormat | None:
    """The tool-call format of a checkpoint's family (its TOOL_CALL_FORMAT), or None when
    the family declares none (tools still reach its template; calls are not parsed)."""
    from moerun.models import ARCHITECTURES, get_architecture

    model_type = (config or {}).get("model_type")
    if model_type not in ARCHITECTURES:
        return None
    name = get_architecture(model_type).tool_call_format
    return FORMATS.get(name) if name else None


def parse_reply(
    fmt: ToolFormat, text: str, tools: list | None = None, prompt: str = "", find_calls: bool = True
) -> tuple[str, str, list[Call]]:
    """A whole reply -> (content, reasoning, calls); arguments as for ReplyParser."""
    parser = fmt.parser(tools, prompt, find_calls)
    pieces = parser.feed(text)
    rest, calls = parser.finish()
    pieces += rest
    content = "".join(t for k, t in pieces if k == "content")
    reasoning = "".join(t for k, t in pieces if k == "reasoning")
    return (content.strip() if calls else content), reasoning.strip(), calls
