"""4-bit NormalFloat in bitsandbytes' layout: blocks of 64 consecutive values (row-major),
one float32 absmax per block, codes into the 16-level NF4 table, two codes per byte with
the first value in the high nibble. bitsandbytes' quantize_4bit / dequantize_4bit
(quant_type="nf4", blocksize=64, compress_statistics=False) read and write the same bytes.
"""

from __future__ import annotations

import functools
import logging
import math

import torch

BLOCK = 64

# bitsandbytes' NF4 code table (quantiles of N(0, 1), scaled to [-1, 1]).
NF4_LEVELS = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
# Decision boundaries halfway between neighbouring levels: a value maps to its nearest level.
_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2


def n_blocks(numel: int) -> int:
    return math.ceil(numel / BLOCK)


def packed_bytes(numel: int) -> int:
    # Two codes per byte, no padding to whole blocks (bitsandbytes' size for odd shapes).
    return (numel + 1) // 2


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (any shape, any float dtype) -> (packed uint8 [packed_bytes], absmax float32 [n_blocks])."""
    flat = w.detach().reshape(-1).float()
    pad = n_blocks(flat.numel()) * BLOCK - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    blocks = flat.view(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    codes = torch.bucketize(scaled, _MIDPOINTS.to(scaled.device)).to(torch.uint8).view(-1, 2)
    return ((codes[:, 0] << 4) | codes[:, 1])[: packed_bytes(w.numel())], absmax


# Both codes of every byte value, high nibble first: one lookup per byte instead of
# unpacking nibbles, ~2x faster on the CPU path and bit-identical.
_PAIRS = torch.stack([NF4_LEVELS[torch.arange(256) >> 4], NF4_LEVELS[torch.arange(256) & 0xF]], dim=-1)


# Below this many weights the torch path is fast enough and bitsandbytes' import (~4 s)
# is not worth paying.
_BNB_MIN_NUMEL = 1 << 20


@functools.lru_cache(maxsize=None)
def _bitsandbytes():
    """bitsandbytes.functional, whose C++ CPU dequantizer reads these exact bytes ~9x
    faster than the torch path (Mixtral's w13: 0.12 s against 1.1 s on 2 threads); None
    when it is not installed or not usable here."""
    # Its CPU backend logs a warning about an optional kernel package users cannot act on.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnbf
    except Exception:  # noqa: BLE001 - any import failure means: use the torch path
        return None
    return bnbf


def dequantize_bitsandbytes(packed: torch.Tensor, absmax: torch.Tensor, shape, dtype: torch.dtype):
    """The same result as `dequantize` through bitsandbytes' own kernel, or None when it
    cannot give it: its CPU kernel reads blocks per row, which equals the flat layout only
    when rows are whole blocks (true of every real expert shape)."""
    bnbf = _bitsandbytes()
    if bnbf is None or len(shape) != 2 or shape[-1] % BLOCK or packed.device.type != "cpu":
        return None
    state = bnbf.QuantState(
        absmax=absmax, shape=torch.Size(shape), code=NF4_LEVELS, blocksize=BLOCK, quant_type="nf4", dtype=dtype
    )
    return bnbf.dequantize_4bit(packed.view(-1, 1), state)


def dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of quantize: level[code] * absmax, computed in float32 and cast to dtype.
    Large matrices on the CPU go through bitsandbytes' kernel (bit-identical, faster)."""
    numel = math.prod(shape)
    if numel >= _BNB_MIN_NUMEL:
        fast = dequantize_bitsandbytes(packed, absmax, shape, dtype)
        if fast is not None:
            return fast
    values = torch.nn.functional.embedding(packed.long(), _PAIRS.to(packed.device)).reshape(-1)
    pad = absmax.numel() * BLOCK - values.numel()
    if pad:  # the partial last block
        values = torch.cat([values, values.new_zeros(pad)])
    values = values.view(-1, BLOCK) * absmax[:, None]
    return values.reshape(-1)[:numel].reshape(shape).to(dtype)
