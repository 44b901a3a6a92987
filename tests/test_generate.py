"""Sampling, stop conditions and streaming."""

from __future__ import annotations

import json

import pytest
import torch

import moerun
from moerun.errors import MoerunError
from moerun.generate import SamplingParams, sample
from tests.model_fixtures import make_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = make_checkpoint(tmp_path_factory.mktemp("gen"), "qwen3_moe", dtype=torch.float32, shards=1)
    return moerun.load(str(folder), device="cpu", dtype="float32")


def kept(logits: torch.Tensor, params: SamplingParams, draws: int = 400) -> set[int]:
    g = torch.Generator().manual_seed(0)
    return {sample(logits, params, g) for _ in range(draws)}


def test_greedy_is_argmax_and_degenerate_filters_are_greedy():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    best = int(logits.argmax())
    assert sample(logits, SamplingParams(), None) == best
    assert kept(logits, SamplingParams(temperature=1.0, top_k=1)) == {best}
    assert kept(logits, SamplingParams(temperature=1.0, top_p=1e-6)) == {best}


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.5), (8, 0.7)])
def test_filters_keep_the_same_tokens_as_transformers(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(40, generator=torch.Generator().manual_seed(1)) * 3
    ref = logits[None].clone()
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    allowed = set(torch.nonzero(ref[0] > float("-inf")).flatten().tolist())
    got = kept(logits, SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p), draws=3000)
    # Every sampled token is allowed; the allowed set is small enough to be fully seen.
    assert got == allowed


def test_temperature_sampling_follows_the_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample(logits, SamplingParams(temperature=0.5), g) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=4).float() / 4000
    assert torch.allclose(freq, torch.softmax(logits / 0.5, -1), atol=0.03)


def test_bad_sampling_values_are_refused():
    for kwargs in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2)):
        with pytest.raises(MoerunError):
            SamplingParams(**kwargs)


def test_seed_makes_sampling_reproducible(model):
    kwargs = dict(max_new_tokens=12, temperature=1.0, ignore_eos=True)
    a = model.generate("hello", seed=7, **kwargs).token_ids
    assert a == model.generate("hello", seed=7, **kwargs).token_ids
    assert any(model.generate("hello", seed=s, **kwargs).token_ids != a for s in (8, 9, 10))


def test_stream_pieces_add_up_to_generate(model):
    out = model.generate("stream me", max_new_tokens=10, ignore_eos=True)
    pieces = list(model.stream_generate("stream me", max_new_tokens=10, ignore_eos=True))
    assert "".join(p.text for p in pieces) == out.text
    assert [p.token_id for p in pieces] == out.token_ids
    assert all(p.stats is None for p in pieces[:-1])
    stats = pieces[-1].stats
    assert stats.generated_tokens == 10 and stats.finish_reason == "length"
    assert stats.prompt_tokens == len(model.tokenizer.encode("stream me"))
    assert stats.prompt_tps > 0 and stats.generation_tps > 0 and stats.peak_memory_bytes > 0


def test_stops_on_any_eos_id_from_generation_config(tmp_path):
    folder = make_checkpoint(tmp_path, "mixtral", dtype=torch.float32, shards=1)
    first = moerun.load(str(folder), device="cpu", dtype="float32").generate("x", max_new_tokens=1).token_ids[0]
    # A list of eos ids, as Qwen3 and Llama ship: the second one is what greedy emits first.
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [250, first]}))
    m = moerun.load(str(folder), device="cpu", dtype="float32")
    assert {250, first} <= m.eos_token_ids
    out = m.generate("x", max_new_tokens=20)
    assert out.token_ids == [first] and out.stats.finish_reason == "stop"
    assert out.text == ""  # the eos token that ended the reply is not rendered


def test_chat_prompt_goes_through_the_template(model):
    messages = [{"role": "user", "content": "hi"}]
    expected = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert model.encode_prompt("hi", chat=True) == expected
    assert model.encode_prompt(messages, chat=False) == expected
    assert model.encode_prompt("hi", chat=False) == model.tokenizer.encode("hi")
    assert model.encode_prompt([5, 6, 7], chat=True) == [5, 6, 7]


def test_context_limit(model):
    with pytest.raises(MoerunError, match="context"):
        model.generate([7] * 600, max_new_tokens=4)
    out = model.generate([7] * 500, max_new_tokens=100, ignore_eos=True)
    # Positions 500..511 take the fed tokens; the token sampled from position 511 needs
    # no cache slot, so 13 tokens come out of a 512-token context.
    assert len(out.token_ids) == 512 - 500 + 1 and out.stats.finish_reason == "length"


def test_the_planned_context_binds(tmp_path):
    """Loaded for ctx=64, generation never grows the state: a prompt that leaves no room is
    refused before prefill, and a reply stops when the 64 positions are full."""
    folder = make_checkpoint(tmp_path, "qwen3_moe", dtype=torch.float32, shards=1)
    model = moerun.load(str(folder), device="cpu", dtype="float32", ctx=64)
    caches = model.kv_caches
    assert [c.max_len for c in caches] == [64] * len(caches) and model.plan.ctx == 64
    assert sum(c.nbytes for c in caches) == model.plan.kv_cache_bytes  # the plan is what the layers allocate
    with pytest.raises(MoerunError, match="planned context is 64"):
        model.generate([7] * 64, max_new_tokens=1)
    out = model.generate([7] * 50, max_new_tokens=100, ignore_eos=True)
    assert len(out.token_ids) == 64 - 50 + 1 and out.stats.finish_reason == "length"
    assert model.kv_caches is caches and all(c.max_len == 64 for c in model.kv_caches)
