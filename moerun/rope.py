"""Rotary position embeddings, the one implementation every family uses: the scaling
variants (default, linear, dynamic NTK, yarn, llama3, longrope), each computed as
transformers' `modeling_rope_utils` does, partial rotary (the first rotary_dim dims of a
head), rotate-half or interleaved pairs, and the YaRN softmax-scale correction of the
DeepSeek families.

Configs say it two ways: Hub configs carry `rope_theta` and a `rope_scaling` dict
(`"type": "yarn"`), transformers 5 saves one `rope_parameters` dict (`"rope_type"`,
`"rope_theta"` inside). `rope_parameters(config)` turns either into the latter.
"""

from __future__ import annotations

import math

import torch

from moerun.errors import MoerunError
from moerun.kernels import cpu_glue

DEFAULT_THETA = 10_000.0
SUPPORTED = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


def rope_parameters(config: dict) -> dict:
    """One flat dict with `rope_type` and `rope_theta` (and the scaling keys), whichever
    way the config spells it. As in transformers, `rope_scaling` wins over
    `rope_parameters`, and a top-level `rope_theta` fills in a missing one."""
    params = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    theta = config.get("rope_theta")
    params.setdefault("rope_theta", theta if theta is not None else DEFAULT_THETA)
    if params["rope_theta"] is None:
        params["rope_theta"] = DEFAULT_THETA
    params.setdefault("rope_type", params.get("type", "default"))
    if params["rope_type"] == "su":  # Phi-3's early name for longrope
        params["rope_type"] = "longrope"
    if config.get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", config["partial_rotary_factor"])
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        if config.get("original_max_position_embeddings") is not None:
            params["original_max_position_embeddings"] = config["original_max_position_embeddings"]
        else:
            params.setdefault("original_max_position_embeddings", config.get("max_position_embeddings"))
    return params


def _rotary_dim(params: dict, head_dim: int) -> int:
    return int(head_dim * params.get("partial_rotary_factor", 1.0))


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(dtype=torch.float) / dim))


def default_inv_freq(params: dict, head_dim: int, max_position_embeddings: int | None = None):
    return _base_inv_freq(params["rope_theta"], _rotary_dim(params, head_dim)), 1.0


def linear_inv_freq(params: dict, head_dim: int, max_position_embeddings: int | None = None):
    # Scaling positions by 1/factor is scaling the frequencies by it.
    return _base_inv_freq(params["rope_theta"], _rotary_dim(params, head_dim)) / params["factor"], 1.0


def get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(params: dict, head_dim: int, max_position_embeddings: int | None = None):
    """YaRN (arXiv 2309.00071): high frequencies kept, low ones interpolated by `factor`,
    a linear ramp between; cos/sin scaled by the attention factor."""
    base = params["rope_theta"]
    dim = _rotary_dim(params, head_dim)
    factor = params.get("factor")
    original = params["original_max_position_embeddings"]
    if factor is None:  # some configs give only the two lengths
        factor = max_position_embeddings / original
    attention_factor = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp

    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1 where the frequency is extrapolated (kept as is)
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


