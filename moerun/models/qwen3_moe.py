"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): attention with per-head q/k RMSNorm and an
explicit head_dim, no shared expert, routed experts weighted by the softmax over all
experts and renormalised over the top-k when norm_topk_prob; dense layers as in Qwen2-MoE.

Shape legend: N tokens, D hidden, E experts, K experts per token.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from moerun.errors import MoerunError
from moerun.layers import MLP
from moerun.models import base
from moerun.moe.experts import RoutedExperts
from moerun.moe.routing import Router

# The tool-call format its chat template writes (moerun/tool_calls.py): Qwen3's templates write
# `<tool_call>{json}</tool_call>`; Qwen3-Coder's the XML body `<function=...>`.
TOOL_CALL_FORMAT = "qwen"


@dataclasses.dataclass(kw_only=True)
class ModelArgs(base.QwenMoeArgs):
    # Hub configs say num_experts; transformers 5 saves num_local_experts.
    num_experts: int | None = base.spec(None, minimum=1)
    num_local_experts: int | None = base.spec(None, minimum=1)
    attention_bias: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = base.spec(None, minimum=0)  # 0 or null: no window

    def __post_init__(self):
        self.num_experts = self.num_experts or self.num_local_experts
        if not self.num_experts:
            raise MoerunError("config.json lacks num_experts (needed by qwen3_moe)")
        super().__post_init__()


def moe_block(args, intermediate_size: int | None = None, **shared) -> base.SparseMoeBlock:
    """Routed experts of `intermediate_size` (by default moe_intermediate_size), no shared
    one (OLMoE's block too); Qwen2-MoE passes its gated shared expert (`shared`,
    `shared_gate`)."""
    # Softmax over all experts, top-k, renormalised when norm_topk_prob; weights in the logits' dtype.
    router = Router(
        args.hidden_size,
        args.num_experts,
        args.num_experts_per_tok,
        renormalize=args.norm_topk_prob,
        weights_dtype="logits",
    )
    inter = intermediate_size or args.moe_intermediate_size
    return base.SparseMoeBlock(router, RoutedExperts(args.num_experts, args.hidden_size, inter), **shared)


def decoder_layer(args, rope, ffn: nn.Module, qk_norm: str = "head", **options) -> base.DecoderLayer:
    """Attention with q/k RMSNorm (per head; OLMoE's over the whole projection) and
    attention_bias on every projection (Qwen3-Next's gated too, through `options`), then `ffn`."""
    return base.attention_layer(
        args,
        rope,
        ffn,
        qkv_bias=args.attention_bias,
        o_bias=args.attention_bias,
        qk_norm=qk_norm,
        qk_norm_eps=args.rms_norm_eps,
        **options,
    )


class Model(base.CausalLM):
    def __init__(self, args: ModelArgs):
        rope = args.rotary()
        window = args.sliding_window if args.use_sliding_window else None
        ffns = [
            moe_block(args) if i in args.moe_layers else MLP(args.hidden_size, args.intermediate_size)
            for i in range(args.num_hidden_layers)
        ]
        super().__init__(args, [decoder_layer(args, rope, ffn, sliding_window=window) for ffn in ffns])


def sanitize(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Checkpoint names -> ours: only the routed experts differ (stacked w13, w2)."""
    return base.stacked_experts(weights, args.moe_layers, "mlp.experts", args.num_experts)


def checkpoint_tensors(args: ModelArgs) -> dict:
    """The released checkpoint's tensors: name -> (shape, stored dtype, role)."""
    t = base.CheckpointLayout.decoder(args)
    for i, p in t.layers():
        t.attention_layer(p, args.attention_bias, args.attention_bias, qk_norm="head")
        if i in args.moe_layers:
            t.add(f"{p}.mlp.gate.weight", (args.num_experts, args.hidden_size), "routers")
            t.experts(f"{p}.mlp.experts", args.num_experts, args.moe_intermediate_size)
        else:
            t.swiglu(f"{p}.mlp", args.intermediate_size, "dense_mlp")
    t.final()
    return t.tensors
