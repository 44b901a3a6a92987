"""Tile sizes as data: moerun/kernels/configs/<gpu name>.json, written by
scripts/tune_kernels.py, with configs/default.json as the fallback (logged once).

Layout of a file: {op: {shape key: {batch size: config}}}, shape key as `shape_key()`
("D=4096,I=14336,bits=4") or "default"; the entry for the nearest batch size wins
(vLLM's fused_moe configs do the same).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from pathlib import Path

import torch

log = logging.getLogger("moerun.kernels")

CONFIG_DIR = Path(__file__).parent / "configs"
_warned: set[tuple] = set()


def shape_key(hidden_size: int, intermediate_size: int, bits: int) -> str:
    return f"D={hidden_size},I={intermediate_size},bits={bits}"


def device_name(device: torch.device | str | None = None) -> str:
    """The GPU's name as a file stem ("NVIDIA_H200"); "cpu" off CUDA (the interpreter)."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda":
        return "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name(device)).strip("_")


def config_path(name: str) -> Path:
    return CONFIG_DIR / f"{name}.json"


@functools.lru_cache(maxsize=None)
def _load(name: str) -> dict:
    path = config_path(name)
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def _nearest(table: dict, m: int) -> dict:
    sizes = [int(b) for b in table]
    best = min(sizes, key=lambda b: (abs(b - m), b))
    return table[str(best)]


def get_config(op: str, key: str, m: int, device: torch.device | str | None = None) -> dict:
    """Tile config of `op` ("decode", "prefill", "routing", "dispatch") for shape `key` and
    batch size `m` (tokens) on `device`: the device's tuned file, else the defaults."""
    name = device_name(device)
    table = _load(name).get(op, {}).get(key)
    if table:
        return _nearest(table, m)
    if (name, op, key) not in _warned:
        _warned.add((name, op, key))
        log.info("no tuned %s config for %s on %s; using defaults (run scripts/tune_kernels.py)", op, key, name)
    defaults = _load("default")[op]
    return _nearest(defaults.get(key) or defaults["default"], m)


def clear_cache() -> None:
    """Forget loaded files (after tune_kernels.py wrote one)."""
    _load.cache_clear()
    _warned.clear()
