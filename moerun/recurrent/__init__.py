"""Recurrent mixers (state-space layers) of the hybrid families."""

import torch

from moerun.kernels import available as kernels_available


def use_step_kernel(t: torch.Tensor) -> bool:
    """Does a recurrent layer's decode step run as its Triton kernel
    (moerun/kernels/recurrent.py)? On CUDA where the kernels can run; the CPU keeps plain
    torch. Each layer module binds this name, so tests set it per module to run the kernel
    path on the CPU under TRITON_INTERPRET=1."""
    return t.is_cuda and kernels_available(t.device)
