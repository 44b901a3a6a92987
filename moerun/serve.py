"""`moerun serve`: one loaded model behind OpenAI's and Ollama's HTTP APIs (Starlette on
uvicorn).

One generation runs at a time: requests queue for the single worker thread that owns
the model (its states are one preallocated sequence, and prefix reuse keeps it between
requests, so the next turn of a chat prefills only its new tokens). Tokens pass from the
worker to the request's coroutine through an asyncio queue; a client that goes away
sets its job's cancel flag, and the worker closes the generator after the token in
hand. Bad requests get a JSON error (OpenAI's shape on /v1, Ollama's on /api) and the
server lives on."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import ipaddress
import logging
import os
import socket
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from moerun import __version__
from moerun.errors import MoerunError
from moerun.server_protocol import (
    Defaults,
    GenRequest,
    RequestError,
    StopFilter,
    ndjson,
    ollama_chat,
    ollama_generate,
    ollama_tool_calls,
    openai_chat,
    openai_completion,
    openai_tool_calls,
    parse_body,
    sse,
)
from moerun.tool_calls import ToolFormat, format_for, parse_reply

log = logging.getLogger("moerun.serve")


def _debug() -> bool:
    return os.environ.get("MOERUN_DEBUG", "") not in ("", "0")


# -- the worker ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Job:
    ids: list[int]
    gen: GenRequest
    max_new_tokens: int
    route: str
    client: str
    reply_format: ToolFormat | None = None  # the parser the reply goes through, if any
    prompt_tail: str = ""  # the end of the rendered prompt, for the parser
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    submitted: float = dataclasses.field(default_factory=time.perf_counter)


@dataclasses.dataclass
class Result:
    text: str = ""  # the reply after stop strings (tool-call blocks still in it)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0
    finish_reason: str = "stop"  # "stop" or "length"
    cancelled: bool = False
    queued_s: float = 0.0
    prompt_s: float = 0.0
    decode_s: float = 0.0
    experts: dict | None = None  # this request's expert-cache counters

    @property
    def prefilled_tokens(self) -> int:
        return self.prompt_tokens - self.reused_tokens


def _counter_delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after}


class Engine:
    """The model and its one worker thread: `events(job)` queues a generation and yields
    ("text", str) pieces, then ("done", Result) or ("error", exception)."""

    def __init__(self, model, defaults: Defaults | None = None):
        self.model = model
        self.defaults = defaults or Defaults()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moerun-generate")
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self.waiting = 0
        self.running: Job | None = None
        self.served = 0
        # What the family's chat template writes for tool calls (moerun/tool_calls.py).
        self.tool_format = format_for(getattr(model, "config", None))

    def reply_format(self, gen: GenRequest) -> ToolFormat | None:
        """The parser a chat reply goes through: the family's, when tools were offered or
        its format always needs it (harmony's channels); raw completions are left as they come."""
        fmt = self.tool_format
        if fmt is None or gen.messages is None or not (gen.tools or fmt.always):
            return None
        return fmt

    @property
    def context_length(self) -> int:
        from moerun.layers import context_of

        caches = getattr(self.model, "kv_caches", None)
        return context_of(caches) if caches else int(self.model.max_context)

    def encode(self, gen: GenRequest) -> list[int]:
        """Prompt ids, through the chat template unless raw; refused when the planned context cannot hold them."""
        if gen.messages is not None and not getattr(self.model, "is_chat_model", True):
            raise RequestError("this model does not chat (a span-corruption encoder-decoder without a chat template): "
                               "send the raw prompt to /v1/completions or /api/generate", code="invalid_value")  # fmt: skip
        if gen.messages is not None:
            extra = {**gen.template_kwargs, **({"tools": gen.tools} if gen.tools else {})}
            ids = self.model.tokenizer.apply_chat_template(gen.messages, add_generation_prompt=True, tokenize=True,
                                                           **extra)  # fmt: skip
        else:
            ids = self.model.encode_prompt(gen.text, chat=False)
        if not ids:
            raise RequestError("the prompt is empty", code="invalid_value")
        ctx = self.context_length
        if len(ids) >= ctx:
            raise RequestError(f"the prompt has {len(ids)} tokens; the planned context is {ctx} "
                               "(start the server with a larger --ctx)", code="context_length_exceeded")  # fmt: skip
        return ids

    def job(self, ids: list[int], gen: GenRequest, route: str, client: str) -> Job:
        room = self.context_length  # stream_tokens stops at the planned context anyway
        fmt = self.reply_format(gen)
        tail = self.model.tokenizer.decode(ids[-8:], skip_special_tokens=False) if fmt else ""
        return Job(ids, gen, min(gen.max_tokens or room, room), route, client, fmt, tail)

    @staticmethod
    def parser(job: Job):
        """A fresh reply parser for `job`, or None when its reply goes out as it comes."""
        fmt = job.reply_format
        return fmt.parser(job.gen.tools, job.prompt_tail, bool(job.gen.tools)) if fmt else None

    @staticmethod
    def parse(job: Job, text: str) -> tuple[str, str, list]:
        """A whole reply -> (content, reasoning, calls), by the job's format."""
        fmt = job.reply_format
        if fmt is None:
            return text, "", []
        return parse_reply(fmt, text, job.gen.tools, job.prompt_tail, bool(job.gen.tools))

    def stop_all(self) -> None:
        """Shutting down: the running generation ends after its current token, queued ones never start."""
        self.stopping.set()

    def shutdown(self) -> None:
        self.stop_all()
        self.executor.shutdown(wait=True, cancel_futures=True)

    def _expert_totals(self) -> dict | None:
        stats = self.model.stats
        return dict(stats["total"]) if stats else None

    def _work(self, job: Job, push: Callable[[tuple], None]) -> None:
        with self._lock:
            self.waiting -= 1
        result = Result(prompt_tokens=len(job.ids), queued_s=time.perf_counter() - job.submitted)
        if job.cancel.is_set() or self.stopping.is_set():
            result.cancelled = True
            push(("done", result))
            return
        self.running = job
        gen, model = job.gen, self.model
        before = self._expert_totals()
        result.reused_tokens = model.reusable_tokens(job.ids) if hasattr(model, "reusable_tokens") else 0
        stops = StopFilter(gen.stop)
        parts: list[str] = []
        stream = None
        t0 = t_first = time.perf_counter()
        try:
            extra = {}
            if job.reply_format is not None:  # its markers may be special tokens: keep them for the parser
                extra["keep_special"] = job.reply_format.markers
            if gen.json_mode:
                extra["json_mode"] = True
            stream = model.stream_generate(job.ids, max_new_tokens=job.max_new_tokens, temperature=gen.temperature,
                                           top_p=gen.top_p, top_k=gen.top_k, seed=gen.seed, **extra)  # fmt: skip
            hit = False
            for resp in stream:
                result.completion_tokens += 1
                if result.completion_tokens == 1:
                    t_first = time.perf_counter()
                text, hit = stops.feed(resp.text)
                if text:
                    parts.append(text)
                    push(("text", text))
                if resp.stats is not None:
                    result.finish_reason = resp.stats.finish_reason
                    result.reused_tokens = getattr(resp.stats, "reused_tokens", result.reused_tokens)
                if hit:
                    result.finish_reason = "stop"
                    break
                if job.cancel.is_set() or self.stopping.is_set():
                    result.cancelled = True
                    break
            if not hit and not result.cancelled:
                tail = stops.flush()
                if tail:
                    parts.append(tail)
                    push(("text", tail))
        except BaseException as e:  # noqa: BLE001 - reported to the request, the worker lives on
            if not isinstance(e, (MoerunError, RequestError)):
                log.error("generation failed: %s: %s", type(e).__name__, e)
                if _debug():
                    traceback.print_exc()
            push(("error", e))
            return
        finally:
            if stream is not None:
                stream.close()  # at once: frees the states for the next request
            self.running = None
            self.served += 1
        t_end = time.perf_counter()
        result.text = "".join(parts)
        result.prompt_s, result.decode_s = t_first - t0, t_end - t_first
        after = self._expert_totals()
        if after is not None:
            result.experts = _counter_delta(after, before or {})
        log.info(_log_line(job, result))
        push(("done", result))

    async def events(self, job: Job) -> AsyncIterator[tuple]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def push(item: tuple) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone (shutdown): nobody is listening
                job.cancel.set()

        with self._lock:
            self.waiting += 1
        try:
            self.executor.submit(self._work, job, push)
        except RuntimeError:  # the executor is shut down
            with self._lock:
                self.waiting -= 1
            raise RequestError("the server is shutting down", status=503, code="shutting_down")
        try:
            while True:
                item = await queue.get()
                yield item
                if item[0] in ("done", "error", "gone"):
                    return
        finally:
            job.cancel.set()  # a client that left stops its generation after the token in hand


def _log_line(job: Job, r: Result) -> str:
    prompt_tps = r.prefilled_tokens / r.prompt_s if r.prompt_s > 0 else 0.0
    decode_tps = (r.completion_tokens - 1) / r.decode_s if r.completion_tokens > 1 and r.decode_s > 0 else 0.0
    line = (f"{job.route} {job.client} · prompt {r.prompt_tokens} tok ({r.reused_tokens} reused, "
            f"{r.prefilled_tokens} prefilled, {prompt_tps:.1f} tok/s) · reply {r.completion_tokens} tok "
            f"({decode_tps:.1f} tok/s) · {'cancelled' if r.cancelled else r.finish_reason} · "
            f"queued {r.queued_s:.2f} s")  # fmt: skip
    e = r.experts
    if e is None:
        return line + " · experts resident"
    uses = e["hits"] + e["misses"]
    rate = f"{e['hits'] / uses:.0%}" if uses else "-"
    return line + (f" · experts {rate} hit ({e['hits']} hits, {e['misses']} misses, {e['prefetch_hits']} prefetched, "
                   f"{e['cpu_experts']} on CPU, {e['bytes_copied'] / 1e6:.1f} MB copied)")  # fmt: skip


# -- HTTP ---------------------------------------------------------------------------------------


def _now() -> int:
    return int(time.time())


def _iso_now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _error(exc: RequestError, ollama: bool) -> JSONResponse:
    return JSONResponse(exc.ollama() if ollama else exc.openai(), status_code=exc.status)


def _usage(r: Result) -> dict:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "total_tokens": r.prompt_tokens + r.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": r.reused_tokens}}  # fmt: skip


class _GenerationStream(StreamingResponse):
    """A streamed reply whose job is cancelled however the response ends (done, client gone, server stopping)."""

    def __init__(self, content, job: Job, media_type: str):
        super().__init__(content, media_type=media_type, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel.set()


async def _collect(engine: Engine, job: Job, request: Request) -> tuple[str, Result] | None:
    """A whole reply for a non-streaming request; None when the client left first."""
    parts: list[str] = []
    agen = engine.events(job)

    async def watch() -> None:
        while not job.cancel.is_set():
            if await request.is_disconnected():
                job.cancel.set()
                return
            await asyncio.sleep(0.2)

    watcher = asyncio.create_task(watch())
    try:
        async with contextlib.aclosing(agen):
            pending = asyncio.ensure_future(agen.__anext__())
            while True:
                done, _ = await asyncio.wait({pending, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if pending not in done:  # the client left: the worker sees the flag
                    pending.cancel()
                    with contextlib.suppress(BaseException):
                        await pending
                    return None
                kind, value = pending.result()
                if kind == "text":
                    parts.append(value)
                    pending = asyncio.ensure_future(agen.__anext__())
                    continue
                if kind == "error":
                    raise value
                return "".join(parts), value
    finally:
        watcher.cancel()
        job.cancel.set()


def build_app(model, *, name: str | None = None, api_key: str | None = None, defaults: Defaults | None = None,
              engine: Engine | None = None) -> Starlette:  # fmt: skip
    """The ASGI app over a loaded moerun Model."""
    engine = engine or Engine(model, defaults)
    model_id = name or getattr(model, "name", "moerun")
    created = _now()

    def handler(fn, ollama: bool = False):
        # Every route's errors become JSON here: a 4xx for the client's, a 500 (one log line) for ours.
        async def endpoint(request: Request) -> Response:
            try:
                return await fn(request)
            except RequestError as e:
                return _error(e, ollama)
            except MoerunError as e:
                return _error(RequestError(" ".join(str(e).split()), code="invalid_value"), ollama)
            except Exception as e:  # noqa: BLE001
                log.error("%s %s failed: %s: %s", request.method, request.url.path, type(e).__name__, e)
                if _debug():
                    traceback.print_exc()
                return _error(RequestError(f"internal error: {type(e).__name__}: {e}", status=500, kind="server_error",
                                           code="internal_error"), ollama)  # fmt: skip

        return endpoint

    async def body_of(request: Request) -> dict:
        return parse_body(await request.body())

    def client_of(request: Request) -> str:
        return f"{request.client.host}:{request.client.port}" if request.client else "-"

    async def prepare(request: Request, parse) -> tuple[GenRequest, Job]:
        gen = parse(await body_of(request), engine.defaults)
        ids = await run_in_threadpool(engine.encode, gen)  # templates can be slow; keep the loop free
        return gen, engine.job(ids, gen, f"{request.method} {request.url.path}", client_of(request))

    # -- OpenAI --

    async def chat_completions(request: Request) -> Response:
        gen, job = await prepare(request, openai_chat)
        rid, now = "chatcmpl-" + uuid.uuid4().hex[:24], _now()
        base = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_id, "system_fingerprint": None}
        if not gen.stream:
            got = await _collect(engine, job, request)
            if got is None:
                return Response(status_code=204)
            text, r = got
            message, finish = {"role": "assistant", "content": text}, r.finish_reason
            if job.reply_format is not None:
                content, reasoning, calls = engine.parse(job, text)
                message["content"] = content
                if reasoning:
                    message["reasoning_content"] = reasoning
                if calls:
                    message.update(content=content or None, tool_calls=openai_tool_calls(calls))
                    finish = "tool_calls"
            return JSONResponse({"id": rid, "object": "chat.completion", "created": now, "model": model_id,
                                 "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                                 "usage": _usage(r), "system_fingerprint": None})  # fmt: skip

        def chunk(delta: dict, finish=None) -> bytes:
            return sse({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

        def deltas(pieces) -> list[bytes]:
            key = {"content": "content", "reasoning": "reasoning_content"}
            return [chunk({key[kind]: text}) for kind, text in pieces if text]

        async def body() -> AsyncIterator[bytes]:
            parser = engine.parser(job)
            yield chunk({"role": "assistant", "content": ""})
            async with contextlib.aclosing(engine.events(job)) as events:
                async for kind, value in events:
                    if kind == "text":
                        for out in deltas(parser.feed(value) if parser else [("content", value)]):
                            yield out
                    elif kind == "error":
                        yield sse(_error_payload(value))
                        break
                    elif kind == "done":
                        finish = value.finish_reason
                        if parser:
                            pieces, calls = parser.finish()
                            for out in deltas(pieces):
                                yield out
                            if calls:
                                yield chunk({"tool_calls": openai_tool_calls(calls, streaming=True)})
                                finish = "tool_calls"
                        yield chunk({}, finish)
                        if gen.include_usage:
                            yield sse({**base, "choices": [], "usage": _usage(value)})
            yield sse("[DONE]")

        return _GenerationStream(body(), job, "text/event-stream")

    async def completions(request: Request) -> Response:
        gen, job = await prepare(request, openai_completion)
        rid, now = "cmpl-" + uuid.uuid4().hex[:24], _now()
        base = {"id": rid, "object": "text_completion", "created": now, "model": model_id, "system_fingerprint": None}
        echo = gen.text if gen.echo else ""
        if not gen.stream:
            got = await _collect(engine, job, request)
            if got is None:
                return Response(status_code=204)
            text, r = got
            return JSONResponse({**base, "choices": [{"index": 0, "text": echo + text, "logprobs": None,
                                                      "finish_reason": r.finish_reason}], "usage": _usage(r)})  # fmt: skip

        def chunk(text: str, finish=None) -> bytes:
            return sse({**base, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]})

        async def body() -> AsyncIterator[bytes]:
            if echo:
                yield chunk(echo)
            async with contextlib.aclosing(engine.events(job)) as events:
                async for kind, value in events:
                    if kind == "text":
                        yield chunk(value)
                    elif kind == "error":
                        yield sse(_error_payload(value))
                        break
                    elif kind == "done":
                        yield chunk("", value.finish_reason)
                        if gen.include_usage:
                            yield sse({**base, "choices": [], "usage": _usage(value)})
            yield sse("[DONE]")

        return _GenerationStream(body(), job, "text/event-stream")

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "moerun"}

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def get_model(request: Request) -> Response:
        if request.path_params["model"] != model_id:
            raise RequestError(f"model '{request.path_params['model']}' is not served here (this server has '{model_id}')",
                               status=404, code="model_not_found")  # fmt: skip
        return JSONResponse(model_card())

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": model_id})

    # -- Ollama --

    def ollama_stats(r: Result) -> dict:
        ns = 1_000_000_000
        return {"done_reason": r.finish_reason, "total_duration": int((r.queued_s + r.prompt_s + r.decode_s) * ns),
                "load_duration": 0, "prompt_eval_count": r.prompt_tokens, "prompt_eval_duration": int(r.prompt_s * ns),
                "eval_count": r.completion_tokens, "eval_duration": int(r.decode_s * ns)}  # fmt: skip

    def ollama_route(parse, chat: bool):
        async def route(request: Request) -> Response:
            body = await body_of(request)
            empty = not body.get("messages") if chat else not body.get("prompt")
            if empty:  # Ollama's "load the model" request: it is loaded
                head = {"model": model_id, "created_at": _iso_now(), "done": True, "done_reason": "load"}
                return JSONResponse({**head, **({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})})
            gen = parse(body, engine.defaults)
            ids = await run_in_threadpool(engine.encode, gen)
            job = engine.job(ids, gen, f"{request.method} {request.url.path}", client_of(request))

            def piece(text: str, done: bool = False, calls=None, thinking: str = "") -> dict:
                out = {"model": model_id, "created_at": _iso_now()}
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

            if not gen.stream:
                got = await _collect(engine, job, request)
                if got is None:
                    return Response(status_code=204)
                text, r = got
                calls, thinking = [], ""
                if job.reply_format is not None:
                    text, thinking, calls = engine.parse(job, text)
                return JSONResponse({**piece(text, True, calls, thinking), **ollama_stats(r)})

            def pieces_out(pieces, calls=None) -> list[bytes]:
                out = [ndjson(piece(t, thinking="")) if k == "content" else ndjson(piece("", thinking=t))
                       for k, t in pieces if t]  # fmt: skip
                if calls:
                    out.append(ndjson(piece("", False, calls)))
                return out

            async def stream() -> AsyncIterator[bytes]:
                parser = engine.parser(job)
                async with contextlib.aclosing(engine.events(job)) as events:
                    async for kind, value in events:
                        if kind == "text":
                            for out in pieces_out(parser.feed(value) if parser else [("content", value)]):
                                yield out
                        elif kind == "error":
                            yield ndjson({"error": _error_payload(value)["error"]["message"]})
                        elif kind == "done":
                            if parser:
                                for out in pieces_out(*parser.finish()):
                                    yield out
                            yield ndjson({**piece("", True), **ollama_stats(value)})

            return _GenerationStream(stream(), job, "application/x-ndjson")

        return route

    def details() -> dict:
        cfg = getattr(model, "config", {}) or {}
        bits = getattr(getattr(model, "plan", None), "bits", 16)
        dtype = str(getattr(model, "dtype", "")).removeprefix("torch.")
        quant = {4: "NF4 experts", 8: "Q8_0 experts (int8)"}.get(bits, {"bfloat16": "BF16", "float16": "F16"}.get(dtype, "F32"))
        n = getattr(model, "num_parameters", 0)
        return {"parent_model": "", "format": "safetensors", "family": cfg.get("model_type", ""),
                "families": [cfg.get("model_type", "")], "parameter_size": f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M",
                "quantization_level": quant}  # fmt: skip

    def sizes() -> tuple[int, int, str]:
        """(bytes on the device, bytes in host RAM, device name) from the plan load followed."""
        p = getattr(model, "plan", None)
        device = str(getattr(model, "device", "cpu"))
        if p is None:
            return 0, 0, device
        host_only = not device.startswith("cuda")
        on_device = p.gpu_bytes
        in_ram = p.cpu_bytes if p.verdict == "offload" else 0
        return (0, on_device + in_ram, device) if host_only else (on_device, in_ram, device)

    async def tags(request: Request) -> Response:
        vram, ram, _ = sizes()
        return JSONResponse({"models": [{"name": model_id, "model": model_id, "modified_at": _iso_now(), "size": vram + ram,
                                         "digest": "", "details": details()}]})  # fmt: skip

    async def ps(request: Request) -> Response:
        vram, ram, device = sizes()
        stats = model.stats
        cache = None
        if stats:
            t = stats["total"]
            uses = t["hits"] + t["misses"]
            cache = {**t, "hit_rate": t["hits"] / uses if uses else None}
        running = engine.running
        return JSONResponse({"models": [{
            "name": model_id, "model": model_id, "size": vram + ram, "size_vram": vram, "size_ram": ram,
            "digest": "", "details": details(), "expires_at": "9999-12-31T23:59:59Z", "device": device,
            "context_length": engine.context_length, "expert_cache": cache,
            "prefix_tokens": len(getattr(model, "cached_ids", []) or []),
            "generations": {"max_concurrent": 1, "running": int(running is not None), "waiting": engine.waiting,
                            "served": engine.served},
        }]})  # fmt: skip

    async def version(request: Request) -> Response:
        return JSONResponse({"version": __version__})

    async def root(request: Request) -> Response:
        return PlainTextResponse(f"moerun {__version__} is running ({model_id})")

    routes = [
        Route("/", handler(root), methods=["GET", "HEAD"]),
        Route("/health", handler(health), methods=["GET"]),
        Route("/v1/models", handler(list_models), methods=["GET"]),
        Route("/v1/models/{model:path}", handler(get_model), methods=["GET"]),
        Route("/v1/chat/completions", handler(chat_completions), methods=["POST"]),
        Route("/v1/completions", handler(completions), methods=["POST"]),
        Route("/api/chat", handler(ollama_route(ollama_chat, chat=True), ollama=True), methods=["POST"]),
        Route("/api/generate", handler(ollama_route(ollama_generate, chat=False), ollama=True), methods=["POST"]),
        Route("/api/tags", handler(tags, ollama=True), methods=["GET"]),
        Route("/api/ps", handler(ps, ollama=True), methods=["GET"]),
        Route("/api/version", handler(version, ollama=True), methods=["GET"]),
    ]

    async def not_found(request: Request, exc) -> Response:
        status = getattr(exc, "status_code", 404)
        words = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        err = RequestError(words.get(status, str(getattr(exc, "detail", "bad request"))), status=status,
                           code="not_found" if status == 404 else "method_not_allowed")  # fmt: skip
        return _error(err, request.url.path.startswith("/api/"))

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
    app.state.engine = engine
    return _Guard(app, api_key)


def _error_payload(exc: BaseException) -> dict:
    if isinstance(exc, RequestError):
        return exc.openai()
    if isinstance(exc, MoerunError):
        return RequestError(" ".join(str(exc).split()), code="invalid_value").openai()
    return RequestError(f"internal error: {type(exc).__name__}: {exc}", status=500, kind="server_error",
                        code="internal_error").openai()  # fmt: skip


class _Guard:
    """ASGI wrapper: the API key (Authorization: Bearer) on everything but /health and /,
    and a log line for requests that generate nothing (the worker logs those that do)."""

    OPEN = ("/", "/health")

    def __init__(self, app: Starlette, api_key: str | None):
        self.app, self.api_key = app, api_key
        self.state = app.state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if self.api_key and path not in self.OPEN:
            headers = dict(scope.get("headers") or [])
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                err = RequestError("missing or wrong API key (send Authorization: Bearer <key>)", status=401,
                                   code="invalid_api_key")  # fmt: skip
                return await _error(err, path.startswith("/api/"))(scope, receive, send)
        generates = path in ("/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate")
        status, t0 = [0], time.perf_counter()

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        await self.app(scope, receive, send_status)
        if generates and status[0] < 400:
            return  # the worker logged it, with its tokens/sec
        client = scope.get("client")
        log.info("%s %s %s · %d · %.3f s", scope.get("method"), path, f"{client[0]}:{client[1]}" if client else "-",
                 status[0], time.perf_counter() - t0)  # fmt: skip


# -- running it ---------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, before the model loads: a busy port fails in a second, not after the load."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise MoerunError(f"cannot resolve host '{host}': {e.strerror}") from e
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise MoerunError(f"cannot listen on {host}:{port}: {e.strerror}") from e
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(model, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, name: str | None = None,
          defaults: Defaults | None = None, announce: Callable[[str], None] | None = None,
          sock: socket.socket | None = None) -> None:  # fmt: skip
    """Serve `model` until Ctrl-C (or SIGTERM): the running generation stops after its
    current token, queued ones are dropped, and the process exits cleanly."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    engine = Engine(model, defaults)
    app = build_app(model, name=name, api_key=api_key, defaults=defaults, engine=engine)
    sock = sock or bind(host, port)
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    url = f"http://{shown}:{bound[1]}"

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            engine.stop_all()  # before uvicorn waits on open streams
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5, lifespan="off")
    server = Server(config)
    say = announce or (lambda line: print(line, flush=True))
    say(f"moerun serve: {getattr(model, 'describe', lambda: name)()}")
    say(f"listening on {url} (OpenAI: {url}/v1, Ollama: {url}/api; one generation at a time"
        + (", API key required)" if api_key else ")"))  # fmt: skip
    if not api_key and not _is_loopback(host):
        say(f"warning: {host} is reachable from other machines and no --api-key is set")
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled: it is already down
        pass
    finally:
        engine.shutdown()
        sock.close()
    say("moerun serve: stopped")


def model_name(model_arg: str) -> str:
    """The id clients see: the alias or repo id as given, a folder's name."""
    path = Path(model_arg)
    return path.name if path.exists() else model_arg
