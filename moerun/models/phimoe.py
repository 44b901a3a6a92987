"""Phi-3.5-MoE (microsoft/Phi-3.5-MoE-instruct): Mixtral's layout (`block_sparse_moe`,
experts `w1/w2/w3`) with LayerNorm (weight and bias) instead of RMSNorm, attention
biases as configured, an lm_head bias, LongRoPE, and SparseMixer routing: two experts
picked one after the other, each weighted by a softmax over the logits that lie within
a relative `router_jitter_noise` band of the current best (the inference path).

Shape legend: B batch, T tokens, N tokens flattened, D hidden, Dh head dim, E experts.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from moerun.errors import MoerunError
from moerun.layers import Attention, RotaryEmbedding, rope_theta
from moerun.models.base import BaseModelArgs, CausalLM, DecoderLayer, stack_experts
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
    num_key_value_heads: int | None = None
    num_experts_per_tok: int = 2
    rms_norm_eps: float = 1e-5  # the LayerNorms' eps, under this name in config.json
    router_jitter_noise: float = 0.01
    attention_bias: bool = False
    lm_head_bias: bool = False
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 131072
    original_max_position_embeddings: int | None = None
    rope_theta: float | None = None
    rope_parameters: dict | None = None
    rope_scaling: dict | None = None

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.hidden_size // self.num_attention_heads
        self.rope_theta = rope_theta(dataclasses.asdict(self), default=1e6)
        # Hub configs say rope_scaling {"type": "longrope", ...}; transformers 5 saves
        # rope_parameters {"rope_type": ..., "rope_theta": ...}.
        self.longrope = None
        for params in (self.rope_scaling, self.rope_parameters):
            kind = (params or {}).get("rope_type", (params or {}).get("type", "default"))
            if kind in ("longrope", "su"):
                self.longrope = params
            elif kind not in ("default", None):
                raise MoerunError(f"rope scaling type '{kind}' is not supported for phimoe")
        if self.longrope and self.longrope.get("original_max_position_embeddings") is None:
            if self.original_max_position_embeddings is None:
                raise MoerunError("config.json lacks original_max_position_embeddings (needed by longrope)")
            self.longrope = {**self.longrope, "original_max_position_embeddings": self.original_max_position_embeddings}


class LongRoPE(nn.Module):
    """Rotate-half RoPE whose frequencies are divided per dimension by `short_factor`, or
    by `long_factor` once the sequence outgrows original_max_position_embeddings, and whose
    cos/sin are scaled by `short_mscale` / `long_mscale`. The choice follows the length
    seen by this call (start + T), as the reference's max(position_ids) + 1.

    Past the original length transformers 5.23's phimoe keeps the short factors (its
    forward recomputes them without the length) and only switches the mscale; this follows
    Microsoft's reference code and transformers' phi3, which switch both."""

    def __init__(self, head_dim: int, theta: float, params: dict, max_position_embeddings: int):
        super().__init__()
        self.original_max = int(params["original_max_position_embeddings"])
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
        base = theta**exponent
        # Plain attributes on the CPU, not buffers: models are built on the meta device.
        factors = torch.tensor([params["short_factor"], params["long_factor"]], dtype=torch.float32, device="cpu")
        self.inv_freq = 1.0 / (factors * base)  # [2, Dh/2]: short, long
        # transformers' longrope default when the config gives no mscale.
        factor = params.get("factor") or max_position_embeddings / self.original_max
        default = math.sqrt(1 + math.log(factor) / math.log(self.original_max)) if factor > 1 else 1.0
        mscale = [params.get(k) or params.get("attention_factor") or default for k in ("short_mscale", "long_mscale")]
        self.mscale = torch.tensor(mscale, dtype=torch.float32, device="cpu")  # [2]

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [T] -> cos, sin [T, Dh]. Long or short is picked on the device (no host
        # sync), from the length this call reaches, as the reference's max(position_ids) + 1.
        if self.inv_freq.device != positions.device:
            self.inv_freq, self.mscale = self.inv_freq.to(positions.device), self.mscale.to(positions.device)
        long = positions.max() + 1 > self.original_max  # 0-d bool on the device
        # torch.where, not indexing by `long`: a 0-d tensor index is read back to the host
        # (a sync, which a CUDA-graph capture forbids).
        inv_freq = torch.where(long, self.inv_freq[1], self.inv_freq[0])
        mscale = torch.where(long, self.mscale[1], self.mscale[0])
        freqs = positions.float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * mscale).to(dtype), (emb.sin() * mscale).to(dtype)


def sparsemixer_top2(logits: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseMixer at inference: logits [N, E] -> (ids [N, 2], weights [N, 2]) in the
    logits' dtype. Each pick is the best remaining expert; its weight is its probability
    under a softmax restricted to the experts whose logit lies within a relative
    2*jitter_eps of that best (the others are masked to -inf)."""

    def pick(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        best, idx = scores.max(dim=-1, keepdim=True)  # [N, 1]
        factor = logits.abs().clamp(min=best)
        far = ((best - logits) / factor) > 2 * jitter_eps
        probs = torch.softmax(scores.masked_fill(far, float("-inf")), dim=-1)
        return idx, probs.gather(-1, idx)

    first, w_first = pick(logits)
    second, w_second = pick(torch.scatter(logits, -1, first, float("-inf")))
    return torch.cat((first, second), dim=-1), torch.cat((w_first, w_second), dim=-1)


class SparseMoeBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = 2  # SparseMixer always picks two, whatever num_experts_per_tok says
        self.jitter_eps = args.router_jitter_noise
        self.gate = nn.Linear(args.hidden_size, args.num_local_experts, bias=False)
        self.experts = RoutedExperts(args.num_local_experts, args.hidden_size, args.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        ids, weights = sparsemixer_top2(self.gate(x), self.jitter_eps)
        return self.experts(x, ids, weights).reshape(shape)


class PhimoeDecoderLayer(DecoderLayer):
    def __init__(self, args: ModelArgs, rope: nn.Module):
        attn = Attention(
            args.hidden_size,
            args.num_attention_heads,
            args.num_key_value_heads,
            args.head_dim,
            rope,
            qkv_bias=args.attention_bias,
            o_bias=args.attention_bias,
            sliding_window=args.sliding_window,
        )
        super().__init__(attn, SparseMoeBlock(args), "block_sparse_moe", args.hidden_size, args.rms_norm_eps)
        self.input_layernorm = nn.LayerNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(args.hidden_size, eps=args.rms_norm_eps)


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        if args.longrope:
            rope = LongRoPE(args.head_dim, args.rope_theta, args.longrope, args.max_position_embeddings)
        else:
            rope = RotaryEmbedding(args.head_dim, args.rope_theta)
        layers = [PhimoeDecoderLayer(args, rope) for _ in range(args.num_hidden_layers)]
        super().__init__(args, layers, args.num_key_value_heads, args.head_dim)
        self.model.norm = nn.LayerNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=args.lm_head_bias)


def sanitize(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Checkpoint names -> ours: only the experts differ (w1/w3/w2 per expert -> stacked w13, w2)."""
    weights = dict(weights)
    for i in range(args.num_hidden_layers):
        stack_experts(weights, f"model.layers.{i}.block_sparse_moe.experts", args.num_local_experts, "w1", "w3", "w2")
    return weights
