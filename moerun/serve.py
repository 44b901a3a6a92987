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
import fnmatch
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import signal
import socket
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import AsyncIterator, Callable, Sequence
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from moerun import __version__, registry
from moerun.errors import MoerunError
from moerun.plan import Verdict
from moerun.served_model import ServedModel
from moerun.server_protocol import (
    Defaults,
    GenRequest,
    RequestError,
    StopFilter,
    ollama_chat,
    ollama_generate,
    openai_chat,
    openai_completion,
    parse_body,
)
from moerun.server_responses import (
    OllamaListing,
    ReplyHead,
    Residency,
    Result,
    ndjson,
    ollama_capabilities,
    ollama_details,
    ollama_error_line,
    ollama_last,
    ollama_loaded,
    ollama_model_info,
    ollama_parameters,
    ollama_pieces,
    ollama_ps,
    ollama_show,
    ollama_tags,
    ollama_version,
    openai_chat_chunk,
    openai_chat_completion,
    openai_chat_deltas,
    openai_model,
    openai_models,
    openai_text_chunk,
    openai_text_completion,
    openai_tool_call_delta,
    openai_usage_chunk,
    request_error,
    sse,
)
from moerun.tool_calls import Call, Piece, ToolFormat, format_for, parse_reply
from moerun.units import params_short
from moerun.weights import read_header, weight_files

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


def _counter_delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after}


