"""Recurrent mixers (state-space layers) of the hybrid families."""

import torch
from torch import nn

from moerun.kernels import available as kernels_available


class RecurrentMixer(nn.Module):
    """A recurrent layer whose one-token decode step may run as its Triton kernel
    (moerun/kernels/recurrent.py): on CUDA where the kernels can run; the CPU keeps plain
    torch. `step_kernel` set on a layer (True or False) overrides that choice: tests set
    it to run the kernel path on the CPU under TRITON_INTERPRET=1."""

    step_kernel: bool | None = None

    def use_step_kernel(self, t: torch.Tensor) -> bool:
        if self.step_kernel is not None:
            return self.step_kernel
        return t.is_cuda and kernels_available(t.device)
