"""Qwen3-Next (Qwen3-Next-80B-A3B): a hybrid of Gated DeltaNet layers (`linear_attention`,
moerun/recurrent/gated_deltanet.py) and gated softmax attention (`full_attention`: q_proj
also gives each head an output gate, per-head q/k RMSNorm, RoPE on the first
partial_rotary_factor of each head), every `full_attention_interval`-th layer unless
`layer_types` says otherwise. The feed-forward is Qwen2-MoE's: softmax routing (top-k
renormalised with norm_topk_prob) plus a shared expert under a sigmoid gate; layers off
the `decoder_sparse_step` grid or in `mlp_only_layers` are dense.

Every RMSNorm but the DeltaNet's gated one is zero-centred: weight applied as 1 + w, in
float32 (transformers' Qwen3NextRMSNorm).

Shape legend: D hidden, E experts, I expert intermediate, H heads, Dh head dim.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from moerun.layers import MLP, RMSNorm
from moerun.models import qwen3_moe  # its attention layer, gated here
from moerun.models.base import CausalLM, CheckpointLayout, DecoderLayer, QwenMoeArgs, spec, stack_experts
from moerun.models.qwen2_moe import moe_block  # Qwen2-MoE's block: the same router, experts, gated shared expert
from moerun.recurrent.gated_deltanet import GatedDeltaNet

# The tool-call format its chat template writes (moerun/tool_calls.py): Qwen3-Next's template writes
# `<tool_call>{json}</tool_call>`.
TOOL_CALL_FORMAT = "qwen"


@dataclasses.dataclass(kw_only=True)
class ModelArgs(QwenMoeArgs):
    # Defaults are the reference config's.
    head_dim: int = 256
    partial_rotary_factor: float = 0.25
    attention_bias: bool = False
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    num_experts: int = spec(512, minimum=0)
    num_experts_per_tok: int = spec(10, top_k_of="num_experts")
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    norm_topk_prob: bool = True
    layer_types: list[str] | None = None
    full_attention_interval: int = 4

    # Qwen3-Next's DeltaNet projections are grouped by key head (Qwen3.5's are not).
    grouped_projections: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if self.layer_types is None:
            self.layer_types = [
                "linear_attention" if (i + 1) % self.full_attention_interval else "full_attention"
                for i in range(self.num_hidden_layers)
            ]


class ZeroCentredRMSNorm(RMSNorm):
    """RMSNorm whose weight w is applied as 1 + w (stored near zero), in float32 before
    the cast back, as Qwen3-Next's norms round."""

    weight_offset = True


def zero_centre_norms(model: nn.Module) -> None:
    """Every shared RMSNorm in `model` (decoder, final and q/k norms) as the zero-centred one."""
    for module in model.modules():
        if type(module) is RMSNorm:
            module.__class__ = ZeroCentredRMSNorm


def decoder_layer(args: ModelArgs, i: int, rope) -> DecoderLayer:
    ffn = moe_block(args) if i in args.moe_layers else MLP(args.hidden_size, args.intermediate_size)
    if args.layer_types[i] == "full_attention":
        return qwen3_moe.decoder_layer(args, rope, ffn, output_gate=True)
    mixer = GatedDeltaNet(
        args.hidden_size,
        args.linear_num_key_heads,
        args.linear_num_value_heads,
        args.linear_key_head_dim,
        args.linear_value_head_dim,
        args.linear_conv_kernel_dim,
        args.rms_norm_eps,
        grouped_projections=args.grouped_projections,
    )
    return DecoderLayer(mixer, ffn, "mlp", args.hidden_size, args.rms_norm_eps, mixer_name="linear_attn")


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        rope = args.rotary()
        super().__init__(args, [decoder_layer(args, i, rope) for i in range(args.num_hidden_layers)])
        zero_centre_norms(self)


def merge_experts(weights: dict[str, torch.Tensor], prefix: str, n_experts: int) -> None:
    """A layer's experts as w13 [E, 2I, D] and w2 [E, D, I], in place: stacked from one
    tensor per expert (as transformers saves them), or renamed from transformers 5's fused
    `gate_up_proj` [E, 2I, D] (gate rows first) and `down_proj` [E, D, I]."""
    if f"{prefix}.gate_up_proj" in weights:
        weights[f"{prefix}.w13"] = weights.pop(f"{prefix}.gate_up_proj")
    if f"{prefix}.down_proj" in weights:
        weights[f"{prefix}.w2"] = weights.pop(f"{prefix}.down_proj")
    stack_experts(weights, prefix, n_experts, "gate_proj", "up_proj", "down_proj")


