"""moerun.tokenizer held against transformers' AutoTokenizer (the oracle, test-time only)."""

from __future__ import annotations

import hashlib
import json

import pytest

from moerun.errors import MoerunError
from moerun.tokenizer import Tokenizer
from tests.tokenizer_fixtures import (
    QWEN3_5_TEMPLATE,
    QWEN3_5_TEMPLATE_SHA256,
    QWEN_TEMPLATES,
    TOKENIZER_VOCAB_SIZE,
    write_tokenizer,
)

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello there! The experts route each token.",
    "  leading spaces, tabs\tand\nnewlines  ",
    "naïve café — 世界 🤗🚀 👩‍👩‍👧",
    "<|im_start|>user\nhi<|im_end|> [INST] x [/INST]</s><s>",
    "",
]

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is a mixture of experts? 🤔"},
    {"role": "assistant", "content": "Many small FFNs; a router picks a few per token."},
    {"role": "user", "content": "Why?"},
]


def _folder(tmp_path, template, template_in="config"):
    folder = tmp_path / f"{template}-{template_in}"
    write_tokenizer(folder, template=template, template_in=template_in)
    return folder


def _both(folder):
    return Tokenizer.from_dir(folder), transformers.AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("template", ["chatml", "mistral"])
def test_encode_decode_match_transformers(tmp_path, template):
    ours, ref = _both(_folder(tmp_path, template))
    assert ours.vocab_size == len(ref) == TOKENIZER_VOCAB_SIZE
    assert (ours.bos_token, ours.eos_token) == (ref.bos_token, ref.eos_token)
    assert (ours.bos_token_id, ours.eos_token_id) == (ref.bos_token_id, ref.eos_token_id)
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == ref.encode(text, add_special_tokens=special), (text, special)
            assert max(ids, default=0) < TOKENIZER_VOCAB_SIZE
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
        # Byte-level BPE: plain text round-trips exactly.
        if "<" not in text:
            assert ours.decode(ours.encode(text)) == text


def test_bos_follows_the_post_processor(tmp_path):
    chatml, _ = _both(_folder(tmp_path, "chatml"))
    mistral, _ = _both(_folder(tmp_path, "mistral"))
    assert chatml.encode("hi")[0] != chatml.bos_token_id
    assert mistral.encode("hi")[0] == mistral.bos_token_id
    assert mistral.encode("hi", add_special_tokens=False)[0] != mistral.bos_token_id


@pytest.mark.parametrize(
    ("template", "template_in"), [("chatml", "config"), ("mistral", "config"), ("mistral", "file"), ("chatml", "file")]
)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tmp_path, template, template_in, add_generation_prompt):
    folder = _folder(tmp_path, template, template_in)
    assert (folder / "chat_template.jinja").exists() == (template_in == "file")
    ours, ref = _both(folder)
    assert ours.has_chat_template
    for messages in (CONVERSATION, CONVERSATION[1:]):
        kw = dict(add_generation_prompt=add_generation_prompt)
        text = ours.apply_chat_template(messages, **kw)
        assert text == ref.apply_chat_template(messages, tokenize=False, **kw)
        ids = ours.apply_chat_template(messages, tokenize=True, **kw)
        assert ids == ref.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)
        assert ids == ours.encode(text, add_special_tokens=False)


def test_chat_template_file_wins_over_config(tmp_path):
    folder = _folder(tmp_path, "chatml")
    (folder / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}", encoding="utf-8")
    assert Tokenizer.from_dir(folder).apply_chat_template([{"role": "user", "content": "x"}]) == "<s>x"


def test_named_template_list_takes_default(tmp_path):
    folder = _folder(tmp_path, None)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_dir(folder).apply_chat_template(CONVERSATION) == "plain"


