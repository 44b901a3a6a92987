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
    "{}", ' { "a" : 1 }', '{"a": [1, -2.5e+3, 0, 0.25, true, false, null, "x"], "b": {"c": {}}}',
    '{"k\\u00e9\\n\\"": "Zürich ✓ 😀", "e": [], "n": -0E-0}', '{\n  "a": [\n    {"b": "c"}\n  ]\n}',
]  # fmt: skip
INVALID = [
    "[1]", '"x"', "{a: 1}", '{"a" 1}', '{"a": 1,}', '{"a": [1,]}', '{"a": 01}', '{"a": 1.}', '{"a": -}',
    '{"a": tru}', '{"a": "\\x"}', '{"a": "\x01"}', '{"a": 1}}', '{"a": 1} {}', '{"a": .5}', '{"a": "\\u12g4"}',
    '{"a":' + " " * 3 + "1}", "{\r}",
]  # fmt: skip


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
