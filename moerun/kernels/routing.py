"""Routing in one small kernel: router logits -> top-k expert ids, their weights and (with
an expert -> slot table) their slots, for every architecture's rule. One program per
token; k rounds of argmax over the token's E scores held in registers.

Shape legend: N tokens, E experts, K experts per token, G expert groups.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moerun.kernels.layout import empty
from moerun.kernels.routing_ref import RoutingRules


@triton.jit
def _routing_kernel(
    # tensors
    logits_ptr,  # [N, E] any float dtype
    bias_ptr,  # [E] float32 correction bias (HAS_BIAS)
    slot_map_ptr,  # [E] int32 expert -> slot (HAS_MAP)
    ids_ptr,  # [N, K] int32 out
    weights_ptr,  # [N, K] float32 out
    slots_ptr,  # [N, K] int32 out (HAS_MAP)
    # sizes, strides, scalars
    E,
    stride_logits,
    scaling,
    # meta
    K: tl.constexpr,
    BLOCK_K: tl.constexpr,  # next power of two >= K
    SIGMOID: tl.constexpr,  # 0: softmax scores; 1: sigmoid scores
    RENORM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MAP: tl.constexpr,
    N_GROUP: tl.constexpr,  # > 1: group-limited top-k (E divisible by N_GROUP)
    TOPK_GROUP: tl.constexpr,
    BLOCK_E: tl.constexpr,  # next power of two >= E
):
    tok = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    e_mask = e < E
    logit = tl.load(logits_ptr + tok * stride_logits + e, mask=e_mask, other=float("-inf")).to(tl.float32)
    if SIGMOID:
        scores = tl.sigmoid(logit)
    else:
        z = tl.exp(logit - tl.max(logit, axis=0))
        scores = z / tl.sum(z, axis=0)
    choice = scores
    if HAS_BIAS:
        choice = scores + tl.load(bias_ptr + e, mask=e_mask, other=0.0).to(tl.float32)
    choice = tl.where(e_mask, choice, float("-inf"))

    if N_GROUP > 1:
        # Group score: the sum of the group's two best choices; keep TOPK_GROUP groups.
        group = e // (E // N_GROUP)
        g = tl.arange(0, N_GROUP)
        group_score = tl.zeros((N_GROUP,), dtype=tl.float32)
        for i in tl.static_range(N_GROUP):
            c = tl.where(group == i, choice, float("-inf"))
            first = tl.argmax(c, axis=0)
            best2 = tl.max(c, axis=0) + tl.max(tl.where(e == first, float("-inf"), c), axis=0)
            group_score = tl.where(g == i, best2, group_score)
        keep = e < 0
        for _ in tl.static_range(TOPK_GROUP):
            best = tl.argmax(group_score, axis=0)
            keep = keep | (group == best)
            group_score = tl.where(g == best, float("-inf"), group_score)
        choice = tl.where(keep, choice, float("-inf"))

    kk = tl.arange(0, BLOCK_K)
    k_mask = kk < K
    top_ids = tl.zeros((BLOCK_K,), dtype=tl.int32)
    top_w = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for i in tl.static_range(K):
        best = tl.argmax(choice, axis=0)  # ties: the lowest id
        w = tl.sum(tl.where(e == best, scores, 0.0), axis=0)
        top_ids = tl.where(kk == i, best, top_ids)
        top_w = tl.where(kk == i, w, top_w)
        choice = tl.where(e == best, float("-inf"), choice)
    if RENORM:
        top_w = top_w / tl.sum(top_w, axis=0)
    top_w = top_w * scaling
    tl.store(ids_ptr + tok * K + kk, top_ids, mask=k_mask)
    tl.store(weights_ptr + tok * K + kk, top_w, mask=k_mask)
    if HAS_MAP:
        tl.store(slots_ptr + tok * K + kk, tl.load(slot_map_ptr + top_ids), mask=k_mask)


def route(
    logits: torch.Tensor, k: int, *, num_warps: int = 1, **rules
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Router logits [N, E] (any float dtype) -> (ids [N, K] int32, weights [N, K] float32,
    slots [N, K] int32 or None). Same rules and arguments as `routing_ref.route_reference`
    (`rules`: a `RoutingRules`' fields): scoring "softmax" | "sigmoid", bias [E], group
    limits, scaling, expert_to_slot [E] int32.
    """
    r = RoutingRules(**rules)
    scoring, bias, n_group, topk_group, expert_to_slot = r.scoring, r.bias, r.n_group, r.topk_group, r.expert_to_slot
    assert logits.dim() == 2 and logits.stride(1) == 1 and logits.is_floating_point(), "logits must be [N, E]"
    N, E = logits.shape
    assert scoring in ("softmax", "sigmoid"), scoring
    assert 1 <= k <= E, f"k must be in [1, {E}], got {k}"
    assert n_group >= 1 and n_group & (n_group - 1) == 0 and E % n_group == 0, "E must split into n_group groups"
    assert 1 <= topk_group <= n_group
    if n_group > 1:
        assert E // n_group >= 2, "group scores need two experts per group"
        assert k <= topk_group * (E // n_group), "kept groups must hold k experts"
    device = logits.device
    if bias is not None:
        assert bias.shape == (E,) and bias.device == device
        bias = bias.float().contiguous()
    if expert_to_slot is not None:
        assert expert_to_slot.shape == (E,) and expert_to_slot.device == device
        expert_to_slot = expert_to_slot.to(torch.int32).contiguous()
    ids = empty((N, k), torch.int32, device)
    weights = empty((N, k), torch.float32, device)
    slots = empty((N, k), torch.int32, device) if expert_to_slot is not None else None
    if N == 0:
        return ids, weights, slots
    _routing_kernel[(N,)](
        logits,
        bias if bias is not None else weights,
        expert_to_slot if expert_to_slot is not None else ids,
        ids,
        weights,
        slots if slots is not None else ids,
        E,
        logits.stride(0),
        float(r.scaling),
        K=k,
        BLOCK_K=triton.next_power_of_2(k),
        SIGMOID=scoring == "sigmoid",
        RENORM=r.renormalize,
        HAS_BIAS=bias is not None,
        HAS_MAP=expert_to_slot is not None,
        N_GROUP=n_group,
        TOPK_GROUP=topk_group,
        BLOCK_E=triton.next_power_of_2(E),
        num_warps=num_warps,
    )
    return ids, weights, slots
