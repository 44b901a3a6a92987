"""DeepSeek-V3 (DeepSeek-V3, DeepSeek-R1, Moonlight): DeepSeek-V2's multi-head
latent attention and shared + routed experts, with V3's router and real-valued RoPE.

Routing (float32 logits): sigmoid scores; a per-expert `e_score_correction_bias` is added
for the choice only: groups are ranked by the sum of their two best biased scores, the
topk_group best groups are kept, and the top-k experts among them are chosen. Their
weights are the unbiased scores, renormalised (+1e-20) when norm_topk_prob, times
routed_scaling_factor. RoPE rotates interleaved pairs when `rope_interleave` (the
default), computed in the activations' dtype as the reference does.

The released checkpoint is FP8 (quantization_config): it can be planned (checkpoint_tensors
describes its e4m3 weights and block scales) but not loaded (check_loadable).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from moerun import rope
from moerun.models import deepseek_v2 as v2
from moerun.models.deepseek_v2 import check_loadable, checkpoint_tensors, sanitize  # noqa: F401  (the same layout)
from moerun.moe.routing import Router

# The router's bias stays in float32 whatever the model dtype, as in the reference:
# in bf16 it would round away the small differences that decide the choice.
FLOAT32_PARAMS = (".e_score_correction_bias",)


@dataclasses.dataclass(kw_only=True)
class ModelArgs(v2.ModelArgs):
    routed_scaling_factor: float = 2.5
    n_group: int | None = 1
    topk_group: int | None = 1
    norm_topk_prob: bool = True
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    rope_interleave: bool = True

    correction_bias: ClassVar[bool] = True


class Model(v2.Model):
    @staticmethod
    def make_rotary(args: ModelArgs) -> rope.Rotary:
        return rope.Rotary(
            args.rope, args.qk_rope_head_dim, args.max_position_embeddings, interleaved=args.rope_interleave
        )

    @staticmethod
    def make_router(args: ModelArgs) -> Router:
        return Router(
            args.hidden_size,
            args.n_routed_experts,
            args.num_experts_per_tok,
            scoring="sigmoid",
            correction_bias=True,
            n_group=args.n_group,
            topk_group=args.topk_group,
            group_score="top2_sum",
            renormalize=args.norm_topk_prob,
            renorm_eps=1e-20,
            scaling=args.routed_scaling_factor,
            float32_logits=True,
        )
