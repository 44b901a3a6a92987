"""DeepSeek-V2 (DeepSeek-V2, DeepSeek-V2-Lite, DeepSeek-V2.5): multi-head latent attention
(MLA) and a DeepSeekMoE feed-forward, routed experts plus always-on shared experts.

MLA: each token's keys and values come from one compressed latent, kv_lora_rank wide
(RMS-normalised), and one rope'd key part shared by all heads, qk_rope_head_dim wide.
The decode state holds exactly those two per token and layer; keys and values are
expanded through kv_b_proj at attention time. Queries come from q_proj, or through a
low-rank q_a_proj -> q_a_layernorm -> q_b_proj when q_lora_rank is set. V2 rotates
interleaved pairs (x0, x1), (x2, x3), ... as complex numbers, in float32. With YaRN rope
scaling, cos/sin carry the attention factor and the softmax scale gets DeepSeek's mscale
correction.

Routing: softmax over all experts (float32 logits); "greedy" keeps the top-k, and
"group_limited_greedy" first keeps the topk_group groups with the best single expert.
The weights are scaled by routed_scaling_factor (or renormalised with norm_topk_prob,
DeepSeek's own rule; transformers ignores norm_topk_prob for V2 and every released
V2 config sets it false). The first `first_k_dense_replace` layers, and those off the
`moe_layer_freq` grid, are dense.

The module is shared: DeepSeek-V3 and GLM-4.7-Flash (glm4_moe_lite) build on it,
changing the router and the rotary through `Model.make_router` / `Model.make_rotary`.

Shape legend: B batch, T new tokens, S cached positions, H heads, R kv_lora_rank,
Dr qk_rope_head_dim, Dn qk_nope_head_dim, Dv v_head_dim.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import nn

from moerun import rope
from moerun.errors import MoerunError
from moerun.layers import (
    MLP,
    LayerState,
    RMSNorm,
    Start,
    StateSpec,
    StaticPosition,
    attend,
    attention_mask,
    context_full,
    key_positions,
    token_positions,
)
from moerun.models import base
from moerun.moe.experts import RoutedExperts
from moerun.moe.routing import Router


@dataclasses.dataclass(kw_only=True)
class ModelArgs(base.TransformerArgs):
    moe_intermediate_size: int
    n_routed_experts: int | None = base.spec(None, minimum=0)
    num_experts_per_tok: int | None = base.spec(None, top_k_of="n_routed_experts")
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
    max_position_embeddings: int = 2048
    quantization_config: dict | None = None  # planned from (see checkpoint_tensors), refused at load

    # The router has DeepSeek-V3's e_score_correction_bias (checkpoint_tensors lists it).
    correction_bias: ClassVar[bool] = False

    def __post_init__(self):
        super().__post_init__()
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


def check_loadable(args: ModelArgs) -> None:
    """Quantized releases (DeepSeek-V3's FP8) can be planned but not loaded yet."""
    if args.quantization_config:
        method = args.quantization_config.get("quant_method", "?")
        raise MoerunError(
            f"{args.model_type}: checkpoints quantized with '{method}' are not supported; use a bf16 conversion"
        )


# -- attention -----------------------------------------------------------------------------


class LatentCache(LayerState):
    """Static per-layer MLA state: per token, the normalised kv latent (R) followed by the
    rope'd shared key (Dr), one buffer [B, max_len, R + Dr], never the expanded K/V
    (which would be H * (Dn + Dr + Dv) wide)."""

    can_rewind = True  # each position's latent apart, as a KV cache

    def __init__(self, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int, dtype, device):
        self.latent = torch.zeros(batch, max_len, kv_lora_rank + rope_dim, dtype=dtype, device=device)
        self.kv_lora_rank = kv_lora_rank
        self.max_len = max_len

    def update(self, kv: torch.Tensor, k_pe: torch.Tensor, start: Start) -> tuple[torch.Tensor, torch.Tensor]:
        """kv [B, T, R], k_pe [B, T, Dr] written at [start, start+T) -> what attention
        reads, [B, S, R], [B, S, Dr]: the filled prefix, or the whole span for a StaticPosition."""
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


class LatentAttention(nn.Module):
    """Multi-head latent attention; checkpoint names as in DeepSeek's releases. `rotary`:
    a moerun.rope.Rotary over qk_rope_head_dim (interleaved pairs rotate de-interleaved,
    queries and keys alike, so the cached shared key is de-interleaved too)."""

    role = "attention"

    def __init__(self, args: ModelArgs, rotary: rope.Rotary):
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
        # It expands every cached position at every decode step (a matmul over S rows, not a
        # GEMV): kept 16-bit at rest on a CPU it would be widened at every step.
        self.kv_b_proj.stays_in_compute_dtype = True
        self.o_proj = nn.Linear(H * args.v_head_dim, D, bias=args.attention_bias)
        self.rotary = rotary
        self.scale = rope.softmax_scale(args.rope, qk**-0.5)

    def state_spec(self) -> StateSpec:
        return StateSpec(self.kv_lora_rank + self.rope_dim, kind="mla")

    def make_state(self, batch: int, max_len: int, dtype, device) -> LatentCache:
        return LatentCache(batch, max_len, self.kv_lora_rank, self.rope_dim, dtype, device)

    def forward(self, x: torch.Tensor, cache: LatentCache, start: Start) -> torch.Tensor:
        B, T, _ = x.shape
        H = self.n_heads
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, H, self.nope + self.rope_dim).transpose(1, 2)  # [B, H, T, Dn+Dr]
        q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)

        kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_a_layernorm(kv)  # [B, T, R]
        positions = token_positions(start, T, x.device)
        q_pe, k_pe = self.rotary(q_pe, k_pe, positions)
        kv, k_pe = cache.update(kv, k_pe, start)  # [B, S, R], [B, S, Dr]
        S = kv.shape[1]

        # Expand the latent to per-head keys and values (no weight absorption: plain and exact).
        k_nope, v = (
            self.kv_b_proj(kv)
            .view(B, S, H, self.nope + self.v_dim)
            .transpose(1, 2)
            .split([self.nope, self.v_dim], dim=-1)
        )
        k = torch.cat([k_nope, k_pe[:, None].expand(B, H, S, self.rope_dim)], dim=-1)  # [B, H, S, Dn+Dr]
        q = torch.cat([q_nope, q_pe], dim=-1)
        if isinstance(start, int) and T == 1:
            mask = None  # an eager decode step over the filled prefix: every key is in its past
        else:
            mask = attention_mask(positions, key_positions(start, T, x.device))
        out = attend(q, k, v, mask, self.scale)  # [B, H, T, Dv]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * self.v_dim))