def test_tool_use_template_is_picked_when_tools_are_passed(tmp_path):
    folder = _folder(tmp_path, None)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": "plain"}, {"name": "tool_use", "template": "tools"}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours, ref = _both(folder)
    for kw in ({}, {"tools": [{"name": "f"}]}, {"tools": []}):
        assert ours.apply_chat_template(CONVERSATION, **kw) == ref.apply_chat_template(
            CONVERSATION, tokenize=False, **kw
        )
    assert ours.apply_chat_template(CONVERSATION, tools=[]) == "tools"


def test_sandbox_extras_match_transformers(tmp_path):
    """{% generation %} (training-mask markup, rendered as its body), dict(), namespace(), and only the
    special tokens the tokenizer has are defined (Qwen has no bos_token)."""
    folder = _folder(tmp_path, "qwen3.5")
    (folder / "chat_template.jinja").write_text(
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% generation %}{{ loop.index }}{{ m.content }}"
        "{% set ns.n = ns.n + 1 %}{% endgeneration %}{% endfor %}|{{ ns.n }}|{{ dict(a=1) | tojson }}"
        "|{{ bos_token is defined }}{{ eos_token }}{{ pad_token }}{{ unk_token is defined }}",
        encoding="utf-8",
    )
    ours, ref = _both(folder)
    text = ours.apply_chat_template(CONVERSATION)
    assert text == ref.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert text.endswith('|4|{"a": 1}|False<|im_end|><|endoftext|>False')
    ours.chat_template = "{% set ns = namespace(_hidden=1) %}"
    with pytest.raises(MoerunError, match="underscore"):
        ours.apply_chat_template(CONVERSATION)


def test_template_kwargs_and_tojson(tmp_path):
    folder = _folder(tmp_path, None)
    (folder / "chat_template.jinja").write_text(
        "{{ tools | tojson }}|{{ {'b': 1, 'a': 'é<'} | tojson(sort_keys=True) }}|{{ enable_thinking }}",
        encoding="utf-8",
    )
    ours, ref = _both(folder)
    kw = dict(tools=[{"name": "f"}], enable_thinking=False)
    assert ours.apply_chat_template(CONVERSATION, **kw) == ref.apply_chat_template(CONVERSATION, tokenize=False, **kw)
    assert ours.apply_chat_template(CONVERSATION, **kw) == '[{"name": "f"}]|{"a": "é<", "b": 1}|False'


def test_raise_exception_becomes_moerun_error(tmp_path):
    ours, ref = _both(_folder(tmp_path, "mistral"))
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(MoerunError, match="must alternate"):
        ours.apply_chat_template(bad)
    with pytest.raises(Exception, match="must alternate"):  # the oracle agrees it is invalid
        ref.apply_chat_template(bad, tokenize=False)


def test_no_template_falls_back_with_one_warning(tmp_path, caplog):
    ours = Tokenizer.from_dir(_folder(tmp_path, None))
    assert not ours.has_chat_template
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    text = ours.apply_chat_template(messages)
    assert text == "user: hi\nassistant: yo\nassistant: "
    # warned once per tokenizer, not per call: one `moerun:` line, not a Python UserWarning
    assert ours.apply_chat_template(messages, add_generation_prompt=False) == "user: hi\nassistant: yo\n"
    assert [r.getMessage() for r in caplog.records if "chat template" in r.getMessage()] == [
        "moerun: this model has no chat template; using a plain 'role: content' format"
    ]
    ids = ours.apply_chat_template(messages, tokenize=True)
    assert ours.decode(ids) == text


