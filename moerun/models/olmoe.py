"""OLMoE (allenai/OLMoE-1B-7B): attention whose q and k are RMS-normalised over the whole
projection (all heads at once, before the split into heads) and optionally clamped to
±clip_qkv with v; every layer sparse, routed by the softmax over all experts, top-k
renormalised only when norm_topk_prob; no shared expert.

Shape legend: B batch, T tokens, N tokens flattened, D hidden, H query heads, K kv heads,
Dh head dim, E experts.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from moerun.layers import (
    Attention,
    KVCache,
    RMSNorm,
    RotaryEmbedding,
    Start,
    apply_rope,
    attend,
    attention_mask_or_none,
    check_rope_scaling,
    rope_theta,
    token_positions,
)
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
    num_experts: int
    num_experts_per_tok: int
    num_key_value_heads: int | None = None
    rms_norm_eps: float = 1e-5
    norm_topk_prob: bool = False
    clip_qkv: float | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    rope_theta: float | None = None
    rope_parameters: dict | None = None
    rope_scaling: dict | None = None

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.hidden_size // self.num_attention_heads
        check_rope_scaling(dataclasses.asdict(self))
        self.rope_theta = rope_theta(dataclasses.asdict(self))


class OlmoeAttention(Attention):
    """GQA whose q/k norms span the full projection ([H*Dh] and [K*Dh]), then clip_qkv."""

    def __init__(self, args: ModelArgs, rope: RotaryEmbedding):
        super().__init__(
            args.hidden_size,
            args.num_attention_heads,
            args.num_key_value_heads,
            args.head_dim,
            rope,
            qkv_bias=args.attention_bias,
            o_bias=args.attention_bias,
        )
        self.q_norm = RMSNorm(args.num_attention_heads * args.head_dim, args.rms_norm_eps)
        self.k_norm = RMSNorm(args.num_key_value_heads * args.head_dim, args.rms_norm_eps)
        self.clip_qkv = args.clip_qkv

    def forward(self, x: torch.Tensor, cache: KVCache, start: Start) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.q_norm(self.q_proj(x)), self.k_norm(self.k_proj(x)), self.v_proj(x)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, K, T, Dh]
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)

        cos, sin = self.rope(token_positions(start, T, x.device), x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = cache.update(k, v, start)  # [B, K, S, Dh]

        mask = attention_mask_or_none(start, T, None, x.device)
        out = attend(q, k, v, mask, self.head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class SparseMoeBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k, self.norm_topk_prob = args.num_experts_per_tok, args.norm_topk_prob
        self.gate = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.experts = RoutedExperts(args.num_experts, args.hidden_size, args.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        logits = self.gate(x)
        ids, weights = softmax_topk(logits, self.top_k, self.norm_topk_prob, weights_dtype=logits.dtype)
        return self.experts(x, ids, weights).reshape(shape)


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        rope = RotaryEmbedding(args.head_dim, args.rope_theta)
        layers = [
            DecoderLayer(OlmoeAttention(args, rope), SparseMoeBlock(args), "mlp", args.hidden_size, args.rms_norm_eps)
            for _ in range(args.num_hidden_layers)
        ]
        super().__init__(args, layers, args.num_key_value_heads, args.head_dim)


def sanitize(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Checkpoint names -> ours: only the routed experts differ (stacked w13, w2)."""
    weights = dict(weights)
    for i in range(args.num_hidden_layers):
        stack_experts(weights, f"model.layers.{i}.mlp.experts", args.num_experts, "gate_proj", "up_proj", "down_proj")
    return weights
