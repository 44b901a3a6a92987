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
from typing import AsyncIterator, Callable, Iterator, Protocol, Sequence
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from moerun import __version__, registry
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
from moerun.units import params_short
from moerun.weights import read_header, weight_files

log = logging.getLogger("moerun.serve")


def _debug() -> bool:
    return os.environ.get("MOERUN_DEBUG", "") not in ("", "0")


# -- the worker ---------------------------------------------------------------------------------


class ServedModel(Protocol):
    """What the engine and the routes need of a loaded model (moerun.api.Model has it all)."""

    name: str
    config: dict
    tokenizer: object
    max_context: int
    kv_caches: list | None
    device: object
    dtype: object
    plan: object

    @property
    def stats(self) -> dict: ...

    @property
    def num_parameters(self) -> int: ...

    @property
    def is_chat_model(self) -> bool: ...

    def encode_prompt(self, prompt, chat: bool) -> list[int]: ...

    def reusable_tokens(self, ids: Sequence[int]) -> int: ...

    def stream_generate(self, prompt, max_new_tokens: int = 64, **kwargs) -> Iterator: ...


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
    finish_reason: str = "stop"  # "stop", "length", or "abort" (cut short by the server stopping)
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
            raise RequestError("this model does not chat (a span-corruption encoder-decoder without a chat template): "
                               "send the raw prompt to /v1/completions or /api/generate", code="invalid_value")  # fmt: skip
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
            raise RequestError(f"logit_bias: token id {outside[0]} is not in the vocabulary (0 to {vocab - 1})",
                               code="invalid_value", param="logit_bias")  # fmt: skip
        if len(ids) >= ctx:
            what = f"options.num_ctx is {ctx}" if ctx < self.context_length else f"the planned context is {ctx}"
            raise RequestError(f"the prompt has {len(ids)} tokens; {what} (start the server with a larger --ctx)",
                               code="context_length_exceeded")  # fmt: skip
        return ids

    def _refuse_surely_too_long(self, text: str, ctx: int) -> None:
        """Refuse, before tokenizing it, a text whose length alone proves it cannot fit: no token
        covers more than `longest_token` characters, so it has at least len / (longest * slack) tokens;
        slack 4 covers a normalizer that shrinks text (Unicode composition shrinks it at most 3x)."""
        if self._longest_token is None:
            self._longest_token = max((len(t) for t, _ in self.model.tokenizer.tokens_from(0)), default=1)
        per_token = max(self._longest_token, 1) * 4
        if len(text) >= ctx * per_token:
            raise RequestError(f"the prompt has at least {len(text) // per_token} tokens ({len(text)} characters); the "
                               f"planned context is {ctx} (start the server with a larger --ctx)",
                               code="context_length_exceeded")  # fmt: skip

    def window(self, gen: GenRequest) -> int:
        """The request's window (prompt + reply): the planned context, or a smaller options.num_ctx;
        a larger one is refused, since the states were allocated for the plan."""
        ctx = self.context_length
        if gen.num_ctx is not None and gen.num_ctx > ctx:
            raise RequestError(f"options.num_ctx {gen.num_ctx} is above the planned context of {ctx} tokens (start the "
                               f"server with --ctx {gen.num_ctx}, or leave num_ctx out)", param="options.num_ctx",
                               code="context_length_exceeded")  # fmt: skip
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
    folder = getattr(model, "folder", None)
    try:
        return weight_files(Path(folder)) if folder is not None else []
    except MoerunError:
        return []


def model_digest(model: ServedModel) -> str:
    """A sha256 of what makes the checkpoint itself: config.json, the weights index and each weight
    file's name, size and header (never the megabytes of weights), stable across restarts."""
    h = hashlib.sha256()
    folder = getattr(model, "folder", None)
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
    folder = getattr(model, "folder", None)
    config = Path(folder) / "config.json" if folder is not None else None
    when = config.stat().st_mtime if config is not None and config.is_file() else time.time()
    return datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _config_value(config: dict, *keys: str):
    # Multimodal checkpoints (Llama 4) keep the language model's fields under text_config.
    for source in (config, config.get("text_config") or {}):
        for key in keys:
            if isinstance(source.get(key), (int, float)) and not isinstance(source.get(key), bool):
                return source[key]
    return None


