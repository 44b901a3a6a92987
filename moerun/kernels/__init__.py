"""Triton kernels for the MoE layer: routing, and the expert FFNs read straight from the
expert cache's slot buffers (decode: fused GEMV chain; prefill: grouped GEMM over tokens
sorted by slot). Each op has a launcher that checks its inputs and a plain-torch reference.

Triton is optional: importing this package never imports it. `available(device)` says
whether the kernels can run (CUDA, or the CPU under TRITON_INTERPRET=1 for tests);
`fused_experts` falls back to the torch reference where they cannot.

Shape legend: N tokens, K experts per token, S slots, D hidden, I expert intermediate.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from moerun.kernels.configs import get_config, shape_key
from moerun.kernels.layout import SlotLayout, slot_layout
from moerun.kernels.reference import fused_experts_reference
from moerun.quant.format import ExpertFormat

__all__ = ["available", "fused_experts", "fused_experts_reference", "route", "slot_layout", "SlotLayout"]


@functools.lru_cache(maxsize=None)
def have_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(device: torch.device | str) -> bool:
    """Can the Triton kernels run on `device`? CUDA with triton installed, or the CPU when
    TRITON_INTERPRET=1 was set before triton was first imported (the test setup)."""
    device = torch.device(device)
    if not have_triton():
        return False
    if device.type == "cuda":
        return not interpreting()
    return device.type == "cpu" and interpreting()


@functools.lru_cache(maxsize=64)
def _layout(fmt: ExpertFormat) -> SlotLayout:
    return slot_layout(fmt)


def fused_experts(
    x: torch.Tensor,
    slot_ids: torch.Tensor,
    weights: torch.Tensor,
    slots: torch.Tensor,
    fmt: ExpertFormat,
    dtype: torch.dtype | None = None,
    *,
    act=None,
    weights_on_input: bool = False,
    mode: str = "auto",
) -> torch.Tensor:
    """Routed experts from a slot buffer: Σ_k weights[n, k] · expert_{slot_ids[n, k]}(x[n]).

    x [N, D]; slot_ids [N, K] int32/int64, indices into `slots` (expert ids already mapped
    to slots; every referenced slot must hold its expert); weights [N, K] float;
    slots uint8 [S, fmt.blob_bytes], one expert blob per row; dtype: compute and output
    dtype (x.dtype if None). act: an object with .kind ("silu" | "swiglu_clamped"),
    .alpha, .limit (None means silu). weights_on_input scales x instead of the output.
    mode: "decode" | "prefill" | "auto" (on CUDA: decode up to the configured token
    count, else prefill; off CUDA: the reference) | "torch" (the reference). An explicit
    kernel mode on the CPU runs the kernels under TRITON_INTERPRET=1 (tests only: slow).
    Returns [N, D] in dtype.
    """
    dtype = dtype or x.dtype
    x = x.to(dtype)
    # The kernels compute gated experts only; non-gated (relu²) ones take the reference.
    if mode == "torch" or not fmt.gated or not available(x.device) or (mode == "auto" and x.device.type != "cuda"):
        return fused_experts_reference(x, slot_ids, weights, slots, fmt, dtype, act, weights_on_input)
    layout = _layout(fmt)
    key = shape_key(fmt.hidden_size, fmt.intermediate_size, fmt.bits)
    n_tokens = x.shape[0]
    if mode == "auto":
        limit = get_config("dispatch", key, n_tokens, x.device)["decode_max_tokens"]
        mode = "decode" if n_tokens <= limit else "prefill"
    if mode == "decode":
        from moerun.kernels.moe_decode import moe_decode

        config = get_config("decode", key, n_tokens, x.device)
        return moe_decode(x, slot_ids, weights, slots, layout, config, act, weights_on_input)
    assert mode == "prefill", f"unknown mode {mode!r}"
    from moerun.kernels.moe_prefill import moe_prefill

    config = get_config("prefill", key, n_tokens * slot_ids.shape[1], x.device)
    return moe_prefill(x, slot_ids, weights, slots, layout, config, act, weights_on_input)


def route(logits: torch.Tensor, k: int, *, kernel: bool | None = None, **kwargs):
    """Router logits [N, E] -> (ids [N, K] int32, weights [N, K] float32, slot ids [N, K]
    int32 or None); see `moerun.kernels.routing_ref.route_reference` for the rules.
    kernel: None runs the Triton kernel on CUDA and the torch reference elsewhere; True
    forces the kernel (on the CPU under TRITON_INTERPRET=1)."""
    if kernel if kernel is not None else (logits.device.type == "cuda" and available(logits.device)):
        from moerun.kernels.routing import route as route_kernel

        return route_kernel(logits, k, **kwargs)
    from moerun.kernels.routing_ref import route_reference

    return route_reference(logits, k, **kwargs)
