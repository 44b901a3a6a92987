"""Measure candidate tile configs of moerun's expert kernels on the GPU this runs on and
write the fastest to moerun/kernels/configs/<gpu name>.json (merged into what is there):

    .venv/bin/python scripts/tune_kernels.py                 # Mixtral and Qwen3-MoE shapes, 4 and 8 bits
    .venv/bin/python scripts/tune_kernels.py --shape 2048,1408 --bits 4 --quick

Per shape and bits: decode configs (gate_up, then down) per token count, prefill configs
per pair count, and the token count up to which decode beats prefill ("dispatch").
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch

from moerun.kernels import fused_experts
from moerun.kernels.configs import clear_cache, config_path, device_name, shape_key
from moerun.kernels.layout import slot_layout
from moerun.quant.format import ExpertFormat

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from bench_kernels import SHAPES, cuda_time, random_slots  # noqa: E402

DECODE_TOKENS = [1, 2, 4, 8, 16]
PREFILL_TOKENS = [16, 64, 256, 1024, 4096]


def decode_candidates(quick: bool):
    # BLOCK_W: words per row step (the word path, every real shape); BLOCK_P stays at 64
    # for odd sizes read in pairs. Small BLOCK_N keeps enough programs for the down
    # projection (D / BLOCK_N of them per token).
    ns, ws_, warps = ([8, 16, 32], [64, 128], [4]) if quick else ([4, 8, 16, 32, 64], [32, 64, 128, 256], [2, 4, 8])
    return [
        {"BLOCK_N": n, "BLOCK_W": w, "BLOCK_P": 64, "num_warps": nw} for n, w, nw in itertools.product(ns, ws_, warps)
    ]


def prefill_candidates(quick: bool, m: int):
    ms = [16, 32, 64, 128] if not quick else [16, 64]
    ms = [b for b in ms if b <= max(16, m)]
    grid = itertools.product(
        ms,
        [32, 64] if quick else [32, 64, 128],
        [32] if quick else [16, 32, 64],
        [4] if quick else [4, 8],
        [2] if quick else [2, 3, 4],
    )
    return [{"BLOCK_M": a, "BLOCK_N": b, "BLOCK_P": c, "num_warps": w, "num_stages": s} for a, b, c, w, s in grid]


def best(fn_of_config, candidates, iters):
    timed = []
    for c in candidates:
        try:
            timed.append((cuda_time(lambda: fn_of_config(c), iters, 2)[0], c))
        except Exception as e:  # noqa: BLE001 (out of resources for this tile: skip it)
            print(f"  skip {c}: {type(e).__name__}", file=sys.stderr)
    t, c = min(timed, key=lambda tc: tc[0])
    return t, c


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", nargs="+", default=["mixtral", "qwen3"], help="mixtral | qwen3 | D,I")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="a few candidates only")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("tune_kernels.py needs a CUDA GPU", file=sys.stderr)
        return 1
    from moerun.kernels.moe_decode import moe_decode
    from moerun.kernels.moe_prefill import moe_prefill

    name = device_name("cuda")
    path = config_path(name)
    table = json.loads(path.read_text()) if path.is_file() else {}
    K, dtype = args.top_k, torch.bfloat16
    for shape, bits in itertools.product(args.shape, args.bits):
        D, I = SHAPES[shape] if shape in SHAPES else map(int, shape.split(","))
        fmt = ExpertFormat(bits, D, I, dtype)
        layout, key = slot_layout(fmt), shape_key(D, I, bits)
        slots = random_slots(fmt, args.slots)
        print(f"{name} {key}", file=sys.stderr)
        decode_times = {}
        for n in DECODE_TOKENS:
            x = torch.randn(n, D, device="cuda", dtype=dtype)
            ids = torch.stack([torch.randperm(args.slots, device="cuda")[:K] for _ in range(n)])
            w = torch.softmax(torch.randn(n, K, device="cuda"), -1)
            default = decode_candidates(True)[0]
            _, gu = best(
                lambda c: moe_decode(x, ids, w, slots, layout, {"gate_up": c, "down": default}),
                decode_candidates(args.quick),
                args.iters,
            )
            t, dn = best(
                lambda c: moe_decode(x, ids, w, slots, layout, {"gate_up": gu, "down": c}),
                decode_candidates(args.quick),
                args.iters,
            )
            decode_times[n] = t
            table.setdefault("decode", {}).setdefault(key, {})[str(n)] = {"gate_up": gu, "down": dn}
            print(f"  decode N={n}: {t * 1e6:.0f} us {gu} {dn}", file=sys.stderr)
        prefill_times = {}
        for n in sorted(set(DECODE_TOKENS + PREFILL_TOKENS)):
            x = torch.randn(n, D, device="cuda", dtype=dtype)
            ids = torch.stack([torch.randperm(args.slots, device="cuda")[:K] for _ in range(n)])
            w = torch.softmax(torch.randn(n, K, device="cuda"), -1)
            t, c = best(
                lambda c: moe_prefill(x, ids, w, slots, layout, c),
                prefill_candidates(args.quick, n * K),
                max(args.iters // 4, 3),
            )
            prefill_times[n] = t
            table.setdefault("prefill", {}).setdefault(key, {})[str(n * K)] = c
            print(f"  prefill N={n}: {t * 1e3:.2f} ms {c}", file=sys.stderr)
        faster = [n for n in DECODE_TOKENS if decode_times[n] <= prefill_times[n]]
        table.setdefault("dispatch", {}).setdefault(key, {})["1"] = {"decode_max_tokens": max(faster, default=0)}
        slots = None  # freed before the next shape allocates (lambdas above still name it)
        torch.cuda.empty_cache()
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    clear_cache()
    # A sanity run through the public entry point with the new file.
    fmt = ExpertFormat(args.bits[0], 64, 64, dtype)
    fused_experts(
        torch.randn(1, 64, device="cuda", dtype=dtype),
        torch.zeros(1, 1, dtype=torch.long, device="cuda"),
        torch.ones(1, 1, device="cuda"),
        random_slots(fmt, 1),
        fmt,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
