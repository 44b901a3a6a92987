"""LFM2-MoE (LiquidAI/LFM2-8B-A1B): `layer_types` says which layers are gated short
convolutions ("conv", moerun/recurrent/short_conv.py) and which are attention
("full_attention": GQA with RoPE and an RMSNorm per head on q and k). The first
`num_dense_layers` feed-forwards are dense, the rest MoE: sigmoid scores, the top-k
chosen with `expert_bias` added (for the choice only), renormalised (sum + 1e-6) when
norm_topk_prob, times routed_scaling_factor. Embeddings are tied by default.

Checkpoint names differ from ours in the norms (`operator_norm`, `ffn_norm`,
`model.embedding_norm`), attention's `out_proj` and `q/k_layernorm`, the dense MLP's
w1/w3/w2, the expert bias and the per-expert tensors.

Shape legend: D hidden, E experts, I dense intermediate, Ie expert intermediate, Dh head dim.
"""

from __future__ import annotations

import dataclasses

import torch

from moerun.errors import MoerunError
from moerun.layers import MLP, Attention
from moerun.models import base
from moerun.moe.experts import RoutedExperts
from moerun.moe.routing import Router
from moerun.recurrent.short_conv import ShortConv

# The reference keeps the expert bias in a float32 buffer.
FLOAT32_PARAMS = (".e_score_correction_bias",)


@dataclasses.dataclass(kw_only=True)
class ModelArgs(base.TransformerArgs):
    num_experts: int = base.spec(minimum=1)
    num_experts_per_tok: int = base.spec(top_k_of="num_experts")
    moe_intermediate_size: int
    num_dense_layers: int = 2
    layer_types: list[str] | None = None
    full_attn_idxs: list[int] | None = None  # the older spelling of layer_types
    conv_L_cache: int = 3
    conv_bias: bool = False
    norm_eps: float = 1e-5
    use_expert_bias: bool = True
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    num_key_value_heads: int | None = 8
    tie_word_embeddings: bool = True
    tie_embedding: bool | None = None  # LFM2's own name; wins, as in transformers
    max_position_embeddings: int = 128000

    def __post_init__(self):
        super().__post_init__()
        self.rms_norm_eps = self.norm_eps
        if self.tie_embedding is not None:
            self.tie_word_embeddings = self.tie_embedding
        if self.layer_types is None:
            if self.full_attn_idxs is None:
                raise MoerunError("config.json lacks layer_types (needed by lfm2_moe)")
            attn = set(self.full_attn_idxs)
            self.layer_types = ["full_attention" if i in attn else "conv" for i in range(self.num_hidden_layers)]
        if len(self.layer_types) < self.num_hidden_layers:  # more: the first ones are read (bench --layers)
            raise MoerunError(
                f"config.json: layer_types names {len(self.layer_types)} layers, "
                f"num_hidden_layers is {self.num_hidden_layers}"
            )
        unknown = set(self.layer_types) - {"conv", "full_attention"}
        if unknown:
            raise MoerunError(f"lfm2_moe layer_types {sorted(unknown)} are not supported (conv, full_attention)")

    def is_conv(self, i: int) -> bool:
        return self.layer_types[i] == "conv"


def moe_block(args: ModelArgs) -> base.SparseMoeBlock:
    router = Router(
        args.hidden_size,
        args.num_experts,
        args.num_experts_per_tok,
        scoring="sigmoid",
        renormalize=args.norm_topk_prob,
        renorm_eps=1e-6,
        scaling=args.routed_scaling_factor,
        correction_bias=args.use_expert_bias,
        weights_dtype="logits",
        scores_in_logits_dtype=True,
    )
    return base.SparseMoeBlock(router, RoutedExperts(args.num_experts, args.hidden_size, args.moe_intermediate_size))


