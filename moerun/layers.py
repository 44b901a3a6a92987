"""Pieces every architecture shares: RMSNorm, per-layer state (the static KV cache, full or
a sliding-window ring), the one attention module with its options, and the dense SwiGLU
MLP. Rotary embeddings live in moerun/rope.py.

Shape legend: B batch, T new tokens, S cached positions, H query heads, K kv heads,
Dh head dim, D hidden size, I intermediate size.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from moerun.kernels import cpu_attention, cpu_glue
from moerun.kernels.cpu_linear import project


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim, normalised in float32. Where the references
    round differently, a subclass says so: `scale_in_float32` multiplies by the weight in
    float32 before the cast back (gpt-oss, Nemotron-H), else x is cast back first and the
    weight multiplies in the promoted dtype (Llama's rounding); `weight_offset` applies the
    weight as 1 + w, in float32 (Qwen3-Next's zero-centred norms). A few rows on the CPU
    run in one C call (moerun/kernels/cpu_glue.py) that rounds the same way."""

    role = "norms"  # what the planner counts its weight as (see moerun.models.base.parameter_roles)
    scale_in_float32 = False
    weight_offset = False

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_glue.rms_norm_usable(x, self.weight):
            return cpu_glue.rms_norm(x, self.weight, self.eps, self._glue_mode())
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_offset:
            return (x32 * (1.0 + self.weight.float())).to(dtype)
        if self.scale_in_float32:
            return (self.weight.float() * x32).to(dtype)
        return self.weight * x32.to(dtype)

    def _glue_mode(self) -> int:
        if self.weight_offset:
            return cpu_glue.NORM_OFFSET_SCALE_THEN_CAST
        return cpu_glue.NORM_SCALE_THEN_CAST if self.scale_in_float32 else cpu_glue.NORM_CAST_THEN_SCALE


@dataclasses.dataclass(frozen=True)
class StaticPosition:
    """Where a one-token decode step writes, held on the device so that one captured CUDA
    graph serves every position (see moerun/graphs.py). Attention then spans a fixed
    prefix of `span` cache entries (a bucket >= index + 1; the rest masked), so every
    shape in the step is fixed too. Everywhere a layer takes `start`, an int (eager: the
    first new token's position, attention over exactly the filled prefix) or this works."""

    index: torch.Tensor  # int64 [1], on the model's device
    span: int


Start = int | StaticPosition


def token_positions(start: Start, n_new: int, device) -> torch.Tensor:
    """Positions [T] of the new tokens."""
    if isinstance(start, StaticPosition):
        return start.index + torch.arange(n_new, device=device)
    return torch.arange(start, start + n_new, device=device)


def key_positions(start: Start, n_new: int, device) -> torch.Tensor:
    """Positions [S] of the keys a full cache gives attention: the filled prefix, or the static span."""
    return torch.arange(start.span if isinstance(start, StaticPosition) else start + n_new, device=device)


def context_full(end: int, max_len: int):
    from moerun.errors import MoerunError

    return MoerunError(f"context full: {end} tokens exceed the cache of {max_len}")


# -- per-layer state --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StateSpec:
    """What one layer's decode state costs, known before anything is allocated: `per_token`
    elements for each position it keeps (at most `window` of them, None: all), plus
    `fixed` elements whatever the length (room for recurrent state). The planner sums
    these; each layer's `make_state` allocates exactly this."""

    per_token: int
    window: int | None = None
    fixed: int = 0
    kind: str = "kv"  # "kv", "mla" (a compressed latent), "mamba2", ... : for the report
    # Bytes per fixed element when the state keeps its own dtype (a recurrent state in
    # float32 whatever the model's, as the references keep it); None: the model's dtype.
    fixed_dtype_bytes: int | None = None

    def elements(self, ctx: int) -> int:
        return self.per_token * min(ctx, self.window or ctx) + self.fixed

    def nbytes(self, ctx: int, dtype_bytes: int, batch: int = 1) -> int:
        per_position = self.per_token * min(ctx, self.window or ctx) * dtype_bytes
        return batch * (per_position + self.fixed * (self.fixed_dtype_bytes or dtype_bytes))

    def fixed_nbytes(self, dtype_bytes: int, batch: int = 1) -> int:
        """The part that does not grow with the context (recurrent state)."""
        return batch * self.fixed * (self.fixed_dtype_bytes or dtype_bytes)


