"""The kernels compiled for a real GPU, on this machine without one.

The interpreter runs the kernels' arithmetic but not their compilation: a kernel it runs
happily may still fail to compile, spill registers, or need more shared memory than a
consumer card has (and fail at launch). scripts/inspect_kernels.py compiles every launch
for a target architecture with Triton's own compiler and ptxas; this runs it for sm_86
(RTX 30xx: the smallest shared memory moerun targets) on the Mixtral shapes, odd sizes
(the pair path) and the routing kernel, in a subprocess without TRITON_INTERPRET. The
full set (fp16/fp32 models, gpt-oss, Llama 4, four architectures) is the script's own run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _has_nvidia_backend() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").is_file()


# A compile sweep (~30 s): the slow tier (`make test-all`).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _has_nvidia_backend(), reason="needs triton's NVIDIA backend (ptxas, cuobjdump)"),
]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))  # a real compile, not a cache hit
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "inspect_kernels.py"),
            "--arch",
            "86",
            # bf16 Mixtral at every bits, odd sizes (the pair path) at 4 bits, routing: the
            # rest of scripts/inspect_kernels.py's cases are left out to keep CI short.
            "--match",
            "mixtral 4096x14336 4-bit bfloat16",
            "mixtral 4096x14336 8-bit bfloat16",
            "mixtral 4096x14336 16-bit bfloat16",
            "odd 100x36 4-bit",
            "E=",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_launch_compiles_and_fits_an_rtx_30(rows):
    assert {r["op"] for r in rows} == {"decode", "prefill", "routing"}
    assert len(rows) >= 25
    assert not [r for r in rows if "error" in r]
    for r in rows:
        assert r["shared_bytes"] <= 101376, r


def test_decode_kernels_do_not_spill(rows):
    spills = [(r["case"], r["kernel"], r["spill_bytes"]) for r in rows if r["op"] == "decode" and r["spill_bytes"]]
    assert not spills


def test_decode_weights_are_read_in_128_bit_words(rows):
    """Rows of whole words (every real model's) are read 16 bytes at a time: no byte or
    half-word loads of weights (the pair path's, kept for odd sizes only)."""
    for r in rows:
        if r["op"] != "decode" or not r["case"].startswith("mixtral"):
            continue
        assert r["loads"].get("128", 0) >= 1, r
        assert "U8" not in r["loads"] and "S8" not in r["loads"], r
    odd = [r for r in rows if r["op"] == "decode" and r["case"].startswith("odd") and "4-bit" in r["case"]]
    assert odd and all("U8" in r["loads"] for r in odd)  # the pair path, still there for odd sizes
