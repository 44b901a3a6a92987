"""The small ops between a CPU decode step's weight reads, one C call each (`cpu.c`):
RMSNorm, RoPE on q and k together, and the router's scores / top-k / weights. As torch ops
each costs 5-15 launches of 3-8 us whatever the size (a Qwen3-MoE layer: ~0.5 ms of glue
against ~3 ms of weight reads, development machine); in C each is a few microseconds.

Exact: each kernel computes what the torch code of layers.RMSNorm, rope.Rotary and
moe.routing.Router computes, bit for bit, in float32 and bf16. Where torch's result depends
on its summation order (the RMSNorm mean, the softmax's max and sum, the renormalising sum)
the kernel sums in that order, for the vector width torch's kernels run at (`LANES`: AVX2 or
AVX-512 builds of its CPU kernels); the softmax uses SLEEF's expf, as torch does. Elsewhere
(another CPU capability, fp16, more than a few tokens, autograd) the torch code runs.
"""

from __future__ import annotations

import functools
import math

import torch

from moerun.kernels.cpu_experts import _DTYPE_CODES, _lib

# Up to this many tokens the kernels run (a decode step, a short speculative batch);
# longer inputs are prompts, where torch's vectorised, threaded ops are the faster.
MAX_TOKENS = 4
# A norm's elements up to which the kernel runs: MAX_TOKENS tokens of a 16k-wide row (a
# hidden state, or every head of q); beyond, a prompt.
MAX_NORM_ELEMENTS = MAX_TOKENS * 16384
# torch sums one row on several threads from this many elements (at::internal::GRAIN_SIZE),
# in an order the kernel does not follow.
MAX_ROW = 32768

_GLUE_DTYPES = (torch.float32, torch.bfloat16)
# Floats per vector of torch's CPU kernels, by the capability they run (reduction orders
# differ). Only AVX2's order has been checked against torch bit for bit (the development
# machine has no AVX-512): on an AVX-512 CPU the torch code runs until the tests of
# tests/test_cpu_glue.py have passed there with "AVX512": 16 added here.
_LANES_BY_CAPABILITY = {"AVX2": 8}


@functools.lru_cache(maxsize=None)
def lanes() -> int | None:
    """torch's float vector width here, or None where its kernels are not AVX2/AVX-512 ones
    (their reduction orders are then not those the C kernels reproduce)."""
    return _LANES_BY_CAPABILITY.get(torch.backends.cpu.get_cpu_capability())


def _ready(*tensors: torch.Tensor) -> bool:
    if _lib() is None or lanes() is None or torch.is_grad_enabled():
        return False
    for t in tensors:  # a plain loop: these checks run several times per layer
        if not t.is_cpu or t.dtype not in _GLUE_DTYPES:
            return False
    return True


# -- RMSNorm ------------------------------------------------------------------------------

# How the weight meets the normalised x, as the references round it (see layers.RMSNorm).
NORM_CAST_THEN_SCALE, NORM_SCALE_THEN_CAST, NORM_OFFSET_SCALE_THEN_CAST = 0, 1, 2


def rms_norm_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    D = x.shape[-1]
    return (
        _ready(x, weight)
        and x.is_contiguous()
        and weight.is_contiguous()
        and weight.numel() == D
        and D < MAX_ROW
        and x.numel() <= MAX_NORM_ELEMENTS
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, mode: int) -> torch.Tensor:
    """x [..., D] contiguous, weight [D] -> the norm of each row (layers.RMSNorm with `mode`),
    in the dtype the torch code returns: x's, or for NORM_CAST_THEN_SCALE the promotion
    of x's and the weight's."""
    D = x.shape[-1]
    out_dtype = torch.promote_types(x.dtype, weight.dtype) if mode == NORM_CAST_THEN_SCALE else x.dtype
    out = torch.empty(x.shape, dtype=out_dtype)
    _lib().rms_norm(
        x.data_ptr(),
        _DTYPE_CODES[x.dtype],
        x.numel() // D,
        D,
        D,
        weight.data_ptr(),
        _DTYPE_CODES[weight.dtype],
        mode,
        eps,
        out.data_ptr(),
        _DTYPE_CODES[out_dtype],
        lanes(),
    )
    return out


