"""The same checkpoint, shapes, bits and budget through moerun and through what users run
instead, side by side, in alternating rounds, with the ratio per test.

Runners (each run in its own process, so none inherits another's memory or threads):
  - moerun: `moerun.bench.run_bench` on the checkpoint folder, at moerun's own default
    thread count unless --threads is given;
  - moerun-t1: the same at one thread (`--threads 1`), the reference of the contention test;
  - llama.cpp: llama-bench on a GGUF made by llama.cpp's own tools: convert_hf_to_gguf.py
    to bf16, then llama-quantize with the routed experts only (ffn_*_exps) at Q4_0 / Q8_0
    and every other tensor kept bf16, as moerun keeps them (16 bits: the bf16 GGUF as is);
  - llama.cpp-std: llama-bench on the files users download: plain `llama-quantize` of the
    same bf16 GGUF to Q4_K_M / Q8_0 (16 bits: the bf16 GGUF);
  - transformers: from_pretrained in bf16 (+ bitsandbytes NF4 / LLM.int8 at 4 / 8 bits,
    which quantizes what bitsandbytes can: nn.Linear layers) with accelerate's device_map
    offloading under a max_memory cap on a GPU.
llama-bench runs with -t THREADS, or one thread per core without --threads.

The checkpoint is ALIAS's shipped config cut to --layers layers (and --vocab tokens),
random weights saved by transformers (bf16), so every runner loads the same files. The
random checkpoint carries moerun's demo tokenizer: llama.cpp's converter identifies BPE
pre-tokenizers by hashing real tokenizers' output, so for a BPE family the converter is
run with that lookup answering the family's own pre-tokenizer name (qwen2); token ids
are random in every benchmark, so the tokenizer does not change a timing. Everything
lives in --workdir: the checkpoint, its GGUFs and moerun's quantized experts (MOERUN_CACHE
is set to WORKDIR/moerun-cache for the moerun runs), so deleting it frees all of it. The
files are made once, the GGUFs before the timed part, moerun's experts in its first run at
each bits (outside bench's timings, but a long run): a tiny first run (-p 16 -n 4 -r 1
--rounds 1) prepares everything.

    python scripts/compare_baselines.py --alias qwen3-30b-a3b --layers 4 --vocab 32000 \\
        --bits 4,8 -p 64,512 -n 32 -r 3 --rounds 3 --runners moerun,llama.cpp,llama.cpp-std \\
        --llama-cpp ~/llama.cpp --workdir /work/compare --drop-bf16-gguf \\
        --write-benchmarks qwen3-cpu
    python scripts/compare_baselines.py ... --runners moerun,moerun-t1,llama.cpp --busy 1
    (--llama-cpp: a llama.cpp source tree built with cmake, so build/bin holds llama-bench
    and llama-quantize; Mixtral's conversion imports sentencepiece: have it in this Python
    or give --converter-pythonpath DIR after `pip install --target DIR sentencepiece`;
    pip install accelerate for the transformers runner)

Around every run the script reads /proc/stat and the run's own CPU time: other_cores, the
cores other processes kept busy during it ((all CPUs' busy time - the run's) / wall time).
--busy N starts N busy-loop processes for the whole timed part (they count as other
processes), to measure under contention: moerun against moerun-t1 and llama.cpp.

Printed (and with --write-benchmarks NAME written into docs/BENCHMARKS.md between the
markers `<!-- compare_baselines:NAME -->` and `<!-- /compare_baselines:NAME -->`, a new
section at the end if they are missing): the command, the machine, per (bits, test) the
median over rounds of each runner's mean t/s, the ratio moerun / each other runner, the
measured read bandwidth and moerun's bytes-per-token bound; every round's figures with its
other_cores; the GGUFs' parameters per tensor type and bytes per token.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

# isort: off
# moerun before torch, as in its CLI: importing it sets OpenMP's waiting policy, which
# libgomp reads when torch loads it.
import moerun  # noqa: F401
import torch

# isort: on

from moerun import plan
from moerun.registry import DEMO_DIR, shipped_config
from moerun.spec import parse_size

RUNNERS = ("moerun", "moerun-t1", "llama.cpp", "llama.cpp-std", "transformers")
LLAMA_RUNNERS = ("llama.cpp", "llama.cpp-std")
LLAMA_TYPES = {4: "Q4_0", 8: "Q8_0"}  # llama.cpp's nearest formats to NF4 / int8-per-row
LLAMA_STD_TYPES = {4: "Q4_K_M", 8: "Q8_0"}  # the files users download
RUNNER_LABELS = {
    "moerun": "moerun (NF4 / int8 experts, rest bf16)",
    "moerun-t1": "moerun --threads 1",
    "llama.cpp": "llama.cpp (experts Q4_0 / Q8_0, rest bf16)",
    "llama.cpp-std": "llama.cpp-std (Q4_K_M / Q8_0)",
    "transformers": "transformers (+bnb)",
}
BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"
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


def gguf_path(folder: Path, runner: str, bits: int) -> Path:
    """Where `runner`'s GGUF at `bits` lives (both runners share the bf16 one)."""
    if bits == 16:
        return folder / "llama-bf16.gguf"
    if runner == "llama.cpp":
        return folder / f"llama-experts-{LLAMA_TYPES[bits].lower()}.gguf"
    return folder / f"llama-std-{LLAMA_STD_TYPES[bits].lower()}.gguf"


