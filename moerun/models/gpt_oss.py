"""gpt-oss (openai/gpt-oss-20b, gpt-oss-120b): GQA attention with qkv/o biases, a learned
per-head "sink" logit in every softmax denominator, a sliding window on the layers
`layer_types` marks, YaRN RoPE; an MoE block per layer whose router (with bias) takes
the top-k logits and softmaxes over those k, and experts with biases and a clamped SwiGLU.

Checkpoints store experts stacked with gate and up INTERLEAVED on the output dim
(`gate_up_proj` [E, D, 2I]: gate = [..., ::2], up = [..., 1::2]), either in bf16
(what transformers saves) or as MXFP4 `_blocks`/`_scales` (the released checkpoints).

Shape legend: B batch, T new tokens, S cached positions, N tokens flattened, H query
heads, K kv heads, Dh head dim, D hidden, E experts, I expert intermediate.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from moerun import rope
from moerun.layers import KVCache, RMSNorm, Start, apply_rope, attention_mask, token_positions
from moerun.models.base import BaseModelArgs, CausalLM, DecoderLayer
from moerun.moe.experts import ExpertActivation, RoutedExperts
from moerun.quant import mxfp4

# The reference keeps the norms in float32 whatever the model dtype (_keep_in_fp32_modules).
FLOAT32_PARAMS = ("norm.weight",)


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
    num_experts_per_tok: int = 4
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = 128
    layer_types: list[str] | None = None
    attention_bias: bool = True
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 131072
    rope_theta: float | None = None
    rope_parameters: dict | None = None
    rope_scaling: dict | None = None

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.layer_types is None:  # the reference's default: sliding on even layers
            self.layer_types = [
                "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(self.num_hidden_layers)
            ]
        config = dataclasses.asdict(self)
        if self.rope_parameters is None and self.rope_scaling is None:
            # transformers' GptOssConfig default: YaRN x32 over a 4096-token original context.
            config["rope_parameters"] = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                         "truncate": False, "original_max_position_embeddings": 4096}  # fmt: skip
        if self.rope_theta is None and "rope_theta" not in (config["rope_parameters"] or config["rope_scaling"] or {}):
            config["rope_theta"] = 150000.0
        self.rope = rope.rope_parameters(config)
        rope.check_supported(self.rope)


class ScaledRotary(nn.Module):
    """Rotate-half RoPE with any scaling moerun.rope knows; cos/sin are multiplied by the
    variant's attention factor in float32, then cast, as the reference does."""

    def __init__(self, params: dict, head_dim: int, max_position_embeddings: int):
        super().__init__()
        # A plain attribute, not a buffer: models are built on the meta device.
        self.inv_freq, self.scaling = rope.inv_freq_and_scaling(params, head_dim, max_position_embeddings)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [T] -> cos, sin [T, Dh]
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


