"""DeepSeek-V2 (DeepSeek-V2, DeepSeek-V2-Lite, DeepSeek-V2.5): multi-head latent attention
(MLA) and a DeepSeekMoE feed-forward, routed experts plus always-on shared experts.

MLA: each token's keys and values come from one compressed latent, kv_lora_rank wide
(RMS-normalised), and one rope'd key part shared by all heads, qk_rope_head_dim wide.
The KV cache holds exactly those two per token and layer; keys and values are expanded
through kv_b_proj at attention time. Queries come from q_proj, or through a low-rank
q_a_proj -> q_a_layernorm -> q_b_proj when q_lora_rank is set. V2 rotates interleaved
pairs (x0, x1), (x2, x3), ... as complex numbers. With YaRN rope scaling, cos/sin carry
the attention factor and the softmax scale gets DeepSeek's mscale correction.

Routing: softmax over all experts (float32); "greedy" keeps the top-k, and
"group_limited_greedy" first keeps the topk_group groups with the best single expert.
The weights are scaled by routed_scaling_factor (or renormalised with norm_topk_prob,
DeepSeek's own rule; transformers ignores norm_topk_prob for V2 and every released
V2 config sets it false). The first `first_k_dense_replace` layers, and those off the
`moe_layer_freq` grid, are dense.

Shape legend: B batch, T new tokens, S cached positions, H heads, R kv_lora_rank,
Dr qk_rope_head_dim, Dn qk_nope_head_dim, Dv v_head_dim, N tokens, E experts, K top-k.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from moerun import rope
from moerun.errors import MoerunError
from moerun.layers import MLP, RMSNorm, Start, StaticPosition, attend, attention_mask_or_none, context_full, token_positions
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
    moe_intermediate_size: int
    n_routed_experts: int | None = None
    num_experts_per_tok: int | None = None
    n_shared_experts: int | None = None
    routed_scaling_factor: float = 1.0
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    rope_theta: float | None = None
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None
    num_key_value_heads: int | None = None  # unused by MLA; kept for the planner's reading

    def __post_init__(self):
        if self.hidden_act != "silu" or self.mlp_bias:
            raise MoerunError(f"{self.model_type}: only silu MLPs without bias are supported")
        self.rope = rope.rope_parameters(dataclasses.asdict(self))
        rope.check_supported(self.rope)
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.moe_layers = {
            i
            for i in range(self.num_hidden_layers)
            if self.n_routed_experts and i >= self.first_k_dense_replace and i % max(self.moe_layer_freq, 1) == 0
        }
        if self.moe_layers and not self.num_experts_per_tok:
            raise MoerunError(f"config.json lacks num_experts_per_tok (needed by {self.model_type})")


# -- attention -----------------------------------------------------------------------------


class LatentCache:
    """Static per-layer MLA cache: per token, the normalised kv latent (R) followed by the
    rope'd shared key (Dr), one buffer [B, max_len, R + Dr], never the expanded K/V
    (which would be H * (Dn + Dr + Dv) wide)."""

    def __init__(self, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int, dtype, device):
        self.latent = torch.zeros(batch, max_len, kv_lora_rank + rope_dim, dtype=dtype, device=device)
        self.kv_lora_rank = kv_lora_rank
        self.max_len = max_len

    def update(self, kv: torch.Tensor, k_pe: torch.Tensor, start: Start) -> tuple[torch.Tensor, torch.Tensor]:
        # kv [B, T, R], k_pe [B, T, Dr] written at [start, start+T) -> what attention reads,
        # [B, S, R], [B, S, Dr]: the filled prefix, or the whole span for a StaticPosition.
        R = self.kv_lora_rank
        if isinstance(start, StaticPosition):
            if start.span > self.max_len:
                raise context_full(start.span, self.max_len)
            span = self.latent[:, : start.span]
            span.index_copy_(1, token_positions(start, kv.shape[1], kv.device), torch.cat([kv, k_pe], dim=-1))
            return span[..., :R], span[..., R:]
        end = start + kv.shape[1]
        if end > self.max_len:
            raise context_full(end, self.max_len)
        self.latent[:, start:end, :R] = kv
        self.latent[:, start:end, R:] = k_pe
        return self.latent[:, :end, :R], self.latent[:, :end, R:]


class LatentRotary:
    """Scaled RoPE over qk_rope_head_dim. V2 rotates interleaved pairs as complex numbers
    in float32; subclasses change `rotate` (V3 uses real cos/sin in the input's dtype)."""

    def __init__(self, args: ModelArgs):
        # A plain attribute, not a buffer: models are built on the meta device.
        self.inv_freq, self.attention_factor = rope.inv_freq_and_scaling(
            args.rope, args.qk_rope_head_dim, args.max_position_embeddings
        )

    def freqs(self, positions: torch.Tensor) -> torch.Tensor:
        # positions [T] -> angles [T, Dr/2], float32
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        return positions.float()[:, None] * self.inv_freq[None, :]

    def rotate(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        # q [B, H, T, Dr], k [B, 1, T, Dr]
        freqs = self.freqs(positions)
        cis = torch.polar(torch.ones_like(freqs), freqs) * self.attention_factor  # [T, Dr/2] complex

        def apply(x: torch.Tensor) -> torch.Tensor:
            xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
            return torch.view_as_real(xc * cis).flatten(3).type_as(x)

        return apply(q), apply(k)


class LatentAttention(nn.Module):
    """Multi-head latent attention; checkpoint names as in DeepSeek's releases."""

    def __init__(self, args: ModelArgs, rotary: LatentRotary):
        super().__init__()
        D, H = args.hidden_size, args.num_attention_heads
        self.n_heads, self.q_lora_rank, self.kv_lora_rank = H, args.q_lora_rank, args.kv_lora_rank
        self.nope, self.rope_dim, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        qk = args.qk_head_dim
        if args.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, args.q_lora_rank, bias=args.attention_bias)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, 1e-6)  # the reference's default eps, not rms_norm_eps
            self.q_b_proj = nn.Linear(args.q_lora_rank, H * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, args.kv_lora_rank + args.qk_rope_head_dim, bias=args.attention_bias)
        self.kv_a_layernorm = RMSNorm(args.kv_lora_rank, 1e-6)
        self.kv_b_proj = nn.Linear(args.kv_lora_rank, H * (args.qk_nope_head_dim + args.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * args.v_head_dim, D, bias=args.attention_bias)
        self.rotary = rotary
        self.scale = rope.softmax_scale(args.rope, qk**-0.5)

    def forward(self, x: torch.Tensor, cache: LatentCache, start: Start) -> torch.Tensor:
        B, T, _ = x.shape
        H = self.n_heads
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, H, self.nope + self.rope_dim).transpose(1, 2)  # [B, H, T, Dn+Dr]
        q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)

        kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_a_layernorm(kv)  # [B, T, R]
        positions = token_positions(start, T, x.device)
        q_pe, k_pe = self.rotary.rotate(q_pe, k_pe[:, None], positions)
        kv, k_pe = cache.update(kv, k_pe[:, 0], start)  # [B, S, R], [B, S, Dr]
        S = kv.shape[1]

        # Expand the latent to per-head keys and values (no weight absorption: plain and exact).
        k_nope, v = self.kv_b_proj(kv).view(B, S, H, self.nope + self.v_dim).transpose(1, 2).split(
            [self.nope, self.v_dim], dim=-1
        )
        k = torch.cat([k_nope, k_pe[:, None].expand(B, H, S, self.rope_dim)], dim=-1)  # [B, H, S, Dn+Dr]
        q = torch.cat([q_nope, q_pe], dim=-1)
        out = attend(q, k, v, attention_mask_or_none(start, T, None, x.device), self.scale)  # [B, H, T, Dv]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * self.v_dim))


