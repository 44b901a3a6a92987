"""gpt-oss and Llama 4 (multimodal and text-only checkpoints) beyond the checks every
family passes (tests/test_families.py runs them on the checkpoints made here): sliding
windows and attention chunks that matter, the vision tower ignored and counted apart,
sanitize, MXFP4 dequantization equal to transformers', a checkpoint with MXFP4 experts,
and the layout's stored dtypes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moerun
from moerun.models import ARCHITECTURES, build_meta_model, get_architecture
from moerun.quant import mxfp4
from tests.model_fixtures import (
    BASE,
    LLAMA3_ROPE,
    TINY_ATTENTION,
    checkpoint_headers,
    family_fixtures,
    reference_model,
    save_checkpoint,
    tokenized_folder,
)
from tests.parity import rel_err

FAMILIES = ["gpt_oss", "llama4", "llama4_text"]

# gpt-oss' yarn as released (but for its factor of 32 and original length of 4096).
GPT_OSS_YARN = dict(rope_type="yarn", rope_theta=150000.0, factor=8.0, beta_fast=32.0, beta_slow=1.0, truncate=False)
GPT_OSS = dict(
    BASE,
    intermediate_size=32,  # a multiple of 32: MXFP4 blocks
    head_dim=16,
    num_local_experts=4,
    num_experts_per_tok=2,
    sliding_window=6,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    rope_parameters=dict(GPT_OSS_YARN, original_max_position_embeddings=64),
)
# Four experts, top-1, in every second layer: MoE layers 1 and 3, dense 0 and 2.
LLAMA4_MOE = dict(num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2)
# Layer 3: no RoPE, full attention, temperature tuning; the others rotate within chunks of 6.
LLAMA4_ATTENTION = dict(no_rope_layers=[1, 1, 1, 0], attention_chunk_size=6, floor_scale=4, attn_scale=0.5)
# Four layers of heads of 16; experts of 32 beside dense MLPs of 96.
LLAMA4_SIZES = dict(vocab_size=256, num_hidden_layers=4, head_dim=16, intermediate_size=32, intermediate_size_mlp=96)
LLAMA4_TEXT = dict(
    TINY_ATTENTION,
    **LLAMA4_SIZES,
    **LLAMA4_MOE,
    **LLAMA4_ATTENTION,
    rope_parameters=dict(LLAMA3_ROPE, original_max_position_embeddings=64),
)
# The vision tower: one layer, 32 wide, over 28-pixel images in patches of 14, projected at 32.
LLAMA4_PATCHES = dict(
    image_size=28, patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32
)
LLAMA4_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, **LLAMA4_PATCHES)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    # Larger than the init scale so routers and the sampler make real decisions; biases,
    # sinks and router biases too, so that each of them is checked.
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
            elif "norm" not in name:
                p.normal_(0.0, 0.5)


def _save_randomized(model, folder: Path, dtype: torch.dtype, shards: int, seed: int) -> Path:
    _randomize(model, seed)
    return save_checkpoint(model.to(dtype), folder, shards)


def make_gpt_oss(folder: Path, dtype=torch.bfloat16, shards: int = 2, seed: int = 0, **overrides) -> Path:
    import transformers

    folder, ids = tokenized_folder(folder)
    config = transformers.GptOssConfig(**{**GPT_OSS, **ids, **overrides})
    return _save_randomized(transformers.GptOssForCausalLM(config), folder, dtype, shards, seed)


def make_llama4(folder: Path, dtype=torch.bfloat16, shards: int = 2, seed: int = 0, **overrides) -> Path:
    """Llama4ForConditionalGeneration, vision tower included, as the Hub checkpoints are."""
    import transformers

    folder, ids = tokenized_folder(folder)
    text = {**LLAMA4_TEXT, **ids, **overrides}
    config = transformers.Llama4Config(text_config=text, vision_config=LLAMA4_VISION, **ids)
    return _save_randomized(transformers.Llama4ForConditionalGeneration(config), folder, dtype, shards, seed)


def make_llama4_text(folder: Path, dtype=torch.bfloat16, shards: int = 2, seed: int = 0, **overrides) -> Path:
    """Llama4ForCausalLM: a text-only checkpoint (model_type llama4_text, no prefix)."""
    import transformers

    folder, ids = tokenized_folder(folder)
    config = transformers.Llama4TextConfig(**{**LLAMA4_TEXT, **ids, **overrides})
    return _save_randomized(transformers.Llama4ForCausalLM(config), folder, dtype, shards, seed)


MAKERS = {"gpt_oss": make_gpt_oss, "llama4": make_llama4, "llama4_text": make_llama4_text}


pytestmark = pytest.mark.usefixtures("private_cache")
checkpoint, pair = family_fixtures(MAKERS, dtype=torch.bfloat16, shards=3)


# -- parity with transformers -----------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_local_attention_matches_and_matters(tmp_path, family):
    """gpt-oss' sliding window and Llama 4's attention chunks, shorter than the sequence."""
    local = dict(sliding_window=4) if family == "gpt_oss" else dict(attention_chunk_size=5)
    wide = dict(sliding_window=64) if family == "gpt_oss" else dict(attention_chunk_size=64)
    folder = MAKERS[family](tmp_path / "w", dtype=torch.float32, shards=1, **local)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference_model(folder)(ids).logits
    assert rel_err(moerun.load(str(folder), device="cpu", dtype="float32").logits(ids), expected) < 1e-4
    plain = MAKERS[family](tmp_path / "p", dtype=torch.float32, shards=1, **wide)
    assert rel_err(moerun.load(str(plain), device="cpu", dtype="float32").logits(ids)[:, 8:], expected[:, 8:]) > 1e-3


@pytest.mark.parametrize("checkpoint", ["llama4"], indirect=True)
def test_llama4_ignores_the_vision_tower(checkpoint):
    _, folder = checkpoint
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert any(n.startswith("vision_model.") for n in index["weight_map"])
    names = {n for n, _ in moerun.load(str(folder), device="cpu", dtype="float32").lm.named_parameters()}
    assert not any("vision" in n or "projector" in n for n in names)
    assert (
        "model.layers.1.feed_forward.experts.w13" in names and "model.layers.0.feed_forward.gate_proj.weight" in names
    )


# -- sanitize -----------------------------------------------------------------------------


def test_gpt_oss_sanitize_deinterleaves_gate_and_up_and_is_idempotent():
    module = get_architecture("gpt_oss")
    args = module.ModelArgs.from_dict({**GPT_OSS, "model_type": "gpt_oss", "num_hidden_layers": 1})
    E, D, I = 4, 64, 32
    p = "model.layers.0.mlp.experts"
    gate_up = torch.randn(E, D, 2 * I)
    fake = {
        f"{p}.gate_up_proj": gate_up,
        f"{p}.down_proj": torch.randn(E, I, D),
        f"{p}.gate_up_proj_bias": torch.arange(2.0 * I).repeat(E, 1),
        f"{p}.down_proj_bias": torch.randn(E, D),
        "model.norm.weight": torch.ones(D),
    }
    out = module.sanitize(fake, args)
    assert set(out) == {f"{p}.w13", f"{p}.w2", f"{p}.b13", f"{p}.b2", "model.norm.weight"}
    assert out[f"{p}.w13"].shape == (E, 2 * I, D) and out[f"{p}.w2"].shape == (E, D, I)
    assert torch.equal(out[f"{p}.w13"][:, :I], gate_up[..., ::2].transpose(1, 2))
    assert torch.equal(out[f"{p}.w13"][:, I:], gate_up[..., 1::2].transpose(1, 2))
    assert out[f"{p}.b13"][0, :3].tolist() == [0, 2, 4] and out[f"{p}.b13"][0, I : I + 3].tolist() == [1, 3, 5]
    assert module.sanitize(out, args).keys() == out.keys()


def test_llama4_sanitize_strips_the_prefix_and_transposes_experts():
    module = get_architecture("llama4")
    args = module.ModelArgs.from_dict({"model_type": "llama4", "text_config": LLAMA4_TEXT})
    assert args.moe_layers == [1, 3] and args.layer_types[3] == "full_attention"
    E, D, I = 4, 64, 32
    gate_up = torch.randn(E, D, 2 * I)
    p = "language_model.model.layers.1.feed_forward.experts"
    fake = {
        f"{p}.gate_up_proj": gate_up,
        f"{p}.down_proj": torch.randn(E, I, D),
        "language_model.lm_head.weight": torch.randn(8, D),
        "vision_model.x.weight": torch.randn(2),
        "multi_modal_projector.linear_1.weight": torch.randn(2),
    }
    out = module.sanitize(fake, args)
    q = "model.layers.1.feed_forward.experts"
    assert set(out) == {f"{q}.w13", f"{q}.w2", "lm_head.weight"}
    assert torch.equal(out[f"{q}.w13"][:, :I], gate_up[..., :I].transpose(1, 2))  # gate rows first
    assert out[f"{q}.w2"].shape == (E, D, I)
    assert module.sanitize(out, args).keys() == out.keys()


# -- checkpoint layout --------------------------------------------------------------------

VISION = ("vision_model.", "multi_modal_projector.")
_STORED = {torch.bfloat16: "BF16", torch.float32: "F32", torch.uint8: "U8"}


def check_layout(folder: Path) -> dict:
    """checkpoint_tensors names every saved text-model tensor with its shape and dtype (the
    vision tower: none), and sanitized as meta tensors it gives exactly the model's parameters."""
    from moerun.models.base import parameter_roles

    lm, arch = build_meta_model(json.loads((folder / "config.json").read_text()))
    layout = arch.checkpoint_tensors(lm.args)
    headers = checkpoint_headers(folder)
    text = {n: (tuple(s), _STORED[d]) for n, (s, d) in headers.items() if not n.startswith(VISION)}
    assert {n: (s, d) for n, (s, d, _) in layout.items()} == text
    meta = arch.sanitize({n: torch.empty(s, device="meta") for n, (s, _, _) in layout.items()}, lm.args)
    params = dict(lm.named_parameters())
    assert {n: tuple(t.shape) for n, t in meta.items()} == {n: tuple(p.shape) for n, p in params.items()}
    if not getattr(lm.args, "mxfp4", False):  # unquantized: the same numbers per role
        by_role = {}
        for n, (shape, _, role) in layout.items():
            by_role[role] = by_role.get(role, 0) + torch.Size(shape).numel()
        roles = parameter_roles(lm)
        assert by_role == {r: sum(params[n].numel() for n in params if roles[n] == r) for r in set(roles.values())}
    return layout