@pytest.mark.parametrize("skip", [True, False])
def test_stream_decoder_never_splits_a_character(tmp_path, skip):
    ours = Tokenizer.from_dir(_folder(tmp_path, "mistral"))
    text = "Emoji 🤗🚀 and 世界, then <|im_end|>👩‍👩‍👧 naïve!"
    ids = ours.encode(text)
    stream = ours.stream_decoder(skip_special_tokens=skip)
    pieces = [stream.add(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert sum(1 for p in pieces if p == "") > 3  # multibyte characters were held back
    assert "".join(pieces) + stream.flush() == ours.decode(ids, skip_special_tokens=skip)


def test_stream_decoder_flushes_an_incomplete_tail(tmp_path):
    ours = Tokenizer.from_dir(_folder(tmp_path, "chatml"))
    ids = ours.encode("ok 🤗", add_special_tokens=False)[:-1]  # cut inside the emoji
    stream = ours.stream_decoder()
    pieces = [stream.add(i) for i in ids]
    assert "".join(pieces) == "ok "
    assert "".join(pieces) + stream.flush() == ours.decode(ids)


def test_missing_or_corrupt_files(tmp_path):
    with pytest.raises(MoerunError, match="no tokenizer.json in"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(MoerunError, match="cannot read") as info:
        Tokenizer.from_dir(tmp_path)
    assert "\n" not in str(info.value)
    folder = _folder(tmp_path, "chatml")
    (folder / "tokenizer_config.json").write_text("{")
    with pytest.raises(MoerunError, match="tokenizer_config.json"):
        Tokenizer.from_dir(folder)


# --- The real Qwen3.5-35B-A3B and Qwen3 chat templates (thinking, tools, multimodal content) ---

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city, in °C",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}

QWEN_CHATS = {
    "user": [{"role": "user", "content": "Hello there! 🤗"}],
    # Reasoning in past turns, as reasoning_content and as a <think> block in the content; both
    # come before the last user query, so the templates drop them.
    "reasoning": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Two plus two is four."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "<think>\nThree and three.\n</think>\n\n6"},
        {"role": "user", "content": "Thanks"},
    ],
    # The final assistant turn comes after the last user query: its reasoning is kept.
    "answered": [
        {"role": "user", "content": "Why is the sky blue?"},
        {"role": "assistant", "content": "Rayleigh scattering.", "reasoning_content": "Short wavelengths scatter."},
    ],
    "tools": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "Need the tool, twice.",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}},
                {"function": {"name": "get_weather", "arguments": {"city": "Oslo", "opts": {"unit": "C"}, "l": [1]}}},
            ],
        },
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "tool", "content": '{"temp": 5}'},
        {"role": "assistant", "content": "Paris 21 °C, Oslo 5 °C.", "reasoning_content": "Both came back."},
        {"role": "user", "content": "And tomorrow?"},
    ],
    # OpenAI-style content parts: Qwen3.5 renders text and vision placeholders, Qwen3 renders ''.
    "parts": [
        {
            "role": "user",
            "content": [{"type": "image", "image": "file:///cat.png"}, {"type": "text", "text": "What is it?"}],
        }
    ],
}


def _qwen_cases():
    for name, messages in QWEN_CHATS.items():
        for extra in ({}, {"enable_thinking": True}, {"enable_thinking": False}):
            for add_generation_prompt in (True, False):
                for tools in (None, [WEATHER_TOOL]):
                    kw = dict(add_generation_prompt=add_generation_prompt, **extra)
                    if tools is not None:
                        kw["tools"] = tools
                    yield name, messages, kw


def test_qwen3_5_fixture_is_the_published_template():
    assert hashlib.sha256(QWEN3_5_TEMPLATE.encode("utf-8")).hexdigest() == QWEN3_5_TEMPLATE_SHA256


@pytest.mark.parametrize("template_in", ["config", "file"])
@pytest.mark.parametrize("template", QWEN_TEMPLATES)
def test_qwen_chat_templates_match_transformers(tmp_path, template, template_in):
    ours, ref = _both(_folder(tmp_path, template, template_in))
    for name, messages, kw in _qwen_cases():
        text = ours.apply_chat_template(messages, **kw)
        assert text == ref.apply_chat_template(messages, tokenize=False, **kw), (name, kw)
        ids = ours.apply_chat_template(messages, tokenize=True, **kw)
        assert ids == ref.apply_chat_template(messages, tokenize=True, return_dict=False, **kw), (name, kw)
        assert ids == ours.encode(text, add_special_tokens=False)


