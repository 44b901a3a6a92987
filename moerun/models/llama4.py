"""Llama 4 text model (meta-llama/Llama-4-Scout-17B-16E, Maverick-17B-128E): the language
model of Llama4ForConditionalGeneration. config.json nests it in `text_config`; its
tensors are named `language_model.model.layers...` beside a vision tower that a
text-only run ignores (text-only checkpoints: moerun/models/llama4_text.py).

Attention: RoPE on complex (interleaved) pairs in float32, llama3 scaling; on RoPE layers
an L2 q/k norm after RoPE (`use_qk_norm`) and, when `layer_types` says so, chunked
attention (a query sees only keys of its own `attention_chunk_size` chunk); on no-RoPE
layers (`no_rope_layers[i] == 0`) full attention with query temperature tuning. MoE
layers (`moe_layers`, else every `interleave_moe_layer_step`-th) route each token to the
top-k experts by logit, scale the expert's INPUT by sigmoid(logit), and add a shared
expert; other layers are dense MLPs.

Shape legend: D hidden, E experts, I expert intermediate.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from moerun.layers import MLP
from moerun.models import base
from moerun.moe.experts import RoutedExperts
from moerun.moe.routing import Router

# The tool-call format its chat template writes (moerun/tool_calls.py): Llama 4's template asks for
# `{"name": ..., "parameters": ...}` (the pythonic `[f(a=1)]` form is read too).
TOOL_CALL_FORMAT = "llama4"

# Checkpoint names of the language model start with this; everything else (vision tower,
# multimodal projector) is not ours.
CHECKPOINT_PREFIX = "language_model."


@dataclasses.dataclass(kw_only=True)
class ModelArgs(base.TransformerArgs):
    intermediate_size_mlp: int = 16384
    num_local_experts: int = base.spec(16, minimum=1)
    num_experts_per_tok: int = base.spec(1, top_k_of="num_local_experts")
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
    max_position_embeddings: int = 131072

    nested_text_config: ClassVar[bool] = True  # in Llama4ForConditionalGeneration's config

    def __post_init__(self):
        super().__post_init__()
        n = self.num_hidden_layers
        # The reference's defaults, derived the same way.
        if not self.no_rope_layers:
            self.no_rope_layers = [int((i + 1) % self.no_rope_layer_interval != 0) for i in range(n)]
        if self.moe_layers is None:
            step = self.interleave_moe_layer_step
            self.moe_layers = list(range(step - 1, n, step))
        if self.layer_types is None:
            self.layer_types = ["chunked_attention" if r else "full_attention" for r in self.no_rope_layers]


def moe_block(args: ModelArgs) -> base.SparseMoeBlock:
    # Top-k by logit (sigmoid is monotonic), weights sigmoid(logit), not normalised, in the logits' dtype.
    router = Router(
        args.hidden_size, args.num_local_experts, args.num_experts_per_tok, scoring="sigmoid", weights_dtype="logits"
    )
    experts = RoutedExperts(args.num_local_experts, args.hidden_size, args.intermediate_size, weights_on_input=True)
    return base.SparseMoeBlock(
        router, experts, shared=MLP(args.hidden_size, args.intermediate_size), names={"router": "router"}
    )


def decoder_layer(args: ModelArgs, i: int, rope) -> base.DecoderLayer:
    """Layer i: RoPE (and the L2 q/k norm, and chunks where layer_types says so) or NoPE
    with temperature tuning; the MoE block or a dense MLP as `feed_forward`."""
    use_rope = bool(args.no_rope_layers[i])
    chunked = args.layer_types[i] == "chunked_attention"
    tuned = args.attn_temperature_tuning and not use_rope
    ffn = moe_block(args) if i in args.moe_layers else MLP(args.hidden_size, args.intermediate_size_mlp)
    return base.attention_layer(
        args,
        rope if use_rope else None,
        ffn,
        "feed_forward",
        qkv_bias=args.attention_bias,
        o_bias=args.attention_bias,
        qk_norm="l2" if args.use_qk_norm and use_rope else None,
        qk_norm_eps=args.rms_norm_eps,
        chunk=args.attention_chunk_size if chunked else None,
        temperature=(args.floor_scale, args.attn_scale) if tuned else None,
    )


class Model(base.CausalLM):
    def __init__(self, args: ModelArgs):
        # Pairs (x[2i], x[2i+1]) rotated as complex numbers in float32, as the reference.
        rope = args.rotary(default_theta=500000.0, interleaved=True, float32=True)
        super().__init__(args, [decoder_layer(args, i, rope) for i in range(args.num_hidden_layers)])


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


def checkpoint_tensors(args: ModelArgs, prefix: str = CHECKPOINT_PREFIX) -> dict:
    """The released checkpoint's text model: name -> (shape, stored dtype, role). The
    vision tower and projector are left out (never loaded)."""
    D, E, I = args.hidden_size, args.num_local_experts, args.intermediate_size
    t = base.CheckpointLayout.decoder(args, prefix=prefix)
    for i, p in t.layers():
        t.attention_layer(p, args.attention_bias, args.attention_bias)
        f = f"{p}.feed_forward"
        if i in args.moe_layers:
            t.add(f"{f}.router.weight", (E, D), "routers")
            t.add(f"{f}.experts.gate_up_proj", (E, D, 2 * I), "routed_experts")
            t.add(f"{f}.experts.down_proj", (E, I, D), "routed_experts")
            t.swiglu(f"{f}.shared_expert", I, "shared_experts")
        else:
            t.swiglu(f, args.intermediate_size_mlp, "dense_mlp")
    t.final()
    return t.tensors
