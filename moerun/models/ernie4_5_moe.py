"""ERNIE-4.5 MoE (baidu/ERNIE-4.5-21B-A3B-PT, 300B-A47B-PT): GQA attention (biases on
every projection when use_bias) with RoPE over interleaved pairs, rotated in float32.
Layers i with (i + 1) % moe_layer_interval == 0 and moe_layer_start_index <= i <=
moe_layer_end_index are MoE blocks, the others dense MLPs.

Routing (float32, the gate weight kept in float32): softmax over all experts, the top-k
chosen by softmax + `e_score_correction_bias` (stored as [1, E] under `mlp.moe_statics`),
weighted by the unbiased probabilities divided by max(their sum, moe_norm_min), cast to
the activations' dtype. moe_num_shared_experts shared experts run as one MLP on every
token.

The released checkpoints' multi-token-prediction weights (`mtp_*`) are not described.

Shape legend: D hidden, E routed experts, I expert intermediate.
"""

from __future__ import annotations

import dataclasses

import torch

from moerun.layers import MLP
from moerun.models import base
from moerun.moe.experts import RoutedExperts
from moerun.moe.routing import Router

# Float32 in the reference whatever the model dtype (its _keep_in_fp32_modules_strict).
FLOAT32_PARAMS = (".mlp.gate.weight", ".e_score_correction_bias")


@dataclasses.dataclass(kw_only=True)
class ModelArgs(base.TransformerArgs):
    num_key_value_heads: int = base.spec(minimum=1)  # required here: no default to inherit
    moe_intermediate_size: int
    moe_num_experts: int = base.spec(64, minimum=0)
    moe_k: int = base.spec(6, top_k_of="moe_num_experts")
    moe_num_shared_experts: int = 2
    moe_layer_start_index: int = 1
    moe_layer_end_index: int = -1
    moe_layer_interval: int = 1
    moe_norm_min: float = 1e-12
    use_bias: bool = False
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 131072

    def __post_init__(self):
        super().__post_init__()
        end = self.num_hidden_layers - 1 if self.moe_layer_end_index == -1 else self.moe_layer_end_index
        self.moe_layers = {
            i
            for i in range(self.num_hidden_layers)
            if (i + 1) % self.moe_layer_interval == 0 and self.moe_layer_start_index <= i <= end
        }


def moe_block(args: ModelArgs) -> base.SparseMoeBlock:
    router = Router(
        args.hidden_size,
        args.moe_num_experts,
        args.moe_k,
        renormalize=True,
        renorm_min=args.moe_norm_min,
        correction_bias=True,
        float32_logits=True,
        weights_dtype="input",
    )
    experts = RoutedExperts(args.moe_num_experts, args.hidden_size, args.moe_intermediate_size)
    shared = None
    if args.moe_num_shared_experts:
        shared = MLP(args.hidden_size, args.moe_intermediate_size * args.moe_num_shared_experts, bias=args.use_bias)
    return base.SparseMoeBlock(router, experts, shared=shared, names={"shared": "shared_experts"})


class Model(base.CausalLM):
    def __init__(self, args: ModelArgs):
        rope = args.rotary(default_theta=500000.0, interleaved=True, float32=True)
        ffns = [
            moe_block(args)
            if i in args.moe_layers
            else MLP(args.hidden_size, args.intermediate_size, bias=args.use_bias)
            for i in range(args.num_hidden_layers)
        ]
        layers = [base.attention_layer(args, rope, ffn, qkv_bias=args.use_bias, o_bias=args.use_bias) for ffn in ffns]
        super().__init__(args, layers, lm_head_bias=args.use_bias)


def sanitize(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Checkpoint names -> ours: the routed experts stacked (w13, w2) and the correction
    bias [1, E] moved into the router as [E] (transformers' in-memory name
    mlp.gate.moe_statics... is accepted too)."""
    weights = dict(weights)
    for i in args.moe_layers:
        p = f"model.layers.{i}.mlp"
        base.stack_experts(weights, f"{p}.experts", args.moe_num_experts, "gate_proj", "up_proj", "down_proj")
        for old in (f"{p}.moe_statics.e_score_correction_bias", f"{p}.gate.moe_statics.e_score_correction_bias"):
            if old in weights:
                weights[f"{p}.gate.e_score_correction_bias"] = weights.pop(old).reshape(-1)
    return weights


def checkpoint_tensors(args: ModelArgs) -> dict:
    """The released checkpoint's tensors but the MTP ones: name -> (shape, stored dtype, role)."""
    D, E, bias = args.hidden_size, args.moe_num_experts, args.use_bias
    t = base.CheckpointLayout.decoder(args)
    for i, p in t.layers():
        t.attention_layer(p, bias, bias)
        if i in args.moe_layers:
            t.add(f"{p}.mlp.gate.weight", (E, D), "routers", dtype="F32")
            t.add(f"{p}.mlp.moe_statics.e_score_correction_bias", (1, E), "routers", dtype="F32")
            t.experts(f"{p}.mlp.experts", E, args.moe_intermediate_size)
            if args.moe_num_shared_experts:
                t.swiglu(
                    f"{p}.mlp.shared_experts",
                    args.moe_intermediate_size * args.moe_num_shared_experts,
                    "shared_experts",
                    bias=bias,
                )
        else:
            t.swiglu(f"{p}.mlp", args.intermediate_size, "dense_mlp", bias=bias)
    t.final(lm_head_bias=bias)
    if bias and args.tie_word_embeddings:  # the weight is the embeddings', the bias its own
        t.add("lm_head.bias", (args.vocab_size,), "lm_head")
    return t.tensors
