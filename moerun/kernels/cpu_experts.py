"""Routed experts on the CPU from their stored bytes (NF4, int8 or 16-bit), one call per
MoE layer: the C kernels of `cpu_experts.c` read each weight byte once and decode it in
registers (AVX-512, AVX2, or a scalar path on other CPUs), on torch's own OpenMP threads.

An expert is found through an address table, int64 [E, 6]: for each expert the addresses
of w13's values and scales, w2's values and scales, and the two biases (0 where a format
has none; a row of zeros means "not here", and that expert's pairs are skipped). Tables
of blob stores are built once per layer, so a call does no per-expert Python work.

The result equals dequantizing each expert and multiplying (`fused_experts_reference`)
within float32 rounding; it is computed in float32 whatever the compute dtype.

Shape legend: N tokens, K experts per token, E experts, D hidden, I expert intermediate.
"""

from __future__ import annotations

import functools
import os

import torch

from moerun.quant.format import ExpertFormat

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ACT_CODES = {"silu": 0, "swiglu_clamped": 1}
# Columns of the address table, in the C kernel's order.
_COLUMNS = (("w13", "w13.q"), ("w13.scale", "w13.absmax"), ("w2", "w2.q"), ("w2.scale", "w2.absmax"), ("b13",), ("b2",))


@functools.lru_cache(maxsize=None)
def _lib():
    """The compiled module, or None: not built (no C compiler at install time), or
    turned off with MOERUN_CPU_KERNELS=0."""
    if os.environ.get("MOERUN_CPU_KERNELS", "1") == "0":
        return None
    try:
        from moerun.kernels import _cpu
    except ImportError:
        return None
    return _cpu


def available() -> bool:
    return _lib() is not None


def isa() -> str | None:
    """The instruction set the kernels run: "avx512", "avx2", "scalar"; None if not built."""
    lib = _lib()
    return lib.isa() if lib is not None else None


def set_isa(name: str) -> None:
    """Force a narrower instruction set than the CPU's best (tests of the other paths)."""
    _lib().set_isa(name)


def supports(fmt: ExpertFormat, dtype: torch.dtype) -> bool:
    """Can the kernels compute experts of `fmt` for activations in `dtype`? Not non-gated
    (relu²) experts: those take the plain-torch path."""
    return available() and fmt.gated and fmt.dtype in _DTYPE_CODES and dtype in _DTYPE_CODES


@functools.lru_cache(maxsize=64)
def _section_offsets(fmt: ExpertFormat) -> tuple[int, ...]:
    by_name = {s.name: s.offset for s in fmt.sections}
    return tuple(next((by_name[n] for n in names if n in by_name), -1) for names in _COLUMNS)


def blob_table(blobs: torch.Tensor, fmt: ExpertFormat) -> torch.Tensor:
    """Address table int64 [E, 6] of a uint8 [E, blob_bytes] store (any row stride: a
    synthetic store whose rows all view one blob has stride 0). The store must outlive it."""
    assert blobs.dtype == torch.uint8 and blobs.dim() == 2 and blobs.shape[1] == fmt.blob_bytes
    assert blobs.device.type == "cpu" and blobs.stride(1) == 1
    offsets = torch.tensor(_section_offsets(fmt), dtype=torch.int64)
    base = blobs.data_ptr() + torch.arange(blobs.shape[0], dtype=torch.int64) * blobs.stride(0)
    table = base[:, None] + offsets[None, :]
    return table.masked_fill_((offsets < 0)[None, :], 0)


def stacked_table(w13: torch.Tensor, w2: torch.Tensor, b13=None, b2=None) -> torch.Tensor:
    """Address table of 16-bit stacked experts: w13 [E, 2I, D], w2 [E, D, I], biases
    b13 [E, 2I], b2 [E, D] (contiguous CPU tensors that outlive the table)."""
    E = w13.shape[0]
    table = torch.zeros(E, 6, dtype=torch.int64)
    for col, t in ((0, w13), (2, w2), (4, b13), (5, b2)):
        if t is not None:
            assert t.is_contiguous() and t.device.type == "cpu"
            table[:, col] = t.data_ptr() + torch.arange(E, dtype=torch.int64) * t.stride(0) * t.element_size()
    return table


def moe_experts(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    table: torch.Tensor,
    fmt: ExpertFormat,
    act=None,
    weights_on_input: bool = False,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, int]:
    """Σ_k weights[n, k] · expert_{ids[n, k]}(x[n]) over the experts present in `table`.

    x [N, D] float32/bf16/fp16 on the CPU; ids [N, K] expert ids; weights [N, K];
    table int64 [E, 6] (see `blob_table`); fmt: the experts' format (bits, D, I, storage
    dtype; 16 bits: the stacked tensors' dtype). act: .kind "silu" | "swiglu_clamped",
    .alpha, .limit (None: silu). weights_on_input scales x by the weight instead of the
    output. Returns ([N, D] in out_dtype (x.dtype if None), experts computed)."""
    lib = _lib()
    N, D = x.shape
    if D != fmt.hidden_size:
        raise ValueError(f"x has {D} features, the experts take {fmt.hidden_size}")
    if ids.shape != weights.shape or ids.shape[0] != N:
        raise ValueError(f"ids {list(ids.shape)} and weights {list(weights.shape)} must both be [{N}, K]")
    if table.dtype != torch.int64 or table.dim() != 2 or table.shape[1] != 6:
        raise ValueError(f"the address table must be int64 [E, 6], got {table.dtype} {list(table.shape)}")
    x = x.contiguous()
    ids = ids.to(torch.int64).contiguous()
    weights = weights.to(torch.float32).contiguous()
    table = table.contiguous()
    out = torch.zeros(N, D, dtype=torch.float32)
    kind = getattr(act, "kind", "silu") if act is not None else "silu"
    n = lib.moe_layer(
        x.data_ptr(),
        _DTYPE_CODES[x.dtype],
        N,
        D,
        fmt.intermediate_size,
        ids.data_ptr(),
        weights.data_ptr(),
        ids.shape[1],
        table.data_ptr(),
        table.shape[0],
        fmt.bits,
        _DTYPE_CODES[fmt.dtype],
        _ACT_CODES[kind],
        float(getattr(act, "alpha", 1.702)),
        float(getattr(act, "limit", 7.0)),
        int(weights_on_input),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    out_dtype = out_dtype or x.dtype
    return (out if out_dtype == torch.float32 else out.to(out_dtype)), n