class LayerState:
    """A layer's decode state, allocated once for the whole generation so that decode
    steps have fixed shapes (a prerequisite for CUDA graphs). `max_len`: the positions it
    can serve (a recurrent state serves any number; it records the planned context);
    `nbytes`: what it holds; `reset()`: forget everything (a new sequence). A layer that
    gets an int start of 0 begins a new sequence whatever its state holds.

    `can_rewind`: whether it can be cut back to any shorter prefix (a later prompt that
    shares only part of the held sequence reuses that part): a state that keeps each
    position apart can; a ring or a recurrent state folds the past in and cannot."""

    max_len: int
    can_rewind: bool = False

    def buffers(self) -> list[torch.Tensor]:
        return [t for t in vars(self).values() if isinstance(t, torch.Tensor)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def reset(self) -> None:
        for t in self.buffers():
            t.zero_()


class KVCache(LayerState):
    """Static key/value buffers [B, K, L, Dh] for every position up to max_len."""

    can_rewind = True

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device, v_head_dim=None):
        self.k = torch.zeros((batch, n_kv_heads, max_len, head_dim), dtype=dtype, device=device)
        self.v = torch.zeros((batch, n_kv_heads, max_len, v_head_dim or head_dim), dtype=dtype, device=device)
        self.max_len = max_len

    def update(self, k: torch.Tensor, v: torch.Tensor, start: Start):
        """k, v [B, K, T, Dh] written at [start, start+T) -> (keys, values [B, K, S, Dh],
        their positions [S] or None for 0..S-1): the filled prefix, or the whole span for
        a StaticPosition."""
        if isinstance(start, StaticPosition):
            if start.span > self.max_len:
                raise context_full(start.span, self.max_len)
            # index_copy_ takes the position from the device: no host sync, capturable.
            k_span, v_span = self.k[:, :, : start.span], self.v[:, :, : start.span]
            k_span.index_copy_(2, token_positions(start, k.shape[2], k.device), k)
            v_span.index_copy_(2, token_positions(start, v.shape[2], v.device), v)
            return k_span, v_span, None
        end = start + k.shape[2]
        if end > self.max_len:
            raise context_full(end, self.max_len)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end], None