def model_info(model: ServedModel, context_length: int) -> dict:
    """Ollama's /api/show model_info: general.* and <arch>.* keys, as it writes them from a GGUF."""
    config = model.config
    arch = str(config.get("model_type") or "unknown")
    plan = model.plan
    info = {"general.architecture": arch, "general.parameter_count": model.num_parameters,
            "general.basename": model.name, f"{arch}.context_length": context_length}  # fmt: skip
    fields = {"embedding_length": ("hidden_size", "d_model", "n_embd"),
              "block_count": ("num_hidden_layers", "num_layers", "n_layer"),
              "attention.head_count": ("num_attention_heads", "num_heads"),
              "attention.head_count_kv": ("num_key_value_heads",),
              "vocab_size": ("vocab_size",)}  # fmt: skip
    for key, names in fields.items():
        value = _config_value(config, *names)
        if value is not None:
            info[f"{arch}.{key}"] = value
    experts = getattr(plan, "n_experts", 0) or _config_value(
        config, "num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
    used = getattr(plan, "experts_per_token", 0) or _config_value(config, "num_experts_per_tok", "moe_k", "top_k")
    if experts:
        info[f"{arch}.expert_count"] = int(experts)
        if used:
            info[f"{arch}.expert_used_count"] = int(used)
    return info


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


def build_app(model: ServedModel, *, name: str | None = None, api_key: str | None = None,
              defaults: Defaults | None = None, engine: Engine | None = None,
              origins: Origins | None = None, max_body: int = MAX_BODY) -> Starlette:  # fmt: skip
    """The ASGI app over a loaded moerun Model."""
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
            raise RequestError(f"model '{shown}' not found (this server has '{have}')", status=404,
                               code="model_not_found", param="model")  # fmt: skip

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

    def client_of(request: Request) -> str:
        return f"{request.client.host}:{request.client.port}" if request.client else "-"

    async def prepare(request: Request, parse) -> tuple[GenRequest, Job]:
        body = await body_of(request)
        check_model(body, ollama=False)
        gen = parse(body, engine.defaults)
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
        check_model({"model": request.path_params["model"] or "?"}, ollama=False)
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
            check_model(body, ollama=True)
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
        cfg = model.config
        bits = getattr(model.plan, "bits", 16)
        dtype = str(model.dtype).removeprefix("torch.")
        quant = {4: "NF4 experts", 8: "Q8_0 experts (int8)"}.get(bits, {"bfloat16": "BF16", "float16": "F16"}.get(dtype, "F32"))
        return {"parent_model": "", "format": "safetensors", "family": cfg.get("model_type", ""),
                "families": [cfg.get("model_type", "")], "parameter_size": params_short(model.num_parameters),
                "quantization_level": quant}  # fmt: skip

    def sizes() -> tuple[int, int, str]:
        """(bytes on the device, bytes in host RAM, device name) from the plan load followed."""
        p = model.plan
        device = str(model.device)
        if p is None:
            return 0, 0, device
        host_only = not device.startswith("cuda")
        on_device = p.gpu_bytes
        in_ram = p.cpu_bytes if p.verdict == "offload" else 0
        return (0, on_device + in_ram, device) if host_only else (on_device, in_ram, device)

    def on_disk() -> int:
        """Ollama's size in /api/tags: the model's bytes on disk (the plan's bytes when it has no files)."""
        files = _weight_files(model)
        if files:
            return sum(p.stat().st_size for p in files)
        vram, ram, _ = sizes()
        return vram + ram

    async def tags(request: Request) -> Response:
        tag = ollama_tag(model_id)
        return JSONResponse({"models": [{"name": tag, "model": tag, "modified_at": _modified_at(model),
                                         "size": on_disk(), "digest": model_digest_once(),
                                         "details": details()}]})  # fmt: skip

    def capabilities() -> list[str]:
        """Ollama's capabilities: completion always; tools when the family has a call format the
        replies are read in; thinking when the chat template can think. A model that does not chat: completion."""
        out = ["completion"]
        template = model.tokenizer.chat_template or ""
        if not model.is_chat_model:
            return out
        if engine.tool_format is not None:
            out.append("tools")
        if engine.tool_format is not None and engine.tool_format.name == "harmony" or re.search(
                r"<think>|enable_thinking|reasoning_content|thinking", template):  # fmt: skip
            out.append("thinking")
        return out

    def parameters_text() -> str:
        d = engine.defaults
        rows = [("num_ctx", engine.context_length), ("temperature", d.temperature), ("top_p", d.top_p),
                ("top_k", d.top_k)] + ([("seed", d.seed)] if d.seed is not None else []) + (
                [("num_predict", d.max_tokens)] if d.max_tokens else [])  # fmt: skip
        return "\n".join(f"{k:<30} {v:g}" if isinstance(v, float) else f"{k:<30} {v}" for k, v in rows)

    async def show(request: Request) -> Response:
        body = await body_of(request)
        if not any(isinstance(body.get(k), str) and body[k] for k in ("model", "name")):
            raise RequestError("'model' is required", param="model")
        check_model(body, ollama=True, keys=("model", "name"))
        tag = ollama_tag(model_id)
        return JSONResponse({"license": "", "modelfile": f"# Modelfile of moerun's {tag}\nFROM {model_id}\n",
                             "parameters": parameters_text(), "template": model.tokenizer.chat_template or "",
                             "details": details(), "model_info": model_info(model, engine.context_length),
                             "capabilities": capabilities(), "modified_at": _modified_at(model)})  # fmt: skip

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
            "name": ollama_tag(model_id), "model": ollama_tag(model_id), "size": vram + ram, "size_vram": vram,
            "size_ram": ram, "digest": model_digest_once(), "details": details(),
            "expires_at": "9999-12-31T23:59:59Z", "device": device,
            "context_length": engine.context_length, "expert_cache": cache,
            "prefix_tokens": len(getattr(model, "cached_ids", None) or []),
            "generations": {"max_concurrent": 1, "running": int(running is not None), "waiting": engine.waiting,
                            "served": engine.served},
        }]})  # fmt: skip

    async def version(request: Request) -> Response:
        return JSONResponse({"version": OLLAMA_API_VERSION, "moerun_version": __version__})

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
        err = RequestError(words.get(status, str(getattr(exc, "detail", "bad request"))), status=status,
                           code="not_found" if status == 404 else "method_not_allowed")  # fmt: skip
        return _error(err, request.url.path.startswith("/api/"))

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
    app.state.engine = engine
    return _Guard(app, api_key, origins or Origins(), max_body)


