"""RoPE scaling variants: inverse frequencies and the attention factor that multiplies
cos/sin, computed as transformers' `modeling_rope_utils` does (default, linear, yarn,
llama3), plus the YaRN softmax-scale correction of the DeepSeek families.

Configs say it two ways: Hub configs carry `rope_theta` and a `rope_scaling` dict
(`"type": "yarn"`), transformers 5 saves one `rope_parameters` dict (`"rope_type"`,
`"rope_theta"` inside). `rope_parameters(config)` turns either into the latter.
"""

from __future__ import annotations

import math

import torch

from moerun.errors import MoerunError

DEFAULT_THETA = 10_000.0
SUPPORTED = ("default", "linear", "yarn", "llama3")


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


_VARIANTS = {"default": default_inv_freq, "linear": linear_inv_freq, "yarn": yarn_inv_freq, "llama3": llama3_inv_freq}


def check_supported(params: dict) -> None:
    if params["rope_type"] not in _VARIANTS:
        raise MoerunError(
            f"rope scaling type '{params['rope_type']}' is not supported yet (supported: {', '.join(SUPPORTED)})"
        )


def inv_freq_and_scaling(
    params: dict, head_dim: int, max_position_embeddings: int | None = None
) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim // 2], attention factor for cos/sin) for a standardized
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
