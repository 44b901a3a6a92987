"""The Mamba (selective scan, arXiv 2312.00752) mixer as transformers' Jamba computes it on
its torch path: in_proj to x and a gate z; a causal depthwise conv1d + SiLU over x; x_proj
to dt (rank R), B and C (N each), which Jamba RMS-normalises; dt = softplus(dt_proj(dt));
A = -exp(A_log) [I, N]; the scan h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t,
y_t = C_t . h_t + D x_t; y * silu(z); out_proj.

Prefill runs a chunked parallel scan: `chunk_size` positions at a time, all their states
at once (Blelloch's up- and down-sweep of the decays' cumulative products, in place), the
state carried from chunk to chunk; never a Python loop over tokens. Decode runs one recurrence step. The
state keeps the conv window (the last K-1 inputs) and h, both float32 (h is float32 in
the reference; the window holds model-dtype values exactly).

Shape legend: B batch, T tokens, D hidden, I inner (expand * D), N state size, R dt rank,
K conv width, l positions of a chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moerun.layers import LayerState, RMSNorm, Start, StateSpec, StaticPosition
from moerun.recurrent import RecurrentMixer
from moerun.recurrent.short_conv import causal_conv1d


class MambaState(LayerState):
    """conv [B, I, K-1] (the last K-1 conv inputs) and ssm [B, I, N], float32."""

    def __init__(self, batch: int, inner: int, conv_kernel: int, state_size: int, max_len: int, device):
        self.conv = torch.zeros((batch, inner, conv_kernel - 1), dtype=torch.float32, device=device)
        self.ssm = torch.zeros((batch, inner, state_size), dtype=torch.float32, device=device)
        self.max_len = max_len


def scan_chunk(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """Every state of h_t = a_t * h_{t-1} + b_t along dim 2 from h0: a, b [B, I, l, N]
    (contiguous, l a power of two; both overwritten), h0 [B, I, N] -> [B, I, l, N].
    Blelloch's scan in place: an up-sweep leaves each position 2s.k + 2s - 1 holding its
    block of 2s (the decays' product in a, the sum they weigh in b), a down-sweep fills in
    the prefixes between; about four passes over the chunk in all, whatever l."""
    Bsz, I, l, N = a.shape

    def combine(left, right):  # right <- right o left (left the earlier block), in place
        (a_l, b_l), (a_r, b_r) = left, right
        b_r.add_(a_r * b_l)
        a_r.mul_(a_l)

    s = 1
    while 2 * s <= l:
        av, bv = a.view(Bsz, I, l // (2 * s), 2 * s, N), b.view(Bsz, I, l // (2 * s), 2 * s, N)
        combine((av[:, :, :, s - 1], bv[:, :, :, s - 1]), (av[:, :, :, 2 * s - 1], bv[:, :, :, 2 * s - 1]))
        s *= 2
    s = l // 4
    while s >= 1:
        av, bv = a.view(Bsz, I, l // (2 * s), 2 * s, N), b.view(Bsz, I, l // (2 * s), 2 * s, N)
        combine((av[:, :, :-1, 2 * s - 1], bv[:, :, :-1, 2 * s - 1]), (av[:, :, 1:, s - 1], bv[:, :, 1:, s - 1]))
        s //= 2
    return b.add_(a * h0[:, :, None])  # a is now the product from the chunk's start


def selective_scan_step(x, dt, A, b, c, D, h: torch.Tensor, keep: torch.Tensor | None):
    """Mamba's selective-scan update for one token, as the reference's
    selective_state_update: x, dt [B, I] (dt after softplus); A [I, N] float32 (negative);
    b, c [B, N]; D [I]; h [B, I, N] float32; keep: a 0-d float tensor (0 drops the state)
    or None -> (y = C . h + D x [B, I] in x.dtype, before the gate; new h). The Triton
    kernel moerun.kernels.recurrent.mamba_step holds this contract."""
    d = dt.float()
    dA = torch.exp(d[..., None] * A)  # [B, I, N]
    if keep is not None:
        dA = dA * keep
    h = h * dA + (d[..., None] * b[:, None, :].float()) * x.float()[..., None]
    # C . h and D x in the activations' dtype, as the reference's step.
    return torch.matmul(h.to(c.dtype), c[:, :, None])[..., 0] + x * D, h


class MambaMixer(RecurrentMixer):
    """One Mamba layer under the checkpoint's names (in_proj, conv1d, x_proj, dt_proj,
    A_log, D, out_proj; with `bcdt_norm_eps`, Jamba's dt_layernorm, b_layernorm and
    c_layernorm). `proj_bias`: biases on in_proj and out_proj; `conv_bias`: on conv1d."""

    role = "attention"  # what the planner counts its weights as
    chunk_size = 128  # positions per prefill chunk: states [B, I, chunk, N] at a time (tests lower it)

    def __init__(
        self,
        hidden_size: int,
        inner_size: int,
        state_size: int,
        conv_kernel: int,
        dt_rank: int,
        *,
        conv_bias: bool = True,
        proj_bias: bool = False,
        bcdt_norm_eps: float | None = None,
    ):
        super().__init__()
        self.inner, self.state_size, self.conv_kernel, self.dt_rank = inner_size, state_size, conv_kernel, dt_rank
        self.in_proj = nn.Linear(hidden_size, 2 * inner_size, bias=proj_bias)
        self.conv1d = nn.Conv1d(inner_size, inner_size, conv_kernel, groups=inner_size, bias=conv_bias)
        self.x_proj = nn.Linear(inner_size, dt_rank + 2 * state_size, bias=False)
        self.dt_proj = nn.Linear(dt_rank, inner_size, bias=True)
        self.A_log = nn.Parameter(torch.empty(inner_size, state_size))
        self.D = nn.Parameter(torch.empty(inner_size))
        self.out_proj = nn.Linear(inner_size, hidden_size, bias=proj_bias)
        self.bcdt_norms = bcdt_norm_eps is not None
        if self.bcdt_norms:
            self.dt_layernorm = RMSNorm(dt_rank, bcdt_norm_eps)
            self.b_layernorm = RMSNorm(state_size, bcdt_norm_eps)
            self.c_layernorm = RMSNorm(state_size, bcdt_norm_eps)

    def state_spec(self) -> StateSpec:
        return StateSpec(
            per_token=0, fixed=self.inner * (self.conv_kernel - 1 + self.state_size), kind="mamba", fixed_dtype_bytes=4
        )

    def make_state(self, batch: int, max_len: int, dtype, device) -> MambaState:
        return MambaState(batch, self.inner, self.conv_kernel, self.state_size, max_len, device)

    def forward(self, x: torch.Tensor, state: MambaState, start: Start) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]. An int start of 0 begins a new sequence (the state's
        contents are ignored and overwritten); a later int start continues it (one token:
        a recurrence step; more: the scan from the state); a StaticPosition is one step
        with fixed shapes and no host sync (at index 0 the state is ignored on the device)."""
        T = x.shape[1]
        xs, gate = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # [B, I, T] each
        u = causal_conv1d(xs, state.conv, start, self.conv1d.weight, self.conv1d.bias, F.silu)
        dt, b, c = self._selection(u)
        A = -torch.exp(self.A_log.float())  # [I, N]
        if isinstance(start, StaticPosition):
            # At index 0 the step must not read the stale state: scaled by 0 on the device.
            y = self._step(u, dt, A, b, c, gate, state, keep=(start.index > 0).float())
        elif start > 0 and T == 1:
            y = self._step(u, dt, A, b, c, gate, state, keep=None)
        else:
            h0 = state.ssm if start > 0 else torch.zeros_like(state.ssm)
            y = self._scan(u, dt, A, b, c, gate, h0, state)
        return self.out_proj(y.transpose(1, 2).to(x.dtype))

    def _selection(self, u: torch.Tensor):
        """u [B, I, T] -> (dt [B, I, T] after softplus, B, C [B, T, N]), in the activations'
        dtype, as the reference."""
        dt, b, c = self.x_proj(u.transpose(1, 2)).split([self.dt_rank, self.state_size, self.state_size], dim=-1)
        if self.bcdt_norms:
            dt, b, c = self.dt_layernorm(dt), self.b_layernorm(b), self.c_layernorm(c)
        # The bias is added apart, as the reference does; the weight may be kept 16-bit at rest.
        dt = self.dt_proj.weight.to(dt.dtype) @ dt.transpose(1, 2)
        return F.softplus(dt + self.dt_proj.bias.to(dt.dtype)[:, None]), b, c

    def _scan(self, u, dt, A, b, c, gate, h0, state: MambaState) -> torch.Tensor:
        """T tokens from h0 [B, I, N] -> y [B, I, T] float32 (D in float32, as the
        reference's scan); the last state goes to `state`."""
        dtype, T = u.dtype, u.shape[-1]
        h, ys = h0, []
        for s in range(0, T, self.chunk_size):
            e = min(s + self.chunk_size, T)
            d = dt[:, :, s:e, None].float()  # [B, I, l, 1]
            a = torch.exp(A[:, None, :] * d)  # [B, I, l, N]
            bu = (d * b[:, None, s:e].float()) * u[:, :, s:e, None].float()
            pad = (1 << (e - s - 1).bit_length()) - (e - s)  # to a power of two: identity steps
            if pad:
                a, bu = F.pad(a, (0, 0, 0, pad), value=1.0), F.pad(bu, (0, 0, 0, pad))
            hs = scan_chunk(a.contiguous(), bu.contiguous(), h)[:, :, : e - s]
            h = hs[:, :, -1]
            # C . h in the activations' dtype, as the reference's per-token matmul.
            ys.append(torch.matmul(hs.to(dtype).transpose(1, 2), c[:, s:e, :, None])[..., 0])  # [B, l, I]
        state.ssm.copy_(h)
        y = torch.cat(ys, dim=1).transpose(1, 2) + u * self.D.float()[:, None]
        # [B, I, T] contiguous, as the reference's: out_proj then rounds as its does (bf16).
        return (y * F.silu(gate)).contiguous()

    def _step(self, u, dt, A, b, c, gate, state: MambaState, keep: torch.Tensor | None) -> torch.Tensor:
        """One token from the state -> y [B, I, 1] in the activations' dtype (D too), as
        the reference's selective_state_update; keep as `selective_scan_step`'s."""
        x, d, bt, ct = u[..., 0], dt[..., 0], b[:, 0], c[:, 0]  # [B, I] x2, [B, N] x2
        if self.use_step_kernel(x):
            from moerun.kernels.recurrent import mamba_step

            y, _ = mamba_step(x, d, A, bt, ct, self.D, state.ssm, keep)  # state.ssm in place
        else:
            y, h = selective_scan_step(x, d, A, bt, ct, self.D, state.ssm, keep)
            state.ssm.copy_(h)
        return (y * F.silu(gate[..., 0]))[..., None]
