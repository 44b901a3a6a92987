"""`moerun serve` for the apps people use (issue 31): CORS for browser pages, model names as
Ollama and OpenAI clients send them (unknown ones a 404 in each API's shape), Ollama's
/api/tags, /api/show and /api/version, sampling fields refused rather than ignored,
options.num_ctx, a UTF-8 API key, and SIGTERM mid-stream. A real `moerun serve demo`
subprocess on a loopback port, the real `openai` client and plain HTTP (httpx)."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from moerun import __version__  # noqa: E402
from moerun.registry import DEMO_DIR  # noqa: E402
from moerun.tokenizer import Tokenizer  # noqa: E402
from tests.test_serve import ENDLESS, KEY, ROOT, SKILLS, ScriptedModel, Server  # noqa: E402

AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "user", "content": "count from 7"}]


@pytest.fixture(scope="module")
def server():
    s = Server(env={"MOERUN_API_KEY": KEY, "MOERUN_ORIGINS": "https://app.example.com, https://*.example.org"})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def http(server, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, server.url + path, timeout=60, **kwargs)


# -- CORS -------------------------------------------------------------------------------------------


def preflight(server, origin: str, path: str = "/v1/chat/completions", headers: str = "authorization, content-type"):
    return http(
        server,
        "OPTIONS",
        path,
        headers={"Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": headers},
    )


def test_cors_preflights_are_answered_without_the_key(server):
    allowed = [
        "http://localhost:5173",
        "https://127.0.0.1",
        "http://[::1]:8080",
        "http://LOCALHOST:3000",
        "http://0.0.0.0:3000",
        "tauri://localhost",
        "app://obsidian.md",
        "vscode-webview://1abc",
        "https://app.example.com",
        "https://chat.example.org",
    ]
    for origin in allowed:
        r = preflight(server, origin, headers="authorization, content-type, x-stainless-os")
        assert r.status_code == 204, (origin, r.text)
        assert r.headers["access-control-allow-origin"] == origin
        allow = [h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")]
        assert {"authorization", "content-type", "x-stainless-os"} <= set(allow)
        assert "POST" in r.headers["access-control-allow-methods"] and "Origin" in r.headers["vary"]
    r = preflight(server, "http://localhost:5173", "/api/chat")
    assert r.status_code == 204 and r.headers["access-control-allow-origin"] == "http://localhost:5173"
    # Chrome's private network access check, before a public page may reach loopback.
    asks = {
        "Origin": "https://app.example.com",
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Private-Network": "true",
    }
    r = http(server, "OPTIONS", "/api/tags", headers=asks)
    assert r.status_code == 204 and r.headers["access-control-allow-private-network"] == "true"


def test_cors_origins_not_allowed_get_403_and_no_allow_header(server):
    for origin in (
        "https://evil.com",
        "http://localhost.evil.com",
        "https://example.com",
        "http://app.example.com",
        "null",
        "http://127.0.0.1.nip.io",
    ):
        r = preflight(server, origin)
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers, origin
        assert json.loads(r.text)["error"]["code"] == "origin_not_allowed"
        # A page elsewhere cannot drive the model with a simple request either (CSRF, DNS rebinding).
        r = http(server, "POST", "/api/generate", headers={"Origin": origin, **AUTH}, content=b'{"prompt": "x"}')
        assert r.status_code == 403 and isinstance(r.json()["error"], str)


def test_cors_headers_on_answers_to_allowed_pages(server):
    origin = "http://localhost:5173"
    r = http(server, "POST", "/v1/chat/completions", headers={"Origin": origin, **AUTH}, json={"messages": MESSAGES})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == SKILLS["count from 7"]
    assert r.headers["access-control-allow-origin"] == origin
    with httpx.stream(
        "POST",
        server.url + "/api/chat",
        headers={"Origin": origin, **AUTH},
        timeout=60,
        json={"messages": [{"role": "user", "content": "reverse: robot"}]},
    ) as r:
        assert r.headers["access-control-allow-origin"] == origin
        lines = [json.loads(x) for x in r.iter_lines() if x]
    assert "".join(x["message"]["content"] for x in lines) == "tobor"
    # The page can read the 401 too (so it can tell its user the key is missing).
    r = http(server, "GET", "/v1/models", headers={"Origin": origin})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == origin
    assert "access-control-allow-origin" not in http(server, "GET", "/v1/models", headers=AUTH).headers


# -- model names ----------------------------------------------------------------------------------------


def test_unknown_model_is_a_404_in_each_apis_shape(server, client):
    for name in ("gpt-4o", "../../etc/passwd", "demo:7b", "mixtral-8x7b"):
        with pytest.raises(openai.NotFoundError) as exc:
            client.chat.completions.create(model=name, messages=MESSAGES)
        err = exc.value.body
        assert exc.value.code == "model_not_found" and err["type"] == "invalid_request_error"
        assert err["param"] == "model"
        assert name in err["message"] and "demo" in err["message"]
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=name, prompt="hello")
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve(name)
        for path, body in (
            ("/api/chat", {"messages": MESSAGES}),
            ("/api/generate", {"prompt": "x"}),
            ("/api/chat", {}),
            ("/api/show", {}),
        ):
            r = http(server, "POST", path, headers=AUTH, json={"model": name, **body})
            assert r.status_code == 404 and r.json() == {
                "error": f"model '{name}' not found (this server has 'demo:latest')"
            }, (path, r.text)
    r = http(server, "POST", "/v1/chat/completions", headers=AUTH, json={"model": 5, "messages": MESSAGES})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    assert "Traceback" not in server.output


def test_the_loaded_models_names_are_all_accepted(server, client):
    for name in ("demo", "demo:latest", "DEMO", "Demo:Latest"):
        out = client.chat.completions.create(model=name, messages=MESSAGES)
        assert out.choices[0].message.content == SKILLS["count from 7"] and out.model == "demo"
        assert client.models.retrieve(name).id == "demo"
        r = http(
            server,
            "POST",
            "/api/generate",
            headers=AUTH,
            json={"model": name, "prompt": "reverse: robot", "stream": False},
        )
        assert r.status_code == 200 and r.json()["response"] == "tobor"
    # No model field at all: the loaded one, as before.
    r = http(server, "POST", "/v1/chat/completions", headers=AUTH, json={"messages": MESSAGES})
    assert r.json()["choices"][0]["message"]["content"] == SKILLS["count from 7"]
    assert [m.id for m in client.models.list().data] == ["demo"]


def test_served_names_of_an_alias_include_its_repo_id():
    from moerun.serve import served_names

    model = ScriptedModel("x")
    model.name = "qwen3-30b-a3b"
    assert served_names("qwen3-30b-a3b", model) == {"qwen3-30b-a3b", "qwen/qwen3-30b-a3b"}
    model.name = "Qwen/Qwen3-30B-A3B"
    assert served_names("Qwen/Qwen3-30B-A3B", model) == {"qwen3-30b-a3b", "qwen/qwen3-30b-a3b"}


# -- Ollama's listings -------------------------------------------------------------------------------------


def test_tags_version_and_ps_as_ollama_writes_them(server):
    tags = http(server, "GET", "/api/tags", headers=AUTH).json()["models"]
    assert len(tags) == 1
    t = tags[0]
    assert t["name"] == t["model"] == "demo:latest"
    assert re.fullmatch(r"[0-9a-f]{64}", t["digest"])
    assert t["size"] == sum(p.stat().st_size for p in DEMO_DIR.glob("*.safetensors"))
    assert datetime.fromisoformat(t["modified_at"].replace("Z", "+00:00")).tzinfo is not None
    assert t["details"] == {
        "parent_model": "",
        "format": "safetensors",
        "family": "mixtral",
        "families": ["mixtral"],
        "parameter_size": t["details"]["parameter_size"],
        "quantization_level": "F32",
    }
    assert re.fullmatch(r"\d+\.\dM", t["details"]["parameter_size"])
    assert http(server, "GET", "/api/tags", headers=AUTH).json()["models"][0] == t  # stable
    ps = http(server, "GET", "/api/ps", headers=AUTH).json()["models"][0]
    assert ps["name"] == "demo:latest" and ps["digest"] == t["digest"]
    v = http(server, "GET", "/api/version", headers=AUTH).json()
    assert v == {"version": "0.13.0", "moerun_version": __version__}
    assert tuple(int(x) for x in v["version"].split(".")) >= (0, 9, 0)  # clients gate thinking, tools on it


def test_api_show(server):
    for body in ({"model": "demo"}, {"name": "demo:latest"}, {"model": "DEMO:latest", "verbose": True}):
        r = http(server, "POST", "/api/show", headers=AUTH, json=body)
        assert r.status_code == 200, r.text
        show = r.json()
        info = show["model_info"]
        assert info["general.architecture"] == "mixtral" and info["general.parameter_count"] > 0
        assert info["mixtral.context_length"] == 256 and info["mixtral.embedding_length"] == 128
        assert info["mixtral.expert_count"] == 4 and info["mixtral.expert_used_count"] == 2
        assert info["mixtral.block_count"] == 4
        assert show["template"] == Tokenizer.from_dir(DEMO_DIR).chat_template
        assert show["capabilities"] == ["completion", "tools"]  # Mixtral's [TOOL_CALLS]; no thinking in its template
        assert show["details"]["family"] == "mixtral" and show["details"]["format"] == "safetensors"
        assert re.search(r"^num_ctx\s+256$", show["parameters"], re.M)
        assert re.search(r"^temperature\s+0$", show["parameters"], re.M)
        datetime.fromisoformat(show["modified_at"].replace("Z", "+00:00"))
    r = http(server, "POST", "/api/show", headers=AUTH, json={})
    assert r.status_code == 400 and isinstance(r.json()["error"], str)
    r = http(server, "POST", "/api/show", headers=AUTH, json={"model": "llama3"})
    assert r.status_code == 404 and r.json() == {"error": "model 'llama3' not found (this server has 'demo:latest')"}


def test_show_capabilities_follow_the_family_and_template():
    from starlette.testclient import TestClient

    from moerun.serve import build_app

    thinking = ScriptedModel("x")  # qwen3_moe: <tool_call> format; its template may switch thinking off
    thinking.tokenizer.chat_template += "{% if enable_thinking %}<think>{% endif %}"
    plain = ScriptedModel("x")
    plain.config = {"model_type": "olmoe"}  # no tool-call format
    plain.tokenizer.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    span = ScriptedModel("x")
    span.is_chat_model = False
    for model, want in (
        (thinking, ["completion", "tools", "thinking"]),
        (plain, ["completion"]),
        (span, ["completion"]),
    ):
        with TestClient(build_app(model, name="scripted")) as client:
            assert client.post("/api/show", json={"model": "scripted"}).json()["capabilities"] == want


# -- sampling fields -----------------------------------------------------------------------------------------


def test_sampling_fields_not_implemented_are_refused_not_ignored(server, client):
    for kwargs, param in (
        ({"extra_body": {"repetition_penalty": 1.2}}, "repetition_penalty"),
        ({"extra_body": {"typical_p": 0.5}}, "typical_p"),
    ):
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model="demo", messages=MESSAGES, **kwargs)
        assert exc.value.code == "unsupported_parameter" and exc.value.body["param"] == param
        assert "not supported" in exc.value.body["message"]
    for bad in (
        {"frequency_penalty": "x"},
        {"presence_penalty": 3},
        {"logit_bias": {"5": "x"}},
        {"logit_bias": [1]},
        {"logit_bias": {"five": 1}},
        {"logit_bias": {"5": 101}},
        {"logit_bias": {"384": 1}},
        {"min_p": 1.5},
        {"repeat_penalty": 0},
    ):
        r = http(server, "POST", "/v1/chat/completions", headers=AUTH, json={"messages": MESSAGES, **bad})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_value", r.text
        assert r.json()["error"]["param"] == next(iter(bad))
    # The neutral values clients send by default, and fields clients commonly add, still pass.
    out = client.chat.completions.create(
        model="demo",
        messages=MESSAGES,
        presence_penalty=0,
        frequency_penalty=0,
        logit_bias={},
        user="u1",
        metadata={"a": "b"},
        store=False,
        parallel_tool_calls=True,
        extra_body={"min_p": 0, "repetition_penalty": 1},
    )
    assert out.choices[0].message.content == SKILLS["count from 7"]
    for options, param in (
        ({"mirostat": 2}, "options.mirostat"),
        ({"tfs_z": 0.5}, "options.tfs_z"),
        ({"min_p": "x"}, "options.min_p"),
        ({"repeat_last_n": -5}, "options.repeat_last_n"),
        ({"num_ctx": "x"}, "options.num_ctx"),
    ):
        r = http(server, "POST", "/api/chat", headers=AUTH, json={"messages": MESSAGES, "options": options})
        assert r.status_code == 400 and param in r.json()["error"], r.text
    neutral = {"messages": MESSAGES, "stream": False, "options": {"repeat_penalty": 1, "num_thread": 2}}
    r = http(server, "POST", "/api/chat", headers=AUTH, json=neutral)
    assert r.status_code == 200 and r.json()["message"]["content"] == SKILLS["count from 7"]


@pytest.fixture(scope="module")
def demo():
    import moerun

    return moerun.load("demo", device="cpu")


def reference_greedy(demo, ids: list[int], bias=None, presence=0.0, frequency=0.0, repeat=1.0, last_n=64) -> str:
    """16 tokens of greedy decoding with the penalties as defined, from whole-sequence logits (a fresh
    state each step), in plain Python: OpenAI's presence / frequency penalties over the reply,
    llama.cpp's repeat penalty over the last `last_n` tokens of prompt + reply, logit_bias added."""
    import torch

    reply: list[int] = []
    for _ in range(16):
        logits = demo.logits(torch.tensor([ids + reply]))[0, -1].tolist()
        for t, b in (bias or {}).items():
            logits[t] += b
        for t in set((ids + reply)[-last_n:]) if repeat != 1.0 else ():
            logits[t] = logits[t] / repeat if logits[t] > 0 else logits[t] * repeat
        for t in set(reply):
            logits[t] -= presence + frequency * reply.count(t)
        token = max(range(len(logits)), key=logits.__getitem__)
        if token in demo.eos_token_ids:
            break
        reply.append(token)
    return demo.tokenizer.decode(reply)


