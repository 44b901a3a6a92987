"""GraniteMoE (ibm-granite/granite-3.0-1b-a400m, -3b-a800m): Mixtral's shape with four
multipliers — embeddings times `embedding_multiplier`, each residual branch times
`residual_multiplier`, `attention_multiplier` as the softmax scale (not 1/sqrt(Dh)), and
logits divided by `logits_scaling` — and experts stored fused per layer:
`block_sparse_moe.input_linear.weight` [E, 2I, D] (gate rows, then up rows) and
`output_linear.weight` [E, D, I], routed by a softmax over the top-k logits.

Shape legend: B batch, T tokens, N tokens flattened, D hidden, H query heads, K kv heads,
Dh head dim, E experts, V vocab.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from moerun.layers import (
    Attention,
    KVCache,
    RotaryEmbedding,
    Start,
    apply_rope,
    attend,
    attention_mask_or_none,
    check_rope_scaling,
    rope_theta,
    token_positions,
)
from moerun.models.base import BaseModelArgs, CausalLM, DecoderLayer
from moerun.moe.experts import RoutedExperts


@dataclasses.dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_local_experts: int
    num_experts_per_tok: int
    num_key_value_heads: int | None = None
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float = 1.0
    logits_scaling: float = 1.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    rope_theta: float | None = None
    rope_parameters: dict | None = None
    rope_scaling: dict | None = None

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.hidden_size // self.num_attention_heads
        check_rope_scaling(dataclasses.asdict(self))
        self.rope_theta = rope_theta(dataclasses.asdict(self))


class GraniteAttention(Attention):
    """GQA with `attention_multiplier` as the softmax scale."""

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
        self.scale = args.attention_multiplier

    def forward(self, x: torch.Tensor, cache: KVCache, start: Start) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, K, T, Dh]
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)

        cos, sin = self.rope(token_positions(start, T, x.device), x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = cache.update(k, v, start)  # [B, K, S, Dh]

        mask = attention_mask_or_none(start, T, None, x.device)
        out = attend(q, k, v, mask, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class Router(nn.Module):
    """Holds the router weight under the checkpoint's name (`router.layer.weight`)."""

    def __init__(self, hidden_size: int, n_experts: int):
        super().__init__()
        self.layer = nn.Linear(hidden_size, n_experts, bias=False)


class SparseMoeBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.router = Router(args.hidden_size, args.num_local_experts)
        self.experts = RoutedExperts(args.num_local_experts, args.hidden_size, args.intermediate_size)

    @property
    def gate(self) -> nn.Linear:
        # The expert cache's next-layer prefetch applies `block.gate` to guess experts.
        return self.router.layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        # As the reference: top-k of the float32 logits, softmax over those k only.
        logits = self.router.layer(x).float()  # [N, E]
        top, ids = logits.topk(self.top_k, dim=-1)
        weights = torch.softmax(top, dim=-1).to(x.dtype)
        return self.experts(x, ids, weights).reshape(shape)


class GraniteDecoderLayer(DecoderLayer):
    def __init__(self, args: ModelArgs, rope: RotaryEmbedding):
        super().__init__(
            GraniteAttention(args, rope), SparseMoeBlock(args), "block_sparse_moe", args.hidden_size, args.rms_norm_eps
        )
        self.residual_multiplier = args.residual_multiplier

    def forward(self, x: torch.Tensor, cache: KVCache, start: Start) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cache, start) * self.residual_multiplier
        return h + self.block_sparse_moe(self.post_attention_layernorm(h)) * self.residual_multiplier


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        rope = RotaryEmbedding(args.head_dim, args.rope_theta)
        layers = [GraniteDecoderLayer(args, rope) for _ in range(args.num_hidden_layers)]
        super().__init__(args, layers, args.num_key_value_heads, args.head_dim)

    def forward(
        self, input_ids: torch.Tensor, caches: list[KVCache], start: Start = 0, last_only: bool = False
    ) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] (or [B, 1, V] with last_only), as CausalLM,
        with the embedding multiplier and the logits scaling."""
        x = self.model.embed_tokens(input_ids) * self.args.embedding_multiplier
        for layer, cache in zip(self.model.layers, caches):
            x = layer(x, cache, start)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x)) / self.args.logits_scaling


def sanitize(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Checkpoint names -> ours: the fused experts are already in our layout ([E, 2I, D]
    gate then up, [E, D, I]); only their names change."""
    renames = {"input_linear.weight": "experts.w13", "output_linear.weight": "experts.w2"}
    out = {}
    for name, tensor in weights.items():
        head, _, tail = name.partition(".block_sparse_moe.")
        out[f"{head}.block_sparse_moe.{renames[tail]}" if tail in renames else name] = tensor
    return out
