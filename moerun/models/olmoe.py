"""OLMoE (allenai/OLMoE-1B-7B): attention whose q and k are RMS-normalised over the whole
projection (all heads at once, before the split into heads) and optionally clamped to
±clip_qkv with v; every layer sparse, routed by the softmax over all experts, top-k
renormalised only when norm_topk_prob; no shared expert.

Shape legend: N tokens, D hidden, E experts, K experts per token.
"""

from __future__ import annotations

import dataclasses

import torch

from moerun.models.base import CausalLM, CheckpointLayout, TransformerArgs, spec, stacked_experts
from moerun.models.qwen3_moe import decoder_layer, moe_block  # Qwen3-MoE's router and q/k-normed attention


@dataclasses.dataclass(kw_only=True)
class ModelArgs(TransformerArgs):
    num_experts: int = spec(minimum=1)
    num_experts_per_tok: int = spec(top_k_of="num_experts")
    rms_norm_eps: float = 1e-5
    norm_topk_prob: bool = False
    clip_qkv: float | None = None
    attention_bias: bool = False


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        rope = args.rotary()
        ffns = [moe_block(args, args.intermediate_size) for _ in range(args.num_hidden_layers)]
        layers = [decoder_layer(args, rope, ffn, qk_norm="full", clip_qkv=args.clip_qkv) for ffn in ffns]
        super().__init__(args, layers)


def sanitize(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Checkpoint names -> ours: only the routed experts differ (stacked w13, w2)."""
    return stacked_experts(weights, range(args.num_hidden_layers), "mlp.experts", args.num_experts)


def checkpoint_tensors(args: ModelArgs) -> dict:
    """The released checkpoint's tensors: name -> (shape, stored dtype, role)."""
    t = CheckpointLayout.decoder(args)
    for i, p in t.layers():
        t.attention_layer(p, args.attention_bias, args.attention_bias, qk_norm="full")
        t.add(f"{p}.mlp.gate.weight", (args.num_experts, args.hidden_size), "routers")
        t.experts(f"{p}.mlp.experts", args.num_experts, args.intermediate_size)
    t.final()
    return t.tensors
