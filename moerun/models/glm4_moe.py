"""GLM-4.5 / 4.6 / 4.7 and GLM-4.5-Air (zai-org): GQA attention with q/k/v biases, optional
per-head q/k RMSNorm (`use_qk_norm`) and RoPE over the first half of each head
(partial_rotary_factor, 0.5 when the config is silent; rotate-half, not interleaved).
The first `first_k_dense_replace` layers are dense; the rest are MoE blocks with
DeepSeek-V3's router (sigmoid scores, `e_score_correction_bias` for the choice only,
groups ranked by their two best biased scores, renormalised when norm_topk_prob, times
routed_scaling_factor) plus n_shared_experts shared experts as one MLP.

The released checkpoints also hold num_nextn_predict_layers multi-token-prediction
layers at model.layers.{num_hidden_layers}...; moerun does not run them and does not
describe them.

Shape legend: D hidden, E routed experts, I expert intermediate.
"""

from __future__ import annotations

import dataclasses

from moerun.layers import MLP
from moerun.models import deepseek_v3
from moerun.models.base import CausalLM, CheckpointLayout, SparseMoeBlock, TransformerArgs, attention_layer, spec
from moerun.models.deepseek_v2 import moe_tensors  # DeepSeek's MoE block layout
from moerun.models.deepseek_v3 import sanitize  # noqa: F401  (the same names: only the routed experts are stacked)

# The reference keeps the correction bias in float32: in bf16 it would round away the
# small differences that decide the choice.
FLOAT32_PARAMS = (".e_score_correction_bias",)


@dataclasses.dataclass(kw_only=True)
class ModelArgs(TransformerArgs):
    num_key_value_heads: int = spec(minimum=1)  # required here: no default to inherit
    moe_intermediate_size: int
    n_routed_experts: int = spec(minimum=1)
    num_experts_per_tok: int = spec(top_k_of="n_routed_experts")
    n_shared_experts: int = 1
    first_k_dense_replace: int = 1
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    attention_bias: bool = False
    use_qk_norm: bool = False
    partial_rotary_factor: float = 0.5  # transformers' default for GLM
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    num_nextn_predict_layers: int = 0

    def __post_init__(self):
        super().__post_init__()
        self.moe_layers = set(range(self.first_k_dense_replace, self.num_hidden_layers))


def moe_block(args: ModelArgs) -> SparseMoeBlock:
    # DeepSeek-V3's block to the letter: its router, the routed experts, and the
    # n_shared_experts shared experts as one MLP named `shared_experts`.
    return deepseek_v3.Model.moe_block(args)


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        rope = args.rotary()
        ffns = [
            moe_block(args) if i in args.moe_layers else MLP(args.hidden_size, args.intermediate_size)
            for i in range(args.num_hidden_layers)
        ]
        qk_norm = "head" if args.use_qk_norm else None
        layers = [
            attention_layer(
                args, rope, ffn, qkv_bias=args.attention_bias, qk_norm=qk_norm, qk_norm_eps=args.rms_norm_eps
            )
            for ffn in ffns
        ]
        super().__init__(args, layers)


def checkpoint_tensors(args: ModelArgs) -> dict:
    """The released checkpoint's tensors but the MTP layers: name -> (shape, stored dtype, role)."""
    t = CheckpointLayout.decoder(args)
    for i, p in t.layers():
        t.attention_layer(p, args.attention_bias, qk_norm="head" if args.use_qk_norm else None)
        if i in args.moe_layers:
            moe_tensors(t, f"{p}.mlp", args, correction_bias=True)
        else:
            t.swiglu(f"{p}.mlp", args.intermediate_size, "dense_mlp")
    t.final()
    return t.tensors
