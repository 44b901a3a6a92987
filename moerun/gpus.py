"""Cards `moerun fit --gpu NAME` can plan for, and host memory specs for `--ram`.

Figures are the vendors' published ones: memory size, memory bandwidth, and the PCIe
link the card has (what an expert miss is copied over). Apple's M-series chips share one
memory between CPU and GPU: nothing is offloaded there, the model fits that memory or not.
"""

from __future__ import annotations

import dataclasses
import re

from moerun.errors import MoerunError

GiB = 2**30
# What pinned host->device copies achieve of a PCIe link's raw rate (~25 GB/s of 4.0 x16's 31.5).
PCIE_EFFICIENCY = 0.8
_PCIE_LANE_GBS = {3: 0.985, 4: 1.969, 5: 3.938}  # GB/s per lane after encoding


@dataclasses.dataclass(frozen=True)
class Gpu:
    key: str  # what --gpu takes
    name: str
    memory_gib: int
    bandwidth_gbs: float  # memory bandwidth, GB/s
    pcie_gen: int = 0  # 0: unified memory, no PCIe copies
    pcie_lanes: int = 0

    @property
    def unified(self) -> bool:
        return self.pcie_gen == 0

    @property
    def memory_bytes(self) -> int:
        return self.memory_gib * GiB

    @property
    def bandwidth(self) -> float:
        return self.bandwidth_gbs * 1e9

    @property
    def pcie_bandwidth(self) -> float:
        """Bytes/s a pinned host->device copy achieves over the card's link."""
        return _PCIE_LANE_GBS.get(self.pcie_gen, 0) * self.pcie_lanes * PCIE_EFFICIENCY * 1e9

    @property
    def link(self) -> str:
        return "unified" if self.unified else f"PCIe {self.pcie_gen}.0 x{self.pcie_lanes}"


def _g(key, name, gib, gbs, gen, lanes):
    return Gpu(key, name, gib, gbs, gen, lanes)


def _apple(key, name, gib, gbs):
    return Gpu(key, name, gib, gbs)


GPUS: dict[str, Gpu] = {
    g.key: g
    for g in (
        _g("rtx-3060", "GeForce RTX 3060 12GB", 12, 360, 4, 16),
        _g("rtx-3060-ti", "GeForce RTX 3060 Ti", 8, 448, 4, 16),
        _g("rtx-3070", "GeForce RTX 3070", 8, 448, 4, 16),
        _g("rtx-3080", "GeForce RTX 3080 10GB", 10, 760, 4, 16),
        _g("rtx-3080-12gb", "GeForce RTX 3080 12GB", 12, 912, 4, 16),
        _g("rtx-3090", "GeForce RTX 3090", 24, 936, 4, 16),
        _g("rtx-4060-ti-16gb", "GeForce RTX 4060 Ti 16GB", 16, 288, 4, 8),
        _g("rtx-4070", "GeForce RTX 4070", 12, 504, 4, 16),
        _g("rtx-4070-ti-super", "GeForce RTX 4070 Ti Super", 16, 672, 4, 16),
        _g("rtx-4080", "GeForce RTX 4080", 16, 717, 4, 16),
        _g("rtx-4080-super", "GeForce RTX 4080 Super", 16, 736, 4, 16),
        _g("rtx-4090", "GeForce RTX 4090", 24, 1008, 4, 16),
        _g("rtx-5060-ti-16gb", "GeForce RTX 5060 Ti 16GB", 16, 448, 5, 8),
        _g("rtx-5070", "GeForce RTX 5070", 12, 672, 5, 16),
        _g("rtx-5070-ti", "GeForce RTX 5070 Ti", 16, 896, 5, 16),
        _g("rtx-5080", "GeForce RTX 5080", 16, 960, 5, 16),
        _g("rtx-5090", "GeForce RTX 5090", 32, 1792, 5, 16),
        _g("rx-7900-xtx", "Radeon RX 7900 XTX", 24, 960, 4, 16),
        _g("rx-9070-xt", "Radeon RX 9070 XT", 16, 640, 5, 16),
        _g("rtx-a4000", "RTX A4000", 16, 448, 4, 16),
        _g("rtx-a5000", "RTX A5000", 24, 768, 4, 16),
        _g("rtx-a6000", "RTX A6000", 48, 768, 4, 16),
        _g("rtx-6000-ada", "RTX 6000 Ada", 48, 960, 4, 16),
        _g("l4", "L4", 24, 300, 4, 16),
        _g("a100-80gb", "A100 80GB (PCIe)", 80, 1935, 4, 16),
        _g("h100-80gb", "H100 80GB (PCIe)", 80, 2000, 5, 16),
        # Apple: the largest memory each chip is sold with (--ram sets a smaller one).
        _apple("m1-max", "Apple M1 Max", 64, 400),
        _apple("m1-ultra", "Apple M1 Ultra", 128, 800),
        _apple("m2-max", "Apple M2 Max", 96, 400),
        _apple("m2-ultra", "Apple M2 Ultra", 192, 800),
        _apple("m3-max", "Apple M3 Max", 128, 400),
        _apple("m3-ultra", "Apple M3 Ultra", 512, 819),
        _apple("m4-pro", "Apple M4 Pro", 64, 273),
        _apple("m4-max", "Apple M4 Max", 128, 546),
    )
}

