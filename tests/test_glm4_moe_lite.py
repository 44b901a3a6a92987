"""GLM-4.7-Flash (glm4_moe_lite: DeepSeek-V3's MLA and router under GLM's config) beyond
the checks every family passes (tests/test_families.py runs them on the CASES made
here): its layer pattern and state against the reference, the correction bias, and a
Hub config whose first_k_dense_replace is ignored as transformers ignores it."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from moerun.models import get_architecture
from tests.model_fixtures import TINY_MLA, TINY_ROUTED_EXPERTS, family_fixtures, make_checkpoint, set_tensors
from tests.parity import check_correction_bias

# DeepSeek's latent attention with low-rank queries; one shared expert beside the routed
# ones, whose weights are renormalised and scaled.
MLA = dict(TINY_MLA, q_lora_rank=32)
MOE = dict(TINY_ROUTED_EXPERTS, n_shared_experts=1, routed_scaling_factor=1.8, norm_topk_prob=True)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128)
CASES = {
    # GLM-4.7-Flash's shape: the first layer dense by default, no groups, interleaved rope.
    "flash": dict(MLA, **MOE, n_group=1, topk_group=1, rope_theta=1000000.0),
    # The other switches: explicit layer types (a dense layer in the middle), groups,
    # rotate-half rope, yarn with mscale != mscale_all_dim.
    "variant": dict(
        MLA,
        **MOE,
        mlp_layer_types=["sparse", "dense", "sparse"],
        n_group=4,
        topk_group=2,
        rope_interleave=False,
        rope_parameters=dict(YARN, mscale=1.0, mscale_all_dim=0.8),
    ),
}


def make_glm(folder, case: str):
    folder = make_checkpoint(folder, "glm4_moe_lite", dtype=torch.bfloat16, shards=2, **CASES[case])
    # transformers initialises the correction bias to zeros; real ones are not, and they
    # change which experts win. Stored in float32, as in the release.
    sparse = get_architecture("glm4_moe_lite").ModelArgs.from_dict(json.loads((folder / "config.json").read_text()))
    g = torch.Generator().manual_seed(7)
    set_tensors(
        folder,
        {
            f"model.layers.{i}.mlp.gate.e_score_correction_bias": 0.2 * torch.randn(8, generator=g)
            for i in sorted(sparse.moe_layers)
        },
    )
    return folder


pytestmark = pytest.mark.usefixtures("private_cache")
checkpoint, pair = family_fixtures({case: functools.partial(make_glm, case=case) for case in CASES})


def test_layers_and_state_follow_the_reference(pair):
    """Dense or sparse per layer as transformers decides (mlp_layer_types), and a decode
    state of only the MLA latent."""
    _, _, ours, ref = pair
    sparse = {i for i, kind in enumerate(ref.config.mlp_layer_types) if kind == "sparse"}
    assert ours.lm.args.moe_layers == sparse
    args = ours.lm.args
    for spec in ours.lm.state_specs():
        assert spec.kind == "mla" and spec.per_token == args.kv_lora_rank + args.qk_rope_head_dim


def test_correction_bias_is_used_and_kept_in_float32(pair):
    _, folder, ours, _ = pair
    check_correction_bias(ours, folder, min(ours.lm.args.moe_layers))


def test_hub_config_ignores_first_k_dense_replace_as_transformers_does():
    """GLM-4.7-Flash's config.json carries first_k_dense_replace and no mlp_layer_types;
    transformers makes the first layer dense whatever it says, and so does moerun."""
    import transformers

    shape = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4)
    rope = dict(partial_rotary_factor=1.0, rope_theta=1000000, rope_scaling=None)
    hub = dict(model_type="glm4_moe_lite", **shape, first_k_dense_replace=2, **rope, topk_method="noaux_tc")
    args = get_architecture("glm4_moe_lite").ModelArgs.from_dict(hub)
    ref = transformers.AutoConfig.for_model(**hub)
    assert args.moe_layers == {i for i, kind in enumerate(ref.mlp_layer_types) if kind == "sparse"} == {1, 2, 3}
    # GLM's defaults, not DeepSeek-V3's.
    assert (args.routed_scaling_factor, args.n_group, args.topk_group, args.rms_norm_eps) == (1.8, 1, 1, 1e-5)
    assert args.n_shared_experts == ref.n_shared_experts == 1
    assert args.rope["rope_theta"] == 1000000 and args.rope["rope_type"] == "default"