class Engine:
    """The model and its one worker thread: `events(job)` queues a generation and yields
    ("text", str) pieces, then ("done", Result) or ("error", exception)."""

    def __init__(self, model: ServedModel, defaults: Defaults | None = None):
        self.model = model
        self.defaults = defaults or Defaults()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moerun-generate")
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self.waiting = 0
        self.running: Job | None = None
        self.served = 0
        self._longest_token: int | None = None  # characters, of the longest token in the vocabulary
        # What the family's chat template writes for tool calls (moerun/tool_calls.py).
        self.tool_format = format_for(model.config)

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

        caches = self.model.kv_caches
        return context_of(caches) if caches else int(self.model.max_context)

    def encode(self, gen: GenRequest) -> list[int]:
        """Prompt ids, through the chat template unless raw; refused when the planned context cannot hold them."""
        ctx = self.window(gen)  # a num_ctx above the plan is refused before any tokenizing
        if gen.messages is not None and not self.model.is_chat_model:
            raise RequestError(
                "this model does not chat (a span-corruption encoder-decoder without a chat template): "
                "send the raw prompt to /v1/completions or /api/generate",
                code="invalid_value",
            )
        tokenizer = self.model.tokenizer
        if gen.messages is not None:
            extra = {**gen.template_kwargs, **({"tools": gen.tools} if gen.tools else {})}
            text = tokenizer.apply_chat_template(gen.messages, add_generation_prompt=True, tokenize=False, **extra)
            self._refuse_surely_too_long(text, ctx)
            ids = tokenizer.encode(text, add_special_tokens=False)  # as apply_chat_template(tokenize=True)
        else:
            self._refuse_surely_too_long(gen.text, ctx)
            ids = self.model.encode_prompt(gen.text, chat=False)
        if not ids:
            raise RequestError("the prompt is empty", code="invalid_value")
        vocab = self.model.tokenizer.vocab_size
        outside = [t for t in gen.penalties.get("logit_bias") or {} if t >= vocab]
        if outside:
            raise RequestError(
                f"logit_bias: token id {outside[0]} is not in the vocabulary (0 to {vocab - 1})",
                code="invalid_value",
                param="logit_bias",
            )
        if len(ids) >= ctx:
            what = f"options.num_ctx is {ctx}" if ctx < self.context_length else f"the planned context is {ctx}"
            raise RequestError(
                f"the prompt has {len(ids)} tokens; {what} (start the server with a larger --ctx)",
                code="context_length_exceeded",
            )
        return ids

    def _refuse_surely_too_long(self, text: str, ctx: int) -> None:
        """Refuse, before tokenizing it, a text whose length alone proves it cannot fit: no token
        covers more than `longest_token` characters, so it has at least len / (longest * slack) tokens;
        slack 4 covers a normalizer that shrinks text (Unicode composition shrinks it at most 3x)."""
        if self._longest_token is None:
            self._longest_token = max((len(t) for t, _ in self.model.tokenizer.tokens_from(0)), default=1)
        per_token = max(self._longest_token, 1) * 4
        if len(text) >= ctx * per_token:
            raise RequestError(
                f"the prompt has at least {len(text) // per_token} tokens ({len(text)} characters); the "
                f"planned context is {ctx} (start the server with a larger --ctx)",
                code="context_length_exceeded",
            )

    def window(self, gen: GenRequest) -> int:
        """The request's window (prompt + reply): the planned context, or a smaller options.num_ctx;
        a larger one is refused, since the states were allocated for the plan."""
        ctx = self.context_length
        if gen.num_ctx is not None and gen.num_ctx > ctx:
            raise RequestError(
                f"options.num_ctx {gen.num_ctx} is above the planned context of {ctx} tokens (start the "
                f"server with --ctx {gen.num_ctx}, or leave num_ctx out)",
                param="options.num_ctx",
                code="context_length_exceeded",
            )
        return min(ctx, gen.num_ctx or ctx)

    def job(self, ids: list[int], gen: GenRequest, route: str, client: str) -> Job:
        # The reply may fill the window; stream_tokens stops at the planned context anyway.
        room = self.window(gen) - (len(ids) if gen.num_ctx else 0)
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
            result.cancelled, result.finish_reason = True, "abort"
            push(("done", result))
            return
        self.running = job
        gen, model = job.gen, self.model
        before = self._expert_totals()
        result.reused_tokens = model.reusable_tokens(job.ids)
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
            extra.update(gen.penalties)
            stream = model.stream_generate(
                job.ids,
                max_new_tokens=job.max_new_tokens,
                temperature=gen.temperature,
                top_p=gen.top_p,
                top_k=gen.top_k,
                seed=gen.seed,
                **extra,
            )
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
                    result.reused_tokens = resp.stats.reused_tokens
                if hit:
                    result.finish_reason = "stop"
                    break
                if resp.stats is None and (job.cancel.is_set() or self.stopping.is_set()):
                    # Cut short: not "stop", so a client can tell the reply is truncated (vLLM's "abort").
                    result.cancelled, result.finish_reason = True, "abort"
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
    line = (
        f"{job.route} {job.client} · prompt {r.prompt_tokens} tok ({r.reused_tokens} reused, "
        f"{r.prefilled_tokens} prefilled, {prompt_tps:.1f} tok/s) · reply {r.completion_tokens} tok "
        f"({decode_tps:.1f} tok/s) · {'cancelled' if r.cancelled else r.finish_reason} · "
        f"queued {r.queued_s:.2f} s"
    )
    e = r.experts
    if e is None:
        return line + " · experts resident"
    uses = e["hits"] + e["misses"]
    rate = f"{e['hits'] / uses:.0%}" if uses else "-"
    return line + (
        f" · experts {rate} hit ({e['hits']} hits, {e['misses']} misses, {e['prefetch_hits']} prefetched, "
        f"{e['cpu_experts']} on CPU, {e['bytes_copied'] / 1e6:.1f} MB copied)"
    )


# -- HTTP ---------------------------------------------------------------------------------------


def _now() -> int:
    return int(time.time())


def _iso_now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _error(exc: RequestError, ollama: bool) -> JSONResponse:
    return JSONResponse(exc.ollama() if ollama else exc.openai(), status_code=exc.status)


