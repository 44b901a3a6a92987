"""The one RoPE module against transformers: every scaling variant's cos/sin equal to
LlamaRotaryEmbedding's (which implements them all) at lengths inside and past the
original context, and the rotations (rotate-half, interleaved pairs, partial) equal to
plain references on fresh random inputs."""

from __future__ import annotations

import pytest
import torch

from moerun.rope import Rotary, rope_parameters
from tests.model_fixtures import LLAMA3_ROPE

HEAD_DIM, MAX_POS = 16, 32
VARIANTS = {
    "default": dict(rope_type="default", rope_theta=10000.0),
    "linear": dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
    "dynamic": dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0),
    "yarn": dict(rope_type="yarn", rope_theta=10000.0, factor=2.0, original_max_position_embeddings=16),
    "llama3": dict(LLAMA3_ROPE, original_max_position_embeddings=16),
    "longrope": dict(
        rope_type="longrope",
        rope_theta=10000.0,
        short_factor=[1.0 + 0.1 * i for i in range(8)],
        long_factor=[2.0 + 0.3 * i for i in range(8)],
        original_max_position_embeddings=16,
    ),
}


@pytest.mark.parametrize("kind", list(VARIANTS))
@pytest.mark.parametrize("length", [10, 40])  # inside, and past, the original context
def test_cos_sin_equal_transformers(kind, length):
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = transformers.LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POS,
        rope_parameters=dict(VARIANTS[kind]),
    )
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1, length, HEAD_DIM), torch.arange(length)[None])
    rotary = Rotary(
        rope_parameters({"rope_parameters": VARIANTS[kind], "max_position_embeddings": MAX_POS}), HEAD_DIM, MAX_POS
    )
    got_cos, got_sin = rotary.cos_sin(torch.arange(length), torch.float32)
    torch.testing.assert_close(got_cos, cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(got_sin, sin[0], rtol=0, atol=1e-6)


def test_dynamic_and_longrope_change_past_the_original_length():
    for kind in ("dynamic", "longrope"):
        rotary = Rotary(
            rope_parameters({"rope_parameters": VARIANTS[kind], "max_position_embeddings": MAX_POS}), HEAD_DIM, MAX_POS
        )
        short = rotary.cos_sin(torch.arange(10), torch.float32)[0]
        long = rotary.cos_sin(torch.arange(40), torch.float32)[0][:10]
        assert (short - long).abs().max() > 1e-3, kind


def _reference_rotation(x, positions, theta, dim, interleaved):
    """Plain RoPE over the first `dim` dims: pairs (x[2i], x[2i+1]) as complex numbers, or
    (x[i], x[i + dim/2]) for rotate-half."""
    inv = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)
    angles = positions.float()[:, None] * inv[None]  # [T, dim/2]
    rot = x[..., :dim]
    a, b = (rot[..., 0::2], rot[..., 1::2]) if interleaved else rot.chunk(2, dim=-1)
    ra, rb = a * angles.cos() - b * angles.sin(), b * angles.cos() + a * angles.sin()
    return torch.cat([ra, rb], dim=-1), x[..., dim:]


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_rotation_equals_a_plain_reference(interleaved, partial):
    params = rope_parameters({"rope_theta": 1000.0, "partial_rotary_factor": partial})
    rotary = Rotary(params, HEAD_DIM, interleaved=interleaved, float32=True)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 7, HEAD_DIM, generator=g), torch.randn(2, 2, 7, HEAD_DIM, generator=g)
    positions = torch.arange(5, 12)
    rq, rk = rotary(q, k, positions)
    dim = int(HEAD_DIM * partial)
    for got, x in ((rq, q), (rk, k)):
        rotated, rest = _reference_rotation(x, positions, 1000.0, dim, interleaved)
        # Interleaved pairs come out de-interleaved (evens, then odds): the same rotation,
        # its dims permuted alike for queries and keys.
        torch.testing.assert_close(got[..., :dim], rotated, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[..., dim:], rest)
    # Attention scores, which are what the model sees, are those of the un-permuted rotation.
    if interleaved:
        inv = 1.0 / 1000.0 ** (torch.arange(0, dim, 2).float() / dim)
        cis = torch.polar(torch.ones(7, dim // 2), positions.float()[:, None] * inv)
        cq = torch.view_as_real(torch.view_as_complex(q[..., :dim].reshape(2, 4, 7, -1, 2)) * cis).flatten(3)
        ck = torch.view_as_real(torch.view_as_complex(k[..., :dim].reshape(2, 2, 7, -1, 2)) * cis).flatten(3)
        torch.testing.assert_close(
            rq[:, :2, ..., :dim] @ rk[..., :dim].transpose(-1, -2),
            cq[:, :2] @ ck.transpose(-1, -2),
            rtol=1e-4,
            atol=1e-4,
        )
