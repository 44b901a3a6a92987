"""`moerun serve`: the real `openai` client and plain HTTP against a real `moerun serve
demo` subprocess on a free loopback port (one server for the module), then the request
rules and tool calls in process with a scripted model."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from moerun.registry import DEMO_DIR  # noqa: E402
from moerun.server_protocol import StopFilter  # noqa: E402
from moerun.tokenizer import Tokenizer  # noqa: E402
from moerun.tool_calls import FORMATS, parse_reply  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-123"

# Demo skills (tests/test_demo.py) with their greedy replies.
SKILLS = {
    "count from 7": "7 8 9 10 11 12 13 14",
    "count down from 42": "42 41 40 39 38 37 36 35",
    "alphabet from k": "k l m n o p q r",
    "repeat: pizza": "pizza pizza pizza",
    "reverse: robot": "tobor",
    "reverse: music": "cisum",
    "count from 23": "23 24 25 26 27 28 29 30",
    "count down from 9": "9 8 7 6 5 4 3 2",
}
# A raw prompt the demo continues without an eos: a long reply to cut.
ENDLESS = "hello hello hello hello"


class Server:
    def __init__(self, *args: str, env: dict | None = None):
        cmd = [sys.executable, "-m", "moerun", "serve", "demo", "--port", "0", "--device", "cpu", *args]
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.lines: list[str] = []
        self.url: str | None = None
        ready = threading.Event()

        def drain() -> None:
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                m = re.search(r"listening on (http://\S+)", line)
                if m:
                    self.url = m.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(60) or self.url is None:
            self.stop()
            raise RuntimeError("server did not start:\n" + "\n".join(self.lines))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def rss_kb(self) -> int:
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def server():
    # Two expert slots of four per layer: the expert cache (and its counters) is in play.
    s = Server("--expert-slots", "2", env={"MOERUN_API_KEY": KEY})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(DEMO_DIR)


def chat(client, prompt: str, **kwargs):
    return client.chat.completions.create(model="demo", messages=[{"role": "user", "content": prompt}], **kwargs)


def post(server, path: str, body, key: str | None = KEY, raw: bytes | None = None) -> tuple[int, bytes]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(
        server.url + path, data=data, method="POST", headers={"Content-Type": "application/json"}
    )
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def get(server, path: str, key: str | None = KEY) -> tuple[int, bytes]:
    req = urllib.request.Request(server.url + path, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# -- OpenAI API through the real client ---------------------------------------------------------


def test_binds_loopback_and_lists_the_model(server, client):
    assert server.url.startswith("http://127.0.0.1:")
    assert [m.id for m in client.models.list().data] == ["demo"]
    assert client.models.retrieve("demo").id == "demo"


@pytest.mark.parametrize("prompt", ["count from 7", "reverse: robot", "alphabet from k"])
def test_chat_completion_does_the_skills(client, prompt):
    out = chat(client, prompt)
    assert out.choices[0].message.content == SKILLS[prompt]
    assert out.choices[0].finish_reason == "stop" and out.object == "chat.completion" and out.model == "demo"


def test_stream_equals_non_stream_and_usage_counts(client, tok):
    prompt = "count down from 42"
    whole = chat(client, prompt)
    chunks = list(chat(client, prompt, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content == SKILLS[prompt]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert len([c for c in chunks if c.choices]) > 3  # really streamed, not one blob
    # usage: the prompt through the demo's template; the reply's tokens and its eos.
    prompt_ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
    )
    reply_ids = tok.encode(SKILLS[prompt], add_special_tokens=False)
    for usage in (whole.usage, chunks[-1].usage):
        assert usage.prompt_tokens == len(prompt_ids)
        assert usage.completion_tokens == len(reply_ids) + 1
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # The same prompt again: all but its last token come from the held states.
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == len(prompt_ids) - 1


def test_sse_framing_ends_with_done(server):
    with httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"messages": [{"role": "user", "content": "reverse: music"}], "stream": True},
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    deltas = [json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[:-1]]
    assert "".join(deltas) == SKILLS["reverse: music"]


def test_stop_strings_and_length(client):
    out = chat(client, "count from 7", stop=["11", "zzz"])
    assert out.choices[0].message.content == "7 8 9 10 " and out.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, "count from 7", stop="11", stream=True))
    assert streamed == "7 8 9 10 "
    out = chat(client, "count from 7", max_tokens=3)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 3
    out = chat(client, "count from 7", max_completion_tokens=2)
    assert out.usage.completion_tokens == 2
    text = client.completions.create(model="demo", prompt=ENDLESS, max_tokens=5)
    assert text.choices[0].finish_reason == "length" and text.usage.completion_tokens == 5
    assert (" hello" * 50).startswith(text.choices[0].text)


def test_sampling_with_a_seed_is_reproducible(client):
    a = chat(client, "count from 23", temperature=1.0, top_p=0.9, seed=5, max_tokens=8).choices[0].message.content
    b = chat(client, "count from 23", temperature=1.0, top_p=0.9, seed=5, max_tokens=8).choices[0].message.content
    assert a == b


def test_two_concurrent_clients_both_correct(server, client):
    prompts = ["count from 23", "reverse: robot", "count down from 9", "repeat: pizza"]
    results: dict = {}

    def run(p: str, stream: bool) -> None:
        if stream:
            results[p] = "".join(c.choices[0].delta.content or "" for c in chat(client, p, stream=True))
        else:
            results[p] = chat(client, p).choices[0].message.content

    threads = [threading.Thread(target=run, args=(p, i % 2 == 0)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {p: SKILLS[p] for p in prompts}


def test_a_dropped_stream_stops_its_generation_and_the_server_goes_on(server, client):
    body = {"model": "demo", "prompt": ENDLESS, "max_tokens": 200, "stream": True}
    with httpx.stream(
        "POST", server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30
    ) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    # The connection is closed after one event: the server must cut the generation short.
    t0 = time.perf_counter()
    assert chat(client, "reverse: robot").choices[0].message.content == "tobor"
    assert time.perf_counter() - t0 < 20
    deadline = time.time() + 10
    while time.time() < deadline and not re.search(
        r"POST /v1/completions .* reply (\d+) tok .* cancelled", server.output
    ):
        time.sleep(0.1)
    m = re.search(r"POST /v1/completions .* reply (\d+) tok .* cancelled", server.output)
    assert m, server.output[-2000:]
    assert int(m.group(1)) < 200
    status, body = get(server, "/api/ps")
    assert json.loads(body)["models"][0]["generations"]["running"] == 0


def test_bad_requests_get_json_errors_and_the_server_lives_on(server, client):
    status, body = post(server, "/v1/chat/completions", None, raw=b'{"messages": [')
    err = json.loads(body)["error"]
    assert status == 400 and err["code"] == "invalid_json" and err["type"] == "invalid_request_error" and err["message"]
    for bad, param in [
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        ({"prompt": ""}, "prompt"),
    ]:
        path = "/v1/completions" if "prompt" in bad else "/v1/chat/completions"
        status, body = post(server, path, bad)
        assert status == 400 and json.loads(body)["error"]["param"] == param, body
    with pytest.raises(openai.BadRequestError, match="n=1"):
        chat(client, "count from 7", n=2)
    # Longer than the planned context (256 for the demo).
    with pytest.raises(openai.BadRequestError) as exc:
        chat(client, "count from 7 " * 200)
    assert exc.value.code == "context_length_exceeded"
    status, body = get(server, "/v1/nothing")
    assert status == 404 and "error" in json.loads(body)
    assert "Traceback" not in server.output
    assert chat(client, "count from 7").choices[0].message.content == SKILLS["count from 7"]


def test_api_key_is_enforced(server):
    assert get(server, "/health", key=None)[0] == 200
    for key in (None, "wrong"):
        status, body = get(server, "/v1/models", key=key)
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
        status, body = post(server, "/api/chat", {"messages": [{"role": "user", "content": "hi"}]}, key=key)
        assert status == 401 and isinstance(json.loads(body)["error"], str)  # Ollama's shape on /api
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# -- Ollama API over plain HTTP -------------------------------------------------------------------


def test_ollama_chat_generate_tags_ps(server):
    messages = [{"role": "user", "content": "alphabet from k"}]
    status, body = post(server, "/api/chat", {"model": "demo", "messages": messages})  # streams by default
    lines = [json.loads(line) for line in body.decode().splitlines()]
    assert status == 200 and all(not x["done"] for x in lines[:-1]) and lines[-1]["done"]
    assert "".join(x["message"]["content"] for x in lines) == SKILLS["alphabet from k"]
    assert lines[-1]["done_reason"] == "stop" and lines[-1]["eval_count"] == 9 and lines[-1]["prompt_eval_count"] > 0

    status, body = post(server, "/api/chat", {"messages": messages, "stream": False, "options": {"num_predict": 3}})
    out = json.loads(body)
    assert out["done"] and out["done_reason"] == "length" and out["eval_count"] == 3
    assert out["message"]["content"] == "k l m"

    status, body = post(
        server, "/api/generate", {"prompt": "repeat: pizza", "stream": False, "options": {"temperature": 0}}
    )
    assert json.loads(body)["response"] == SKILLS["repeat: pizza"]
    status, body = post(server, "/api/generate", {"prompt": ENDLESS, "raw": True, "options": {"num_predict": 4}})
    lines = [json.loads(line) for line in body.decode().splitlines()]
    assert lines[-1]["eval_count"] == 4 and (" hello" * 50).startswith("".join(x["response"] for x in lines))

    status, body = post(
        server, "/api/chat", {"messages": [{"role": "user", "content": "x"}], "options": {"num_predict": "x"}}
    )
    assert status == 400 and isinstance(json.loads(body)["error"], str)

    tags = json.loads(get(server, "/api/tags")[1])["models"]
    assert [t["name"] for t in tags] == ["demo:latest"] and tags[0]["details"]["family"] == "mixtral"
    ps = json.loads(get(server, "/api/ps")[1])["models"][0]
    assert ps["name"] == "demo:latest" and ps["device"] == "cpu" and ps["size_vram"] == 0 and ps["size_ram"] > 0
    assert ps["generations"]["max_concurrent"] == 1 and ps["context_length"] == 256
    cache = ps["expert_cache"]
    assert cache["hits"] + cache["misses"] > 0 and 0 <= cache["hit_rate"] <= 1
    # The per-request log line carries tokens/sec and the expert-cache counters.
    assert re.search(r"POST /api/chat .* tok/s\) · stop .* experts \d+% hit \(\d+ hits, \d+ misses", server.output)


# -- JSON mode and tools on the real server ---------------------------------------------------------


def test_json_object_mode_replies_with_json(server, client):
    out = chat(client, "count from 7", response_format={"type": "json_object"})
    reply = out.choices[0].message.content
    assert isinstance(json.loads(reply), dict) and out.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in chat(client, "count from 7", stream=True, response_format={"type": "json_object"})
    )
    assert streamed == reply
    status, body = post(
        server,
        "/api/chat",
        {"messages": [{"role": "user", "content": "alphabet from k"}], "format": "json", "stream": False},
    )
    assert status == 200 and isinstance(json.loads(json.loads(body)["message"]["content"]), dict)
    with pytest.raises(openai.BadRequestError, match="json_schema is not supported"):
        chat(
            client, "count from 7", response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}
        )
    status, body = post(
        server, "/api/chat", {"messages": [{"role": "user", "content": "x"}], "format": {"type": "object"}}
    )
    assert status == 400 and "schema" in json.loads(body)["error"]
    assert chat(client, "count from 7").choices[0].message.content == SKILLS["count from 7"]  # the next is free again


DEMO_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}
]


def test_tools_reach_the_template(client, tok):
    messages = [{"role": "user", "content": "count from 7"}]
    with_tools = tok.apply_chat_template(messages, tools=DEMO_TOOLS, tokenize=True)
    plain = tok.apply_chat_template(messages, tokenize=True)
    assert len(with_tools) > len(plain)  # the demo's template names the tools
    out = chat(client, "count from 7", tools=DEMO_TOOLS, max_tokens=2)
    assert out.usage.prompt_tokens == len(with_tools)
    out = chat(client, "count from 7", tools=DEMO_TOOLS, tool_choice="none", max_tokens=2)
    assert out.usage.prompt_tokens == len(plain)
    with pytest.raises(openai.BadRequestError, match="forcing a tool call is not supported"):
        chat(client, "count from 7", tools=DEMO_TOOLS, tool_choice="required")


# -- load, then Ctrl-C ------------------------------------------------------------------------------


def test_bounded_load_50_requests_8_clients(server, client):
    prompts = list(SKILLS)
    jobs = [(i, prompts[i % len(prompts)]) for i in range(50)]
    got: dict[int, str] = {}
    lock = threading.Lock()

    def worker(mine) -> None:
        for i, p in mine:
            if i % 3 == 0:
                text = "".join(c.choices[0].delta.content or "" for c in chat(client, p, stream=True))
            elif i % 3 == 1:
                text = chat(client, p).choices[0].message.content
            else:
                status, body = post(
                    server, "/api/chat", {"messages": [{"role": "user", "content": p}], "stream": False}
                )
                text = json.loads(body)["message"]["content"]
            with lock:
                got[i] = text

    def round_(batch) -> float:
        threads = [threading.Thread(target=worker, args=(batch[k::8],)) for k in range(8)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        return time.perf_counter() - t0

    round_(jobs[:16])  # warm-up: allocator pools, thread pools, first-touch pages
    got.clear()
    before = server.rss_kb()
    seconds = round_(jobs)
    after = server.rss_kb()
    assert sorted(got) == list(range(50)), "requests lost"
    assert {i: got[i] for i in got} == {i: SKILLS[p] for i, p in jobs}
    assert after < before * 1.15 + 8 * 1024, f"RSS {before} kB -> {after} kB over 50 requests"
    print(f"\n50 requests from 8 clients in {seconds:.1f} s; RSS {before / 1024:.0f} -> {after / 1024:.0f} MB")


def test_ctrl_c_stops_cleanly_mid_stream(server):
    body = {"model": "demo", "prompt": ENDLESS, "max_tokens": 200, "stream": True}
    with httpx.stream(
        "POST", server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30
    ) as r:
        lines = r.iter_lines()
        next(lines)
        server.proc.send_signal(signal.SIGINT)
        rest = list(lines)  # the stream ends, cut at the token in hand
    assert server.proc.wait(20) == 0
    assert "stopped" in server.output and "Traceback" not in server.output
    assert rest[-1] == "data: [DONE]" or rest == [] or rest[-1] == ""


def test_busy_port_is_one_line_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "moerun", "serve", str(DEMO_DIR), "--port", str(port), "--device", "cpu"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: cannot listen on 127.0.0.1:{port}")
    assert "Traceback" not in proc.stderr


# -- in process: request rules, tool calls -----------------------------------------------------------


def test_stop_filter_holds_back_partial_stops():
    f = StopFilter(["END", "xyz"])
    assert f.feed("abc E") == ("abc ", False)
    assert f.feed("N") == ("", False)
    assert f.feed("Dless") == ("", True)
    f = StopFilter(["END"])
    assert f.feed("a EN") == ("a ", False) and f.feed("x") == ("ENx", False) and f.flush() == ""


def test_parse_tool_calls_qwen_format():
    qwen = FORMATS["qwen"]
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert parse_reply(qwen, text) == ("Let me check.", "", [{"name": "get_weather", "arguments": {"city": "Paris"}}])
    two = '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b", "arguments": {"x": 1}}'
    assert [c["name"] for c in parse_reply(qwen, two)[2]] == ["a", "b"]  # an unclosed last block too
    assert parse_reply(qwen, "<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", "", [])
    f = qwen.parser()
    out = f.feed("Sure. <tool") + f.feed('_call>{"name": "a", "arguments": {"q": 2}}</tool_call>')
    assert out == [("content", "Sure. ")] and f.finish() == ([], [{"name": "a", "arguments": {"q": 2}}])


QWEN_LIKE_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n# Tools\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if reasoning_effort is defined %}effort={{ reasoning_effort }}\n{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


class ScriptedModel:
    """A ServedModel (moerun.served_model) replying with a fixed text in small pieces."""

    name, device, dtype, num_parameters, plan, kv_caches, folder = "scripted", "cpu", "float32", 0, None, None, None
    config = {"model_type": "qwen3_moe"}  # a family whose templates write <tool_call> (qwen)
    max_context = 4096
    stats: dict = {}

    def __init__(self, reply: str):
        self.tokenizer = Tokenizer.from_dir(DEMO_DIR)
        self.tokenizer.chat_template = QWEN_LIKE_TEMPLATE
        self.reply = reply
        self.prompts: list[str] = []
        self.kwargs: list[dict] = []
        self.cached_ids: list[int] = []

    is_chat_model = True

    def describe(self) -> str:
        return "scripted · qwen3_moe"

    def encode_prompt(self, text, chat=False):
        return self.tokenizer.encode(text)

    def reusable_tokens(self, ids) -> int:
        return 0

    def stream_generate(self, ids, max_new_tokens, **kwargs):
        self.prompts.append(self.tokenizer.decode(ids, skip_special_tokens=False))
        self.kwargs.append(kwargs)
        pieces = [self.reply[i : i + 5] for i in range(0, len(self.reply), 5)][:max_new_tokens]
        for i, p in enumerate(pieces):
            last = i == len(pieces) - 1
            stats = SimpleNamespace(finish_reason="stop", reused_tokens=0) if last else None
            yield SimpleNamespace(text=p, token_id=0, stats=stats)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CALL_REPLY = 'I will look.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture
def scripted():
    from starlette.testclient import TestClient

    from moerun.serve import build_app

    model = ScriptedModel(CALL_REPLY)
    with TestClient(build_app(model, name="scripted")) as http:
        yield model, http


def test_the_model_and_the_fakes_declare_what_serve_and_chat_use():
    import moerun
    from moerun.served_model import ServedModel
    from tests.test_chat_pty import FakeModel

    assert isinstance(moerun.load("demo", device="cpu"), ServedModel)
    assert isinstance(ScriptedModel("x"), ServedModel) and isinstance(FakeModel(), ServedModel)


def test_tool_calls_openai_and_ollama(scripted):
    model, http = scripted
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)
    messages = [{"role": "user", "content": "weather in Paris?"}]
    out = client.chat.completions.create(model="scripted", messages=messages, tools=TOOLS)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "I will look."
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert '"name": "get_weather"' in model.prompts[-1]  # the tools reached the chat template
    assert model.kwargs[-1]["keep_special"] == FORMATS["qwen"].markers  # decoding keeps the format's markers

    chunks = list(client.chat.completions.create(model="scripted", messages=messages, tools=TOOLS, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert content == "I will look." and "<tool_call>" not in content
    assert calls[0].function.name == "get_weather" and calls[0].index == 0
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # The call and its result go back through the template on the next turn.
    history = messages + [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    client.chat.completions.create(model="scripted", messages=history, tools=TOOLS)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in model.prompts[-1]

    r = http.post("/api/chat", json={"messages": messages, "tools": TOOLS, "stream": False})
    msg = r.json()["message"]
    assert msg["content"] == "I will look." and msg["tool_calls"] == [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    ]
    without = client.chat.completions.create(model="scripted", messages=messages)
    assert without.choices[0].message.content == CALL_REPLY  # no tools asked for: the text as it came


def test_request_rules_in_process(scripted):
    _, http = scripted
    assert http.post("/v1/chat/completions", content=b"[1, 2]").json()["error"]["code"] == "invalid_json"
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    assert r.status_code == 400 and "text" in r.json()["error"]["message"]
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "logprobs": True})
    assert r.status_code == 400
    r = http.post("/api/chat", json={"model": "scripted"})  # Ollama's load request
    assert r.json()["done_reason"] == "load"
    parts = [{"type": "text", "text": "weather "}, {"type": "text", "text": "now"}]
    r = http.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": parts}],
            "stop": ["look"],
        },
    )
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "I will "


def test_template_kwargs_and_reasoning(scripted):
    model, http = scripted
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    client.chat.completions.create(
        model="scripted", messages=messages, extra_body={"chat_template_kwargs": {"enable_thinking": False}}
    )
    assert model.prompts[-1].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    client.chat.completions.create(
        model="scripted", messages=messages, extra_body={"enable_thinking": False}, reasoning_effort="low"
    )
    assert "effort=low" in model.prompts[-1] and model.prompts[-1].endswith("</think>\n\n")
    http.post("/api/chat", json={"messages": messages, "think": False, "stream": False})
    assert model.prompts[-1].endswith("</think>\n\n")
    client.chat.completions.create(model="scripted", messages=messages)
    assert "<think>" not in model.prompts[-1] and "effort" not in model.prompts[-1]
    r = http.post("/v1/chat/completions", json={"messages": messages, "chat_template_kwargs": {"messages": []}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"
    r = http.post("/v1/chat/completions", json={"messages": messages, "response_format": {"type": "yaml"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"

    # A Qwen reply that thinks first: reasoning_content apart from the content, whole and streamed.
    model.reply = "<think>\nThe user greets.\n</think>\n\nHello!"
    out = client.chat.completions.create(model="scripted", messages=messages)
    msg = out.choices[0].message
    assert msg.content == "Hello!" and msg.model_extra["reasoning_content"] == "The user greets."
    chunks = list(client.chat.completions.create(model="scripted", messages=messages, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "Hello!"
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas).strip() == "The user greets."
    r = http.post("/api/chat", json={"messages": messages, "stream": False})
    assert r.json()["message"] == {"role": "assistant", "content": "Hello!", "thinking": "The user greets."}


def test_harmony_reply_through_the_server():
    """gpt-oss: the analysis channel is the reasoning, the final channel the content, a message to
    functions.NAME the call; the markers are kept by decoding."""
    from starlette.testclient import TestClient

    from moerun.serve import build_app

    model = ScriptedModel(
        "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary "
        'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}'
    )
    model.config = {"model_type": "gpt_oss"}
    with TestClient(build_app(model, name="scripted")) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)
        messages = [{"role": "user", "content": "weather in Paris?"}]
        out = client.chat.completions.create(model="scripted", messages=messages, tools=TOOLS)
        choice = out.choices[0]
        assert (
            choice.finish_reason == "tool_calls" and choice.message.model_extra["reasoning_content"] == "Need weather."
        )
        assert choice.message.tool_calls[0].function.name == "get_weather" and not choice.message.content
        assert model.kwargs[-1]["keep_special"] == FORMATS["harmony"].markers
        model.reply = "<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final<|message|>Sunny."
        chunks = list(client.chat.completions.create(model="scripted", messages=messages, stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(d.content or "" for d in deltas) == "Sunny."
        assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == "Easy."
