"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): attention with qkv bias, routed experts
weighted by the full softmax (renormalised only with norm_topk_prob), plus a shared
expert scaled by its own sigmoid gate; layers named by `mlp_only_layers` or off the
`decoder_sparse_step` grid are dense. Sliding windows, when used, are per layer
(`layer_types`).

Shape legend: N tokens, D hidden, E experts, K experts per token.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from moerun.layers import MLP
from moerun.models import qwen3_moe
from moerun.models.base import CausalLM, CheckpointLayout, QwenMoeArgs, SparseMoeBlock, attention_layer, spec
from moerun.models.qwen3_moe import sanitize  # noqa: F401  (the same expert layout)

# The tool-call format its chat template writes (moerun/tool_calls.py): Qwen's templates write tool
# calls as `<tool_call>{json}</tool_call>`.
TOOL_CALL_FORMAT = "qwen"


@dataclasses.dataclass(kw_only=True)
class ModelArgs(QwenMoeArgs):
    # Required here (no fallback to num_attention_heads); a bare annotation would inherit the None default.
    num_key_value_heads: int = spec(minimum=1)
    shared_expert_intermediate_size: int
    qkv_bias: bool = True
    use_sliding_window: bool = False
    sliding_window: int | None = spec(None, minimum=0)  # 0 or null: no window
    max_window_layers: int = 28
    layer_types: list[str] | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.layer_types is None:
            # The reference's rule when the config does not spell the layer types out.
            self.layer_types = [
                "sliding_attention"
                if (i + 1) % 2 and i < self.max_window_layers and self.use_sliding_window
                else "full_attention"
                for i in range(self.num_hidden_layers)
            ]
        # Each layer's window; the reference's config drops it without use_sliding_window.
        self.windows = [
            self.sliding_window if self.use_sliding_window and kind == "sliding_attention" else None
            for kind in self.layer_types
        ]


def moe_block(args: ModelArgs) -> SparseMoeBlock:
    """Qwen3-MoE's routed experts, plus the shared expert under its sigmoid gate."""
    shared = MLP(args.hidden_size, args.shared_expert_intermediate_size)
    return qwen3_moe.moe_block(args, shared=shared, shared_gate=nn.Linear(args.hidden_size, 1, bias=False))


def ffn(args: ModelArgs, i: int) -> nn.Module:
    """Layer i's feed-forward: the MoE block, or a dense MLP off the sparse grid."""
    return moe_block(args) if i in args.moe_layers else MLP(args.hidden_size, args.intermediate_size)


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        rope = args.rotary()
        layers = [
            attention_layer(args, rope, ffn(args, i), qkv_bias=args.qkv_bias, sliding_window=window)
            for i, window in enumerate(args.windows)
        ]
        super().__init__(args, layers)


def checkpoint_tensors(args: ModelArgs) -> dict:
    """The released checkpoint's tensors: name -> (shape, stored dtype, role)."""
    t = CheckpointLayout.decoder(args)
    for i, p in t.layers():
        t.attention_layer(p, args.qkv_bias)
        if i in args.moe_layers:
            t.add(f"{p}.mlp.gate.weight", (args.num_experts, args.hidden_size), "routers")
            t.experts(f"{p}.mlp.experts", args.num_experts, args.moe_intermediate_size)
            t.swiglu(f"{p}.mlp.shared_expert", args.shared_expert_intermediate_size, "shared_experts")
            t.add(f"{p}.mlp.shared_expert_gate.weight", (1, args.hidden_size), "shared_experts")
        else:
            t.swiglu(f"{p}.mlp", args.intermediate_size, "dense_mlp")
    t.final()
    return t.tensors