class _GenerationStream(StreamingResponse):
    """A streamed reply whose job is cancelled however the response ends (done, client gone, server stopping)."""

    def __init__(self, content, job: Job, media_type: str):
        super().__init__(
            content, media_type=media_type, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
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


@dataclasses.dataclass
class _Update:
    """A streamed reply's progress, through its parser: the new pieces; at the end the tool calls and
    the Result, or the error that ended it."""

    pieces: list[Piece]
    calls: list[Call] = dataclasses.field(default_factory=list)
    result: Result | None = None
    error: BaseException | None = None


async def _updates(engine: Engine, job: Job) -> AsyncIterator[_Update]:
    """The job's events as the writers take them: text through the job's reply parser (as content
    when it has none), then the parser's last pieces and calls with the Result."""
    parser = engine.parser(job)
    async with contextlib.aclosing(engine.events(job)) as events:
        async for kind, value in events:
            if kind == "text":
                yield _Update(parser.feed(value) if parser else [("content", value)])
            elif kind == "error":
                yield _Update([], error=value)
            elif kind == "done":
                pieces, calls = parser.finish() if parser else ([], [])
                yield _Update(pieces, calls, result=value)


# -- what the model is called, and what Ollama's listings say of it -----------------------------------

# The Ollama API version /api/version reports: clients gate features on it (tools from 0.3,
# structured outputs from 0.5, thinking from 0.9), and the routes here follow 0.13's shapes.
OLLAMA_API_VERSION = "0.13.0"
# The largest request body read (--max-body): far above any prompt a planned context can hold.
MAX_BODY = 16 << 20


def _bare_name(name: str) -> str:
    # Ollama names are case-insensitive and "x" means "x:latest"; Hub repo ids are case-insensitive too.
    name = name.strip().lower()
    return name.removesuffix(":latest")


def served_names(model_id: str, model: ServedModel) -> set[str]:
    """Every name a request may give the loaded model: the id it is served under, its alias and
    its Hub repo id (whichever of them it was loaded by), each also with ":latest"."""
    names = {model_id, model.name}
    for given in (model_id, model.name):
        alias = registry.lookup(given) or registry.alias_for_repo(given)
        if alias is not None:
            names.add(alias.name)
            if alias.repo_id != registry.EMBEDDED:
                names.add(alias.repo_id)
    return {_bare_name(n) for n in names if n}


def ollama_tag(model_id: str) -> str:
    """The name Ollama lists: name:tag ("demo:latest"); a name that carries a tag (REPO:QUANT) keeps it."""
    return model_id if ":" in model_id.rsplit("/", 1)[-1] else f"{model_id}:latest"


def _weight_files(model: ServedModel) -> list[Path]:
    """The checkpoint's weight files, as the loader reads them (none for a model without a folder)."""
    try:
        return weight_files(Path(model.folder)) if model.folder is not None else []
    except MoerunError:
        return []


def model_digest(model: ServedModel) -> str:
    """A sha256 of what makes the checkpoint itself: config.json, the weights index and each weight
    file's name, size and header (never the megabytes of weights), stable across restarts."""
    h = hashlib.sha256()
    folder = model.folder
    for name in ("config.json", "model.safetensors.index.json"):
        path = Path(folder) / name if folder is not None else None
        if path is not None and path.is_file():
            h.update(name.encode() + b"\0" + path.read_bytes())
    if folder is None:
        h.update(repr(sorted(model.config.items())).encode())
    for path in _weight_files(model):
        header: list[bytes] = []
        read_header(path, header)
        h.update(f"{path.name}\0{path.stat().st_size}\0".encode() + header[0])
    return h.hexdigest()


def _modified_at(model: ServedModel) -> str:
    config = Path(model.folder) / "config.json" if model.folder is not None else None
    when = config.stat().st_mtime if config is not None and config.is_file() else time.time()
    return datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


# -- CORS -------------------------------------------------------------------------------------------

_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "0.0.0.0")
# Desktop apps' own origins (Electron, Tauri, VS Code webviews), which Ollama allows by default too.
_APP_SCHEMES = ("app", "file", "tauri", "vscode-webview", "vscode-file")
_ORIGIN_PATTERN = re.compile(r"^(\*|null|[a-z][a-z0-9+.-]*://[^/\s?#]+)$")


def parse_origins(text: str | None) -> tuple[str, ...]:
    """--origins / MOERUN_ORIGINS: a comma list of origins (scheme://host[:port]), each may hold
    * wildcards ("https://*.example.com"), "*" for any; refused at start when one is not an origin."""
    out = []
    for item in (text or "").split(","):
        item = item.strip().lower().rstrip("/")
        if not item:
            continue
        if not _ORIGIN_PATTERN.match(item):
            raise ValueError(f"'{item}' is not an origin (scheme://host[:port], * wildcards allowed, or *)")
        out.append(item)
    return tuple(out)