def llama3_inv_freq(params: dict, head_dim: int, max_position_embeddings: int | None = None):
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend between."""
    inv_freq = _base_inv_freq(params["rope_theta"], _rotary_dim(params, head_dim))
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled), 1.0


def dynamic_inv_freq(params: dict, head_dim: int, max_position_embeddings: int | None = None):
    # At lengths within max_position_embeddings dynamic NTK is the default RoPE; beyond
    # them Rotary recomputes the base per call (see Rotary._dynamic_inv_freq).
    return default_inv_freq(params, head_dim)


_VARIANTS = {
    "default": default_inv_freq,
    "linear": linear_inv_freq,
    "dynamic": dynamic_inv_freq,
    "yarn": yarn_inv_freq,
    "llama3": llama3_inv_freq,
}


def check_supported(params: dict) -> None:
    if params["rope_type"] not in SUPPORTED:
        raise MoerunError(
            f"rope scaling type '{params['rope_type']}' is not supported yet (supported: {', '.join(SUPPORTED)})"
        )


def inv_freq_and_scaling(
    params: dict, head_dim: int, max_position_embeddings: int | None = None
) -> tuple[torch.Tensor, float]:
    """(inv_freq [rotary_dim // 2], attention factor for cos/sin) for a standardized
    `params` (see rope_parameters). inv_freq is float32 on the CPU, even when called
    inside a meta-device context (models are built on the meta device)."""
    check_supported(params)
    return _VARIANTS[params["rope_type"]](params, head_dim, max_position_embeddings)


def softmax_scale(params: dict, scale: float) -> float:
    """DeepSeek's YaRN correction of the attention softmax scale: with any scaled rope
    and `mscale_all_dim` set, the scale is multiplied by get_mscale(factor, mscale_all_dim)**2."""
    if params.get("rope_type", "default") != "default":
        mscale_all_dim = params.get("mscale_all_dim", 0)
        if mscale_all_dim:
            m = get_mscale(params["factor"], mscale_all_dim)
            scale = scale * m * m
    return scale


class Rotary:
    """RoPE over the first `dim` dims of each head (all of them unless the config sets
    partial_rotary_factor), with the config's scaling. One instance serves every layer.

    interleaved: the rotated pairs are (x0, x1), (x2, x3), ... (DeepSeek, Llama 4) rather
    than the two halves. They are rotated de-interleaved (evens first, then odds), a fixed
    permutation of the rotated dims applied to queries and keys alike, so attention
    scores are those of the reference. float32: rotate in float32 and cast back (the
    references that rotate as complex numbers); otherwise cos/sin are cast to the
    activations' dtype first, as the rotate-half references do.

    Plain attributes, not buffers: models are built on the meta device and these hold
    real numbers; they follow the activations' device on first use."""

    def __init__(
        self,
        params: dict,
        head_dim: int,
        max_position_embeddings: int | None = None,
        interleaved: bool = False,
        float32: bool = False,
    ):
        check_supported(params)
        self.kind = params["rope_type"]
        self.dim = _rotary_dim(params, head_dim)
        self.interleaved, self.float32 = interleaved, float32
        self._step = None  # (dtype, positions, (cos, sin)) of the last step: see _step_cos_sin
        self.theta = float(params["rope_theta"])
        if self.kind == "longrope":
            self._init_longrope(params, max_position_embeddings)
        else:
            self.inv_freq, self.attention_factor = inv_freq_and_scaling(params, head_dim, max_position_embeddings)
        if self.kind == "dynamic":
            self.factor = float(params["factor"])
            self.original_max = int(max_position_embeddings)

    def _init_longrope(self, params: dict, max_position_embeddings: int | None) -> None:
        """LongRoPE (Phi-3.5): frequencies divided per dim by `short_factor`, or by
        `long_factor` once a call reaches past original_max_position_embeddings; cos/sin
        scaled by short_mscale / long_mscale (Phi-3.5-MoE) or the attention factor."""
        self.original_max = int(params["original_max_position_embeddings"])
        base = self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.int64, device="cpu").float() / self.dim)
        factors = torch.tensor([params["short_factor"], params["long_factor"]], dtype=torch.float32, device="cpu")
        self.inv_freq = 1.0 / (factors * base)  # [2, dim/2]: short, long
        factor = params.get("factor") or (max_position_embeddings or self.original_max) / self.original_max
        default = math.sqrt(1 + math.log(factor) / math.log(self.original_max)) if factor > 1 else 1.0
        scales = [params.get(k) or params.get("attention_factor") or default for k in ("short_mscale", "long_mscale")]
        self.mscale = torch.tensor(scales, dtype=torch.float32, device="cpu")  # [2]
        self.attention_factor = 1.0

    def _to(self, device) -> None:
        if self.inv_freq.device != device:
            self.inv_freq = self.inv_freq.to(device)
            if self.kind == "longrope":
                self.mscale = self.mscale.to(device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, dim], in `dtype` (float32 when self.float32).
        Everything that depends on the length is decided on the device (torch.where, no
        host sync), so a CUDA-graph capture of a decode step may contain it."""
        self._to(positions.device)
        inv_freq, scale = self.inv_freq, self.attention_factor
        if self.kind == "longrope":
            long = positions.max() + 1 > self.original_max  # 0-d bool on the device
            inv_freq = torch.where(long, self.inv_freq[1], self.inv_freq[0])
            scale = torch.where(long, self.mscale[1], self.mscale[0])
        elif self.kind == "dynamic":
            inv_freq = self._dynamic_inv_freq(positions.max() + 1)
        freqs = positions.float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * scale, emb.sin() * scale
        out = torch.float32 if self.float32 else dtype
        return cos.to(out), sin.to(out)

    def _dynamic_inv_freq(self, seq_len: torch.Tensor) -> torch.Tensor:
        # transformers' dynamic NTK: past the original length the base grows with it.
        seq = torch.clamp(seq_len.float(), min=float(self.original_max))
        base = self.theta * ((self.factor * seq / self.original_max) - (self.factor - 1)) ** (self.dim / (self.dim - 2))
        exponent = torch.arange(0, self.dim, 2, device=seq_len.device).float() / self.dim
        return 1.0 / base**exponent

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [..., T, Dh] with cos, sin [T, dim] -> x with its first `dim` dims rotated."""
        rot, rest = (x, None) if self.dim == x.shape[-1] else (x[..., : self.dim], x[..., self.dim :])
        if self.interleaved:
            rot = torch.cat((rot[..., 0::2], rot[..., 1::2]), dim=-1)
        r = rot.float() if self.float32 else rot
        half = self.dim // 2
        out = r * cos + torch.cat((-r[..., half:], r[..., :half]), dim=-1) * sin
        out = out.to(x.dtype)
        return out if rest is None else torch.cat((out, rest), dim=-1)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        """q [B, H, T, Dh], k [B, K, T, Dh] at positions [T] -> rotated q, k. A decode step
        on the CPU rotates both in one C call, with cos/sin computed once per step (every
        layer asks for the same positions) rather than once per layer."""
        if cpu_glue.rope_usable(q, k, positions):
            cos, sin = self._step_cos_sin(positions, q.dtype)
            return cpu_glue.rope(q, k, cos, sin, self.interleaved)
        cos, sin = self.cos_sin(positions, q.dtype)
        return self.rotate(q, cos, sin), self.rotate(k, cos, sin)

    def _step_cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos_sin for a few CPU positions, kept for the next call with the same ones (the
        next layer's). Compared by value: each layer makes its own positions tensor."""
        held = self._step
        if held is None or held[0] != dtype or held[1].shape != positions.shape or not torch.equal(held[1], positions):
            self._step = held = (dtype, positions.clone(), self.cos_sin(positions, dtype))
        return held[2]


def rotary_for(config: dict, head_dim: int, default_theta: float = DEFAULT_THETA, **kwargs) -> Rotary:
    """The Rotary a family's config asks for (`rope_theta` defaulting to the family's own)."""
    if config.get("rope_theta") is None and "rope_theta" not in (
        config.get("rope_scaling") or config.get("rope_parameters") or {}
    ):
        config = {**config, "rope_theta": default_theta}
    return Rotary(rope_parameters(config), head_dim, config.get("max_position_embeddings"), **kwargs)
