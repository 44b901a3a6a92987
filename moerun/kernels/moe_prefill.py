"""Fused expert FFN for many tokens (prefill): (token, k) pairs sorted by slot into blocks
of BLOCK_M rows that all use one slot (vLLM's moe_align_block_size), then a grouped GEMM
per matrix with the quantized weights dequantized in registers:

1. gate_up: h[pair] = act(x[token]·W1ᵀ, x[token]·W3ᵀ), gate and up tiles in one program.
2. down: y[pair] = weight · (h[pair]·W2ᵀ), then one sum over each token's K rows.

The alignment runs as a few torch ops on the device with a static upper bound on the
number of blocks, so there is no host synchronisation and no Python loop over experts.

Shape legend: N tokens, K experts per token, P = N*K pairs, S slots, D hidden,
I expert intermediate, M_pad padded pair rows, NB = M_pad / BLOCK_M blocks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moerun.kernels.dequant import act_fn, load_mat_pairs, load_pairs
from moerun.kernels.layout import SlotLayout, empty
from moerun.kernels.moe_decode import act_params, check_inputs, nf4_table


def align_block_size(slot_ids: torch.Tensor, n_slots: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group the (token, k) pairs by slot, each slot's group padded to a multiple of block_m.

    slot_ids [N, K] -> (sorted_pairs int32 [M_pad], block_slot int32 [NB]):
    sorted_pairs lists pair indices (n * K + k) slot by slot, padding rows hold P (a
    sentinel the kernels mask); block_slot[b] is the slot of rows [b*block_m, (b+1)*block_m),
    or -1 for blocks past the end. M_pad = P + min(S, P) * (block_m - 1), rounded up to
    block_m: a bound known without reading the counts back to the host.
    """
    flat = slot_ids.reshape(-1)
    P = flat.numel()
    device = flat.device
    max_rows = triton.cdiv(P + min(n_slots, P) * (block_m - 1), block_m) * block_m
    counts = torch.bincount(flat, minlength=n_slots)  # [S]
    padded = (counts + block_m - 1) // block_m * block_m
    start = torch.cumsum(counts, 0) - counts  # of each slot's pairs in sorted order
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    order = torch.argsort(flat, stable=True)  # pairs sorted by slot
    sorted_slot = flat[order]
    dest = pad_start[sorted_slot] + torch.arange(P, device=device) - start[sorted_slot]
    sorted_pairs = torch.full((max_rows,), P, dtype=torch.int32, device=device)
    sorted_pairs[dest] = order.to(torch.int32)
    block_start = torch.arange(0, max_rows, block_m, device=device)
    block_slot = torch.searchsorted(pad_end, block_start, right=True)  # slot whose range holds the block
    block_slot = torch.where(block_start < pad_end[-1], block_slot, -1).to(torch.int32)
    return sorted_pairs, block_slot


