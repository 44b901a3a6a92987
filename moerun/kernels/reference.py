"""Plain-torch references the kernels are tested against (and the CPU fallback of
`fused_experts`): the same math as the CPU expert path, one (token, k) pair at a time.

Shape legend: N tokens, K experts per token, S slots, D hidden, I expert intermediate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moerun.quant.format import ExpertFormat


def _act(h: torch.Tensor, act) -> torch.Tensor:
    """The activation of h = x·w13ᵀ (+ b13): gated [n, 2I], or [n, I] for a non-gated act."""
    if act is not None and not getattr(act, "gated", True):
        return act.of(h)
    gate, up = h.chunk(2, dim=-1)
    if act is None or getattr(act, "kind", "silu") == "silu":
        return F.silu(gate) * up
    return act(gate, up)


def unpack_expert(fmt: ExpertFormat, blob: torch.Tensor, dtype: torch.dtype):
    """(w13, w2, b13 | None, b2 | None) of one blob, whatever `fmt.unpack` returns."""
    parts = tuple(fmt.unpack(blob, dtype))
    return parts + (None,) * (4 - len(parts))


def fused_experts_reference(
    x: torch.Tensor,
    slot_ids: torch.Tensor,
    weights: torch.Tensor,
    slots: torch.Tensor,
    fmt: ExpertFormat,
    dtype: torch.dtype | None = None,
    act=None,
    weights_on_input: bool = False,
) -> torch.Tensor:
    """x [N, D], slot_ids [N, K], weights [N, K], slots uint8 [S, blob_bytes] ->
    Σ_k weights[n, k] · expert_{slot_ids[n, k]}(x[n]) as [N, D] in `dtype` (x.dtype if None).
    Each expert: gate, up = x·w13ᵀ (+ b13); act(gate, up)·w2ᵀ (+ b2), computed in `dtype`."""
    dtype = dtype or x.dtype
    x = x.to(dtype)
    out = torch.zeros_like(x)
    cache: dict[int, tuple] = {}
    for n in range(x.shape[0]):
        for k in range(slot_ids.shape[1]):
            s = int(slot_ids[n, k])
            if s not in cache:
                cache[s] = unpack_expert(fmt, slots[s], dtype)
            w13, w2, b13, b2 = cache[s]
            w = weights[n, k].to(dtype)
            xi = x[n : n + 1] * w if weights_on_input else x[n : n + 1]
            y = F.linear(_act(F.linear(xi, w13, b13), act), w2, b2)
            out[n] += (y if weights_on_input else y * w)[0]
    return out
