"""Compile moerun's Triton kernels for real GPU architectures on a machine without a GPU,
and report what the interpreter cannot: that they compile, their registers, spills and
shared memory, and the machine code's global loads (how wide the weight reads are).

    python scripts/inspect_kernels.py                    # sm_90 sm_89 sm_86 sm_80, markdown
    python scripts/inspect_kernels.py --arch 90 --json out.json --only decode

How: each launcher (decode, prefill, routing) is called on CPU tensors of the real shapes
with its kernels swapped for recorders; every recorded launch is then compiled through
Triton's own JIT path (`warmup`, the same specialisation a launch gets) against a stand-in
driver that names the target architecture; cuobjdump (shipped with Triton) reads the cubin.
Needs TRITON_INTERPRET unset (the interpreter has no compiler) and triton's NVIDIA backend.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("inspect_kernels.py compiles for real GPUs: run it without TRITON_INTERPRET")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moerun.kernels import moe_decode, moe_prefill, routing  # noqa: E402
from moerun.kernels.configs import get_config, shape_key  # noqa: E402
from moerun.kernels.layout import slot_layout  # noqa: E402
from moerun.quant.format import ExpertFormat  # noqa: E402

# Consumer and datacenter GPUs people run moerun on: Hopper (H100/H200), Ada (RTX 40),
# Ampere (RTX 30, A100).
ARCHS = {90: "H100/H200", 89: "RTX 40xx", 86: "RTX 30xx", 80: "A100"}
# The most shared memory one block may use (CUDA's sharedMemPerBlockOptin): a kernel over
# it compiles fine and then fails at launch with "out of resource: shared memory".
MAX_SHARED = {90: 232448, 89: 101376, 86: 101376, 80: 166912}
KERNEL_MODULES = (moe_decode, moe_prefill, routing)


class ClampedSwiGLU:
    kind, alpha, limit = "swiglu_clamped", 1.702, 7.0


@dataclasses.dataclass(frozen=True)
class Case:
    op: str  # decode | prefill | routing
    name: str
    D: int = 0
    I: int = 0
    bits: int = 4
    dtype: torch.dtype = torch.bfloat16
    tokens: int = 1
    top_k: int = 2
    bias: bool = False
    weights_on_input: bool = False
    routing: dict | None = None

    @property
    def label(self) -> str:
        if self.op == "routing":
            return self.name
        dt = str(self.dtype).removeprefix("torch.")
        return f"{self.name} {self.D}x{self.I} {self.bits}-bit {dt} N={self.tokens}"


def default_cases() -> list[Case]:
    cases = []
    for name, D, I in (("mixtral", 4096, 14336), ("qwen3", 2048, 768), ("odd", 100, 36)):
        for bits in (4, 8, 16):
            for tokens in (1, 8):
                cases.append(Case("decode", name, D, I, bits, tokens=tokens))
            cases.append(Case("prefill", name, D, I, bits, tokens=512 if name != "odd" else 40))
    for dtype in (torch.float16, torch.float32):
        for bits in (4, 16):  # 16 bits in a float32 model: 32-bit values on the word path
            cases.append(Case("decode", "mixtral", 4096, 14336, bits, dtype))
            cases.append(Case("prefill", "mixtral", 4096, 14336, bits, dtype, tokens=512))
    cases.append(Case("decode", "gpt-oss", 2880, 2880, 4, top_k=4, bias=True))
    cases.append(Case("prefill", "gpt-oss", 2880, 2880, 4, tokens=512, top_k=4, bias=True))
    cases.append(Case("decode", "llama4", 5120, 8192, 4, top_k=1, weights_on_input=True))
    cases.append(Case("routing", "mixtral E=8 k=2", routing=dict(E=8, k=2)))
    cases.append(Case("routing", "qwen3 E=128 k=8", routing=dict(E=128, k=8, renormalize=True)))
    cases.append(
        Case(
            "routing",
            "deepseek-v3 E=256 k=8 sigmoid groups",
            routing=dict(E=256, k=8, scoring="sigmoid", bias=True, n_group=8, topk_group=4, scaling=2.5),
        )
    )
    return cases


@dataclasses.dataclass
class Launch:
    kernel: object  # the JITFunction
    grid: tuple
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def recording():
    """Swap every @triton.jit kernel of the kernel modules for a recorder of its launches."""
    launches: list[Launch] = []
    saved = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(Launch(self.fn, grid, args, kwargs))

    for module in KERNEL_MODULES:
        for name, value in list(vars(module).items()):
            if isinstance(value, triton.runtime.jit.JITFunction):
                saved.append((module, name, value))
                setattr(module, name, Recorder(value))
    try:
        yield launches
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def record(case: Case) -> list[Launch]:
    gen = torch.Generator().manual_seed(0)
    with recording() as launches:
        if case.op == "routing":
            r = dict(case.routing)
            E, k = r.pop("E"), r.pop("k")
            if r.pop("bias", False):
                r["bias"] = torch.zeros(E)
            routing.route(torch.randn(1, E, generator=gen), k, **r)
            return launches
        fmt = ExpertFormat(case.bits, case.D, case.I, case.dtype, bias=case.bias)
        layout = slot_layout(fmt)
        slots = torch.empty((4, fmt.blob_bytes), dtype=torch.uint8)  # never touched: no launch runs
        x = torch.zeros(case.tokens, case.D, dtype=case.dtype)
        ids = torch.randint(0, 4, (case.tokens, case.top_k), generator=gen, dtype=torch.int32)
        weights = torch.rand(case.tokens, case.top_k, generator=gen)
        act = ClampedSwiGLU() if case.bias else None
        key = shape_key(case.D, case.I, case.bits)
        if case.op == "decode":
            config = get_config("decode", key, case.tokens, "cpu")
            moe_decode.moe_decode(x, ids, weights, slots, layout, config, act, case.weights_on_input)
        else:
            config = get_config("prefill", key, case.tokens * case.top_k, "cpu")
            moe_prefill.moe_prefill(x, ids, weights, slots, layout, config, act, case.weights_on_input)
    return launches


class TargetDriver:
    """Stands in for the CUDA driver: Triton asks it only which architecture to build for
    (a distinct 'device' per architecture keeps Triton's per-device caches apart)."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


def cuobjdump(*args: str) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return subprocess.run([str(tool), *args], capture_output=True, text=True, check=True).stdout


def inspect_launch(launch: Launch, arch: int) -> dict:
    driver.set_active(TargetDriver(arch))  # not reset after: with no GPU there is nothing to go back to
    compiled = launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = cuobjdump("-res-usage", str(cubin))
        sass = cuobjdump("-sass", str(cubin))
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    loads = collections.Counter(re.findall(r"\bLDG\.E(?:\.(?:128|64|U8|S8|U16|S16))?", sass))
    instructions = len(re.findall(r"^\s+/\*[0-9a-f]{4}\*/", sass, flags=re.M))
    problems = []
    if compiled.metadata.shared > MAX_SHARED.get(arch, 49152):
        problems.append(
            f"needs {compiled.metadata.shared} B of shared memory, sm_{arch} has {MAX_SHARED.get(arch, 49152)}"
        )
    return {
        "problems": problems,
        "kernel": launch.kernel.__name__,
        "arch": f"sm_{arch}",
        "registers": int(fields.get("REG", 0)),
        "spill_bytes": int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0)),
        "shared_bytes": int(compiled.metadata.shared),
        "num_warps": launch.kwargs.get("num_warps", 4),
        "loads": {k.removeprefix("LDG.E").lstrip(".") or "32": v for k, v in sorted(loads.items())},
        "sass_instructions": instructions,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="SM versions, e.g. 90 86")
    ap.add_argument("--only", nargs="+", choices=["decode", "prefill", "routing"], help="ops to compile")
    ap.add_argument("--match", nargs="+", help="only cases whose label contains one of these")
    ap.add_argument("--json", help="write the rows as JSON here")
    args = ap.parse_args()
    rows, failures = [], 0
    for case in default_cases():
        if (args.only and case.op not in args.only) or (args.match and not any(m in case.label for m in args.match)):
            continue
        for launch in record(case):
            for arch in args.arch:
                if case.dtype == torch.bfloat16 and arch < 80:
                    continue
                try:
                    row = inspect_launch(launch, arch)
                    if row["problems"]:
                        row["error"] = "; ".join(row["problems"])
                except Exception as e:  # noqa: BLE001 (report every failure, then fail)
                    row = {"kernel": launch.kernel.__name__, "arch": f"sm_{arch}", "error": f"{type(e).__name__}: {e}"}
                failures += "error" in row
                rows.append({"op": case.op, "case": case.label, **row})
    print("| op | case | kernel | arch | regs | spills | smem | warps | global loads (width: count) | SASS |")
    print("|---|---|---|---|---:|---:|---:|---:|---|---:|")
    for r in rows:
        if "error" in r:
            print(
                f"| {r['op']} | {r['case']} | {r['kernel']} | {r['arch']} | FAILED: {r['error'].splitlines()[0]} |||||"
            )
            continue
        loads = " ".join(f"{k}:{v}" for k, v in r["loads"].items())
        print(
            f"| {r['op']} | {r['case']} | {r['kernel']} | {r['arch']} | {r['registers']} | {r['spill_bytes']} | "
            f"{r['shared_bytes']} | {r['num_warps']} | {loads} | {r['sass_instructions']} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if failures:
        print(f"{failures} kernel(s) failed to compile or would not launch", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
