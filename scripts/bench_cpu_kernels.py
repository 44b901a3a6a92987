"""The CPU ways to apply a quantized expert, side by side on the same expert shapes: what
moerun's C kernels were chosen against (issue 12).

Per backend, the time of one MoE layer's experts as a decode step or a prompt meets them:
the model's experts-per-token K experts (gate+up, SwiGLU, down), each applied to N
tokens, every call on K experts not used before from a store far larger than the caches
(so the weights come from RAM, as at decode), and the weight bytes per second it reads:

  - moerun-c: moerun.kernels.cpu_experts.moe_experts on NF4 / int8 / bf16 blobs;
  - dequant+mm: the blob dequantized to bf16, then two matmuls (moerun's path before);
  - torch-int8pack: torch.ops.aten._weight_int8pack_mm (int8 per-row, bf16 activations);
  - torch-int4pack: _weight_int4pack_mm_for_cpu (asymmetric int4, group 64, bf16);
  - bnb-nf4: bitsandbytes.matmul_4bit on the CPU (NF4, block 64, as moerun's bytes);
  - torch-bf16: F.linear on bf16 weights (16 bits).

    python scripts/bench_cpu_kernels.py --shape mixtral --tokens 1,8,64 --threads 2
    python scripts/bench_cpu_kernels.py --shape qwen3 --tokens 1,8,64

Prints one row per (bits, backend, tokens per expert): median ms per layer call, GB/s of
that format's weight bytes, and the machine's read bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from moerun.bench import read_bandwidth
from moerun.kernels import cpu_experts
from moerun.quant.format import ExpertFormat

SHAPES = {"mixtral": (4096, 14336, 2), "qwen3": (2048, 768, 8)}  # D, I, experts per token


def timed(fn, calls: int) -> float:
    """Median seconds per call over `calls` calls (fn(i): the i-th layer call)."""
    fn(0)
    times = []
    for i in range(1, calls + 1):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def swiglu_expert(x, gate_up, down):
    h = gate_up(x)
    g, u = h.chunk(2, dim=-1)
    return down(F.silu(g) * u)


def backends(bits: int, D: int, I: int, E: int, K: int):
    """(name, make(x) -> fn(i)) for each backend that exists here; fn(i) applies experts
    i*K .. i*K+K-1 (mod the store) to every row of x and sums them."""
    g = torch.Generator().manual_seed(0)
    w13 = [torch.randn(2 * I, D, generator=g).mul_(0.02).bfloat16() for _ in range(2)]
    w2 = [torch.randn(D, I, generator=g).mul_(0.02).bfloat16() for _ in range(2)]
    fmt = ExpertFormat(bits, D, I, torch.bfloat16)
    blob = [fmt.pack(w13[j], w2[j]) for j in range(2)]
    # E real, distinct copies (random weights: two distinct, then copies of them), so each
    # call reads RAM, not the caches.
    store = torch.stack([blob[e % 2] for e in range(E)]).clone()
    out = []

    def layer(expert):  # a torch backend: K experts one after another, as a Python loop does
        return lambda x: lambda i: sum(expert(x, (i * K + k) % E) for k in range(K))

    if cpu_experts.supports(fmt, torch.bfloat16):
        table = cpu_experts.blob_table(store, fmt)

        def c(x, store=store):  # the table holds raw addresses: the closure keeps the store alive
            ones = torch.ones(x.shape[0], K)
            return lambda i: cpu_experts.moe_experts(
                x, ((i * K + torch.arange(K)) % E).expand(x.shape[0], K), ones, table, fmt
            )

        out.append(("moerun-c", c))
    if bits != 16:

        def dequant(x, e):
            a, b, _, _ = fmt.unpack(store[e], torch.bfloat16)
            return swiglu_expert(x, lambda t: F.linear(t, a), lambda t: F.linear(t, b))

        out.append(("dequant+mm", layer(dequant)))
    if bits == 16:
        W = [fmt.unpack(store[e], torch.bfloat16)[:2] for e in range(E)]  # views into the store
        out.append(
            (
                "torch-bf16",
                layer(lambda x, e: swiglu_expert(x, lambda t: F.linear(t, W[e][0]), lambda t: F.linear(t, W[e][1]))),
            )
        )
    if bits == 8:

        def q8(w):
            scale = w.float().abs().amax(1).clamp_min(1e-8) / 127
            return (w.float() / scale[:, None]).round().to(torch.int8), scale.bfloat16()

        Q = [(q8(w13[e % 2]), q8(w2[e % 2])) for e in range(E)]
        mm8 = torch.ops.aten._weight_int8pack_mm
        out.append(
            (
                "torch-int8pack",
                layer(lambda x, e: swiglu_expert(x, lambda t: mm8(t, *Q[e][0]), lambda t: mm8(t, *Q[e][1]))),
            )
        )
    if bits == 4:
        group = 64

        def q4(w):
            # torch's int4pack: asymmetric 4-bit per group of 64 along K, bf16 scale and zero.
            O, Kd = w.shape
            wg = w.float().view(O, Kd // group, group)
            lo, hi = wg.amin(-1), wg.amax(-1)
            scale = ((hi - lo) / 15).clamp_min(1e-8)
            q = ((wg - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).view(O, Kd)
            zero = lo + 8 * scale
            sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().bfloat16()  # [K/g, O, 2]
            return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), sz

        try:
            Q4 = [q4(w13[0]), q4(w2[0]), q4(w13[1]), q4(w2[1])]
            Q4 = [(Q4[0], Q4[1]) if e % 2 == 0 else (Q4[2], Q4[3]) for e in range(2)]
            Q4 = [tuple((a.clone(), b.clone()) for a, b in Q4[e % 2]) for e in range(E)]
            mm4 = torch.ops.aten._weight_int4pack_mm_for_cpu
            out.append(
                (
                    "torch-int4pack",
                    layer(
                        lambda x, e: swiglu_expert(
                            x,
                            lambda t: mm4(t, Q4[e][0][0], group, Q4[e][0][1]),
                            lambda t: mm4(t, Q4[e][1][0], group, Q4[e][1][1]),
                        )
                    ),
                )
            )
        except (RuntimeError, NotImplementedError) as err:
            print(f"torch-int4pack: not available here ({str(err).splitlines()[0][:80]})")
        try:
            import bitsandbytes as bnb
            import bitsandbytes.functional as bF

            B = [
                (
                    bF.quantize_4bit(w13[e % 2], blocksize=64, quant_type="nf4"),
                    bF.quantize_4bit(w2[e % 2], blocksize=64, quant_type="nf4"),
                )
                for e in range(E)
            ]
            out.append(
                (
                    "bnb-nf4",
                    layer(
                        lambda x, e: swiglu_expert(
                            x,
                            lambda t: bnb.matmul_4bit(t, B[e][0][0].t(), B[e][0][1]),
                            lambda t: bnb.matmul_4bit(t, B[e][1][0].t(), B[e][1][1]),
                        )
                    ),
                )
            )
        except ImportError:
            print("bnb-nf4: bitsandbytes not installed")
    return fmt, out


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="mixtral")
    ap.add_argument("--bits", default="4,8,16")
    ap.add_argument("--tokens", default="1,8,64")
    ap.add_argument("--calls", type=int, default=9)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    D, I, K = SHAPES[args.shape]
    bw = read_bandwidth(1024)
    print(
        f"shape {args.shape}: D={D} I={I}, {K} experts per call; {args.threads} threads; C kernels: {cpu_experts.isa()}; "
        f"read bandwidth {bw / 1e9:.1f} GB/s"
    )
    rows = []
    print("| bits | backend | tokens per expert | ms per layer call | weight GB/s | % of read bw |")
    print("|---:|---|---:|---:|---:|---:|")
    for bits in map(int, args.bits.split(",")):
        blob_bytes = ExpertFormat(bits, D, I, torch.bfloat16).blob_bytes
        E = max(2 * K, -(-(768 << 20) // blob_bytes))  # >= 768 MiB of distinct experts
        fmt, found = backends(bits, D, I, E, K)
        for name, make in found:
            for n in map(int, args.tokens.split(",")):
                x = torch.randn(n, D).bfloat16()
                sec = timed(make(x), args.calls)
                gb_s = K * fmt.blob_bytes / sec / 1e9
                rows.append({"bits": bits, "backend": name, "tokens": n, "seconds": sec, "gb_s": gb_s})
                print(f"| {bits} | {name} | {n} | {sec * 1e3:.2f} | {gb_s:.1f} | {gb_s * 1e9 / bw:.0%} |", flush=True)
    if args.json:
        print(json.dumps({"shape": args.shape, "read_bandwidth": bw, "rows": rows}))


if __name__ == "__main__":
    main()
