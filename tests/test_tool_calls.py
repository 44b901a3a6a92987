"""Tool-call parsing per format (moerun/tool_calls.py): each family's real chat template
renders an assistant turn that calls a tool; the text after the generation prompt is what
the model would write, and parsing it must give the calls back, whole and streamed at
every split. Special-token markers must survive decoding."""

from __future__ import annotations

import json

import pytest
import tokenizers

from moerun.models import get_architecture
from moerun.tokenizer import Tokenizer
from moerun.tool_calls import FORMATS, format_for, parse_reply
from tests.chat_templates import GPT_OSS_TEMPLATE, LLAMA4_TEMPLATE, MISTRAL_V3_TEMPLATE, MISTRAL_V13_TEMPLATE
from tests.tokenizer_fixtures import QWEN3_5_TEMPLATE, QWEN3_TEMPLATE, write_tokenizer

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "zip": {"type": "string"}},
            },
        },
    }
]
ARGS = {"city": "Zürich", "days": 3, "zip": "8001"}
# The calls every case parses, as the parsers return them.
WEATHER = {"name": "get_weather", "arguments": ARGS}
NOW = {"name": "now", "arguments": {}}
USER = [{"role": "user", "content": "weather?"}]


def _call(name="get_weather", args=ARGS, id_="a1b2c3d4e"):
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": args}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    write_tokenizer(path, template="mistral")  # bos <s>, eos </s>
    return path


def _tok(folder, template: str) -> Tokenizer:
    tok = Tokenizer.from_dir(folder)
    tok.chat_template = template
    return tok


def _reply(tok: Tokenizer, turn: dict, end: str, **kwargs) -> tuple[str, str]:
    """(the generation prompt, what the model writes after it to produce `turn`, its end-of-turn token cut)."""
    prompt = tok.apply_chat_template(USER, add_generation_prompt=True, **kwargs)
    full = tok.apply_chat_template(USER + [turn], add_generation_prompt=False, **kwargs)
    assert full.startswith(prompt), (prompt, full)
    reply = full[len(prompt) :]
    assert reply.rstrip().endswith(end), reply
    return prompt, reply.rstrip()[: -len(end)]


CASES = {
    # name: (format, template, assistant turn, end of turn, expected (content, reasoning, calls))
    "qwen3": (
        "qwen",
        QWEN3_TEMPLATE,
        {"role": "assistant", "content": "Let me look.", "tool_calls": [_call()]},
        "<|im_end|>",
        ("Let me look.", "", [WEATHER]),
    ),
    "qwen3-thinking": (
        "qwen",
        QWEN3_TEMPLATE,
        {
            "role": "assistant",
            "reasoning_content": "Paris? No, Zürich.",
            "content": "Let me look.",
            "tool_calls": [_call()],
        },
        "<|im_end|>",
        ("Let me look.", "Paris? No, Zürich.", [WEATHER]),
    ),
    # Thinking on: the prompt ends inside <think>, the reply closes it.
    "qwen3.5-xml": (
        "qwen",
        QWEN3_5_TEMPLATE,
        {"role": "assistant", "reasoning_content": "Zürich, 3 days.", "content": "", "tool_calls": [_call()]},
        "<|im_end|>",
        ("", "Zürich, 3 days.", [WEATHER]),
    ),
    "mistral-v3": (
        "mistral",
        MISTRAL_V3_TEMPLATE,
        {"role": "assistant", "tool_calls": [_call(), _call("now", {})]},
        "</s>",
        ("", "", [WEATHER, NOW]),
    ),
    "mistral-v13": (
        "mistral",
        MISTRAL_V13_TEMPLATE,
        {"role": "assistant", "content": "Sure.", "tool_calls": [_call(), _call("now", {})]},
        "</s>",
        ("Sure.", "", [WEATHER, NOW]),
    ),
    "harmony-call": (
        "harmony",
        GPT_OSS_TEMPLATE,
        {"role": "assistant", "thinking": "Need the weather.", "tool_calls": [_call()]},
        "<|call|>",
        ("", "Need the weather.", [WEATHER]),
    ),
    "harmony-final": (
        "harmony",
        GPT_OSS_TEMPLATE,
        {"role": "assistant", "thinking": "Easy.", "content": "It is sunny."},
        "<|return|>",
        ("It is sunny.", "Easy.", []),
    ),
    "llama4-json": (
        "llama4",
        LLAMA4_TEMPLATE,
        {"role": "assistant", "content": "", "tool_calls": [_call()]},
        "<|eot|>",
        ("", "", [WEATHER]),
    ),
}


def _streamed(fmt, text: str, cuts: list[int], prompt: str = ""):
    parser = fmt.parser(TOOLS, prompt)
    pieces, last = [], 0
    for cut in [*cuts, len(text)]:
        pieces += parser.feed(text[last:cut])
        last = cut
    rest, calls = parser.finish()
    pieces += rest
    content = "".join(t for k, t in pieces if k == "content")
    reasoning = "".join(t for k, t in pieces if k == "reasoning")
    return (content.strip() if calls else content), reasoning.strip(), calls


def _check(fmt, text, expected, prompt=""):
    whole = parse_reply(fmt, text, TOOLS, prompt)
    content, reasoning, calls = expected
    assert whole[2] == calls and whole[0].strip() == content and (reasoning is None or whole[1] == reasoning), whole
    # Streamed: split once at every character boundary, and one character at a time.
    for i in range(len(text) + 1):
        assert _streamed(fmt, text, [i], prompt) == whole, (i, text[:i])
    assert _streamed(fmt, text, list(range(len(text))), prompt) == whole


