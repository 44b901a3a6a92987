"""Expert weight formats: 16-bit as stored, 8-bit int8 with per-row scales, 4-bit NF4 in
bitsandbytes' layout. `ExpertFormat` lays one expert out as a single contiguous blob."""

from moerun.quant.format import FORMAT_VERSION, ExpertFormat

__all__ = ["ExpertFormat", "FORMAT_VERSION"]
