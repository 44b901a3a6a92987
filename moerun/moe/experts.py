"""Routed experts in the canonical stacked layout: w13 [E, 2I, D] (gate rows, then up
rows; [E, I, D], up only, for a non-gated activation), w2 [E, D, I], optional biases
b13 [E, 2I] and b2 [E, D]. This is the plain-torch
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
from moerun.kernels import cpu_experts
from moerun.quant.format import ExpertFormat

# Routed experts on the CPU go through the C kernels while the average expert gets at most
# this many tokens (measured on the development machine with bf16 weights: the C kernels
# win at decode and short prompts; torch's bf16 GEMM wins at Mixtral's 16 tokens per expert
# of a 64-token prompt).
CPU_KERNEL_TOKENS_PER_EXPERT = 8


@dataclasses.dataclass(frozen=True)
class ExpertActivation:
    """The gated activation between the two matmuls.

    "silu": silu(gate) * up (Mixtral, Qwen, DeepSeek, ...).
    "swiglu_clamped": gpt-oss' variant: gate clamped above at `limit`, up clamped to
    [-limit, limit], gate * sigmoid(alpha * gate) * (up + 1).
    "relu2": not gated, relu(up)² (Nemotron-H): w13 holds the I up rows only.
    "relu": not gated, relu(up) (the Switch Transformer's wi/wo experts): up rows only too."""

    kind: str = "silu"
    alpha: float = 1.702
    limit: float = 7.0

    @property
    def gated(self) -> bool:
        """Does w13 hold gate and up rows (2I), or up rows only (I)?"""
        return self.kind not in ("relu2", "relu")

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.kind == "silu":
            return F.silu(gate) * up
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return gate * torch.sigmoid(gate * self.alpha) * (up + 1)

    def of(self, h: torch.Tensor) -> torch.Tensor:
        """The activation of h = x·w13ᵀ (+ b13): [n, 2I] (gated) or [n, I] -> [n, I]."""
        if self.kind == "relu":
            return torch.relu(h)
        if not self.gated:
            return torch.square(torch.relu(h))
        return self(*h.chunk(2, dim=-1))


SILU = ExpertActivation()
RELU2 = ExpertActivation("relu2")
RELU = ExpertActivation("relu")


def expert_ffn(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    act: ExpertActivation = SILU,
) -> torch.Tensor:
    """One expert: x [n, D], w13 [2I, D] ([I, D] non-gated), w2 [D, I] (+ b13, b2 [D]) -> [n, D]."""
    h = F.linear(x, w13, b13)
    if not getattr(act, "gated", True):
        return F.linear(act.of(h), w2, b2)
    return F.linear(act(*h.chunk(2, dim=-1)), w2, b2)


class RoutedExperts(nn.Module):
    """All experts of one layer. `weights_on_input`: scale each token's input by its
    routing weight before the expert instead of scaling the output (Llama 4)."""

    role = "routed_experts"

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
        rows13 = (2 if act.gated else 1) * intermediate_size
        self.w13 = nn.Parameter(torch.empty(n_experts, rows13, hidden_size))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden_size, intermediate_size))
        if bias:
            self.b13 = nn.Parameter(torch.empty(n_experts, rows13))
            self.b2 = nn.Parameter(torch.empty(n_experts, hidden_size))
        else:
            self.b13 = self.b2 = None

    @property
    def intermediate_size(self) -> int:
        return self.w2.shape[2]

    @property
    def n_params(self) -> int:
        return sum(t.numel() for t in (self.w13, self.w2, self.b13, self.b2) if t is not None)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, D], ids [N, K], weights [N, K] -> sum_k weights[n, k] * expert_{ids[n, k]}(x[n])."""
        # Both paths decide on the host (the C kernels read ids there; the loop syncs for
        # the expert counts): a CUDA graph breaks here.
        if self._on_cpu_kernels(ids):
            return host_boundary(self._cpu_forward, x, ids, weights)
        return host_boundary(self._forward, x, ids, weights)

    def _on_cpu_kernels(self, ids: torch.Tensor) -> bool:
        """Few tokens per expert on the CPU: one C call for the layer instead of a Python
        loop over experts. Many tokens per expert (a long prompt into few experts): torch's
        bf16 GEMM does twice the multiply-adds per instruction of the C kernel's."""
        n_pairs = ids.numel()
        return (
            ids.device.type == "cpu"
            and n_pairs <= CPU_KERNEL_TOKENS_PER_EXPERT * min(self.n_experts, n_pairs)
            and cpu_experts.supports(self._cpu_format(), self.w13.dtype)
            and all(t is None or t.is_contiguous() for t in (self.w13, self.w2, self.b13, self.b2))
            and not torch.is_grad_enabled()
        )

    def _cpu_format(self) -> ExpertFormat:
        return ExpertFormat(
            16,
            self.w13.shape[2],
            self.intermediate_size,
            self.w13.dtype,
            bias=self.b13 is not None,
            gated=self.act.gated,
        )

    def _cpu_forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        key = (self.w13.data_ptr(), self.w2.data_ptr())
        if getattr(self, "_cpu_table_key", None) != key:  # built once; rebuilt if the weights move
            self._cpu_table = cpu_experts.stacked_table(self.w13, self.w2, self.b13, self.b2)
            self._cpu_table_key = key
        out, _ = cpu_experts.moe_experts(
            x, ids, weights, self._cpu_table, self._cpu_format(), self.act, self.weights_on_input, x.dtype
        )
        return out

    def _forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for expert, rows, w in group_by_expert(ids, weights, self.n_experts):
            b13 = self.b13[expert] if self.b13 is not None else None
            b2 = self.b2[expert] if self.b2 is not None else None
            out.index_add_(
                0,
                rows,
                apply_expert(
                    x[rows], w, self.w13[expert], self.w2[expert], b13, b2, self.act, self.weights_on_input
                ).to(out.dtype),
            )
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
