"""Routed experts in the canonical stacked layout: w13 [E, 2I, D] (gate rows, then up
rows), w2 [E, D, I], optional biases b13 [E, 2I] and b2 [E, D]. This is the plain-torch
path (CPU, and the reference the kernels match); `expert_ffn` is the one definition of an
expert's math, shared with the expert cache.

Shape legend: N tokens, E experts, K experts per token, D hidden, I expert intermediate.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from moerun.graphs import host_boundary


@dataclasses.dataclass(frozen=True)
class ExpertActivation:
    """The gated activation between the two matmuls.

    "silu": silu(gate) * up (Mixtral, Qwen, DeepSeek, ...).
    "swiglu_clamped": gpt-oss' variant: gate clamped above at `limit`, up clamped to
    [-limit, limit], gate * sigmoid(alpha * gate) * (up + 1)."""

    kind: str = "silu"
    alpha: float = 1.702
    limit: float = 7.0

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.kind == "silu":
            return F.silu(gate) * up
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return gate * torch.sigmoid(gate * self.alpha) * (up + 1)


SILU = ExpertActivation()


def expert_ffn(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    act: ExpertActivation = SILU,
) -> torch.Tensor:
    """One expert: x [n, D], w13 [2I, D], w2 [D, I] (+ b13 [2I], b2 [D]) -> [n, D]."""
    gate, up = F.linear(x, w13, b13).chunk(2, dim=-1)
    return F.linear(act(gate, up), w2, b2)


class RoutedExperts(nn.Module):
    """All experts of one layer. `weights_on_input`: scale each token's input by its
    routing weight before the expert instead of scaling the output (Llama 4)."""

    def __init__(
        self,
        n_experts: int,
        hidden_size: int,
        intermediate_size: int,
        bias: bool = False,
        act: ExpertActivation = SILU,
        weights_on_input: bool = False,
    ):
        super().__init__()
        self.n_experts = n_experts
        self.act, self.weights_on_input = act, weights_on_input
        self.w13 = nn.Parameter(torch.empty(n_experts, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden_size, intermediate_size))
        if bias:
            self.b13 = nn.Parameter(torch.empty(n_experts, 2 * intermediate_size))
            self.b2 = nn.Parameter(torch.empty(n_experts, hidden_size))
        else:
            self.b13 = self.b2 = None

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, D], ids [N, K], weights [N, K] -> sum_k weights[n, k] * expert_{ids[n, k]}(x[n])."""
        # The loop syncs with the host for the expert counts: a CUDA graph breaks here.
        return host_boundary(self._forward, x, ids, weights)

    def _forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for expert, rows, w in group_by_expert(ids, weights, self.n_experts):
            b13 = self.b13[expert] if self.b13 is not None else None
            b2 = self.b2[expert] if self.b2 is not None else None
            out.index_add_(0, rows, apply_expert(x[rows], w, self.w13[expert], self.w2[expert], b13, b2, self.act,
                                                 self.weights_on_input).to(out.dtype))  # fmt: skip
        return out


def group_by_expert(ids: torch.Tensor, weights: torch.Tensor, n_experts: int):
    """Yield (expert, token rows [n], routing weights [n]) for every expert in use.

    One sort and one host sync for the counts, instead of a mask and a sync per expert."""
    k = ids.shape[1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts).tolist()
    rows, pair_w = order // k, weights.reshape(-1)[order]
    start = 0
    for expert, count in enumerate(counts):
        if count:
            yield expert, rows[start : start + count], pair_w[start : start + count]
        start += count


def apply_expert(x, w, w13, w2, b13, b2, act: ExpertActivation, weights_on_input: bool) -> torch.Tensor:
    """One expert on its tokens x [n, D] with their routing weights w [n]."""
    if weights_on_input:
        return expert_ffn(x * w[:, None].to(x.dtype), w13, w2, b13, b2, act)
    return expert_ffn(x, w13, w2, b13, b2, act) * w[:, None]
