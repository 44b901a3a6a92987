"""Where a kernel finds one expert's tensors inside a slot buffer (no Triton here).

The slot buffer of a layer is uint8 [S, blob_bytes]; one row is one expert's blob laid out
by `ExpertFormat` (64-byte aligned sections). Kernels receive typed views of the whole
buffer plus per-section element offsets and per-slot strides, all taken from `fmt.sections`
so that a change of layout there needs no change here.

Shape legend: S slots, D hidden, I expert intermediate.
"""

from __future__ import annotations

import dataclasses

import torch

from moerun.quant.format import ExpertFormat


@dataclasses.dataclass(frozen=True)
class MatrixRef:
    """One matrix of a blob: element offsets of its values (`q`) and scales, in the units of
    the typed view the kernel reads (values: uint8/int8/storage dtype; scales: float32)."""

    rows: int
    cols: int
    q_offset: int
    scale_offset: int  # 0 (unused) at 16 bits


@dataclasses.dataclass(frozen=True)
class SlotLayout:
    bits: int
    storage_dtype: torch.dtype
    blob_bytes: int
    w13: MatrixRef  # [2I, D]: gate rows, then up rows
    w2: MatrixRef  # [D, I]
    b13_offset: int  # -1 without biases; else in storage-dtype elements
    b2_offset: int

    @property
    def value_dtype(self) -> torch.dtype:
        return {4: torch.uint8, 8: torch.int8, 16: self.storage_dtype}[self.bits]

    @property
    def has_bias(self) -> bool:
        return self.b13_offset >= 0

    def views(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """slots uint8 [S, blob_bytes] -> (values view, float32 scales view, storage-dtype
        view), each 2-D [S, blob_bytes / itemsize] over the same memory (no copy)."""
        return slots.view(self.value_dtype), slots.view(torch.float32), slots.view(self.storage_dtype)


def slot_layout(fmt: ExpertFormat) -> SlotLayout:
    secs = {s.name: s for s in fmt.sections}
    D, I = fmt.hidden_size, fmt.intermediate_size
    elem = torch.empty((), dtype=fmt.dtype).element_size()
    value_size = {4: 1, 8: 1, 16: elem}[fmt.bits]

    def matrix(name: str, rows: int, cols: int) -> MatrixRef:
        if fmt.bits == 16:
            return MatrixRef(rows, cols, secs[name].offset // value_size, 0)
        scale = secs[f"{name}.absmax"] if fmt.bits == 4 else secs[f"{name}.scale"]
        return MatrixRef(rows, cols, secs[f"{name}.q"].offset, scale.offset // 4)

    for s in fmt.sections:  # the typed views below rely on this
        assert s.offset % max(elem, 4) == 0, f"section {s.name} is not aligned for a typed view"
    assert fmt.blob_bytes % max(elem, 4) == 0
    has_bias = "b13" in secs
    return SlotLayout(
        bits=fmt.bits,
        storage_dtype=fmt.dtype,
        blob_bytes=fmt.blob_bytes,
        w13=matrix("w13", 2 * I, D),
        w2=matrix("w2", D, I),
        b13_offset=secs["b13"].offset // elem if has_bias else -1,
        b2_offset=secs["b2"].offset // elem if has_bias else -1,
    )


# Tests set this to fill every kernel output with garbage before the launch, so that an
# element a kernel forgets to write shows up (NaN for floats, -1 for integers).
POISON = False


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty for kernel outputs and intermediates (poisoned under POISON)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        t.fill_(float("nan") if dtype.is_floating_point else -1)
    return t