class SinkAttention(nn.Module):
    """Grouped-query attention whose softmax has one extra logit per head (the sink) that
    takes probability mass but contributes no value."""

    def __init__(self, args: ModelArgs, rotary: ScaledRotary, sliding_window: int | None):
        super().__init__()
        D, H, K, Dh = args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = H, K, Dh
        self.q_proj = nn.Linear(D, H * Dh, bias=args.attention_bias)
        self.k_proj = nn.Linear(D, K * Dh, bias=args.attention_bias)
        self.v_proj = nn.Linear(D, K * Dh, bias=args.attention_bias)
        self.o_proj = nn.Linear(H * Dh, D, bias=args.attention_bias)
        self.sinks = nn.Parameter(torch.empty(H))
        self.rope, self.sliding_window = rotary, sliding_window

    def forward(self, x: torch.Tensor, cache: KVCache, start: Start) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self.rope(token_positions(start, T, x.device), x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = cache.update(k, v, start)  # [B, K, S, Dh]
        groups = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # [B, H, S, Dh]

        scores = torch.matmul(q, k.transpose(2, 3)) * self.head_dim**-0.5  # [B, H, T, S]
        allowed = attention_mask(start, T, self.sliding_window, x.device)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        sinks = self.sinks.to(scores.dtype).view(1, -1, 1, 1).expand(B, -1, T, 1)
        logits = torch.cat([scores, sinks], dim=-1)
        logits = logits - logits.amax(dim=-1, keepdim=True)
        probs = torch.softmax(logits, dim=-1)[..., :-1]  # the sink's share is dropped
        out = torch.matmul(probs.to(v.dtype), v)  # [B, H, T, Dh]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MoeBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.router = nn.Linear(args.hidden_size, args.num_local_experts, bias=True)
        act = ExpertActivation("swiglu_clamped", args.swiglu_alpha, args.swiglu_limit)
        self.experts = RoutedExperts(args.num_local_experts, args.hidden_size, args.intermediate_size, bias=True, act=act)

    @property
    def gate(self) -> nn.Linear:
        """The router under the name the expert cache's next-layer prefetch looks for."""
        return self.router

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        # Top-k of the logits, softmax over those k, in the logits' dtype.
        top, ids = torch.topk(self.router(x), self.top_k, dim=-1)
        weights = torch.softmax(top, dim=-1, dtype=top.dtype)
        return self.experts(x, ids, weights).reshape(shape)


class Norm(RMSNorm):
    """The reference scales before casting back (weight * x in float32), unlike Llama's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps))).to(x.dtype)


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        rotary = ScaledRotary(args.rope, args.head_dim, args.max_position_embeddings)
        layers = []
        for kind in args.layer_types[: args.num_hidden_layers]:
            window = args.sliding_window if kind == "sliding_attention" else None
            layer = DecoderLayer(SinkAttention(args, rotary, window), MoeBlock(args), "mlp", args.hidden_size, args.rms_norm_eps)
            layer.input_layernorm = Norm(args.hidden_size, args.rms_norm_eps)
            layer.post_attention_layernorm = Norm(args.hidden_size, args.rms_norm_eps)
            layers.append(layer)
        super().__init__(args, layers, args.num_key_value_heads, args.head_dim)
        self.model.norm = Norm(args.hidden_size, args.rms_norm_eps)


def _expert_weight(weights: dict, name: str) -> torch.Tensor | None:
    """`{name}` [E, in, out] as stored in bf16, or dequantized from `{name}_blocks`/`_scales`."""
    if name in weights:
        return weights.pop(name)
    if f"{name}_blocks" in weights:
        return mxfp4.dequantize(weights.pop(f"{name}_blocks"), weights.pop(f"{name}_scales"))
    return None


def sanitize(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Checkpoint names -> ours: per layer, `mlp.experts.{gate_up_proj,down_proj}` (bf16, or
    MXFP4 blocks dequantized here) and their biases -> w13 [E, 2I, D] (gate rows, then up
    rows), w2 [E, D, I], b13 [E, 2I], b2 [E, D]. Already-converted names pass through."""
    weights = dict(weights)
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}.mlp.experts"
        gate_up = _expert_weight(weights, f"{p}.gate_up_proj")  # [E, D, 2I], interleaved
        if gate_up is not None:
            weights[f"{p}.w13"] = torch.cat([gate_up[..., ::2], gate_up[..., 1::2]], dim=-1).transpose(1, 2).contiguous()
        down = _expert_weight(weights, f"{p}.down_proj")  # [E, I, D]
        if down is not None:
            weights[f"{p}.w2"] = down.transpose(1, 2).contiguous()
        bias = weights.pop(f"{p}.gate_up_proj_bias", None)  # [E, 2I], interleaved
        if bias is not None:
            weights[f"{p}.b13"] = torch.cat([bias[..., ::2], bias[..., 1::2]], dim=-1)
        if f"{p}.down_proj_bias" in weights:
            weights[f"{p}.b2"] = weights.pop(f"{p}.down_proj_bias")
    return weights
