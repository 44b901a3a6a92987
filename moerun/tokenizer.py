"""Tokenizer and chat templates from a checkpoint folder, without transformers.

The `tokenizers` library does the encoding from tokenizer.json; this module adds what
transformers layers on top (special tokens from tokenizer_config.json, the chat template
rendered in a jinja2 sandbox) and an incremental detokenizer for streaming. Behaviour is
held against transformers' AutoTokenizer by tests/test_tokenizer.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from moerun.errors import MoerunError

log = logging.getLogger("moerun")

# The named special tokens transformers passes to a chat template (its special_tokens_map): only
# those the tokenizer has, so `bos_token is defined` is false for a model without one (Qwen).
_TEMPLATE_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Names a message's reasoning goes under; templates (Qwen3, gpt-oss) read one or the other.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MoerunError(f"cannot read {path}: {_one_line(e)}") from e


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a plain string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _check_special_tokens(config: dict, source: Path) -> None:
    """Each named special token must be text or an AddedToken object with text content (a
    number there reached the tokenizer library as a bare TypeError)."""
    for name in _TEMPLATE_TOKEN_NAMES:
        value = config.get(name)
        content = value.get("content") if isinstance(value, dict) else value
        if content is not None and not isinstance(content, str):
            shown = json.dumps(value) if isinstance(value, (dict, list, int, float, bool)) else type(value).__name__
            raise MoerunError(
                f'{source}: {name} is {shown}, expected a token: text, or an object whose "content" is text'
            )


def _named_templates(value: Any) -> dict[str, str]:
    """tokenizer_config.json's chat_template: a string (named "default"), or a list of named templates."""
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        return {
            t["name"]: t["template"]
            for t in value
            if isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
        }
    return {}


def _raise_exception(message: str) -> None:
    # Templates call this to reject a conversation (e.g. roles that do not alternate).
    raise MoerunError(f"chat template: {message}")


def _tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # As transformers: jinja's own tojson escapes HTML characters, which templates do not want.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers marks the assistant's tokens with it
    (for training masks); rendering just outputs the body, which is all inference needs."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


class _TemplateNamespace(jinja2.utils.Namespace):
    """As transformers' sandbox: a namespace() refuses underscore-prefixed attribute names."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature trick: namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}"
            )


class _TemplateDict:
    """As transformers' sandbox: `dict(...)` and `dict.fromkeys(...)`, and no attribute access beyond."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


@lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in the same sandbox transformers uses (templates are untrusted)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise MoerunError(f"chat template does not compile: {_one_line(e)}") from e


def _plain(value: Any) -> Any:
    """What a template may see, rebuilt from plain JSON-like types as transformers does: str/int/float
    subclasses become the base type, dataclasses and pydantic models dicts, anything else an inert
    "<TypeName>" placeholder (templates only test whether media keys are present)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if any(c.__module__ == "numpy" and c.__name__ == "generic" for c in type(value).__mro__):
        return _plain(value.item())  # a numpy scalar (np.generic): np.bool_(False) must stay falsy
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _template_messages(messages: list[dict]) -> list[dict]:
    """Copy the messages the way transformers hands them to a template."""
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise MoerunError(f"a chat message must be a dict, got {type(message).__name__}")
        # transformers drops None-valued keys, so `message.tool_calls is defined` stays false.
        message = _plain({k: v for k, v in message.items() if v is not None})
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def check_utf8(text: str, what: str) -> None:
    """Refuse `text` holding lone surrogates (how Python carries bytes that are not UTF-8),
    naming the first: the tokenizer takes only real characters."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        byte = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        raise MoerunError(f"{what} is not UTF-8 text ({byte} at character {e.start})") from None