# -- mixture of experts ----------------------------------------------------------------------


class Router(nn.Module):
    """The gate: float32 logits over the E routed experts. `route` applies the family's
    rule; calling it gives the logits (what the expert prefetcher guesses from)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.hidden_size))
        self.top_k, self.n_experts = args.num_experts_per_tok, args.n_routed_experts
        self.n_group, self.topk_group = args.n_group, args.topk_group
        self.scaling, self.norm_topk_prob = args.routed_scaling_factor, args.norm_topk_prob
        self.method = args.topk_method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())  # [N, E]

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x [N, D] -> ids [N, K], weights [N, K] float32
        scores = self(x).softmax(dim=-1, dtype=torch.float32)
        if self.method == "group_limited_greedy":
            # A group's score is its best expert's; experts outside the topk_group best groups are zeroed.
            groups = scores.view(-1, self.n_group, self.n_experts // self.n_group)
            chosen = torch.topk(groups.max(dim=-1).values, k=self.topk_group, dim=-1, sorted=False)[1]
            keep = torch.zeros(groups.shape[:2], dtype=torch.bool, device=x.device).scatter_(1, chosen, True)
            scores = scores.masked_fill(~keep[:, :, None].expand_as(groups).reshape(scores.shape), 0.0)
        elif self.method != "greedy":
            raise MoerunError(f"deepseek_v2: topk_method '{self.method}' is not supported")
        weights, ids = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            weights = weights * self.scaling
        return ids, weights


class MoE(nn.Module):
    """Routed experts (moerun's stacked RoutedExperts, so quantization and the expert
    cache apply) plus the shared experts, one SwiGLU MLP n_shared_experts times as wide."""

    router_class = Router

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate = self.router_class(args)
        self.top_k = args.num_experts_per_tok
        self.experts = RoutedExperts(args.n_routed_experts, args.hidden_size, args.moe_intermediate_size)
        if args.n_shared_experts:
            self.shared_experts = MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts)
        else:
            self.shared_experts = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [N, D]
        ids, weights = self.gate.route(flat)
        out = self.experts(flat, ids, weights).reshape(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class Model(CausalLM):
    rotary_class = LatentRotary
    moe_class = MoE

    def __init__(self, args: ModelArgs):
        rotary = self.rotary_class(args)
        layers = [
            DecoderLayer(
                LatentAttention(args, rotary),
                self.moe_class(args) if i in args.moe_layers else MLP(args.hidden_size, args.intermediate_size),
                "mlp",
                args.hidden_size,
                args.rms_norm_eps,
            )
            for i in range(args.num_hidden_layers)
        ]
        super().__init__(args, layers, 1, args.kv_lora_rank + args.qk_rope_head_dim)

    def make_caches(self, batch: int, max_len: int) -> list[LatentCache]:
        ref = self.model.embed_tokens.weight
        a = self.args
        return [
            LatentCache(batch, max_len, a.kv_lora_rank, a.qk_rope_head_dim, ref.dtype, ref.device)
            for _ in self.model.layers
        ]


def sanitize(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Checkpoint names -> ours: only the routed experts differ (stacked w13, w2)."""
    weights = dict(weights)
    for i in args.moe_layers:
        stack_experts(
            weights, f"model.layers.{i}.mlp.experts", args.n_routed_experts, "gate_proj", "up_proj", "down_proj"
        )
    return weights