def test_checkpoint_tensors_describe_the_saved_checkpoint(checkpoint):
    family, folder = checkpoint
    layout = check_layout(folder)
    assert family in ARCHITECTURES
    prefix = "language_model." if family == "llama4" else ""
    assert all(n.startswith(prefix) for n in layout) and prefix + "lm_head.weight" in layout


@pytest.mark.parametrize("checkpoint", ["llama4"], indirect=True)
def test_planner_counts_the_vision_tower_as_not_loaded(checkpoint):
    from moerun import plan

    _, folder = checkpoint
    headers = checkpoint_headers(folder)
    vision = sum(torch.Size(s).numel() for n, (s, _) in headers.items() if n.startswith(VISION))
    summary = plan.summarize(json.loads((folder / "config.json").read_text()), headers)
    assert vision > 0 and summary.unused_params == vision


def test_gpt_oss_layout_follows_the_quantization_config():
    module = get_architecture("gpt_oss")
    cfg = {**GPT_OSS, "model_type": "gpt_oss"}
    bf16 = module.checkpoint_tensors(module.ModelArgs.from_dict(cfg))
    mxfp4_cfg = {**cfg, "quantization_config": {"quant_method": "mxfp4"}}
    released = module.checkpoint_tensors(module.ModelArgs.from_dict(mxfp4_cfg))
    p = "model.layers.0.mlp.experts"
    assert bf16[f"{p}.gate_up_proj"] == ((4, 64, 64), "BF16", "routed_experts") and f"{p}.down_proj_blocks" not in bf16
    assert released[f"{p}.gate_up_proj_blocks"] == ((4, 64, 2, 16), "U8", "routed_experts")
    assert released[f"{p}.down_proj_scales"] == ((4, 64, 1), "U8", "routed_experts")
    assert released[f"{p}.gate_up_proj_bias"] == ((4, 64), "BF16", "routed_experts")
    assert f"{p}.gate_up_proj" not in released


