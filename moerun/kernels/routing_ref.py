"""Plain-torch reference of the routing kernel (and its fallback without Triton).

Shape legend: N tokens, E experts, K experts per token, G expert groups.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class RoutingRules:
    """An architecture's routing rules, the keyword arguments of `route_reference` and of
    the kernel's `routing.route` (their defaults: Mixtral's softmax, top-k, renormalised)."""

    scoring: str = "softmax"
    renormalize: bool = True
    bias: torch.Tensor | None = None
    n_group: int = 1
    topk_group: int = 1
    scaling: float = 1.0
    expert_to_slot: torch.Tensor | None = None


def route_reference(logits: torch.Tensor, k: int, **rules) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Router logits [N, E] -> (ids [N, K] int32, weights [N, K] float32, slots [N, K] int32 | None).

    scoring "softmax": softmax over all experts, top-k, renormalise if asked (renormalised
    equals Mixtral's top-k-then-softmax). scoring "sigmoid" (DeepSeek-V3): sigmoid scores;
    choice = scores + bias [E]; with n_group > 1 only the topk_group groups with the
    largest sum of their two best choices compete; top-k of the choice; weights are the
    scores (not the choice), renormalised if asked, times `scaling`. expert_to_slot [E]
    int32 maps the ids to slots. Ids in descending order of choice.
    """
    r = RoutingRules(**rules)
    scores = logits.float()
    scores = torch.softmax(scores, dim=-1) if r.scoring == "softmax" else torch.sigmoid(scores)
    choice = scores if r.bias is None else scores + r.bias.float()
    if r.n_group > 1:
        N, E = choice.shape
        grouped = choice.view(N, r.n_group, E // r.n_group)
        group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [N, G]
        keep = torch.zeros_like(group_score, dtype=torch.bool)
        keep.scatter_(1, group_score.topk(r.topk_group, dim=-1).indices, True)
        choice = grouped.masked_fill(~keep[:, :, None], float("-inf")).view(N, E)
    ids = choice.topk(k, dim=-1).indices
    weights = scores.gather(1, ids)
    if r.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights * r.scaling
    slots = r.expert_to_slot[ids].to(torch.int32) if r.expert_to_slot is not None else None
    return ids.to(torch.int32), weights, slots