# The card class a model that no single machine holds is counted in (vLLM / SGLang nodes).
DATACENTER = GPUS["h100-80gb"]


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-").removeprefix("nvidia-").removeprefix("geforce-")


def gpu(name: str) -> Gpu:
    """The card called `name` ("rtx-3060", "RTX 3060", "4090", "m3-max"); one line naming
    the table when there is none."""
    key = _key(name)
    for candidate in (key, f"rtx-{key}", f"rx-{key}", key.replace("-12gb", "")):
        if candidate in GPUS:
            return GPUS[candidate]
    close = [k for k in GPUS if key and key in k]
    hint = f" (did you mean {', '.join(close[:4])}?)" if close else ""
    raise MoerunError(f"unknown GPU '{name}'{hint}: `moerun fit --gpu list` shows the cards moerun knows")


def table_rows() -> list[tuple[str, str, str, str]]:
    """(key, memory, bandwidth, link) per card, for `--gpu list`."""
    return [(g.key, f"{g.memory_gib} GiB", f"{g.bandwidth_gbs:.0f} GB/s", g.link) for g in GPUS.values()]


# -- host memory: --ram 32GiB, --ram ddr5-5600x2, --ram-bandwidth 90GB/s --------------------------

_DDR = re.compile(r"(lp)?ddr([345])x?-(\d{3,5})(?:x(\d{1,2}))?")


def ddr_bandwidth(text: str) -> float | None:
    """'ddr5-5600x2' (DDR5-5600, two 64-bit channels) -> 89.6e9 bytes/s; None when `text`
    is not such a spec. Channels default to two, as on most desktops."""
    m = _DDR.fullmatch(text.strip().lower())
    if not m:
        return None
    transfers, channels = int(m.group(3)), int(m.group(4) or 2)
    if channels < 1:
        raise MoerunError(f"'{text}': the channel count must be at least 1")
    return transfers * 1e6 * 8 * channels  # 8 bytes per transfer per 64-bit channel


def parse_bandwidth(text: str) -> float:
    """'90GB/s', '90GB', '90', 'ddr5-5600x2' -> bytes/s."""
    ddr = ddr_bandwidth(text)
    if ddr is not None:
        return ddr
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gb|mb|tb)?(?:/s)?\s*", text.lower())
    if not m or float(m.group(1)) <= 0:
        raise MoerunError(f"cannot read bandwidth '{text}': use e.g. 90GB/s or ddr5-5600x2")
    return float(m.group(1)) * {"mb": 1e6, "gb": 1e9, "tb": 1e12, None: 1e9}[m.group(2)]


def parse_ram(text: str | None) -> tuple[str | None, float | None]:
    """--ram: a size ('32GiB'), a memory spec ('ddr5-5600x2'), or both ('32GiB,ddr5-5600x2')
    -> (size text or None, bandwidth or None)."""
    if text is None:
        return None, None
    size = bandwidth = None
    for part in str(text).split(","):
        ddr = ddr_bandwidth(part)
        if ddr is not None:
            bandwidth = ddr
        elif size is None:
            size = part.strip()
        else:
            raise MoerunError(f"cannot read --ram '{text}': use e.g. 32GiB, ddr5-5600x2 or 32GiB,ddr5-5600x2")
    return size, bandwidth