class SlidingKVCache(LayerState):
    """Keys and values of the last `window` positions only, in a ring [B, K, W, Dh]
    (position p in slot p % W), for layers that never look further back: the memory of
    a sliding-window layer does not grow with the context."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, window: int, dtype, device):
        self.window = window
        self.k = torch.zeros((batch, n_kv_heads, window, head_dim), dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.max_len = max_len

    def update(self, k: torch.Tensor, v: torch.Tensor, start: Start):
        W, T = self.window, k.shape[2]
        if isinstance(start, StaticPosition):  # one token: write its slot, attend over the ring
            if start.span > self.max_len:
                raise context_full(start.span, self.max_len)
            slot = torch.remainder(start.index, W)
            self.k.index_copy_(2, slot, k)
            self.v.index_copy_(2, slot, v)
            # Slot s holds the latest position p <= index with p % W == s (negative: never written).
            slots = torch.arange(W, device=k.device)
            return self.k, self.v, start.index - torch.remainder(start.index - slots, W)
        end = start + T
        if end > self.max_len:
            raise context_full(end, self.max_len)
        # The earliest new query looks back W - 1 positions: those come from the ring
        # (gathered before the new keys overwrite any of them), the rest are the new keys.
        lo = max(0, start - (W - 1))
        old = torch.arange(lo, start, device=k.device)
        keys = torch.cat([self.k.index_select(2, old % W), k], dim=2)
        values = torch.cat([self.v.index_select(2, old % W), v], dim=2)
        keep = torch.arange(max(start, end - W), end, device=k.device)
        self.k.index_copy_(2, keep % W, k[:, :, keep - start])
        self.v.index_copy_(2, keep % W, v[:, :, keep - start])
        return keys, values, torch.arange(lo, end, device=k.device)


def context_of(states: list) -> int:
    """The positions a model's per-layer states can serve together (layers without state,
    None, serve any)."""
    return min(s.max_len for s in states if s is not None)


def make_kv_state(batch, n_kv_heads, max_len, head_dim, dtype, device, window=None, v_head_dim=None) -> LayerState:
    """The KV state of an attention layer: a ring when its window is shorter than the context."""
    if window and window < max_len and v_head_dim in (None, head_dim):
        return SlidingKVCache(batch, n_kv_heads, max_len, head_dim, window, dtype, device)
    return KVCache(batch, n_kv_heads, max_len, head_dim, dtype, device, v_head_dim)


# -- masks and the softmax -----------------------------------------------------------------------


def attention_mask(
    q_pos: torch.Tensor, kv_pos: torch.Tensor, window: int | None = None, chunk: int | None = None
) -> torch.Tensor:
    """Boolean [T, S], True where the query at q_pos[t] may attend to the key at kv_pos[s]:
    causal and written (kv >= 0; stale or empty slots past a static position are masked
    too), within the last `window` positions (kv > q - window) when sliding, within the
    query's own chunk of `chunk` positions when chunked (Llama 4)."""
    q, kv = q_pos[:, None], kv_pos[None, :]
    allowed = (kv <= q) & (kv >= 0)
    if window:
        allowed &= kv > q - window
    if chunk:
        allowed &= (kv // chunk) == (q // chunk)
    return allowed


# Query tokens up to which CPU attention runs as two grouped matmuls instead of
# F.scaled_dot_product_attention, whose CPU kernel is slow for few queries: bf16, 32 query
# heads on 4 kv heads of 128, one query over 1,024 keys takes 2.6 ms there and 0.18 ms as
# matmuls (development machine); at 64 x 64 the matmuls still win 2.5x, at 512 x 512 SDPA.
CPU_MATMUL_ATTENTION_MAX_QUERIES = 64


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Softmax attention: q [B, H, T, Dh], k [B, Hk, S, Dh], v [B, Hk, S, Dv] with H a
    multiple of Hk (grouped-query heads h -> h // (H / Hk)); mask bool [T, S] (True:
    attend) or None -> [B, H, T, Dv]."""
    B, H, T, _ = q.shape
    Hk = k.shape[1]
    if q.device.type != "cpu" or T > CPU_MATMUL_ATTENTION_MAX_QUERIES:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=H != Hk)
    if cpu_attention.usable(q, k, v):  # a decode step: one C call
        return cpu_attention.attention(q, k, v, mask, scale)
    G = H // Hk
    # Keys as the left operand: the cache's prefix slice k[:, :, :S] is strided across
    # heads, and as a transposed right operand it is copied first (3x the time).
    scores = (
        torch.matmul(k, q.reshape(B, Hk, G * T, q.shape[-1]).transpose(-1, -2)).float().mul_(scale)
    )  # [B, Hk, S, G*T]
    if mask is not None:
        scores.masked_fill_(~mask.t().repeat(1, G), float("-inf"))
    probs = torch.softmax(scores, dim=-2).to(v.dtype)
    return torch.matmul(probs.transpose(-1, -2), v).view(B, H, T, v.shape[-1])


def attend_with_sinks(q, k, v, mask, scale: float, sinks: torch.Tensor) -> torch.Tensor:
    """Softmax attention with one learned logit per head (gpt-oss' "sink") in every
    denominator: it takes probability mass but adds no value. Shapes as `attend`."""
    B, H, T, _ = q.shape
    groups = H // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # [B, H, S, Dh]
    scores = torch.matmul(q, k.transpose(2, 3)) * scale  # [B, H, T, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    logits = torch.cat([scores, sinks.to(scores.dtype).view(1, -1, 1, 1).expand(B, -1, T, 1)], dim=-1)
    logits = logits - logits.amax(dim=-1, keepdim=True)
    probs = torch.softmax(logits, dim=-1)[..., :-1]  # the sink's share is dropped
    return torch.matmul(probs.to(v.dtype), v)


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalisation without a weight (Llama 4's q/k norm)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class Attention(nn.Module):
    """Grouped-query softmax attention, the one module for every family whose mixer is
    attention. The options say where families differ:

    qkv_bias / o_bias: biases on the projections. qk_norm: "head" (RMSNorm per head over
    Dh, Qwen3, GLM), "full" (RMSNorm over the whole q / k projection before the split into
    heads, OLMoE) or "l2" (weightless, after RoPE, Llama 4). clip_qkv: clamp q, k, v to
    ±clip after the norms (OLMoE). scale: the softmax scale (default Dh**-0.5; Granite's
    attention_multiplier). sinks: one learned logit per head (gpt-oss). sliding_window:
    attend to the last W positions only (its state is then a ring of W). chunk: attend
    within the query's chunk only (Llama 4). rope: a moerun.rope.Rotary, None for a
    layer without positions (Llama 4's NoPE layers). temperature: (floor_scale,
    attn_scale), Llama 4's per-position query scaling on NoPE layers. output_gate: q_proj
    also gives each head a gate, after its query, and the output is multiplied by
    sigmoid(gate) before o_proj (Qwen3-Next's gated attention)."""

    role = "attention"

    def __init__(
        self,
        hidden_size: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        rope,
        *,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm: str | None = None,
        qk_norm_eps: float = 1e-6,
        clip_qkv: float | None = None,
        scale: float | None = None,
        sinks: bool = False,
        sliding_window: int | None = None,
        chunk: int | None = None,
        temperature: tuple[float, float] | None = None,
        output_gate: bool = False,
    ):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.output_gate = output_gate
        self.q_proj = nn.Linear(hidden_size, n_heads * head_dim * (2 if output_gate else 1), bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden_size, bias=o_bias)
        if qk_norm not in (None, "head", "full", "l2"):
            raise ValueError(f"qk_norm must be None, 'head', 'full' or 'l2', got {qk_norm!r}")
        self.qk_norm, self.qk_norm_eps = qk_norm, qk_norm_eps
        if qk_norm in ("head", "full"):
            self.q_norm = RMSNorm(head_dim if qk_norm == "head" else n_heads * head_dim, qk_norm_eps)
            self.k_norm = RMSNorm(head_dim if qk_norm == "head" else n_kv_heads * head_dim, qk_norm_eps)
        self.clip_qkv = clip_qkv
        self.scale = head_dim**-0.5 if scale is None else scale
        self.sinks = nn.Parameter(torch.empty(n_heads)) if sinks else None
        self.sliding_window, self.chunk = sliding_window or None, chunk or None
        self.rope, self.temperature = rope, temperature

    def state_spec(self) -> StateSpec:
        return StateSpec(2 * self.n_kv_heads * self.head_dim, self.sliding_window)

    def make_state(self, batch: int, max_len: int, dtype, device) -> LayerState:
        return make_kv_state(batch, self.n_kv_heads, max_len, self.head_dim, dtype, device, self.sliding_window)

    def forward(self, x: torch.Tensor, cache: LayerState, start: Start) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        if self.output_gate:
            q, gate = q.view(B, T, self.n_heads, 2 * self.head_dim).chunk(2, dim=-1)
            q, gate = q.reshape(B, T, -1), gate.reshape(B, T, -1)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H|K, T, Dh]
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)

        positions = token_positions(start, T, x.device)
        if self.rope is not None:
            q, k = self.rope(q, k, positions)
        if self.qk_norm == "l2":
            q, k = l2_norm(q, self.qk_norm_eps), l2_norm(k, self.qk_norm_eps)
        if self.temperature is not None:
            # Longer contexts sharpen no-RoPE attention (arXiv 2501.19399): q scaled per position.
            floor_scale, attn_scale = self.temperature
            scales = torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0
            q = (q * scales.view(1, 1, T, 1)).to(q.dtype)
        k, v, kv_pos = cache.update(k, v, start)  # [B, K, S, Dh]

        if isinstance(start, int) and T == 1 and kv_pos is None and not (self.sliding_window or self.chunk):
            mask = None  # a decode step over the filled prefix: every key is in its past
        else:
            kv_pos = key_positions(start, T, x.device) if kv_pos is None else kv_pos
            mask = attention_mask(positions, kv_pos, self.sliding_window, self.chunk)
        if self.sinks is not None:
            out = attend_with_sinks(q, k, v, mask, self.scale, self.sinks)
        else:
            out = attend(q, k, v, mask, self.scale)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        if self.output_gate:
            out = out * torch.sigmoid(gate)
        return self.o_proj(out)


class MLP(nn.Module):
    """Dense SwiGLU feed-forward: down(silu(gate(x)) * up(x)). `role` is what the planner
    counts it as: a dense layer's MLP, or an MoE block's shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int, role: str = "dense_mlp", bias: bool = False):
        super().__init__()
        self.role = role
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)