def _error_payload(exc: BaseException) -> dict:
    if isinstance(exc, RequestError):
        return exc.openai()
    if isinstance(exc, MoerunError):
        return RequestError(" ".join(str(exc).split()), code="invalid_value").openai()
    return RequestError(f"internal error: {type(exc).__name__}: {exc}", status=500, kind="server_error",
                        code="internal_error").openai()  # fmt: skip


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
        out = {"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Methods": "GET, POST, HEAD, OPTIONS",
               "Access-Control-Allow-Headers": ", ".join(allow), "Access-Control-Max-Age": "600",
               "Vary": "Origin"}  # fmt: skip
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
            err = RequestError(f"origin {origin[:200]} is not allowed (start the server with --origins {origin[:200]})",
                               status=403, code="origin_not_allowed")  # fmt: skip
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
                err = RequestError("missing or wrong API key (send Authorization: Bearer <key>)", status=401,
                                   code="invalid_api_key")  # fmt: skip
                return await _error(err, ollama)(scope, receive, send_status)
        length = headers.get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_body:  # refused before a byte of it is read
            return await _error(_too_large(self.max_body), ollama)(scope, receive, send_status)

        await self.app(scope, receive, send_status)
        if generates and status[0] < 400:
            return  # the worker logged it, with its tokens/sec
        client = scope.get("client")
        log.info("%s %s %s · %d · %.3f s", scope.get("method"), path, f"{client[0]}:{client[1]}" if client else "-",
                 status[0], time.perf_counter() - t0)  # fmt: skip


def _too_large(limit: int) -> RequestError:
    return RequestError(f"the request body is larger than {limit / (1 << 20):g} MiB (start the server with a larger "
                        "--max-body)", status=413, code="request_too_large")  # fmt: skip


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


def serve(model, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, name: str | None = None,
          defaults: Defaults | None = None, announce: Callable[[str], None] | None = None,
          sock: socket.socket | None = None, origins: Sequence[str] = (),
          max_body: int = MAX_BODY) -> None:  # fmt: skip
    """Serve `model` until Ctrl-C (or SIGTERM): the running generation stops after its
    current token, queued ones are dropped, and the process exits cleanly.
    `origins`: browser origins allowed beside loopback pages (parse_origins)."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    engine = Engine(model, defaults)
    app = build_app(model, name=name, api_key=api_key, defaults=defaults, engine=engine, origins=Origins(origins),
                    max_body=max_body)  # fmt: skip
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
