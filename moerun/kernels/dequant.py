"""Device helpers shared by the expert kernels: read a tile of one quantized matrix of a
slot blob and dequantize it in registers. Not an op of its own (no launcher).

Every matrix W [R, L] is read as column pairs: for rows `rows` and pair columns `pcols`
(broadcastable int tensors, tile shape T) `load_pairs` returns (W[rows, 2p], W[rows, 2p+1])
as float32 tensors of shape T. Pairs match NF4's packing (two codes per byte, first value
in the high nibble), so a 4-bit byte is loaded once and feeds two multiply-adds; the
activation side loads its even and odd elements to match.
"""

import triton
import triton.language as tl


@triton.jit
def act_fn(gate, up, ACT: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr):
    """The gated activation in float32. ACT 0: silu(gate) * up; ACT 1: gpt-oss' clamped
    swiglu, gate * sigmoid(ALPHA * gate) * (up + 1) with gate <= LIMIT, |up| <= LIMIT."""
    if ACT == 0:
        return gate * tl.sigmoid(gate) * up
    else:
        gate = tl.minimum(gate, LIMIT)
        up = tl.minimum(tl.maximum(up, -LIMIT), LIMIT)
        return gate * tl.sigmoid(gate * ALPHA) * (up + 1.0)


@triton.jit
def load_pairs(
    # pointers to this slot's matrix: values (uint8 / int8 / storage dtype), float32 scales
    q_ptr,
    s_ptr,
    nf4_ptr,  # float32 [16], the NF4 code table
    # tile coordinates: row index, pair-column index (broadcastable), row mask
    rows,
    pcols,
    row_mask,
    L,  # row length of the matrix (its number of columns)
    BITS: tl.constexpr,  # 4: NF4 blocks of 64 over the flattened matrix; 8: int8 + row scale; 16: as is
    EVEN_L: tl.constexpr,  # L % 2 == 0: a 4-bit row starts on a byte, one byte per pair
):
    c0 = 2 * pcols
    m0 = row_mask & (c0 < L)
    m1 = row_mask & (c0 + 1 < L)
    if BITS == 4:
        f0 = rows * L + c0  # flat element index of the pair's first value
        if EVEN_L:
            byte = tl.load(q_ptr + (f0 >> 1), mask=m0, other=0).to(tl.int32)
            amax = tl.load(s_ptr + (f0 >> 6), mask=m0, other=0.0)  # both values share a block
            w0 = tl.load(nf4_ptr + (byte >> 4)) * amax
            w1 = tl.load(nf4_ptr + (byte & 15)) * amax
        else:
            # A row may start mid-byte: each value finds its own byte, nibble and block.
            f1 = f0 + 1
            b0 = tl.load(q_ptr + (f0 >> 1), mask=m0, other=0).to(tl.int32)
            b1 = tl.load(q_ptr + (f1 >> 1), mask=m1, other=0).to(tl.int32)
            n0 = (b0 >> ((1 - (f0 & 1)) * 4)) & 15
            n1 = (b1 >> ((1 - (f1 & 1)) * 4)) & 15
            w0 = tl.load(nf4_ptr + n0) * tl.load(s_ptr + (f0 >> 6), mask=m0, other=0.0)
            w1 = tl.load(nf4_ptr + n1) * tl.load(s_ptr + (f1 >> 6), mask=m1, other=0.0)
    else:
        # [T..., 2]: the pair is the contiguous last axis, so the load can vectorise.
        two = tl.arange(0, 2)
        offs = (rows * L + c0)[:, :, None] + two[None, None, :]
        mask = row_mask[:, :, None] & ((c0[:, :, None] + two[None, None, :]) < L)
        w = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.float32)
        w0, w1 = tl.split(w)
        if BITS == 8:
            scale = tl.load(s_ptr + rows, mask=row_mask, other=0.0)
            w0 = w0 * scale
            w1 = w1 * scale
    return w0, w1


