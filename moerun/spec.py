"""What the user asked of a load, as one frozen value, checked once, here.

`moerun.load(...)` keywords and the CLI's one group of loading options both build a
`LoadSpec`; everything below (the plan, the loader, bench) receives it, never loose
keywords. No torch at import: the CLI builds a spec before it needs a model.
"""

from __future__ import annotations

import dataclasses
import os
import re

from moerun.errors import MoerunError

BITS = (4, 8, 16)
DTYPE_NAMES = ("bfloat16", "float16", "float32")  # moerun.plan.DTYPES maps them to torch
DEVICE_WORDS = ("auto", "cpu", "cuda")
# Where non-resident experts run; moerun.moe.offload's ColdPolicy acts on them.
COLD_MODES = ("gpu", "cpu", "auto")
THREADS_PER_CORE_MAX = 4  # more threads than this per core only oversubscribe (and 100000 crashed OpenMP)


class OptionError(MoerunError):
    """An option outside what it may be. The library says it as a sentence ("bits must be
    4, 8 or 16, got 3"); the CLI, which names the flag itself, as `usage` ("3 is not one
    of 4, 8, 16")."""

    def __init__(self, message: str, flag: str, usage: str):
        super().__init__(message)
        self.flag, self.usage = flag, usage


def max_threads() -> int:
    """The most CPU threads moerun accepts: a few per core, as no speed lies beyond."""
    return THREADS_PER_CORE_MAX * (os.cpu_count() or 1)


def check_bits(bits) -> int:
    if bits not in BITS:
        raise OptionError(f"bits must be 4, 8 or 16, got {bits}", "--bits", f"{bits} is not one of 4, 8, 16")
    return bits


def check_cold(cold: str) -> str:
    if cold not in COLD_MODES:
        words = ", ".join(COLD_MODES)
        raise OptionError(f"cold must be one of {words}, got '{cold}'", "--cold", f"{cold} is not one of {words}")
    return cold


def check_threads(threads):
    bad_type = isinstance(threads, bool) or not isinstance(threads, int)
    if threads is not None and (bad_type or not 1 <= threads <= max_threads()):
        bound = f"1 to {max_threads()} ({THREADS_PER_CORE_MAX} per core, {os.cpu_count() or 1} cores)"
        raise OptionError(f"threads must be {bound}, got {threads}", "--threads", f"{threads} is not {bound}")
    return threads


def dtype_name(dtype) -> str:
    """'auto' (None too), or one of DTYPE_NAMES; a torch.dtype is taken by its name."""
    name = "auto" if dtype is None else str(dtype).removeprefix("torch.")
    if name != "auto" and name not in DTYPE_NAMES:
        words = ", ".join(DTYPE_NAMES)
        usage = f"{name} is not one of auto, {words}"
        raise OptionError(f"unknown dtype '{name}': use one of {words}", "--dtype", usage)
    return name


# GiB/MiB/KiB binary, GB/MB/KB (and bare G/M/K) decimal.
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "kib": 2**10,
    "m": 10**6,
    "mb": 10**6,
    "mib": 2**20,
    "g": 10**9,
    "gb": 10**9,
    "gib": 2**30,
    "t": 10**12,
    "tb": 10**12,
    "tib": 2**40,
}


def parse_size(text: str | int | None) -> int | None:
    """'12GiB', '12GB', '12000MB', '1.5g', 123 -> bytes (GiB/MiB binary, GB/MB decimal)."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise MoerunError(f"cannot read size '{text}': use e.g. 12GiB, 12GB or 12000MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclasses.dataclass(frozen=True)
class LoadSpec:
    """A load, as asked: built from `moerun.load` keywords or the CLI's loading options,
    validated on construction (and on `dataclasses.replace`). Sizes are bytes once built
    ("12GiB" is read here); `dtype` a name; `device` a word or a torch.device, resolved
    against this machine by `resolve_device`."""

    bits: int = 16  # routed experts: 16 keeps the checkpoint's precision, 8 int8, 4 NF4
    dtype: str = "auto"  # non-expert weights and compute; auto: the checkpoint's (float32 on a slow CPU)
    device: object = "auto"  # "auto" (CUDA when available), "cpu", "cuda" or a torch.device
    vram: int | None = None  # device budget in bytes; None: free VRAM less a reserve
    ram: int | None = None  # host budget in bytes; None: most of the available RAM
    expert_slots: int | None = None  # slots per MoE layer, overriding the planner
    ctx: int | None = None  # context the KV cache is planned for; None: min(model's, 4096)
    cold: str = "gpu"  # where non-resident experts run: gpu (copied into a slot), cpu, auto
    prefetch: bool = True  # guess the next layer's experts and copy them early
    threads: int | None = None  # CPU threads for torch and the CPU kernels; None: torch's default
    cuda_graphs: bool | None = None  # replay decode steps from CUDA graphs; None: on CUDA unless turned off
    revision: str | None = None  # a revision in the local cache (no pull then)
    pull: bool = True  # fetch a missing alias or repo id after a fit check
    force: bool = False  # pull even when the fit check says it will not fit

    def __post_init__(self):
        check_bits(self.bits)
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        object.__setattr__(self, "vram", parse_size(self.vram))
        object.__setattr__(self, "ram", parse_size(self.ram))
        check_cold(self.cold)
        check_threads(self.threads)

    def resolve_device(self):
        """The torch.device to load on: "auto" is CUDA when torch sees a GPU, else the CPU;
        refused when it cannot be had, or when CUDA graphs were asked for off CUDA."""
        import torch

        device = self.device
        if str(device) == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            try:
                device = torch.device(device)
            except RuntimeError as e:
                raise MoerunError(f"unknown device '{device}': use auto, cpu or cuda") from e
            if device.type == "cuda" and not torch.cuda.is_available():
                raise MoerunError("device cuda was asked for, but torch sees no CUDA GPU")
            if device.type not in DEVICE_WORDS:
                raise MoerunError(f"unsupported device '{device}': use auto, cpu or cuda")
        if self.cuda_graphs and device.type != "cuda":
            raise MoerunError("CUDA graphs need a CUDA device")
        return device