def sanitize(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Checkpoint names -> ours: only the routed experts differ (w13, w2)."""
    weights = dict(weights)
    for i in args.moe_layers:
        merge_experts(weights, f"model.layers.{i}.mlp.experts", args.num_experts)
    return weights


def text_layout(args: ModelArgs, fused_experts: bool = False) -> CheckpointLayout:
    """The text model's tensors under `model.` and `lm_head.`: Qwen3-Next's, or Qwen3.5's
    (ungrouped DeltaNet projections, per args.grouped_projections; experts fused in one
    tensor each of gate_up_proj and down_proj with fused_experts)."""
    a, D = args, args.hidden_size
    key_dim = a.linear_num_key_heads * a.linear_key_head_dim
    value_dim = a.linear_num_value_heads * a.linear_value_head_dim
    channels, Hv = 2 * key_dim + value_dim, a.linear_num_value_heads
    t = CheckpointLayout.decoder(args)
    for i in range(a.num_hidden_layers):
        p = f"model.layers.{i}"
        t.decoder_norms(p)
        if a.layer_types[i] == "full_attention":
            s, H, K, Dh = f"{p}.self_attn", a.num_attention_heads, a.num_key_value_heads, a.head_dim
            t.linear(f"{s}.q_proj", 2 * H * Dh, D, "attention", a.attention_bias)  # queries and their gates
            t.linear(f"{s}.k_proj", K * Dh, D, "attention", a.attention_bias)
            t.linear(f"{s}.v_proj", K * Dh, D, "attention", a.attention_bias)
            t.linear(f"{s}.o_proj", D, H * Dh, "attention", a.attention_bias)
            t.add(f"{s}.q_norm.weight", (Dh,), "attention")
            t.add(f"{s}.k_norm.weight", (Dh,), "attention")
        else:
            s = f"{p}.linear_attn"
            if a.grouped_projections:
                t.linear(f"{s}.in_proj_qkvz", channels + value_dim, D, "attention")
                t.linear(f"{s}.in_proj_ba", 2 * Hv, D, "attention")
            else:
                t.linear(f"{s}.in_proj_qkv", channels, D, "attention")
                t.linear(f"{s}.in_proj_z", value_dim, D, "attention")
                t.linear(f"{s}.in_proj_b", Hv, D, "attention")
                t.linear(f"{s}.in_proj_a", Hv, D, "attention")
            t.add(f"{s}.conv1d.weight", (channels, 1, a.linear_conv_kernel_dim), "attention")
            t.add(f"{s}.dt_bias", (Hv,), "attention")
            t.add(f"{s}.A_log", (Hv,), "attention")
            t.add(f"{s}.norm.weight", (a.linear_value_head_dim,), "attention")
            t.linear(f"{s}.out_proj", D, value_dim, "attention")
        if i in a.moe_layers:
            E, I = a.num_experts, a.moe_intermediate_size
            t.add(f"{p}.mlp.gate.weight", (E, D), "routers")
            if fused_experts:
                t.add(f"{p}.mlp.experts.gate_up_proj", (E, 2 * I, D), "routed_experts")
                t.add(f"{p}.mlp.experts.down_proj", (E, D, I), "routed_experts")
            else:
                t.experts(f"{p}.mlp.experts", E, I)
            t.swiglu(f"{p}.mlp.shared_expert", a.shared_expert_intermediate_size, "shared_experts")
            t.add(f"{p}.mlp.shared_expert_gate.weight", (1, D), "shared_experts")
        else:
            t.swiglu(f"{p}.mlp", a.intermediate_size, "dense_mlp")
    t.final()
    return t


def checkpoint_tensors(args: ModelArgs) -> dict:
    """The released checkpoint's tensors: name -> (shape, stored dtype, role). Its
    multi-token-prediction layer (`mtp.*`) is left out (never loaded)."""
    return text_layout(args).tensors


def other_checkpoint_layouts(args: ModelArgs) -> list[dict]:
    """sanitize reads the experts fused too (gate_up_proj / down_proj per layer)."""
    return [text_layout(args, fused_experts=True).tensors]