def convert_bf16_gguf(folder: Path, root: Path, pythonpath: str | None) -> Path:
    """The checkpoint as a bf16 GGUF, by llama.cpp's converter; `pythonpath`: folders it
    imports from beyond this Python's (the Llama family's vocabulary imports sentencepiece
    even without a tokenizer.model)."""
    bf16 = gguf_path(folder, "llama.cpp", 16)
    if bf16.exists():
        return bf16
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
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [pythonpath, os.environ.get("PYTHONPATH")]))),
    )
    tmp.rename(bf16)
    return bf16


def quantize_args(runner: str, bits: int) -> list[str]:
    """llama-quantize's options before IN OUT TYPE for `runner`'s file at `bits`."""
    if runner == "llama.cpp-std":
        return []  # what users download: llama.cpp's own mixture for the type
    # Overrides apply only under a quantized default type: the experts take the default
    # (--pure: no k-quant mixture), everything else is named back to bf16.
    # (ssm_: the recurrent layers' projections, convolution and decay of the hybrids.)
    keep = ["attn_", "ssm_", "_shexp", r"ffn_(gate|up|down)\.", "ffn_gate_inp"]
    overrides = [a for pattern in keep for a in ("--tensor-type", f"{pattern}=bf16")]
    return ["--pure", "--token-embedding-type", "bf16", "--output-tensor-type", "bf16", *overrides]