class Model(base.CausalLM):
    def __init__(self, args: ModelArgs):
        rope = args.rotary(default_theta=1e6)
        D, eps = args.hidden_size, args.norm_eps
        layers = []
        for i in range(args.num_hidden_layers):
            ffn = MLP(D, args.intermediate_size) if i < args.num_dense_layers else moe_block(args)
            if args.is_conv(i):
                layers.append(
                    base.DecoderLayer(
                        ShortConv(D, args.conv_L_cache, args.conv_bias), ffn, "feed_forward", D, eps, mixer_name="conv"
                    )
                )
            else:
                attn = Attention(
                    D,
                    args.num_attention_heads,
                    args.num_key_value_heads,
                    args.head_dim,
                    rope,
                    qk_norm="head",
                    qk_norm_eps=eps,
                )
                layers.append(base.DecoderLayer(attn, ffn, "feed_forward", D, eps))
        super().__init__(args, layers)


RENAMES = (
    (".operator_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."),
    ("model.embedding_norm.", "model.norm."),
    (".self_attn.out_proj.", ".self_attn.o_proj."),
    (".self_attn.q_layernorm.", ".self_attn.q_norm."),
    (".self_attn.k_layernorm.", ".self_attn.k_norm."),
    (".feed_forward.w1.", ".feed_forward.gate_proj."),
    (".feed_forward.w3.", ".feed_forward.up_proj."),
    (".feed_forward.w2.", ".feed_forward.down_proj."),
)


def sanitize(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Checkpoint names -> ours: renames, the expert bias into the router, experts stacked."""
    out = {}
    for name, tensor in weights.items():
        for old, new in RENAMES:
            name = name.replace(old, new)
        if name.endswith(".feed_forward.expert_bias"):
            name = name.replace(".feed_forward.expert_bias", ".feed_forward.gate.e_score_correction_bias")
        out[name] = tensor
    for i in range(args.num_dense_layers, args.num_hidden_layers):
        base.stack_experts(out, f"model.layers.{i}.feed_forward.experts", args.num_experts, "w1", "w3", "w2")
    return out


def checkpoint_tensors(args: ModelArgs) -> dict:
    """The released checkpoint's tensors: name -> (shape, stored dtype, role)."""
    t = base.CheckpointLayout(args)
    D, E, H, K, Dh = (
        args.hidden_size,
        args.num_experts,
        args.num_attention_heads,
        args.num_key_value_heads,
        args.head_dim,
    )
    t.embeddings()
    for i, p in t.layers():
        t.add(f"{p}.operator_norm.weight", (D,), "norms")
        t.add(f"{p}.ffn_norm.weight", (D,), "norms")
        if args.is_conv(i):
            t.add(f"{p}.conv.conv.weight", (D, 1, args.conv_L_cache), "attention")
            if args.conv_bias:
                t.add(f"{p}.conv.conv.bias", (D,), "attention")
            t.linear(f"{p}.conv.in_proj", 3 * D, D, "attention", args.conv_bias)
            t.linear(f"{p}.conv.out_proj", D, D, "attention", args.conv_bias)
        else:
            a = f"{p}.self_attn"
            t.linear(f"{a}.q_proj", H * Dh, D, "attention")
            t.linear(f"{a}.k_proj", K * Dh, D, "attention")
            t.linear(f"{a}.v_proj", K * Dh, D, "attention")
            t.linear(f"{a}.out_proj", D, H * Dh, "attention")
            t.add(f"{a}.q_layernorm.weight", (Dh,), "attention")
            t.add(f"{a}.k_layernorm.weight", (Dh,), "attention")
        if i < args.num_dense_layers:
            t.swiglu(f"{p}.feed_forward", args.intermediate_size, "dense_mlp", ("w1", "w3", "w2"))
        else:
            t.add(f"{p}.feed_forward.gate.weight", (E, D), "routers")
            if args.use_expert_bias:
                t.add(f"{p}.feed_forward.expert_bias", (E,), "routers", dtype="F32")  # a float32 buffer
            t.experts(f"{p}.feed_forward.experts", E, args.moe_intermediate_size, ("w1", "w3", "w2"))
    t.add("model.embedding_norm.weight", (D,), "norms")
    if not args.tie_word_embeddings:
        t.linear("lm_head", args.vocab_size, D, "lm_head")
    return t.tensors
