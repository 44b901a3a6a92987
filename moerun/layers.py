"""Pieces every architecture shares: RMSNorm, rotary embeddings, a static KV cache,
grouped-query attention and the dense SwiGLU MLP.

Shape legend: B batch, T new tokens, S cached positions, H query heads, K kv heads,
Dh head dim, D hidden size, I intermediate size.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from moerun.kernels import cpu_attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and cast back before the scale, as the reference does,
        # so that bf16 checkpoints round the same way.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_theta(config: dict, default: float = 10000.0) -> float:
    """The rotary base, from `rope_theta` (Hub configs) or `rope_parameters` (transformers 5)."""
    if config.get("rope_theta") is not None:
        return float(config["rope_theta"])
    params = config.get("rope_parameters") or {}
    return float(params.get("rope_theta", default))


def check_rope_scaling(config: dict) -> None:
    """Refuse rope scaling this version does not implement instead of computing wrong logits."""
    from moerun.errors import MoerunError

    for key in ("rope_scaling", "rope_parameters"):
        params = config.get(key) or {}
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in ("default", None):
            raise MoerunError(f"rope scaling type '{kind}' is not supported yet")


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE; cos/sin are computed for the positions in use, never tabled up
    to max_position_embeddings (131072 for some models)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        # A plain attribute, not a buffer: models are built on the meta device and
        # this must hold real numbers; it is tiny and recomputed per device on demand.
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
        self.inv_freq = 1.0 / (theta**exponent)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [T] -> cos, sin [T, Dh]
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, H, T, Dh]; cos, sin [T, Dh]
    return x * cos + _rotate_half(x) * sin


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
    """Positions [S] of the keys attention reads: the filled prefix, or the static span."""
    return torch.arange(start.span if isinstance(start, StaticPosition) else start + n_new, device=device)


def context_full(end: int, max_len: int):
    from moerun.errors import MoerunError

    return MoerunError(f"context full: {end} tokens exceed the cache of {max_len}")


class KVCache:
    """Static per-layer key/value buffers: allocated once for the whole generation so
    that decode steps have fixed shapes (a prerequisite for CUDA graphs)."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def update(self, k: torch.Tensor, v: torch.Tensor, start: Start) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v [B, K, T, Dh] written at [start, start+T); returns the keys attention reads
        # [B, K, S, Dh]: the filled prefix, or the whole span for a StaticPosition.
        if isinstance(start, StaticPosition):
            if start.span > self.max_len:
                raise context_full(start.span, self.max_len)
            # index_copy_ takes the position from the device: no host sync, capturable.
            k_span, v_span = self.k[:, :, : start.span], self.v[:, :, : start.span]
            k_span.index_copy_(2, token_positions(start, k.shape[2], k.device), k)
            v_span.index_copy_(2, token_positions(start, v.shape[2], v.device), v)
            return k_span, v_span
        end = start + k.shape[2]
        if end > self.max_len:
            raise context_full(end, self.max_len)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


def attention_mask_or_none(start: Start, n_new: int, window: int | None, device) -> torch.Tensor | None:
    """attention_mask, or None where it would mask nothing: one new token at a host
    position and no window, so every key attention reads is in its past (a decode step)."""
    if isinstance(start, int) and n_new == 1 and not window:
        return None
    return attention_mask(start, n_new, window, device)


def attention_mask(start: Start, n_new: int, window: int | None, device) -> torch.Tensor:
    """Boolean [T, S] mask, True where query start+t may attend to key s: causal, and
    within the last `window` positions when a sliding window is set (kv > q - window).
    Under a StaticPosition the keys past the new token (stale or empty) are masked too."""
    q = token_positions(start, n_new, device)[:, None]
    kv = key_positions(start, n_new, device)[None, :]
    allowed = kv <= q
    if window:
        allowed &= kv > q - window
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
    scores = torch.matmul(k, q.reshape(B, Hk, G * T, q.shape[-1]).transpose(-1, -2)).float().mul_(scale)  # [B, Hk, S, G*T]
    if mask is not None:
        scores.masked_fill_(~mask.t().repeat(1, G), float("-inf"))
    probs = torch.softmax(scores, dim=-2).to(v.dtype)
    return torch.matmul(probs.transpose(-1, -2), v).view(B, H, T, v.shape[-1])


class Attention(nn.Module):
    """Grouped-query attention with optional qkv bias and per-head q/k RMSNorm (Qwen3)."""

    def __init__(
        self,
        hidden_size: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        rope: RotaryEmbedding,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm_eps: float | None = None,
        sliding_window: int | None = None,
    ):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden_size, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden_size, bias=o_bias)
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(head_dim, qk_norm_eps)
            self.k_norm = RMSNorm(head_dim, qk_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.rope = rope
        self.sliding_window = sliding_window or None

    def forward(self, x: torch.Tensor, cache: KVCache, start: Start) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H|K, T, Dh]

        cos, sin = self.rope(token_positions(start, T, x.device), x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = cache.update(k, v, start)  # [B, K, S, Dh]

        mask = attention_mask_or_none(start, T, self.sliding_window, x.device)
        out = attend(q, k, v, mask, self.head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """Dense SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