def llama_gguf(folder: Path, runner: str, bits: int, root: Path, pythonpath: str | None) -> Path:
    """`runner`'s GGUF at `bits`, made if missing: the bf16 GGUF (16 bits), or llama-quantize
    of it; an existing quantized file does not need the bf16 one."""
    out = gguf_path(folder, runner, bits)
    if out.exists():
        return out
    bf16 = convert_bf16_gguf(folder, root, pythonpath)
    if bits == 16:
        return bf16
    qtype = (LLAMA_TYPES if runner == "llama.cpp" else LLAMA_STD_TYPES)[bits]
    tmp = out.with_suffix(".tmp")
    subprocess.run(
        [llama_tool(root, "llama-quantize"), *quantize_args(runner, bits), str(bf16), str(tmp), qtype],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    tmp.rename(out)
    return out


def gguf_tensors(path: Path, root: Path) -> list[tuple[str, str, int, int]]:
    """(name, type, parameters, bytes) of every tensor in a GGUF (what llama.cpp really runs)."""
    if str(root / "gguf-py") not in sys.path:
        sys.path[:0] = [str(root / "gguf-py")]
    import gguf

    return [(t.name, t.tensor_type.name, int(t.n_elements), int(t.n_bytes)) for t in gguf.GGUFReader(str(path)).tensors]


def gguf_types(tensors: list[tuple[str, str, int, int]]) -> dict[str, int]:
    """Parameters per tensor type."""
    counts: dict[str, int] = {}
    for _, kind, n_params, _ in tensors:
        counts[kind] = counts.get(kind, 0) + n_params
    return counts


def gguf_bytes_per_token(
    tensors: list[tuple[str, str, int, int]], experts_per_token: int, n_experts: int, tokens: int
) -> float:
    """A GGUF's weight bytes per token, as `bytes_read` counts moerun's: every tensor once per
    step except the token embedding (one row; unless it is the output too, with no
    output.weight), the routed experts (ffn_*_exps) in the share the step routes to."""
    names = {name for name, *_ in tensors}
    used = min(experts_per_token * tokens, n_experts) / n_experts
    total = 0.0
    for name, _, _, n_bytes in tensors:
        if name == "token_embd.weight" and "output.weight" in names:
            continue
        total += n_bytes * used if "_exps." in name else n_bytes
    return total / tokens


def run_llama_cpp(gguf: Path, prompts: list[int], n: int, reps: int, threads: int, root: Path) -> dict:
    res = subprocess.run(
        [
            llama_tool(root, "llama-bench"),
            *("-m", str(gguf), "-p", ",".join(map(str, prompts)) or "0", "-n", str(n)),
            *("-r", str(reps), "-t", str(threads), "-o", "json"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return {
        f"{'pp' if r['n_prompt'] else 'tg'}{r['n_prompt'] or r['n_gen']}": r["avg_ts"] for r in json.loads(res.stdout)
    }


# -- moerun and transformers (each in a process of its own) -----------------------------


def run_moerun(folder: Path, bits: int, prompts: list[int], n: int, reps: int, vram, ram, threads) -> dict:
    """threads None: moerun's own default (what a user gets without --threads)."""
    from moerun import bench
    from moerun.spec import LoadSpec

    report = bench.run_bench(
        model=str(folder),
        prompt_tokens=prompts,
        gen_tokens=[n],
        repetitions=reps,
        bits=[bits],
        vram=[vram],
        spec=LoadSpec(ram=ram, threads=threads),
    )
    return {"tests": {r["test"]: r["t_s_mean"] for r in report["rows"]}}


def run_transformers(folder: Path, bits: int, prompts: list[int], n: int, reps: int, vram, ram) -> dict:
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
    def pp(p):
        ids = torch.randint(0, vocab, (1, p), generator=g).to(device)
        sync()
        t0 = time.perf_counter()
        model(ids, use_cache=False, logits_to_keep=1)
        sync()
        return p / (time.perf_counter() - t0)

    @torch.inference_mode()
    def tg(n):
        ids = torch.randint(0, vocab, (1, 1), generator=g).to(device)
        sync()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        sync()
        return n / (time.perf_counter() - t0)

    tests = {}
    for name, fn, count in [("pp", pp, p) for p in prompts] + [("tg", tg, n)]:
        if count:
            fn(count)  # warm-up
            tests[f"{name}{count}"] = statistics.mean(fn(count) for _ in range(reps))
    quantized = sum(m.weight.numel() for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt"))
    return {"tests": tests, "info": {"quantized_params": quantized}}


# -- one run, and what else the machine did meanwhile -----------------------------------


def cpu_busy_seconds(proc_stat: str) -> float:
    """All CPUs' busy time from /proc/stat's first line: user, nice, system, irq, softirq
    and steal (time the hypervisor gave to other machines is a core taken too); idle and
    iowait are not busy, guest time is already inside user."""
    fields = [int(x) for x in proc_stat.splitlines()[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """User + system time of every finished, waited-for child (and its own children)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def other_cores(busy_s: float, child_s: float, wall_s: float) -> float:
    """Cores other processes kept busy over `wall_s`: all CPUs' busy time less the run's.
    Clock ticks and rusage round differently, so a quiet run can come out a hair below 0."""
    return max(0.0, (busy_s - child_s) / wall_s)


def run_threads(runner: str, threads: int | None) -> int | None:
    """The thread count a runner is given: moerun-t1 one; llama-bench one per core unless
    --threads (its own default is not the core count everywhere); moerun and transformers
    None (their own default) unless --threads."""
    if runner == "moerun-t1":
        return 1
    if runner in LLAMA_RUNNERS:
        return threads or os.cpu_count() or 1
    return threads


def run_in_process(runner: str, args, bits: int) -> dict:
    """One runner, one round, in a fresh process: {"tests": {test: t/s}, "other_cores",
    "wall_s"} (+ "info"), or "error" with the reason instead of "tests"."""
    cmd = [sys.executable, __file__, "--run-one", runner, "--folder", str(args.folder), "--bits", str(bits)]
    cmd += ["-p", ",".join(map(str, args.p)), "-n", str(args.n), "-r", str(args.r)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.vram:
        cmd += ["--vram", args.vram]
    if args.ram:
        cmd += ["--ram", args.ram]
    if args.llama_cpp:
        cmd += ["--llama-cpp", str(args.llama_cpp)]
    env = dict(os.environ, MOERUN_CACHE=str(Path(args.workdir) / "moerun-cache"))
    busy0, child0, t0 = cpu_busy_seconds(Path("/proc/stat").read_text()), children_cpu_seconds(), time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.monotonic() - t0
    busy, child = cpu_busy_seconds(Path("/proc/stat").read_text()) - busy0, children_cpu_seconds() - child0
    got = {"other_cores": round(other_cores(busy, child, wall), 3), "wall_s": round(wall, 2)}
    if res.returncode:
        tail = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        return got | {"error": f"failed: {tail[:200]}"}
    return got | json.loads(res.stdout.strip().splitlines()[-1])


def one(args) -> None:
    """--run-one: a single runner's figures as one JSON line."""
    folder, bits, runner = Path(args.folder), int(args.bits), args.run_one
    threads = run_threads(runner, args.threads)
    if runner in ("moerun", "moerun-t1"):
        out = run_moerun(folder, bits, args.p, args.n, args.r, args.vram, args.ram, threads)
    elif runner == "transformers":
        if threads:
            torch.set_num_threads(threads)
        out = run_transformers(folder, bits, args.p, args.n, args.r, args.vram, args.ram)
    else:
        gguf = gguf_path(folder, runner, bits)
        out = {"tests": run_llama_cpp(gguf, args.p, args.n, args.r, threads, Path(args.llama_cpp))}
    print(json.dumps(out))


def start_busy_loops(count: int) -> list[subprocess.Popen]:
    """`count` processes that each keep one core busy (a home PC's browser, at worst)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def stop_busy_loops(loops: list[subprocess.Popen]) -> None:
    for loop in loops:
        loop.kill()
        loop.wait()


# -- the report --------------------------------------------------------------------------


def cpu_model() -> str:
    """/proc/cpuinfo's model name, family / model numbers and vector extensions (a VM may
    name the CPU "AMD EPYC" alone; Zen 3 and Zen 4 differ in AVX-512 and BF16)."""
    info: dict[str, str] = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    if "model name" not in info:
        return platform.processor() or platform.machine()
    flags = info.get("flags", "").split()
    vector = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return (
        f"{info['model name']} (family {info.get('cpu family', '?')} model {info.get('model', '?')}; "
        f"{' '.join(vector) or 'no AVX2'})"
    )


def bench_tests(prompts: list[int], n: int) -> list[tuple[str, int]]:
    """(llama-bench's test name, tokens per weight read) of every test: ppP reads each
    weight once per prompt of P tokens, tgN once per token."""
    return [(f"pp{p}", p) for p in prompts if p] + ([(f"tg{n}", 1)] if n else [])


def cell(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)[:40]


def markdown_table(header: list[str], align: str, rows: list[list[str]]) -> list[str]:
    """align: one character per column, "l" or "r"."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def median_rows(results: dict, runners: list[str], tests, bits_list, summary, bandwidth) -> list[dict]:
    """Per (bits, test): moerun's bytes per token and bound, each runner's median t/s over
    the rounds (or its first failure), each ratio moerun / other runner."""
    rows = []
    for bits in bits_list:
        for test, tokens in tests:
            per_token = bytes_read(summary, bits, tokens)
            row = {"bits": bits, "test": test, "bytes_per_token": per_token, "bound_t_s": bandwidth / per_token}
            for runner in runners:
                runs = results[bits][runner]
                rates = [run["tests"][test] for run in runs if test in run.get("tests", {})]
                row[runner] = (
                    statistics.median(rates) if rates else next((run["error"] for run in runs if "error" in run), "n/a")
                )
            for peer in runners:
                if peer != "moerun" and isinstance(row.get("moerun"), float) and isinstance(row[peer], float):
                    row[f"moerun / {peer}"] = row["moerun"] / row[peer]
            rows.append(row)
    return rows


def report_markdown(args, runners, tests, rows, results, files, bandwidth, bw_threads, summary) -> str:
    """Everything a reader needs to judge the figures: command, machine, load, the medians,
    every round, and what the GGUFs hold."""
    runs = [run for bits in results.values() for runner in runners for run in bits[runner]]
    shares = [run["other_cores"] for run in runs]
    threads = f"--threads {args.threads} for every runner" if args.threads else "moerun's default, llama-bench -t cores"
    lines = [
        "```sh",
        "python scripts/compare_baselines.py " + shlex.join(sys.argv[1:]),
        "```",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}; read bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s (a sum over 1 GiB, {bw_threads} threads, before the timed part).",
        f"Model: {args.alias} shapes, first {args.layers} layers, vocab {summary.vocab_size}, random bf16 "
        f"weights; budget {args.vram or 'all'}; threads: {threads}; {args.rounds} alternating rounds x "
        f"{args.r} repetitions; {args.busy} busy-loop processes during the timed part.",
        f"Other processes' CPU share (cores) over the {len(shares)} timed runs: median "
        f"{statistics.median(shares):.2f}, max {max(shares):.2f}."
        if shares
        else "No timed runs.",
        "",
        "Medians over the rounds (t/s); MB/token and bound: moerun's weight bytes per token at batch 1 (tg) "
        "or per prompt token (pp: every weight once per prompt), bound = read bandwidth / MB/token.",
        "",
    ]
    ratios = [key for key in rows[0] if key.startswith("moerun / ")] if rows else []
    lines += markdown_table(
        ["bits", "test", "MB/token", "bound t/s", *(RUNNER_LABELS[r] for r in runners), *ratios],
        "rlrr" + "r" * (len(runners) + len(ratios)),
        [
            [str(row["bits"]), row["test"], f"{row['bytes_per_token'] / 1e6:.0f}", f"{row['bound_t_s']:.1f}"]
            + [cell(row[r]) for r in runners]
            + [f"**{row[key]:.2f}**" if key in row else "n/a" for key in ratios]
            for row in rows
        ],
    )
    lines += ["", "Every run (t/s; other cores: what other processes kept busy during the run):", ""]
    lines += markdown_table(
        ["bits", "round", "runner", *(t for t, _ in tests), "other cores"],
        "rrl" + "r" * (len(tests) + 1),
        [
            [str(bits), str(i + 1), runner]
            + [cell(run["tests"][t]) if t in run.get("tests", {}) else cell(run.get("error", "n/a")) for t, _ in tests]
            + [f"{run['other_cores']:.2f}"]
            for bits, by_runner in results.items()
            for runner in runners
            for i, run in enumerate(by_runner[runner])
        ],
    )
    if files:
        lines += ["", "The GGUFs llama-bench ran: parameters per tensor type, weight MB per token as above:", ""]
        lines += markdown_table(
            ["bits", "runner", "file", "parameters per type", *(f"MB/token {t}" for t, _ in tests)],
            "rlll" + "r" * len(tests),
            [
                [str(f["bits"]), f["runner"], f["file"], ", ".join(f"{k} {v:,}" for k, v in f["types"].items())]
                + [f"{f['bytes_per_token'][t] / 1e6:.0f}" for t, _ in tests]
                for f in files
            ],
        )
    return "\n".join(lines) + "\n"


def replace_marked_section(text: str, name: str, body: str, heading: str) -> str:
    """`text` with what lies between NAME's markers replaced by `body`; without the markers,
    `text` with a new section at its end: `heading`, then the markers around `body`."""
    start, end = f"<!-- compare_baselines:{name} -->", f"<!-- /compare_baselines:{name} -->"
    i, j = text.find(start), text.find(end)
    if i >= 0 and j > i:
        return text[: i + len(start)] + "\n" + body + text[j:]
    return text.rstrip("\n") + f"\n\n{heading}\n\n{start}\n{body}{end}\n"


def write_benchmarks(path: Path, name: str, body: str) -> None:
    """Into docs/BENCHMARKS.md, atomically: a temporary file beside it, then a rename."""
    heading = f"## Side by side against llama.cpp: {name} (scripts/compare_baselines.py)"
    text = replace_marked_section(path.read_text(), name, body, heading)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def prepare_ggufs(args, runners, bits_list, summary, tests) -> list[dict]:
    """Every GGUF the llama.cpp runners need, made before the timed part; with
    --drop-bf16-gguf the bf16 one deleted once the files it feeds exist (unless 16 bits
    is asked). Returns each file's parameters per type and bytes per token."""
    files = []
    for bits in bits_list:
        for runner in (r for r in runners if r in LLAMA_RUNNERS):
            path = llama_gguf(args.folder, runner, bits, args.llama_cpp, args.converter_pythonpath)
            tensors = gguf_tensors(path, args.llama_cpp)
            per_token = {
                test: gguf_bytes_per_token(tensors, summary.experts_per_token, summary.n_experts, tokens)
                for test, tokens in tests
            }
            files.append(
                {"bits": bits, "runner": runner, "file": path.name, "types": gguf_types(tensors)}
                | {"bytes_per_token": per_token}
            )
            print(
                f"{path.name}: {gguf_types(tensors)}; MB/token "
                + ", ".join(f"{t} {b / 1e6:.0f}" for t, b in per_token.items()),
                file=sys.stderr,
                flush=True,
            )
    bf16 = gguf_path(args.folder, "llama.cpp", 16)
    if args.drop_bf16_gguf and 16 not in bits_list and bf16.exists():
        bf16.unlink()
        print(f"deleted {bf16} (every quantized GGUF it feeds exists)", file=sys.stderr)
    return files


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
    ap.add_argument(
        "-p",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[64],
        help="prompt sizes, a comma list (64,512: pp64 and pp512)",
    )
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("-r", type=int, default=3, help="repetitions per runner per round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are taken over them")
    ap.add_argument(
        "--threads", type=int, default=None, help="threads for every runner but moerun-t1 (default: each one's own)"
    )
    ap.add_argument("--runners", default="moerun,llama.cpp,llama.cpp-std,transformers", help=f"of {', '.join(RUNNERS)}")
    ap.add_argument("--busy", type=int, default=0, help="busy-loop processes to run during the timed part")
    ap.add_argument(
        "--llama-cpp",
        type=Path,
        default=os.environ.get("LLAMA_CPP_DIR"),
        help="llama.cpp source tree built with cmake (build/bin/llama-bench, llama-quantize)",
    )
    ap.add_argument(
        "--converter-pythonpath",
        metavar="DIRS",
        help="folders llama.cpp's converter imports from beyond this Python's (pip install --target DIR "
        "sentencepiece: Mixtral's vocabulary needs it)",
    )
    ap.add_argument("--workdir", default="/tmp/moerun-compare")
    ap.add_argument("--drop-bf16-gguf", action="store_true", help="delete the bf16 GGUF once its quantized files exist")
    ap.add_argument("--out", default=None, help="write everything as JSON here")
    ap.add_argument("--write-benchmarks", metavar="NAME", help="write the report into docs/BENCHMARKS.md as NAME")
    ap.add_argument("--run-one", choices=RUNNERS, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_one:
        return one(args)

    runners = args.runners.split(",")
    unknown = set(runners) - set(RUNNERS)
    if unknown:
        ap.error(f"unknown runners {sorted(unknown)}; choose from {', '.join(RUNNERS)}")
    name = f"{args.alias}-{args.layers}l" + (f"-v{args.vocab}" if args.vocab else "")
    args.folder = write_checkpoint(args.alias, args.layers, Path(args.workdir) / name, args.vocab)
    if set(runners) & set(LLAMA_RUNNERS) and not (args.llama_cpp and llama_tool(args.llama_cpp, "llama-bench")):
        print("llama.cpp: skipped (give --llama-cpp DIR, a tree with build/bin/llama-bench)", file=sys.stderr)
        runners = [r for r in runners if r not in LLAMA_RUNNERS]
    _, summary = checkpoint_summary(args.folder)
    bits_list = [int(b) for b in args.bits.split(",")]
    tests = bench_tests(args.p, args.n)
    files = prepare_ggufs(args, runners, bits_list, summary, tests)  # outside the timed part
    bw_threads = args.threads or torch.get_num_threads()
    bandwidth = read_bandwidth(bw_threads)

    results: dict = {}
    loops = start_busy_loops(args.busy)
    try:
        for bits in bits_list:
            for r in range(args.rounds):
                for runner in runners if r % 2 == 0 else runners[::-1]:
                    got = run_in_process(runner, args, bits)
                    results.setdefault(bits, {}).setdefault(runner, []).append(got)
                    figures = got.get("tests") or {"error": got.get("error")}
                    print(
                        f"bits {bits} round {r + 1} {runner}: {figures}; other cores {got['other_cores']:.2f}",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        stop_busy_loops(loops)

    rows = median_rows(results, runners, tests, bits_list, summary, bandwidth)
    report = report_markdown(args, runners, tests, rows, results, files, bandwidth, bw_threads, summary)
    print("\n" + report)
    if args.write_benchmarks:
        write_benchmarks(BENCHMARKS_MD, args.write_benchmarks, report)
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "read_bandwidth": bandwidth,
                    "rows": rows,
                    "rounds": results,
                    "gguf_files": files,
                },
                indent=2,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
