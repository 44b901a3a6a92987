"""Gated DeltaNet (arXiv 2412.06464), the linear-attention mixer of Qwen3-Next and Qwen3.5,
computed as transformers' Qwen3NextGatedDeltaNet and Qwen3_5GatedDeltaNet do.

Each token is projected to q, k, v (passed through a causal depthwise conv of `kernel`
taps, then SiLU), an output gate z, a write strength beta = sigmoid(b) and a decay
g = -exp(A_log) * softplus(a + dt_bias) per value head. With q and k L2-normalised and q
scaled by Dk**-0.5, the gated delta rule keeps one matrix S [Dk, Dv] per value head:

    S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - exp(g_t) S_{t-1}^T k_t))^T,    o_t = S_t^T q_t

in float32 whatever the model's dtype, as the reference. Then the gated RMSNorm,
norm(o) * silu(z), and out_proj. A key head serves Hv / Hk consecutive value heads.

A prompt goes through in chunks of CHUNK tokens (the UT form: a few matmuls per chunk and
one sequential step per chunk); a decode step is the recurrence itself.

Shape legend: B batch, T tokens, C conv channels (2 Hk Dk + Hv Dv), Hk key heads, Hv value
heads, Dk / Dv head dims, D hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moerun.layers import LayerState, Start, StateSpec, StaticPosition
from moerun.recurrent import RecurrentMixer

# Tokens per chunk of the prefill (the reference's chunk_size); a module global read at
# each call, so that tests can make prompts span several chunks.
CHUNK = 64


class GatedDeltaNetState(LayerState):
    """One layer's state: the conv window (its last kernel - 1 inputs) [B, C, kernel - 1]
    and the recurrent matrices S [B, Hv, Dk, Dv]. Both float32: S as the reference keeps
    it; the window too (it holds model-dtype values exactly), so that the state has one
    dtype the planner counts. Its size does not depend on the context; max_len records
    the planned one."""

    def __init__(
        self, batch: int, channels: int, kernel: int, n_v_heads: int, k_dim: int, v_dim: int, max_len: int, device
    ):
        self.conv = torch.zeros((batch, channels, kernel - 1), dtype=torch.float32, device=device)
        self.recurrent = torch.zeros((batch, n_v_heads, k_dim, v_dim), dtype=torch.float32, device=device)
        self.max_len = max_len


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    # The reference's (FLA's) form: rsqrt of the sum of squares plus eps.
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def chunk_gated_delta_rule(q, k, v, g, beta, initial: torch.Tensor | None, chunk: int):
    """The gated delta rule over a whole sequence, chunk by chunk, as the reference's
    torch_chunk_gated_delta_rule. q, k [B, H, T, Dk] (normalised, q not yet scaled),
    v [B, H, T, Dv], g, beta [B, H, T], all float32; initial: S [B, H, Dk, Dv] or None
    (zeros) -> (o [B, H, T, Dv], final S)."""
    B, H, T, Dk = k.shape
    q = q * Dk**-0.5
    pad = (chunk - T % chunk) % chunk
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    beta, g = (F.pad(t, (0, pad)) for t in (beta, g))
    v_beta, k_beta = v * beta.unsqueeze(-1), k * beta.unsqueeze(-1)
    q, k, k_beta, v_beta = (t.reshape(B, H, -1, chunk, t.shape[-1]) for t in (q, k, k_beta, v_beta))
    decay = g.reshape(B, H, -1, chunk).cumsum(dim=-1)  # log of the decay from the chunk's start
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    pairwise = (decay.unsqueeze(-1) - decay.unsqueeze(-2)).masked_fill(upper, float("-inf")).exp()

    # Within a chunk the delta updates are one unit-lower-triangular system (the UT transform).
    system = (k_beta @ k.transpose(-1, -2)) * pairwise
    intra = (q @ k.transpose(-1, -2)) * pairwise
    values = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    k_decayed = torch.linalg.solve_triangular(
        system, k_beta * decay.exp().unsqueeze(-1), upper=False, unitriangular=True
    )

    S = torch.zeros(B, H, Dk, v.shape[-1], dtype=values.dtype, device=values.device) if initial is None else initial
    q = q * decay.exp().unsqueeze(-1)
    k = k * (decay[..., -1:] - decay).exp().unsqueeze(-1)
    chunk_decay = decay[..., -1].exp()[..., None, None]
    out = torch.zeros_like(values)
    for i in range(values.shape[2]):  # one step per chunk, not per token
        v_new = values[:, :, i] - k_decayed[:, :, i] @ S
        out[:, :, i] = q[:, :, i] @ S + intra[:, :, i] @ v_new
        S = S * chunk_decay[:, :, i] + k[:, :, i].transpose(-1, -2) @ v_new
    return out.reshape(B, H, -1, v.shape[-1])[:, :, :T], S


def recurrent_gated_delta_step(q, k, v, g, beta, S: torch.Tensor):
    """One token of the rule, as the reference's torch_recurrent_gated_delta_rule: q, k
    [B, H, Dk] (normalised, q not yet scaled), v [B, H, Dv], g, beta [B, H], float32;
    S [B, H, Dk, Dv] -> (o [B, H, Dv], new S)."""
    q = q / q.shape[-1] ** 0.5
    S = S * g.exp()[..., None, None]
    delta = (v - (S * k.unsqueeze(-1)).sum(dim=-2)) * beta.unsqueeze(-1)
    S = S + k.unsqueeze(-1) * delta.unsqueeze(-2)
    return (S * q.unsqueeze(-1)).sum(dim=-2), S


class GatedRMSNorm(nn.Module):
    """RMSNorm over each head's output, then the SiLU gate: weight * norm(x) * silu(z),
    rounded as the reference (the weight applied in the activations' dtype, the gate in
    float32)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x32.to(dtype) * F.silu(gate.float())).to(dtype)