@triton.jit
def word_tile_dot(
    w_ptr,  # int32 view of this slot's matrix values: row r starts at word r * ROW_WORDS
    s_ptr,  # float32 NF4 absmax of this matrix (BITS == 4)
    nf4_ptr,  # float32 [16] NF4 code table
    v_ptr,  # the vector dotted with every row: v[c] for column c (any float dtype)
    rows,  # [BN] row indices
    row_mask,  # [BN]
    w,  # [BW] word indices within a row
    w_mask,  # [BW]
    ROW_WORDS,  # words per row: row length * BITS / 32 (a whole number on this path)
    BITS: tl.constexpr,  # bits per value: 4 (NF4), 8 (int8), 16 (bf16/fp16), 32 (float32)
    BF16: tl.constexpr,  # 16-bit values are bfloat16 (else float16)
):
    """Σ over the words `w` of rows `rows` of (dequantized value · v[column]): [BN] float32.

    The decode kernels' weight read. A 32-bit word holds 8 NF4 codes, 4 int8 or 2 16-bit
    values, so weights come in as whole words (vectorised to 128-bit loads, not a byte
    load per pair), and each value is decoded from the word in registers: NF4 by the code
    table (a 64-byte L1-resident gather), int8 by the exponent trick (float(0x4B000000 |
    (b ^ 0x80)) - 2^23 - 128: two full-rate ops instead of a quarter-rate conversion), 16-bit
    by a shift. NF4 absmax is applied per word (8 values share a 64-block); an int8 row
    scale is left to the caller, which applies it once per row."""
    VALS: tl.constexpr = 32 // BITS
    table_base = nf4_ptr.to(tl.int64, bitcast=True)
    mask = row_mask[:, None] & w_mask[None, :]
    words = tl.load(w_ptr + rows[:, None] * ROW_WORDS + w[None, :], mask=mask, other=0)  # int32 [BN, BW]
    part = tl.zeros((rows.shape[0], w.shape[0]), dtype=tl.float32)
    for j in tl.static_range(VALS):
        vj = tl.load(v_ptr + w * VALS + j, mask=w_mask, other=0.0).to(tl.float32)  # column VALS*w + j
        if BITS == 4:
            # Byte j // 2 of the word; the first value of a byte is its high nibble. The
            # table is 64-byte aligned, so its entry's address is base | (code * 4): one
            # shift and one 3-input logic op instead of a 64-bit add (the gather is this
            # loop's hot spot: see scripts/inspect_kernels.py).
            shift = 8 * (j // 2) + 4 * (1 - j % 2)
            if shift >= 2:
                offset = (words >> (shift - 2)) & 60
            else:
                offset = (words << 2) & 60
            val = tl.load((table_base | offset.to(tl.int64)).to(tl.pointer_type(tl.float32)))
        elif BITS == 8:
            byte = ((words >> (8 * j)) & 255) ^ 128  # the int8 value + 128, in [0, 255]
            val = (byte | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
        elif BITS == 32:  # float32 storage (16-bit "as is" in a float32 model, the CPU tests)
            val = words.to(tl.float32, bitcast=True)
        elif BF16:
            if j == 0:
                val = (words << 16).to(tl.float32, bitcast=True)  # the low half, shifted into place
            else:
                val = ((words >> 16) << 16).to(tl.float32, bitcast=True)
        else:
            val = ((words >> (16 * j)) & 65535).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        part += val * vj[None, :]
    if BITS == 4:
        # Flat index of a word's first value is 8 * (row * ROW_WORDS + w); blocks hold 64.
        part *= tl.load(s_ptr + ((rows[:, None] * ROW_WORDS + w[None, :]) >> 3), mask=mask, other=0.0)
    return tl.sum(part, axis=1)


@triton.jit
def load_vec_pairs(ptr, pcols, n):
    """(v[2p], v[2p+1]) float32 of a contiguous vector v [n]; pcols [P]."""
    two = tl.arange(0, 2)
    offs = 2 * pcols[:, None] + two[None, :]
    v = tl.load(ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    return tl.split(v)


@triton.jit
def load_mat_pairs(ptr, rows, pcols, row_mask, stride, n):
    """(A[rows, 2p], A[rows, 2p+1]) float32 of a row-major A [*, n]; rows [M], pcols [P] -> [M, P]."""
    two = tl.arange(0, 2)
    cols = 2 * pcols[None, :, None] + two[None, None, :]
    offs = rows[:, None, None] * stride + cols
    v = tl.load(ptr + offs, mask=row_mask[:, None, None] & (cols < n), other=0.0)
    return tl.split(v)
