"""The Mamba-2 hybrids, Granite 4.0-H (granitemoehybrid) and Nemotron-H (nemotron_h),
held against transformers 5.25 on tiny random checkpoints saved by it (sharded, bf16),
their vectors randomised (transformers sets A_log to log(1..H), D and the norms to ones,
dt_bias to a constant, biases to zeros: constants that would hide a model that drops or
swaps them). Every standard check runs on each (as the family table does), then what
only these have: the chunked SSD scan against a plain recurrence and token-by-token
decode, the time-step clamp, a dense Granite with RoPE, Nemotron-H's relu² experts off
the fused kernels, its latent MoE, and a recurrent state sized as planned.

Family-table rows (tests/test_families.py ROWS):
    "granitemoehybrid": (test_mamba2_families.make_granitemoehybrid, ()),
    "nemotron_h": (test_mamba2_families.make_nemotron_h, ()),
    "nemotron_h-latent": (test_mamba2_families.make_nemotron_h_latent, ()),
"""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

import moerun
from moerun import plan
from moerun.kernels import cpu_experts, fused_experts
from moerun.layers import StaticPosition
from moerun.models import build_meta_model
from moerun.moe.experts import RELU2, RoutedExperts
from moerun.quant.format import ExpertFormat
from moerun.recurrent.mamba2 import Mamba2Mixer
from moerun.weights import CheckpointWeights
from tests.model_fixtures import checkpoint_headers, family_fixtures, load_pair, make_checkpoint, set_tensors
from tests.parity import check_greedy_32, check_kv_cache_decode, check_logits, check_static_decode, rel_err

# Small Mamba-2: 8 heads of 16 in 2 groups, a 16-wide state, SSD chunks of 8 (the
# 17-token logits check spans three of them).
GRANITE = dict(
    num_hidden_layers=4,
    layer_types=["mamba", "attention", "mamba", "mamba"],
    mamba_n_heads=8,
    mamba_d_head=16,
    mamba_n_groups=2,
    mamba_d_state=16,
    mamba_d_conv=4,
    mamba_chunk_size=8,
    num_local_experts=4,
    num_experts_per_tok=2,
    intermediate_size=32,
    shared_intermediate_size=48,
    position_embedding_type="nope",  # as the releases: attention without positions
    embedding_multiplier=3.0,
    residual_multiplier=0.5,
    attention_multiplier=0.2,
    logits_scaling=2.5,
)
# Dense (no experts: the shared MLP alone), RoPE, biases on attention and the Mamba projections.
GRANITE_DENSE = dict(
    GRANITE,
    num_local_experts=0,
    num_experts_per_tok=0,
    position_embedding_type="rope",
    layer_types=["attention", "mamba", "mamba", "attention"],
    attention_bias=True,
    mamba_proj_bias=True,
    tie_word_embeddings=True,
)
NEMOTRON = dict(
    hybrid_override_pattern="ME*-ME",  # mamba, MoE, attention, MLP, mamba, MoE
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=96,
    mamba_num_heads=8,
    mamba_head_dim=16,
    n_groups=2,
    ssm_state_size=16,
    conv_kernel=4,
    chunk_size=8,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    moe_shared_expert_intermediate_size=48,
    routed_scaling_factor=1.5,
)
# Nemotron 3 Super's shape: routed experts in a latent space, group-limited routing, biases.
NEMOTRON_LATENT = dict(
    NEMOTRON,
    hybrid_override_pattern="MEM*E",
    moe_latent_size=32,
    n_routed_experts=8,
    n_group=2,
    topk_group=1,
    routed_scaling_factor=2.5,
    use_bias=True,
    mlp_bias=True,
)


def randomise_vectors(folder) -> None:
    """Every 1-D tensor transformers initialises to a constant, made random: A_log (A from
    -0.5 to -8), D, dt_bias, norms, biases; the correction bias in float32, as released."""
    g = torch.Generator().manual_seed(7)
    headers = checkpoint_headers(folder)
    values = {}
    for name, (shape, dtype) in headers.items():
        n = tuple(shape)
        if name.endswith("e_score_correction_bias"):
            values[name] = 0.2 * torch.randn(n, generator=g)  # float32
            continue
        if name.endswith(".A_log"):
            value = torch.empty(n).uniform_(math.log(0.5), math.log(8.0), generator=g)
        elif name.endswith(".D"):
            value = 1.0 + 0.5 * torch.randn(n, generator=g)
        elif name.endswith(".dt_bias"):
            value = torch.randn(n, generator=g)
        elif name.endswith(".bias"):
            value = 0.3 * torch.randn(n, generator=g)
        elif len(n) == 1 and name.endswith("norm.weight") or name.endswith("norm_f.weight"):
            value = 1.0 + 0.3 * torch.randn(n, generator=g)
        else:
            continue
        values[name] = value.to(dtype)
    set_tensors(folder, values)


