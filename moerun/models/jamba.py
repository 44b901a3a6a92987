"""Jamba (ai21labs/AI21-Jamba-Mini-1.7, Jamba-v0.1): Mamba layers with attention every
`attn_layer_period` layers (from `attn_layer_offset`; attention without positions: Jamba
has no RoPE), and an MoE feed-forward every `expert_layer_period` layers (from
`expert_layer_offset`), the others dense. The router softmaxes over all experts and keeps
the top-k probabilities unrenormalised. The Mamba mixer (moerun/recurrent/mamba.py)
RMS-normalises dt, B and C.

Checkpoint names differ from ours only in the norms (`pre_ff_layernorm`,
`model.final_layernorm`) and the per-expert tensors.

Shape legend: D hidden, E experts, I intermediate (dense and expert), N state size.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from moerun.errors import MoerunError
from moerun.layers import MLP, Attention
from moerun.models import base
from moerun.moe.experts import RoutedExperts
from moerun.moe.routing import Router
from moerun.recurrent.mamba import MambaMixer


@dataclasses.dataclass(kw_only=True)
class ModelArgs(base.TransformerArgs):
    num_experts: int = base.spec(16, minimum=0)  # 1 (or 0): no MoE layer
    num_experts_per_tok: int = base.spec(2, top_k_of="num_experts")
    expert_layer_period: int = 2
    expert_layer_offset: int = 1
    attn_layer_period: int = 8
    attn_layer_offset: int = 4
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: int | str = "auto"
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    hidden_act: str = "silu"
    num_key_value_heads: int | None = 8
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 262144

    def __post_init__(self):
        super().__post_init__()
        if self.mamba_dt_rank == "auto":
            self.mamba_dt_rank = math.ceil(self.hidden_size / 16)
        L = self.num_hidden_layers
        self.attention_layers = {i for i in range(L) if i % self.attn_layer_period == self.attn_layer_offset}
        self.moe_layers = {
            i for i in range(L) if self.num_experts > 1 and i % self.expert_layer_period == self.expert_layer_offset
        }


def check_loadable(args: ModelArgs) -> None:
    if args.hidden_act != "silu":
        raise MoerunError(f"jamba with hidden_act {args.hidden_act!r} is not supported (only silu)")


def mamba_mixer(args: ModelArgs) -> MambaMixer:
    return MambaMixer(
        args.hidden_size,
        args.mamba_expand * args.hidden_size,
        args.mamba_d_state,
        args.mamba_d_conv,
        args.mamba_dt_rank,
        conv_bias=args.mamba_conv_bias,
        proj_bias=args.mamba_proj_bias,
        bcdt_norm_eps=args.rms_norm_eps,
    )


def feed_forward(args: ModelArgs, i: int):
    if i not in args.moe_layers:
        return MLP(args.hidden_size, args.intermediate_size)
    # Softmax over all experts, top-k, not renormalised; weights in the activations' dtype.
    router = Router(args.hidden_size, args.num_experts, args.num_experts_per_tok, weights_dtype="input")
    experts = RoutedExperts(args.num_experts, args.hidden_size, args.intermediate_size)
    return base.SparseMoeBlock(router, experts, names={"router": "router"})


class Model(base.CausalLM):
    def __init__(self, args: ModelArgs):
        D, eps = args.hidden_size, args.rms_norm_eps
        layers = []
        for i in range(args.num_hidden_layers):
            if i in args.attention_layers:
                mixer = Attention(D, args.num_attention_heads, args.num_key_value_heads, args.head_dim, None)
                layers.append(base.DecoderLayer(mixer, feed_forward(args, i), "feed_forward", D, eps))
            else:
                layers.append(
                    base.DecoderLayer(
                        mamba_mixer(args), feed_forward(args, i), "feed_forward", D, eps, mixer_name="mamba"
                    )
                )
        super().__init__(args, layers)


RENAMES = ((".pre_ff_layernorm.", ".post_attention_layernorm."), ("model.final_layernorm.", "model.norm."))


def sanitize(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Checkpoint names -> ours: the norms renamed, the per-expert tensors stacked."""
    out = {}
    for name, tensor in weights.items():
        for old, new in RENAMES:
            name = name.replace(old, new)
        out[name] = tensor
    for i in args.moe_layers:
        base.stack_experts(
            out, f"model.layers.{i}.feed_forward.experts", args.num_experts, "gate_proj", "up_proj", "down_proj"
        )
    return out


def checkpoint_tensors(args: ModelArgs) -> dict:
    """The released checkpoint's tensors: name -> (shape, stored dtype, role)."""
    t = base.CheckpointLayout(args)
    D, E, I = args.hidden_size, args.num_experts, args.intermediate_size
    inner, N, R = args.mamba_expand * D, args.mamba_d_state, args.mamba_dt_rank
    t.embeddings()
    for i, p in t.layers():
        t.add(f"{p}.input_layernorm.weight", (D,), "norms")
        t.add(f"{p}.pre_ff_layernorm.weight", (D,), "norms")
        if i in args.attention_layers:
            t.attention(f"{p}.self_attn")
        else:
            m = f"{p}.mamba"
            t.linear(f"{m}.in_proj", 2 * inner, D, "attention", args.mamba_proj_bias)
            t.add(f"{m}.conv1d.weight", (inner, 1, args.mamba_d_conv), "attention")
            if args.mamba_conv_bias:
                t.add(f"{m}.conv1d.bias", (inner,), "attention")
            t.linear(f"{m}.x_proj", R + 2 * N, inner, "attention")
            t.linear(f"{m}.dt_proj", inner, R, "attention", bias=True)
            t.add(f"{m}.A_log", (inner, N), "attention")
            t.add(f"{m}.D", (inner,), "attention")
            t.linear(f"{m}.out_proj", D, inner, "attention", args.mamba_proj_bias)
            for norm, dim in (("dt_layernorm", R), ("b_layernorm", N), ("c_layernorm", N)):
                t.add(f"{m}.{norm}.weight", (dim,), "attention")
        if i in args.moe_layers:
            t.add(f"{p}.feed_forward.router.weight", (E, D), "routers")
            t.experts(f"{p}.feed_forward.experts", E, I)
        else:
            t.swiglu(f"{p}.feed_forward", I, "dense_mlp")
    t.add("model.final_layernorm.weight", (D,), "norms")
    if not args.tie_word_embeddings:
        t.linear("lm_head", args.vocab_size, D, "lm_head")
    return t.tensors