# -- RoPE ----------------------------------------------------------------------------------


def rope_usable(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> bool:
    return (
        _ready(q, k)
        and positions.device.type == "cpu"
        and positions.numel() <= MAX_TOKENS
        and q.dim() in (3, 4)
        and k.dim() in (3, 4)
        and q.stride(-1) == k.stride(-1) == 1
    )


def _rope_operand(x: torch.Tensor) -> tuple[torch.Tensor, list]:
    """An output like x and the kernel's arguments for the pair: x [A, B, T, Dh] (a 3-d x
    gets A = 1) with its strides and the output's."""
    out = torch.empty_like(x)
    shape, xs, os = list(x.shape), list(x.stride()), list(out.stride())
    if x.dim() == 3:
        shape, xs, os = [1, *shape], [0, *xs], [0, *os]
    A, B, T, Dh = shape
    return out, [x.data_ptr(), out.data_ptr(), _DTYPE_CODES[x.dtype], A, B, T, Dh, *xs[:3], *os[:3]]


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H, T, Dh], k [B, K, T, Dh] (or [B, T, Dh]; any strides but the last) with cos,
    sin [T, dim] from Rotary.cos_sin -> rotated q, k, as Rotary.rotate: products and sums
    rounded to cos's dtype, the result to x's; interleaved pairs land de-interleaved."""
    cos, sin = cos.contiguous(), sin.contiguous()
    q_out, q_args = _rope_operand(q)
    k_out, k_args = _rope_operand(k)
    _lib().rope(*q_args, *k_args, cos.shape[-1], cos.data_ptr(), sin.data_ptr(), _DTYPE_CODES[cos.dtype], interleaved)
    return q_out, k_out


# -- routing --------------------------------------------------------------------------------

SCORING_CODES = {"softmax": 0, "sigmoid": 1}
GROUP_SCORE_CODES = {"max": 0, "top2_sum": 1}


def route_usable(logits: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> bool:
    return (
        _ready(logits)
        and logits.dim() == 2
        and logits.shape[0] <= MAX_TOKENS
        and logits.is_contiguous()
        and out_dtype in _GLUE_DTYPES
        and (bias is None or (bias.dtype in _GLUE_DTYPES and bias.is_contiguous()))
    )


def route(
    logits: torch.Tensor,
    k: int,
    *,
    scoring: str,
    bias: torch.Tensor | None,
    n_group: int,
    topk_group: int,
    group_score: str,
    renormalize: bool,
    renorm_eps: float,
    renorm_min: float | None,
    scaling: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """logits [N, E] -> (ids [N, K] int64, weights [N, K] in out_dtype) by Router's rule
    (its float32 scoring; see Router for the parameters), experts in torch.topk's order,
    ties included; None where that order is not reproduced (k > 17, k * 64 <= E, or a
    selection deep enough for libstdc++ to switch to a heap): route in torch then."""
    N, E = logits.shape
    ids = torch.empty(N, k, dtype=torch.int64)
    weights = torch.empty(N, k, dtype=out_dtype)
    routed = _lib().route(
        logits.data_ptr(),
        _DTYPE_CODES[logits.dtype],
        N,
        E,
        k,
        SCORING_CODES[scoring],
        bias.data_ptr() if bias is not None else 0,
        _DTYPE_CODES[bias.dtype] if bias is not None else 0,
        n_group,
        topk_group,
        GROUP_SCORE_CODES[group_score],
        renormalize,
        renorm_eps,
        math.nan if renorm_min is None else renorm_min,
        scaling,
        ids.data_ptr(),
        weights.data_ptr(),
        _DTYPE_CODES[out_dtype],
        lanes(),
    )
    return (ids, weights) if routed == N else None