def test_penalties_change_greedy_output_exactly_as_defined(server, client, demo):
    prompt = "the cat"  # the demo goes on " cat cat cat cat"; a raw prompt, as the server encodes it
    ids = demo.tokenizer.encode(prompt)
    plain = reference_greedy(demo, ids)
    cat = demo.tokenizer.encode(" cat", add_special_tokens=False)[0]

    def openai_reply(**kwargs) -> str:
        return client.completions.create(model="demo", prompt=prompt, max_tokens=16, **kwargs).choices[0].text

    assert openai_reply() == plain == " cat cat cat cat"  # the reference agrees with the server unpenalized
    for kwargs, ref in (
        ({"frequency_penalty": 2.0}, {"frequency": 2.0}),
        ({"presence_penalty": 2.0}, {"presence": 2.0}),
        ({"logit_bias": {str(cat): -100}}, {"bias": {cat: -100}}),
        ({"extra_body": {"repeat_penalty": 1.3}}, {"repeat": 1.3}),
    ):
        want = reference_greedy(demo, ids, **ref)
        assert want != plain, kwargs  # the penalty matters here
        assert openai_reply(**kwargs) == want, kwargs
    for options, ref in (
        ({"repeat_penalty": 1.3}, {"repeat": 1.3}),
        ({"repeat_penalty": 1.3, "repeat_last_n": 2}, {"repeat": 1.3, "last_n": 2}),
        ({"frequency_penalty": 2.0}, {"frequency": 2.0}),
    ):
        want = reference_greedy(demo, ids, **ref)
        assert want != plain, options
        body = {"prompt": prompt, "raw": True, "stream": False, "options": {"num_predict": 16, **options}}
        assert http(server, "POST", "/api/generate", headers=AUTH, json=body).json()["response"] == want, options
    # min_p keeps tokens at least min_p x the top probability: at 1 only the top one, so sampling is greedy.
    for seed in range(3):
        assert openai_reply(temperature=1.5, seed=seed, extra_body={"min_p": 1.0}) == plain
    assert {openai_reply(temperature=1.5, seed=seed) for seed in range(3)} != {plain}  # without it, it samples


