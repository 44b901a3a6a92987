"""MXFP4 (OCP microscaling FP4) as gpt-oss checkpoints store their experts: blocks of 32
FP4 e2m1 values, two per byte (low nibble first), sharing one e8m0 power-of-two scale
(an exponent byte, bias 127).

`dequantize` reproduces transformers' `integrations.mxfp4.convert_moe_packed_tensors`
value for value, including its final transpose, so that its output is the layout of the
bf16 checkpoints transformers saves (`gate_up_proj` [E, D, 2I], `down_proj` [E, I, D]).

Shape legend: E experts, R rows (output features), G blocks per row, D hidden, I expert
intermediate.
"""

from __future__ import annotations

import torch

BLOCK = 32  # values per scale
# e2m1: sign bit, 2 exponent bits, 1 mantissa bit; index = the 4-bit code.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_BIAS = 127


def dequantize_rows(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """blocks uint8 [..., R, G, 16], scales uint8 [..., R, G] -> [..., R, G * 32] in `dtype`:
    row r of the result is output feature r (the checkpoint's row order)."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} do not match scales {list(scales.shape)}")
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    blocks = blocks.to(torch.uint8)
    out = torch.empty((*blocks.shape[:-1], BLOCK), dtype=dtype, device=blocks.device)
    out[..., 0::2] = lut[(blocks & 0x0F).long()]  # low nibble: the even element
    out[..., 1::2] = lut[(blocks >> 4).long()]
    # Scaling by a power of two is exact (ldexp), whatever the dtype's exponent range allows.
    out = torch.ldexp(out, (scales.to(torch.int32) - SCALE_BIAS)[..., None]).to(dtype)
    return out.reshape(*blocks.shape[:-2], blocks.shape[-2] * BLOCK)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """blocks uint8 [E, R, G, 16], scales uint8 [E, R, G] -> [E, G * 32, R], exactly as
    transformers' convert_moe_packed_tensors (gate_up: [E, D, 2I]; down: [E, I, D])."""
    return dequantize_rows(blocks, scales, dtype).transpose(1, 2).contiguous()


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse, for tests and converters: w [..., R, K] (K a multiple of 32) ->
    (blocks uint8 [..., R, K/32, 16], scales uint8 [..., R, K/32]). Each block's scale is
    2**(floor(log2(amax)) - 2) as the OCP spec sets it (2 is e2m1's largest exponent);
    values round to the nearest e2m1 code, saturating at 6 (ties to the lower magnitude).
    Dequantized blocks quantize back to the same bytes."""
    *lead, K = w.shape
    if K % BLOCK:
        raise ValueError(f"the last dim ({K}) must be a multiple of {BLOCK}")
    x = w.float().reshape(*lead, K // BLOCK, BLOCK)
    amax = x.abs().amax(-1, keepdim=True).clamp(min=2.0**-126)
    exp = (torch.floor(torch.log2(amax)) - 2).clamp(-SCALE_BIAS, 127)
    y = torch.ldexp(x, -exp.to(torch.int32))
    magnitudes = torch.tensor(FP4_VALUES[:8])
    code = (y.abs()[..., None] - magnitudes).abs().argmin(-1)  # [.., BLOCK] in 0..7
    code = code + 8 * (y < 0).long() * (code > 0).long()
    code = code.to(torch.uint8)
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)
    scales = (exp.squeeze(-1) + SCALE_BIAS).to(torch.uint8)
    return blocks, scales
