"""OLMoE (allenai/OLMoE-1B-7B): attention whose q and k are RMS-normalised over the whole
projection (all heads at once, before the split into heads) and optionally clamped to
±clip_qkv with v; every layer sparse, routed by the softmax over all experts, top-k
renormalised only when norm_topk_prob; no shared expert.

Shape legend: N tokens, D hidden, E experts, K experts per token.
"""

from __future__ import annotations

import dataclasses

import torch

from moerun.models.base import CausalLM, CheckpointLayout, SparseMoeBlock, TransformerArgs, attention_layer, spec, stack_experts
from moerun.moe.experts import RoutedExperts
from moerun.moe.routing import Router


@dataclasses.dataclass(kw_only=True)
class ModelArgs(TransformerArgs):
    num_experts: int = spec(minimum=1)
    num_experts_per_tok: int = spec(top_k_of="num_experts")
    rms_norm_eps: float = 1e-5
    norm_topk_prob: bool = False
    clip_qkv: float | None = None
    attention_bias: bool = False


def moe_block(args: ModelArgs) -> SparseMoeBlock:
    # Softmax over all experts, top-k, renormalised when norm_topk_prob; weights in the logits' dtype.
    router = Router(args.hidden_size, args.num_experts, args.num_experts_per_tok, renormalize=args.norm_topk_prob,
                    weights_dtype="logits")  # fmt: skip
    return SparseMoeBlock(router, RoutedExperts(args.num_experts, args.hidden_size, args.intermediate_size))


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        rope = args.rotary()
        layers = [
            attention_layer(args, rope, moe_block(args), qkv_bias=args.attention_bias, o_bias=args.attention_bias,
                            qk_norm="full", qk_norm_eps=args.rms_norm_eps, clip_qkv=args.clip_qkv)  # fmt: skip
            for _ in range(args.num_hidden_layers)
        ]
        super().__init__(args, layers)


def sanitize(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Checkpoint names -> ours: only the routed experts differ (stacked w13, w2)."""
    weights = dict(weights)
    for i in range(args.num_hidden_layers):
        stack_experts(weights, f"model.layers.{i}.mlp.experts", args.num_experts, "gate_proj", "up_proj", "down_proj")
    return weights


def checkpoint_tensors(args: ModelArgs) -> dict:
    """The released checkpoint's tensors: name -> (shape, stored dtype, role)."""
    t = CheckpointLayout(args)
    t.embeddings()
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}"
        t.attention_layer(p, args.attention_bias, args.attention_bias, qk_norm="full")
        t.add(f"{p}.mlp.gate.weight", (args.num_experts, args.hidden_size), "routers")
        t.experts(f"{p}.mlp.experts", args.num_experts, args.intermediate_size)
    t.final()
    return t.tensors