class Tokenizer:
    """A checkpoint's tokenizer: encode, decode, chat template and streaming decode.

    Build it with `Tokenizer.from_dir(folder)`; the folder needs tokenizer.json and may have
    tokenizer_config.json and chat_template.jinja, as in a Hugging Face Hub repo.
    """

    def __init__(self, backend: tokenizers.Tokenizer, config: dict, chat_template: str | dict[str, str] | None):
        """chat_template: one template, or named templates ({"default": ..., "tool_use": ...})."""
        self._tok = backend
        self._config = config
        templates = {"default": chat_template} if isinstance(chat_template, str) else dict(chat_template or {})
        self._templates = templates
        self.chat_template = templates.get("default")
        tokens = {name: _token_content(config.get(name)) for name in _TEMPLATE_TOKEN_NAMES}
        # What a template sees: only the named tokens that are set, as transformers' special_tokens_map.
        self.special_tokens = {name: content for name, content in tokens.items() if content is not None}
        for content in self.special_tokens.values():
            # transformers adds named special tokens that tokenizer.json lacks; do the same so ids agree.
            if backend.token_to_id(content) is None:
                backend.add_special_tokens([tokenizers.AddedToken(content, special=True, normalized=False)])
        self.bos_token = tokens["bos_token"]
        self.eos_token = tokens["eos_token"]
        self.bos_token_id = backend.token_to_id(self.bos_token) if self.bos_token is not None else None
        self.eos_token_id = backend.token_to_id(self.eos_token) if self.eos_token is not None else None
        self._clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self._warned_no_template = False
        self._special_ids: frozenset[int] | None = None
        self._token_bytes: dict[int, bytes | None] = {}
        self._byte_level: bool | None = None

    @classmethod
    def from_dir(cls, folder: str | Path) -> "Tokenizer":
        """Load tokenizer.json, tokenizer_config.json and the chat template from `folder`.

        The chat template comes from chat_template.jinja if present, else from the config's
        "chat_template" (a string, or a list of named templates: "default", and "tool_use" when
        tools are passed and the model names one). Raises MoerunError when tokenizer.json is
        missing or unreadable.
        """
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise MoerunError(f"no tokenizer.json in {folder}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exception for any parse error
            raise MoerunError(f"cannot read {path}: {_one_line(e)}") from e
        config_path = folder / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        if not isinstance(config, dict):
            raise MoerunError(f"{config_path} is not a JSON object")
        _check_special_tokens(config, config_path)
        # add_bos_token / add_eos_token in the config are deliberately not applied: transformers 5
        # drops them whenever tokenizer.json exists, so its post-processor alone decides BOS/EOS.
        templates = _named_templates(config.get("chat_template"))
        template_path = folder / "chat_template.jinja"
        if template_path.is_file():
            try:
                templates["default"] = template_path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise MoerunError(
                    f"{template_path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                    f"{e.start}): a chat template is a Jinja text file"
                ) from None
            except OSError as e:
                raise MoerunError(f"cannot read {template_path}: {e.strerror or e}") from None
        return cls(backend, config, templates)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (transformers' `len(tokenizer)`)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def tokens_from(self, first_id: int) -> list[tuple[str, int]]:
        """(token, id) of every token whose id is `first_id` or more, lowest id first: the
        tokens a model with a `first_id`-row embedding cannot take."""
        return sorted(
            ((t, i) for t, i in self._tok.get_vocab(with_added_tokens=True).items() if i >= first_id),
            key=lambda ti: ti[1],
        )

    @property
    def has_chat_template(self) -> bool:
        """Whether the model ships a chat template (else apply_chat_template uses a plain fallback)."""
        return self.chat_template is not None

    def _template_for(self, tools: Any) -> str | None:
        # As transformers' get_chat_template: a "tool_use" template when tools are passed, else the default.
        if tools is not None and "tool_use" in self._templates:
            return self._templates["tool_use"]
        return self.chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with add_special_tokens, the post-processor's BOS/EOS are added."""
        try:
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:  # lone surrogates: undecodable bytes Python kept (argv, stdin, "\udcff" in JSON)
            if isinstance(text, str):
                check_utf8(text, "the text to tokenize")
            raise

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the tokens marked special (what skip_special_tokens drops)."""
        if self._special_ids is None:
            self._special_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)
        return self._special_ids

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True, keep: frozenset[int] = frozenset()) -> str:
        """Text of `ids` (a list, or anything iterable of ints such as a 1-D tensor). `keep`:
        special token ids written out even when skip_special_tokens drops the others (a
        tool-call parser's markers, such as Mistral's [TOOL_CALLS])."""
        ids = [int(i) for i in ids]
        if keep and skip_special_tokens:
            special = self.special_ids
            ids = [i for i in ids if i in keep or i not in special]
            skip_special_tokens = False
        text = self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        # transformers skips this cleanup for BPE, where it would eat real spaces before punctuation.
        if self._clean_up_spaces and type(self._tok.model).__name__ != "BPE":
            text = _clean_up_tokenization(text)
        return text

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False, **kwargs: Any
    ) -> str | list[int]:
        """Render `messages` ([{"role", "content"}, ...]) with the model's chat template.

        Same result as transformers' apply_chat_template; extra kwargs (tools, documents,
        enable_thinking, reasoning kwargs, ...) reach the template, e.g.
        `apply_chat_template(messages, tools=[...], enable_thinking=False)`. Messages may carry
        "reasoning_content" (or "thinking"/"reasoning") and "tool_calls". With tokenize=True
        returns the ids of the rendered text, encoded without adding special tokens (the template
        writes them). A template's raise_exception(...), or any error while rendering (e.g. a
        filter given the wrong type), surfaces as MoerunError.
        """
        template_source = self._template_for(kwargs.get("tools"))
        if template_source is None:
            text = self._fallback_chat(messages, add_generation_prompt)
        else:
            variables = _plain({"tools": None, "documents": None, **self.special_tokens, **kwargs})
            template = _compile_template(template_source)
            try:
                text = template.render(
                    messages=_template_messages(messages), add_generation_prompt=add_generation_prompt, **variables
                )
            except MoerunError:
                raise
            except Exception as e:  # jinja2.TemplateError, or a TypeError/ValueError from a filter or method
                raise MoerunError(f"chat template failed: {_one_line(e)}") from e
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _fallback_chat(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if not self._warned_no_template:
            # One `moerun:` line on stderr, as the other warnings that let a run go on.
            log.warning("moerun: this model has no chat template; using a plain 'role: content' format")
            self._warned_no_template = True
        text = "".join(f"{m['role']}: {m.get('content') or ''}\n" for m in messages)
        return text + ("assistant: " if add_generation_prompt else "")

    def stream_decoder(self, skip_special_tokens: bool = True, keep_special: Iterable[str] = ()) -> "StreamDecoder":
        """A fresh incremental detokenizer for one generated sequence; `keep_special`: special
        tokens (by their text) it writes out all the same."""
        keep = frozenset(i for i in (self._tok.token_to_id(t) for t in keep_special) if i is not None)
        return StreamDecoder(self, skip_special_tokens, keep)

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes token `token_id` adds to the text mid-sequence, or None for a special
        token. Read from the vocabulary (byte-level tables, SentencePiece's `▁` and <0xNN>
        byte fallback), not by decoding, so a token that is part of a UTF-8 character is
        still its exact bytes. Cached: a caller may ask for the same tokens every step."""
        cached = self._token_bytes.get(token_id, b"?")
        if cached != b"?":
            return cached
        value = self._compute_token_bytes(token_id)
        self._token_bytes[token_id] = value
        return value

    def _compute_token_bytes(self, token_id: int) -> bytes | None:
        if token_id in self.special_ids:
            return None
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return None
        if token_id in self._tok.get_added_tokens_decoder():
            return piece.encode()
        if self._byte_level is None:
            decoder = json.loads(self._tok.to_str()).get("decoder") or {}
            self._byte_level = "ByteLevel" in json.dumps(decoder)
        if self._byte_level:
            table = _unicode_to_byte()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        m = _BYTE_FALLBACK.fullmatch(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        if "\u2581" in piece:
            return piece.replace("\u2581", " ").encode()
        text = self._tok.decode([token_id], skip_special_tokens=False)
        return None if "\ufffd" in text else text.encode()


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte-level table inverted: the printable character of each byte -> the byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


class StreamDecoder:
    """Turns generated token ids into text as they arrive, never splitting a character.

    Byte-level tokens can end in the middle of a UTF-8 character; such text decodes to a
    trailing "\\ufffd" and is held back until a later token completes it. Every add() result
    plus flush() concatenates to `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True, keep: frozenset[int] = frozenset()):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._keep = keep
        self._ids: list[int] = []
        # Decode a window from _prefix rather than all ids, so a step costs O(window) not O(length);
        # the window starts at tokens already printed so that decoders which treat the first token
        # specially (a stripped leading space) still see the same context.
        self._prefix = 0
        self._read = 0

    def _window_text(self) -> tuple[str, str]:
        decode = self._tokenizer.decode
        window = self._ids[self._prefix :]
        return (
            decode(window[: self._read - self._prefix], self._skip, self._keep),
            decode(window, self._skip, self._keep),
        )

    def add(self, token_id: int) -> str:
        """Add one token id; return the text it made printable (often "", never a partial char)."""
        self._ids.append(int(token_id))
        printed, text = self._window_text()
        if len(text) <= len(printed) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(printed) :]

    def flush(self) -> str:
        """Return whatever is still held back (e.g. an incomplete character at the end)."""
        printed, text = self._window_text()
        self._prefix = self._read = len(self._ids)
        return text[len(printed) :]


def _clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization: drop spaces that WordPiece decoding puts before punctuation."""
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text