def _make(arch: str, config: dict, folder):
    folder = make_checkpoint(folder, arch, dtype=torch.bfloat16, shards=2, **config)
    randomise_vectors(folder)
    return folder


make_granitemoehybrid = functools.partial(_make, "granitemoehybrid", GRANITE)
make_granitemoehybrid_dense = functools.partial(_make, "granitemoehybrid", GRANITE_DENSE)
make_nemotron_h = functools.partial(_make, "nemotron_h", NEMOTRON)
make_nemotron_h_latent = functools.partial(_make, "nemotron_h", NEMOTRON_LATENT)

CASES = {
    "granitemoehybrid": make_granitemoehybrid,
    "nemotron_h": make_nemotron_h,
    "nemotron_h-latent": make_nemotron_h_latent,
}


pytestmark = pytest.mark.usefixtures("private_cache")
checkpoint, pair = family_fixtures(CASES)


# -- the checks every family passes --------------------------------------------------------


def random_mixer(chunk_size: int, n_groups: int = 2, seed: int = 0) -> Mamba2Mixer:
    torch.manual_seed(seed)
    mixer = Mamba2Mixer(
        32,
        n_heads=4,
        head_dim=8,
        n_groups=n_groups,
        state_size=6,
        conv_kernel=4,
        chunk_size=chunk_size,
        eps=1e-6,
        conv_bias=True,
    )
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            p.copy_(torch.randn(p.shape) * (0.3 if p.dim() > 1 else 0.5))
        mixer.A_log.uniform_(math.log(0.5), math.log(4.0))
    return mixer.eval()