class Origins:
    """Which browser origins may call the server: as Ollama's defaults, loopback pages (http(s)://localhost,
    127.0.0.1, [::1], 0.0.0.0, any port) and desktop apps (app://, file://, tauri://, vscode-webview://,
    vscode-file://), plus the --origins patterns."""

    def __init__(self, extra: Sequence[str] = ()):
        self.extra = tuple(extra)

    def allows(self, origin: str) -> bool:
        origin = origin.strip().lower()
        try:
            parts = urlsplit(origin)
            parts.port  # noqa: B018 - raises on a malformed port
        except ValueError:
            return False
        if parts.scheme in ("http", "https") and parts.hostname in _LOOPBACK_HOSTS and not parts.path:
            return True
        if parts.scheme in _APP_SCHEMES:
            return True
        return any(p == "*" or fnmatch.fnmatchcase(origin, p) for p in self.extra)


def build_app(
    model: ServedModel,
    *,
    name: str | None = None,
    api_key: str | None = None,
    defaults: Defaults | None = None,
    engine: Engine | None = None,
    origins: Origins | None = None,
    max_body: int = MAX_BODY,
) -> Starlette:
    """The ASGI app over a loaded moerun Model: each route parses its request
    (moerun.server_protocol), runs the engine and writes the response (moerun.server_responses)."""
    engine = engine or Engine(model, defaults)
    model_id = name or model.name
    names = served_names(model_id, model)
    created = _now()
    digest: list[str] = []  # computed on first use: it reads the weight files' headers

    def model_digest_once() -> str:
        if not digest:
            digest.append(model_digest(model))
        return digest[0]

    def check_model(body: dict, ollama: bool, keys: tuple[str, ...] = ("model",)) -> None:
        """The request's model must be the loaded one (by any of its names); none given means it."""
        requested = next((body[k] for k in keys if body.get(k) not in (None, "")), None)
        if requested is None:
            return
        if not isinstance(requested, str):
            raise RequestError(f"'{keys[0]}' must be a string", code="invalid_value", param=keys[0])
        if _bare_name(requested) not in names:
            shown = requested if len(requested) <= 200 else requested[:200] + "..."
            have = ollama_tag(model_id) if ollama else model_id
            raise RequestError(
                f"model '{shown}' not found (this server has '{have}')",
                status=404,
                code="model_not_found",
                param="model",
            )

    def handler(fn, ollama: bool = False):
        # Every route's errors become JSON here: a 4xx for the client's, a 500 (one log line) for ours.
        async def endpoint(request: Request) -> Response:
            try:
                return await fn(request)
            except (RequestError, MoerunError) as e:
                return _error(request_error(e), ollama)
            except Exception as e:  # noqa: BLE001
                log.error("%s %s failed: %s: %s", request.method, request.url.path, type(e).__name__, e)
                if _debug():
                    traceback.print_exc()
                return _error(request_error(e), ollama)

        return endpoint

    async def body_of(request: Request) -> dict:
        # Read up to the limit and no further (a chunked upload has no Content-Length to refuse early).
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > max_body:
                raise _too_large(max_body)
            parts.append(part)
        raw = b"".join(parts)
        # Parsing megabytes of JSON holds the loop: a thread for large bodies.
        return parse_body(raw) if len(raw) < 1 << 16 else await run_in_threadpool(parse_body, raw)

    async def start(request: Request, body: dict, parse) -> tuple[GenRequest, Job]:
        """The request's generation, parsed and encoded, as a job for the worker."""
        gen = parse(body, engine.defaults)
        ids = await run_in_threadpool(engine.encode, gen)  # templates can be slow; keep the loop free
        client = f"{request.client.host}:{request.client.port}" if request.client else "-"
        return gen, engine.job(ids, gen, f"{request.method} {request.url.path}", client)

    async def prepare(request: Request, parse) -> tuple[GenRequest, Job]:
        """An OpenAI route's job, from a body that names the loaded model or none."""
        body = await body_of(request)
        check_model(body, ollama=False)
        return await start(request, body, parse)

    # -- OpenAI --

    async def chat_completions(request: Request) -> Response:
        gen, job = await prepare(request, openai_chat)
        head = ReplyHead("chatcmpl-" + uuid.uuid4().hex[:24], _now(), model_id)
        if not gen.stream:
            got = await _collect(engine, job, request)
            if got is None:
                return Response(status_code=204)
            text, r = got
            return JSONResponse(openai_chat_completion(head, r, *engine.parse(job, text)))

        async def body() -> AsyncIterator[bytes]:
            yield sse(openai_chat_chunk(head, {"role": "assistant", "content": ""}))
            async with contextlib.aclosing(_updates(engine, job)) as updates:
                async for u in updates:
                    if u.error is not None:
                        yield sse(request_error(u.error).openai())
                    for delta in openai_chat_deltas(u.pieces):
                        yield sse(openai_chat_chunk(head, delta))
                    if u.result is not None:
                        finish = u.result.finish_reason
                        if u.calls:
                            yield sse(openai_chat_chunk(head, openai_tool_call_delta(u.calls)))
                            finish = "tool_calls"
                        yield sse(openai_chat_chunk(head, {}, finish))
                        if gen.include_usage:
                            yield sse(openai_usage_chunk(head, u.result, chat=True))
            yield sse("[DONE]")

        return _GenerationStream(body(), job, "text/event-stream")

    async def completions(request: Request) -> Response:
        gen, job = await prepare(request, openai_completion)
        head = ReplyHead("cmpl-" + uuid.uuid4().hex[:24], _now(), model_id)
        echo = gen.text if gen.echo else ""
        if not gen.stream:
            got = await _collect(engine, job, request)
            if got is None:
                return Response(status_code=204)
            text, r = got
            return JSONResponse(openai_text_completion(head, r, echo + text))

        async def body() -> AsyncIterator[bytes]:
            if echo:
                yield sse(openai_text_chunk(head, echo))
            async with contextlib.aclosing(_updates(engine, job)) as updates:
                async for u in updates:
                    if u.error is not None:
                        yield sse(request_error(u.error).openai())
                    for _, text in u.pieces:
                        yield sse(openai_text_chunk(head, text))
                    if u.result is not None:
                        yield sse(openai_text_chunk(head, "", u.result.finish_reason))
                        if gen.include_usage:
                            yield sse(openai_usage_chunk(head, u.result, chat=False))
            yield sse("[DONE]")

        return _GenerationStream(body(), job, "text/event-stream")

    async def list_models(request: Request) -> Response:
        return JSONResponse(openai_models(model_id, created))

    async def get_model(request: Request) -> Response:
        check_model({"model": request.path_params["model"] or "?"}, ollama=False)
        return JSONResponse(openai_model(model_id, created))

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": model_id})

    # -- Ollama --

    def ollama_route(parse, chat: bool):
        async def route(request: Request) -> Response:
            body = await body_of(request)
            check_model(body, ollama=True)
            if not (body.get("messages") if chat else body.get("prompt")):  # Ollama's "load the model": it is
                return JSONResponse(ollama_loaded(model_id, _iso_now(), chat))
            gen, job = await start(request, body, parse)
            if not gen.stream:
                got = await _collect(engine, job, request)
                if got is None:
                    return Response(status_code=204)
                text, r = got
                content, thinking, calls = engine.parse(job, text)
                return JSONResponse(ollama_last(model_id, _iso_now(), chat, r, content, calls, thinking))

            async def lines() -> AsyncIterator[bytes]:
                async with contextlib.aclosing(_updates(engine, job)) as updates:
                    async for u in updates:
                        if u.error is not None:
                            yield ndjson(ollama_error_line(u.error))
                        for line in ollama_pieces(model_id, _iso_now(), chat, u.pieces, u.calls):
                            yield ndjson(line)
                        if u.result is not None:
                            yield ndjson(ollama_last(model_id, _iso_now(), chat, u.result))

            return _GenerationStream(lines(), job, "application/x-ndjson")

        return route

    def sizes() -> tuple[int, int, str]:
        """(bytes on the device, bytes in host RAM, device name) from the plan load followed."""
        p = model.plan
        device = str(model.device)
        if p is None:
            return 0, 0, device
        host_only = not device.startswith("cuda")
        on_device = p.gpu_bytes
        in_ram = p.cpu_bytes if p.verdict == Verdict.OFFLOAD else 0
        return (0, on_device + in_ram, device) if host_only else (on_device, in_ram, device)

    def on_disk() -> int:
        """Ollama's size in /api/tags: the model's bytes on disk (the plan's bytes when it has no files)."""
        files = _weight_files(model)
        if files:
            return sum(p.stat().st_size for p in files)
        vram, ram, _ = sizes()
        return vram + ram

    def listing() -> OllamaListing:
        bits = model.plan.bits if model.plan is not None else 16
        details = ollama_details(
            model.config.get("model_type", ""),
            params_short(model.num_parameters),
            bits,
            str(model.dtype).removeprefix("torch."),
        )
        return OllamaListing(ollama_tag(model_id), model_digest_once(), _modified_at(model), details)

    async def tags(request: Request) -> Response:
        return JSONResponse(ollama_tags(listing(), on_disk()))

    async def show(request: Request) -> Response:
        body = await body_of(request)
        if not any(isinstance(body.get(k), str) and body[k] for k in ("model", "name")):
            raise RequestError("'model' is required", param="model")
        check_model(body, ollama=True, keys=("model", "name"))
        template, plan = model.tokenizer.chat_template or "", model.plan
        info = ollama_model_info(
            model.config,
            model.name,
            model.num_parameters,
            engine.context_length,
            plan.n_experts if plan else 0,
            plan.experts_per_token if plan else 0,
        )
        fmt = engine.tool_format
        capabilities = ollama_capabilities(model.is_chat_model, fmt.name if fmt else None, template)
        parameters = ollama_parameters(engine.defaults, engine.context_length)
        return JSONResponse(ollama_show(listing(), model_id, parameters, template, info, capabilities))

    async def ps(request: Request) -> Response:
        vram, ram, device = sizes()
        stats = model.stats
        where = Residency(
            vram, ram, device, engine.context_length, stats["total"] if stats else None, len(model.cached_ids)
        )
        running = engine.running is not None
        return JSONResponse(ollama_ps(listing(), where, running, engine.waiting, engine.served))

    async def version(request: Request) -> Response:
        return JSONResponse(ollama_version(OLLAMA_API_VERSION, __version__))

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
        Route("/api/show", handler(show, ollama=True), methods=["POST"]),
    ]

    async def not_found(request: Request, exc) -> Response:
        status = getattr(exc, "status_code", 404)
        words = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        err = RequestError(
            words.get(status, str(getattr(exc, "detail", "bad request"))),
            status=status,
            code="not_found" if status == 404 else "method_not_allowed",
        )
        return _error(err, request.url.path.startswith("/api/"))

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
    app.state.engine = engine
    return _Guard(app, api_key, origins or Origins(), max_body)


