"""What `moerun serve` writes, without a model or a socket: OpenAI's and Ollama's response
bodies as pure functions of a generation's `Result` and of what the listings say of the
served model (moerun.server_protocol reads the requests; moerun.serve routes one to the other).
The key order of every body is part of its shape: clients see the same bytes for the same reply."""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from typing import Any, Sequence

from moerun.config_checks import text_config
from moerun.errors import MoerunError
from moerun.server_protocol import Defaults, RequestError
from moerun.tool_calls import Call, Piece


@dataclasses.dataclass
class Result:
    """One generation as the worker ran it: what every response body is written from."""

    text: str = ""  # the reply after stop strings (tool-call blocks still in it)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0
    finish_reason: str = "stop"  # "stop", "length", or "abort" (cut short by the server stopping)
    cancelled: bool = False
    queued_s: float = 0.0
    prompt_s: float = 0.0
    decode_s: float = 0.0
    experts: dict | None = None  # this request's expert-cache counters

    @property
    def prefilled_tokens(self) -> int:
        return self.prompt_tokens - self.reused_tokens


@dataclasses.dataclass(frozen=True)
class ReplyHead:
    """What every body of one OpenAI reply repeats: its id, when it began (Unix seconds) and the model's name."""

    id: str
    created: int
    model: str


# -- framing ------------------------------------------------------------------------------------


def sse(data: Any) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def ndjson(data: dict) -> bytes:
    return (json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def request_error(exc: BaseException) -> RequestError:
    """Any failure as the client sees it: a bad request as it is, moerun's own errors on one line
    (a 400), anything else a 500 naming the exception."""
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, MoerunError):
        return RequestError(" ".join(str(exc).split()), code="invalid_value")
    return RequestError(
        f"internal error: {type(exc).__name__}: {exc}", status=500, kind="server_error", code="internal_error"
    )


# -- OpenAI -------------------------------------------------------------------------------------


def openai_tool_calls(calls: list[Call], streaming: bool = False) -> list[dict]:
    out = []
    for i, call in enumerate(calls):
        args = call["arguments"]
        entry = {
            "id": "call_" + uuid.uuid4().hex[:24],
            "type": "function",
            "function": {"name": call["name"], "arguments": args if isinstance(args, str) else json.dumps(args)},
        }
        if streaming:
            entry = {"index": i, **entry}
        out.append(entry)
    return out


def openai_usage(r: Result) -> dict:
    return {
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "total_tokens": r.prompt_tokens + r.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": r.reused_tokens},
    }


def openai_chat_completion(head: ReplyHead, r: Result, content: str, reasoning: str, calls: list[Call]) -> dict:
    """A whole chat reply, its parsed parts given: a tool call makes the finish reason "tool_calls"
    and an empty content null."""
    message, finish = {"role": "assistant", "content": content}, r.finish_reason
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message.update(content=content or None, tool_calls=openai_tool_calls(calls))
        finish = "tool_calls"
    return {
        "id": head.id,
        "object": "chat.completion",
        "created": head.created,
        "model": head.model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": openai_usage(r),
        "system_fingerprint": None,
    }


def _chunk_head(head: ReplyHead, kind: str) -> dict:
    return {"id": head.id, "object": kind, "created": head.created, "model": head.model, "system_fingerprint": None}


def openai_chat_chunk(head: ReplyHead, delta: dict, finish: str | None = None) -> dict:
    """One streamed piece of a chat reply: the first carries the role, the last a finish reason and an empty delta."""
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {**_chunk_head(head, "chat.completion.chunk"), "choices": [choice]}


def openai_chat_deltas(pieces: list[Piece]) -> list[dict]:
    """A parser's (kind, text) pieces as chat deltas: content, or reasoning_content for thinking."""
    key = {"content": "content", "reasoning": "reasoning_content"}
    return [{key[kind]: text} for kind, text in pieces if text]


def openai_tool_call_delta(calls: list[Call]) -> dict:
    return {"tool_calls": openai_tool_calls(calls, streaming=True)}


def openai_text_completion(head: ReplyHead, r: Result, text: str) -> dict:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": r.finish_reason}
    return {**_chunk_head(head, "text_completion"), "choices": [choice], "usage": openai_usage(r)}


def openai_text_chunk(head: ReplyHead, text: str, finish: str | None = None) -> dict:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {**_chunk_head(head, "text_completion"), "choices": [choice]}