def test_qwen3_5_thinking_rules(tmp_path):
    ours = Tokenizer.from_dir(_folder(tmp_path, "qwen3.5"))
    chat = ours.apply_chat_template
    user = QWEN_CHATS["user"]
    # Thinking is on by default: the prompt opens the think block; enable_thinking=False closes it empty.
    assert chat(user) == "<|im_start|>user\nHello there! 🤗<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert chat(user, enable_thinking=True) == chat(user)
    assert chat(user, enable_thinking=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert chat(user, add_generation_prompt=False) == "<|im_start|>user\nHello there! 🤗<|im_end|>\n"
    # Reasoning of turns before the last user query is dropped, whichever way it came.
    text = chat(QWEN_CHATS["reasoning"])
    assert "Two plus two" not in text and "Three and three" not in text
    assert "<|im_start|>assistant\n4<|im_end|>\n" in text and "<|im_start|>assistant\n6<|im_end|>\n" in text
    assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")
    # ...and kept after it.
    assert chat(QWEN_CHATS["answered"], add_generation_prompt=False).endswith(
        "<|im_start|>assistant\n<think>\nShort wavelengths scatter.\n</think>\n\nRayleigh scattering.<|im_end|>\n"
    )
    # XML tool calls; tools go into the system turn ahead of the system message.
    text = chat(QWEN_CHATS["tools"], tools=[WEATHER_TOOL])
    assert text.startswith("<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n")
    assert json.dumps(WEATHER_TOOL, ensure_ascii=False) in text
    assert "</IMPORTANT>\n\nUse tools.<|im_end|>\n" in text
    assert (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n"
        "</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n"
        '</parameter>\n<parameter=opts>\n{"unit": "C"}\n</parameter>\n<parameter=l>\n[1]\n</parameter>' in text
    )
    assert '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response>\n<tool_response>\n' in text
    assert "Need the tool" not in text  # that assistant turn is before the last user query
    parts = chat(QWEN_CHATS["parts"])
    assert "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>" in parts


def test_qwen3_thinking_rules(tmp_path):
    ours = Tokenizer.from_dir(_folder(tmp_path, "qwen3"))
    chat = ours.apply_chat_template
    user = QWEN_CHATS["user"]
    # Qwen3 leaves the think block to the model by default; enable_thinking=False writes an empty one.
    assert chat(user) == "<|im_start|>user\nHello there! 🤗<|im_end|>\n<|im_start|>assistant\n"
    assert chat(user, enable_thinking=False) == chat(user) + "<think>\n\n</think>\n\n"
    text = chat(QWEN_CHATS["reasoning"])
    assert "Two plus two" not in text and "Three and three" not in text
    assert "<|im_start|>assistant\n4<|im_end|>\n" in text and "<|im_start|>assistant\n6<|im_end|>\n" in text
    assert chat(QWEN_CHATS["answered"], add_generation_prompt=False).endswith(
        "<|im_start|>assistant\n<think>\nShort wavelengths scatter.\n</think>\n\nRayleigh scattering.<|im_end|>\n"
    )
    text = chat(QWEN_CHATS["tools"], tools=[WEATHER_TOOL])
    assert text.startswith("<|im_start|>system\nUse tools.\n\n# Tools\n")
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>\n<tool_call>'
        in text
    )
    assert '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response>\n<tool_response>\n' in text


@pytest.mark.parametrize("template", QWEN_TEMPLATES)
def test_qwen_template_errors_match_transformers(tmp_path, template):
    ours, ref = _both(_folder(tmp_path, template))
    no_query = [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]
    string_args = [
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": '{"a": 1}'}}]},
    ]
    if template == "qwen3.5":
        with pytest.raises(MoerunError, match="No user query found"):
            ours.apply_chat_template(no_query)
        with pytest.raises(Exception, match="No user query found"):
            ref.apply_chat_template(no_query, tokenize=False)
        late_system = [{"role": "user", "content": "u"}, {"role": "system", "content": "s"}]
        with pytest.raises(MoerunError, match="System message must be at the beginning"):
            ours.apply_chat_template(late_system)
        with pytest.raises(Exception, match="System message must be at the beginning"):
            ref.apply_chat_template(late_system, tokenize=False)
        # Its `arguments|items` needs a mapping: a JSON string fails in both (a TypeError in transformers).
        with pytest.raises(MoerunError, match="mapping"):
            ours.apply_chat_template(string_args)
        with pytest.raises(TypeError, match="mapping"):
            ref.apply_chat_template(string_args, tokenize=False)
    else:
        # Qwen3 renders whatever it gets: no user turn at all, and string arguments verbatim.
        for messages in (no_query, string_args):
            assert ours.apply_chat_template(messages) == ref.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        assert '"arguments": {"a": 1}}' in ours.apply_chat_template(string_args)


