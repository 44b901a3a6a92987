"""Routed experts in the canonical stacked layout: w13 [E, 2I, D] (gate and up fused),
w2 [E, D, I]. This is the plain-torch path (CPU, and the reference the kernels match).

Shape legend: N tokens, E experts, K experts per token, D hidden, I expert intermediate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RoutedExperts(nn.Module):
    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.n_experts = n_experts
        self.w13 = nn.Parameter(torch.empty(n_experts, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, D], ids [N, K], weights [N, K] -> sum_k weights[n, k] * expert_{ids[n, k]}(x[n])."""
        n_tokens, k = ids.shape
        flat_ids = ids.reshape(-1)
        # Group the N*K (token, expert) pairs by expert: one sort and one host sync for
        # the counts, instead of a mask and a sync per expert.
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=self.n_experts).tolist()
        token_of_pair = order // k
        pair_weights = weights.reshape(-1)[order]

        out = torch.zeros_like(x)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = token_of_pair[start : start + count]
            h = x[rows]
            gate, up = F.linear(h, self.w13[expert]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.w2[expert])
            y = y * pair_weights[start : start + count, None]
            out.index_add_(0, rows, y.to(out.dtype))
            start += count
        return out
