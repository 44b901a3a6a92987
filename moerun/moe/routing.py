"""Router rules. Each architecture picks its rule and parameters in its own file; this
module holds the math so that later kernels have one reference to match.

Shape legend: N tokens, E experts, K experts per token.
"""

from __future__ import annotations

import torch


def routing_kernel_for(logits: torch.Tensor, kernel: bool | None = None) -> bool:
    """Use the Triton routing kernel? On CUDA when the kernels can run (kernel=None);
    kernel=True forces it (the CPU then needs TRITON_INTERPRET=1: tests)."""
    if kernel is not None:
        return kernel
    if logits.device.type != "cuda":
        return False
    from moerun import kernels

    return kernels.available(logits.device)


def softmax_topk(
    logits: torch.Tensor,
    k: int,
    renormalize: bool,
    weights_dtype: torch.dtype | None = None,
    kernel: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts (in float32), keep the k largest, optionally renormalise
    them to sum to one. logits [N, E] -> (ids [N, K] int64, weights [N, K]).

    With renormalize=True this equals "top-k of the logits, then softmax over the k"
    (Mixtral's rule); without it the weights are the full-softmax probabilities
    (Qwen2-MoE, Qwen3-MoE with norm_topk_prob false). On CUDA one routing kernel does it
    all (moerun/kernels/routing.py), instead of four or five torch launches.
    """
    if routing_kernel_for(logits, kernel):
        from moerun import kernels

        ids, weights, _ = kernels.route(logits.contiguous(), k, kernel=True, scoring="softmax", renormalize=renormalize)
        return ids.long(), weights if weights_dtype is None else weights.to(weights_dtype)
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if weights_dtype is not None:
        weights = weights.to(weights_dtype)
    return ids, weights