def openai_usage_chunk(head: ReplyHead, r: Result, chat: bool) -> dict:
    """The last chunk when the request asked for stream_options.include_usage: no choices, the usage."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    return {**_chunk_head(head, kind), "choices": [], "usage": openai_usage(r)}


def openai_model(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "moerun"}


def openai_models(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [openai_model(model_id, created)]}


# -- Ollama -------------------------------------------------------------------------------------


def ollama_tool_calls(calls: list[Call]) -> list[dict]:
    return [
        {"function": {"name": c["name"], "arguments": c["arguments"] if isinstance(c["arguments"], dict) else {}}}
        for c in calls
    ]


def ollama_piece(
    model: str,
    created_at: str,
    chat: bool,
    text: str,
    done: bool = False,
    calls: Sequence[Call] = (),
    thinking: str = "",
) -> dict:
    """One line of /api/chat (a message) or /api/generate (a response), streamed or whole."""
    out = {"model": model, "created_at": created_at}
    if chat:
        out["message"] = {"role": "assistant", "content": text}
        if thinking:
            out["message"]["thinking"] = thinking
        if calls:
            out["message"]["tool_calls"] = ollama_tool_calls(calls)
    else:
        out["response"] = text
        if thinking:
            out["thinking"] = thinking
    out["done"] = done
    return out


def ollama_pieces(
    model: str, created_at: str, chat: bool, pieces: list[Piece], calls: Sequence[Call] = ()
) -> list[dict]:
    """A parser's (kind, text) pieces as streamed lines, content or thinking, then one line of tool calls."""
    out = [
        ollama_piece(model, created_at, chat, text)
        if kind == "content"
        else ollama_piece(model, created_at, chat, "", thinking=text)
        for kind, text in pieces
        if text
    ]
    if calls:
        out.append(ollama_piece(model, created_at, chat, "", False, calls))
    return out


def ollama_stats(r: Result) -> dict:
    """The counters of a reply's last line, durations in nanoseconds."""
    ns = 1_000_000_000
    return {
        "done_reason": r.finish_reason,
        "total_duration": int((r.queued_s + r.prompt_s + r.decode_s) * ns),
        "load_duration": 0,
        "prompt_eval_count": r.prompt_tokens,
        "prompt_eval_duration": int(r.prompt_s * ns),
        "eval_count": r.completion_tokens,
        "eval_duration": int(r.decode_s * ns),
    }


def ollama_last(
    model: str, created_at: str, chat: bool, r: Result, text: str = "", calls: Sequence[Call] = (), thinking: str = ""
) -> dict:
    """A reply's last line (done, with its counters); a whole reply when not streamed."""
    return {**ollama_piece(model, created_at, chat, text, True, calls, thinking), **ollama_stats(r)}


def ollama_loaded(model: str, created_at: str, chat: bool) -> dict:
    """The answer to Ollama's "load the model" request (no messages or prompt): it is loaded."""
    head = {"model": model, "created_at": created_at, "done": True, "done_reason": "load"}
    return {**head, **({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})}


def ollama_error_line(exc: BaseException) -> dict:
    """A failure mid-stream: the status line went out already, so the error is a line of its own."""
    return {"error": request_error(exc).message}


@dataclasses.dataclass(frozen=True)
class OllamaListing:
    """What Ollama's listings (/api/tags, /api/show, /api/ps) say of the served model."""

    tag: str  # name:tag ("demo:latest")
    digest: str
    modified_at: str
    details: dict  # ollama_details()


def ollama_details(model_type: str, parameters: str, bits: int, dtype: str) -> dict:
    """`parameters` as a model name says it (moerun.units.params_short); `bits` of the experts (16: not quantized)."""
    unquantized = {"bfloat16": "BF16", "float16": "F16"}.get(dtype, "F32")
    quant = {4: "NF4 experts", 8: "Q8_0 experts (int8)"}.get(bits, unquantized)
    return {
        "parent_model": "",
        "format": "safetensors",
        "family": model_type,
        "families": [model_type],
        "parameter_size": parameters,
        "quantization_level": quant,
    }


def ollama_tags(listing: OllamaListing, size: int) -> dict:
    """/api/tags: `size` is the model's bytes on disk."""
    return {
        "models": [
            {
                "name": listing.tag,
                "model": listing.tag,
                "modified_at": listing.modified_at,
                "size": size,
                "digest": listing.digest,
                "details": listing.details,
            }
        ]
    }


