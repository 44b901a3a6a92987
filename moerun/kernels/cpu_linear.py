"""Dense layers on the CPU at a few tokens: a decode step's attention projections,
routers and lm_head are GEMVs, bound by reading each weight once. torch's bf16 GEMV
streams about 26 GB/s on the 2-core development machine, the C kernel (`cpu.c`,
`dense_linear`) about 40, near the memory's read bandwidth; longer inputs (prompts) are
matrix products, where torch's (oneDNN's) kernels are the faster, so they stay with torch.

`CpuLinear` is an nn.Linear that picks between the two per call; `use_cpu_linears(model)`
swaps it in for every nn.Linear of a CPU model (same parameters, no copy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moerun.kernels.cpu_experts import _DTYPE_CODES, _lib

# Up to this many tokens the C kernel runs; beyond, torch's matmul (measured crossover on
# the development machine: the C kernel computes in float32, oneDNN's bf16 GEMM does twice
# the multiply-adds per instruction once the weights are reused across tokens).
MAX_TOKENS = 4


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., K] on the CPU through the C kernel: float32
    accumulation, returned in x's dtype. weight [N, K] contiguous fp32/bf16/fp16."""
    lib = _lib()
    K = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K).contiguous()
    N = weight.shape[0]
    out = torch.empty(x2.shape[0], N, dtype=torch.float32)
    lib.linear(
        x2.data_ptr(),
        _DTYPE_CODES[x2.dtype],
        x2.shape[0],
        K,
        weight.data_ptr(),
        _DTYPE_CODES[weight.dtype],
        N,
        bias.data_ptr() if bias is not None else 0,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out.reshape(*lead, N).to(x.dtype)


class CpuLinear(nn.Linear):
    """nn.Linear whose few-token calls on the CPU go through the C GEMV. Its weight may be
    kept in 16 bits while the activations are float32 (moerun.plan.linear_dtype): the C
    kernel widens it in registers, and a longer input's matmul widens it first."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if (
            x.device.type == "cpu"
            and x.numel() <= MAX_TOKENS * x.shape[-1]
            and w.is_contiguous()
            and x.dtype in _DTYPE_CODES
            and not torch.is_grad_enabled()
        ):
            if b is None or (b.dtype == w.dtype and b.is_contiguous()):
                return linear(x, w, b)
            return linear(x, w) + b.to(x.dtype)  # the kernel reads a bias in the weight's dtype
        if w.dtype != x.dtype or (b is not None and b.dtype != x.dtype):
            return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))
        return F.linear(x, w, b)


def use_cpu_linears(model: nn.Module) -> int:
    """Make every plain nn.Linear of `model` a CpuLinear (in place, parameters shared);
    returns how many. A no-op without the compiled kernels or for dtypes they lack."""
    if _lib() is None:
        return 0
    swapped = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.dtype in _DTYPE_CODES and module.weight.device.type == "cpu":
            module.__class__ = CpuLinear  # same state, new forward: no copy of the weights
            swapped += 1
    return swapped