_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")  # an HTTP header name


class _Guard:
    """ASGI wrapper: CORS (preflights answered before the key is asked for; a browser origin not
    allowed is a 403), the API key (Authorization: Bearer) on everything but /health and /,
    and a log line for requests that generate nothing (the worker logs those that do)."""

    OPEN = ("/", "/health")

    def __init__(self, app: Starlette, api_key: str | None, origins: Origins, max_body: int = 0):
        self.app, self.api_key, self.origins, self.max_body = app, api_key, origins, max_body or MAX_BODY
        self.state = app.state

    def _preflight(self, origin: str, headers: dict) -> Response:
        asked = headers.get(b"access-control-request-headers", b"").decode("latin-1")
        extra = [h.strip() for h in asked.split(",") if _TOKEN.match(h.strip())]
        allow = ["Authorization", "Content-Type"]
        allow += [h for h in extra if h.lower() not in ("authorization", "content-type")]
        out = {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": "GET, POST, HEAD, OPTIONS",
            "Access-Control-Allow-Headers": ", ".join(allow),
            "Access-Control-Max-Age": "600",
            "Vary": "Origin",
        }
        if headers.get(b"access-control-request-private-network", b"").lower() == b"true":
            out["Access-Control-Allow-Private-Network"] = "true"  # Chrome's check before a page reaches loopback
        return Response(status_code=204, headers=out)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = dict(scope.get("headers") or [])
        ollama = path.startswith("/api/")
        origin = headers.get(b"origin", b"").decode("latin-1").strip() or None
        if origin is not None and not self.origins.allows(origin):
            # Browsers send Origin; a page from elsewhere must not drive the model (nor a DNS-rebound name).
            err = RequestError(
                f"origin {origin[:200]} is not allowed (start the server with --origins {origin[:200]})",
                status=403,
                code="origin_not_allowed",
            )
            return await _error(err, ollama)(scope, receive, send)
        if origin is not None and scope.get("method") == "OPTIONS" and b"access-control-request-method" in headers:
            return await self._preflight(origin, headers)(scope, receive, send)
        generates = path in ("/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate")
        status, t0 = [0], time.perf_counter()

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                if origin is not None:  # an allowed page may read every answer, errors included
                    message["headers"] = [*message.get("headers", []), *_cors_headers(origin)]
            await send(message)

        if self.api_key and path not in self.OPEN:
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            # The key as the client's bytes (UTF-8), not as Latin-1 text: 'clé' matches 'clé'.
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key.encode()):
                err = RequestError(
                    "missing or wrong API key (send Authorization: Bearer <key>)", status=401, code="invalid_api_key"
                )
                return await _error(err, ollama)(scope, receive, send_status)
        length = headers.get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_body:  # refused before a byte of it is read
            return await _error(_too_large(self.max_body), ollama)(scope, receive, send_status)

        await self.app(scope, receive, send_status)
        if generates and status[0] < 400:
            return  # the worker logged it, with its tokens/sec
        client = scope.get("client")
        log.info(
            "%s %s %s · %d · %.3f s",
            scope.get("method"),
            path,
            f"{client[0]}:{client[1]}" if client else "-",
            status[0],
            time.perf_counter() - t0,
        )


