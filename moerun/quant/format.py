"""The byte layout of one expert: a single contiguous uint8 blob holding its fused
gate+up matrix w13 [2I, D] and its down matrix w2 [D, I] in 16, 8 or 4 bits, so that
moving an expert between the host store and a device slot is one copy.

Sections are aligned to 64 bytes so that typed views (float32 scales, bf16 weights) of a
blob are always legal and coalesced on a GPU.

Shape legend: D hidden size, I expert intermediate size.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from moerun.quant import int8, nf4

ALIGN = 64
FORMAT_VERSION = 1  # bump when the bytes of any format change: stale disk caches rebuild


@dataclasses.dataclass(frozen=True)
class Section:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclasses.dataclass(frozen=True)
class ExpertFormat:
    """How one expert of shape (D, I) is stored at `bits` (16 means `dtype` as is)."""

    bits: int
    hidden_size: int
    intermediate_size: int
    dtype: torch.dtype  # the 16-bit storage dtype, and the dtype dequantization returns
    bias: bool = False  # b13 [2I] and b2 [D], kept in `dtype` at every bit width (tiny)
    gated: bool = True  # w13 holds gate and up rows [2I, D]; False: up rows only [I, D] (relu²)

    @property
    def rows13(self) -> int:
        return (2 if self.gated else 1) * self.intermediate_size

    @property
    def name(self) -> str:
        return {4: "nf4-b64", 8: "int8-row", 16: str(self.dtype).removeprefix("torch.")}[self.bits]

    @property
    def sections(self) -> tuple[Section, ...]:
        D, I = self.hidden_size, self.intermediate_size
        parts: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        for name, shape in (("w13", (self.rows13, D)), ("w2", (D, I))):
            numel = math.prod(shape)
            if self.bits == 16:
                parts.append((name, self.dtype, shape))
            elif self.bits == 8:
                parts += [(f"{name}.q", torch.int8, shape), (f"{name}.scale", torch.float32, (shape[0],))]
            else:
                parts += [
                    (f"{name}.q", torch.uint8, (nf4.packed_bytes(numel),)),
                    (f"{name}.absmax", torch.float32, (nf4.n_blocks(numel),)),
                ]
        if self.bias:
            parts += [("b13", self.dtype, (self.rows13,)), ("b2", self.dtype, (D,))]
        out, offset = [], 0
        for name, dtype, shape in parts:
            out.append(Section(name, dtype, shape, offset))
            offset = _align(offset + out[-1].nbytes)
        return tuple(out)

    @property
    def blob_bytes(self) -> int:
        last = self.sections[-1]
        return _align(last.offset + last.nbytes)

    def views(self, blob: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views into one blob (uint8 [blob_bytes]); no copy."""
        return {s.name: blob[s.offset : s.offset + s.nbytes].view(s.dtype).view(s.shape) for s in self.sections}

    def pack(self, w13: torch.Tensor, w2: torch.Tensor, b13=None, b2=None) -> torch.Tensor:
        """Quantize one expert (w13 [2I, D], w2 [D, I], biases b13 [2I], b2 [D] when the
        format has them) into a new uint8 blob on the CPU."""
        blob = torch.zeros(self.blob_bytes, dtype=torch.uint8)
        views = self.views(blob)
        if self.bias:
            views["b13"].copy_(b13.detach().cpu().to(self.dtype))
            views["b2"].copy_(b2.detach().cpu().to(self.dtype))
        for name, w in (("w13", w13), ("w2", w2)):
            w = w.detach().cpu()
            if self.bits == 16:
                views[name].copy_(w.to(self.dtype))
            elif self.bits == 8:
                q, scale = int8.quantize(w)
                views[f"{name}.q"].copy_(q)
                views[f"{name}.scale"].copy_(scale)
            else:
                q, absmax = nf4.quantize(w)
                views[f"{name}.q"].copy_(q)
                views[f"{name}.absmax"].copy_(absmax)
        return blob

    def unpack(self, blob: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """One blob -> (w13 [2I, D], w2 [D, I], b13 [2I] | None, b2 [D] | None) in `dtype`,
        on the blob's device."""
        views = self.views(blob)
        D, I = self.hidden_size, self.intermediate_size
        out = []
        for name, shape in (("w13", (self.rows13, D)), ("w2", (D, I))):
            if self.bits == 16:
                out.append(views[name].to(dtype))
            elif self.bits == 8:
                out.append(int8.dequantize(views[f"{name}.q"], views[f"{name}.scale"], dtype))
            else:
                out.append(nf4.dequantize(views[f"{name}.q"], views[f"{name}.absmax"], shape, dtype))
        if self.bias:
            return out[0], out[1], views["b13"].to(dtype), views["b2"].to(dtype)
        return out[0], out[1], None, None


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN
