"""OLMoE, Phi-3.5-MoE and GraniteMoE beyond the checks every family passes
(tests/test_families.py runs them on the CONFIGS here, which turn each family's quirks
on: clip_qkv, LongRoPE with mscale, attention and lm_head biases, multipliers != 1):
OLMoE's routing options, SparseMixer and LongRoPE against transformers, sanitize, and the
checkpoint layout of variants (a tied Granite)."""

from __future__ import annotations

import json

import pytest
import torch

import moerun
from moerun.models import build_meta_model, get_architecture
from tests.model_fixtures import checkpoint_headers, make_checkpoint, reference_model
from tests.parity import check_sanitize_stacks_experts, rel_err, sanitize_args

HEAD_DIM = 16  # BASE: hidden 64 over 4 heads
LONGROPE = dict(
    rope_type="longrope",
    rope_theta=10000.0,
    short_factor=[1.0 + 0.3 * i for i in range(HEAD_DIM // 2)],
    long_factor=[2.0 + 0.7 * i for i in range(HEAD_DIM // 2)],
    short_mscale=1.15,
    long_mscale=1.3,
    original_max_position_embeddings=64,  # longer than every sequence compared with transformers
)
SIX_EXPERTS = dict(num_local_experts=6, num_experts_per_tok=2, intermediate_size=32)  # Phi-3.5-MoE's and Granite's
CONFIGS = {
    "olmoe": dict(num_experts=8, num_experts_per_tok=3, intermediate_size=32, clip_qkv=0.6),
    "phimoe": dict(
        SIX_EXPERTS,
        attention_bias=True,
        lm_head_bias=True,
        router_jitter_noise=0.3,  # a wide band, so that the masked softmax weights are not all 1
        rope_parameters=LONGROPE,
    ),
    "granitemoe": dict(
        SIX_EXPERTS, embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.1, logits_scaling=6.0
    ),
}
ARCHS = list(CONFIGS)


@pytest.mark.parametrize("k", [2, 1])  # one pick renormalised is weight 1
def test_olmoe_norm_topk_prob_and_no_clip_match(tmp_path, k):
    folder = make_checkpoint(
        tmp_path,
        "olmoe",
        dtype=torch.float32,
        shards=1,
        num_experts=6,
        num_experts_per_tok=k,
        intermediate_size=32,
        norm_topk_prob=True,
    )
    ids = torch.randint(0, 256, (1, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference_model(folder)(ids).logits
    assert rel_err(moerun.load(str(folder), device="cpu", dtype="float32").logits(ids), expected) < 1e-4


def test_sparsemixer_equals_transformers_at_inference():
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    from moerun.models.phimoe import sparsemixer_top2

    logits = torch.randn(64, 16, generator=torch.Generator().manual_seed(0)) * 2
    logits[0, 3] = logits[0, 5] = logits[0].max() + 1  # a tie for the best
    for eps in (0.01, 0.3):
        ref_w, ref_ids = sparsemixer(logits, jitter_eps=eps, training=False)
        ids, w = sparsemixer_top2(logits, eps)
        assert torch.equal(ids, ref_ids) and torch.equal(w, ref_w)


def test_longrope_switches_to_long_factors_past_the_original_length():
    from types import SimpleNamespace

    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from moerun.rope import rotary_for

    rope = rotary_for({"rope_parameters": LONGROPE, "max_position_embeddings": 512}, HEAD_DIM)
    assert rope.kind == "longrope"
    config = SimpleNamespace(
        rope_parameters=LONGROPE,
        hidden_size=64,
        num_attention_heads=4,
        head_dim=HEAD_DIM,
        max_position_embeddings=512,
        standardize_rope_params=lambda: None,
    )
    original = LONGROPE["original_max_position_embeddings"]
    for end, mscale in ((original, LONGROPE["short_mscale"]), (original + 1, LONGROPE["long_mscale"])):
        inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](config, seq_len=end)
        positions = torch.arange(end - 4, end)
        freqs = positions.float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = rope.cos_sin(positions, torch.float32)
        assert torch.equal(cos, emb.cos() * mscale) and torch.equal(sin, emb.sin() * mscale)


def test_phimoe_reads_hub_style_longrope_config():
    # Phi-3.5-MoE's own config.json: rope_scaling with "type", rope_theta and
    # original_max_position_embeddings at top level.
    cfg = {
        "model_type": "phimoe",
        "vocab_size": 8,
        "hidden_size": 8,
        "intermediate_size": 4,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "num_local_experts": 2,
        "rope_theta": 10000.0,
        "original_max_position_embeddings": 4096,
        "max_position_embeddings": 131072,
        "rope_scaling": {
            "type": "longrope",
            "short_factor": [1.0, 1.0],
            "long_factor": [2.0, 3.0],
            "short_mscale": 1.2,
            "long_mscale": 1.2,
        },
    }
    lm, _ = build_meta_model(cfg)
    rope = lm.model.layers[0].self_attn.rope
    assert rope.kind == "longrope" and rope.theta == 10000.0 and rope.original_max == 4096
    assert torch.allclose(rope.inv_freq[1], 1.0 / torch.tensor([2.0, 3.0 * 100.0]))  # long_factor * theta**(2i/Dh)


@pytest.mark.parametrize("arch", ["olmoe", "phimoe"])
def test_sanitize_stacks_per_expert_weights_and_is_idempotent(arch):
    module = get_architecture(arch)
    args = sanitize_args(module, arch, intermediate_size=3)
    names = ("w1", "w3", "w2") if arch == "phimoe" else ("gate_proj", "up_proj", "down_proj")
    prefix = "model.layers.0." + ("block_sparse_moe.experts" if arch == "phimoe" else "mlp.experts")
    check_sanitize_stacks_experts(module, args, prefix, {"model.norm.weight": torch.ones(4)}, names=names)


def test_granite_sanitize_renames_fused_experts():
    module = get_architecture("granitemoe")
    cfg = {
        "model_type": "granitemoe",
        "vocab_size": 8,
        "hidden_size": 4,
        "intermediate_size": 3,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_local_experts": 2,
        "num_experts_per_tok": 1,
    }
    args = module.ModelArgs.from_dict(cfg)
    p = "model.layers.0.block_sparse_moe"
    fake = {
        f"{p}.input_linear.weight": torch.zeros(2, 6, 4),
        f"{p}.output_linear.weight": torch.zeros(2, 4, 3),
        f"{p}.router.layer.weight": torch.zeros(2, 4),
    }
    out = module.sanitize(fake, args)
    assert set(out) == {f"{p}.experts.w13", f"{p}.experts.w2", f"{p}.router.weight"}
    assert module.sanitize(out, args).keys() == out.keys()


# A tied granite (as the released ones) and qwen2_moe (shared experts, dense layers) too.
LAYOUTS = {**CONFIGS, "granitemoe_tied": {**CONFIGS["granitemoe"], "tie_word_embeddings": True}, "qwen2_moe": {}}


@pytest.mark.parametrize("case", LAYOUTS)
def test_checkpoint_tensors_are_the_saved_checkpoint_and_sanitize_to_the_model(case, tmp_path):
    arch = case.removesuffix("_tied")
    folder = make_checkpoint(tmp_path, arch, dtype=torch.bfloat16, shards=1, **LAYOUTS[case])
    lm, module = build_meta_model(json.loads((folder / "config.json").read_text()))
    layout = module.checkpoint_tensors(lm.args)
    headers = checkpoint_headers(folder)
    assert {n: tuple(s) for n, (s, _) in headers.items()} == {n: s for n, (s, _, _) in layout.items()}
    ours = module.sanitize({n: torch.empty(s, device="meta") for n, (s, _, _) in layout.items()}, lm.args)
    assert {n: tuple(t.shape) for n, t in ours.items()} == {n: tuple(p.shape) for n, p in lm.named_parameters()}
