"""The checks every architecture passes against transformers, in one place: each family's
test file calls them on its own tiny checkpoints."""

from __future__ import annotations

import torch

import moerun


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check_logits(ours, ref, vocab: int = 256) -> None:
    """float32 logits within 1e-4 relative error of the reference's, [2, 17] random ids."""
    ids = torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(ids).logits.float()
    got = ours.logits(ids)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert rel_err(got, expected) < 1e-4


def check_greedy_32(ours, ref, with_hf_generate: bool = True) -> list[int]:
    """32 greedy tokens equal to greedy full forwards of the reference (no cache anywhere),
    and to transformers' own generate() up to where it stops at its eos ids."""
    prompt = ours.tokenizer.encode("The quick brown fox")
    out = ours.generate(prompt, max_new_tokens=32, ignore_eos=True)
    assert len(out.token_ids) == 32 and out.stats.finish_reason == "length"
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(32):
            ids = torch.cat([ids, ref(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.token_ids == ids[0, len(prompt) :].tolist()
    if with_hf_generate:
        with torch.no_grad():
            hf = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt) :].tolist()
        assert out.token_ids[: len(hf)] == hf
    return out.token_ids


def check_kv_cache_decode(ours, vocab: int = 256) -> None:
    """Prefill 8 tokens, decode 12 one at a time: equal to one full forward of all 20."""
    lm = ours.lm
    ids = torch.randint(0, vocab, (1, 20), generator=torch.Generator().manual_seed(1))
    full = ours.logits(ids)
    caches = lm.make_caches(1, 20)
    with torch.no_grad():
        stepwise = [lm(ids[:, :8], caches, 0)]
        for t in range(8, 20):
            stepwise.append(lm(ids[:, t : t + 1], caches, t))
    assert rel_err(torch.cat(stepwise, dim=1), full) < 1e-5


def check_static_decode(ours, vocab: int = 256) -> None:
    """The CUDA-graph decode step (position on the device, attention over a fixed span of
    the cache), run eagerly through DecodeGraphs: equal to the ordinary decode, across a
    change of span bucket (16 -> 24, the cache's end), with garbage in the unused cache."""
    from moerun.graphs import DecodeGraphs

    lm = ours.lm
    ids = torch.randint(0, vocab, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        caches = lm.make_caches(1, 24)
        lm(ids[:, :8], caches, 0)
        expected = torch.cat([lm(ids[:, t : t + 1], caches, t) for t in range(8, 20)], dim=1)

        caches = lm.make_caches(1, 24)
        for cache in caches:  # stale entries past the position must be masked out
            for buffer in vars(cache).values():
                if isinstance(buffer, torch.Tensor):
                    buffer.normal_(0.0, 3.0, generator=torch.Generator().manual_seed(3))
        lm(ids[:, :8], caches, 0)
        graphs = DecodeGraphs(lm, caches, capture_graphs=False, min_span=4)
        got = torch.cat([graphs.step(int(ids[0, t]), t) for t in range(8, 20)], dim=1)
    assert not graphs.steps  # nothing captured off CUDA
    assert rel_err(got, expected) < 1e-5


def check_offloaded_4bit_equals_resident(folder) -> None:
    """4-bit experts with one slot per layer give the logits of 4-bit fully resident."""
    ids = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(5))
    expected = moerun.load(str(folder), bits=4, device="cpu").logits(ids)
    offloaded = moerun.load(str(folder), bits=4, device="cpu", expert_slots=1)
    assert rel_err(offloaded.logits(ids), expected) < 1e-6
    assert offloaded.stats["total"]["misses"] > 0
