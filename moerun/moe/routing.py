"""Router rules. Each architecture picks its rule and parameters in its own file; this
module holds the math so that later kernels have one reference to match.

Shape legend: N tokens, E experts, K experts per token.
"""

from __future__ import annotations

import torch


def softmax_topk(
    logits: torch.Tensor, k: int, renormalize: bool, weights_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts (in float32), keep the k largest, optionally renormalise
    them to sum to one. logits [N, E] -> (ids [N, K] int64, weights [N, K]).

    With renormalize=True this equals "top-k of the logits, then softmax over the k"
    (Mixtral's rule); without it the weights are the full-softmax probabilities
    (Qwen2-MoE, Qwen3-MoE with norm_topk_prob false).
    """
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if weights_dtype is not None:
        weights = weights.to(weights_dtype)
    return ids, weights
