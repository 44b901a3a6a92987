"""Llama 4 text model (meta-llama/Llama-4-Scout-17B-16E, Maverick-17B-128E): the language
model of Llama4ForConditionalGeneration. config.json nests it in `text_config`; its
tensors are named `language_model.model.layers...` beside a vision tower that a
text-only run ignores.

Attention: RoPE on complex (interleaved) pairs, llama3 scaling; on RoPE layers an L2 q/k
norm (`use_qk_norm`) and, when `layer_types` says so, chunked attention (a query sees only
keys of its own `attention_chunk_size` chunk); on no-RoPE layers (`no_rope_layers[i] == 0`)
full attention with query temperature tuning. MoE layers (`moe_layers`, else every
`interleave_moe_layer_step`-th) route each token to the top-k experts by logit, scale the
expert's INPUT by sigmoid(logit), and add a shared expert; other layers are dense MLPs.

Shape legend: B batch, T new tokens, S cached positions, N tokens flattened, H query
heads, K kv heads, Dh head dim, D hidden, E experts.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from moerun import rope
from moerun.layers import KVCache, MLP, Start, attend, attention_mask, key_positions, token_positions
from moerun.models.base import BaseModelArgs, CausalLM, DecoderLayer
from moerun.moe.experts import RoutedExperts

# Checkpoint names of the language model start with this; everything else (vision tower,
# multimodal projector) is not ours.
CHECKPOINT_PREFIX = "language_model."


@dataclasses.dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size_mlp: int = 16384
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    num_local_experts: int = 16
    num_experts_per_tok: int = 1
    moe_layers: list[int] | None = None
    interleave_moe_layer_step: int = 1
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False
    use_qk_norm: bool = True
    no_rope_layers: list[int] | None = None
    no_rope_layer_interval: int = 4
    attention_chunk_size: int | None = 8192
    layer_types: list[str] | None = None
    attn_temperature_tuning: bool = True
    floor_scale: int = 8192
    attn_scale: float = 0.1
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 131072
    rope_theta: float | None = None
    rope_parameters: dict | None = None
    rope_scaling: dict | None = None

    @classmethod
    def from_dict(cls, config: dict):
        """The text config, nested in `text_config` (Llama4ForConditionalGeneration) or flat."""
        text = config.get("text_config")
        if isinstance(text, dict):
            config = {**text, "model_type": config.get("model_type")}
        return super().from_dict(config)

    def __post_init__(self):
        n = self.num_hidden_layers
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        # The reference's defaults, derived the same way.
        if not self.no_rope_layers:
            self.no_rope_layers = [int((i + 1) % self.no_rope_layer_interval != 0) for i in range(n)]
        if self.moe_layers is None:
            step = self.interleave_moe_layer_step
            self.moe_layers = list(range(step - 1, n, step))
        if self.layer_types is None:
            self.layer_types = ["chunked_attention" if r else "full_attention" for r in self.no_rope_layers]
        config = dataclasses.asdict(self)
        if self.rope_theta is None and "rope_theta" not in (self.rope_parameters or self.rope_scaling or {}):
            config["rope_theta"] = 500000.0
        self.rope = rope.rope_parameters(config)
        rope.check_supported(self.rope)


class ComplexRotary(nn.Module):
    """RoPE on consecutive pairs (x[2i], x[2i+1]) as complex numbers, in float32."""

    def __init__(self, params: dict, head_dim: int, max_position_embeddings: int):
        super().__init__()
        # A plain attribute, not a buffer: models are built on the meta device.
        self.inv_freq, self.scaling = rope.inv_freq_and_scaling(params, head_dim, max_position_embeddings)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        # positions [T] -> complex64 [T, Dh/2]
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        return torch.polar(torch.ones_like(freqs), freqs) * self.scaling


def apply_complex_rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    # x [B, T, H, Dh], freqs_cis [T, Dh/2]
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3).type_as(x)


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class Llama4Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, rotary: ComplexRotary):
        super().__init__()
        D, H, K, Dh = args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = H, K, Dh
        self.q_proj = nn.Linear(D, H * Dh, bias=args.attention_bias)
        self.k_proj = nn.Linear(D, K * Dh, bias=args.attention_bias)
        self.v_proj = nn.Linear(D, K * Dh, bias=args.attention_bias)
        self.o_proj = nn.Linear(H * Dh, D, bias=args.attention_bias)
        self.use_rope = bool(args.no_rope_layers[layer])
        self.rope = rotary
        self.qk_norm_eps = args.rms_norm_eps if args.use_qk_norm and self.use_rope else None
        self.temperature = (args.floor_scale, args.attn_scale) if args.attn_temperature_tuning and not self.use_rope else None
        chunked = args.layer_types[layer] == "chunked_attention"
        self.chunk = args.attention_chunk_size if chunked else None

    def forward(self, x: torch.Tensor, cache: KVCache, start: Start) -> torch.Tensor:
        B, T, _ = x.shape
        positions = token_positions(start, T, x.device)
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.use_rope:
            freqs_cis = self.rope(positions)
            q, k = apply_complex_rope(q, freqs_cis), apply_complex_rope(k, freqs_cis)
        if self.qk_norm_eps is not None:
            q, k = l2_norm(q, self.qk_norm_eps), l2_norm(k, self.qk_norm_eps)
        if self.temperature is not None:
            # Longer contexts sharpen no-RoPE attention (arXiv 2501.19399): q scaled per position.
            floor_scale, attn_scale = self.temperature
            scales = torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0
            q = (q * scales.view(1, T, 1, 1)).to(q.dtype)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H|K, T, Dh]
        k, v = cache.update(k, v, start)  # [B, K, S, Dh]

        mask = attention_mask(start, T, None, x.device)
        if self.chunk:
            q_pos = token_positions(start, T, x.device)[:, None]
            kv_pos = key_positions(start, T, x.device)[None, :]
            mask &= (kv_pos // self.chunk) == (q_pos // self.chunk)
        out = attend(q, k, v, mask, self.head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MoeBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.router = nn.Linear(args.hidden_size, args.num_local_experts, bias=False)
        self.experts = RoutedExperts(
            args.num_local_experts, args.hidden_size, args.intermediate_size, weights_on_input=True
        )
        self.shared_expert = MLP(args.hidden_size, args.intermediate_size)

    @property
    def gate(self) -> nn.Linear:
        """The router under the name the expert cache's next-layer prefetch looks for."""
        return self.router

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        logits = self.router(x)
        top, ids = torch.topk(logits, self.top_k, dim=-1)
        weights = torch.sigmoid(top.float()).to(logits.dtype)  # per expert, not normalised
        return (self.shared_expert(x) + self.experts(x, ids, weights)).reshape(shape)


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        rotary = ComplexRotary(args.rope, args.head_dim, args.max_position_embeddings)
        layers = [
            DecoderLayer(
                Llama4Attention(args, i, rotary),
                MoeBlock(args) if i in args.moe_layers else MLP(args.hidden_size, args.intermediate_size_mlp),
                "feed_forward",
                args.hidden_size,
                args.rms_norm_eps,
            )
            for i in range(args.num_hidden_layers)
        ]
        super().__init__(args, layers, args.num_key_value_heads, args.head_dim)


def sanitize(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Checkpoint names -> ours: the `language_model.` prefix goes, tensors outside it
    (vision tower, projector) are dropped, and each MoE layer's stacked experts
    `gate_up_proj` [E, D, 2I] (gate half, then up half) and `down_proj` [E, I, D] become
    w13 [E, 2I, D] and w2 [E, D, I]. Already-converted names pass through."""
    out = {}
    for name, tensor in weights.items():
        if name.startswith(CHECKPOINT_PREFIX):
            out[name.removeprefix(CHECKPOINT_PREFIX)] = tensor
        elif name.startswith(("model.", "lm_head.")):
            out[name] = tensor
    for i in args.moe_layers:
        p = f"model.layers.{i}.feed_forward.experts"
        if f"{p}.gate_up_proj" in out:
            out[f"{p}.w13"] = out.pop(f"{p}.gate_up_proj").transpose(1, 2).contiguous()
        if f"{p}.down_proj" in out:
            out[f"{p}.w2"] = out.pop(f"{p}.down_proj").transpose(1, 2).contiguous()
    return out