def test_qwen_tokens_encode_and_decode_as_transformers(tmp_path):
    ours, ref = _both(_folder(tmp_path, "qwen3.5"))
    assert ours.vocab_size == len(ref) == TOKENIZER_VOCAB_SIZE
    assert ours.bos_token is ours.bos_token_id is ref.bos_token is None
    assert (ours.eos_token, ours.eos_token_id) == (ref.eos_token, ref.eos_token_id) == ("<|im_end|>", 2)
    text = "<think>\nhmm 🤔\n</think>\n\nHi<tool_call>\nx\n</tool_call><|im_end|><|endoftext|>"
    ids = ours.encode(text, add_special_tokens=False)
    assert ids == ref.encode(text, add_special_tokens=False) == ours.encode(text)
    assert ids[0] == 3 and 2 in ids  # <think> and <|im_end|> are single added tokens
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    # The think and tool tags are not special: a reply keeps them; the turn markers are dropped.
    assert ours.decode(ids) == "<think>\nhmm 🤔\n</think>\n\nHi<tool_call>\nx\n</tool_call>"


class _ScriptedLM:
    """The model's lm, but the next token is the next id of `script` (the real forward still runs,
    so the caches advance as in a real reply)."""

    def __init__(self, lm, script):
        self._lm, self._script = lm, list(script)
        self.lm_head = lm.lm_head

    def make_caches(self, *args, **kwargs):
        return self._lm.make_caches(*args, **kwargs)

    def __call__(self, input_ids, caches, position, **kwargs):
        logits = self._lm(input_ids, caches, position, **kwargs)
        forced = logits.new_full(logits.shape, -1e4)
        forced[..., self._script.pop(0)] = 0.0
        return forced


def test_qwen_reply_stops_at_im_end(tmp_path):
    """A Qwen checkpoint lists <|im_end|> and <|endoftext|> in generation_config.json: a chat reply
    through the Qwen3.5 template ends at <|im_end|>, and its text keeps the </think> tag."""
    torch = pytest.importorskip("torch")
    import moerun
    from tests.model_fixtures import make_checkpoint

    folder = make_checkpoint(tmp_path / "qwen", "qwen3_moe", dtype=torch.float32, shards=1, template="qwen3.5")
    tok = Tokenizer.from_dir(folder)
    im_end, endoftext = (tok.encode(t, add_special_tokens=False)[0] for t in ("<|im_end|>", "<|endoftext|>"))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [im_end, endoftext]}))
    model = moerun.load(str(folder), device="cpu", dtype="float32")
    assert {im_end, endoftext} <= model.eos_token_ids

    messages = [{"role": "user", "content": "Hello"}]
    prompt = model.encode_prompt(messages, chat=True)
    assert prompt == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert tok.decode(prompt, skip_special_tokens=False).endswith("<|im_start|>assistant\n<think>\n")
    reply = "The user greets.\n</think>\n\nHi there!"
    script = tok.encode(reply, add_special_tokens=False) + [im_end] + tok.encode(" more", add_special_tokens=False)
    model.lm = _ScriptedLM(model.lm, script)
    out = model.generate(messages, max_new_tokens=len(script) + 4)
    assert out.token_ids == script[: script.index(im_end) + 1]
    assert out.stats.finish_reason == "stop"
    assert out.text == reply
