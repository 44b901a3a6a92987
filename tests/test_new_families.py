"""GLM-4.5 (glm4_moe) and ERNIE-4.5 (ernie4_5_moe) held against transformers on tiny
random checkpoints saved by it (sharded, bf16), with every quirk on: partial rotary,
q/k norm, attention biases, group-limited sigmoid routing with a correction bias,
shared experts, dense first layers (GLM); interleaved float32 RoPE, an MoE layer range
with dense layers on both sides, biases everywhere, a softmax router with a correction
bias and a norm_min that bites (ERNIE). tests/test_families.py runs the checks every
family passes on these checkpoints; here: the routing quirks change the logits, the
router stays float32, partial rotary, ERNIE's layer range, MTP layers never loaded."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from safetensors.torch import save_file

import moerun
from moerun.models import get_architecture
from moerun.models.base import SparseMoeBlock
from tests.model_fixtures import (
    TINY_ROUTED_EXPERTS,
    checkpoint_headers,
    family_fixtures,
    make_checkpoint,
    reference_model,
    set_tensors,
)
from tests.parity import check_logits, rel_err

# GLM: partial rotary (16 of 32 dims rotated), q/k norm, attention biases; eight routed
# experts chosen within 1 of 2 groups, renormalised and scaled, beside two shared; a dense first layer.
GLM_ATTENTION = dict(head_dim=32, partial_rotary_factor=0.5, rope_theta=1e6, use_qk_norm=True, attention_bias=True)
GLM_ROUTING = dict(n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5)
# ERNIE: dense, MoE, MoE, dense; eight experts, top-3, beside two shared.
ERNIE_LAYERS = dict(num_hidden_layers=4, moe_layer_start_index=1, moe_layer_end_index=2, moe_layer_interval=1)
ERNIE_EXPERTS = dict(moe_num_experts=8, moe_k=3, moe_num_shared_experts=2, moe_intermediate_size=32)
CONFIGS = {
    "glm4_moe": dict(TINY_ROUTED_EXPERTS, **GLM_ATTENTION, **GLM_ROUTING, n_shared_experts=2, first_k_dense_replace=1),
    "ernie4_5_moe": dict(
        ERNIE_LAYERS,
        **ERNIE_EXPERTS,
        moe_norm_min=0.6,  # larger than many top-3 sums: the clamp decides some weights
        use_bias=True,
        tie_word_embeddings=True,
    ),
}
ARCHS = list(CONFIGS)
IDS = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))


def perturb_vectors(folder) -> None:
    """transformers initialises biases and correction biases to zeros and norms to ones;
    real ones are not, and a model that dropped them would pass. Randomise them all."""
    g = torch.Generator().manual_seed(7)
    headers = checkpoint_headers(folder)
    values = {}
    for name, (shape, _) in headers.items():
        if name.endswith("e_score_correction_bias"):
            values[name] = 0.2 * torch.randn(tuple(shape), generator=g)
        elif name.endswith(".bias"):
            values[name] = 0.3 * torch.randn(tuple(shape), generator=g)
        elif len(shape) == 1 and name.endswith("norm.weight"):
            values[name] = 1.0 + 0.3 * torch.randn(tuple(shape), generator=g)
    set_tensors(folder, {name: value.to(headers[name][1]) for name, value in values.items()})  # as stored


def make_family(arch: str, folder):
    folder = make_checkpoint(folder, arch, dtype=torch.bfloat16, shards=2, **CONFIGS[arch])
    perturb_vectors(folder)
    return folder


pytestmark = pytest.mark.usefixtures("private_cache")
checkpoint, pair = family_fixtures({arch: functools.partial(make_family, arch) for arch in ARCHS})


def test_router_params_kept_in_float32(checkpoint):
    arch, folder = checkpoint
    half = moerun.load(str(folder), device="cpu", dtype=torch.bfloat16)
    gate = half.lm.model.layers[1].mlp.gate
    assert gate.e_score_correction_bias.dtype == torch.float32
    assert gate.weight.dtype == (torch.float32 if arch == "ernie4_5_moe" else torch.bfloat16)
    assert half.lm.model.layers[1].self_attn.q_proj.weight.dtype == torch.bfloat16


# -- the quirks matter -------------------------------------------------------------------


def _routers(ours):
    return [layer.mlp.gate for layer in ours.lm.model.layers if isinstance(layer.mlp, SparseMoeBlock)]


ROUTER_ATTRS = ("n_group", "topk_group", "renorm_min", "renorm_eps", "scaling", "renormalize")


def _changed(ours, edit) -> float:
    """Relative change of the logits when `edit(router)` is applied to every router (then undone)."""
    expected = ours.logits(IDS)
    routers = _routers(ours)
    saved = [({k: getattr(r, k) for k in ROUTER_ATTRS}, r.e_score_correction_bias.clone()) for r in routers]
    try:
        for r in routers:
            edit(r)
        return rel_err(ours.logits(IDS), expected)
    finally:
        for r, (attrs, bias) in zip(routers, saved):
            with torch.no_grad():
                r.e_score_correction_bias.copy_(bias)
            for k, v in attrs.items():
                setattr(r, k, v)


def test_correction_bias_matters(pair):
    _, _, ours, _ = pair
    assert _changed(ours, lambda r: r.e_score_correction_bias.data.zero_()) > 1e-3


@pytest.mark.parametrize("checkpoint", ["glm4_moe"], indirect=True)
def test_glm_groups_and_scaling_matter(pair):
    _, _, ours, _ = pair
    assert _routers(ours)[0].n_group == 2
    assert _changed(ours, lambda r: setattr(r, "n_group", 1)) > 1e-3
    assert _changed(ours, lambda r: setattr(r, "scaling", 1.0)) > 1e-3
    assert _changed(ours, lambda r: setattr(r, "renormalize", False)) > 1e-3


@pytest.mark.parametrize("checkpoint", ["ernie4_5_moe"], indirect=True)
def test_ernie_norm_min_matters(pair):
    _, _, ours, _ = pair
    assert _changed(ours, lambda r: setattr(r, "renorm_min", None)) > 1e-3


@pytest.mark.parametrize("checkpoint", ["glm4_moe"], indirect=True)
def test_glm_partial_rotary_and_qk_norm(pair):
    _, _, ours, _ = pair
    attn = ours.lm.model.layers[0].self_attn
    assert attn.rope.dim == 16 and not attn.rope.interleaved and attn.qk_norm == "head"
    # Hub configs may omit partial_rotary_factor: transformers then rotates half of each head.
    tiny = dict(vocab_size=8, hidden_size=64, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4)
    experts = dict(moe_intermediate_size=8, n_routed_experts=4, num_experts_per_tok=2)
    hub = get_architecture("glm4_moe").ModelArgs.from_dict(
        dict(model_type="glm4_moe", **tiny, num_key_value_heads=2, head_dim=32, **experts, rope_theta=1e6)
    )
    with torch.device("meta"):
        model = get_architecture("glm4_moe").Model(hub)
    assert model.model.layers[0].self_attn.rope.dim == 16


@pytest.mark.parametrize(
    "layers, start, end, interval", [(4, 1, 2, 1), (6, 0, -1, 2), (7, 2, 5, 3), (5, 1, -1, 1), (3, 5, -1, 1)]
)
def test_ernie_moe_layer_range_equals_transformers(layers, start, end, interval):
    import transformers
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeSparseMoeBlock

    tiny = dict(vocab_size=8, hidden_size=16, intermediate_size=8, num_attention_heads=2, num_key_value_heads=1)
    experts = dict(moe_intermediate_size=4, moe_num_experts=4, moe_k=2)
    layout = dict(
        num_hidden_layers=layers, moe_layer_start_index=start, moe_layer_end_index=end, moe_layer_interval=interval
    )
    config = dict(tiny, **experts, **layout)
    with torch.device("meta"):
        ref = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model("ernie4_5_moe", **config))
    want = {i for i, layer in enumerate(ref.model.layers) if isinstance(layer.mlp, Ernie4_5_MoeSparseMoeBlock)}
    args = get_architecture("ernie4_5_moe").ModelArgs.from_dict({"model_type": "ernie4_5_moe", **config})
    assert args.moe_layers == want


def test_mtp_layers_are_neither_described_nor_loaded(tmp_path):
    """Real GLM checkpoints hold the multi-token-prediction layer as model.layers.{L}: the
    loader skips it and the planner counts it as unused."""
    from moerun import plan

    folder = make_checkpoint(tmp_path, "glm4_moe", dtype=torch.bfloat16, shards=2, **CONFIGS["glm4_moe"])
    ids = IDS[:1]
    before = moerun.load(str(folder), device="cpu", dtype="float32").logits(ids)
    L, D = 3, 64
    mtp = {
        f"model.layers.{L}.eh_proj.weight": torch.randn(D, 2 * D),
        f"model.layers.{L}.enorm.weight": torch.ones(D),
        f"model.layers.{L}.mlp.experts.0.gate_proj.weight": torch.randn(32, D),
    }
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    save_file({k: v.to(torch.bfloat16) for k, v in mtp.items()}, folder / "mtp.safetensors", metadata={"format": "pt"})
    index["weight_map"].update(dict.fromkeys(mtp, "mtp.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = json.loads((folder / "config.json").read_text())
    headers = checkpoint_headers(folder)
    summary = plan.summarize({**cfg, "num_nextn_predict_layers": 1}, headers)
    assert summary.unused_params == sum(v.numel() for v in mtp.values())
    after = moerun.load(str(folder), device="cpu", dtype="float32").logits(ids)
    assert torch.equal(before, after)


# GLM-4.5-Air's shape: no q/k norm, head_dim and partial_rotary_factor left to their defaults, no
# groups; six experts, top-3, one shared, neither renormalised nor scaled, after two dense layers.
AIR_EXPERTS = dict(n_routed_experts=6, num_experts_per_tok=3, n_shared_experts=1, moe_intermediate_size=32)
AIR_ROUTING = dict(norm_topk_prob=False, routed_scaling_factor=1.0)
# ERNIE untied, no shared experts, every second layer from 0, top-1: the clamp still divides one weight.
ERNIE_EVERY_SECOND = dict(num_hidden_layers=4, moe_layer_start_index=0, moe_layer_interval=2)
ERNIE_TOP1 = dict(moe_num_experts=6, moe_k=1, moe_num_shared_experts=0, moe_intermediate_size=32, moe_norm_min=0.5)
VARIANTS = {
    "glm4_moe": dict(
        AIR_EXPERTS, **AIR_ROUTING, use_qk_norm=False, attention_bias=True, num_hidden_layers=4, first_k_dense_replace=2
    ),
    "ernie4_5_moe": dict(ERNIE_EVERY_SECOND, **ERNIE_TOP1, use_bias=False, tie_word_embeddings=False),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_variant_logits_match_transformers(arch, tmp_path):
    folder = make_checkpoint(tmp_path, arch, dtype=torch.float32, shards=1, **VARIANTS[arch])
    perturb_vectors(folder)
    ours = moerun.load(str(folder), device="cpu", dtype="float32")
    check_logits(ours, reference_model(folder))
