"""Fused expert FFN for few tokens (decode): two launches per MoE layer.

1. gate_up: for every (token, k) pair, h = act(x·W1ᵀ, x·W3ᵀ) over the pair's slot, with
   gate and up rows of w13 read in the same program (one pass over x, one launch).
2. down: for every token, out = Σ_k weight_k · (h_k·W2ᵀ): the down projection, the
   routing weight and the sum over the token's k experts in one launch, no atomics.

Weights are read from the slot blobs once per pair and dequantized in registers (NF4 in
bitsandbytes' layout, int8 per row, or 16-bit as is). At batch 1 this is a GEMV chain
bound by memory: its speed is bytes of quantized weights / bandwidth. Rows that are whole
32-bit words (every real model's) are read a word at a time, wide loads and scales folded
(dequant.word_tile_dot); odd sizes fall back to reading value pairs (dequant.load_pairs).

Shape legend: N tokens, K experts per token, P = N*K pairs, S slots, D hidden,
I expert intermediate, B blob bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moerun.kernels.dequant import act_fn, load_pairs, load_vec_pairs, word_tile_dot
from moerun.kernels.layout import SlotLayout, empty


@triton.jit
def _gate_up_kernel(
    # tensors
    x_ptr,  # [N, D] activations (compute dtype)
    slot_ids_ptr,  # [P] int32/int64, slot of each (token, k) pair
    pair_w_ptr,  # [P] routing weights (read only with WEIGHTS_ON_INPUT)
    h_ptr,  # [P, I] float32 output
    q_ptr,  # slot values view [S, *] (uint8 / int8 / storage dtype): the pair path
    w_ptr,  # slot int32 view [S, *]: the word path
    s_ptr,  # slot scales view [S, *] float32
    b_ptr,  # slot storage-dtype view [S, *] (biases)
    nf4_ptr,  # [16] float32 NF4 table
    # slot layout, in elements of each view
    slot_stride_q,
    slot_stride_w,
    slot_stride_s,
    slot_stride_b,
    off_q,
    off_w,
    off_s,
    off_b,
    # sizes and strides
    D,
    I,
    K,
    stride_x,
    ROW_WORDS,  # D * BITS / 32 (WORDS only)
    # meta
    BITS: tl.constexpr,
    WBITS: tl.constexpr,  # bits per value on the word path: BITS, or 32 for float32 storage
    WORDS: tl.constexpr,  # rows are whole 32-bit words: read words (else pairs)
    BF16: tl.constexpr,
    EVEN_L: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WEIGHTS_ON_INPUT: tl.constexpr,
    ACT: tl.constexpr,
    ALPHA: tl.constexpr,
    LIMIT: tl.constexpr,
    BLOCK_N: tl.constexpr,  # rows of h per program
    BLOCK_P: tl.constexpr,  # pair path: column pairs of D per step
    BLOCK_W: tl.constexpr,  # word path: words of a row per step
):
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    tok = pair // K
    slot = tl.load(slot_ids_ptr + pair).to(tl.int64)
    s = s_ptr + slot * slot_stride_s + off_s

    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < I
    acc_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    x_row = x_ptr + tok * stride_x
    if WORDS:
        wq = w_ptr + slot * slot_stride_w + off_w
        for w0 in range(0, ROW_WORDS, BLOCK_W):
            w = w0 + tl.arange(0, BLOCK_W)
            w_mask = w < ROW_WORDS
            acc_g += word_tile_dot(wq, s, nf4_ptr, x_row, n, n_mask, w, w_mask, ROW_WORDS, WBITS, BF16)
            acc_u += word_tile_dot(wq, s, nf4_ptr, x_row, n + I, n_mask, w, w_mask, ROW_WORDS, WBITS, BF16)
        if BITS == 8:  # one row scale per row, applied once
            acc_g *= tl.load(s + n, mask=n_mask, other=0.0)
            acc_u *= tl.load(s + I + n, mask=n_mask, other=0.0)
    else:
        q = q_ptr + slot * slot_stride_q + off_q
        rows_g = n[:, None]
        rows_u = (n + I)[:, None]  # up rows follow the I gate rows in w13
        for p0 in range(0, tl.cdiv(D, 2), BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            x0, x1 = load_vec_pairs(x_row, p, D)
            g0, g1 = load_pairs(q, s, nf4_ptr, rows_g, p[None, :], n_mask[:, None], D, BITS, EVEN_L)
            acc_g += tl.sum(g0 * x0[None, :] + g1 * x1[None, :], axis=1)
            u0, u1 = load_pairs(q, s, nf4_ptr, rows_u, p[None, :], n_mask[:, None], D, BITS, EVEN_L)
            acc_u += tl.sum(u0 * x0[None, :] + u1 * x1[None, :], axis=1)

    if WEIGHTS_ON_INPUT:  # (w·x)·Wᵀ = w·(x·Wᵀ): scale after the dot, before the bias
        w = tl.load(pair_w_ptr + pair).to(tl.float32)
        acc_g *= w
        acc_u *= w
    if HAS_BIAS:
        b = b_ptr + slot * slot_stride_b + off_b
        acc_g += tl.load(b + n, mask=n_mask, other=0.0).to(tl.float32)
        acc_u += tl.load(b + I + n, mask=n_mask, other=0.0).to(tl.float32)
    h = act_fn(acc_g, acc_u, ACT, ALPHA, LIMIT)
    tl.store(h_ptr + pair * I + n, h, mask=n_mask)


@triton.jit
def _down_sum_kernel(
    # tensors
    h_ptr,  # [P, I] float32
    slot_ids_ptr,  # [P]
    pair_w_ptr,  # [P] routing weights
    out_ptr,  # [N, D] output (compute dtype)
    q_ptr,
    w_ptr,
    s_ptr,
    b_ptr,
    nf4_ptr,
    # slot layout, in elements of each view
    slot_stride_q,
    slot_stride_w,
    slot_stride_s,
    slot_stride_b,
    off_q,
    off_w,
    off_s,
    off_b,
    # sizes and strides
    D,
    I,
    K,
    stride_out,
    ROW_WORDS,  # I * BITS / 32 (WORDS only)
    # meta
    BITS: tl.constexpr,
    WBITS: tl.constexpr,
    WORDS: tl.constexpr,
    BF16: tl.constexpr,
    EVEN_L: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WEIGHTS_ON_INPUT: tl.constexpr,
    BLOCK_N: tl.constexpr,  # output features (rows of w2) per program
    BLOCK_P: tl.constexpr,  # pair path: column pairs of I per step
    BLOCK_W: tl.constexpr,  # word path: words of a row per step
):
    tok = tl.program_id(0)
    pid_n = tl.program_id(1)
    d = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d_mask = d < D
    out = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k in range(K):
        pair = tok * K + k
        slot = tl.load(slot_ids_ptr + pair).to(tl.int64)
        s = s_ptr + slot * slot_stride_s + off_s
        h_row = h_ptr + pair * I
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        if WORDS:
            wq = w_ptr + slot * slot_stride_w + off_w
            for w0 in range(0, ROW_WORDS, BLOCK_W):
                w = w0 + tl.arange(0, BLOCK_W)
                acc += word_tile_dot(wq, s, nf4_ptr, h_row, d, d_mask, w, w < ROW_WORDS, ROW_WORDS, WBITS, BF16)
            if BITS == 8:
                acc *= tl.load(s + d, mask=d_mask, other=0.0)
        else:
            q = q_ptr + slot * slot_stride_q + off_q
            for p0 in range(0, tl.cdiv(I, 2), BLOCK_P):
                p = p0 + tl.arange(0, BLOCK_P)
                h0, h1 = load_vec_pairs(h_row, p, I)
                w0, w1 = load_pairs(q, s, nf4_ptr, d[:, None], p[None, :], d_mask[:, None], I, BITS, EVEN_L)
                acc += tl.sum(w0 * h0[None, :] + w1 * h1[None, :], axis=1)
        if HAS_BIAS:
            acc += tl.load(b_ptr + slot * slot_stride_b + off_b + d, mask=d_mask, other=0.0).to(tl.float32)
        if not WEIGHTS_ON_INPUT:
            acc *= tl.load(pair_w_ptr + pair).to(tl.float32)
        out += acc
    tl.store(out_ptr + tok * stride_out + d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def check_inputs(x, slot_ids, weights, slots, layout: SlotLayout) -> None:
    """Shared launcher checks: shapes, dtypes, devices, contiguity."""
    D = layout.w2.rows
    assert x.dim() == 2 and x.shape[1] == D, f"x must be [N, {D}], got {tuple(x.shape)}"
    assert x.stride(1) == 1, "x rows must be contiguous"
    assert x.dtype in (torch.float32, torch.float16, torch.bfloat16), x.dtype
    assert slot_ids.dim() == 2 and slot_ids.shape[0] == x.shape[0], "slot_ids must be [N, K]"
    assert slot_ids.dtype in (torch.int32, torch.int64), slot_ids.dtype
    assert weights.shape == slot_ids.shape and weights.is_floating_point(), "weights must be float [N, K]"
    assert slots.dtype == torch.uint8 and slots.dim() == 2 and slots.shape[1] == layout.blob_bytes, (
        f"slots must be uint8 [S, {layout.blob_bytes}], got {slots.dtype} {tuple(slots.shape)}"
    )
    assert slots.is_contiguous(), "slots must be contiguous"
    for t in (slot_ids, weights, slots):
        assert t.device == x.device, f"all inputs on {x.device}, got one on {t.device}"
    assert layout.w13.rows * layout.w13.cols < 2**31, "one matrix must have < 2**31 elements"


_NF4_TABLES: dict[torch.device, torch.Tensor] = {}


def nf4_table(device: torch.device) -> torch.Tensor:
    """The 16 NF4 levels on `device`, copied there once: a host->device copy inside a
    launcher would break CUDA-graph capture (and cost a sync-free but useless copy per call)."""
    table = _NF4_TABLES.get(device)
    if table is None:
        from moerun.quant.nf4 import NF4_LEVELS

        table = _NF4_TABLES[device] = NF4_LEVELS.to(device=device, dtype=torch.float32)
    return table


def word_views(slots: torch.Tensor, layout: SlotLayout):
    """The slots as int32 words, the bits of one value in them (4, 8, 16 or 32), and per
    matrix (words per row, word offset of its values), or (0, 0) when its rows are not
    whole words (odd sizes: the kernels read pairs)."""
    value_size = layout.value_dtype.itemsize
    value_bits = layout.bits if layout.bits < 16 else 8 * value_size  # "16-bit" may be stored as float32

    def matrix(m) -> tuple[int, int]:
        if (m.cols * value_bits) % 32:
            return 0, 0
        return m.cols * value_bits // 32, m.q_offset * value_size // 4

    return slots.view(torch.int32), value_bits, matrix(layout.w13), matrix(layout.w2)


def act_params(act) -> tuple[int, float, float]:
    """(ACT, ALPHA, LIMIT) from an activation object with .kind/.alpha/.limit, or None (silu)."""
    if act is None or getattr(act, "kind", "silu") == "silu":
        return 0, 1.0, 0.0
    assert act.kind == "swiglu_clamped", f"unsupported expert activation {act.kind!r}"
    return 1, float(act.alpha), float(act.limit)


def moe_decode(
    x: torch.Tensor,
    slot_ids: torch.Tensor,
    weights: torch.Tensor,
    slots: torch.Tensor,
    layout: SlotLayout,
    config: dict,
    act=None,
    weights_on_input: bool = False,
) -> torch.Tensor:
    """Σ_k weights[n, k] · expert_{slot_ids[n, k]}(x[n]) for few tokens.

    x [N, D] float32/float16/bfloat16; slot_ids [N, K] int32/int64 (slot indices into
    `slots`, already remapped from expert ids); weights [N, K] float; slots uint8 [S, B];
    config: {"BLOCK_N", "BLOCK_W" (rows of whole words), "BLOCK_P" (odd rows, read in pairs),
    "num_warps"} for each of "gate_up" and "down".
    Returns [N, D] in x.dtype. No host synchronisation: safe to capture in a CUDA graph.
    """
    check_inputs(x, slot_ids, weights, slots, layout)
    N, K = slot_ids.shape
    D, I = layout.w2.rows, layout.w2.cols
    ids = slot_ids.contiguous().view(-1)
    pair_w = weights.contiguous().view(-1)
    qv, sv, bv = layout.views(slots)
    nf4 = nf4_table(x.device)
    assert nf4.data_ptr() % 64 == 0, "the NF4 table must be 64-byte aligned (word_tile_dot ORs into its address)"
    ACT, ALPHA, LIMIT = act_params(act)
    h = empty((N * K, I), torch.float32, x.device)
    out = empty(x.shape, x.dtype, x.device)
    if N == 0:
        return out.zero_()

    wv, value_bits, (w13_words, w13_off_w), (w2_words, w2_off_w) = word_views(slots, layout)
    # What the two launches share: the slot views and their strides, and the meta but the act's
    # and the matrix's (EVEN_L, WORDS); the tiles and warps come from each launch's config.
    views = (qv, wv, sv, bv, nf4, qv.stride(0), wv.stride(0), sv.stride(0), bv.stride(0))
    bf16 = layout.storage_dtype == torch.bfloat16
    meta = dict(
        BITS=layout.bits, WBITS=value_bits, BF16=bf16, HAS_BIAS=layout.has_bias, WEIGHTS_ON_INPUT=weights_on_input
    )

    def tiles(c: dict) -> dict:
        return dict(BLOCK_N=c["BLOCK_N"], BLOCK_P=c.get("BLOCK_P", 64), BLOCK_W=c.get("BLOCK_W", 64))

    c = config["gate_up"]
    grid = (N * K, triton.cdiv(I, c["BLOCK_N"]))
    _gate_up_kernel[grid](
        x,
        ids,
        pair_w,
        h,
        *views,
        layout.w13.q_offset,
        w13_off_w,
        layout.w13.scale_offset,
        max(layout.b13_offset, 0),
        D,
        I,
        K,
        x.stride(0),
        w13_words,
        WORDS=w13_words > 0,
        EVEN_L=D % 2 == 0,
        ACT=ACT,
        ALPHA=ALPHA,
        LIMIT=LIMIT,
        **meta,
        **tiles(c),
        num_warps=c.get("num_warps", 4),
    )
    c = config["down"]
    grid = (N, triton.cdiv(D, c["BLOCK_N"]))
    _down_sum_kernel[grid](
        h,
        ids,
        pair_w,
        out,
        *views,
        layout.w2.q_offset,
        w2_off_w,
        layout.w2.scale_offset,
        max(layout.b2_offset, 0),
        D,
        I,
        K,
        out.stride(0),
        w2_words,
        WORDS=w2_words > 0,
        EVEN_L=I % 2 == 0,
        **meta,
        **tiles(c),
        num_warps=c.get("num_warps", 4),
    )
    return out
