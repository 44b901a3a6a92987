"""Prefix reuse: the Model's states keep the last sequence, and a prompt that starts with
it is prefilled only past the common prefix, with the logits of a fresh prefill. States
that cannot be rewound (sliding-window rings here) reuse only a whole held sequence."""

from __future__ import annotations

import pytest
import torch

import moerun
from moerun import generate
from moerun.chat import ChatSession
from tests.model_fixtures import make_checkpoint
from tests.test_deepseek import MLA


@pytest.fixture(scope="module")
def demo():
    return moerun.load("demo", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def fresh_demo():
    return moerun.load("demo", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    folder = make_checkpoint(tmp_path_factory.mktemp("reuse"), "qwen3_moe", dtype=torch.float32, shards=1)
    return moerun.load(str(folder), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def ring(tmp_path_factory):
    # A window of 8 positions, far below the planned context: every layer keeps a ring.
    folder = make_checkpoint(
        tmp_path_factory.mktemp("ring"), "mixtral", dtype=torch.float32, shards=1, sliding_window=8
    )
    return moerun.load(str(folder), device="cpu", dtype="float32", ctx=128)


def fresh(model, prompt, **kwargs):
    model.forget_prefix()
    return model.generate(prompt, **kwargs)


class Logits:
    """Records the logits each token was picked from, on the real generation path."""

    def __init__(self, monkeypatch):
        self.rows: list[torch.Tensor] = []
        real = generate._next_token

        def spy(logits, params, gen):
            self.rows.append(logits.detach().float().clone())
            return real(logits, params, gen)

        monkeypatch.setattr(generate, "_next_token", spy)

    def take(self) -> list[torch.Tensor]:
        rows, self.rows = self.rows, []
        return rows


def check_reuse_equals_fresh(
    model, spy: Logits, prompt: list[int], reused: int, max_new_tokens: int, tol: float = 1e-5
) -> None:
    """generate(prompt) reuses `reused` held tokens and prefills the rest, and picks the
    tokens a fresh prefill picks, from the same logits (within tol)."""
    got = model.generate(prompt, max_new_tokens=max_new_tokens, ignore_eos=True)
    assert got.stats.reused_tokens == reused and got.stats.prefilled_tokens == len(prompt) - reused
    rows = spy.take()
    want = fresh(model, prompt, max_new_tokens=max_new_tokens, ignore_eos=True)
    assert got.token_ids == want.token_ids
    for a, b in zip(rows, spy.take()):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_three_turn_chat_prefills_only_the_new_tokens(demo, fresh_demo):
    session = ChatSession(demo, max_new_tokens=32)
    demo.forget_prefix()
    turns = ["count from 7", "count down from 30", "reverse: robot"]
    for i, text in enumerate(turns):
        held = list(demo.cached_ids)
        reply = session.send(text)
        stats = session.last_stats
        prompt = demo.encode_prompt(session.messages()[:-1], chat=True)
        assert stats.prompt_tokens == len(prompt) == stats.reused_tokens + stats.prefilled_tokens
        if i == 0:
            assert stats.reused_tokens == 0
        else:
            # Everything the states held (last prompt + reply, less the eos never fed back) is reused.
            assert held == prompt[: len(held)] and stats.reused_tokens == len(held)
            assert stats.prefilled_tokens == len(prompt) - len(held) < len(prompt) / 2
        want = fresh(fresh_demo, session.messages()[:-1], max_new_tokens=32)
        assert want.stats.reused_tokens == 0
        assert reply == want.text
    assert [m["content"] for m in session.history[1::2]] == ["7 8 9 10 11 12 13 14", "30 29 28 27 26 25 24 23", "tobor"]


def test_reused_logits_equal_a_fresh_prefill(qwen, monkeypatch):
    spy = Logits(monkeypatch)
    first = [5, 9, 17, 33, 2, 41, 8, 12]
    out = qwen.generate(first, max_new_tokens=6, ignore_eos=True)
    spy.take()
    for prompt, reused in [
        (first + out.token_ids + [7, 7, 3], len(first) + 5),  # extends all that is held
        (first[:5] + [60, 61, 62], 5),  # diverges: the full KV cache is cut back
        (first[:5] + [60, 61, 62], 7),  # the same prompt again: all but its last token
    ]:
        check_reuse_equals_fresh(qwen, spy, prompt, reused, max_new_tokens=4)
    # reuse_prefix=False prefills from 0.
    assert qwen.generate(prompt, max_new_tokens=2, reuse_prefix=False).stats.reused_tokens == 0


def test_rings_reuse_only_a_whole_held_sequence(ring, monkeypatch):
    assert not generate._rewindable(ring.kv_caches)
    spy = Logits(monkeypatch)
    first = list(range(10, 30))  # longer than the window: the ring has wrapped
    out = ring.generate(first, max_new_tokens=5, ignore_eos=True)
    held = first + out.token_ids[:-1]
    assert ring.cached_ids == held
    spy.take()
    extended = held + [3, 4, 5]
    check_reuse_equals_fresh(ring, spy, extended, len(held), max_new_tokens=4)
    # A prompt that shares only part of the held sequence cannot rewind a ring: from 0.
    diverged = extended[:15] + [9, 9]
    got = ring.generate(diverged, max_new_tokens=3, ignore_eos=True)
    assert got.stats.reused_tokens == 0
    assert got.token_ids == fresh(ring, diverged, max_new_tokens=3, ignore_eos=True).token_ids


def test_a_closed_generator_leaves_what_it_computed(qwen):
    qwen.forget_prefix()
    prompt = [4, 8, 15, 16, 23, 42]
    stream = qwen.stream_generate(prompt, max_new_tokens=20, ignore_eos=True)
    first = [next(stream).token_id for _ in range(3)]
    stream.close()
    # The prompt and the two tokens fed back are in the states; the third was never fed.
    assert qwen.cached_ids == prompt + first[:2]
    got = qwen.generate(prompt + first + [1], max_new_tokens=3, ignore_eos=True)
    assert got.stats.reused_tokens == len(prompt) + 2
    assert got.token_ids == fresh(qwen, prompt + first + [1], max_new_tokens=3, ignore_eos=True).token_ids


def test_new_caches_hold_nothing(qwen):
    qwen.generate([3, 4, 5, 6], max_new_tokens=2)
    qwen.kv_caches = qwen.lm.make_caches(1, qwen.plan.ctx)
    assert qwen.reusable_tokens([3, 4, 5, 6, 7]) == 0
    assert qwen.generate([3, 4, 5, 6, 7], max_new_tokens=2).stats.reused_tokens == 0


def test_greedy_picks_on_the_device(qwen, monkeypatch):
    # Greedy never goes through the host-side sampler (which copies the vocabulary over).
    def boom(*args, **kwargs):
        raise AssertionError("greedy decoding called the host sampler")

    monkeypatch.setattr(generate, "sample", boom)
    out = qwen.generate([5, 6, 7], max_new_tokens=4, ignore_eos=True)
    assert len(out.token_ids) == 4
    with pytest.raises(AssertionError, match="host sampler"):
        qwen.generate([5, 6, 7], max_new_tokens=2, temperature=1.0, seed=1)


def test_mla_latents_rewind_like_kv(tmp_path, monkeypatch):
    mla = dict(MLA, q_lora_rank=None, n_shared_experts=2, topk_method="greedy")  # DeepSeek-V2-Lite's shape
    folder = make_checkpoint(tmp_path, "deepseek_v2", dtype=torch.float32, shards=1, **mla)
    model = moerun.load(str(folder), device="cpu", dtype="float32", ctx=64)
    assert generate._rewindable(model.kv_caches)
    spy = Logits(monkeypatch)
    first = [5, 9, 17, 33, 2, 41]
    model.generate(first, max_new_tokens=4, ignore_eos=True)
    spy.take()
    check_reuse_equals_fresh(model, spy, first[:4] + [11, 12], 4, max_new_tokens=3)


def test_recurrent_hybrid_reuses_only_a_whole_held_sequence(tmp_path, monkeypatch):
    try:  # the family's own fixture (Gated DeltaNet + attention layers)
        from tests.test_qwen3_next import make_qwen3_next
    except ImportError as e:
        pytest.skip(f"no Qwen3-Next fixture: {e}")
    model = moerun.load(
        str(make_qwen3_next(tmp_path, dtype=torch.float32, shards=1)), device="cpu", dtype="float32", ctx=64
    )
    assert not generate._rewindable(model.kv_caches)
    spy = Logits(monkeypatch)
    first = [5, 9, 17, 33, 2, 41, 8, 12]
    out = model.generate(first, max_new_tokens=5, ignore_eos=True)
    spy.take()
    extended = first + out.token_ids + [7, 3]
    check_reuse_equals_fresh(model, spy, extended, len(first) + 4, max_new_tokens=4, tol=1e-4)
    diverged = first[:4] + [60, 61]
    got = model.generate(diverged, max_new_tokens=3, ignore_eos=True)
    assert got.stats.reused_tokens == 0
    assert got.token_ids == fresh(model, diverged, max_new_tokens=3, ignore_eos=True).token_ids
