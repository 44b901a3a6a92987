"""Routed experts on the CPU from their stored bytes (NF4, int8 or 16-bit), one call per
MoE layer: the C kernels of `cpu_experts.c` read each weight byte once and decode it in
registers (AVX-512, AVX2, or a scalar path on other CPUs), on torch's own OpenMP threads.

An expert is found through an address table, int64 [E, 6]: for each expert the addresses
of w13's values and scales, w2's values and scales, and the two biases (0 where a format
has none; a row of zeros means "not here", and that expert's pairs are skipped). Tables
of blob stores are built once per layer, so a call does no per-expert Python work.

An expert with many tokens in one call (a long prompt) goes another way: its weights are
dequantized one cache-sized tile of rows at a time into a float32 buffer (`dequant_rows`
in C) and multiplied with torch's GEMM, which re-decodes nothing and keeps the FMA units
busy; the C kernel still computes all the other experts, in the same call.

The result equals dequantizing each expert and multiplying (`fused_experts_reference`)
within float32 rounding; it is computed in float32 whatever the compute dtype.

Shape legend: N tokens, K experts per token, E experts, D hidden, I expert intermediate.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from moerun.quant.format import ExpertFormat

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ACT_CODES = {"silu": 0, "swiglu_clamped": 1}
# Columns of the address table, in the C kernel's order.
_COLUMNS = (("w13", "w13.q"), ("w13.scale", "w13.absmax"), ("w2", "w2.q"), ("w2.scale", "w2.absmax"), ("b13",), ("b2",))

# An expert with at least this many tokens in a call is computed from dequantized tiles by
# torch's GEMM, the others by the register-decoding C kernel (see `moe_experts`).
TILED_MIN_TOKENS = 24
# Values per dequantized float32 tile (rows of w13 or w2): small enough to stay in cache
# between its dequantization and its GEMM.
TILE_VALUES = 1 << 20


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
    n_tiled = 0
    if N >= TILED_MIN_TOKENS:  # a token meets an expert at most once
        n_tiled, table = _tiled_experts(x, ids, weights, table, fmt, act, weights_on_input, out)
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
    return (out if out_dtype == torch.float32 else out.to(out_dtype)), n + n_tiled


def _tiled_experts(x, ids, weights, table, fmt, act, weights_on_input, out) -> tuple[int, torch.Tensor]:
    """Add the experts with at least TILED_MIN_TOKENS tokens to `out` [N, D] float32 by
    dequantized tiles and torch's GEMM. Returns (experts computed, the table for the C
    kernel: a copy with those experts' rows zeroed, which it skips; `table` if none)."""
    E = table.shape[0]
    flat = ids.reshape(-1)
    if flat.numel() and (flat.min() < 0 or flat.max() >= E):
        raise ValueError("an expert id is outside [0, n_experts)")
    counts = torch.bincount(flat, minlength=E)
    tiled = ((counts >= TILED_MIN_TOKENS) & (table[:, 0] != 0)).nonzero().flatten()
    if not tiled.numel():
        return 0, table
    order = torch.sort(flat, stable=True).indices  # pairs grouped by expert, in token order
    ends = torch.cumsum(counts, 0)
    K = ids.shape[1]
    xf = x.float()
    wf = weights.reshape(-1)
    tile = torch.empty(max(TILE_VALUES, fmt.hidden_size, fmt.intermediate_size))  # at least one row
    for e, end, n in zip(tiled.tolist(), ends[tiled].tolist(), counts[tiled].tolist()):
        pairs = order[end - n : end]
        tokens, w = pairs // K, wf[pairs]
        xe = xf[tokens] * w[:, None] if weights_on_input else xf[tokens]
        y = _expert_by_tiles(xe, table[e].tolist(), fmt, act, tile)
        out.index_add_(0, tokens, y if weights_on_input else y * w[:, None])
    rest = table.clone()
    rest[tiled] = 0
    return tiled.numel(), rest


def _expert_by_tiles(xe, row, fmt, act, tile) -> torch.Tensor:
    """One expert on its n tokens xe [n, D] float32, from its address-table row:
    act(xe·w13ᵀ + b13)·w2ᵀ + b2 as [n, D]. Computed transposed (hᵀ = w13·xeᵀ), so that
    each tile's product is a contiguous block of rows of the result."""
    D, I = fmt.hidden_size, fmt.intermediate_size
    hT = _linear_by_tiles(xe.t().contiguous(), row[0], row[1], row[4], 2 * I, D, fmt, tile)  # [2I, n]
    aT = _activate(hT[:I], hT[I:], act)  # [I, n]
    return _linear_by_tiles(aT, row[2], row[3], row[5], D, I, fmt, tile).t()


def _linear_by_tiles(xT, w_addr, scale_addr, bias_addr, rows, cols, fmt, tile) -> torch.Tensor:
    """W·xT (+ b) as float32 [rows, n] for a stored W [rows, cols] and xT [cols, n]: W
    dequantized into `tile` as many rows at a time as fit."""
    lib, threads = _lib(), torch.get_num_threads()
    outT = torch.empty(rows, xT.shape[1])
    step = tile.numel() // cols
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        w = tile[: (r1 - r0) * cols].view(r1 - r0, cols)
        lib.dequant_rows(w_addr, scale_addr, fmt.bits, _DTYPE_CODES[fmt.dtype], cols, r0, r1, w.data_ptr(), threads)
        torch.mm(w, xT, out=outT[r0:r1])
    if bias_addr:
        bias = torch.empty(rows)
        lib.dequant_rows(bias_addr, 0, 16, _DTYPE_CODES[fmt.dtype], rows, 0, 1, bias.data_ptr(), 1)
        outT += bias[:, None]
    return outT


def _activate(gate: torch.Tensor, up: torch.Tensor, act) -> torch.Tensor:
    """The gated activation, as `ExpertActivation` and the C kernel compute it."""
    if act is None or getattr(act, "kind", "silu") == "silu":
        return F.silu(gate) * up
    gate = gate.clamp(max=act.limit)
    up = up.clamp(min=-act.limit, max=act.limit)
    return gate * torch.sigmoid(gate * act.alpha) * (up + 1)
