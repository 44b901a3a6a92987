"""moerun.server_responses without a server: each OpenAI and Ollama body written from a Result,
its fields, their types and the finish/done reasons (tests/test_serve.py checks the same bodies
through the real clients)."""

from __future__ import annotations

import json

from moerun import server_responses as responses
from moerun.errors import MoerunError
from moerun.server_protocol import Defaults, RequestError

HEAD = responses.ReplyHead("chatcmpl-abc", 1700000000, "demo")
RESULT = responses.Result(
    text="Hi there",
    completion_tokens=3,
    prompt_tokens=10,
    reused_tokens=4,
    finish_reason="length",
    queued_s=0.5,
    prompt_s=0.25,
    decode_s=1.0,
)
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}


def test_openai_chat_completion_plain_and_with_tool_calls():
    body = responses.openai_chat_completion(HEAD, RESULT, "Hi there", "", [])
    assert list(body) == ["id", "object", "created", "model", "choices", "usage", "system_fingerprint"]
    assert body["object"] == "chat.completion" and body["id"] == "chatcmpl-abc" and body["created"] == 1700000000
    choice = body["choices"][0]
    assert choice == {
        "index": 0,
        "message": {"role": "assistant", "content": "Hi there"},
        "logprobs": None,
        "finish_reason": "length",
    }
    assert body["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 3,
        "total_tokens": 13,
        "prompt_tokens_details": {"cached_tokens": 4},
    }

    body = responses.openai_chat_completion(HEAD, RESULT, "", "thought", [CALL])
    message = body["choices"][0]["message"]
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert list(message) == ["role", "content", "reasoning_content", "tool_calls"]
    assert message["content"] is None and message["reasoning_content"] == "thought"
    (call,) = message["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function" and "index" not in call
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_openai_chat_chunks_role_deltas_tool_calls_finish_and_usage():
    first = responses.openai_chat_chunk(HEAD, {"role": "assistant", "content": ""})
    assert list(first) == ["id", "object", "created", "model", "system_fingerprint", "choices"]
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    pieces = [("reasoning", "hmm"), ("content", ""), ("content", "Hi")]
    assert responses.openai_chat_deltas(pieces) == [{"reasoning_content": "hmm"}, {"content": "Hi"}]
    (call,) = responses.openai_tool_call_delta([CALL])["tool_calls"]
    assert call["index"] == 0 and call["function"]["arguments"] == '{"city": "Paris"}'
    last = responses.openai_chat_chunk(HEAD, {}, "stop")
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "stop"
    usage = responses.openai_usage_chunk(HEAD, RESULT, chat=True)
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 13
    assert usage["object"] == "chat.completion.chunk"


def test_openai_text_completion_chunks_and_models():
    head = responses.ReplyHead("cmpl-abc", 1700000000, "demo")
    body = responses.openai_text_completion(head, RESULT, "echo Hi")
    assert body["object"] == "text_completion" and body["system_fingerprint"] is None
    assert body["choices"] == [{"index": 0, "text": "echo Hi", "logprobs": None, "finish_reason": "length"}]
    assert body["usage"]["completion_tokens"] == 3
    chunk = responses.openai_text_chunk(head, "Hi")
    assert chunk["choices"][0] == {"index": 0, "text": "Hi", "logprobs": None, "finish_reason": None}
    assert responses.openai_text_chunk(head, "", "stop")["choices"][0]["finish_reason"] == "stop"
    assert responses.openai_usage_chunk(head, RESULT, chat=False)["object"] == "text_completion"
    card = {"id": "demo", "object": "model", "created": 5, "owned_by": "moerun"}
    assert responses.openai_model("demo", 5) == card
    assert responses.openai_models("demo", 5) == {"object": "list", "data": [card]}


def test_ollama_chat_and_generate_lines_and_the_last_line():
    when = "2026-01-01T00:00:00Z"
    pieces = [("reasoning", "hmm"), ("content", "Hi"), ("content", "")]
    chat = responses.ollama_pieces("demo", when, True, pieces, [CALL])
    assert chat == [
        {
            "model": "demo",
            "created_at": when,
            "message": {"role": "assistant", "content": "", "thinking": "hmm"},
            "done": False,
        },
        {"model": "demo", "created_at": when, "message": {"role": "assistant", "content": "Hi"}, "done": False},
        {
            "model": "demo",
            "created_at": when,
            "done": False,
            "message": {"role": "assistant", "content": "", "tool_calls": [{"function": CALL}]},
        },
    ]
    (line,) = responses.ollama_pieces("demo", when, False, [("reasoning", "hmm")])
    assert line == {"model": "demo", "created_at": when, "response": "", "thinking": "hmm", "done": False}
    last = responses.ollama_last("demo", when, False, RESULT, "Hi there")
    assert last["done"] is True and last["response"] == "Hi there" and last["done_reason"] == "length"
    assert last["total_duration"] == 1_750_000_000 and last["prompt_eval_duration"] == 250_000_000
    assert last["eval_duration"] == 1_000_000_000 and last["load_duration"] == 0
    assert last["prompt_eval_count"] == 10 and last["eval_count"] == 3
    assert all(isinstance(last[k], int) for k in last if k.endswith(("_duration", "_count")))
    whole = responses.ollama_last("demo", when, True, RESULT, "", [{"name": "f", "arguments": "not json"}], "why")
    assert whole["message"] == {
        "role": "assistant",
        "content": "",
        "thinking": "why",
        "tool_calls": [{"function": {"name": "f", "arguments": {}}}],
    }
    assert responses.ollama_loaded("demo", when, True) == {
        "model": "demo",
        "created_at": when,
        "done": True,
        "done_reason": "load",
        "message": {"role": "assistant", "content": ""},
    }
    assert responses.ollama_loaded("demo", when, False)["response"] == ""


def test_ollama_listings():
    details = responses.ollama_details("mixtral", "46.7B", 4, "bfloat16")
    assert details == {
        "parent_model": "",
        "format": "safetensors",
        "family": "mixtral",
        "families": ["mixtral"],
        "parameter_size": "46.7B",
        "quantization_level": "NF4 experts",
    }
    assert responses.ollama_details("x", "1.0M", 16, "float16")["quantization_level"] == "F16"
    assert responses.ollama_details("x", "1.0M", 16, "float32")["quantization_level"] == "F32"
    listing = responses.OllamaListing("demo:latest", "ab" * 32, "2026-01-01T00:00:00Z", details)
    (tag,) = responses.ollama_tags(listing, 1234)["models"]
    assert tag == {
        "name": "demo:latest",
        "model": "demo:latest",
        "modified_at": "2026-01-01T00:00:00Z",
        "size": 1234,
        "digest": "ab" * 32,
        "details": details,
    }
    info = {"general.architecture": "mixtral"}
    show = responses.ollama_show(listing, "demo", "num_ctx 4", "{{ messages }}", info, ["completion"])
    assert show["modelfile"] == "# Modelfile of moerun's demo:latest\nFROM demo\n" and show["license"] == ""
    assert list(show) == [
        "license",
        "modelfile",
        "parameters",
        "template",
        "details",
        "model_info",
        "capabilities",
        "modified_at",
    ]
    counters = {"hits": 3, "misses": 1}
    where = responses.Residency(100, 50, "cuda:0", 2048, counters, 7)
    (ps,) = responses.ollama_ps(listing, where, True, 2, 9)["models"]
    assert ps["size"] == 150 and ps["size_vram"] == 100 and ps["size_ram"] == 50 and ps["device"] == "cuda:0"
    assert ps["expert_cache"] == {"hits": 3, "misses": 1, "hit_rate": 0.75} and counters == {"hits": 3, "misses": 1}
    assert ps["generations"] == {"max_concurrent": 1, "running": 1, "waiting": 2, "served": 9}
    assert ps["prefix_tokens"] == 7 and ps["context_length"] == 2048
    resident = responses.Residency(0, 10, "cpu", 64, None, 0)
    assert responses.ollama_ps(listing, resident, False, 0, 0)["models"][0]["expert_cache"] is None
    assert responses.ollama_version("0.13.0", "1.2.3") == {"version": "0.13.0", "moerun_version": "1.2.3"}


def test_ollama_model_info_reads_the_text_config_and_prefers_the_plan():
    text = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 300,
        "num_local_experts": 8,
        "num_experts_per_tok": 1,
    }
    llama4 = {"model_type": "llama4", "text_config": text}
    info = responses.ollama_model_info(llama4, "tiny", 1000, 128)
    assert info == {
        "general.architecture": "llama4",
        "general.parameter_count": 1000,
        "general.basename": "tiny",
        "llama4.context_length": 128,
        "llama4.embedding_length": 64,
        "llama4.block_count": 2,
        "llama4.attention.head_count": 4,
        "llama4.vocab_size": 300,
        "llama4.expert_count": 8,
        "llama4.expert_used_count": 1,
    }
    planned = responses.ollama_model_info({"model_type": "mixtral", "d_model": 32, "top_k": True}, "m", 1, 8, 16, 2)
    assert planned["mixtral.expert_count"] == 16 and planned["mixtral.expert_used_count"] == 2
    assert planned["mixtral.embedding_length"] == 32  # and a bool is never a count


