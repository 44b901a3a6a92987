"""Granite 4.0-H (granitemoehybrid: ibm-granite/granite-4.0-h-tiny, -h-small, the dense
-h-micro / -h-1b): decoder layers whose mixer is Mamba-2 (`mamba`) or attention
(`self_attn`, as `layer_types` says), each followed by Granite-MoE's block (experts fused
per layer, softmax over the top-k logits) plus an always-on shared SwiGLU MLP
(`shared_mlp`, its gate and up fused in `input_linear`), or that MLP alone when the
config has no experts. Granite's four multipliers (embeddings, both residual branches,
the attention scale, the logits divisor); attention without positions unless
position_embedding_type is "rope" (the releases say "nope").

Shape legend: D hidden, E experts, I expert intermediate, S shared intermediate.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from moerun.errors import MoerunError
from moerun.layers import MLP, Attention
from moerun.models import granitemoe
from moerun.models.base import CausalLM, CheckpointLayout, DecoderLayer, spec
from moerun.recurrent.mamba2 import Mamba2Mixer, mamba2_tensors

# The tool-call format its chat template writes (moerun/tool_calls.py): Granite 4.0's template writes
# `<tool_call>{json}</tool_call>`.
TOOL_CALL_FORMAT = "qwen"

# layer_types as Hub configs say them, and as transformers 5 saves them.
KINDS = {"mamba": "mamba", "linear_attention": "mamba", "attention": "attention", "full_attention": "attention"}


def as_float(value) -> float:
    """A config number; transformers 5 saves infinity as {"__float__": "Infinity"}."""
    return float(value["__float__"]) if isinstance(value, dict) else float(value)


@dataclasses.dataclass(kw_only=True)
class ModelArgs(granitemoe.ModelArgs):
    """Granite-MoE's fields (attention_bias, the four multipliers), and the Mamba-2 layers'."""

    num_local_experts: int = spec(0, minimum=0)  # 0: dense feed-forwards only
    num_experts_per_tok: int = spec(0, top_k_of="num_local_experts")
    shared_intermediate_size: int = 1024
    position_embedding_type: str | None = None
    layer_types: list[str] | None = None
    layers_block_type: list[str] | None = None
    hidden_act: str = "silu"
    mamba_n_heads: int = 128
    mamba_n_groups: int = 1
    mamba_d_state: int = 256
    mamba_d_head: int | str = "auto"
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    time_step_limit: list | None = None

    def __post_init__(self):
        super().__post_init__()
        # A longer list is cut to the depth (bench's --layers builds the first layers only).
        types = self.layer_types or self.layers_block_type or ["mamba"] * self.num_hidden_layers
        types = types[: self.num_hidden_layers]
        unknown = sorted({t for t in types if t not in KINDS})
        if unknown or len(types) != self.num_hidden_layers:
            raise MoerunError(
                f"granitemoehybrid: layer_types must list mamba / attention for each of the "
                f"{self.num_hidden_layers} layers, got {types}"
            )
        self.kinds = [KINDS[t] for t in types]
        if self.hidden_act != "silu":
            raise MoerunError(f"granitemoehybrid: hidden_act {self.hidden_act!r} is not supported (silu is)")
        if self.mamba_d_head == "auto":
            self.mamba_d_head = self.mamba_expand * self.hidden_size // self.mamba_n_heads
        limit = self.time_step_limit or (0.0, math.inf)
        self.time_step_limit = (as_float(limit[0]), as_float(limit[1]))

    def mamba_dims(self) -> dict:
        return dict(
            hidden_size=self.hidden_size,
            n_heads=self.mamba_n_heads,
            head_dim=self.mamba_d_head,
            n_groups=self.mamba_n_groups,
            state_size=self.mamba_d_state,
            conv_kernel=self.mamba_d_conv,
            proj_bias=self.mamba_proj_bias,
            conv_bias=self.mamba_conv_bias,
        )


def feed_forward(args: ModelArgs):
    """The MoE block with the shared MLP inside it, or the shared MLP alone (no experts)."""
    shared = MLP(args.hidden_size, args.shared_intermediate_size)
    return granitemoe.moe_block(args, shared) if args.num_local_experts else shared


def decoder_layer(args: ModelArgs, kind: str, rope) -> DecoderLayer:
    if kind == "mamba":
        mixer = Mamba2Mixer(
            **args.mamba_dims(),
            chunk_size=args.mamba_chunk_size,
            eps=args.rms_norm_eps,
            time_step_limit=args.time_step_limit,
        )
    else:
        mixer = Attention(
            args.hidden_size,
            args.num_attention_heads,
            args.num_key_value_heads,
            args.head_dim,
            rope,
            qkv_bias=args.attention_bias,
            o_bias=args.attention_bias,
            scale=args.attention_multiplier,
        )
    return DecoderLayer(
        mixer,
        feed_forward(args),
        "block_sparse_moe" if args.num_local_experts else "shared_mlp",
        args.hidden_size,
        args.rms_norm_eps,
        mixer_name="mamba" if kind == "mamba" else "self_attn",
        residual_scale=args.residual_multiplier,
    )


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        rope = args.rotary() if args.position_embedding_type == "rope" else None
        layers = [decoder_layer(args, kind, rope) for kind in args.kinds]
        super().__init__(args, layers, embedding_scale=args.embedding_multiplier, logits_scale=args.logits_scaling)


def sanitize(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Checkpoint names -> ours: the MoE block's as Granite-MoE's (granitemoe.RENAMES); the layer's
    shared_mlp moves into the MoE block (when there is one) with input_linear split into
    gate_proj and up_proj, output_linear as down_proj."""
    out = {}
    for name, tensor in weights.items():
        head, sep, tail = name.partition(".block_sparse_moe.")
        if sep and tail in granitemoe.RENAMES:
            out[f"{head}.block_sparse_moe.{granitemoe.RENAMES[tail]}"] = tensor
            continue
        head, sep, tail = name.partition(".shared_mlp.")
        if sep and tail in ("input_linear.weight", "output_linear.weight"):
            owner = f"{head}.block_sparse_moe.shared_mlp" if args.num_local_experts else f"{head}.shared_mlp"
            if tail == "input_linear.weight":
                out[f"{owner}.gate_proj.weight"], out[f"{owner}.up_proj.weight"] = tensor.chunk(2, dim=0)
            else:
                out[f"{owner}.down_proj.weight"] = tensor
            continue
        out[name] = tensor
    return out


def checkpoint_tensors(args: ModelArgs) -> dict:
    """The released checkpoint's tensors: name -> (shape, stored dtype, role)."""
    D, E, I, S = args.hidden_size, args.num_local_experts, args.intermediate_size, args.shared_intermediate_size
    t = CheckpointLayout.decoder(args)
    for i, kind in enumerate(args.kinds):
        p = f"model.layers.{i}"
        t.decoder_norms(p)
        if kind == "mamba":
            mamba2_tensors(t, f"{p}.mamba", **args.mamba_dims())
        else:
            t.attention(f"{p}.self_attn", args.attention_bias, args.attention_bias)
        if E:
            t.add(f"{p}.block_sparse_moe.router.layer.weight", (E, D), "routers")
            t.add(f"{p}.block_sparse_moe.input_linear.weight", (E, 2 * I, D), "routed_experts")
            t.add(f"{p}.block_sparse_moe.output_linear.weight", (E, D, I), "routed_experts")
        role = "shared_experts" if E else "dense_mlp"
        t.linear(f"{p}.shared_mlp.input_linear", 2 * S, D, role)
        t.linear(f"{p}.shared_mlp.output_linear", D, S, role)
    t.final()
    return t.tensors
