"""Benchmark moerun's Triton expert kernels on the GPU this runs on (one command):

    .venv/bin/python scripts/bench_kernels.py --out bench_kernels.json --md bench_kernels.md

Measures: the device's copy bandwidth (device-to-device, counted as bytes read + written,
i.e. DRAM traffic); the decode expert kernel (1 token, top-2) at Mixtral-8x7B shapes as
bytes of quantized weights read / time and its fraction of that bandwidth; bitsandbytes'
4-bit path (matmul_4bit, and dequantize_4bit + matmul) on the same NF4 bytes side by side;
the prefill grouped GEMM (pp512, top-2) in TFLOP/s next to a bf16 dense matmul of the
same shape. Prints a markdown table; --out writes JSON. Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F

from moerun.kernels import fused_experts, fused_experts_reference
from moerun.kernels.configs import device_name
from moerun.quant.format import ExpertFormat

SHAPES = {"mixtral": (4096, 14336), "qwen3": (2048, 768)}


def cuda_time(fn, iters: int = 50, warmup: int = 5) -> tuple[float, float]:
    """(mean, std) seconds per call, CUDA events around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    mean = sum(times) / len(times)
    return mean, math.sqrt(sum((t - mean) ** 2 for t in times) / len(times))


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes/s of a large device-to-device copy, counting the read and the write."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t, _ = cuda_time(lambda: b.copy_(a), iters=20)
    return 2 * nbytes / t


def random_slots(fmt: ExpertFormat, n_slots: int) -> torch.Tensor:
    """uint8 [S, blob]: random codes with sane positive scales (the timing does not care
    about the values; building real NF4 experts of Mixtral's size on the CPU is slow)."""
    slots = torch.randint(0, 256, (n_slots, fmt.blob_bytes), dtype=torch.uint8, device="cuda")
    for s in range(n_slots):
        for name, view in fmt.views(slots[s]).items():
            if name.endswith((".absmax", ".scale")):
                view.uniform_(0.01, 0.05)
            elif view.is_floating_point():
                view.normal_(0, 0.02)
    return slots


def weight_bytes(fmt: ExpertFormat) -> int:
    """Bytes a kernel must read for one expert: values and scales (not the alignment padding)."""
    return sum(s.nbytes for s in fmt.sections)


