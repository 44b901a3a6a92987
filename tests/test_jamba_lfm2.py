"""Jamba (Mamba + attention without positions + MoE) and LFM2-MoE (gated short
convolutions + attention with q/k norm + MoE) held against transformers on tiny random
checkpoints saved by it (sharded, bf16), with the quirks on: Jamba's layer pattern from
its periods and offsets (Mamba with a dense MLP, Mamba with MoE, attention with a dense
MLP), projection and conv biases, an unrenormalised router; LFM2's conv/attention
pattern, a dense first layer, sigmoid routing with an expert bias, renormalised and
scaled, conv biases. The vectors transformers initialises to constants (A_log, D, dt
bias, conv biases, norms, the expert bias) are randomised.

Here: every check the family table runs, and what only recurrent layers have: a prefill
longer than the scan's chunk equals token-by-token decode (and a multi-token
continuation), and the state the planner counts is what the layers allocate (float32
Mamba state under a bf16 model included). The makers are the family table's rows."""

from __future__ import annotations

import pytest
import torch

import moerun
from moerun.models.base import SparseMoeBlock
from moerun.recurrent.mamba import MambaMixer, scan_chunk
from tests.model_fixtures import checkpoint_headers, family_fixtures, make_checkpoint, reference_model, set_tensors
from tests.parity import rel_err

JAMBA = dict(
    num_hidden_layers=4,  # mamba+MLP, mamba+MoE, attention+MLP, mamba+MoE
    attn_layer_period=4,
    attn_layer_offset=2,
    expert_layer_period=2,
    expert_layer_offset=1,
    num_experts=4,
    num_experts_per_tok=2,
    mamba_d_state=8,
    mamba_d_conv=4,
    mamba_expand=2,  # inner 128; dt rank "auto": 4
    mamba_proj_bias=True,
)
LFM2 = dict(
    num_hidden_layers=4,  # conv+MLP, conv+MoE, attention+MoE, conv+MoE
    layer_types=["conv", "conv", "full_attention", "conv"],
    num_dense_layers=1,
    num_experts=6,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    norm_topk_prob=True,
    routed_scaling_factor=1.5,
    use_expert_bias=True,
    conv_bias=True,
)


def _perturb(folder) -> None:
    """transformers initialises biases to zeros, norms and D to ones, A_log to log(1..N);
    real ones are not, and a model that dropped or misplaced them would pass."""
    g = torch.Generator().manual_seed(7)
    headers = checkpoint_headers(folder)
    values = {}
    for name, (shape, _) in headers.items():
        shape = tuple(shape)
        if name.endswith(".A_log"):  # decays from fast to slow, not all alike
            n = torch.arange(1, shape[1] + 1, dtype=torch.float32).log()
            values[name] = n.expand(shape) + 0.3 * torch.randn(shape, generator=g)
        elif name.endswith(".D"):
            values[name] = 1.0 + 0.5 * torch.randn(shape, generator=g)
        elif name.endswith("dt_proj.bias"):  # softplus of it: steps from ~0.1 to ~1
            values[name] = -1.0 + 0.7 * torch.randn(shape, generator=g)
        elif name.endswith("expert_bias"):
            values[name] = 0.2 * torch.randn(shape, generator=g)
        elif name.endswith(".bias"):
            values[name] = 0.3 * torch.randn(shape, generator=g)
        elif len(shape) == 1 and name.endswith("norm.weight"):
            values[name] = 1.0 + 0.3 * torch.randn(shape, generator=g)
    set_tensors(folder, {name: value.to(headers[name][1]) for name, value in values.items()})


def make_jamba(folder):
    folder = make_checkpoint(folder, "jamba", dtype=torch.bfloat16, shards=2, **JAMBA)
    _perturb(folder)
    return folder


def make_lfm2_moe(folder):
    folder = make_checkpoint(folder, "lfm2_moe", dtype=torch.bfloat16, shards=2, **LFM2)
    _perturb(folder)
    return folder


MAKERS = {"jamba": make_jamba, "lfm2_moe": make_lfm2_moe}


pytestmark = pytest.mark.usefixtures("private_cache")
checkpoint, pair = family_fixtures(MAKERS)


# -- the checks every family passes --------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_plan_counts_the_state_the_layers_allocate(checkpoint, dtype):
    model = moerun.load(str(checkpoint[1]), device="cpu", dtype=dtype, ctx=48)
    assert model.plan.total_params == model.num_parameters
    states = [c for c in model.kv_caches if c is not None]
    assert states and all(c.max_len == 48 for c in states)
    assert sum(c.nbytes for c in model.kv_caches if c is not None) == model.plan.kv_cache_bytes
    kinds = {type(layer.mixer).__name__ for layer in model.lm.model.layers}
    assert len(kinds) == 2  # a recurrent mixer beside attention
    for layer, state in zip(model.lm.model.layers, model.kv_caches):
        if isinstance(layer.mixer, MambaMixer):  # float32 whatever the model's dtype, as the reference
            assert all(t.dtype == torch.float32 for t in state.buffers())


