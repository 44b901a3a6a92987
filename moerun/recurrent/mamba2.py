"""The Mamba-2 (SSD) mixer of the hybrid families (Granite 4.0-H, Nemotron-H), computed as
transformers' torch path computes it: in_proj to (gate z, xBC, dt); a causal depthwise
conv1d + SiLU over xBC, split into x (heads of P), B and C (groups of N); dt = softplus(dt
+ dt_bias) clamped to the time-step limits; A = -exp(A_log); the selective scan
h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t, y_t = C_t h_t + D x_t; a gated RMSNorm per group
(y * silu(z)); out_proj.

Prefill runs the chunked SSD form (quadratic within a chunk of `chunk_size` positions,
the state carried from chunk to chunk); decode runs one recurrence step. The state keeps
the conv window (the last K-1 inputs) and h, both in float32 (h is float32 in the
reference; the window holds model-dtype values exactly).

Shape legend: B batch, T tokens, H heads, P head dim, G groups, N state size, C conv
channels (H*P + 2*G*N), K conv kernel, I inner size (H*P).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moerun.layers import LayerState, Start, StateSpec, StaticPosition
from moerun.recurrent import RecurrentMixer


class Mamba2State(LayerState):
    """conv [B, C, K-1] (the last K-1 conv inputs) and ssm [B, H, P, N], float32."""

    def __init__(
        self,
        batch: int,
        conv_dim: int,
        conv_kernel: int,
        n_heads: int,
        head_dim: int,
        state_size: int,
        max_len: int,
        device,
    ):
        self.conv = torch.zeros((batch, conv_dim, conv_kernel - 1), dtype=torch.float32, device=device)
        self.ssm = torch.zeros((batch, n_heads, head_dim, state_size), dtype=torch.float32, device=device)
        self.max_len = max_len


class GatedRMSNorm(nn.Module):
    """RMSNorm of y * silu(z) over groups of `group_size` channels, in float32, cast back
    to y's dtype before the weight (as the reference: y is float32 after a prefill scan,
    the model's dtype after a decode step)."""

    def __init__(self, dim: int, group_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size, self.eps = group_size, eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        h = y.float() * F.silu(z.float())
        g = h.view(*h.shape[:-1], -1, self.group_size)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * g.view(h.shape).to(dtype)


def segment_sum(a: torch.Tensor) -> torch.Tensor:
    """a [..., l] -> [..., l, l]: out[i, j] = a[j+1] + ... + a[i] for j <= i, -inf above
    the diagonal (the reference's stable form: masked cumulative sums, no differences)."""
    l = a.shape[-1]
    a = a[..., None].expand(*a.shape, l)
    a = a.masked_fill(~torch.tril(torch.ones(l, l, dtype=torch.bool, device=a.device), -1), 0)
    out = torch.cumsum(a, dim=-2)
    return out.masked_fill(~torch.tril(torch.ones(l, l, dtype=torch.bool, device=a.device), 0), -math.inf)


def selective_state_step(xs, dt, A, b, c, D, h: torch.Tensor, keep: torch.Tensor | None):
    """Mamba-2's selective-state update for one token, as the reference's step: xs [B, H, P];
    dt [B, H] after softplus and the limits; A [H] float32 (negative); b, c [B, G, N] (head
    h reads group h // (H // G)); D [H]; h [B, H, P, N] float32; keep: a 0-d float tensor
    (0 drops the state) or None -> (y [B, H, P] in xs.dtype, new h). The Triton kernel
    moerun.kernels.recurrent.mamba2_step holds this contract."""
    dA = torch.exp(dt.float() * A)  # [B, H]
    if keep is not None:
        dA = dA * keep
    rep = xs.shape[1] // b.shape[1]
    b = b.repeat_interleave(rep, dim=1)  # [B, H, N]
    c = c.repeat_interleave(rep, dim=1)
    # dt * B * x in the activations' dtype and the state in float32, as the reference's step.
    dbx = (dt[:, :, None, None] * b[:, :, None, :]) * xs[..., None]  # [B, H, P, N]
    h = h * dA[:, :, None, None] + dbx
    y = torch.matmul(h.to(c.dtype), c[..., None])[..., 0]  # [B, H, P]
    return y + xs * D[:, None].to(xs.dtype), h


class Mamba2Mixer(RecurrentMixer):
    """One Mamba-2 layer under the checkpoint's names (in_proj, conv1d, dt_bias, A_log, D,
    norm, out_proj). Options where the families differ: `time_step_limit` (Granite's
    config value; Nemotron-H's (time_step_min, inf)), `proj_bias`, `conv_bias`, `eps`."""

    role = "attention"  # what the planner counts its weights as

    def __init__(
        self,
        hidden_size: int,
        n_heads: int,
        head_dim: int,
        n_groups: int,
        state_size: int,
        conv_kernel: int,
        chunk_size: int,
        eps: float,
        *,
        time_step_limit: tuple[float, float] = (0.0, math.inf),
        proj_bias: bool = False,
        conv_bias: bool = True,
    ):
        super().__init__()
        if n_heads % n_groups:
            raise ValueError(f"mamba heads ({n_heads}) must be a multiple of its groups ({n_groups})")
        self.n_heads, self.head_dim, self.n_groups, self.state_size = n_heads, head_dim, n_groups, state_size
        self.inner = n_heads * head_dim
        self.conv_dim = self.inner + 2 * n_groups * state_size
        self.conv_kernel = conv_kernel
        self.chunk_size = chunk_size  # positions per SSD chunk in prefill (tests lower it)
        self.dt_min, self.dt_max = float(time_step_limit[0]), float(time_step_limit[1])
        self.in_proj = nn.Linear(hidden_size, self.inner + self.conv_dim + n_heads, bias=proj_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, conv_kernel, groups=self.conv_dim, bias=conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(n_heads))
        self.A_log = nn.Parameter(torch.empty(n_heads))
        self.D = nn.Parameter(torch.empty(n_heads))
        self.norm = GatedRMSNorm(self.inner, self.inner // n_groups, eps)
        self.out_proj = nn.Linear(self.inner, hidden_size, bias=proj_bias)

    def state_spec(self) -> StateSpec:
        H, P, N = self.n_heads, self.head_dim, self.state_size
        return StateSpec(
            per_token=0, fixed=self.conv_dim * (self.conv_kernel - 1) + H * P * N, kind="mamba2", fixed_dtype_bytes=4
        )

    def make_state(self, batch: int, max_len: int, dtype, device) -> Mamba2State:
        return Mamba2State(
            batch, self.conv_dim, self.conv_kernel, self.n_heads, self.head_dim, self.state_size, max_len, device
        )

    def forward(self, x: torch.Tensor, state: Mamba2State | None, start: Start) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]. An int start of 0 begins a new sequence (the state's
        contents are ignored and overwritten); a later int start continues it; a
        StaticPosition is one decode step with fixed shapes and no host sync."""
        T = x.shape[1]
        z, xbc, dt = self.in_proj(x).split([self.inner, self.conv_dim, self.n_heads], dim=-1)
        if isinstance(start, StaticPosition):
            # At index 0 the step must not read the stale state: scaled by 0 on the device.
            y = self._step(z, xbc, dt, state, keep=(start.index > 0).float())
        elif T == 1 and start > 0:
            y = self._step(z, xbc, dt, state, keep=None)
        else:
            y = self._prefill(z, xbc, dt, state, fresh=start == 0)
        return self.out_proj(y.to(x.dtype))

    # -- pieces ------------------------------------------------------------------------

    def _dt(self, dt: torch.Tensor) -> torch.Tensor:
        # In the activations' dtype, as the reference, then clamped to the limits.
        return F.softplus(dt + self.dt_bias.to(dt.dtype)).clamp(self.dt_min, self.dt_max)

    def _conv(self, full: torch.Tensor) -> torch.Tensor:
        """full [B, C, K-1+T] (the window, then the new inputs) -> silu(conv) [B, C, T]."""
        out = F.conv1d(full.to(self.conv1d.weight.dtype), self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)
        return F.silu(out).to(full.dtype)

    def _split(self, xbc: torch.Tensor):
        GN = self.n_groups * self.state_size
        xs, b, c = xbc.split([self.inner, GN, GN], dim=-1)
        shape = xbc.shape[:-1]
        return (
            xs.reshape(*shape, self.n_heads, self.head_dim),
            b.reshape(*shape, self.n_groups, self.state_size),
            c.reshape(*shape, self.n_groups, self.state_size),
        )

    def _prefill(self, z, xbc, dt, state: Mamba2State | None, fresh: bool) -> torch.Tensor:
        Bsz, T, _ = xbc.shape
        K1 = self.conv_kernel - 1
        xbc_t = xbc.transpose(1, 2)  # [B, C, T]
        if fresh or state is None:
            window = xbc_t.new_zeros(Bsz, self.conv_dim, K1)
        else:
            window = state.conv.to(xbc.dtype)
        full = torch.cat([window, xbc_t], dim=-1)
        if state is not None:
            state.conv.copy_(full[:, :, T:])  # the last K-1 inputs
        xs, b, c = self._split(self._conv(full).transpose(1, 2))
        h0 = None if fresh or state is None else state.ssm
        y, h = self.ssd(xs, self._dt(dt), b, c, h0)
        if state is not None:
            state.ssm.copy_(h)
        return self.norm(y.reshape(Bsz, T, self.inner), z)  # float32, as the reference's scan gives it

    def ssd(self, xs, dt, b, c, h0=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunked scan: xs [B, T, H, P], dt [B, T, H] (after softplus), b, c
        [B, T, G, N], h0 [B, H, P, N] or None -> (y [B, T, H, P] float32 with the D skip,
        final state [B, H, P, N] float32). One chunk at a time, never one token."""
        Bsz, T, H, P = xs.shape
        rep = H // self.n_groups
        A = -torch.exp(self.A_log.float())
        x32 = xs.float()
        skip = self.D[:, None] * x32
        b = b.float().repeat_interleave(rep, dim=2)  # [B, T, H, N]: head h reads group h // rep
        c = c.float().repeat_interleave(rep, dim=2)
        xdt = x32 * dt[..., None].float()
        a = (A * dt.float()).transpose(1, 2)  # [B, H, T]
        h = x32.new_zeros(Bsz, H, P, self.state_size) if h0 is None else h0.float()
        ys = []
        for s in range(0, T, self.chunk_size):
            e = min(s + self.chunk_size, T)
            ac, bc, cc, xc = a[:, :, s:e], b[:, s:e], c[:, s:e], xdt[:, s:e]
            cum = torch.cumsum(ac, dim=-1)  # [B, H, l]
            # Within the chunk: attention-like C_l . B_s weighted by the decay from s to l.
            scores = torch.einsum("blhn,bshn->blsh", cc, bc) * torch.exp(segment_sum(ac)).permute(0, 2, 3, 1)
            y = torch.einsum("blsh,bshp->blhp", scores, xc)
            # From the state entering the chunk, decayed to each position.
            y = y + torch.einsum("blhn,bhpn->blhp", cc, h) * torch.exp(cum).transpose(1, 2)[..., None]
            ys.append(y)
            decay = torch.exp(cum[:, :, -1:] - cum).transpose(1, 2)[..., None]  # [B, l, H, 1]: to the chunk's end
            h = h * torch.exp(cum[:, :, -1])[..., None, None] + torch.einsum("blhn,blhp->bhpn", bc * decay, xc)
        return torch.cat(ys, dim=1) + skip, h

    def _step(self, z, xbc, dt, state: Mamba2State, keep: torch.Tensor | None) -> torch.Tensor:
        """One token: z, xbc, dt [B, 1, ...] -> normed y [B, 1, I] in the activations' dtype."""
        Bsz = xbc.shape[0]
        window = state.conv.to(xbc.dtype)
        if keep is not None:
            window = window * keep.to(window.dtype)
        full = torch.cat([window, xbc.transpose(1, 2)], dim=-1)  # [B, C, K]
        state.conv.copy_(full[:, :, 1:])
        xs, b, c = self._split(self._conv(full)[:, :, 0])  # [B, H, P], [B, G, N] x2
        dt = self._dt(dt[:, 0])  # [B, H]
        A = -torch.exp(self.A_log.float())
        if self.use_step_kernel(xs):
            from moerun.kernels.recurrent import mamba2_step

            y, _ = mamba2_step(xs, dt, A, b, c, self.D, state.ssm, keep)  # state.ssm in place
        else:
            y, h = selective_state_step(xs, dt, A, b, c, self.D, state.ssm, keep)
            state.ssm.copy_(h)
        return self.norm(y.reshape(Bsz, 1, self.inner), z)


def mamba2_tensors(layout, prefix: str, **dims) -> None:
    """A Mamba-2 layer's checkpoint tensors under `prefix`, into a CheckpointLayout (role
    "attention", as its parameters count): the parameters of a Mamba2Mixer of these `dims`
    (its keyword arguments but chunk_size and eps), which keeps the checkpoint's names."""
    with torch.device("meta"):
        mixer = Mamba2Mixer(**dims, chunk_size=1, eps=0.0)
    for name, param in mixer.named_parameters():
        layout.add(f"{prefix}.{name}", param.shape, "attention")
