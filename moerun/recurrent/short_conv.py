"""LFM2's gated short convolution, as transformers' lfm2_moe computes it: in_proj to three
gates B, C, x; B * x through a causal depthwise conv1d of width L (`conv_L_cache`, no
activation); C * conv; out_proj. Its state is the last L-1 conv inputs, in the model's
dtype (as the reference's conv cache). Also the causal conv with a carried window that
the Mamba mixer shares.

Shape legend: B batch, T tokens, D hidden, C conv channels, K (or L) conv width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moerun.layers import LayerState, Start, StateSpec, StaticPosition


def causal_conv1d(
    x: torch.Tensor, window: torch.Tensor, start: Start, weight: torch.Tensor, bias: torch.Tensor | None, act=None
) -> torch.Tensor:
    """Depthwise causal conv of x [B, C, T] (weight [C, 1, K]) over the K-1 inputs before
    it, which `window` [B, C, K-1] holds and then holds the last K-1 inputs. A new
    sequence (int start 0, or a StaticPosition at index 0: chosen on the device) sees
    zeros instead, whatever the window held. Computed in the weight's dtype, `act` applied
    before the cast back to x's dtype, as the reference's causal_conv1d_fn/update."""
    if isinstance(start, StaticPosition):
        past = torch.where(start.index > 0, window, 0).to(x.dtype)
    elif start == 0:
        past = x.new_zeros(window.shape)
    else:
        past = window.to(x.dtype)
    full = torch.cat([past, x], dim=-1)  # [B, C, K-1+T]
    window.copy_(full[..., x.shape[-1] :])
    out = F.conv1d(full.to(weight.dtype), weight, bias, groups=x.shape[1])  # [B, C, T]
    return (out if act is None else act(out)).to(x.dtype)


class ShortConvState(LayerState):
    """conv [B, D, L-1]: the last L-1 inputs of the conv, in the model's dtype."""

    def __init__(self, batch: int, channels: int, width: int, max_len: int, dtype, device):
        self.conv = torch.zeros((batch, channels, width - 1), dtype=dtype, device=device)
        self.max_len = max_len


class ShortConv(nn.Module):
    """The mixer of LFM2's conv layers, under the checkpoint's names (conv, in_proj,
    out_proj); `bias` is the config's conv_bias (on all three)."""

    role = "attention"  # what the planner counts its weights as

    def __init__(self, hidden_size: int, width: int, bias: bool = False):
        super().__init__()
        self.hidden_size, self.width = hidden_size, width
        self.conv = nn.Conv1d(hidden_size, hidden_size, width, groups=hidden_size, bias=bias)
        self.in_proj = nn.Linear(hidden_size, 3 * hidden_size, bias=bias)
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=bias)

    def state_spec(self) -> StateSpec:
        return StateSpec(per_token=0, fixed=self.hidden_size * (self.width - 1), kind="conv")

    def make_state(self, batch: int, max_len: int, dtype, device) -> ShortConvState:
        return ShortConvState(batch, self.hidden_size, self.width, max_len, dtype, device)

    def forward(self, x: torch.Tensor, state: ShortConvState, start: Start) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]; `start` as every mixer's (an int start of 0 is a new sequence)."""
        b, c, xs = self.in_proj(x).transpose(-1, -2).chunk(3, dim=-2)  # [B, D, T] each
        conv = causal_conv1d(b * xs, state.conv, start, self.conv.weight, self.conv.bias)
        return self.out_proj((c * conv).transpose(-1, -2).contiguous())
