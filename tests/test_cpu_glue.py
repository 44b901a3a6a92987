"""The decode-step glue in C (moerun/kernels/cpu_glue.py) against the torch code it stands
in for, on fresh random inputs: RMSNorm in every variant the families use, RoPE in every
layout, the router's rules. Bit for bit in float32 and bf16 (the kernels sum in torch's
orders and use its exp), ties in the router's top-k included."""

from __future__ import annotations

import pytest
import torch

from moerun.kernels import cpu_glue
from moerun.layers import RMSNorm
from moerun.models import gpt_oss, nemotron_h, qwen3_next
from moerun.moe.routing import Router
from moerun.rope import Rotary, rope_parameters

pytestmark = pytest.mark.skipif(
    cpu_glue._lib() is None or cpu_glue.lanes() is None,
    reason="the C kernels are not built, or torch's CPU kernels are not AVX2 / AVX-512 ones",
)

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _torch_path(monkeypatch, name: str):
    """Turn the C path `name` of cpu_glue off (its `..._usable` says no) for this test."""
    monkeypatch.setattr(cpu_glue, name, lambda *args: False)


def _same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want), f"{(got != want).sum().item()} of {want.numel()} differ"


# -- RMSNorm -----------------------------------------------------------------------------

NORMS = [RMSNorm, gpt_oss.Norm, nemotron_h.Norm, qwen3_next.ZeroCentredRMSNorm]


def _norm(cls, dim: int, dtype: torch.dtype, eps: float = 1e-6) -> RMSNorm:
    norm = cls(dim, eps)
    # zero-centred weights sit near 0, the others near 1
    norm.weight.data = (torch.randn(dim) * 0.2 + (0.0 if norm.weight_offset else 1.0)).to(dtype)
    return norm


@pytest.mark.parametrize("cls", NORMS, ids=lambda c: f"{c.__module__.split('.')[-1]}.{c.__name__}")
@pytest.mark.parametrize("x_dtype,w_dtype", [(a, b) for a in DTYPES for b in DTYPES])
@pytest.mark.parametrize("shape", [(1, 1, 2048), (1, 3, 1000), (4, 129), (1, 1, 7), (2, 1, 8, 128), (1, 4, 3, 64)])
def test_rms_norm_equals_the_torch_code(monkeypatch, cls, x_dtype, w_dtype, shape):
    """Head norms ([B, T, H, Dh]) too; the sizes cross torch's vector and cascade
    boundaries (7 < one vector, 129 a tail, 2048 several levels)."""
    norm = _norm(cls, shape[-1], w_dtype, eps=1e-5)
    x = (torch.randn(shape) * 3).to(x_dtype)
    assert cpu_glue.rms_norm_usable(x, norm.weight)
    got = norm(x)
    _torch_path(monkeypatch, "rms_norm_usable")
    _same(got, norm(x))


@pytest.mark.parametrize("D", [20000, 5120, 333])
def test_rms_norm_long_and_skewed_rows(monkeypatch, D):
    """Long rows (the cascade's deeper levels) and rows of very different magnitudes."""
    norm = _norm(RMSNorm, D, torch.bfloat16)
    x = torch.randn(3, D) * torch.logspace(-3, 3, D)
    for dtype in DTYPES:
        got = norm(x.to(dtype))
        with monkeypatch.context() as m:
            _torch_path(m, "rms_norm_usable")
            _same(got, norm(x.to(dtype)))


