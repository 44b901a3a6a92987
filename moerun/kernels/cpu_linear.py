"""Dense layers on the CPU at a few tokens: a decode step's attention projections,
routers and lm_head are GEMVs, bound by reading each weight once. torch's bf16 GEMV
streams about 26 GB/s on the 2-core development machine, the C kernel (`cpu.c`,
`dense_linears`) about 40, near the memory's read bandwidth; longer inputs (prompts) are
matrix products, where torch's (oneDNN's) kernels are the faster, so they stay with torch.
The kernel reads float32 or 16-bit weights whatever the activations' dtype, so a CPU
without native bf16 computes in float32 over bf16 matrices (moerun.plan.linear_dtype).

`CpuLinear` is an nn.Linear that picks between the two per call; `use_cpu_linears(model)`
swaps it in for every nn.Linear of a CPU model (same parameters, no copy). `project`
runs the projections that share an input (q/k/v, gate/up) in one call.
"""

from __future__ import annotations

from array import array

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


def _fits_kernel(x: torch.Tensor, layer: nn.Linear) -> bool:
    """Can `layer`(x) run in the C kernel, its bias read in its weight's dtype?"""
    w, b = layer.weight, layer.bias
    return (
        x.device.type == "cpu"
        and x.numel() <= MAX_TOKENS * x.shape[-1]
        and w.is_contiguous()
        and x.dtype in _DTYPE_CODES
        and w.dtype in _DTYPE_CODES
        and (b is None or (b.dtype == w.dtype and b.is_contiguous()))
        and not torch.is_grad_enabled()
    )


def project(x: torch.Tensor, *layers: nn.Linear) -> tuple[torch.Tensor, ...]:
    """(layer(x) for layer in layers): the projections that read one input (q/k/v,
    gate/up). Where each would run in the C kernel, they run in one call: one parallel
    region instead of one per matrix, so one barrier, the fewer on a busy machine."""
    w0 = layers[0].weight
    if _lib() is None or not all(_fits_kernel(x, m) and m.weight.dtype == w0.dtype for m in layers):
        return tuple(m(x) for m in layers)
    K = x.shape[-1]
    x2 = x.reshape(-1, K).contiguous()
    outs = [torch.empty(x2.shape[0], m.weight.shape[0], dtype=torch.float32) for m in layers]
    table = array("q")
    for m, out in zip(layers, outs):  # the C kernel's LIN_W, LIN_N, LIN_B, LIN_OUT columns
        b = m.bias
        table.extend((m.weight.data_ptr(), m.weight.shape[0], b.data_ptr() if b is not None else 0, out.data_ptr()))
    _lib().linears(
        x2.data_ptr(),
        _DTYPE_CODES[x2.dtype],
        x2.shape[0],
        K,
        _DTYPE_CODES[w0.dtype],
        table.buffer_info()[0],
        len(layers),
        torch.get_num_threads(),
    )
    return tuple(out.reshape(*x.shape[:-1], out.shape[-1]).to(x.dtype) for out in outs)


# A prompt's matmul over a 16-bit matrix widens it first; into this buffer, kept between
# calls, when it is at most WIDEN_BUFFER_BYTES: a fresh tensor per call (mmap'd, faulted
# in page by page, zeroed by the kernel) costs as much as the copy itself.
WIDEN_BUFFER_BYTES = 64 << 20
_widen_buffer = torch.empty(0)


def _widened(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    global _widen_buffer
    if w.numel() * torch.empty((), dtype=dtype).element_size() > WIDEN_BUFFER_BYTES:
        return w.to(dtype)
    if _widen_buffer.dtype != dtype or _widen_buffer.numel() < w.numel():
        _widen_buffer = torch.empty(w.numel(), dtype=dtype)
    return _widen_buffer[: w.numel()].view(w.shape).copy_(w)


class CpuLinear(nn.Linear):
    """nn.Linear whose few-token calls on the CPU go through the C GEMV. Its weight may be
    kept in 16 bits while the activations are float32 (moerun.plan.linear_dtype): the C
    kernel widens it in registers, and a longer input's matmul widens it first."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if _fits_kernel(x, self):
            return linear(x, w, b)
        if w.dtype != x.dtype or (b is not None and b.dtype != x.dtype):
            wide = _widened(w, x.dtype) if x.device.type == "cpu" and not torch.is_grad_enabled() else w.to(x.dtype)
            return F.linear(x, wide, None if b is None else b.to(x.dtype))
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
