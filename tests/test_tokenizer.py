"""moerun.tokenizer held against transformers' AutoTokenizer (the oracle, test-time only)."""

from __future__ import annotations

import json
import warnings

import pytest

from moerun.errors import MoerunError
from moerun.tokenizer import Tokenizer
from tests.tokenizer_fixtures import TOKENIZER_VOCAB_SIZE, write_tokenizer

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


def test_no_template_falls_back_with_one_warning(tmp_path):
    ours = Tokenizer.from_dir(_folder(tmp_path, None))
    assert not ours.has_chat_template
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    with pytest.warns(UserWarning, match="no chat template"):
        text = ours.apply_chat_template(messages)
    assert text == "user: hi\nassistant: yo\nassistant: "
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per tokenizer, not per call
        assert ours.apply_chat_template(messages, add_generation_prompt=False) == "user: hi\nassistant: yo\n"
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