def plain_recurrence(mixer: Mamba2Mixer, x: torch.Tensor) -> torch.Tensor:
    """Mamba-2 as its definition reads, one position at a time in float64:
    h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t, y_t = C_t h_t + D x_t."""
    m = mixer.double()
    try:
        B, T, _ = x.shape
        H, P, G, N, K = m.n_heads, m.head_dim, m.n_groups, m.state_size, m.conv_kernel
        z, xbc, dt = m.in_proj(x.double()).split([m.inner, m.conv_dim, H], dim=-1)
        padded = torch.cat([xbc.new_zeros(B, K - 1, m.conv_dim), xbc], dim=1)
        w = m.conv1d.weight[:, 0]  # [C, K]
        conv = torch.stack([(padded[:, t : t + K] * w.t()).sum(1) + m.conv1d.bias for t in range(T)], dim=1)
        xs, b, c = torch.nn.functional.silu(conv).split([m.inner, G * N, G * N], dim=-1)
        dt = torch.nn.functional.softplus(dt + m.dt_bias)
        A = -torch.exp(m.A_log)
        h = x.new_zeros(B, H, P, N, dtype=torch.float64)
        ys = []
        for t in range(T):
            xt = xs[:, t].view(B, H, P)
            bt = b[:, t].view(B, G, N).repeat_interleave(H // G, dim=1)  # head h reads group h // (H/G)
            ct = c[:, t].view(B, G, N).repeat_interleave(H // G, dim=1)
            h = torch.exp(dt[:, t] * A)[..., None, None] * h + dt[:, t, :, None, None] * bt[:, :, None] * xt[..., None]
            ys.append((h * ct[:, :, None]).sum(-1) + m.D[:, None] * xt)
        y = torch.stack(ys, dim=1).reshape(B, T, m.inner)
        return m.out_proj(m.norm(y, z)).float()
    finally:
        mixer.float()


def test_chunked_prefill_and_stepwise_decode_equal_a_plain_recurrence():
    mixer = random_mixer(chunk_size=4)  # 19 positions: four full chunks and a partial one
    x = torch.randn(2, 19, 32, generator=torch.Generator().manual_seed(1))
    expected = plain_recurrence(mixer, x)
    with torch.no_grad():
        prefill = mixer(x, mixer.make_state(2, 19, torch.float32, "cpu"), 0)
        state = mixer.make_state(2, 19, torch.float32, "cpu")
        steps = torch.cat([mixer(x[:, t : t + 1], state, t) for t in range(19)], dim=1)
        chunked_state = mixer.make_state(2, 19, torch.float32, "cpu")
        mixer(x, chunked_state, 0)
    assert rel_err(prefill, expected) < 1e-5
    assert rel_err(steps, expected) < 1e-5
    # The state a chunked prefill leaves is the one token-by-token decode builds.
    assert rel_err(chunked_state.ssm, state.ssm) < 1e-5 and rel_err(chunked_state.conv, state.conv) < 1e-6


def test_prefill_continues_in_pieces_and_the_static_step_matches():
    mixer = random_mixer(chunk_size=3, n_groups=1)
    x = torch.randn(1, 14, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = mixer(x, mixer.make_state(1, 16, torch.float32, "cpu"), 0)
        state = mixer.make_state(1, 16, torch.float32, "cpu")
        pieces = [mixer(x[:, :5], state, 0), mixer(x[:, 5:11], state, 5)]  # a later int start continues
        index = torch.zeros(1, dtype=torch.long)
        for t in range(11, 14):
            index.fill_(t)
            pieces.append(mixer(x[:, t : t + 1], state, StaticPosition(index, 16)))
    assert rel_err(torch.cat(pieces, dim=1), expected) < 1e-5


def test_a_new_sequence_ignores_whatever_the_state_holds():
    mixer = random_mixer(chunk_size=4)
    x = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fresh = mixer(x, mixer.make_state(1, 8, torch.float32, "cpu"), 0)
        state = mixer.make_state(1, 8, torch.float32, "cpu")
        for buffer in state.buffers():
            buffer.normal_(0.0, 3.0)
        assert torch.equal(mixer(x, state, 0), fresh)
        one = mixer.make_state(1, 8, torch.float32, "cpu")  # a one-token prompt, and the static step at 0
        single = mixer(x[:, :1], one, 0)
        for buffer in one.buffers():
            buffer.normal_(0.0, 3.0)
        static = mixer(x[:, :1], one, StaticPosition(torch.zeros(1, dtype=torch.long), 8))
    assert rel_err(single, fresh[:, :1]) < 1e-6 and rel_err(static, fresh[:, :1]) < 1e-6


def test_the_state_is_sized_as_planned_in_float32_whatever_the_model_dtype():
    mixer = random_mixer(chunk_size=4).to(torch.bfloat16)
    spec = mixer.state_spec()
    state = mixer.make_state(3, 100, torch.bfloat16, "cpu")
    assert spec.kind == "mamba2" and spec.per_token == 0
    assert all(b.dtype == torch.float32 for b in state.buffers()) and state.max_len == 100
    assert state.nbytes == spec.nbytes(100, 2, batch=3) == spec.nbytes(5000, 2, batch=3)


def test_a_lowered_chunk_gives_the_same_model(checkpoint, pair):
    """Chunks of 3 instead of the config's 8: the scan is exact whatever the chunking."""
    _, _, ours, ref = pair
    mixers = [m for m in ours.lm.modules() if isinstance(m, Mamba2Mixer)]
    assert mixers
    try:
        for m in mixers:
            m.chunk_size = 3
        check_logits(ours, ref)
        check_kv_cache_decode(ours)
    finally:
        for m in mixers:
            m.chunk_size = 8


def test_a_time_step_limit_that_bites_clamps_prefill_and_decode_alike(tmp_path):
    folder = _make("granitemoehybrid", dict(GRANITE, time_step_limit=[0.3, 0.9]), tmp_path / "clamped")
    ours, ref = load_pair(folder)
    check_logits(ours, ref)
    check_kv_cache_decode(ours)  # transformers' own decode step does not clamp; ours does, as its prefill
    unclamped = moerun.load(str(make_granitemoehybrid(tmp_path / "plain")), device="cpu", dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(4))
    assert rel_err(ours.logits(ids), unclamped.logits(ids)) > 1e-2  # the clamp changed something


def test_dense_granite_with_rope_and_biases(tmp_path):
    folder = make_granitemoehybrid_dense(tmp_path / "dense")
    ours, ref = load_pair(folder)
    check_logits(ours, ref)
    check_greedy_32(ours, ref)
    check_kv_cache_decode(ours)
    check_static_decode(ours)
    lm, arch = build_meta_model(json.loads((folder / "config.json").read_text()))
    with CheckpointWeights.open(folder) as ckpt:
        saved = {n: tuple(s) for n, (s, _) in ckpt.headers().items()}
    assert {n: s for n, (s, _, _) in arch.checkpoint_tensors(lm.args).items()} == saved
    assert ours.lm.model.layers[0].self_attn.rope is not None


# -- Nemotron-H ---------------------------------------------------------------------------


def test_the_pattern_reads_the_same_from_every_spelling():
    config = {"model_type": "nemotron_h", "vocab_size": 256, "hidden_size": 64}
    legacy = plan.summarize({**config, "hybrid_override_pattern": "M*-E", "num_hidden_layers": 4})
    saved = plan.summarize({**config, "layers_block_type": ["linear_attention", "full_attention", "mlp", "moe"]})
    assert legacy.total_params == saved.total_params and legacy.moe_layers == saved.moe_layers == [3]
    assert [s.kind for s in legacy.state_specs[:2]] == ["mamba2", "kv"]
    assert [s.nbytes(100, 2) > 0 for s in legacy.state_specs] == [True, True, False, False]  # MLP blocks keep none


def test_relu2_experts_are_not_gated_and_leave_the_fused_kernels():
    torch.manual_seed(0)
    experts = RoutedExperts(4, 16, 8, act=RELU2)
    assert experts.w13.shape == (4, 8, 16) and experts.intermediate_size == 8
    with torch.no_grad():
        experts.w13.normal_()
        experts.w2.normal_()
    fmt = experts._cpu_format()
    assert not fmt.gated and fmt.rows13 == 8 and not cpu_experts.supports(fmt, torch.float32)
    x, ids = torch.randn(5, 16), torch.randint(0, 4, (5, 2))
    weights = torch.rand(5, 2)
    expected = torch.zeros(5, 16)
    for n in range(5):
        for k in range(2):
            e = ids[n, k]
            expected[n] += weights[n, k] * (experts.w2[e] @ torch.relu(experts.w13[e] @ x[n]) ** 2)
    with torch.no_grad():
        assert rel_err(experts(x, ids, weights), expected) < 1e-6
        # The Triton entry point falls back to its reference for non-gated experts, whatever the mode.
        slots = torch.stack(
            [ExpertFormat(16, 16, 8, torch.float32, gated=False).pack(experts.w13[e], experts.w2[e]) for e in range(4)]
        )
        out = fused_experts(
            x, ids, weights, slots, ExpertFormat(16, 16, 8, torch.float32, gated=False), act=RELU2, mode="decode"
        )
    assert rel_err(out, expected) < 1e-6


def test_the_plan_counts_non_gated_expert_bytes():
    config = {
        "model_type": "nemotron_h",
        "vocab_size": 256,
        "hidden_size": 64,
        "hybrid_override_pattern": "ME",
        "n_routed_experts": 4,
        "moe_intermediate_size": 32,
        "mamba_num_heads": 8,
        "mamba_head_dim": 16,
        "n_groups": 2,
        "ssm_state_size": 16,
    }
    summary = plan.summarize(config)
    p = plan.make_plan(summary, 16, torch.bfloat16, vram=None)
    assert p.expert_blob_bytes == ExpertFormat(16, 64, 32, torch.bfloat16, gated=False).blob_bytes
    assert (
        p.weight_bytes_by_role["routed_experts"]
        == summary.stored_bytes_by_role["routed_experts"]
        == 4 * 2 * 64 * 32 * 2
    )


def test_routers_keep_their_released_rule_and_dtypes(checkpoint):
    half = moerun.load(str(checkpoint[1]), device="cpu", dtype=torch.bfloat16)
    layer = half.lm.model.layers[1]
    if half.config["model_type"] == "nemotron_h":  # sigmoid, a float32 correction bias, relu² experts
        gate = layer.mixer.gate
        assert gate.e_score_correction_bias.dtype == torch.float32 and gate.float32_logits
        assert gate.scoring == "sigmoid" and gate.group_score == "top2_sum" and gate.renorm_eps == 1e-20
        assert layer.mixer.experts.act.kind == "relu2" and not layer.mixer.experts.act.gated
    else:  # softmax over the top-k logits, SwiGLU experts
        gate = layer.block_sparse_moe.router
        assert gate.scoring == "softmax" and gate.renormalize and gate.e_score_correction_bias is None
        assert layer.block_sparse_moe.experts.act.gated
    assert gate.weight.dtype == torch.bfloat16
