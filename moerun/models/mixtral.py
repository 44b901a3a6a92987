"""Mixtral (mistralai/Mixtral-8x7B and 8x22B): GQA attention with RoPE and an optional
sliding window, and a sparse MoE block per layer (`block_sparse_moe`) whose router takes
the top-k of the logits and softmaxes over those k.

Shape legend: N tokens, D hidden, E experts, K experts per token.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from moerun.layers import Attention, RotaryEmbedding, check_rope_scaling, rope_theta
from moerun.models.base import BaseModelArgs, CausalLM, DecoderLayer, stack_experts
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
    num_local_experts: int
    num_experts_per_tok: int
    rms_norm_eps: float = 1e-5
    head_dim: int | None = None
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    rope_theta: float | None = None
    rope_parameters: dict | None = None
    rope_scaling: dict | None = None

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        check_rope_scaling(dataclasses.asdict(self))
        self.rope_theta = rope_theta(dataclasses.asdict(self), default=1e6)


class SparseMoeBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.gate = nn.Linear(args.hidden_size, args.num_local_experts, bias=False)
        self.experts = RoutedExperts(args.num_local_experts, args.hidden_size, args.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        # Mixtral keeps the routing weights in float32 (renormalised top-k softmax).
        ids, weights = softmax_topk(self.gate(x), self.top_k, renormalize=True)
        return self.experts(x, ids, weights).reshape(shape)


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        rope = RotaryEmbedding(args.head_dim, args.rope_theta)
        layers = [
            DecoderLayer(
                Attention(
                    args.hidden_size,
                    args.num_attention_heads,
                    args.num_key_value_heads,
                    args.head_dim,
                    rope,
                    sliding_window=args.sliding_window,
                ),
                SparseMoeBlock(args),
                "block_sparse_moe",
                args.hidden_size,
                args.rms_norm_eps,
            )
            for _ in range(args.num_hidden_layers)
        ]
        super().__init__(args, layers, args.num_key_value_heads, args.head_dim)


def sanitize(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Checkpoint names -> ours: only the experts differ (w1/w3/w2 per expert -> stacked w13, w2)."""
    weights = dict(weights)
    for i in range(args.num_hidden_layers):
        stack_experts(weights, f"model.layers.{i}.block_sparse_moe.experts", args.num_local_experts, "w1", "w3", "w2")
    return weights