# -- recurrent layers: prefill (a chunked scan) against decode (the recurrence) ------------


def test_prefill_longer_than_a_chunk_equals_token_by_token_decode(pair, monkeypatch):
    monkeypatch.setattr(MambaMixer, "chunk_size", 4)  # 23 positions: 5 chunks, the last partial
    lm = pair[2].lm
    ids = torch.randint(0, 256, (1, 23), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        full = lm(ids, lm.make_caches(1, 32), 0)
        caches = lm.make_caches(1, 32)
        steps = torch.cat([lm(ids[:, t : t + 1], caches, t) for t in range(23)], dim=1)
        caches = lm.make_caches(1, 32)  # several tokens continuing a state: the scan from it
        pieces = torch.cat([lm(ids[:, :6], caches, 0), lm(ids[:, 6:17], caches, 6), lm(ids[:, 17:], caches, 17)], dim=1)
    assert rel_err(steps, full) < 1e-5
    assert rel_err(pieces, full) < 1e-5


@pytest.mark.parametrize("length", [1, 2, 8, 64])
def test_the_chunk_scan_is_the_recurrence(length):
    g = torch.Generator().manual_seed(length)
    a = torch.rand(2, 3, length, 5, generator=g)
    b, h0 = torch.randn(2, 3, length, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    h, expected = h0, []
    for t in range(length):
        h = a[:, :, t] * h + b[:, :, t]
        expected.append(h)
    got = scan_chunk(a.clone(), b.clone(), h0)
    assert torch.allclose(got, torch.stack(expected, dim=2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 3, 5, 128])
def test_a_mamba_prefill_in_any_chunk_size_is_its_decode(chunk, monkeypatch):
    monkeypatch.setattr(MambaMixer, "chunk_size", chunk)
    torch.manual_seed(0)
    m = MambaMixer(16, 32, 4, 4, 2, conv_bias=True, proj_bias=True, bcdt_norm_eps=1e-6)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
        m.A_log.add_(torch.arange(1, 5).log())
    x = torch.randn(2, 13, 16)
    with torch.no_grad():
        full = m(x, m.make_state(2, 16, torch.float32, "cpu"), 0)
        state = m.make_state(2, 16, torch.float32, "cpu")
        steps = torch.cat([m(x[:, t : t + 1], state, t) for t in range(13)], dim=1)
    assert rel_err(full, steps) < 1e-5


def test_a_new_sequence_ignores_the_state_left_behind(pair):
    lm = pair[2].lm
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        fresh = lm(ids, lm.make_caches(1, 16), 0)
        caches = lm.make_caches(1, 16)
        lm(torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(13)), caches, 0)
        assert torch.equal(lm(ids, caches, 0), fresh)


# -- the quirks are exercised ----------------------------------------------------------------


def test_the_routing_quirks_change_the_logits(checkpoint):
    """Jamba's router does not renormalise its top-k; LFM2's expert bias moves the choice:
    a model that got either wrong would not match the reference."""
    ours = moerun.load(str(checkpoint[1]), device="cpu", dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    expected = ours.logits(ids)
    for layer in ours.lm.model.layers:
        if isinstance(layer.ffn, SparseMoeBlock):
            if layer.ffn.router.e_score_correction_bias is None:
                layer.ffn.router.renormalize = True
            else:
                layer.ffn.router.e_score_correction_bias.data.zero_()
    assert rel_err(ours.logits(ids), expected) > 1e-2


@pytest.mark.parametrize("family", ["jamba", "lfm2_moe"])
def test_in_bf16_rounds_and_routes_as_transformers(family, tmp_path_factory):
    """In bf16 the prefill logits agree far below bf16's own error (~5% against float32
    here). Jamba: the Mamba mixer follows the reference's dtypes step by step (the scan in
    float32, C.h and the conv in the activations' dtype, out_proj over the same layout).
    LFM2: the reference takes the sigmoid of the bf16 router logits, picks and renormalises
    in bf16 (Router(scores_in_logits_dtype=True)); scoring in float32 instead left the bf16
    logits ~5% apart, as far as bf16 is from float32."""
    folder = MAKERS[family](tmp_path_factory.mktemp(f"{family}_bf16"))
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference_model(folder, torch.bfloat16)(ids).logits
    got = moerun.load(str(folder), device="cpu", dtype=torch.bfloat16).logits(ids)
    assert rel_err(got, expected) < 1e-3
