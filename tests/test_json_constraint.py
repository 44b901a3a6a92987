"""JSON mode (moerun/json_constraint.py): the prefix automaton against json.loads, the
token picker on the demo's real tokenizer with chosen logits, and a real generation."""

from __future__ import annotations

import json

import pytest
import torch

from moerun.generate import SamplingParams
from moerun.json_constraint import JSONConstraint, JSONPrefix
from moerun.registry import DEMO_DIR
from moerun.tokenizer import Tokenizer

VALID = [
    "{}",
    ' { "a" : 1 }',
    '{"a": [1, -2.5e+3, 0, 0.25, true, false, null, "x"], "b": {"c": {}}}',
    '{"k\\u00e9\\n\\"": "Zürich ✓ 😀", "e": [], "n": -0E-0}',
    '{\n  "a": [\n    {"b": "c"}\n  ]\n}',
]
INVALID = [
    "[1]",
    '"x"',
    "{a: 1}",
    '{"a" 1}',
    '{"a": 1,}',
    '{"a": [1,]}',
    '{"a": 01}',
    '{"a": 1.}',
    '{"a": -}',
    '{"a": tru}',
    '{"a": "\\x"}',
    '{"a": "\x01"}',
    '{"a": 1}}',
    '{"a": 1} {}',
    '{"a": .5}',
    '{"a": "\\u12g4"}',
    '{"a":' + " " * 3 + "1}",
    "{\r}",
]


@pytest.mark.parametrize("doc", VALID)
def test_every_prefix_of_valid_json_is_accepted_and_complete_only_at_the_end(doc):
    data = doc.encode()
    state = JSONPrefix()
    for i, b in enumerate(data):
        assert not state.complete, doc[:i]
        assert state.feed(bytes([b])), (doc[:i], doc[i:])
    assert state.complete
    assert isinstance(json.loads(doc), dict)


@pytest.mark.parametrize("doc", INVALID)
def test_invalid_json_is_refused(doc):
    state = JSONPrefix()
    assert not (state.feed(doc.encode()) and state.complete)


def test_utf8_inside_strings_is_checked():
    assert JSONPrefix().feed('{"a": "é'.encode())
    assert not JSONPrefix().feed(b'{"a": "\xc3\x28')  # a lead byte without its continuation
    assert not JSONPrefix().feed(b'{"a": "\xff')


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(DEMO_DIR)


def _logits(tok, ranked: list[int]) -> torch.Tensor:
    """Logits where `ranked` come first, in that order, and all else after."""
    logits = torch.full((tok.vocab_size,), -1e4)
    for r, t in enumerate(ranked):
        logits[t] = 100.0 - r
    return logits


def test_token_bytes_are_exact(tok):
    for i in range(tok.vocab_size):
        data = tok.token_bytes(i)
        if i in tok.special_ids:
            assert data is None
        else:
            assert data == tok.decode([i]).encode() or b"\xef\xbf\xbd" in tok.decode([i]).encode()


def test_greedy_takes_the_likeliest_token_that_keeps_json(tok):
    eos = tok.eos_token_id
    c = JSONConstraint(tok, {eos})
    greedy = SamplingParams()
    x, brace, close = tok.encode("x", False)[0], tok.encode("{", False)[0], tok.encode("}", False)[0]
    # eos and "x" are likelier, but only "{" can start the object.
    assert c.pick(_logits(tok, [eos, x, brace, close]), greedy, None) == brace
    assert c.pick(_logits(tok, [eos, x, close]), greedy, None) == close  # eos only once complete
    assert c.state.complete
    assert c.pick(_logits(tok, [x]), greedy, None) == eos  # complete: eos at once
    # A token far down the ranking is found when the top ones are all refused.
    c = JSONConstraint(tok, {eos})
    refused = [t for t in range(tok.vocab_size) if not (tok.token_bytes(t) and JSONPrefix().feed(tok.token_bytes(t)))]
    assert len(refused) > 300
    ranked = refused + [brace]
    assert c.pick(_logits(tok, ranked), greedy, None) == brace


def test_sampling_redraws_until_the_token_fits(tok):
    eos = tok.eos_token_id
    brace = tok.encode("{", False)[0]
    x = tok.encode("x", False)[0]
    params = SamplingParams(temperature=1.0, seed=0)
    for seed in range(5):
        c = JSONConstraint(tok, {eos})
        logits = torch.full((tok.vocab_size,), -30.0)
        logits[x], logits[brace] = 5.0, 0.0  # "x" drawn nearly always, and refused
        assert c.pick(logits, params, torch.Generator().manual_seed(seed)) == brace


def test_demo_replies_with_json(tmp_path):
    import moerun

    model = moerun.load("demo", device="cpu")
    out = model.generate([{"role": "user", "content": "count from 7"}], max_new_tokens=40, json_mode=True)
    assert out.stats.finish_reason == "stop"
    assert isinstance(json.loads(out.text), dict)
    free = model.generate([{"role": "user", "content": "count from 7"}], max_new_tokens=40)
    assert free.text == "7 8 9 10 11 12 13 14"  # the same model unconstrained: not JSON


def test_token_bytes_of_a_sentencepiece_style_tokenizer(tmp_path):
    """Mixtral's and Llama 2's tokenizers: `▁` for a space and <0xNN> byte-fallback pieces."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<0xC3>": 3, "<0xA9>": 4, "▁{": 5, '"a"': 6, "▁": 7, ":": 8, "}": 9}
    backend = Backend(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens(["<s>", "</s>"])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tok = Tokenizer.from_dir(tmp_path)
    assert [tok.token_bytes(i) for i in range(10)] == [
        b"<unk>",
        None,
        None,
        b"\xc3",
        b"\xa9",
        b" {",
        b'"a"',
        b" ",
        b":",
        b"}",
    ]
    state = JSONPrefix()
    assert state.feed(b"".join(tok.token_bytes(i) for i in (5, 7, 6, 8, 7, 6, 9))) and state.complete  # ' { "a": "a"}'
