"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): attention with per-head q/k RMSNorm and an
explicit head_dim, no shared expert, routed experts weighted by the softmax over all
experts and renormalised over the top-k when norm_topk_prob; dense layers as in Qwen2-MoE.

Shape legend: N tokens, D hidden, E experts, K experts per token.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from moerun.layers import MLP, Attention, RotaryEmbedding, check_rope_scaling, rope_theta
from moerun.models.base import BaseModelArgs, CausalLM, DecoderLayer, moe_layer_indices, stack_experts
from moerun.moe.experts import RoutedExperts
from moerun.moe.routing import softmax_topk


@dataclasses.dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    # Hub configs say num_experts; transformers 5 saves num_local_experts.
    num_experts: int | None = None
    num_local_experts: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = dataclasses.field(default_factory=list)
    attention_bias: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    rope_theta: float | None = None
    rope_parameters: dict | None = None
    rope_scaling: dict | None = None

    def __post_init__(self):
        from moerun.errors import MoerunError

        self.num_experts = self.num_experts or self.num_local_experts
        if not self.num_experts:
            raise MoerunError("config.json lacks num_experts (needed by qwen3_moe)")
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        check_rope_scaling(dataclasses.asdict(self))
        self.rope_theta = rope_theta(dataclasses.asdict(self))
        self.moe_layers = moe_layer_indices(
            self.num_hidden_layers, self.num_experts, self.decoder_sparse_step, self.mlp_only_layers
        )


class SparseMoeBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k, self.norm_topk_prob = args.num_experts_per_tok, args.norm_topk_prob
        self.gate = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.experts = RoutedExperts(args.num_experts, args.hidden_size, args.moe_intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        logits = self.gate(x)
        ids, weights = softmax_topk(logits, self.top_k, self.norm_topk_prob, weights_dtype=logits.dtype)
        return self.experts(x, ids, weights).reshape(shape)


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        rope = RotaryEmbedding(args.head_dim, args.rope_theta)
        window = args.sliding_window if args.use_sliding_window else None
        layers = [
            DecoderLayer(
                Attention(
                    args.hidden_size,
                    args.num_attention_heads,
                    args.num_key_value_heads,
                    args.head_dim,
                    rope,
                    qkv_bias=args.attention_bias,
                    o_bias=args.attention_bias,
                    qk_norm_eps=args.rms_norm_eps,
                    sliding_window=window,
                ),
                SparseMoeBlock(args) if i in args.moe_layers else MLP(args.hidden_size, args.intermediate_size),
                "mlp",
                args.hidden_size,
                args.rms_norm_eps,
            )
            for i in range(args.num_hidden_layers)
        ]
        super().__init__(args, layers, args.num_key_value_heads, args.head_dim)


def sanitize(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Checkpoint names -> ours: only the routed experts differ (stacked w13, w2)."""
    weights = dict(weights)
    for i in args.moe_layers:
        stack_experts(weights, f"model.layers.{i}.mlp.experts", args.num_experts, "gate_proj", "up_proj", "down_proj")
    return weights