class GatedDeltaNet(RecurrentMixer):
    """The mixer. grouped_projections: Qwen3-Next's two projections, `in_proj_qkvz` and
    `in_proj_ba`, whose rows are grouped by key head (each head's q, k, then its value
    heads' v and z; b and a likewise); otherwise Qwen3.5's four, `in_proj_qkv` (all q,
    all k, all v), `in_proj_z`, `in_proj_b`, `in_proj_a`."""

    role = "attention"  # what the planner counts its weights as

    def __init__(
        self,
        hidden_size: int,
        n_k_heads: int,
        n_v_heads: int,
        k_head_dim: int,
        v_head_dim: int,
        conv_kernel: int,
        eps: float,
        grouped_projections: bool = False,
    ):
        super().__init__()
        if n_v_heads % n_k_heads or conv_kernel < 2:
            raise ValueError(f"value heads {n_v_heads} must be a multiple of key heads {n_k_heads}, kernel >= 2")
        self.n_k_heads, self.n_v_heads, self.k_head_dim, self.v_head_dim = n_k_heads, n_v_heads, k_head_dim, v_head_dim
        self.kernel, self.grouped = conv_kernel, grouped_projections
        key_dim, value_dim = n_k_heads * k_head_dim, n_v_heads * v_head_dim
        self.channels = 2 * key_dim + value_dim
        if grouped_projections:
            self.in_proj_qkvz = nn.Linear(hidden_size, 2 * key_dim + 2 * value_dim, bias=False)
            self.in_proj_ba = nn.Linear(hidden_size, 2 * n_v_heads, bias=False)
        else:
            self.in_proj_qkv = nn.Linear(hidden_size, self.channels, bias=False)
            self.in_proj_z = nn.Linear(hidden_size, value_dim, bias=False)
            self.in_proj_b = nn.Linear(hidden_size, n_v_heads, bias=False)
            self.in_proj_a = nn.Linear(hidden_size, n_v_heads, bias=False)
        self.conv1d = nn.Conv1d(self.channels, self.channels, conv_kernel, groups=self.channels, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(n_v_heads))
        self.A_log = nn.Parameter(torch.empty(n_v_heads))
        self.norm = GatedRMSNorm(v_head_dim, eps)
        self.out_proj = nn.Linear(value_dim, hidden_size, bias=False)

    def state_spec(self) -> StateSpec:
        fixed = self.channels * (self.kernel - 1) + self.n_v_heads * self.k_head_dim * self.v_head_dim
        return StateSpec(0, fixed=fixed, kind="deltanet", fixed_dtype_bytes=4)

    def make_state(self, batch: int, max_len: int, dtype, device) -> GatedDeltaNetState:
        return GatedDeltaNetState(
            batch, self.channels, self.kernel, self.n_v_heads, self.k_head_dim, self.v_head_dim, max_len, device
        )

    def project(self, x: torch.Tensor):
        """x [B, T, D] -> (qkv [B, T, C] as all q, all k, all v; z [B, T, Hv, Dv]; b, a [B, T, Hv])."""
        B, T, _ = x.shape
        Hv, Dv = self.n_v_heads, self.v_head_dim
        if not self.grouped:
            return self.in_proj_qkv(x), self.in_proj_z(x).view(B, T, Hv, Dv), self.in_proj_b(x), self.in_proj_a(x)
        r, Dk = Hv // self.n_k_heads, self.k_head_dim
        qkvz = self.in_proj_qkvz(x).view(B, T, self.n_k_heads, 2 * Dk + 2 * r * Dv)
        q, k, v, z = qkvz.split([Dk, Dk, r * Dv, r * Dv], dim=-1)
        b, a = self.in_proj_ba(x).view(B, T, self.n_k_heads, 2 * r).split([r, r], dim=-1)
        qkv = torch.cat([t.reshape(B, T, -1) for t in (q, k, v)], dim=-1)
        return qkv, z.reshape(B, T, Hv, Dv), b.reshape(B, T, Hv), a.reshape(B, T, Hv)

    def conv(self, qkv: torch.Tensor, state: GatedDeltaNetState, fresh: bool) -> torch.Tensor:
        """The causal depthwise conv over the window of earlier inputs (zeros for a new
        sequence) and the new ones, then SiLU; the window slides on. [B, T, C] -> [B, T, C]."""
        x = qkv.transpose(1, 2)
        past = x.new_zeros(x.shape[0], self.channels, self.kernel - 1) if fresh else state.conv.to(x.dtype)
        window = torch.cat([past, x], dim=-1)  # [B, C, kernel - 1 + T]
        state.conv.copy_(window[..., 1 - self.kernel :])
        out = F.silu(F.conv1d(window, self.conv1d.weight, groups=self.channels))
        return out.transpose(1, 2)

    def forward(self, x: torch.Tensor, state: GatedDeltaNetState, start: Start) -> torch.Tensor:
        """x [B, T, D] at positions [start, start + T) -> [B, T, D]. An int start of 0 is
        a new sequence (the state is ignored, then overwritten); a StaticPosition is a
        decode step continuing the state (positions >= 1, after a prefill), with no host
        sync and fixed shapes."""
        B, T, _ = x.shape
        Hk, Hv, Dk, Dv = self.n_k_heads, self.n_v_heads, self.k_head_dim, self.v_head_dim
        fresh = not isinstance(start, StaticPosition) and start == 0
        qkv, z, b, a = self.project(x)
        q, k, v = self.conv(qkv, state, fresh).split([Hk * Dk, Hk * Dk, Hv * Dv], dim=-1)
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)  # [B, T, Hv], <= 0

        # Heads first, value heads' own copies of their key head, float32, as the reference.
        q = q.reshape(B, T, Hk, Dk).repeat_interleave(Hv // Hk, dim=2)
        k = k.reshape(B, T, Hk, Dk).repeat_interleave(Hv // Hk, dim=2)
        q, k, v, beta, g = (t.transpose(1, 2).float() for t in (q, k, v.reshape(B, T, Hv, Dv), beta, g))
        q, k = l2norm(q), l2norm(k)
        if T == 1 and not fresh and self.use_step_kernel(x):
            from moerun.kernels.recurrent import gated_delta_step

            # The key heads before their repeat: value head h reads key head h // (Hv // Hk).
            o, S = gated_delta_step(
                q[:, :: Hv // Hk, 0], k[:, :: Hv // Hk, 0], v[:, :, 0], g[:, :, 0], beta[:, :, 0], state.recurrent
            )
            o = o.unsqueeze(2)  # S is state.recurrent, updated in place
        elif T == 1 and not fresh:
            o, S = recurrent_gated_delta_step(
                q[:, :, 0], k[:, :, 0], v[:, :, 0], g[:, :, 0], beta[:, :, 0], state.recurrent
            )
            o = o.unsqueeze(2)
        else:
            o, S = chunk_gated_delta_rule(q, k, v, g, beta, None if fresh else state.recurrent, CHUNK)
        if S is not state.recurrent:
            state.recurrent.copy_(S)

        o = o.transpose(1, 2).to(x.dtype)  # [B, T, Hv, Dv]
        return self.out_proj(self.norm(o, z).reshape(B, T, Hv * Dv))