def _config_number(config: dict, *keys: str):
    """The first of `keys` that config.json (its language model's part) holds as a number."""
    for key in keys:
        value = config.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
    return None


def ollama_model_info(
    config: dict, name: str, parameter_count: int, context_length: int, n_experts: int = 0, experts_per_token: int = 0
) -> dict:
    """/api/show's model_info: general.* and <arch>.* keys, as Ollama writes them from a GGUF.
    The expert counts are the plan's when it has them, else config.json's."""
    arch = str(config.get("model_type") or "unknown")
    text = text_config(config)
    info = {
        "general.architecture": arch,
        "general.parameter_count": parameter_count,
        "general.basename": name,
        f"{arch}.context_length": context_length,
    }
    fields = {
        "embedding_length": ("hidden_size", "d_model", "n_embd"),
        "block_count": ("num_hidden_layers", "num_layers", "n_layer"),
        "attention.head_count": ("num_attention_heads", "num_heads"),
        "attention.head_count_kv": ("num_key_value_heads",),
        "vocab_size": ("vocab_size",),
    }
    for key, names in fields.items():
        value = _config_number(text, *names)
        if value is not None:
            info[f"{arch}.{key}"] = value
    experts = n_experts or _config_number(
        text, "num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"
    )
    used = experts_per_token or _config_number(text, "num_experts_per_tok", "moe_k", "top_k")
    if experts:
        info[f"{arch}.expert_count"] = int(experts)
        if used:
            info[f"{arch}.expert_used_count"] = int(used)
    return info


def ollama_capabilities(chats: bool, tool_format: str | None, template: str) -> list[str]:
    """Completion always; tools when the family has a call format the replies are read in
    (`tool_format`, its name); thinking when the chat template can think. A model that does not chat: completion."""
    out = ["completion"]
    if not chats:
        return out
    if tool_format is not None:
        out.append("tools")
    if tool_format == "harmony" or re.search(r"<think>|enable_thinking|reasoning_content|thinking", template):
        out.append("thinking")
    return out


def ollama_parameters(defaults: Defaults, context_length: int) -> str:
    """/api/show's parameters: the server's sampling defaults, one `name value` line each."""
    d = defaults
    rows = (
        [("num_ctx", context_length), ("temperature", d.temperature), ("top_p", d.top_p), ("top_k", d.top_k)]
        + ([("seed", d.seed)] if d.seed is not None else [])
        + ([("num_predict", d.max_tokens)] if d.max_tokens else [])
    )
    return "\n".join(f"{k:<30} {v:g}" if isinstance(v, float) else f"{k:<30} {v}" for k, v in rows)


def ollama_show(
    listing: OllamaListing, model_id: str, parameters: str, template: str, model_info: dict, capabilities: list[str]
) -> dict:
    return {
        "license": "",
        "modelfile": f"# Modelfile of moerun's {listing.tag}\nFROM {model_id}\n",
        "parameters": parameters,
        "template": template,
        "details": listing.details,
        "model_info": model_info,
        "capabilities": capabilities,
        "modified_at": listing.modified_at,
    }


@dataclasses.dataclass(frozen=True)
class Residency:
    """Where the served model is, for /api/ps."""

    vram: int  # bytes on the device
    ram: int  # bytes in host RAM
    device: str
    context_length: int
    expert_cache: dict | None  # the expert cache's total counters, None when the experts are plain weights
    prefix_tokens: int  # tokens the states hold for the next request to reuse


def ollama_ps(listing: OllamaListing, where: Residency, running: bool, waiting: int, served: int) -> dict:
    cache = None
    if where.expert_cache is not None:
        t = where.expert_cache
        uses = t["hits"] + t["misses"]
        cache = {**t, "hit_rate": t["hits"] / uses if uses else None}
    return {
        "models": [
            {
                "name": listing.tag,
                "model": listing.tag,
                "size": where.vram + where.ram,
                "size_vram": where.vram,
                "size_ram": where.ram,
                "digest": listing.digest,
                "details": listing.details,
                "expires_at": "9999-12-31T23:59:59Z",
                "device": where.device,
                "context_length": where.context_length,
                "expert_cache": cache,
                "prefix_tokens": where.prefix_tokens,
                "generations": {"max_concurrent": 1, "running": int(running), "waiting": waiting, "served": served},
            }
        ]
    }


def ollama_version(api_version: str, moerun_version: str) -> dict:
    return {"version": api_version, "moerun_version": moerun_version}