@triton.jit
def _grouped_gate_up_kernel(
    # tensors
    x_ptr,  # [N, D] activations
    sorted_pairs_ptr,  # [M_pad] int32 pair indices, P for padding
    block_slot_ptr,  # [NB] int32 slot of each block, -1 past the end
    pair_w_ptr,  # [P] routing weights (read only with WEIGHTS_ON_INPUT)
    h_ptr,  # [P, I] output, in x's dtype (the down GEMM's input)
    q_ptr,  # slot values view [S, *]
    s_ptr,  # slot scales view [S, *] float32
    b_ptr,  # slot storage-dtype view [S, *] (biases)
    nf4_ptr,  # [16] float32
    # slot layout, in elements of each view
    slot_stride_q,
    slot_stride_s,
    slot_stride_b,
    off_q,
    off_s,
    off_b,
    # sizes and strides
    D,
    I,
    K,
    P,
    stride_x,
    # meta
    BITS: tl.constexpr,
    EVEN_L: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WEIGHTS_ON_INPUT: tl.constexpr,
    ACT: tl.constexpr,
    ALPHA: tl.constexpr,
    LIMIT: tl.constexpr,
    FP32: tl.constexpr,  # float32 dots without tf32 (float32 inputs; bf16 under the interpreter)
    BLOCK_M: tl.constexpr,  # pair rows per block
    BLOCK_N: tl.constexpr,  # h columns per program
    BLOCK_P: tl.constexpr,  # column pairs of D per step
):
    blk = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(block_slot_ptr + blk).to(tl.int64)
    if slot < 0:
        return
    q = q_ptr + slot * slot_stride_q + off_q
    s = s_ptr + slot * slot_stride_s + off_s

    m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pairs_ptr + m)
    m_mask = pair < P
    tok = pair // K
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < I
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p0 in range(0, tl.cdiv(D, 2), BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        x0, x1 = load_mat_pairs(x_ptr, tok, p, m_mask, stride_x, D)  # [BLOCK_M, BLOCK_P]
        # W tiles transposed for the dot: [BLOCK_P, BLOCK_N]
        g0, g1 = load_pairs(q, s, nf4_ptr, n[None, :], p[:, None], n_mask[None, :], D, BITS, EVEN_L)
        u0, u1 = load_pairs(q, s, nf4_ptr, (n + I)[None, :], p[:, None], n_mask[None, :], D, BITS, EVEN_L)
        dt = x0.dtype
        if FP32:
            x0 = x0.to(tl.float32)
            x1 = x1.to(tl.float32)
            acc_g = tl.dot(x0, g0, acc_g, input_precision="ieee")
            acc_g = tl.dot(x1, g1, acc_g, input_precision="ieee")
            acc_u = tl.dot(x0, u0, acc_u, input_precision="ieee")
            acc_u = tl.dot(x1, u1, acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(x0, g0.to(dt), acc_g)
            acc_g = tl.dot(x1, g1.to(dt), acc_g)
            acc_u = tl.dot(x0, u0.to(dt), acc_u)
            acc_u = tl.dot(x1, u1.to(dt), acc_u)

    if WEIGHTS_ON_INPUT:
        w = tl.load(pair_w_ptr + pair, mask=m_mask, other=0.0).to(tl.float32)
        acc_g *= w[:, None]
        acc_u *= w[:, None]
    if HAS_BIAS:
        b = b_ptr + slot * slot_stride_b + off_b
        acc_g += tl.load(b + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(b + I + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    h = act_fn(acc_g, acc_u, ACT, ALPHA, LIMIT)
    offs = pair[:, None].to(tl.int64) * I + n[None, :]
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _grouped_down_kernel(
    # tensors
    h_ptr,  # [P, I]
    sorted_pairs_ptr,  # [M_pad] int32
    block_slot_ptr,  # [NB] int32
    pair_w_ptr,  # [P] routing weights
    y_ptr,  # [P, D] float32 output: weighted expert output of each pair
    q_ptr,
    s_ptr,
    b_ptr,
    nf4_ptr,
    # slot layout, in elements of each view
    slot_stride_q,
    slot_stride_s,
    slot_stride_b,
    off_q,
    off_s,
    off_b,
    # sizes
    D,
    I,
    P,
    # meta
    BITS: tl.constexpr,
    EVEN_L: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WEIGHTS_ON_INPUT: tl.constexpr,
    FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # output features per program
    BLOCK_P: tl.constexpr,  # column pairs of I per step
):
    blk = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(block_slot_ptr + blk).to(tl.int64)
    if slot < 0:
        return
    q = q_ptr + slot * slot_stride_q + off_q
    s = s_ptr + slot * slot_stride_s + off_s

    m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pairs_ptr + m)
    m_mask = pair < P
    d = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d_mask = d < D
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p0 in range(0, tl.cdiv(I, 2), BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        h0, h1 = load_mat_pairs(h_ptr, pair, p, m_mask, I, I)  # [BLOCK_M, BLOCK_P]
        w0, w1 = load_pairs(q, s, nf4_ptr, d[None, :], p[:, None], d_mask[None, :], I, BITS, EVEN_L)
        dt = h0.dtype
        if FP32:
            acc = tl.dot(h0.to(tl.float32), w0, acc, input_precision="ieee")
            acc = tl.dot(h1.to(tl.float32), w1, acc, input_precision="ieee")
        else:
            acc = tl.dot(h0, w0.to(dt), acc)
            acc = tl.dot(h1, w1.to(dt), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + slot * slot_stride_b + off_b + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    if not WEIGHTS_ON_INPUT:
        acc *= tl.load(pair_w_ptr + pair, mask=m_mask, other=0.0).to(tl.float32)[:, None]
    offs = pair[:, None].to(tl.int64) * D + d[None, :]
    tl.store(y_ptr + offs, acc, mask=m_mask[:, None] & d_mask[None, :])


def moe_prefill(
    x: torch.Tensor,
    slot_ids: torch.Tensor,
    weights: torch.Tensor,
    slots: torch.Tensor,
    layout: SlotLayout,
    config: dict,
    act=None,
    weights_on_input: bool = False,
) -> torch.Tensor:
    """Σ_k weights[n, k] · expert_{slot_ids[n, k]}(x[n]) for many tokens.

    x [N, D] float32/float16/bfloat16; slot_ids [N, K] int32/int64 slot indices;
    weights [N, K] float; slots uint8 [S, B]; config: {"BLOCK_M", "BLOCK_N", "BLOCK_P",
    "num_warps", "num_stages"} (each block >= 16 for tl.dot). Returns [N, D] in x.dtype.
    Intermediates: h [P, I] in x.dtype, y [P, D] float32.
    """
    check_inputs(x, slot_ids, weights, slots, layout)
    N, K = slot_ids.shape
    D, I = layout.w2.rows, layout.w2.cols
    P = N * K
    if N == 0:
        return torch.zeros_like(x)
    BM, BN, BP = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_P"]
    assert min(BM, BN, BP) >= 16, "tl.dot needs tiles of at least 16"
    sorted_pairs, block_slot = align_block_size(slot_ids, slots.shape[0], BM)
    pair_w = weights.contiguous().view(-1)
    qv, sv, bv = layout.views(slots)
    ACT, ALPHA, LIMIT = act_params(act)
    # Triton's interpreter computes 16-bit dots wrongly (numpy has no bfloat16): upcast there.
    fp32 = x.dtype == torch.float32 or x.device.type == "cpu"
    h = empty((P, I), x.dtype, x.device)
    y = empty((P, D), torch.float32, x.device)
    n_blocks = block_slot.numel()
    # What the two launches share: the slot views, their strides, and the meta but EVEN_L and the act's.
    views = (qv, sv, bv, nf4_table(x.device), qv.stride(0), sv.stride(0), bv.stride(0))
    meta = dict(BITS=layout.bits, HAS_BIAS=layout.has_bias, WEIGHTS_ON_INPUT=weights_on_input, FP32=fp32)
    tiles = dict(BLOCK_M=BM, BLOCK_N=BN, BLOCK_P=BP)
    launch = dict(num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 2))

    _grouped_gate_up_kernel[(n_blocks, triton.cdiv(I, BN))](
        x,
        sorted_pairs,
        block_slot,
        pair_w,
        h,
        *views,
        layout.w13.q_offset,
        layout.w13.scale_offset,
        max(layout.b13_offset, 0),
        D,
        I,
        K,
        P,
        x.stride(0),
        EVEN_L=D % 2 == 0,
        ACT=ACT,
        ALPHA=ALPHA,
        LIMIT=LIMIT,
        **meta,
        **tiles,
        **launch,
    )
    _grouped_down_kernel[(n_blocks, triton.cdiv(D, BN))](
        h,
        sorted_pairs,
        block_slot,
        pair_w,
        y,
        *views,
        layout.w2.q_offset,
        layout.w2.scale_offset,
        max(layout.b2_offset, 0),
        D,
        I,
        P,
        EVEN_L=I % 2 == 0,
        **meta,
        **tiles,
        **launch,
    )
    return y.view(N, K, D).sum(dim=1).to(x.dtype)