def test_ollama_capabilities_and_parameters():
    assert responses.ollama_capabilities(False, "qwen", "<think>") == ["completion"]
    assert responses.ollama_capabilities(True, None, "") == ["completion"]
    thinks = "{% if enable_thinking %}"
    assert responses.ollama_capabilities(True, "qwen", thinks) == ["completion", "tools", "thinking"]
    assert responses.ollama_capabilities(True, "harmony", "") == ["completion", "tools", "thinking"]
    text = responses.ollama_parameters(Defaults(temperature=0.7, seed=3, max_tokens=50), 4096)
    assert text.splitlines() == [
        "num_ctx" + " " * 24 + "4096",
        "temperature" + " " * 20 + "0.7",
        "top_p" + " " * 26 + "1",
        "top_k" + " " * 26 + "0",
        "seed" + " " * 27 + "3",
        "num_predict" + " " * 20 + "50",
    ]


def test_errors_and_framing():
    bad = RequestError("nope", status=404, code="model_not_found")
    assert responses.request_error(bad) is bad
    mine = responses.request_error(MoerunError("two\n  lines"))
    assert (mine.message, mine.status, mine.code) == ("two lines", 400, "invalid_value")
    ours = responses.request_error(KeyError("k"))
    assert ours.status == 500 and ours.openai()["error"] == {
        "message": "internal error: KeyError: 'k'",
        "type": "server_error",
        "param": None,
        "code": "internal_error",
    }
    assert responses.ollama_error_line(MoerunError("full")) == {"error": "full"}
    assert responses.sse({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()
    assert responses.sse("[DONE]") == b"data: [DONE]\n\n"
    assert responses.ndjson({"a": 1, "b": [2]}) == b'{"a":1,"b":[2]}\n'
