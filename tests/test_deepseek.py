"""DeepSeek-V2 and -V3 beyond the checks every family passes (tests/test_families.py runs
them on the CASES made here): a state that holds only the MLA latent, V3's correction
bias, YaRN that matters, the RoPE variants against transformers' own functions, and
V3's FP8 release: planned from its layout, refused at load."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

import moerun
from moerun import rope
from moerun.errors import MoerunError
from moerun.models import build_meta_model, get_architecture
from tests.model_fixtures import TINY_MLA, TINY_ROUTED_EXPERTS, family_fixtures, make_checkpoint, set_tensors
from tests.parity import check_correction_bias, check_sanitize_stacks_experts, rel_err

MLA = dict(TINY_MLA, **TINY_ROUTED_EXPERTS, first_k_dense_replace=1)
# DeepSeek-V2's and -V3's shared shape: low-rank queries, 4 expert groups of which 2 are kept.
GROUPED = dict(MLA, q_lora_rank=32, n_group=4, topk_group=2, rope_theta=10000.0)
YARN = dict(type="yarn", factor=4.0, original_max_position_embeddings=128, beta_fast=32, beta_slow=1)
CASES = {
    # DeepSeek-V2-Lite's shape: q_proj directly, greedy top-k.
    "v2_lite": (
        "deepseek_v2",
        dict(MLA, q_lora_rank=None, n_shared_experts=2, topk_method="greedy", routed_scaling_factor=1.5),
    ),
    # DeepSeek-V2's: low-rank queries, group-limited top-k, yarn with mscale == mscale_all_dim.
    "v2": (
        "deepseek_v2",
        dict(
            GROUPED,
            n_shared_experts=2,
            topk_method="group_limited_greedy",
            rope_scaling=dict(YARN, mscale=0.707, mscale_all_dim=0.707),
        ),
    ),
    # DeepSeek-V3's: sigmoid + correction bias + groups, renormalised and scaled, yarn with
    # mscale != mscale_all_dim (so both the cos/sin factor and the softmax scale move).
    "v3": (
        "deepseek_v3",
        dict(
            GROUPED,
            n_shared_experts=1,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            rope_scaling=dict(YARN, mscale=1.0, mscale_all_dim=0.8),
        ),
    ),
}


def make_deepseek(folder, case: str):
    arch, config = CASES[case]
    folder = make_checkpoint(folder, arch, dtype=torch.bfloat16, shards=2, **config)
    if arch == "deepseek_v3":
        # transformers initialises the correction bias to zeros; real ones are not, and
        # they change which experts win. Stored in float32, as in the released checkpoint.
        g = torch.Generator().manual_seed(7)
        set_tensors(
            folder,
            {
                f"model.layers.{i}.mlp.gate.e_score_correction_bias": 0.2 * torch.randn(8, generator=g)
                for i in range(1, 3)
            },
        )
    return folder


pytestmark = pytest.mark.usefixtures("private_cache")
checkpoint, pair = family_fixtures({case: functools.partial(make_deepseek, case=case) for case in CASES})


IDS = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))


def test_cache_holds_only_the_latent(pair):
    _, _, ours, _ = pair
    args = ours.lm.args
    per_token = args.kv_lora_rank + args.qk_rope_head_dim  # 40, against 4 * (24 + 24) expanded
    caches = ours.lm.make_caches(2, 50)
    assert len(caches) == args.num_hidden_layers
    for cache, spec in zip(caches, ours.lm.state_specs()):
        assert cache.max_len == 50
        assert spec.kind == "mla" and spec.per_token == per_token
        assert sum(t.numel() for t in cache.buffers()) == 2 * 50 * per_token
        assert cache.nbytes == spec.nbytes(50, 4, batch=2) == 2 * 50 * per_token * 4
    # What decode writes is the normalised latent and the rope'd shared key, nothing else.
    caches = ours.lm.make_caches(1, 17)
    with torch.no_grad():
        ours.lm(IDS[:1], caches, 0)
    assert caches[0].latent.abs().sum(-1).ne(0).all()


@pytest.mark.parametrize("checkpoint", ["v3"], indirect=True)
def test_v3_correction_bias_is_used_and_kept_in_float32(pair):
    _, folder, ours, _ = pair
    check_correction_bias(ours, folder, 1, bf16_layer=2)


@pytest.mark.parametrize("checkpoint", ["v3"], indirect=True)
def test_yarn_matters(pair):
    _, folder, ours, ref = pair
    config = json.loads((folder / "config.json").read_text())
    args = get_architecture("deepseek_v3").ModelArgs.from_dict({**config, "rope_parameters": {"rope_theta": 10000.0}})
    assert args.rope["rope_type"] == "default"
    plain = get_architecture("deepseek_v3").Model(args)
    plain.load_state_dict(ours.lm.state_dict())
    # YaRN changes the frequencies themselves, so it matters at any length.
    long_ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ref(long_ids).logits
        assert rel_err(plain(long_ids, plain.make_caches(1, 40)), expected) > 1e-3
    assert rel_err(ours.logits(long_ids), expected) < 1e-4


# -- configs and rope ------------------------------------------------------------------------


def _hf_config(params: dict, head_dim: int = 16):
    import transformers

    return transformers.LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=512,
        rope_parameters=dict(params),
    )


@pytest.mark.parametrize(
    "params",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 40.0,
            "original_max_position_embeddings": 128,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
        {
            "rope_type": "yarn",
            "rope_theta": 1000000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "mscale": 1.0,
            "mscale_all_dim": 0.8,
        },
        {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "original_max_position_embeddings": 64,
            "attention_factor": 1.3,
            "truncate": False,
        },
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 256},
    ],
)
def test_rope_variants_equal_transformers(params):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    hf = _hf_config(params)
    kind = params["rope_type"]
    if kind == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        want = LlamaRotaryEmbedding.compute_default_rope_parameters(hf)
    else:
        want = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
    params = rope.rope_parameters({"rope_parameters": params, "max_position_embeddings": 512})
    ours = rope.inv_freq_and_scaling(params, 16, 512)
    assert torch.equal(ours[0], want[0]) and ours[1] == pytest.approx(want[1], rel=1e-12)
    assert rope.softmax_scale(hf.rope_parameters, 0.2) == yarn_apply_mscale(hf.rope_parameters, 0.2)


def test_hub_and_transformers5_rope_configs_agree():
    # DeepSeek-V3's yarn, as its config.json writes it and as transformers 5 saves it.
    yarn = dict(
        factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0
    )
    hub = {"rope_theta": 10000.0, "max_position_embeddings": 163840, "rope_scaling": {"type": "yarn", **yarn}}
    saved = {"max_position_embeddings": 163840, "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, **yarn}}
    a, b = rope.rope_parameters(hub), rope.rope_parameters(saved)
    assert a["rope_type"] == b["rope_type"] == "yarn" and a["rope_theta"] == b["rope_theta"] == 10000.0
    fa, fb = rope.inv_freq_and_scaling(a, 64), rope.inv_freq_and_scaling(b, 64)
    assert torch.equal(fa[0], fb[0]) and fa[1] == fb[1] == 1.0
    # DeepSeek-V3's softmax scale: (1 + 0.1 ln 40)^2 / sqrt(192).
    mscale = 1 + 0.1 * math.log(40)
    assert rope.softmax_scale(a, 192**-0.5) == pytest.approx(mscale**2 / 192**0.5)
    assert rope.rope_parameters({})["rope_type"] == "default"


def _fake_config(arch: str, **extra) -> dict:
    return {
        "model_type": arch,
        "vocab_size": 8,
        "hidden_size": 4,
        "intermediate_size": 6,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "moe_intermediate_size": 3,
        "n_routed_experts": 2,
        "num_experts_per_tok": 1,
        "first_k_dense_replace": 1,
        "kv_lora_rank": 4,
        "q_lora_rank": None,
        "qk_rope_head_dim": 2,
        "qk_nope_head_dim": 2,
        "v_head_dim": 2,
        "n_group": 1,
        "topk_group": 1,
        **extra,
    }


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_sanitize_stacks_experts_and_is_idempotent(arch):
    module = get_architecture(arch)
    args = module.ModelArgs.from_dict(_fake_config(arch))
    assert args.moe_layers == {1}
    router = {"model.layers.1.mlp.gate.weight": torch.ones(2, 4)}
    check_sanitize_stacks_experts(module, args, "model.layers.1.mlp.experts", router)


def test_moe_layer_freq_and_refusals():
    v2 = get_architecture("deepseek_v2")
    args = v2.ModelArgs.from_dict(_fake_config("deepseek_v2", num_hidden_layers=6, moe_layer_freq=2))
    assert args.moe_layers == {2, 4}
    # transformers' "proportional" rope is one moerun does not implement.
    with pytest.raises(MoerunError, match="rope scaling type 'proportional'"):
        v2.ModelArgs.from_dict(_fake_config("deepseek_v2", rope_scaling={"type": "proportional", "factor": 2.0}))
    # FP8 configs parse (the planner builds their model) and are refused at load.
    v3 = get_architecture("deepseek_v3")
    fp8 = v3.ModelArgs.from_dict(_fake_config("deepseek_v3", quantization_config={"quant_method": "fp8"}))
    with pytest.raises(MoerunError, match="fp8"):
        v3.check_loadable(fp8)
    v3.check_loadable(v3.ModelArgs.from_dict(_fake_config("deepseek_v3")))


def test_v3_fp8_release_is_planned_from_its_layout():
    """DeepSeek-V3's shipped FP8 config.json builds its meta model; its layout has e4m3
    weights with float32 128 x 128 block scales in the weight's role, a bf16 router,
    embeddings and lm_head, and no multi-token-prediction layer (index 61)."""
    from moerun import plan, registry

    cfg = registry.shipped_config("deepseek-v3")
    lm, arch = build_meta_model(cfg)
    layout = arch.checkpoint_tensors(lm.args)
    expert = "model.layers.3.mlp.experts.0"
    assert layout[f"{expert}.gate_proj.weight"] == ((2048, 7168), "F8_E4M3", "routed_experts")
    assert layout[f"{expert}.gate_proj.weight_scale_inv"] == ((16, 56), "F32", "routed_experts")
    assert layout[f"{expert}.down_proj.weight_scale_inv"] == ((56, 16), "F32", "routed_experts")
    assert layout["model.layers.0.self_attn.kv_b_proj.weight_scale_inv"][1:] == ("F32", "attention")
    assert layout["model.layers.3.mlp.shared_experts.up_proj.weight"][1:] == ("F8_E4M3", "shared_experts")
    assert layout["model.layers.3.mlp.gate.weight"] == ((256, 7168), "BF16", "routers")
    assert layout["model.layers.3.mlp.gate.e_score_correction_bias"] == ((256,), "F32", "routers")
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.kv_a_layernorm.weight"):
        assert layout[name][1] == "BF16"
    assert not any(n.startswith("model.layers.61.") for n in layout)
    assert plan.summarize(cfg).kv_kind == "mla"


@pytest.mark.parametrize("checkpoint", ["v3"], indirect=True)
def test_fp8_checkpoint_is_refused_at_load(checkpoint, tmp_path):
    import shutil

    _, folder = checkpoint
    fp8 = tmp_path / "fp8"
    shutil.copytree(folder, fp8)
    config = json.loads((fp8 / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (fp8 / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoerunError, match="checkpoints quantized with 'fp8' are not supported"):
        moerun.load(str(fp8), device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("checkpoint", ["v3"], indirect=True)  # V2's rules route in torch
def test_v3_routing_kernel_equals_the_torch_rule(pair):
    """DeepSeek-V3's router through the Triton routing kernel (forced, under the
    interpreter; on CUDA it is the default) picks the same experts with the same weights."""
    case, _, ours, _ = pair
    x = torch.randn(7, ours.lm.args.hidden_size, generator=torch.Generator().manual_seed(9))
    for layer in ours.lm.model.layers[1:]:
        router = layer.mlp.gate
        with torch.no_grad():
            ref_ids, ref_w = router(x, kernel=False)
            ids, w = router(x, kernel=True)
        # torch's topk(sorted=False) leaves the order unspecified: compare per token, sorted by id.
        ref_order, order = ref_ids.argsort(dim=-1), ids.argsort(dim=-1)
        assert torch.equal(ids.gather(1, order), ref_ids.gather(1, ref_order))
        torch.testing.assert_close(w.gather(1, order), ref_w.gather(1, ref_order), rtol=1e-5, atol=1e-6)