# -- MXFP4 ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_mxfp4_dequantize_equals_transformers(dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 4, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(100, 140, (3, 40, 4), dtype=torch.uint8, generator=g)
    expected = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    got = mxfp4.dequantize(blocks, scales, dtype)
    assert got.dtype == dtype and torch.equal(got, expected)


def test_mxfp4_quantize_round_trips_dequantized_blocks():
    w = torch.randn(5, 8, 64, generator=torch.Generator().manual_seed(1))
    blocks, scales = mxfp4.quantize_rows(w)
    deq = mxfp4.dequantize_rows(blocks, scales, torch.float32)
    assert rel_err(deq, w) < 0.15  # 4-bit, 8-bit shared exponent
    assert all(torch.equal(a, b) for a, b in zip(mxfp4.quantize_rows(deq), (blocks, scales)))


def test_gpt_oss_checkpoint_with_mxfp4_experts(tmp_path):
    """Experts stored as the released checkpoints store them: the reference is the same
    model with the dequantized experts, saved by transformers in bf16 (exact: FP4 values
    times powers of two fit bf16)."""
    import transformers
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    dense, _ = tokenized_folder(tmp_path / "bf16")
    config = transformers.GptOssConfig(**GPT_OSS)
    model = transformers.GptOssForCausalLM(config)
    _randomize(model, 3)
    E, D, I = config.num_local_experts, config.hidden_size, config.intermediate_size
    g = torch.Generator().manual_seed(4)
    packed = {}
    for i, layer in enumerate(model.model.layers):
        # Rows are output features: gate_up [E, 2I (interleaved), D/32, 16], down [E, D, I/32, 16].
        for name, rows, cols in (("gate_up_proj", 2 * I, D), ("down_proj", D, I)):
            blocks = torch.randint(0, 256, (E, rows, cols // 32, 16), dtype=torch.uint8, generator=g)
            scales = torch.randint(122, 126, (E, rows, cols // 32), dtype=torch.uint8, generator=g)
            packed[f"model.layers.{i}.mlp.experts.{name}_blocks"] = blocks
            packed[f"model.layers.{i}.mlp.experts.{name}_scales"] = scales
            with torch.no_grad():
                getattr(layer.mlp.experts, name).copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    save_checkpoint(model.to(torch.bfloat16), dense, shards=1)

    quantized = tmp_path / "mxfp4"
    shutil.copytree(dense, quantized)
    tensors = load_file(str(quantized / "model.safetensors"))
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        del tensors[name]
    tensors.update(packed)
    save_file(tensors, str(quantized / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((quantized / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (quantized / "config.json").write_text(json.dumps(cfg))
    assert any(n.endswith("_blocks") for n in check_layout(quantized))

    ids = torch.randint(0, 256, (2, 15), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = reference_model(dense)(ids).logits
    got = moerun.load(str(quantized), device="cpu", dtype="float32").logits(ids)
    assert rel_err(got, expected) < 1e-4
    # The experts dequantize bit-equal (above); the two files hold the other weights at other
    # offsets, where torch's BLAS may take another path (see test_qwen3_next): rounding.
    assert rel_err(got, moerun.load(str(dense), device="cpu", dtype="float32").logits(ids)) < 1e-6
    # And through the quantized expert store, offloaded to one slot.
    four = moerun.load(str(quantized), bits=4, device="cpu", dtype="float32")
    assert (
        rel_err(
            moerun.load(str(quantized), bits=4, device="cpu", dtype="float32", expert_slots=1).logits(ids),
            four.logits(ids),
        )
        < 1e-6
    )
