"""Mixtral (mistralai/Mixtral-8x7B and 8x22B): GQA attention with RoPE and an optional
sliding window, and a sparse MoE block per layer (`block_sparse_moe`) whose router takes
the top-k of the logits and softmaxes over those k.

Shape legend: N tokens, D hidden, E experts, K experts per token, I expert intermediate.
"""

from __future__ import annotations

import dataclasses

import torch

from moerun.models import base
from moerun.moe.experts import RoutedExperts
from moerun.moe.routing import Router

# The tool-call format its chat template writes (moerun/tool_calls.py): Mixtral-8x22B-Instruct's
# tool_use template (v3 tokenizer) writes `[TOOL_CALLS] [{...}]`; 8x7B's template has no tools.
TOOL_CALL_FORMAT = "mistral"


@dataclasses.dataclass(kw_only=True)
class ModelArgs(base.TransformerArgs):
    num_local_experts: int = base.spec(minimum=1)
    num_experts_per_tok: int = base.spec(top_k_of="num_local_experts")
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = base.spec(None, minimum=0)  # 0 or null: no window
    max_position_embeddings: int = 32768


def moe_block(args: ModelArgs) -> base.SparseMoeBlock:
    # Softmax over all, top-k, renormalised: the softmax over the top-k logits (float32 weights).
    router = Router(args.hidden_size, args.num_local_experts, args.num_experts_per_tok, renormalize=True)
    return base.SparseMoeBlock(router, RoutedExperts(args.num_local_experts, args.hidden_size, args.intermediate_size))


class Model(base.CausalLM):
    def __init__(self, args: ModelArgs):
        rope = args.rotary(default_theta=1e6)
        layers = [
            base.attention_layer(args, rope, moe_block(args), "block_sparse_moe", sliding_window=args.sliding_window)
            for _ in range(args.num_hidden_layers)
        ]
        super().__init__(args, layers)


def sanitize(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Checkpoint names -> ours: only the experts differ (w1/w3/w2 per expert -> stacked w13, w2)."""
    return base.stacked_experts(
        weights, range(args.num_hidden_layers), "block_sparse_moe.experts", args.num_local_experts, ("w1", "w3", "w2")
    )


def checkpoint_tensors(args: ModelArgs) -> dict:
    """The released checkpoint's tensors: name -> (shape, stored dtype, role)."""
    t = base.CheckpointLayout.decoder(args)
    for i, p in t.layers():
        t.attention_layer(p)
        t.add(f"{p}.block_sparse_moe.gate.weight", (args.num_local_experts, args.hidden_size), "routers")
        t.experts(f"{p}.block_sparse_moe.experts", args.num_local_experts, args.intermediate_size, ("w1", "w3", "w2"))
    t.final()
    return t.tensors
