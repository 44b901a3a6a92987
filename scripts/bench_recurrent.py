"""Benchmark the recurrent layers' Triton kernels against their torch paths on the GPU
this runs on (one command):

    .venv/bin/python scripts/bench_recurrent.py --out bench_recurrent.json --md bench_recurrent.md

For each layer kind at a released model's shapes (batch 1) it times the prompt's recurrence
(T = 512, 2048, 8192 tokens: the torch chunked form the layers run today against the
one-launch Triton kernels, which are written but not yet called) and the decode step (the
torch step against the kernel the layers call on CUDA). Medians of CUDA-event timings; the
state's bytes read + written per decode step over the time is the step's bandwidth, the
figure to hold against the card's. The outputs of each pair are compared too (relative
error), so a fast wrong kernel shows. Decides whether the prompt kernels get wired in.
`--smoke` runs tiny shapes and T (under TRITON_INTERPRET=1 on the CPU, to check the script).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from moerun.kernels.recurrent import (
    gated_delta_chunked,
    gated_delta_sequence,
    gated_delta_step,
    mamba2_scan,
    mamba2_step,
    mamba_scan,
    mamba_step,
)
from moerun.recurrent import gated_deltanet as gdn
from moerun.recurrent.mamba import MambaMixer, selective_scan_step
from moerun.recurrent.mamba2 import Mamba2Mixer, selective_state_step

# (heads, key heads, key dim, value dim): Qwen3.5-35B-A3B / Qwen3-Next-80B-A3B's GatedDeltaNet.
GDN = (32, 16, 128, 128)
# (heads, head dim, groups, state size): Granite 4.0-H Small's Mamba-2 (inner 8192).
MAMBA2 = (128, 64, 1, 128)
# (channels, state size): Jamba-Mini's Mamba (hidden 4096, expand 2).
MAMBA = (8192, 16)


def timed(fn, device: torch.device, iters: int, warmup: int = 2) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def gdn_cases(T: int, dev, shapes):
    H, Hk, Dk, Dv = shapes
    g = torch.Generator(device=dev).manual_seed(T)
    q = gdn.l2norm(torch.randn(1, Hk, T, Dk, device=dev, generator=g))
    k = gdn.l2norm(torch.randn(1, Hk, T, Dk, device=dev, generator=g))
    v = torch.randn(1, H, T, Dv, device=dev, generator=g)
    gate = -torch.rand(1, H, T, device=dev, generator=g) * 0.1
    beta = torch.rand(1, H, T, device=dev, generator=g)
    r = H // Hk
    qr, kr = q.repeat_interleave(r, 1), k.repeat_interleave(r, 1)
    S0 = torch.zeros(1, H, Dk, Dv, device=dev)
    return {
        "torch chunked (64)": lambda: gdn.chunk_gated_delta_rule(qr, kr, v, gate, beta, None, chunk=64)[0],
        "triton token-by-token": lambda: gated_delta_sequence(q, k, v, gate, beta, S0.clone())[0],
        "triton chunked (16)": lambda: gated_delta_chunked(q, k, v, gate, beta, S0.clone(), chunk=16)[0],
    }


def mamba2_cases(T: int, dev, shapes):
    H, P, G, N = shapes
    mixer = Mamba2Mixer(
        64, n_heads=H, head_dim=P, n_groups=G, state_size=N, conv_kernel=4, chunk_size=256, eps=1e-6
    ).to(dev)
    g = torch.Generator(device=dev).manual_seed(T)
    xs = torch.randn(1, T, H, P, device=dev, generator=g)
    dt = torch.rand(1, T, H, device=dev, generator=g) * 0.1
    b = torch.randn(1, T, G, N, device=dev, generator=g)
    c = torch.randn(1, T, G, N, device=dev, generator=g)
    with torch.no_grad():
        mixer.A_log.fill_(0.0)
        mixer.D.fill_(1.0)
    A = -torch.exp(mixer.A_log.float()).detach()
    D = mixer.D.detach()
    h0 = torch.zeros(1, H, P, N, device=dev)
    return {
        "torch chunked SSD (256)": lambda: mixer.ssd(xs, dt, b, c, None)[0],
        "triton scan": lambda: mamba2_scan(xs, dt, A, b, c, D, h0.clone())[0],
    }


def mamba_cases(T: int, dev, shapes):
    I, N = shapes
    mixer = MambaMixer(64, I, N, conv_kernel=4, dt_rank=8).to(dev)
    g = torch.Generator(device=dev).manual_seed(T)
    u = torch.randn(1, I, T, device=dev, generator=g)
    dt = torch.rand(1, I, T, device=dev, generator=g) * 0.1
    b = torch.randn(1, T, N, device=dev, generator=g)
    c = torch.randn(1, T, N, device=dev, generator=g)
    ones = torch.full((1, I, T), 20.0, device=dev)  # silu(20) = 20 to float32 rounding: compare y * 20
    A = -torch.rand(I, N, device=dev, generator=g)
    with torch.no_grad():
        mixer.D.fill_(1.0)
    D = mixer.D.detach()
    state = mixer.make_state(1, T, torch.float32, dev)
    h0 = torch.zeros(1, I, N, device=dev)
    return {
        "torch chunked scan (128)": lambda: mixer._scan(u, dt, A, b, c, ones, h0.clone(), state) / 20,
        "triton scan": lambda: mamba_scan(u, dt, A, b, c, D, h0.clone())[0],
    }


def step_cases(dev, gdn_shapes, m2_shapes, m_shapes):
    g = torch.Generator(device=dev).manual_seed(0)
    H, Hk, Dk, Dv = gdn_shapes
    q = gdn.l2norm(torch.randn(1, Hk, Dk, device=dev, generator=g))
    k = gdn.l2norm(torch.randn(1, Hk, Dk, device=dev, generator=g))
    v = torch.randn(1, H, Dv, device=dev, generator=g)
    gate = -torch.rand(1, H, device=dev, generator=g)
    beta = torch.rand(1, H, device=dev, generator=g)
    S = torch.randn(1, H, Dk, Dv, device=dev, generator=g) * 0.1
    r = H // Hk
    Hm, P, G, N = m2_shapes
    xs = torch.randn(1, Hm, P, device=dev, generator=g)
    dt2 = torch.rand(1, Hm, device=dev, generator=g) * 0.1
    A2 = -torch.rand(Hm, device=dev, generator=g)
    b2 = torch.randn(1, G, N, device=dev, generator=g)
    c2 = torch.randn(1, G, N, device=dev, generator=g)
    D2 = torch.ones(Hm, device=dev)
    h2 = torch.randn(1, Hm, P, N, device=dev, generator=g) * 0.1
    I, N1 = m_shapes
    x1 = torch.randn(1, I, device=dev, generator=g)
    dt1 = torch.rand(1, I, device=dev, generator=g) * 0.1
    A1 = -torch.rand(I, N1, device=dev, generator=g)
    b1 = torch.randn(1, N1, device=dev, generator=g)
    c1 = torch.randn(1, N1, device=dev, generator=g)
    D1 = torch.ones(I, device=dev)
    h1 = torch.randn(1, I, N1, device=dev, generator=g) * 0.1
    return {
        "gated deltanet": (
            S.numel() * 4 * 2,
            {
                "torch": lambda: gdn.recurrent_gated_delta_step(
                    q.repeat_interleave(r, 1), k.repeat_interleave(r, 1), v, gate, beta, S
                )[0],
                "triton": lambda: gated_delta_step(q, k, v, gate, beta, S.clone())[0],
            },
        ),
        "mamba-2": (
            h2.numel() * 4 * 2,
            {
                "torch": lambda: selective_state_step(xs, dt2, A2, b2, c2, D2, h2, None)[0],
                "triton": lambda: mamba2_step(xs, dt2, A2, b2, c2, D2, h2.clone())[0],
            },
        ),
        "mamba": (
            h1.numel() * 4 * 2,
            {
                "torch": lambda: selective_scan_step(x1, dt1, A1, b1, c1, D1, h1, None)[0],
                "triton": lambda: mamba_step(x1, dt1, A1, b1, c1, D1, h1.clone())[0],
            },
        ),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the results as JSON")
    ap.add_argument("--md", help="write the markdown table")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (checks the script, also on the CPU)")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda" and not args.smoke:
        print("bench_recurrent: needs CUDA (or --smoke)", file=sys.stderr)
        return 1
    shapes = ((4, 2, 16, 16), (4, 8, 1, 16), (32, 8)) if args.smoke else (GDN, MAMBA2, MAMBA)
    lengths = (16, 48) if args.smoke else (512, 2048, 8192)
    iters = 2 if args.smoke else 10
    rows, lines = [], ["| layer (shapes) | what | T | time | vs torch | rel. err. |", "|---|---|---|---|---|---|"]
    with torch.no_grad():
        for name, cases, shp in (
            ("gated deltanet", gdn_cases, shapes[0]),
            ("mamba-2", mamba2_cases, shapes[1]),
            ("mamba", mamba_cases, shapes[2]),
        ):
            for T in lengths:
                fns = cases(T, dev, shp)
                ref_name, ref_fn = next(iter(fns.items()))
                ref_out, ref_t = ref_fn(), timed(ref_fn, dev, iters)
                for what, fn in fns.items():
                    t = ref_t if what == ref_name else timed(fn, dev, iters)
                    err = 0.0 if what == ref_name else rel_err(fn(), ref_out)
                    rows.append(
                        {
                            "layer": name,
                            "shapes": shp,
                            "what": what,
                            "T": T,
                            "s": t,
                            "speedup": ref_t / t,
                            "rel_err": err,
                        }
                    )
                    lines.append(f"| {name} {shp} | {what} | {T} | {t * 1e3:.2f} ms | {ref_t / t:.2f}x | {err:.1e} |")
        for name, (state_bytes, fns) in step_cases(dev, *shapes).items():
            ref = fns["torch"]()
            t_ref = timed(fns["torch"], dev, iters * 5)
            for what, fn in fns.items():
                t = t_ref if what == "torch" else timed(fn, dev, iters * 5)
                err = 0.0 if what == "torch" else rel_err(fn(), ref)
                rows.append(
                    {
                        "layer": name,
                        "what": f"decode step, {what}",
                        "T": 1,
                        "s": t,
                        "speedup": t_ref / t,
                        "rel_err": err,
                        "state_GBps": state_bytes / t / 1e9,
                    }
                )
                lines.append(
                    f"| {name} | decode step, {what} ({state_bytes / t / 1e9:.0f} GB/s of state) | 1 | "
                    f"{t * 1e6:.1f} us | {t_ref / t:.2f}x | {err:.1e} |"
                )
    device = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (interpreter)"
    md = "\n".join([f"recurrent kernels on {device}, batch 1, float32 state", "", *lines])
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device, "rows": rows}, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
