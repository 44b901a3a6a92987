"""What `moerun serve` reads, without a model or a socket: requests of OpenAI's
chat/completions and Ollama's chat/generate turned into one `GenRequest` (with the template
options and JSON mode a request asks for), and stop strings held back while streaming.
moerun.server_responses writes the replies, tool calls in OpenAI's and Ollama's shapes
among them (the parsing is moerun/tool_calls.py's, by the model's format)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from moerun.tool_calls import held_tail


class RequestError(Exception):
    """A bad request: becomes a 4xx JSON error, never a traceback."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        code: str | None = None,
        param: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.message, self.status, self.code, self.param, self.kind = message, status, code, param, kind

    def openai(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def ollama(self) -> dict:
        return {"error": self.message}


@dataclasses.dataclass
class Defaults:
    """The server's sampling defaults (its command-line options), for fields a request omits."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int | None = None  # None: up to the planned context
    seed: int | None = None


@dataclasses.dataclass
class GenRequest:
    """One generation, whatever the API: `messages` through the chat template, or `text`
    encoded as is (raw)."""

    messages: list[dict] | None
    text: str | None
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]
    stream: bool
    tools: list | None = None
    include_usage: bool = False
    echo: bool = False
    json_mode: bool = False  # response_format json_object / Ollama's format "json"
    template_kwargs: dict = dataclasses.field(default_factory=dict)  # extra chat-template variables
    num_ctx: int | None = None  # Ollama's options.num_ctx: this request's window (prompt + reply), within the plan
    # min_p and the penalties (moerun.generate.SamplingParams' fields), only those the request set.
    penalties: dict = dataclasses.field(default_factory=dict)


# -- field readers --------------------------------------------------------------------------------


# Deeper JSON than any request needs (a tool schema nests ~10 deep); deeper would reach Python's
# recursion limit in the parser, the templates or json.dumps (a 500 RecursionError).
MAX_JSON_DEPTH = 64


def _too_deep(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def parse_body(raw: bytes) -> dict:
    too_deep = RequestError(f"the request body nests JSON more than {MAX_JSON_DEPTH} levels deep", code="invalid_json")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise too_deep from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", code="invalid_json")
    if _too_deep(body, MAX_JSON_DEPTH):
        raise too_deep
    return body


def _number(body: dict, key: str, lo: float, hi: float, default, integer: bool = False, where: str = ""):
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise RequestError(
            f"'{where}{key}' must be {kind} between {lo:g} and {hi:g}, got {json.dumps(value)[:100]}",
            code="invalid_value",
            param=where + key,
        )
    return value


def _bool(body: dict, key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"'{key}' must be true or false, got {json.dumps(value)}", code="invalid_value", param=key)
    return value


def _stop(value, key: str = "stop") -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value) or len(value) > 16:
        raise RequestError(f"'{key}' must be a string or a list of at most 16 strings", code="invalid_value", param=key)
    return [s for s in value if s]


def _text_content(content, where: str) -> str:
    """A message's content: a string, or OpenAI's list of parts of which only text is taken."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RequestError(
                    f"{where}: only text content is supported, got a '{kind}' part",
                    code="invalid_value",
                    param="messages",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(f"{where}: 'content' must be a string or a list of text parts", param="messages")


def _tool_arguments(value):
    # Templates (Qwen's) write arguments with tojson: a JSON string would be quoted twice.
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


ROLES = ("system", "developer", "user", "assistant", "tool")


def _messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RequestError("'messages' must be a non-empty list", code="invalid_value", param="messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where} must be an object with 'role' and 'content'", param="messages")
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(
                f"{where}: unknown role {json.dumps(role)} (use one of {', '.join(ROLES)})",
                code="invalid_value",
                param="messages",
            )
        if m.get("images"):
            raise RequestError(f"{where}: images are not supported (text-only model)", param="messages")
        message = {"role": "system" if role == "developer" else role, "content": _text_content(m.get("content"), where)}
        for key in ("name", "tool_call_id"):
            if isinstance(m.get(key), str):
                message[key] = m[key]
        calls = m.get("tool_calls")
        if calls:
            if not isinstance(calls, list):
                raise RequestError(f"{where}: 'tool_calls' must be a list", param="messages")
            message["tool_calls"] = []
            for call in calls:
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise RequestError(f"{where}: each tool call needs function.name", param="messages")
                fixed = {"name": fn["name"], "arguments": _tool_arguments(fn.get("arguments", {}))}
                message["tool_calls"].append({"type": "function", "id": call.get("id"), "function": fixed})
        out.append(message)
    return out


def _tools(value) -> list | None:
    if value is None or value == []:
        return None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise RequestError("'tools' must be a list of tool objects", code="invalid_value", param="tools")
    return value


# Sampling fields the sampler does not implement, with the value that leaves sampling as it is:
# that value (clients send the defaults) passes, any other is a 400 naming the field, never silently ignored.
_NEUTRAL = {"repetition_penalty": (1, 0, 1e9), "typical_p": (1, 0, 1), "tfs_z": (1, 0, 1e9), "mirostat": (0, 0, 2)}
# Implemented (moerun.generate.adjust_logits, filtered_probs): field -> (range, integer).
_PENALTIES = {
    "presence_penalty": (-2, 2, False),
    "frequency_penalty": (-2, 2, False),
    "min_p": (0, 1, False),
    "repeat_penalty": (1e-6, 1e6, False),
    "repeat_last_n": (-1, 1 << 31, True),
}


def _unsupported_sampling(body: dict, where: str = "") -> None:
    for key, (neutral, lo, hi) in _NEUTRAL.items():
        value = _number(body, key, lo, hi, neutral, integer=key == "mirostat", where=where)
        if value != neutral:
            raise RequestError(
                f"'{where}{key}' is not supported (leave it out or send {neutral})",
                code="unsupported_parameter",
                param=where + key,
            )


def _logit_bias(body: dict) -> dict[int, float] | None:
    """OpenAI's logit_bias: {"token id": bias from -100 to 100}; the ids are checked against the vocabulary later."""
    bias = body.get("logit_bias")
    if bias is None or bias == {}:
        return None
    bad = RequestError(
        "'logit_bias' must be an object of token ids (\"42\") to numbers from -100 to 100",
        code="invalid_value",
        param="logit_bias",
    )
    if not isinstance(bias, dict) or len(bias) > 1024:
        raise bad
    out = {}
    for key, value in bias.items():
        if not key.isdigit() or type(value) not in (int, float) or not -100 <= value <= 100:
            raise bad
        out[int(key)] = float(value)
    return out


def _penalties(body: dict, where: str = "", openai: bool = False) -> dict:
    out = {}
    for key, (lo, hi, integer) in _PENALTIES.items():
        value = _number(body, key, lo, hi, None, integer=integer, where=where)
        if value is not None:
            out[key] = value
    bias = _logit_bias(body) if openai else None
    if bias:
        out["logit_bias"] = bias
    return out


def _common(body: dict, defaults: Defaults, where: str = "", openai: bool = False) -> dict:
    _unsupported_sampling(body, where)
    penalties = _penalties(body, where, openai)
    temperature = _number(body, "temperature", 0, 2, defaults.temperature)
    top_p = _number(body, "top_p", 0, 1, defaults.top_p)
    return dict(
        temperature=float(temperature),
        top_p=max(float(top_p), 1e-9),  # 0 keeps only the likeliest token, as with any tiny mass
        top_k=_number(body, "top_k", 0, 1 << 31, defaults.top_k, integer=True),
        seed=_number(body, "seed", -(1 << 63), (1 << 63) - 1, defaults.seed, integer=True),
        penalties=penalties,
    )


def _openai_checks(body: dict) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise RequestError(f"only n=1 is supported, got {json.dumps(n)}", code="invalid_value", param="n")
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs"):
        raise RequestError("logprobs are not supported", code="unsupported_parameter", param="logprobs")


def _max_tokens(body: dict, keys: tuple[str, ...], default: int | None) -> int | None:
    for key in keys:
        if body.get(key) is not None:
            return _number(body, key, 1, 1 << 31, None, integer=True)
    return default


def _stream_usage(body: dict) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object", param="stream_options")
    return _bool(options, "include_usage", False)


def _tool_choice(body: dict, tools: list | None) -> list | None:
    """tool_choice "auto" (the default) or "none"; forcing a call is refused, since
    nothing here can make the model call."""
    choice = body.get("tool_choice")
    if choice in (None, "auto"):
        return tools
    if choice == "none":
        return None
    if choice == "required" or isinstance(choice, dict):
        raise RequestError(
            'tool_choice: forcing a tool call is not supported; use "auto" or "none"',
            code="unsupported_parameter",
            param="tool_choice",
        )
    raise RequestError(
        f'tool_choice must be "auto" or "none", got {json.dumps(choice)}', code="invalid_value", param="tool_choice"
    )


def _response_format(value) -> bool:
    """OpenAI's response_format -> JSON mode or not."""
    if value is None:
        return False
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return False
    if kind == "json_object":
        return True
    if kind == "json_schema":
        raise RequestError(
            'response_format json_schema is not supported (only {"type": "json_object"}, which '
            "constrains the reply to a JSON object without a schema)",
            code="unsupported_parameter",
            param="response_format",
        )
    raise RequestError(
        'response_format must be {"type": "text"} or {"type": "json_object"}',
        code="invalid_value",
        param="response_format",
    )


# Variables the server sets itself; a request's chat_template_kwargs may not replace them.
_RESERVED_TEMPLATE_VARS = ("messages", "add_generation_prompt", "tokenize", "tools")


def _template_kwargs(body: dict, thinking_key: str) -> dict:
    """Extra chat-template variables, as vLLM takes them: `chat_template_kwargs`, plus
    `enable_thinking` (Qwen3's templates; Ollama's `think`) and `reasoning_effort`
    (gpt-oss's template) at the top level."""
    kwargs = body.get("chat_template_kwargs")
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise RequestError(
            "'chat_template_kwargs' must be an object", code="invalid_value", param="chat_template_kwargs"
        )
    bad = [k for k in kwargs if k in _RESERVED_TEMPLATE_VARS or k.startswith("_")]
    if bad:
        raise RequestError(
            f"chat_template_kwargs may not set '{bad[0]}'", code="invalid_value", param="chat_template_kwargs"
        )
    out = dict(kwargs)
    think = body.get(thinking_key)
    if thinking_key == "think" and think in ("low", "medium", "high"):  # Ollama's levels for gpt-oss
        out.setdefault("reasoning_effort", think)
        think = True
    if think is not None:
        if not isinstance(think, bool):
            raise RequestError(f"'{thinking_key}' must be true or false", code="invalid_value", param=thinking_key)
        out.setdefault("enable_thinking", think)
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort not in ("low", "medium", "high"):
            raise RequestError(
                '\'reasoning_effort\' must be "low", "medium" or "high"', code="invalid_value", param="reasoning_effort"
            )
        out.setdefault("reasoning_effort", effort)
    return out


def openai_chat(body: dict, defaults: Defaults) -> GenRequest:
    _openai_checks(body)
    tools = _tool_choice(body, _tools(body.get("tools")))
    return GenRequest(
        messages=_messages(body.get("messages")),
        text=None,
        max_tokens=_max_tokens(body, ("max_completion_tokens", "max_tokens"), defaults.max_tokens),
        stop=_stop(body.get("stop")),
        stream=_bool(body, "stream", False),
        tools=tools,
        include_usage=_stream_usage(body),
        json_mode=_response_format(body.get("response_format")),
        template_kwargs=_template_kwargs(body, "enable_thinking"),
        **_common(body, defaults, openai=True),
    )


def openai_completion(body: dict, defaults: Defaults) -> GenRequest:
    _openai_checks(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise RequestError(
            "'prompt' must be a non-empty string (one prompt per request)", code="invalid_value", param="prompt"
        )
    if body.get("suffix"):
        raise RequestError(
            "'suffix' (fill in the middle) is not supported", code="unsupported_parameter", param="suffix"
        )
    # 16 is OpenAI's own default for this endpoint.
    return GenRequest(
        messages=None,
        text=prompt,
        max_tokens=_max_tokens(body, ("max_tokens",), 16),
        stop=_stop(body.get("stop")),
        stream=_bool(body, "stream", False),
        include_usage=_stream_usage(body),
        echo=_bool(body, "echo", False),
        **_common(body, defaults, openai=True),
    )


def _ollama_options(body: dict, defaults: Defaults) -> dict:
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise RequestError("'options' must be an object", param="options")
    predict = options.get("num_predict")
    if predict is not None and (
        isinstance(predict, bool) or not isinstance(predict, int) or predict == 0 or predict < -2
    ):
        raise RequestError("'options.num_predict' must be a positive integer, -1 or -2", param="options")
    max_tokens = predict if predict is not None and predict > 0 else defaults.max_tokens  # -1, -2: to the context
    num_ctx = _number(options, "num_ctx", 1, 1 << 31, None, integer=True, where="options.")
    return dict(
        max_tokens=max_tokens,
        stop=_stop(options.get("stop"), "options.stop"),
        num_ctx=num_ctx,
        **_common(options, defaults, "options."),
    )


def _ollama_format(body: dict) -> bool:
    """Ollama's `format`: "json" is JSON mode; a schema is refused."""
    value = body.get("format")
    if value in (None, ""):
        return False
    if value == "json":
        return True
    if isinstance(value, dict):
        raise RequestError("'format' with a JSON schema is not supported (only \"json\")", param="format")
    raise RequestError(f"'format' must be \"json\", got {json.dumps(value)}", param="format")


def ollama_chat(body: dict, defaults: Defaults) -> GenRequest:
    return GenRequest(
        messages=_messages(body.get("messages")),
        text=None,
        stream=_bool(body, "stream", True),
        tools=_tools(body.get("tools")),
        json_mode=_ollama_format(body),
        template_kwargs=_template_kwargs(body, "think"),
        **_ollama_options(body, defaults),
    )


def ollama_generate(body: dict, defaults: Defaults) -> GenRequest:
    prompt = body.get("prompt", "")
    if not isinstance(prompt, str):
        raise RequestError("'prompt' must be a string", param="prompt")
    for key in ("template", "suffix", "images"):
        if body.get(key):
            raise RequestError(f"'{key}' is not supported", param=key)
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        raise RequestError("'system' must be a string", param="system")
    raw = _bool(body, "raw", False)
    options = _ollama_options(body, defaults)
    json_mode = _ollama_format(body)
    if raw:
        return GenRequest(
            messages=None, text=prompt, stream=_bool(body, "stream", True), json_mode=json_mode, **options
        )
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return GenRequest(
        messages=messages,
        text=None,
        stream=_bool(body, "stream", True),
        json_mode=json_mode,
        template_kwargs=_template_kwargs(body, "think"),
        **options,
    )


# -- streaming filters --------------------------------------------------------------------------


class StopFilter:
    """Cuts the reply at the first stop string. feed(text) -> (text safe to send, hit):
    text that might be the start of a stop string is held back until it is not."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[: min(hits)], ""
            return out, True
        keep = held_tail(self.buf, self.stops)
        out, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep :]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out
