"""The same model and budget through moerun and through what users run instead, side by
side in one run, with the ratio per test.

Baselines:
  - transformers + accelerate's device_map offloading with a max_memory cap (bf16; and
    4-bit through bitsandbytes where it supports the device);
  - llama.cpp's llama-bench, when `llama-bench` is on PATH and LLAMA_CPP_DIR points at a
    llama.cpp checkout whose convert_hf_to_gguf.py converts the checkpoint (its own tools).

The model is a real checkpoint on disk: ALIAS's shipped config cut to --layers layers,
random weights saved by transformers, so every runner loads the same files.

    python scripts/compare_baselines.py --alias mixtral-8x7b --layers 2 --vram 12GiB --bits 4
    (pip install accelerate first: it is a baseline, not a moerun dependency)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import torch

from moerun import bench, plan
from moerun.registry import DEMO_DIR, shipped_config


def write_checkpoint(alias: str, layers: int, folder: Path) -> Path:
    """ALIAS's config with `layers` layers, random weights, saved by transformers (bf16)."""
    if (folder / "config.json").exists():
        return folder
    import transformers

    config = dict(shipped_config(alias))
    config.pop("quantization_config", None)
    text = config.get("text_config", config)
    text["num_hidden_layers"] = layers
    for key in ("layer_types", "no_rope_layers", "moe_layers", "mlp_only_layers"):
        if isinstance(text.get(key), list) and len(text[key]) > layers and key != "mlp_only_layers":
            text[key] = text[key][:layers]
    model_type = config.pop("model_type")
    cfg = transformers.AutoConfig.for_model(model_type, **config)
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(cfg)
    # Random init in bf16 without a float32 copy of every tensor.
    model = meta.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name and p.dim() == 1 else torch.randn_like(p) * 0.02)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="2GB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_DIR / name, tmp / name)
    tmp.rename(folder)
    return folder


def bench_transformers(folder: Path, bits: int, vram: int | None, ram: int | None, p: int, n: int, reps: int) -> dict:
    """accelerate's device_map="auto" offloading with a max_memory cap; pp and tg t/s."""
    import transformers

    kwargs: dict = {"dtype": torch.bfloat16}
    if torch.cuda.is_available():
        kwargs["device_map"] = "auto"
        kwargs["max_memory"] = {0: vram or torch.cuda.mem_get_info()[0], "cpu": ram or "64GiB"}
    if bits == 4:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    device = next(model.parameters()).device if not torch.cuda.is_available() else torch.device("cuda")
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(0)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    @torch.inference_mode()
    def pp():
        ids = torch.randint(0, vocab, (1, p), generator=g).to(device)
        sync()
        t0 = time.perf_counter()
        model(ids, use_cache=False)
        sync()
        return p / (time.perf_counter() - t0)

    @torch.inference_mode()
    def tg():
        ids = torch.randint(0, vocab, (1, 1), generator=g).to(device)
        sync()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        sync()
        return n / (time.perf_counter() - t0)

    out = {}
    for name, fn, count in (("pp", pp, p), ("tg", tg, n)):
        if not count:
            continue
        fn()  # warm-up
        rates = [fn() for _ in range(reps)]
        out[f"{name}{count}"] = (statistics.mean(rates), statistics.pstdev(rates))
    return out


def bench_llama_cpp(folder: Path, bits: int, p: int, n: int, reps: int) -> dict | str:
    """llama-bench on a GGUF converted with llama.cpp's own script; a reason string if not possible."""
    exe, repo = shutil.which("llama-bench"), os.environ.get("LLAMA_CPP_DIR")
    if not exe or not repo:
        return "skipped: needs llama-bench on PATH and LLAMA_CPP_DIR (for convert_hf_to_gguf.py)"
    outtype = {16: "bf16", 8: "q8_0", 4: "q4_0"}[bits]  # q4_0: llama.cpp's nearest 4-bit type
    gguf = folder / f"model-{outtype}.gguf"
    if not gguf.exists():
        subprocess.run(["python", f"{repo}/convert_hf_to_gguf.py", str(folder), "--outtype",
                        "bf16" if bits == 16 else "q8_0" if bits == 8 else "bf16", "--outfile", str(gguf)], check=True)  # fmt: skip
        if bits == 4:
            quantize = shutil.which("llama-quantize")
            if not quantize:
                return "skipped: 4-bit needs llama-quantize on PATH"
            q4 = folder / "model-q4_0.q.gguf"
            subprocess.run([quantize, str(gguf), str(q4), "Q4_0"], check=True)
            gguf = q4
    res = subprocess.run([exe, "-m", str(gguf), "-p", str(p), "-n", str(n), "-r", str(reps), "-o", "json"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return {f"{'pp' if r['n_prompt'] else 'tg'}{r['n_prompt'] or r['n_gen']}": (r["avg_ts"], r["stddev_ts"])
            for r in json.loads(res.stdout)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alias", default="mixtral-8x7b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--bits", default="16,4")
    ap.add_argument("--vram", default=None, help="device budget for every runner, e.g. 12GiB")
    ap.add_argument("--ram", default=None)
    ap.add_argument("-p", type=int, default=128)
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/moerun-compare")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()

    folder = write_checkpoint(args.alias, args.layers, Path(args.workdir) / f"{args.alias}-{args.layers}l")
    vram, ram = plan.parse_size(args.vram), plan.parse_size(args.ram)
    rows = []
    for bits in map(int, args.bits.split(",")):
        report = bench.run_bench(model=str(folder), prompt_tokens=[args.p], gen_tokens=[args.n], repetitions=args.r,
                                 bits=[bits], vram=[args.vram], ram=args.ram)  # fmt: skip
        ours = {r["test"]: (r["t_s_mean"], r["t_s_std"]) for r in report["rows"]}
        try:
            hf = bench_transformers(folder, bits, vram, ram, args.p, args.n, args.r)
        except Exception as e:  # a baseline that cannot run here is reported, not fatal
            hf = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        llama = bench_llama_cpp(folder, bits, args.p, args.n, args.r) if bits in (16, 8, 4) else None
        for test, (t_s, sd) in ours.items():
            row = {"bits": bits, "test": test, "moerun": (t_s, sd)}
            for name, result in (("transformers+accelerate", hf), ("llama.cpp", llama)):
                if isinstance(result, dict) and test in result:
                    row[name] = result[test]
                    row[f"ratio vs {name}"] = t_s / result[test][0]
                else:
                    row[name] = result if isinstance(result, str) else "n/a"
            rows.append(row)
        machine = report["machine"]
    print(f"model: {args.alias} shapes, first {args.layers} layers, random weights; budget {args.vram or 'all'}")
    print(f"machine: GPU {machine['gpu'] or 'none'}; CPU {machine['cpu']}; torch {machine['torch']}\n")
    print("| bits | test | moerun t/s | transformers+accelerate t/s | ratio | llama.cpp t/s | ratio |")
    print("|---:|---|---:|---:|---:|---:|---:|")

    def fmt(v):
        return f"{v[0]:.2f} ± {v[1]:.2f}" if isinstance(v, tuple) else str(v)

    for r in rows:
        print(f"| {r['bits']} | {r['test']} | {fmt(r['moerun'])} | {fmt(r['transformers+accelerate'])} | "
              f"{r.get('ratio vs transformers+accelerate', float('nan')):.2f} | {fmt(r['llama.cpp'])} | "
              f"{r.get('ratio vs llama.cpp', float('nan')):.2f} |")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine, "args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