def test_rms_norm_leaves_prompts_and_autograd_to_torch():
    norm = _norm(RMSNorm, 64, torch.float32)
    assert not cpu_glue.rms_norm_usable(torch.randn(cpu_glue.MAX_NORM_ELEMENTS // 64 + 1, 64), norm.weight)
    assert not cpu_glue.rms_norm_usable(torch.randn(2, 64, dtype=torch.float16), norm.weight)
    assert not cpu_glue.rms_norm_usable(torch.randn(64, 2).t(), norm.weight)
    with torch.enable_grad():
        assert not cpu_glue.rms_norm_usable(torch.randn(2, 64), norm.weight)


# -- RoPE ----------------------------------------------------------------------------------

ROPES = {
    "rotate-half": ({"rope_type": "default", "rope_theta": 1e6}, {}),
    "partial-half (GLM)": ({"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}, {}),
    "partial-quarter": ({"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}, {}),
    "yarn": ({"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 256}, {}),
    "interleaved float32 (DeepSeek, Llama 4)": (
        {"rope_type": "default", "rope_theta": 1e4},
        {"interleaved": True, "float32": True},
    ),
    "interleaved (DeepSeek-V3 rope_interleave)": ({"rope_type": "default", "rope_theta": 1e4}, {"interleaved": True}),
}


@pytest.mark.parametrize("rope", ROPES, ids=list(ROPES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,T,head_dim", [(32, 4, 1, 128), (5, 1, 3, 72), (1, 1, 4, 64), (12, 12, 2, 96)])
def test_rope_equals_the_torch_code(rope, dtype, heads, kv_heads, T, head_dim):
    """q, k as the attention module hands them over: [B, T, H, Dh] projections seen as
    [B, H, T, Dh] (strided across heads)."""
    params, options = ROPES[rope]
    rotary = Rotary(rope_parameters(params), head_dim, 4096, **options)
    B = 2 if heads == 5 else 1
    q = torch.randn(B, T, heads, head_dim).to(dtype).transpose(1, 2)
    k = torch.randn(B, T, kv_heads, head_dim).to(dtype).transpose(1, 2)
    positions = torch.arange(300, 300 + T)
    assert cpu_glue.rope_usable(q, k, positions)
    got_q, got_k = rotary(q, k, positions)
    cos, sin = rotary.cos_sin(positions, dtype)
    _same(got_q, rotary.rotate(q, cos, sin))
    _same(got_k, rotary.rotate(k, cos, sin))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_on_latent_attention_shapes(dtype):
    """MLA: q's rope part a slice of the head, k's a [B, T, Dr] slice shared by the heads."""
    rotary = Rotary(rope_parameters({"rope_theta": 1e4}), 64, 4096, interleaved=True, float32=True)
    q = torch.randn(1, 2, 4, 128 + 64).to(dtype).transpose(1, 2)[..., 128:]  # [B, H, T, Dr]
    k = torch.randn(1, 2, 512 + 64).to(dtype)[..., 512:]
    positions = torch.tensor([7, 8])
    got_q, got_k = rotary(q, k, positions)
    cos, sin = rotary.cos_sin(positions, dtype)
    _same(got_q, rotary.rotate(q, cos, sin))
    _same(got_k, rotary.rotate(k, cos, sin))


def test_rope_step_cos_sin_follows_the_positions():
    """cos/sin are kept from one layer to the next: a new step (or dtype) computes them again."""
    rotary = Rotary(rope_parameters({"rope_theta": 1e4}), 32, 4096)
    q, k = torch.randn(1, 2, 1, 32), torch.randn(1, 1, 1, 32)
    for position in (5, 5, 6, 0):
        positions = torch.tensor([position])
        cos, sin = rotary.cos_sin(positions, q.dtype)
        _same(rotary(q, k, positions)[0], rotary.rotate(q, cos, sin))
    cos, sin = rotary.cos_sin(positions, torch.bfloat16)
    _same(rotary(q.bfloat16(), k.bfloat16(), positions)[0], rotary.rotate(q.bfloat16(), cos, sin))


# -- routing -------------------------------------------------------------------------------

# Each family's rule (moerun/models/*: make_router / moe_block), at small sizes.
ROUTERS = {
    "qwen3-moe": dict(n_experts=128, top_k=8, renormalize=True, weights_dtype="logits"),
    "qwen2-moe (no renormalise)": dict(n_experts=60, top_k=4, weights_dtype="logits"),
    "mixtral": dict(n_experts=8, top_k=2, renormalize=True),
    "deepseek-v2 (groups by max)": dict(
        n_experts=64, top_k=6, scaling=16.0, n_group=8, topk_group=3, group_score="max", float32_logits=True
    ),
    "deepseek-v3 / glm-4.5": dict(
        n_experts=256,
        top_k=8,
        scoring="sigmoid",
        renormalize=True,
        renorm_eps=1e-20,
        scaling=2.5,
        correction_bias=True,
        n_group=8,
        topk_group=4,
        group_score="top2_sum",
        float32_logits=True,
    ),
    "glm-4.5-air (one group)": dict(
        n_experts=128, top_k=8, scoring="sigmoid", renormalize=True, scaling=1.0, correction_bias=True
    ),
    "gpt-oss (gate bias)": dict(n_experts=32, top_k=4, renormalize=True, linear_bias=True, weights_dtype="logits"),
    "llama4 (sigmoid top-1)": dict(n_experts=16, top_k=1, scoring="sigmoid", weights_dtype="logits"),
    "ernie (clamped sum)": dict(
        n_experts=54, top_k=6, renormalize=True, renorm_min=1e-12, correction_bias=True, weights_dtype="input"
    ),
    "odd sizes": dict(n_experts=37, top_k=3, renormalize=True, scaling=2.5),
    # torch's sigmoid runs whole pairs of vectors, then the rest with std::exp
    "odd sizes, sigmoid": dict(n_experts=37, top_k=3, scoring="sigmoid", renormalize=True, correction_bias=True),
}


def _router(rule: dict, hidden: int = 48) -> Router:
    rule = dict(rule)
    router = Router(hidden, rule.pop("n_experts"), rule.pop("top_k"), **rule)
    router.weight.data = torch.randn_like(router.weight) * hidden**-0.5
    if router.bias is not None:
        router.bias.data = torch.randn_like(router.bias) * 0.1
    if router.e_score_correction_bias is not None:
        router.e_score_correction_bias.data = torch.rand_like(router.e_score_correction_bias) * 0.1
    return router


def _route_both(monkeypatch, router: Router, x: torch.Tensor):
    got = router(x)
    with monkeypatch.context() as m:
        _torch_path(m, "route_usable")
        want = router(x)
    return got, want


@pytest.mark.parametrize("rule", ROUTERS, ids=list(ROUTERS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 3, 4])
def test_router_equals_the_torch_code(monkeypatch, rule, dtype, tokens):
    router = _router(ROUTERS[rule]).to(dtype)
    for _ in range(5):
        x = torch.randn(tokens, router.weight.shape[1]).to(dtype)
        logits = router.logits(x)
        out_dtype = {"logits": logits.dtype, "input": x.dtype}.get(router.weights_dtype, torch.float32)
        assert router._glue_routes(logits, out_dtype)
        (got_ids, got_w), (want_ids, want_w) = _route_both(monkeypatch, router, x)
        _same(got_ids, want_ids)
        _same(got_w, want_w)


@pytest.mark.parametrize("rule", ["qwen3-moe", "deepseek-v2 (groups by max)", "deepseek-v3 / glm-4.5", "mixtral"])
def test_router_ties_in_torch_topk_order(monkeypatch, rule):
    """Logits from a handful of values: most of the picks are ties, and the experts come
    back in torch.topk's order among them (its std::nth_element + std::sort)."""
    router = _router(ROUTERS[rule])
    for _ in range(20):
        logits = torch.randint(-3, 4, (4, router.n_experts)).float() / 4
        monkeypatch.setattr(router, "logits", lambda x, logits=logits: logits)
        (got_ids, got_w), (want_ids, want_w) = _route_both(monkeypatch, router, torch.empty(4, 1))
        _same(got_ids, want_ids)
        _same(got_w, want_w)


def test_router_leaves_unreproduced_orders_to_torch(monkeypatch):
    """k * 64 <= E: torch.topk partial-sorts with a heap, which the kernel does not follow."""
    router = _router(dict(n_experts=128, top_k=2, renormalize=True))
    x = torch.randn(2, 48)
    assert cpu_glue.route(router.logits(x), 2, **_glue_rule(router), out_dtype=torch.float32) is None
    (got_ids, got_w), (want_ids, want_w) = _route_both(monkeypatch, router, x)
    _same(got_ids, want_ids)
    _same(got_w, want_w)


def _glue_rule(router: Router) -> dict:
    return dict(
        scoring=router.scoring,
        bias=router.e_score_correction_bias,
        n_group=router.n_group,
        topk_group=router.topk_group,
        group_score=router.group_score,
        renormalize=router.renormalize,
        renorm_eps=router.renorm_eps,
        renorm_min=router.renorm_min,
        scaling=router.scaling,
    )