# -- the model -------------------------------------------------------------------------------


class Model(base.CausalLM):
    """MLA + DeepSeekMoE. Subclasses (V3) change the rule by overriding make_router /
    make_rotary; everything else is shared."""

    @staticmethod
    def make_rotary(args: ModelArgs) -> rope.Rotary:
        # V2's reference rotates as complex numbers in float32.
        return rope.Rotary(
            args.rope, args.qk_rope_head_dim, args.max_position_embeddings, interleaved=True, float32=True
        )

    @staticmethod
    def make_router(args: ModelArgs) -> Router:
        if args.topk_method not in ("greedy", "group_limited_greedy"):
            raise MoerunError(f"{args.model_type}: topk_method '{args.topk_method}' is not supported")
        grouped = args.topk_method == "group_limited_greedy"
        renormalize = args.norm_topk_prob and args.num_experts_per_tok > 1
        return Router(
            args.hidden_size,
            args.n_routed_experts,
            args.num_experts_per_tok,
            scoring="softmax",
            renormalize=renormalize,
            renorm_eps=1e-20,
            scaling=1.0 if renormalize else args.routed_scaling_factor,
            n_group=args.n_group if grouped else None,
            topk_group=args.topk_group if grouped else None,
            group_score="max",
            float32_logits=True,
        )

    @classmethod
    def moe_block(cls, args: ModelArgs) -> base.SparseMoeBlock:
        shared = None
        if args.n_shared_experts:  # one SwiGLU MLP n_shared_experts times as wide
            shared = MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts)
        experts = RoutedExperts(args.n_routed_experts, args.hidden_size, args.moe_intermediate_size)
        return base.SparseMoeBlock(cls.make_router(args), experts, shared=shared, names={"shared": "shared_experts"})

    def __init__(self, args: ModelArgs):
        rotary = self.make_rotary(args)
        layers = [
            base.DecoderLayer(
                LatentAttention(args, rotary),
                self.moe_block(args) if i in args.moe_layers else MLP(args.hidden_size, args.intermediate_size),
                "mlp",
                args.hidden_size,
                args.rms_norm_eps,
            )
            for i in range(args.num_hidden_layers)
        ]
        super().__init__(args, layers)


