"""Qwen3-Next and Qwen3.5 MoE (text-only and the multimodal release) held against
transformers 5.25 on tiny random checkpoints saved by it: Gated DeltaNet layers beside
gated attention, zero-centred norms, partial rotary, a shared expert under a sigmoid gate.
Here: the checks every family passes (tests/test_families.py will run them from ROWS),
and what only these families have: the chunked delta rule equal to a plain token-by-token
recurrence, prefill and decode agreeing across chunks, the state's contents, the layer
pattern, the Qwen3.5 release's prefix and fused experts."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moerun
from moerun import plan
from moerun.layers import KVCache, StaticPosition
from moerun.models.base import SparseMoeBlock
from moerun.recurrent import gated_deltanet as gdn
from moerun.weights import CheckpointWeights
from tests.model_fixtures import (
    BASE,
    checkpoint_headers,
    family_fixtures,
    make_checkpoint,
    randomize_matrices,
    reference_model,
    save_checkpoint,
    tokenized_folder,
)
from tests.parity import NoHostSync, rel_err

# 3 DeltaNet layers and 1 gated-attention layer; 2 key heads serving 4 value heads, key and
# value head dims that differ, half of each attention head rotated.
LINEAR_HEADS = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=12)
LINEAR = dict(LINEAR_HEADS, linear_conv_kernel_dim=4)
MOE = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)
ROPE = dict(rope_parameters=dict(rope_type="default", rope_theta=1e6, partial_rotary_factor=0.5))
# What Qwen3-Next and Qwen3.5's text model share: 4 layers of DeltaNet or attention, all MoE.
HYBRID = dict(num_hidden_layers=4, head_dim=16, **LINEAR, **MOE, **ROPE)
QWEN3_NEXT = dict(
    HYBRID,
    layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"],
    mlp_only_layers=[2],  # a dense MLP under a DeltaNet layer
    norm_topk_prob=False,
    attention_bias=True,
)
QWEN3_5_TEXT = dict({k: v for k, v in BASE.items() if k != "intermediate_size"}, **HYBRID)  # no dense layers
QWEN3_5_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14)
VISION = ("model.visual.",)


def perturb_vectors(folder: Path, seed: int = 0) -> None:
    """transformers initialises the zero-centred norms to zeros, the gated norm and dt_bias
    to ones and biases to zeros, and A_log to decays so fast that a token barely sees its
    predecessors; a model that dropped any of them would pass. Randomise them in place."""
    for shard in Path(folder).glob("*.safetensors"):
        tensors = load_file(shard)
        for name, t in tensors.items():
            g = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))  # by name, whatever the sharding
            if name.endswith("A_log"):  # per-token decays exp(g) of about 0.3 to 0.9
                tensors[name] = torch.empty(t.shape).uniform_(0.05, 1.5, generator=g).log().to(t.dtype)
            elif t.dim() == 1:
                tensors[name] = (t.float() + 0.3 * torch.randn(t.shape, generator=g)).to(t.dtype)
        save_file(tensors, shard, metadata={"format": "pt"})


def make_qwen3_next(folder, dtype=torch.bfloat16, shards: int = 2, seed: int = 0, **overrides) -> Path:
    folder = make_checkpoint(folder, "qwen3_next", dtype=dtype, shards=shards, seed=seed, **{**QWEN3_NEXT, **overrides})
    perturb_vectors(folder, seed)
    return folder


def make_qwen3_5_moe_text(folder, dtype=torch.bfloat16, shards: int = 2, seed: int = 0, **overrides) -> Path:
    """Qwen3_5MoeForCausalLM: a text-only checkpoint (no prefix, one tensor per expert)."""
    folder = make_checkpoint(
        folder, "qwen3_5_moe_text", dtype=dtype, shards=shards, seed=seed, **{**QWEN3_5_TEXT, **overrides}
    )
    perturb_vectors(folder, seed)
    return folder


def make_qwen3_5_moe(
    folder, dtype=torch.bfloat16, shards: int = 2, seed: int = 0, released: bool = True, **overrides
) -> Path:
    """Qwen3_5MoeForConditionalGeneration, vision tower included, as the Hub release: text
    model under `model.language_model.`, experts fused (`save_original_format=False`, the
    layout the release has; released=False: one tensor per expert, as save_pretrained
    writes by default)."""
    import transformers

    folder, ids = tokenized_folder(folder)
    config = transformers.Qwen3_5MoeConfig(
        text_config={**QWEN3_5_TEXT, **ids, **overrides}, vision_config=QWEN3_5_VISION
    )
    torch.manual_seed(seed)
    model = transformers.Qwen3_5MoeForConditionalGeneration(config)
    randomize_matrices(model, 0.15)
    save_checkpoint(model.to(dtype), folder, shards, save_original_format=not released)
    (folder / "generation_config.json").write_text(json.dumps(ids))
    perturb_vectors(folder, seed)
    return folder


MAKERS = {"qwen3_next": make_qwen3_next, "qwen3_5_moe_text": make_qwen3_5_moe_text, "qwen3_5_moe": make_qwen3_5_moe}
# The family table's rows: row id -> (maker, checkpoint prefixes the model never loads).
ROWS = {
    "qwen3_next": (make_qwen3_next, ()),
    "qwen3_5_moe_text": (make_qwen3_5_moe_text, ()),
    "qwen3_5_moe": (make_qwen3_5_moe, VISION),
}
FAMILIES = list(MAKERS)


pytestmark = pytest.mark.usefixtures("private_cache")
checkpoint, pair = family_fixtures(MAKERS, dtype=torch.bfloat16, shards=3)


# -- the checks every family passes -------------------------------------------------------


def plain_recurrence(q, k, v, g, beta, S):
    """The gated delta rule one token at a time, straight from its definition: q, k
    [B, H, T, Dk] (L2-normalised), v [B, H, T, Dv], g, beta [B, H, T], S [B, H, Dk, Dv]."""
    q = q * q.shape[-1] ** -0.5
    out = []
    for t in range(q.shape[2]):
        S = S * g[:, :, t, None, None].exp()
        predicted = torch.einsum("bhkv,bhk->bhv", S, k[:, :, t])
        S = S + torch.einsum("bhk,bhv->bhkv", k[:, :, t], beta[:, :, t, None] * (v[:, :, t] - predicted))
        out.append(torch.einsum("bhkv,bhk->bhv", S, q[:, :, t]))
    return torch.stack(out, dim=2), S


def random_rule_inputs(T: int, B: int = 2, H: int = 3, Dk: int = 5, Dv: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k = (gdn.l2norm(torch.randn(B, H, T, Dk, generator=g)) for _ in range(2))
    v = torch.randn(B, H, T, Dv, generator=g)
    decay = -torch.rand(B, H, T, generator=g) * 0.5  # exp(g) in (0.6, 1]: a long memory
    beta = torch.rand(B, H, T, generator=g)
    return q, k, v, decay, beta, torch.randn(B, H, Dk, Dv, generator=g)


@pytest.mark.parametrize("T", [1, 4, 11])
def test_the_chunked_rule_equals_the_plain_recurrence(T):
    q, k, v, g, beta, S0 = random_rule_inputs(T)
    expected, expected_S = plain_recurrence(q, k, v, g, beta, S0)
    got, got_S = gdn.chunk_gated_delta_rule(q, k, v, g, beta, S0, chunk=4)  # T = 11: three chunks, padded
    assert rel_err(got, expected) < 1e-5 and rel_err(got_S, expected_S) < 1e-5
    fresh, _ = gdn.chunk_gated_delta_rule(q, k, v, g, beta, None, chunk=4)
    assert rel_err(fresh, plain_recurrence(q, k, v, g, beta, torch.zeros_like(S0))[0]) < 1e-5
    S, steps = S0, []
    for t in range(T):
        o, S = gdn.recurrent_gated_delta_step(q[:, :, t], k[:, :, t], v[:, :, t], g[:, :, t], beta[:, :, t], S)
        steps.append(o)
    assert rel_err(torch.stack(steps, dim=2), expected) < 1e-5 and rel_err(S, expected_S) < 1e-5


def tiny_mixer(grouped: bool, dtype=torch.float32) -> gdn.GatedDeltaNet:
    mixer = gdn.GatedDeltaNet(64, 2, 4, 8, 12, conv_kernel=4, eps=1e-6, grouped_projections=grouped)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            if name == "A_log":
                p.copy_(torch.empty(p.shape).uniform_(0.05, 1.5, generator=g).log())
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.15 if p.dim() > 1 else 0.5) + (name == "norm.weight"))
    return mixer.to(dtype).eval()


@pytest.fixture(params=[True, False], ids=["qwen3_next", "qwen3_5"])
def mixer(request, monkeypatch):
    """tiny_mixer with grouped projections (Qwen3-Next) or not (Qwen3.5), its prompt scan
    in chunks of 4."""
    monkeypatch.setattr(gdn, "CHUNK", 4)
    return tiny_mixer(request.param)


def test_chunked_prefill_equals_token_by_token_decode(mixer):
    x = torch.randn(2, 13, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = mixer.make_state(2, 32, torch.float32, "cpu")
        prefill = mixer(x, whole, 0)  # 13 tokens: four chunks of 4
        stepped = mixer.make_state(2, 32, torch.float32, "cpu")
        steps = torch.cat([mixer(x[:, t : t + 1], stepped, t) for t in range(13)], dim=1)
    assert rel_err(prefill, steps) < 1e-5
    assert rel_err(whole.recurrent, stepped.recurrent) < 1e-5 and rel_err(whole.conv, stepped.conv) < 1e-6


def test_prefill_then_decode_equals_a_longer_prefill(mixer):
    x = torch.randn(1, 15, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = mixer(x, mixer.make_state(1, 32, torch.float32, "cpu"), 0)
        state = mixer.make_state(1, 32, torch.float32, "cpu")
        eager = [mixer(x[:, :9], state, 0)] + [mixer(x[:, t : t + 1], state, t) for t in range(9, 15)]
        state = mixer.make_state(1, 32, torch.float32, "cpu")
        continued = [mixer(x[:, :9], state, 0), mixer(x[:, 9:], state, 9)]  # a second chunked call
        state = mixer.make_state(1, 32, torch.float32, "cpu")
        mixer(x[:, :9], state, 0)
        index = torch.zeros(1, dtype=torch.long)
        with NoHostSync():  # the CUDA-graph step: the position on the device, no host sync
            static = [mixer(x[:, t : t + 1], state, StaticPosition(index.fill_(t), 16)) for t in range(9, 15)]
    assert rel_err(torch.cat(eager, dim=1), expected) < 1e-5
    assert rel_err(torch.cat(continued, dim=1), expected) < 1e-5
    assert rel_err(torch.cat(static, dim=1), expected[:, 9:]) < 1e-5


def test_the_state_holds_the_conv_window_and_the_recurrent_matrix(monkeypatch):
    monkeypatch.setattr(gdn, "CHUNK", 4)
    mixer = tiny_mixer(grouped=True, dtype=torch.bfloat16)
    x = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(4)).bfloat16()
    state = mixer.make_state(2, 48, torch.bfloat16, "cpu")
    spec = mixer.state_spec()
    channels = 2 * 2 * 8 + 4 * 12
    assert state.conv.shape == (2, channels, 3) and state.recurrent.shape == (2, 4, 8, 12)
    assert state.conv.dtype == state.recurrent.dtype == torch.float32  # whatever the model's dtype
    assert state.max_len == 48 and spec.kind == "deltanet" and spec.per_token == 0
    assert state.nbytes == spec.nbytes(48, dtype_bytes=2, batch=2) == spec.nbytes(4096, dtype_bytes=2, batch=2)
    with torch.no_grad():
        for buffer in state.buffers():  # a new sequence at start 0 ignores what was there
            buffer.normal_(0.0, 3.0)
        out = mixer(x, state, 0)
        assert torch.equal(out, mixer(x, mixer.make_state(2, 48, torch.bfloat16, "cpu"), 0))
        qkv = mixer.project(x)[0]
    assert torch.equal(state.conv, qkv[:, -3:].transpose(1, 2).float())  # the conv's last inputs, exactly
    # The recurrent matrices: what the plain recurrence leaves after the 10 tokens.
    B, T, Hk, Hv, Dk, Dv = 2, 10, 2, 4, 8, 12
    with torch.no_grad():
        conv = mixer.conv(qkv, mixer.make_state(2, 48, torch.bfloat16, "cpu"), fresh=True)
        q, k, v = conv.split([Hk * Dk, Hk * Dk, Hv * Dv], dim=-1)
        _, _, b, a = mixer.project(x)
        g = -mixer.A_log.float().exp() * torch.nn.functional.softplus(a.float() + mixer.dt_bias)
        q, k = (gdn.l2norm(t.reshape(B, T, Hk, Dk).repeat_interleave(2, dim=2).transpose(1, 2).float()) for t in (q, k))
        v = v.reshape(B, T, Hv, Dv).transpose(1, 2).float()
        beta = b.sigmoid().float().transpose(1, 2)
        _, S = plain_recurrence(q, k, v, g.transpose(1, 2), beta, torch.zeros(B, Hv, Dk, Dv))
    assert rel_err(state.recurrent, S) < 1e-5
    state.reset()
    assert not any(t.any() for t in state.buffers())


# -- the models -------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpoint", ["qwen3_next"], indirect=True)
def test_the_layer_pattern_and_its_states(checkpoint):
    _, folder = checkpoint
    model = moerun.load(str(folder), device="cpu", dtype=torch.float32, ctx=48)
    layers = model.lm.model.layers
    assert [layer.mixer_name for layer in layers] == ["linear_attn", "self_attn", "linear_attn", "linear_attn"]
    assert layers[1].self_attn.output_gate and layers[1].self_attn.rope.dim == 8  # half of 16 dims rotated
    assert [type(c) for c in model.kv_caches] == [
        gdn.GatedDeltaNetState,
        KVCache,
        gdn.GatedDeltaNetState,
        gdn.GatedDeltaNetState,
    ]
    # Layer 2 is in mlp_only_layers.
    assert not isinstance(layers[2].mlp, SparseMoeBlock) and isinstance(layers[3].mlp, SparseMoeBlock)
    assert plan.summarize(json.loads((folder / "config.json").read_text())).kv_kind == "deltanet, kv"


def test_a_prompt_over_several_chunks_matches_transformers(pair):
    """150 tokens: three of the reference's (and our) chunks of 64, the state carried across them."""
    _, _, ours, ref = pair
    ids = torch.randint(0, 256, (2, 150), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = ref(ids).logits.float()
    assert rel_err(ours.logits(ids), expected) < 1e-4


def test_qwen3_5_moe_reads_the_release_and_a_transformers_resave_alike(tmp_path):
    released = make_qwen3_5_moe(tmp_path / "r", dtype=torch.float32, shards=2)
    resaved = make_qwen3_5_moe(tmp_path / "s", dtype=torch.float32, shards=2, released=False)
    with CheckpointWeights.open(released) as c:
        names = set(c.headers())
    assert "model.language_model.layers.0.mlp.experts.gate_up_proj" in names and "lm_head.weight" in names
    assert any(n.startswith("model.visual.") for n in names)
    ours = moerun.load(str(released), device="cpu", dtype="float32")
    assert not any("visual" in n for n, _ in ours.lm.named_parameters())
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    expected = ours.logits(ids)
    resaved_logits = moerun.load(str(resaved), device="cpu", dtype="float32").logits(ids)
    assert rel_err(resaved_logits, expected) < 1e-6  # the same parameters
    with torch.no_grad():
        assert rel_err(expected, reference_model(released)(ids).logits) < 1e-4
    # Quantized, the experts are read by name from either layout: the same blobs, one slot or all.
    # Within float rounding, not bit for bit: see test_qwen3_5_moe_text_reads_fused_experts_as_well.
    released_cache, resaved_cache = (
        moerun.load(str(f), device="cpu", dtype="float32", bits=4) for f in (released, resaved)
    )
    assert _same_blobs(released_cache.offload_info["quantized_cache"], resaved_cache.offload_info["quantized_cache"])
    one_slot = moerun.load(str(resaved), device="cpu", dtype="float32", bits=4, expert_slots=1).logits(ids)
    assert rel_err(one_slot, released_cache.logits(ids)) < 1e-6


def _same_blobs(a: str, b: str) -> bool:
    """Two quantized caches hold byte-equal expert blobs, layer by layer."""
    layers = sorted(p.name for p in Path(a).glob("layer-*.safetensors"))
    return (
        bool(layers)
        and layers == sorted(p.name for p in Path(b).glob("layer-*.safetensors"))
        and all(
            all(torch.equal(t, load_file(str(Path(b) / name))[k]) for k, t in load_file(str(Path(a) / name)).items())
            for name in layers
        )
    )


def test_qwen3_5_moe_text_reads_fused_experts_as_well(tmp_path):
    """A text-only checkpoint saved with save_original_format=False (experts fused, as the
    release stores them) loads like one tensor per expert, resident and at 4 bits."""
    per_expert = make_qwen3_5_moe_text(tmp_path / "e", dtype=torch.float32, shards=1)
    fused = tmp_path / "f"
    reference_model(per_expert).save_pretrained(fused, save_original_format=False)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (fused / name).write_bytes((per_expert / name).read_bytes())
    with CheckpointWeights.open(fused) as c:
        assert "model.layers.0.mlp.experts.gate_up_proj" in c.headers()
    ids = torch.randint(0, 256, (1, 11), generator=torch.Generator().manual_seed(1))
    for kwargs in ({}, {"bits": 4, "expert_slots": 1}):
        loads = [moerun.load(str(f), device="cpu", dtype="float32", **kwargs) for f in (per_expert, fused)]
        for (name, p), q in zip(loads[0].lm.named_parameters(), loads[1].lm.parameters()):
            assert torch.equal(p, q), (name, kwargs)  # the very same parameters ...
        # ... at other addresses: each file memory-maps its tensors at its own offsets, and
        # torch's GEMV (MKL, for the 1-row shared_expert_gate) takes an address-dependent path
        # (with every weight copied to fresh memory the logits are bit-equal). So: rounding.
        assert rel_err(loads[0].logits(ids), loads[1].logits(ids)) < 1e-6, kwargs


def test_qwen3_5_moe_counts_the_vision_tower_as_not_loaded(tmp_path):
    folder = make_qwen3_5_moe(tmp_path / "m", shards=1)
    headers = checkpoint_headers(folder)
    vision = sum(torch.Size(s).numel() for n, (s, _) in headers.items() if n.startswith(VISION))
    summary = plan.summarize(json.loads((folder / "config.json").read_text()), headers)
    assert vision > 0 and summary.unused_params == vision


@pytest.mark.parametrize(
    "alias, layers, experts",
    [("qwen3-next-80b-a3b", 48, 512), ("qwen3.5-35b-a3b", 40, 256), ("qwen3.5-122b-a10b", 48, 256)],
)
def test_the_shipped_configs_plan_one_full_attention_layer_in_four(alias, layers, experts):
    config = json.loads((Path(moerun.__file__).parent / "data" / "configs" / f"{alias}.json").read_text())
    summary = plan.summarize(config)
    text = config.get("text_config", config)
    kv = 2 * text["num_key_value_heads"] * text["head_dim"]  # per position, per full-attention layer
    channels = 2 * 16 * 128 + text["linear_num_value_heads"] * 128  # q, k, v through the conv
    recurrent = text["linear_num_value_heads"] * 128 * 128
    assert summary.n_layers == layers and summary.n_experts == experts and len(summary.moe_layers) == layers
    assert summary.kv_cache_bytes(1000, 2) == layers // 4 * kv * 1000 * 2 + 3 * layers // 4 * 4 * (
        3 * channels + recurrent
    )
    assert not summary.warnings
