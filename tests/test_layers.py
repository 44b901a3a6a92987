"""The shared layers against plain references: a sliding-window layer's ring of W
positions gives the attention of a full cache with the window mask, through prompts
longer than the window, chunked prefill, eager decode and static (CUDA-graph) steps;
each state's size is what its spec tells the planner."""

from __future__ import annotations

import torch

from moerun.layers import Attention, KVCache, SlidingKVCache, StaticPosition
from moerun.rope import Rotary, rope_parameters


def _attention(window: int) -> Attention:
    torch.manual_seed(0)
    rope = Rotary(rope_parameters({"rope_theta": 10000.0}), 8)
    attn = Attention(32, 4, 2, 8, rope, sliding_window=window)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    return attn.eval()


@torch.no_grad()
def test_ring_of_the_window_equals_a_full_cache():
    W, L = 5, 40
    attn = _attention(W)
    ring = attn.make_state(1, L, torch.float32, "cpu")
    full = KVCache(1, 2, L, 8, torch.float32, "cpu")
    assert isinstance(ring, SlidingKVCache) and ring.k.shape[2] == W
    x = torch.randn(1, 30, 32, generator=torch.Generator().manual_seed(1))
    chunks = [(0, 9), (9, 12), (12, 13), (13, 14), (14, 20)]  # longer than W, chunked, then one-token steps
    for a, b in chunks:
        torch.testing.assert_close(attn(x[:, a:b], ring, a), attn(x[:, a:b], full, a), rtol=1e-5, atol=1e-6)
    for t in range(20, 30):  # static steps: the position on the device, fixed shapes
        start = StaticPosition(torch.tensor([t]), span=32)
        torch.testing.assert_close(
            attn(x[:, t : t + 1], ring, start), attn(x[:, t : t + 1], full, start), rtol=1e-5, atol=1e-6
        )


def test_state_sizes_are_their_specs():
    for window in (None, 6):
        attn = _attention(window)
        state = attn.make_state(2, 100, torch.bfloat16, "cpu")
        assert state.nbytes == attn.state_spec().nbytes(100, 2, batch=2)
        state.k.fill_(1)
        state.reset()
        assert state.k.abs().sum() == 0