def sanitize(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Checkpoint names -> ours: only the routed experts differ (stacked w13, w2)."""
    return base.stacked_experts(weights, args.moe_layers, "mlp.experts", args.n_routed_experts)


# -- the released checkpoint -------------------------------------------------------------------


class _Layout(base.CheckpointLayout):
    """With quant_method "fp8" (DeepSeek-V3's release) every linear of the layers is e4m3
    with a float32 `weight_scale_inv` per block (128 x 128), counted in the weight's role."""

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        q = args.quantization_config or {}
        self.block = tuple(q.get("weight_block_size") or (128, 128)) if q.get("quant_method") == "fp8" else None

    def linear(self, name: str, n_out: int, n_in: int, role: str, bias: bool = False) -> None:
        if self.block is None:
            return super().linear(name, n_out, n_in, role, bias)
        self.add(f"{name}.weight", (n_out, n_in), role, "F8_E4M3")
        self.add(
            f"{name}.weight_scale_inv", (math.ceil(n_out / self.block[0]), math.ceil(n_in / self.block[1])), role, "F32"
        )
        if bias:
            self.add(f"{name}.bias", (n_out,), role)


def moe_tensors(t: base.CheckpointLayout, prefix: str, args, correction_bias: bool) -> None:
    """A sparse layer's MoE block under `prefix` (GLM-4.5 keeps this layout): the router
    (`gate`, with its float32 correction bias), the routed experts one tensor per expert,
    the shared experts as one MLP."""
    E = args.n_routed_experts
    t.add(f"{prefix}.gate.weight", (E, args.hidden_size), "routers")  # the router stays in bf16 in FP8 releases
    if correction_bias:
        t.add(f"{prefix}.gate.e_score_correction_bias", (E,), "routers", "F32")
    t.experts(f"{prefix}.experts", E, args.moe_intermediate_size)
    if args.n_shared_experts:
        t.swiglu(f"{prefix}.shared_experts", args.moe_intermediate_size * args.n_shared_experts, "shared_experts")


def checkpoint_tensors(args: ModelArgs) -> dict:
    """The released checkpoint's tensors: name -> (shape, stored dtype, role). The
    multi-token-prediction layer (index num_hidden_layers) is left out: it is never loaded."""
    D, V, H = args.hidden_size, args.vocab_size, args.num_attention_heads
    nope, rope_dim, vd, kvr = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim, args.kv_lora_rank
    bias = args.attention_bias
    t = _Layout.decoder(args)
    for i in range(args.num_hidden_layers):
        p, a = f"model.layers.{i}", f"model.layers.{i}.self_attn"
        t.decoder_norms(p)
        if args.q_lora_rank:
            t.linear(f"{a}.q_a_proj", args.q_lora_rank, D, "attention", bias)
            t.add(f"{a}.q_a_layernorm.weight", (args.q_lora_rank,), "attention")
            t.linear(f"{a}.q_b_proj", H * (nope + rope_dim), args.q_lora_rank, "attention")
        else:
            t.linear(f"{a}.q_proj", H * (nope + rope_dim), D, "attention")
        t.linear(f"{a}.kv_a_proj_with_mqa", kvr + rope_dim, D, "attention", bias)
        t.add(f"{a}.kv_a_layernorm.weight", (kvr,), "attention")
        t.linear(f"{a}.kv_b_proj", H * (nope + vd), kvr, "attention")
        t.linear(f"{a}.o_proj", D, H * vd, "attention", bias)
        if i in args.moe_layers:
            moe_tensors(t, f"{p}.mlp", args, args.correction_bias)
        else:
            t.swiglu(f"{p}.mlp", args.intermediate_size, "dense_mlp")
    t.add("model.norm.weight", (D,), "norms")
    if not args.tie_word_embeddings:
        t.add("lm_head.weight", (V, D), "lm_head")  # bf16 in FP8 releases too
    return t.tensors
