"""The same checkpoint, shapes, bits and budget through moerun and through what users run
instead, side by side, in alternating rounds, with the ratio per test.

Runners (each run in its own process, so none inherits another's memory or threads):
  - moerun: `moerun.bench.run_bench` on the checkpoint folder;
  - llama.cpp: llama-bench on a GGUF made by llama.cpp's own tools: convert_hf_to_gguf.py
    to bf16, then llama-quantize with the routed experts only (ffn_*_exps) at Q4_0 / Q8_0
    and every other tensor kept bf16, as moerun keeps them (16 bits: the bf16 GGUF as is);
  - transformers: from_pretrained in bf16 (+ bitsandbytes NF4 / LLM.int8 at 4 / 8 bits,
    which quantizes what bitsandbytes can: nn.Linear layers) with accelerate's device_map
    offloading under a max_memory cap on a GPU.

The checkpoint is ALIAS's shipped config cut to --layers layers (and --vocab tokens),
random weights saved by transformers (bf16), so every runner loads the same files. The
random checkpoint carries moerun's demo tokenizer: llama.cpp's converter identifies BPE
pre-tokenizers by hashing real tokenizers' output, so for a BPE family the converter is
run with that lookup answering the family's own pre-tokenizer name (qwen2); token ids
are random in every benchmark, so the tokenizer does not change a timing.

    python scripts/compare_baselines.py --alias qwen3-30b-a3b --layers 4 --vocab 32000 \\
        --bits 4,8 -p 64 -n 32 -r 3 --rounds 3 --threads 2 --llama-cpp ~/llama.cpp
    (--llama-cpp: a llama.cpp source tree built with cmake, so build/bin holds llama-bench
    and llama-quantize; pip install accelerate for the transformers runner)

Printed: per (bits, test) the median over rounds of each runner's mean t/s, the ratio
moerun / peer, the machine's measured read bandwidth and the row's bytes-per-token bound.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from moerun import plan
from moerun.registry import DEMO_DIR, shipped_config
from moerun.spec import parse_size

RUNNERS = ("moerun", "llama.cpp", "transformers")
LLAMA_TYPES = {4: "Q4_0", 8: "Q8_0"}  # llama.cpp's nearest formats to NF4 / int8-per-row
# BPE families whose converter asks for a known pre-tokenizer hash: the name it would find.
BPE_PRE_TOKENIZER = {
    "qwen3_moe": "qwen2",
    "qwen2_moe": "qwen2",
    "mixtral": "llama-bpe",
    "olmoe": "olmo",
    "qwen3_next": "qwen2",
    "qwen3_5_moe": "qwen2",
    "qwen3_5_moe_text": "qwen2",
}
# Families whose converter expects a multi-token-prediction layer unless told there is none.
NO_MTP = {"qwen3_next", "qwen3_5_moe", "qwen3_5_moe_text"}


# -- the checkpoint ----------------------------------------------------------------------


def write_checkpoint(alias: str, layers: int, folder: Path, vocab: int | None = None) -> Path:
    """ALIAS's config with `layers` layers (and `vocab` tokens), random bf16 weights,
    saved by transformers in the Hub layout."""
    if (folder / "config.json").exists():
        return folder
    import transformers

    config = dict(shipped_config(alias))
    config.pop("quantization_config", None)
    text = config.get("text_config", config)
    text["num_hidden_layers"] = layers
    for key in ("layer_types", "no_rope_layers", "moe_layers"):
        if isinstance(text.get(key), list) and len(text[key]) > layers:
            text[key] = text[key][:layers]
    if vocab:
        text["vocab_size"] = vocab
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(text.get(key), int) and text[key] >= vocab:
                text[key] = 1 if key != "pad_token_id" else None
    model_type = config.pop("model_type")
    cfg = transformers.AutoConfig.for_model(model_type, **config)
    # bf16 from the start: no float32 copy of every tensor (a 2-layer Mixtral is 6 GB).
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            meta = transformers.AutoModelForCausalLM.from_config(cfg)
        model = meta.to_empty(device="cpu")
    finally:
        torch.set_default_dtype(torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02))
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="2GB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_DIR / name, tmp / name)
    tmp.rename(folder)
    return folder


def checkpoint_summary(folder: Path) -> tuple[dict, plan.ModelSummary]:
    from moerun.weights import CheckpointWeights

    config = json.loads((folder / "config.json").read_text())
    with CheckpointWeights.open(folder) as ckpt:
        tensors = {n: (ckpt.shape(n), ckpt.dtype(n)) for n in ckpt.keys()}
    return config, plan.summarize(config, tensors)


def bytes_read(summary: plan.ModelSummary, bits: int, tokens: int) -> float:
    """Weight bytes each token reads at batch 1 (tg: `tokens` = 1) or, for a prompt of
    `tokens` tokens, each weight once per prompt over the tokens (the experts the prompt
    routes to: all of them once tokens x k >= E, as for random routing)."""
    p = plan.make_plan(summary, bits, torch.bfloat16, None, None, 256)
    dense = p.non_expert_bytes - p.weight_bytes_by_role.get("embeddings", 0)
    used = min(summary.experts_per_token * tokens, p.n_experts)
    return (dense + used * p.n_moe_layers * p.expert_blob_bytes) / tokens


def read_bandwidth(threads: int) -> float:
    """Bytes/s of a streaming read (a sum over 1 GiB, far beyond the caches) on `threads`."""
    from moerun import bench

    torch.set_num_threads(threads)
    return bench.read_bandwidth(1024)


# -- llama.cpp ---------------------------------------------------------------------------


def llama_tool(root: Path | None, name: str) -> str | None:
    for candidate in ([root / "build" / "bin" / name] if root else []) + [
        Path(p) for p in [shutil.which(name) or ""] if p
    ]:
        if candidate.is_file():
            return str(candidate)
    return None


def llama_gguf(folder: Path, bits: int, root: Path) -> Path:
    """The checkpoint as a GGUF: bf16 by llama.cpp's converter, then (4 / 8 bits) the routed
    experts alone quantized by llama-quantize, every other tensor left bf16."""
    bf16 = folder / "llama-bf16.gguf"
    if not bf16.exists():
        model_type = json.loads((folder / "config.json").read_text())["model_type"]
        shim = (
            "import sys, runpy; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/gguf-py']; "
            "import conversion.base as b; pre = sys.argv[2]; "
            "pre and setattr(b.TextModel, 'get_vocab_base_pre', lambda self, tok: pre); "
            "script = sys.argv[1] + '/convert_hf_to_gguf.py'; sys.argv = [script] + sys.argv[3:]; "
            "runpy.run_path(script, run_name='__main__')"
        )
        tmp = bf16.with_suffix(".tmp")
        subprocess.run(
            [
                sys.executable,
                "-c",
                shim,
                str(root),
                BPE_PRE_TOKENIZER.get(model_type, "default"),
                str(folder),
                "--outtype",
                "bf16",
                "--outfile",
                str(tmp),
                *(["--no-mtp"] if model_type in NO_MTP else []),
            ],
            check=True,
        )
        tmp.rename(bf16)
    if bits == 16:
        return bf16
    out = folder / f"llama-experts-{LLAMA_TYPES[bits].lower()}.gguf"
    if not out.exists():
        quantize = llama_tool(root, "llama-quantize")
        # Overrides apply only under a quantized default type: the experts take the default
        # (--pure: no k-quant mixture), everything else is named back to bf16.
        # (ssm_: the recurrent layers' projections, convolution and decay of the hybrids.)
        keep = ["attn_", "ssm_", "_shexp", r"ffn_(gate|up|down)\.", "ffn_gate_inp"]
        args = [a for pattern in keep for a in ("--tensor-type", f"{pattern}=bf16")]
        tmp = out.with_suffix(".tmp")
        subprocess.run(
            [
                quantize,
                "--pure",
                "--token-embedding-type",
                "bf16",
                "--output-tensor-type",
                "bf16",
                *args,
                str(bf16),
                str(tmp),
                LLAMA_TYPES[bits],
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        tmp.rename(out)
    return out


def gguf_types(path: Path, root: Path) -> dict[str, int]:
    """Parameters per tensor type in a GGUF (to show what llama.cpp really runs)."""
    sys.path[:0] = [str(root / "gguf-py")]
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + int(t.n_elements)
    return counts


def run_llama_cpp(folder: Path, bits: int, p: int, n: int, reps: int, threads: int, root: Path) -> dict:
    exe = llama_tool(root, "llama-bench")
    gguf = llama_gguf(folder, bits, root)
    res = subprocess.run(
        [exe, "-m", str(gguf), "-p", str(p), "-n", str(n), "-r", str(reps), "-t", str(threads), "-o", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    return {
        f"{'pp' if r['n_prompt'] else 'tg'}{r['n_prompt'] or r['n_gen']}": r["avg_ts"] for r in json.loads(res.stdout)
    }


# -- moerun and transformers (each in a process of its own) -----------------------------


def run_moerun(folder: Path, bits: int, p: int, n: int, reps: int, vram, ram) -> dict:
    from moerun import bench
    from moerun.spec import LoadSpec

    report = bench.run_bench(
        model=str(folder),
        prompt_tokens=[p],
        gen_tokens=[n],
        repetitions=reps,
        bits=[bits],
        vram=[vram],
        spec=LoadSpec(ram=ram),
    )
    return {r["test"]: r["t_s_mean"] for r in report["rows"]}


def run_transformers(folder: Path, bits: int, p: int, n: int, reps: int, vram, ram) -> dict:
    """from_pretrained in bf16 (bitsandbytes at 4 / 8 bits), accelerate's offloading on a GPU."""
    import transformers

    kwargs: dict = {"dtype": torch.bfloat16}
    if torch.cuda.is_available():
        kwargs["device_map"] = "auto"
        kwargs["max_memory"] = {0: parse_size(vram) or torch.cuda.mem_get_info()[0], "cpu": parse_size(ram) or "64GiB"}
    if bits == 4:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    elif bits == 8:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(load_in_8bit=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
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
        model(ids, use_cache=False, logits_to_keep=1)
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
        if count:
            fn()  # warm-up
            out[f"{name}{count}"] = statistics.mean(fn() for _ in range(reps))
    quantized = sum(m.weight.numel() for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt"))
    out["quantized_params"] = quantized
    return out


def run_in_process(runner: str, args, bits: int) -> dict | str:
    """One runner, one round, in a fresh process; a reason string if it cannot run here."""
    cmd = [
        sys.executable,
        __file__,
        "--run-one",
        runner,
        "--folder",
        str(args.folder),
        "--bits",
        str(bits),
        "-p",
        str(args.p),
        "-n",
        str(args.n),
        "-r",
        str(args.r),
        "--threads",
        str(args.threads),
    ]
    if args.vram:
        cmd += ["--vram", args.vram]
    if args.ram:
        cmd += ["--ram", args.ram]
    if args.llama_cpp:
        cmd += ["--llama-cpp", str(args.llama_cpp)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        tail = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        return f"failed: {tail[:200]}"
    return json.loads(res.stdout.strip().splitlines()[-1])


def one(args) -> None:
    """--run-one: a single runner's figures as one JSON line."""
    torch.set_num_threads(args.threads)
    folder, bits = Path(args.folder), int(args.bits)
    if args.run_one == "moerun":
        out = run_moerun(folder, bits, args.p, args.n, args.r, args.vram, args.ram)
    elif args.run_one == "transformers":
        out = run_transformers(folder, bits, args.p, args.n, args.r, args.vram, args.ram)
    else:
        out = run_llama_cpp(folder, bits, args.p, args.n, args.r, args.threads, Path(args.llama_cpp))
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alias", default="mixtral-8x7b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument(
        "--vocab", type=int, default=None, help="vocabulary size of the random checkpoint (default: ALIAS's)"
    )
    ap.add_argument("--bits", default="16,4")
    ap.add_argument("--vram", default=None, help="device budget for every runner, e.g. 12GiB")
    ap.add_argument("--ram", default=None)
    ap.add_argument("-p", type=int, default=64)
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("-r", type=int, default=3, help="repetitions per runner per round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are taken over them")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--runners", default=",".join(RUNNERS))
    ap.add_argument(
        "--llama-cpp",
        type=Path,
        default=os.environ.get("LLAMA_CPP_DIR"),
        help="llama.cpp source tree built with cmake (build/bin/llama-bench, llama-quantize)",
    )
    ap.add_argument("--workdir", default="/tmp/moerun-compare")
    ap.add_argument("--out", default=None, help="write everything as JSON here")
    ap.add_argument("--run-one", choices=RUNNERS, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_one:
        return one(args)

    name = f"{args.alias}-{args.layers}l" + (f"-v{args.vocab}" if args.vocab else "")
    args.folder = write_checkpoint(args.alias, args.layers, Path(args.workdir) / name, args.vocab)
    runners = args.runners.split(",")
    if "llama.cpp" in runners and not (args.llama_cpp and llama_tool(args.llama_cpp, "llama-bench")):
        print("llama.cpp: skipped (give --llama-cpp DIR, a tree with build/bin/llama-bench)", file=sys.stderr)
        runners.remove("llama.cpp")
    _, summary = checkpoint_summary(args.folder)
    bandwidth = read_bandwidth(args.threads)
    results: dict = {}
    for bits in map(int, args.bits.split(",")):
        if "llama.cpp" in runners:  # convert once, outside the timed rounds
            gguf = llama_gguf(args.folder, bits, args.llama_cpp)
            results.setdefault("gguf_types", {})[bits] = gguf_types(gguf, args.llama_cpp)
        for r in range(args.rounds):
            order = runners if r % 2 == 0 else runners[::-1]
            for runner in order:
                got = run_in_process(runner, args, bits)
                results.setdefault(bits, {}).setdefault(runner, []).append(got)
                print(f"bits {bits} round {r + 1} {runner}: {got}", file=sys.stderr, flush=True)

    print(
        f"\nmodel: {args.alias} shapes, first {args.layers} layers, vocab {summary.vocab_size}, random weights; "
        f"budget {args.vram or 'all'}; {args.threads} threads; {args.rounds} alternating rounds x {args.r} repetitions"
    )
    print(f"read bandwidth (sum over 1 GiB, {args.threads} threads): {bandwidth / 1e9:.1f} GB/s\n")
    peers = [r for r in runners if r != "moerun"]
    print(
        "| bits | test | MB/token | bound t/s | "
        + " | ".join(f"{r} t/s" for r in runners)
        + "".join(f" | moerun / {p}" for p in peers)
        + " |"
    )
    print("|---:|---|---:|---:|" + "---:|" * (len(runners) + len(peers)))
    rows = []
    for bits in map(int, args.bits.split(",")):
        for test, tokens in ((f"pp{args.p}", args.p), (f"tg{args.n}", 1)):
            per_token = bytes_read(summary, bits, tokens)
            row = {"bits": bits, "test": test, "bytes_per_token": per_token, "bound_t_s": bandwidth / per_token}
            for runner in runners:
                rates = [g[test] for g in results[bits][runner] if isinstance(g, dict) and test in g]
                row[runner] = (
                    statistics.median(rates)
                    if rates
                    else next((g for g in results[bits][runner] if isinstance(g, str)), "n/a")
                )
            cells = [f"{row[r]:.2f}" if isinstance(row[r], float) else str(row[r])[:40] for r in runners]
            ratios = [
                f"{row['moerun'] / row[p]:.2f}"
                if isinstance(row.get("moerun"), float) and isinstance(row[p], float)
                else "n/a"
                for p in peers
            ]
            print(
                f"| {bits} | {test} | {per_token / 1e6:.0f} | {row['bound_t_s']:.1f} | "
                + " | ".join(cells)
                + "".join(f" | {x}" for x in ratios)
                + " |"
            )
            rows.append(row)
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "read_bandwidth": bandwidth,
                    "rows": rows,
                    "rounds": results,
                },
                indent=2,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