def bnb_expert_fns(fmt: ExpertFormat, slots: torch.Tensor):
    """bitsandbytes' 4-bit paths over the same NF4 bytes (blocksize 64, no double quant):
    (matmul_4bit fn, dequantize_4bit + matmul fn) each taking (x, slot ids, weights), or
    a reason string when bitsandbytes cannot run."""
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import QuantState, dequantize_4bit, get_4bit_type
    except Exception as e:  # noqa: BLE001 (absent or broken install: report it)
        return f"bitsandbytes unavailable: {e}"
    D, I = fmt.hidden_size, fmt.intermediate_size
    code = get_4bit_type("nf4", device="cuda")
    experts = []
    for s in range(slots.shape[0]):
        v = fmt.views(slots[s])
        mats = []
        for name, shape in (("w13", (2 * I, D)), ("w2", (D, I))):
            qs = QuantState(
                absmax=v[f"{name}.absmax"],
                shape=torch.Size(shape),
                code=code,
                blocksize=64,
                quant_type="nf4",
                dtype=torch.bfloat16,
            )
            mats.append((v[f"{name}.q"].view(-1, 1), qs))
        experts.append(mats)

    def matmul_4bit(x, ids, w):
        out = torch.zeros_like(x)
        for j, s in enumerate(ids[0].tolist()):
            (q13, s13), (q2, s2) = experts[s]
            g, u = bnb.matmul_4bit(x, q13.t(), quant_state=s13).chunk(2, dim=-1)
            out += w[0, j] * bnb.matmul_4bit(F.silu(g) * u, q2.t(), quant_state=s2)
        return out

    def dequant_matmul(x, ids, w):
        out = torch.zeros_like(x)
        for j, s in enumerate(ids[0].tolist()):
            (q13, s13), (q2, s2) = experts[s]
            g, u = F.linear(x, dequantize_4bit(q13, s13)).chunk(2, dim=-1)
            out += w[0, j] * F.linear(F.silu(g) * u, dequantize_4bit(q2, s2))
        return out

    return matmul_4bit, dequant_matmul


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="mixtral", help="mixtral | qwen3 | D,I")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512, help="prefill tokens (ppN)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--md", help="write the markdown table here too")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU", file=sys.stderr)
        return 1
    D, I = SHAPES[args.shape] if args.shape in SHAPES else map(int, args.shape.split(","))
    dtype, K = torch.bfloat16, args.top_k
    gpu = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    rows, results = (
        [],
        {
            "device": gpu,
            "config_file": device_name("cuda"),
            "copy_bandwidth_GBps": bw / 1e9,
            "shape": {"D": D, "I": I, "slots": args.slots, "top_k": K},
            "runs": [],
        },
    )
    rows.append(("device copy (D2D, read+write)", "-", f"{bw / 1e9:.0f} GB/s", "", ""))
    gen = torch.Generator(device="cuda").manual_seed(0)

    for bits in args.bits:
        fmt = ExpertFormat(bits, D, I, dtype)
        slots = random_slots(fmt, args.slots)
        x = torch.randn(1, D, device="cuda", dtype=dtype, generator=gen)
        ids = torch.randperm(args.slots, device="cuda", generator=gen)[:K].view(1, K)
        w = torch.softmax(torch.randn(1, K, device="cuda", generator=gen), -1)

        # Decode: weights read once per routed expert.
        out = fused_experts(x, ids, w, slots, fmt, dtype, mode="decode")
        ref = fused_experts_reference(x.float(), ids, w, slots, fmt, torch.float32)
        err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
        t, sd = cuda_time(lambda: fused_experts(x, ids, w, slots, fmt, dtype, mode="decode"), args.iters)
        nbytes = K * weight_bytes(fmt)
        run = {
            "op": "decode",
            "bits": bits,
            "tokens": 1,
            "seconds": t,
            "std": sd,
            "bytes": nbytes,
            "GBps": nbytes / t / 1e9,
            "fraction_of_copy_bw": nbytes / t / bw,
            "max_rel_err": err,
        }
        results["runs"].append(run)
        rows.append(
            (
                f"decode tg1 {fmt.name} (moerun)",
                f"{t * 1e6:.0f} ± {sd * 1e6:.0f} us",
                f"{run['GBps']:.0f} GB/s",
                f"{100 * run['fraction_of_copy_bw']:.0f}% of copy bw",
                f"rel err {err:.1e}",
            )
        )

        if bits == 4:
            fns = bnb_expert_fns(fmt, slots)
            if isinstance(fns, str):
                rows.append(("bitsandbytes 4-bit", "-", "-", fns, ""))
                results["bitsandbytes"] = fns
            else:
                for label, fn in zip(("matmul_4bit", "dequantize_4bit + matmul"), fns):
                    try:
                        b_out = fn(x, ids, w)
                        b_err = ((b_out.float() - ref).abs().max() / ref.abs().max()).item()
                        bt, bsd = cuda_time(lambda: fn(x, ids, w), args.iters)
                    except Exception as e:  # noqa: BLE001
                        rows.append((f"bitsandbytes {label}", "-", "-", f"failed: {e}", ""))
                        continue
                    results["runs"].append(
                        {
                            "op": f"bnb {label}",
                            "bits": 4,
                            "tokens": 1,
                            "seconds": bt,
                            "std": bsd,
                            "GBps": nbytes / bt / 1e9,
                            "max_rel_err": b_err,
                            "moerun_speedup": bt / t,
                        }
                    )
                    rows.append(
                        (
                            f"decode tg1 bnb {label}",
                            f"{bt * 1e6:.0f} ± {bsd * 1e6:.0f} us",
                            f"{nbytes / bt / 1e9:.0f} GB/s",
                            f"moerun {bt / t:.2f}x faster",
                            f"rel err {b_err:.1e}",
                        )
                    )

        # Prefill: ppN tokens, top-K, grouped GEMM vs a dense bf16 matmul of the same shape.
        N = args.prompt
        xp = torch.randn(N, D, device="cuda", dtype=dtype, generator=gen)
        idp = torch.stack([torch.randperm(args.slots, device="cuda", generator=gen)[:K] for _ in range(N)])
        wp = torch.softmax(torch.randn(N, K, device="cuda", generator=gen), -1)
        t, sd = cuda_time(
            lambda: fused_experts(xp, idp, wp, slots, fmt, dtype, mode="prefill"), max(args.iters // 5, 5)
        )
        flops = 2 * N * K * 3 * I * D
        w13 = torch.randn(2 * I, D, device="cuda", dtype=dtype, generator=gen)
        w2 = torch.randn(D, I, device="cuda", dtype=dtype, generator=gen)
        xd = torch.randn(N * K, D, device="cuda", dtype=dtype, generator=gen)
        hd = torch.randn(N * K, I, device="cuda", dtype=dtype, generator=gen)
        dt, dsd = cuda_time(lambda: (xd @ w13.t(), hd @ w2.t()), max(args.iters // 5, 5))
        results["runs"].append(
            {
                "op": "prefill",
                "bits": bits,
                "tokens": N,
                "seconds": t,
                "std": sd,
                "TFLOPs": flops / t / 1e12,
                "dense_bf16_TFLOPs": flops / dt / 1e12,
            }
        )
        rows.append(
            (
                f"prefill pp{N} {fmt.name} (moerun grouped GEMM)",
                f"{t * 1e3:.2f} ± {sd * 1e3:.2f} ms",
                f"{flops / t / 1e12:.1f} TFLOP/s",
                f"{100 * dt / t:.0f}% of dense bf16",
                "",
            )
        )
        rows.append(
            (
                f"prefill pp{N} dense bf16 matmul, same shape",
                f"{dt * 1e3:.2f} ± {dsd * 1e3:.2f} ms",
                f"{flops / dt / 1e12:.1f} TFLOP/s",
                "",
                "",
            )
        )
        slots = None  # freed before the next shape allocates (lambdas above still name it)
        torch.cuda.empty_cache()

    md = [
        f"GPU: {gpu}; experts D={D}, I={I}, {args.slots} slots, top-{K}, bf16 activations",
        "",
        "| test | time | throughput | vs | check |",
        "|---|---|---|---|---|",
    ]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(md)
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
