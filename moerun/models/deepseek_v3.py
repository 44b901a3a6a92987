"""DeepSeek-V3 (DeepSeek-V3, DeepSeek-R1, Moonlight): DeepSeek-V2's multi-head
latent attention and shared + routed experts, with V3's router and real-valued RoPE.

Routing (float32): sigmoid scores; a per-expert `e_score_correction_bias` is added for
the choice only: groups are ranked by the sum of their two best biased scores, the
topk_group best groups are kept, and the top-k experts among them are chosen. Their
weights are the unbiased scores, renormalised when norm_topk_prob, times
routed_scaling_factor. RoPE rotates interleaved pairs when `rope_interleave` (the
default), computed in the activations' dtype as the reference does.

Shape legend: N tokens, E experts, G groups, K top-k, B batch, H heads, T tokens, Dr
qk_rope_head_dim.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from moerun.errors import MoerunError
from moerun.models import deepseek_v2 as v2
from moerun.models.deepseek_v2 import sanitize  # noqa: F401  (the same names and stacking)
from moerun.moe.routing import routing_kernel_for

# The router's bias stays in float32 whatever the model dtype, as in the reference:
# in bf16 it would round away the small differences that decide the choice.
FLOAT32_PARAMS = (".e_score_correction_bias",)


@dataclasses.dataclass
class ModelArgs(v2.ModelArgs):
    routed_scaling_factor: float = 2.5
    n_group: int | None = 1
    topk_group: int | None = 1
    norm_topk_prob: bool = True
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    rope_interleave: bool = True
    quantization_config: dict | None = None

    def __post_init__(self):
        if self.quantization_config:
            method = self.quantization_config.get("quant_method", "?")
            raise MoerunError(
                f"{self.model_type}: checkpoints quantized with '{method}' are not supported; use a bf16 conversion"
            )
        super().__post_init__()


class Router(v2.Router):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(args.n_routed_experts))

    def route(self, x: torch.Tensor, kernel: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # x [N, D] -> ids [N, K], weights [N, K] float32
        logits = self(x)  # [N, E] float32
        if routing_kernel_for(logits, kernel) and self._kernel_can_route():
            from moerun import kernels

            ids, weights, _ = kernels.route(
                logits, self.top_k, kernel=True, scoring="sigmoid", renormalize=self.norm_topk_prob,
                bias=self.e_score_correction_bias, n_group=self.n_group or 1, topk_group=self.topk_group or 1,
                scaling=self.scaling,
            )  # fmt: skip
            return ids.long(), weights
        scores = logits.sigmoid()  # [N, E]
        biased = scores + self.e_score_correction_bias.float()
        groups = biased.view(-1, self.n_group, self.n_experts // self.n_group)  # [N, G, E/G]
        group_scores = groups.topk(2, dim=-1)[0].sum(dim=-1)  # [N, G]
        chosen = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen, True)
        biased = biased.masked_fill(~keep[:, :, None].expand_as(groups).reshape(biased.shape), float("-inf"))
        ids = torch.topk(biased, k=self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * self.scaling


    def _kernel_can_route(self) -> bool:
        """The routing kernel's group rule needs power-of-two groups of >= 2 experts that
        can hold the k picks; other configs route in torch."""
        G, E = self.n_group or 1, self.n_experts
        if G & (G - 1) or E % G:
            return False
        return G == 1 or (E // G >= 2 and self.top_k <= (self.topk_group or 1) * (E // G))


class MoE(v2.MoE):
    router_class = Router


class Rotary(v2.LatentRotary):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.interleave = args.rope_interleave

    def rotate(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        # q [B, H, T, Dr], k [B, 1, T, Dr]; cos, sin [T, Dr/2] in the activations' dtype
        freqs = self.freqs(positions)
        cos = (freqs.cos() * self.attention_factor).to(q.dtype)
        sin = (freqs.sin() * self.attention_factor).to(q.dtype)

        def apply(x: torch.Tensor) -> torch.Tensor:
            if self.interleave:
                # Pairs (x0, x1), (x2, x3), ...; written out de-interleaved, as the
                # reference does (q and k alike, so their dot products are unchanged).
                x1, x2 = x[..., 0::2], x[..., 1::2]
            else:
                x1, x2 = x.chunk(2, dim=-1)
            return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

        return apply(q), apply(k)


class Model(v2.Model):
    rotary_class = Rotary
    moe_class = MoE
