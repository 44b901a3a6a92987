"""Triton kernels for the recurrent layers: the gated delta rule (Qwen3-Next / Qwen3.5's
GatedDeltaNet), Mamba-2's selective-state update (Granite 4.0-H, Nemotron-H) and Mamba's
selective scan (Jamba). The decode steps are one launch each with fixed shapes and no host
sync (they run inside CUDA-graph capture); the state is float32 and updated in place. The
plain-torch references they are held against are `recurrent_gated_delta_step` and
`chunk_gated_delta_rule` (moerun/recurrent/gated_deltanet.py), `selective_state_step`
(moerun/recurrent/mamba2.py) and `selective_scan_step` and MambaMixer's chunked scan
(moerun/recurrent/mamba.py).

Shape legend: B batch, T tokens, H value heads (Mamba-2: heads), Hk key heads (H a
multiple), Dk key dim, Dv value dim; Mamba-2: P head dim, G groups (H a multiple), N state
size; Mamba: I channels, N state size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gated_delta_step_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    beta_ptr,
    S_ptr,
    o_ptr,
    H,
    HEADS_PER_K,
    Dk,
    Dv,
    scale,
    sq_b,
    sq_h,
    sk_b,
    sk_h,
    sv_b,
    sv_h,
    sg_b,
    sbeta_b,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # One program per (batch, value head, block of the value dim): the tile S[b, h, :, vblock]
    # is all this token's update touches for those columns, so programs never share state.
    pid_bh = tl.program_id(0)
    pid_v = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // HEADS_PER_K  # the key head this value head reads
    rk = tl.arange(0, BLOCK_K)
    rv = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mk = rk < Dk
    mv = rv < Dv
    q = tl.load(q_ptr + b * sq_b + hk * sq_h + rk, mask=mk, other=0.0).to(tl.float32) * scale
    k = tl.load(k_ptr + b * sk_b + hk * sk_h + rk, mask=mk, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + b * sv_b + h * sv_h + rv, mask=mv, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + b * sg_b + h).to(tl.float32)
    beta = tl.load(beta_ptr + b * sbeta_b + h).to(tl.float32)
    s_offs = (pid_bh * Dk + rk[:, None]) * Dv + rv[None, :]  # S is contiguous [B, H, Dk, Dv]
    smask = mk[:, None] & mv[None, :]
    S = tl.load(S_ptr + s_offs, mask=smask, other=0.0)
    S = S * tl.exp(g)
    delta = (v - tl.sum(S * k[:, None], axis=0)) * beta
    S = S + k[:, None] * delta[None, :]
    tl.store(S_ptr + s_offs, S, mask=smask)
    o = tl.sum(S * q[:, None], axis=0)
    tl.store(o_ptr + pid_bh * Dv + rv, o, mask=mv)


def _rows(t: torch.Tensor) -> torch.Tensor:
    # The kernels index the last dim with stride 1; other strides are passed through.
    return t if t.stride(-1) == 1 else t.contiguous()


def _check(name: str, wrong: bool, **tensors: torch.Tensor) -> None:
    """The launchers' checks: `wrong`, the shapes do not fit the contract; the state, the
    last of `tensors` (all named in the message), must be float32 and contiguous (it is
    updated in place)."""
    state = list(tensors.values())[-1]
    if wrong or state.dtype != torch.float32:
        shapes = " ".join(f"{key} {tuple(t.shape)}" for key, t in tensors.items())
        raise ValueError(f"{name}: {shapes} {state.dtype}")
    if not state.is_contiguous():
        raise ValueError(f"{name}: the state must be contiguous (it is updated in place)")


def gated_delta_step(q, k, v, g, beta, S: torch.Tensor, *, block_v: int | None = None):
    """One token of the gated delta rule, the contract of `recurrent_gated_delta_step`:
    q, k [B, Hk, Dk] (l2-normalised, q not yet scaled: the kernel scales by Dk**-0.5),
    v [B, H, Dv], g, beta [B, H]; any float dtype, computed in float32. Hk may divide H
    (value head h reads key head h // (H // Hk)); the reference's repeated heads are
    Hk == H. S [B, H, Dk, Dv] float32 contiguous, updated in place -> (o [B, H, Dv]
    float32, S). block_v: the value-dim tile (a power of two; tests force several)."""
    B, H, Dv = v.shape
    Hk, Dk = q.shape[1], q.shape[2]
    _check("gated_delta_step", k.shape != q.shape or H % Hk or S.shape != (B, H, Dk, Dv), q=q, k=k, v=v, S=S)
    q, k, v, g, beta = (_rows(t) for t in (q, k, v, g, beta))
    o = torch.empty(B, H, Dv, dtype=torch.float32, device=v.device)
    BLOCK_K = triton.next_power_of_2(Dk)
    BLOCK_V = block_v or min(triton.next_power_of_2(Dv), max(16, 8192 // BLOCK_K))  # the tile in registers
    grid = (B * H, triton.cdiv(Dv, BLOCK_V))
    _gated_delta_step_kernel[grid](
        q,
        k,
        v,
        g,
        beta,
        S,
        o,
        H,
        H // Hk,
        Dk,
        Dv,
        Dk**-0.5,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        g.stride(0),
        beta.stride(0),
        BLOCK_K=BLOCK_K,
        BLOCK_V=BLOCK_V,
    )
    return o, S


@triton.jit
def _mamba2_step_kernel(
    x_ptr,
    dt_ptr,
    A_ptr,
    b_ptr,
    c_ptr,
    D_ptr,
    keep_ptr,
    h_ptr,
    y_ptr,
    H,
    HEADS_PER_GROUP,
    P,
    N,
    sx_b,
    sx_h,
    sdt_b,
    sb_b,
    sb_g,
    sc_b,
    sc_g,
    HAS_KEEP: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One program per (batch, head, block of the head dim): the state rows h[b, head, pblock, :].
    pid_bh = tl.program_id(0)
    pid_p = tl.program_id(1)
    bi = pid_bh // H
    hd = pid_bh % H
    grp = hd // HEADS_PER_GROUP
    rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    rn = tl.arange(0, BLOCK_N)
    mp = rp < P
    mn = rn < N
    x = tl.load(x_ptr + bi * sx_b + hd * sx_h + rp, mask=mp, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + bi * sdt_b + hd).to(tl.float32)
    dA = tl.exp(dt * tl.load(A_ptr + hd).to(tl.float32))
    if HAS_KEEP:  # 0 on a sequence's first position: the stale state must not leak in
        dA = dA * tl.load(keep_ptr).to(tl.float32)
    Bv = tl.load(b_ptr + bi * sb_b + grp * sb_g + rn, mask=mn, other=0.0).to(tl.float32)
    Cv = tl.load(c_ptr + bi * sc_b + grp * sc_g + rn, mask=mn, other=0.0).to(tl.float32)
    h_offs = (pid_bh * P + rp[:, None]) * N + rn[None, :]  # h is contiguous [B, H, P, N]
    hmask = mp[:, None] & mn[None, :]
    state = tl.load(h_ptr + h_offs, mask=hmask, other=0.0)
    state = state * dA + (dt * x)[:, None] * Bv[None, :]
    tl.store(h_ptr + h_offs, state, mask=hmask)
    y = tl.sum(state * Cv[None, :], axis=1) + x * tl.load(D_ptr + hd).to(tl.float32)
    tl.store(y_ptr + (pid_bh * P + rp), y.to(y_ptr.dtype.element_ty), mask=mp)


def mamba2_step(xs, dt, A, b, c, D, h: torch.Tensor, keep: torch.Tensor | None = None, *, block_p: int | None = None):
    """Mamba-2's selective-state update for one token, the contract of
    `selective_state_step`: xs [B, H, P]; dt [B, H] after softplus and the limits;
    A [H] (negative, float32); b, c [B, G, N] (head h reads group h // (H // G)); D [H];
    h [B, H, P, N] float32 contiguous, updated in place: h = h * exp(dt A) (* keep) +
    dt B x; keep: a 0-d float tensor or None -> (y = C . h + D x [B, H, P] in xs.dtype, h).
    Computed in float32 throughout (the reference rounds dt B x and C . h to xs.dtype).
    block_p: the head-dim tile (a power of two; tests force several)."""
    B, H, P = xs.shape
    G, N = b.shape[1], b.shape[2]
    _check("mamba2_step", c.shape != b.shape or H % G or h.shape != (B, H, P, N), xs=xs, b=b, c=c, h=h)
    xs, dt, b, c = (_rows(t) for t in (xs, dt, b, c))
    A, D = A.contiguous(), D.contiguous()
    y = torch.empty(B, H, P, dtype=xs.dtype, device=xs.device)
    BLOCK_N = triton.next_power_of_2(N)
    BLOCK_P = block_p or min(triton.next_power_of_2(P), max(16, 8192 // BLOCK_N))
    grid = (B * H, triton.cdiv(P, BLOCK_P))
    _mamba2_step_kernel[grid](
        xs,
        dt,
        A,
        b,
        c,
        D,
        keep if keep is not None else h,
        h,
        y,
        H,
        H // G,
        P,
        N,
        xs.stride(0),
        xs.stride(1),
        dt.stride(0),
        b.stride(0),
        b.stride(1),
        c.stride(0),
        c.stride(1),
        HAS_KEEP=keep is not None,
        BLOCK_P=BLOCK_P,
        BLOCK_N=BLOCK_N,
    )
    return y, h


@triton.jit
def _gated_delta_sequence_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    beta_ptr,
    S_ptr,
    o_ptr,
    H,
    HEADS_PER_K,
    T,
    Dk,
    Dv,
    scale,
    sq_b,
    sq_h,
    sq_t,
    sk_b,
    sk_h,
    sk_t,
    sv_b,
    sv_h,
    sv_t,
    sg_b,
    sg_h,
    sg_t,
    sbeta_b,
    sbeta_h,
    sbeta_t,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # The decode step's program, walking the T tokens with its state tile held in registers
    # (flash-linear-attention's "fused recurrent" form): one load and one store of S in all.
    pid_bh = tl.program_id(0)
    pid_v = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // HEADS_PER_K
    rk = tl.arange(0, BLOCK_K)
    rv = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mk = rk < Dk
    mv = rv < Dv
    s_offs = (pid_bh * Dk + rk[:, None]) * Dv + rv[None, :]
    smask = mk[:, None] & mv[None, :]
    S = tl.load(S_ptr + s_offs, mask=smask, other=0.0)
    for t in range(T):
        q = tl.load(q_ptr + b * sq_b + hk * sq_h + t * sq_t + rk, mask=mk, other=0.0).to(tl.float32) * scale
        k = tl.load(k_ptr + b * sk_b + hk * sk_h + t * sk_t + rk, mask=mk, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + b * sv_b + h * sv_h + t * sv_t + rv, mask=mv, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + b * sg_b + h * sg_h + t * sg_t).to(tl.float32)
        beta = tl.load(beta_ptr + b * sbeta_b + h * sbeta_h + t * sbeta_t).to(tl.float32)
        S = S * tl.exp(g)
        delta = (v - tl.sum(S * k[:, None], axis=0)) * beta
        S = S + k[:, None] * delta[None, :]
        tl.store(o_ptr + (pid_bh * T + t) * Dv + rv, tl.sum(S * q[:, None], axis=0), mask=mv)
    tl.store(S_ptr + s_offs, S, mask=smask)


def gated_delta_sequence(q, k, v, g, beta, S: torch.Tensor, *, block_v: int | None = None):
    """The gated delta rule over T tokens, token by token in one launch (not the chunked
    WY form): q, k [B, Hk, T, Dk] (normalised, q not yet scaled), v [B, H, T, Dv], g, beta
    [B, H, T]; S [B, H, Dk, Dv] float32 contiguous, the initial state, updated in place to
    the final one -> (o [B, H, T, Dv] float32, S). Equals `chunk_gated_delta_rule` (which
    reorders the sums) to float32 rounding. Not yet called by the layer (see the report
    of issue 14: its speed on long prompts against the chunked torch path is unmeasured)."""
    block_k = triton.next_power_of_2(q.shape[3])
    block_v = block_v or min(triton.next_power_of_2(v.shape[3]), max(16, 8192 // block_k))
    return _gated_delta_prompt(_gated_delta_sequence_kernel, "gated_delta_sequence", q, k, v, g, beta, S, block_v)


def _gated_delta_prompt(kernel, name: str, q, k, v, g, beta, S: torch.Tensor, block_v: int, **meta):
    """What the two prompt kernels' launchers share (their arguments as
    gated_delta_sequence's): the checks, o, one program per (batch, value head, block of
    block_v value columns), the launch -> (o, S)."""
    B, H, T, Dv = v.shape
    Hk, Dk = q.shape[1], q.shape[3]
    _check(name, k.shape != q.shape or H % Hk or S.shape != (B, H, Dk, Dv), q=q, k=k, v=v, S=S)
    q, k, v = (_rows(t) for t in (q, k, v))
    o = torch.empty(B, H, T, Dv, dtype=torch.float32, device=v.device)
    grid = (B * H, triton.cdiv(Dv, block_v))
    kernel[grid](
        q,
        k,
        v,
        g,
        beta,
        S,
        o,
        H,
        H // Hk,
        T,
        Dk,
        Dv,
        Dk**-0.5,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *g.stride(),
        *beta.stride(),
        BLOCK_K=triton.next_power_of_2(Dk),
        BLOCK_V=block_v,
        **meta,
    )
    return o, S


@triton.jit
def _solve_unit_lower(L, rhs, r, CHUNK: tl.constexpr):
    # (I + L) x = rhs by forward substitution, L [C, C] strictly lower; one row per round
    # (rows of a register tile are picked out by masked sums: Triton has no row indexing).
    x = tl.zeros_like(rhs)
    for i in range(CHUNK):
        pick = r[:, None] == i
        L_i = tl.sum(tl.where(pick, L, 0.0), axis=0)  # [C]: row i of L
        rhs_i = tl.sum(tl.where(pick, rhs, 0.0), axis=0)
        row = rhs_i - tl.sum(L_i[:, None] * x, axis=0)
        x = tl.where(pick, row[None, :], x)
    return x


@triton.jit
def _gated_delta_chunk_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    beta_ptr,
    S_ptr,
    o_ptr,
    H,
    HEADS_PER_K,
    T,
    Dk,
    Dv,
    scale,
    sq_b,
    sq_h,
    sq_t,
    sk_b,
    sk_h,
    sk_t,
    sv_b,
    sv_h,
    sv_t,
    sg_b,
    sg_h,
    sg_t,
    sbeta_b,
    sbeta_h,
    sbeta_t,
    CHUNK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # chunk_gated_delta_rule's form: within a chunk the delta updates are one unit-lower
    # triangular system (the UT transform); between chunks one state pass per chunk.
    pid_bh = tl.program_id(0)
    pid_v = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // HEADS_PER_K
    r = tl.arange(0, CHUNK)
    rk = tl.arange(0, BLOCK_K)
    rv = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mk = rk < Dk
    mv = rv < Dv
    s_offs = (pid_bh * Dk + rk[:, None]) * Dv + rv[None, :]
    smask = mk[:, None] & mv[None, :]
    S = tl.load(S_ptr + s_offs, mask=smask, other=0.0)
    lower = r[:, None] >= r[None, :]
    strictly = r[:, None] > r[None, :]
    for start in range(0, T, CHUNK):
        t = start + r
        mt = t < T  # padded tokens: g = beta = 0, k = v = 0, as the torch rule pads
        q = (
            tl.load(
                q_ptr + b * sq_b + hk * sq_h + t[:, None] * sq_t + rk[None, :],
                mask=mt[:, None] & mk[None, :],
                other=0.0,
            ).to(tl.float32)
            * scale
        )
        k = tl.load(
            k_ptr + b * sk_b + hk * sk_h + t[:, None] * sk_t + rk[None, :], mask=mt[:, None] & mk[None, :], other=0.0
        ).to(tl.float32)
        v = tl.load(
            v_ptr + b * sv_b + h * sv_h + t[:, None] * sv_t + rv[None, :], mask=mt[:, None] & mv[None, :], other=0.0
        ).to(tl.float32)
        g = tl.load(g_ptr + b * sg_b + h * sg_h + t * sg_t, mask=mt, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + b * sbeta_b + h * sbeta_h + t * sbeta_t, mask=mt, other=0.0).to(tl.float32)
        decay = tl.cumsum(g, axis=0)  # log of the decay from the chunk's start
        last = tl.sum(tl.where(r == CHUNK - 1, decay, 0.0), axis=0)
        pairwise = tl.where(lower, tl.exp(decay[:, None] - decay[None, :]), 0.0)
        k_beta = k * beta[:, None]
        kk = tl.sum(k_beta[:, None, :] * k[None, :, :], axis=2)  # [C, C]: k_beta_i . k_j
        system = tl.where(strictly, kk * pairwise, 0.0)
        values = _solve_unit_lower(system, v * beta[:, None], r, CHUNK)
        k_decayed = _solve_unit_lower(system, k_beta * tl.exp(decay)[:, None], r, CHUNK)
        v_new = values - tl.sum(k_decayed[:, :, None] * S[None, :, :], axis=1)  # [C, BV]
        intra = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * pairwise
        out = tl.sum((q * tl.exp(decay)[:, None])[:, :, None] * S[None, :, :], axis=1)
        out += tl.sum(intra[:, :, None] * v_new[None, :, :], axis=1)
        tl.store(o_ptr + (pid_bh * T + t[:, None]) * Dv + rv[None, :], out, mask=mt[:, None] & mv[None, :])
        k_end = k * tl.exp(last - decay)[:, None]  # each token's key decayed to the chunk's end
        S = S * tl.exp(last) + tl.sum(k_end[:, :, None] * v_new[:, None, :], axis=0)
    tl.store(S_ptr + s_offs, S, mask=smask)


def gated_delta_chunked(q, k, v, g, beta, S: torch.Tensor, *, chunk: int = 16, block_v: int | None = None):
    """The gated delta rule over T tokens chunk by chunk, the form and contract of
    `chunk_gated_delta_rule` (q, k [B, Hk, T, Dk] normalised, q not yet scaled; v [B, H,
    T, Dv]; g, beta [B, H, T]; Hk may divide H) with S [B, H, Dk, Dv] float32 contiguous,
    the initial state, updated in place to the final one -> (o [B, H, T, Dv] float32, S).
    chunk: a power of two. Its products are broadcast sums in registers, not tl.dot, so
    it serves small heads and tests; not yet called by the layer."""
    block_v = block_v or min(triton.next_power_of_2(v.shape[3]), 32)
    return _gated_delta_prompt(
        _gated_delta_chunk_kernel, "gated_delta_chunked", q, k, v, g, beta, S, block_v, CHUNK=chunk
    )


@triton.jit
def _mamba_step_kernel(
    x_ptr,
    dt_ptr,
    A_ptr,
    b_ptr,
    c_ptr,
    D_ptr,
    keep_ptr,
    h_ptr,
    y_ptr,
    I,
    N,
    sx_b,
    sdt_b,
    sb_b,
    sc_b,
    HAS_KEEP: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One program per (batch, block of channels): the state rows h[b, iblock, :]. Unlike
    # Mamba-2, A varies along the state dim too, so the decay is a tile, not a scalar.
    bi = tl.program_id(0)
    ri = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    rn = tl.arange(0, BLOCK_N)
    mi = ri < I
    mn = rn < N
    tile = mi[:, None] & mn[None, :]
    x = tl.load(x_ptr + bi * sx_b + ri, mask=mi, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + bi * sdt_b + ri, mask=mi, other=0.0).to(tl.float32)
    A = tl.load(A_ptr + ri[:, None] * N + rn[None, :], mask=tile, other=0.0)
    dA = tl.exp(dt[:, None] * A)
    if HAS_KEEP:  # 0 on a sequence's first position: the stale state must not leak in
        dA = dA * tl.load(keep_ptr).to(tl.float32)
    Bv = tl.load(b_ptr + bi * sb_b + rn, mask=mn, other=0.0).to(tl.float32)
    Cv = tl.load(c_ptr + bi * sc_b + rn, mask=mn, other=0.0).to(tl.float32)
    h_offs = (bi * I + ri[:, None]) * N + rn[None, :]  # h is contiguous [B, I, N]
    state = tl.load(h_ptr + h_offs, mask=tile, other=0.0)
    state = state * dA + (dt * x)[:, None] * Bv[None, :]
    tl.store(h_ptr + h_offs, state, mask=tile)
    y = tl.sum(state * Cv[None, :], axis=1) + x * tl.load(D_ptr + ri, mask=mi, other=0.0).to(tl.float32)
    tl.store(y_ptr + bi * I + ri, y.to(y_ptr.dtype.element_ty), mask=mi)


def _mamba_tiles(I: int, N: int, block_i: int | None) -> tuple[int, int]:
    BLOCK_N = triton.next_power_of_2(N)
    return block_i or min(triton.next_power_of_2(I), max(16, 4096 // BLOCK_N)), BLOCK_N


def mamba_step(x, dt, A, b, c, D, h: torch.Tensor, keep: torch.Tensor | None = None, *, block_i: int | None = None):
    """Mamba's (Jamba's) selective-scan update for one token, the contract of
    `selective_scan_step` (moerun/recurrent/mamba.py): x, dt [B, I] (dt after softplus);
    A [I, N] float32 (negative); b, c [B, N]; D [I]; h [B, I, N] float32 contiguous,
    updated in place: h = h * exp(dt A) (* keep) + dt B x; keep: a 0-d float tensor or
    None -> (y = C . h + D x [B, I] in x.dtype, before the gate; h). Computed in float32
    throughout (the reference rounds C . h to x.dtype). block_i: the channel tile (a power
    of two; tests force several)."""
    B, I = x.shape
    N = b.shape[-1]
    wrong = dt.shape != x.shape or A.shape != (I, N) or c.shape != b.shape or b.shape != (B, N) or h.shape != (B, I, N)
    _check("mamba_step", wrong, x=x, A=A, b=b, h=h)
    x, dt, b, c = (_rows(t) for t in (x, dt, b, c))
    A, D = A.float().contiguous(), D.contiguous()
    y = torch.empty(B, I, dtype=x.dtype, device=x.device)
    BLOCK_I, BLOCK_N = _mamba_tiles(I, N, block_i)
    _mamba_step_kernel[(B, triton.cdiv(I, BLOCK_I))](
        x,
        dt,
        A,
        b,
        c,
        D,
        keep if keep is not None else h,
        h,
        y,
        I,
        N,
        x.stride(0),
        dt.stride(0),
        b.stride(0),
        c.stride(0),
        HAS_KEEP=keep is not None,
        BLOCK_I=BLOCK_I,
        BLOCK_N=BLOCK_N,
    )
    return y, h


@triton.jit
def _mamba_scan_kernel(
    u_ptr,
    dt_ptr,
    A_ptr,
    b_ptr,
    c_ptr,
    D_ptr,
    h_ptr,
    y_ptr,
    I,
    N,
    T,
    su_b,
    su_i,
    su_t,
    sdt_b,
    sdt_i,
    sdt_t,
    sb_b,
    sb_t,
    sc_b,
    sc_t,
    BLOCK_I: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # The step's program walking the T tokens with its state tile in registers (mamba_ssm's
    # selective scan is sequential in time within a thread block too): one load and one
    # store of h in all; the work is parallel over batch x channel blocks.
    bi = tl.program_id(0)
    ri = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    rn = tl.arange(0, BLOCK_N)
    mi = ri < I
    mn = rn < N
    tile = mi[:, None] & mn[None, :]
    A = tl.load(A_ptr + ri[:, None] * N + rn[None, :], mask=tile, other=0.0)
    Dv = tl.load(D_ptr + ri, mask=mi, other=0.0).to(tl.float32)
    h_offs = (bi * I + ri[:, None]) * N + rn[None, :]
    state = tl.load(h_ptr + h_offs, mask=tile, other=0.0)
    for t in range(T):
        x = tl.load(u_ptr + bi * su_b + ri * su_i + t * su_t, mask=mi, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + bi * sdt_b + ri * sdt_i + t * sdt_t, mask=mi, other=0.0).to(tl.float32)
        Bv = tl.load(b_ptr + bi * sb_b + t * sb_t + rn, mask=mn, other=0.0).to(tl.float32)
        Cv = tl.load(c_ptr + bi * sc_b + t * sc_t + rn, mask=mn, other=0.0).to(tl.float32)
        state = state * tl.exp(dt[:, None] * A) + (dt * x)[:, None] * Bv[None, :]
        y = tl.sum(state * Cv[None, :], axis=1) + x * Dv
        tl.store(y_ptr + (bi * I + ri) * T + t, y, mask=mi)
    tl.store(h_ptr + h_offs, state, mask=tile)


def mamba_scan(u, dt, A, b, c, D, h: torch.Tensor, *, block_i: int | None = None):
    """Mamba's selective scan over T tokens in one launch: u, dt [B, I, T] (dt after
    softplus); A [I, N] float32 (negative); b, c [B, T, N]; D [I]; h [B, I, N] float32
    contiguous, the initial state, updated in place to the final one -> (y = C . h_t +
    D u_t [B, I, T] float32, before the gate; h). Equals MambaMixer's chunked scan (which
    reorders the products) to float32 rounding. Not yet called by the layer: its speed on
    long prompts against the chunked torch path is unmeasured (no GPU has been lent)."""
    B, I, T = u.shape
    N = b.shape[-1]
    wrong = (
        dt.shape != u.shape or A.shape != (I, N) or c.shape != b.shape or b.shape != (B, T, N) or h.shape != (B, I, N)
    )
    _check("mamba_scan", wrong, u=u, A=A, b=b, h=h)
    b, c = _rows(b), _rows(c)
    A, D = A.float().contiguous(), D.contiguous()
    y = torch.empty(B, I, T, dtype=torch.float32, device=u.device)
    BLOCK_I, BLOCK_N = _mamba_tiles(I, N, block_i)
    _mamba_scan_kernel[(B, triton.cdiv(I, BLOCK_I))](
        u,
        dt,
        A,
        b,
        c,
        D,
        h,
        y,
        I,
        N,
        T,
        *u.stride(),
        *dt.stride(),
        b.stride(0),
        b.stride(1),
        c.stride(0),
        c.stride(1),
        BLOCK_I=BLOCK_I,
        BLOCK_N=BLOCK_N,
    )
    return y, h


@triton.jit
def _mamba2_scan_kernel(
    x_ptr,
    dt_ptr,
    A_ptr,
    b_ptr,
    c_ptr,
    D_ptr,
    h_ptr,
    y_ptr,
    H,
    HEADS_PER_GROUP,
    P,
    N,
    T,
    sx_b,
    sx_t,
    sx_h,
    sdt_b,
    sdt_t,
    sb_b,
    sb_t,
    sb_g,
    sc_b,
    sc_t,
    sc_g,
    sy_b,
    sy_t,
    sy_h,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # The decode step's program walking the T tokens, its state tile h[b, head, pblock, :]
    # in registers: one load and one store of the state in all.
    pid_bh = tl.program_id(0)
    bi = pid_bh // H
    hd = pid_bh % H
    grp = hd // HEADS_PER_GROUP
    rp = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    rn = tl.arange(0, BLOCK_N)
    mp = rp < P
    mn = rn < N
    A = tl.load(A_ptr + hd).to(tl.float32)
    Dh = tl.load(D_ptr + hd).to(tl.float32)
    h_offs = (pid_bh * P + rp[:, None]) * N + rn[None, :]
    hmask = mp[:, None] & mn[None, :]
    state = tl.load(h_ptr + h_offs, mask=hmask, other=0.0)
    for t in range(T):
        x = tl.load(x_ptr + bi * sx_b + t * sx_t + hd * sx_h + rp, mask=mp, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + bi * sdt_b + t * sdt_t + hd).to(tl.float32)
        Bv = tl.load(b_ptr + bi * sb_b + t * sb_t + grp * sb_g + rn, mask=mn, other=0.0).to(tl.float32)
        Cv = tl.load(c_ptr + bi * sc_b + t * sc_t + grp * sc_g + rn, mask=mn, other=0.0).to(tl.float32)
        state = state * tl.exp(dt * A) + (dt * x)[:, None] * Bv[None, :]
        y = tl.sum(state * Cv[None, :], axis=1) + x * Dh
        tl.store(y_ptr + bi * sy_b + t * sy_t + hd * sy_h + rp, y, mask=mp)
    tl.store(h_ptr + h_offs, state, mask=hmask)


def mamba2_scan(xs, dt, A, b, c, D, h: torch.Tensor, *, block_p: int | None = None):
    """Mamba-2's scan over T tokens in one launch, the contract of `Mamba2Mixer.ssd`: xs
    [B, T, H, P]; dt [B, T, H] after softplus and the limits; A [H] float32 (negative);
    b, c [B, T, G, N] (head h reads group h // (H // G)); D [H]; h [B, H, P, N] float32
    contiguous, the initial state, updated in place to the final one -> (y [B, T, H, P]
    float32 with the D skip, h). Equals the chunked SSD form to float32 rounding. Not yet
    called by the layer: its speed on long prompts against the chunked torch path is
    unmeasured (no GPU has been lent)."""
    B, T, H, P = xs.shape
    G, N = b.shape[2], b.shape[3]
    wrong = dt.shape != (B, T, H) or c.shape != b.shape or b.shape[:2] != (B, T) or H % G or h.shape != (B, H, P, N)
    _check("mamba2_scan", wrong, xs=xs, dt=dt, b=b, h=h)
    xs, b, c = _rows(xs), _rows(b), _rows(c)
    A, D = A.float().contiguous(), D.contiguous()
    y = torch.empty(B, T, H, P, dtype=torch.float32, device=xs.device)
    BLOCK_N = triton.next_power_of_2(N)
    BLOCK_P = block_p or min(triton.next_power_of_2(P), max(16, 8192 // BLOCK_N))
    _mamba2_scan_kernel[(B * H, triton.cdiv(P, BLOCK_P))](
        xs,
        dt,
        A,
        b,
        c,
        D,
        h,
        y,
        H,
        H // G,
        P,
        N,
        T,
        xs.stride(0),
        xs.stride(1),
        xs.stride(2),
        dt.stride(0),
        dt.stride(1),
        b.stride(0),
        b.stride(1),
        b.stride(2),
        c.stride(0),
        c.stride(1),
        c.stride(2),
        *y.stride()[:3],
        BLOCK_P=BLOCK_P,
        BLOCK_N=BLOCK_N,
    )
    return y, h
