"""GraniteMoE (ibm-granite/granite-3.0-1b-a400m, -3b-a800m): Mixtral's shape with four
multipliers — embeddings times `embedding_multiplier`, each residual branch times
`residual_multiplier`, `attention_multiplier` as the softmax scale (not 1/sqrt(Dh)), and
logits divided by `logits_scaling` — and experts stored fused per layer:
`block_sparse_moe.input_linear.weight` [E, 2I, D] (gate rows, then up rows) and
`output_linear.weight` [E, D, I], routed by a softmax over the top-k logits.

Shape legend: D hidden, E experts, I expert intermediate.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from moerun.models import base
from moerun.moe.experts import RoutedExperts
from moerun.moe.routing import Router


@dataclasses.dataclass(kw_only=True)
class ModelArgs(base.TransformerArgs):
    num_local_experts: int = base.spec(minimum=1)
    num_experts_per_tok: int = base.spec(top_k_of="num_local_experts")
    attention_bias: bool = False
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float = 1.0
    logits_scaling: float = 1.0
    max_position_embeddings: int = 2048


def moe_block(args: ModelArgs, shared: nn.Module | None = None) -> base.SparseMoeBlock:
    """The routed experts, with `shared` beside them as `shared_mlp` (Granite 4.0-H's)."""
    # Softmax over the top-k logits is softmax over all, top-k, renormalised; weights in
    # the activations' dtype, as the reference's type_as.
    router = Router(
        args.hidden_size, args.num_local_experts, args.num_experts_per_tok, renormalize=True, weights_dtype="logits"
    )
    experts = RoutedExperts(args.num_local_experts, args.hidden_size, args.intermediate_size)
    return base.SparseMoeBlock(router, experts, shared=shared, names={"router": "router", "shared": "shared_mlp"})


def decoder_layer(args: ModelArgs, rope) -> base.DecoderLayer:
    layer = base.attention_layer(
        args,
        rope,
        moe_block(args),
        "block_sparse_moe",
        qkv_bias=args.attention_bias,
        o_bias=args.attention_bias,
        scale=args.attention_multiplier,
    )
    layer.residual_scale = args.residual_multiplier  # multiplies both residual branches
    return layer


class Model(base.CausalLM):
    def __init__(self, args: ModelArgs):
        rope = args.rotary()
        layers = [decoder_layer(args, rope) for _ in range(args.num_hidden_layers)]
        super().__init__(args, layers, embedding_scale=args.embedding_multiplier, logits_scale=args.logits_scaling)


# The fused experts are already in our layout ([E, 2I, D] gate then up, [E, D, I]); the
# router's weight sits one level deeper in the checkpoint.
RENAMES = {
    "input_linear.weight": "experts.w13",
    "output_linear.weight": "experts.w2",
    "router.layer.weight": "router.weight",
}


def sanitize(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Checkpoint names -> ours: only the MoE block's names change (RENAMES)."""
    out = {}
    for name, tensor in weights.items():
        head, _, tail = name.partition(".block_sparse_moe.")
        out[f"{head}.block_sparse_moe.{RENAMES[tail]}" if tail in RENAMES else name] = tensor
    return out


def checkpoint_tensors(args: ModelArgs) -> dict:
    """The released checkpoint's tensors: name -> (shape, stored dtype, role)."""
    D, E, I = args.hidden_size, args.num_local_experts, args.intermediate_size
    t = base.CheckpointLayout.decoder(args)
    for i, p in t.layers():
        t.attention_layer(p, args.attention_bias, args.attention_bias)
        t.add(f"{p}.block_sparse_moe.router.layer.weight", (E, D), "routers")
        t.add(f"{p}.block_sparse_moe.input_linear.weight", (E, 2 * I, D), "routed_experts")
        t.add(f"{p}.block_sparse_moe.output_linear.weight", (E, D, I), "routed_experts")
    t.final()
    return t.tensors