def _too_large(limit: int) -> RequestError:
    return RequestError(
        f"the request body is larger than {limit / (1 << 20):g} MiB (start the server with a larger --max-body)",
        status=413,
        code="request_too_large",
    )


def _cors_headers(origin: str) -> list[tuple[bytes, bytes]]:
    return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]


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


def serve(
    model: ServedModel,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    name: str | None = None,
    defaults: Defaults | None = None,
    announce: Callable[[str], None] | None = None,
    sock: socket.socket | None = None,
    origins: Sequence[str] = (),
    max_body: int = MAX_BODY,
) -> None:
    """Serve `model` until Ctrl-C (or SIGTERM): the running generation stops after its
    current token, queued ones are dropped, and the process exits cleanly.
    `origins`: browser origins allowed beside loopback pages (parse_origins)."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    engine = Engine(model, defaults)
    app = build_app(
        model, name=name, api_key=api_key, defaults=defaults, engine=engine, origins=Origins(origins), max_body=max_body
    )
    sock = sock or bind(host, port)
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    url = f"http://{shown}:{bound[1]}"

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            engine.stop_all()  # before uvicorn waits on open streams
            super().handle_exit(sig, frame)
            # uvicorn raises a caught SIGTERM again once down, which kills the process (143) before
            # "stopped": a service manager's stop is a clean exit here, as Ctrl-C is.
            self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5, lifespan="off")
    server = Server(config)
    say = announce or (lambda line: print(line, flush=True))
    say(f"moerun serve: {model.describe()}")
    say(
        f"listening on {url} (OpenAI: {url}/v1, Ollama: {url}/api; one generation at a time"
        + (", API key required)" if api_key else ")")
    )
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
