"""Phi-3.5-MoE (microsoft/Phi-3.5-MoE-instruct): Mixtral's layout (`block_sparse_moe`,
experts `w1/w2/w3`) with LayerNorm (weight and bias) instead of RMSNorm, attention
biases as configured, an lm_head bias, LongRoPE, and SparseMixer routing: two experts
picked one after the other, each weighted by a softmax over the logits that lie within
a relative `router_jitter_noise` band of the current best (the inference path).

LongRoPE past original_max_position_embeddings: transformers 5.23's phimoe keeps the
short factors there (its forward recomputes them without the length) and only switches
the mscale; moerun.rope follows Microsoft's reference code and transformers' phi3,
which switch both.

Shape legend: N tokens, D hidden, E experts.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from moerun.models import base
from moerun.models.mixtral import sanitize  # noqa: F401  (Mixtral's expert layout)
from moerun.moe.experts import RoutedExperts
from moerun.moe.routing import Router


@dataclasses.dataclass(kw_only=True)
class ModelArgs(base.TransformerArgs):
    num_local_experts: int = base.spec(minimum=1)
    num_experts_per_tok: int = base.spec(2, top_k_of="num_local_experts")
    rms_norm_eps: float = 1e-5  # the LayerNorms' eps, under this name in config.json
    router_jitter_noise: float = 0.01
    attention_bias: bool = False
    lm_head_bias: bool = False
    sliding_window: int | None = base.spec(None, minimum=0)  # 0 or null: no window
    max_position_embeddings: int = 131072
    # Hub configs keep it at the top level, beside rope_scaling {"type": "longrope", ...}.
    original_max_position_embeddings: int | None = None


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


class SparseMixer(Router):
    """The gate weight as any Router; the rule is SparseMixer's own. It always picks two
    experts, whatever num_experts_per_tok says."""

    def __init__(self, hidden_size: int, n_experts: int, jitter_eps: float):
        super().__init__(hidden_size, n_experts, top_k=2)
        self.jitter_eps = jitter_eps

    def forward(self, x: torch.Tensor, kernel: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return sparsemixer_top2(self.logits(x), self.jitter_eps)


def layer_norm(args: ModelArgs) -> nn.LayerNorm:
    norm = nn.LayerNorm(args.hidden_size, eps=args.rms_norm_eps)
    norm.role = "norms"
    return norm


def decoder_layer(args: ModelArgs, rope) -> base.DecoderLayer:
    moe = base.SparseMoeBlock(
        SparseMixer(args.hidden_size, args.num_local_experts, args.router_jitter_noise),
        RoutedExperts(args.num_local_experts, args.hidden_size, args.intermediate_size),
    )
    layer = base.attention_layer(
        args,
        rope,
        moe,
        "block_sparse_moe",
        qkv_bias=args.attention_bias,
        o_bias=args.attention_bias,
        sliding_window=args.sliding_window,
    )
    # LayerNorm (weight and bias) in place of the RMSNorms.
    layer.input_layernorm, layer.post_attention_layernorm = layer_norm(args), layer_norm(args)
    return layer


class Model(base.CausalLM):
    def __init__(self, args: ModelArgs):
        rope = args.rotary(default_theta=1e6)
        layers = [decoder_layer(args, rope) for _ in range(args.num_hidden_layers)]
        super().__init__(args, layers, lm_head_bias=args.lm_head_bias)
        self.model.norm = layer_norm(args)


def checkpoint_tensors(args: ModelArgs) -> dict:
    """The released checkpoint's tensors: name -> (shape, stored dtype, role)."""
    t = base.CheckpointLayout.decoder(args)
    for i, p in t.layers():
        # Not t.attention_layer: the LayerNorms store a bias beside each weight.
        t.decoder_norms(p, bias=True)
        t.attention(f"{p}.self_attn", args.attention_bias, args.attention_bias)
        t.add(f"{p}.block_sparse_moe.gate.weight", (args.num_local_experts, args.hidden_size), "routers")
        t.experts(f"{p}.block_sparse_moe.experts", args.num_local_experts, args.intermediate_size, ("w1", "w3", "w2"))
    t.final(norm_bias=True, lm_head_bias=args.lm_head_bias)
    return t.tensors
