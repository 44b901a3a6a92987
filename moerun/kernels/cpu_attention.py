"""Attention for a few queries on the CPU (a decode step) in one C call: the matmul +
softmax + matmul of `layers.attend` costs ~30 us per op there however small the work
(Qwen3-30B-A3B's 32 query heads over 300 cached keys: 150 us per layer as torch ops,
about 15 in the kernel, development machine). Scores and softmax in float32.
"""

from __future__ import annotations

import torch

from moerun.kernels.cpu_experts import _DTYPE_CODES, _lib

# Query tokens per head up to which the kernel runs (beyond, the matmuls amortise).
MAX_QUERIES = 4


def usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return (
        _lib() is not None
        and q.device.type == "cpu"
        and q.shape[2] <= MAX_QUERIES
        and q.dtype == k.dtype == v.dtype
        and q.dtype in _DTYPE_CODES
        and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
        and q.shape[1] % k.shape[1] == 0
    )


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """q [B, H, T, Dh], k [B, Hk, S, Dh], v [B, Hk, S, Dv] (any strides but the last);
    mask bool [T, S] (True: attend) or None -> [B, H, T, Dv] in q's dtype."""
    B, H, T, Dh = q.shape
    Hk, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty(B, H, T, Dv, dtype=torch.float32)
    mask_u8 = mask.to(torch.uint8).contiguous() if mask is not None else None
    _lib().attention(
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        _DTYPE_CODES[q.dtype],
        B,
        H,
        Hk,
        T,
        S,
        Dh,
        Dv,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        mask_u8.data_ptr() if mask_u8 is not None else 0,
        float(scale),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out if q.dtype == torch.float32 else out.to(q.dtype)