@pytest.mark.parametrize("case", list(CASES))
def test_parses_the_real_templates_tool_calls(folder, case):
    name, template, turn, end, expected = CASES[case]
    tok = _tok(folder, template)
    prompt, text = _reply(tok, turn, end, tools=TOOLS)
    _check(FORMATS[name], text, expected, prompt[-40:])


@pytest.mark.parametrize(
    "name, text, calls",
    [
        # What the models write themselves (their docs and vLLM's parsers), beside their templates' renderings.
        (
            "harmony",
            "<|channel|>analysis<|message|>Look it up.<|end|><|start|>assistant<|channel|>commentary "
            'to=functions.get_weather <|constrain|>json<|message|>{"city": "Zürich", "days": 3, "zip": "8001"}',
            [WEATHER],
        ),
        ("llama4", '[get_weather(city="Zürich", days=3, zip="8001"), now()]', [WEATHER, NOW]),
        ("llama4", '<|python_start|>[get_weather(city="Zürich", days=3, zip="8001")]<|python_end|>', [WEATHER]),
        (
            "llama4",
            '{"name": "get_weather", "parameters": {"city": "Zürich", "days": 3, "zip": "8001"}}; '
            '{"name": "now", "parameters": {}}',
            [WEATHER, NOW],
        ),
        (
            "mistral",
            '[TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{"city": "Zürich", "days": 3, "zip": "8001"}',
            [WEATHER],
        ),
        (
            "qwen",
            '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Zürich\\", \\"days\\": 3, '
            '\\"zip\\": \\"8001\\"}"}\n</tool_call>',  # arguments as a JSON string
            [WEATHER],
        ),
    ],
)
def test_parses_what_models_write(name, text, calls):
    _check(FORMATS[name], text, ("", None, calls))


@pytest.mark.parametrize(
    "name, text",
    [
        ("llama4", "Hello [1] is a citation, {not json}"),
        ("llama4", "[get_weather(city=os.system('x'))]"),  # not a literal: never evaluated, stays text
        ("mistral", "[TOOL_CALLS] [not json"),
        ("qwen", "<tool_call>\n<oops>\n</tool_call> after"),
        ("harmony", "<|channel|>final<|message|>Plain answer, no call."),
    ],
)
def test_text_that_is_no_call_stays_content(name, text):
    content, _, calls = parse_reply(FORMATS[name], text, TOOLS)
    assert calls == []
    if name == "harmony":
        assert content == "Plain answer, no call."
    else:
        assert content == text
    for i in range(len(text) + 1):
        assert _streamed(FORMATS[name], text, [i])[:1] == (content,)


def test_content_before_a_call_streams_out_at_once():
    parser = FORMATS["mistral"].parser(TOOLS)
    assert parser.feed("Let me check. [TOOL") == [("content", "Let me check. ")]
    assert parser.feed('_CALLS] [{"name": "now", "arguments": {}}]') == []
    assert parser.finish() == ([], [{"name": "now", "arguments": {}}])
    llama = FORMATS["llama4"].parser(TOOLS)
    assert llama.feed("[get_w") == []  # may still be a pythonic call: held
    assert llama.feed("eather is nice]") == [("content", "[get_weather is nice]")]
    harmony = FORMATS["harmony"].parser(TOOLS)
    assert harmony.feed("<|channel|>analysis<|message|>Hmm") == [("reasoning", "Hmm")]
    assert harmony.feed("<|end|><|start|>assistant<|channel|>final<|message|>Hi") == [("content", "Hi")]


def test_each_family_names_its_format():
    expect = {
        "mixtral": "mistral",
        "qwen3_moe": "qwen",
        "qwen3_5_moe": "qwen",
        "qwen2_moe": "qwen",
        "qwen3_next": "qwen",
        "gpt_oss": "harmony",
        "llama4": "llama4",
        "llama4_text": "llama4",
        "olmoe": None,
    }
    for family, name in expect.items():
        assert get_architecture(family).tool_call_format == name
        assert (format_for({"model_type": family}) or FORMATS.get(None)) is FORMATS.get(name)
    assert format_for({}) is None and format_for({"model_type": "nonesuch"}) is None


@pytest.mark.parametrize("case", ["mistral-v3", "harmony-call", "llama4-json"])
def test_special_token_markers_survive_decoding(folder, tmp_path, case):
    """The markers are special tokens in the real tokenizers: decoding for a parser keeps
    them (and still drops the other special tokens); plain decoding drops them."""
    name, template, turn, end, expected = CASES[case]
    fmt = FORMATS[name]
    backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    backend.add_special_tokens([tokenizers.AddedToken(m, special=True, normalized=False) for m in (*fmt.markers, end)])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": end}))
    tok = _tok(tmp_path, template)
    _, text = _reply(tok, turn, end, tools=TOOLS)
    ids = tok.encode(text + "</s>", add_special_tokens=False)  # another special token, to be dropped
    assert all(tok.token_to_id(m) in tok.special_ids for m in fmt.markers)

    def decode(decoder) -> str:
        return "".join(decoder.add(i) for i in ids) + decoder.flush()

    kept = decode(tok.stream_decoder(keep_special=fmt.markers))
    assert kept == text  # "</s>" dropped, the markers kept
    assert parse_reply(fmt, kept, TOOLS)[2] == expected[2]
    plain = decode(tok.stream_decoder())
    assert not any(m in plain for m in fmt.markers)
    if name != "llama4":  # (Llama 4's bare JSON is a call even without its python tags)
        assert parse_reply(fmt, plain, TOOLS)[2] == []