# -- the start line, the key, SIGTERM ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, words",
    [
        (["--api-key", " "], "--api-key"),
        (["--api-key", "\t \t"], "--api-key"),
        (["--origins", "evil.com"], "--origins"),
        (["--max-body", "lots"], "--max-body"),
        (["--max-body", "10"], "--max-body"),
    ],
)
def test_bad_key_or_origins_are_refused_at_start(args, words):
    proc = subprocess.run(
        [sys.executable, "-m", "moerun", "serve", "demo", "--port", "0", "--device", "cpu", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0]
    assert "listening" not in proc.stdout


def test_utf8_key_and_sigterm_mid_stream_marks_the_cut_replies():
    key = "clé-ключ-🔑"
    s = Server(env={"MOERUN_API_KEY": key})
    try:
        headers = {"Authorization": b"Bearer " + key.encode()}  # what clients send: the key's UTF-8 bytes
        r = httpx.post(s.url + "/v1/chat/completions", headers=headers, json={"messages": MESSAGES}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == SKILLS["count from 7"]
        for wrong in (b"Bearer " + "cle-ключ-🔑".encode(), b"Bearer " + key.encode()[:-4], b"Bearer cl\xe9"):
            assert httpx.get(s.url + "/v1/models", headers={"Authorization": wrong}).status_code == 401

        # A second stream waits behind the first; SIGTERM cuts the first and the second never starts.
        queued: dict = {}

        def ollama_stream() -> None:
            with httpx.stream(
                "POST",
                s.url + "/api/generate",
                headers=headers,
                timeout=60,
                json={"prompt": ENDLESS, "raw": True, "options": {"num_predict": 200}},
            ) as r:
                queued["lines"] = [json.loads(x) for x in r.iter_lines() if x]

        body = {"model": "demo", "prompt": ENDLESS, "max_tokens": 200, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, headers=headers, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            waiter = threading.Thread(target=ollama_stream)
            waiter.start()
            deadline = time.monotonic() + 30
            while httpx.get(s.url + "/api/ps", headers=headers).json()["models"][0]["generations"]["waiting"] < 1:
                assert time.monotonic() < deadline, "the second request never queued"
                time.sleep(0.05)  # until the Ollama request waits behind the running stream
            s.proc.send_signal(signal.SIGTERM)
            rest = [x for x in lines if x]
        waiter.join(30)
        assert s.proc.wait(30) == 0
        assert s.lines[-1] == "moerun serve: stopped" and "Traceback" not in s.output
        assert rest[-1] == "data: [DONE]"
        finishes = [c["finish_reason"] for x in rest[:-1] for c in json.loads(x[6:])["choices"]]
        assert finishes[-1] == "abort" and set(finishes[:-1]) <= {None}
        done = queued["lines"][-1]
        assert done["done"] and done["done_reason"] == "abort" and done["eval_count"] == 0
    finally:
        s.stop()


def test_the_digest_is_stable_across_restarts(server):
    first = http(server, "GET", "/api/tags", headers=AUTH).json()["models"][0]["digest"]
    from moerun.serve import model_digest

    again = model_digest(type("M", (), {"folder": DEMO_DIR, "config": {}})())
    assert again == first and again != hashlib.sha256(b"").hexdigest()


# -- bounded work before admission -------------------------------------------------------------------------


def nested(depth: int) -> dict:
    inner: dict = {}
    top = inner
    for _ in range(depth - 1):
        inner["a"] = {}
        inner = inner["a"]
    return top


def test_a_20_mb_prompt_is_refused_while_a_small_chat_and_health_are_answered(server, client):
    big = b'{"model": "demo", "prompt": "' + b"hello " * ((20 << 20) // 6) + b'"}'
    answers: dict = {}

    def upload(name: str, chunked: bool) -> None:
        # Chunked: no Content-Length to refuse up front, so the server must stop reading at the limit.
        content = (big[i : i + (1 << 16)] for i in range(0, len(big), 1 << 16)) if chunked else big
        answers[name] = httpx.post(
            server.url + "/v1/completions",
            content=content,
            timeout=120,
            headers={**AUTH, "Content-Type": "application/json"},
        )

    def small_chat() -> None:
        answers["chat"] = client.chat.completions.create(model="demo", messages=MESSAGES).choices[0].message.content

    before = server.rss_kb()
    threads = [threading.Thread(target=upload, args=(f"big{i}", i % 2 == 1)) for i in range(4)]
    threads.append(threading.Thread(target=small_chat))
    for t in threads:
        t.start()
    probes = []
    while any(t.is_alive() for t in threads):
        probes.append(httpx.get(server.url + "/health", timeout=30).status_code)
    for t in threads:
        t.join(120)
    assert answers["chat"] == SKILLS["count from 7"]
    assert probes and set(probes) == {200}
    for i in range(4):
        r = answers[f"big{i}"]
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text[:300]
    r = http(server, "POST", "/api/generate", headers=AUTH, content=big)
    assert r.status_code == 413 and "--max-body" in r.json()["error"]
    for _ in range(10):
        assert http(server, "POST", "/v1/completions", headers=AUTH, content=big).status_code == 413
    assert server.rss_kb() - before < 100 * 1024, "the refused bodies were buffered"


def test_a_prompt_that_cannot_fit_is_refused_before_tokenizing(server):
    text = "hello " * 200_000  # 1.2 MB: under the body limit, far over a 256-token context
    r = http(server, "POST", "/v1/completions", headers=AUTH, json={"prompt": text})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded"
    assert re.match(
        r"the prompt has at least \d+ tokens \(1200000 characters\); the planned context is 256", err["message"]
    )
    r = http(server, "POST", "/api/chat", headers=AUTH, json={"messages": [{"role": "user", "content": text}]})
    assert r.status_code == 400 and "at least" in r.json()["error"]
    # Just over the context by tokens but not provably by length: tokenized, and refused by its count.
    r = http(server, "POST", "/v1/completions", headers=AUTH, json={"prompt": "count from 7 " * 100})
    assert r.status_code == 400 and re.match(r"the prompt has \d+ tokens;", r.json()["error"]["message"])


def test_deep_json_is_a_400_not_a_recursion_error(server):
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for path in ("/v1/chat/completions", "/api/chat"):
        r = http(server, "POST", path, headers=AUTH, content=deep)
        assert r.status_code == 400 and "64 levels deep" in r.text, r.text[:300]
    tool = {"type": "function", "function": {"name": "f", "parameters": nested(500)}}
    for body in ({"messages": MESSAGES, "tools": [tool]}, {"messages": MESSAGES, "chat_template_kwargs": nested(900)}):
        r = http(server, "POST", "/v1/chat/completions", headers=AUTH, json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    ok = {"type": "function", "function": {"name": "f", "parameters": nested(40)}}
    r = http(server, "POST", "/v1/chat/completions", headers=AUTH, json={"messages": MESSAGES, "tools": [ok]})
    assert r.status_code == 200
    assert "RecursionError" not in server.output and "Traceback" not in server.output


def test_json_mode_bounds_whitespace_a_model_prefers():
    """JSON mode (moerun/json_constraint.py): a model that ranks whitespace above everything still
    writes at most one newline and 20 indents before and between JSON tokens, then must go on.
    (Spaces inside a string are content, and not bounded: the ranking leaves strings out.)"""
    import torch

    from moerun.generate import SamplingParams
    from moerun.json_constraint import MAX_INDENT, JSONConstraint

    tok = Tokenizer.from_dir(DEMO_DIR)
    eos = tok.eos_token_id
    spaces = [t for t in range(tok.vocab_size) if (tok.token_bytes(t) or b"x").strip() == b""]
    newline = [t for t in spaces if tok.token_bytes(t) == b"\n"]
    ranked = newline + [t for t in spaces if t not in newline] + [tok.encode(c, False)[0] for c in "{}"]
    logits = torch.full((tok.vocab_size,), -30.0)
    logits[ranked] = torch.linspace(10, 0, len(ranked))
    c = JSONConstraint(tok, {eos})
    out = []
    while len(out) < 200 and (not out or out[-1] != eos):
        out.append(c.pick(logits, SamplingParams(), None))
    assert out[-1] == eos and len(out) < 200
    text = b"".join(tok.token_bytes(t) or b"" for t in out[:-1]).decode()
    assert isinstance(json.loads(text), dict)
    runs = [len(r) for r in re.findall(r"\s+", text)]
    assert runs and max(runs) <= 1 + MAX_INDENT == 21
