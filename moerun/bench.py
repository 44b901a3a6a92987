"""llama-bench-style measurement: prompt processing (ppN) and generation (tgN) tokens/sec,
mean ± std over repetitions after a warm-up, with where the time goes.

A model is either loaded (alias, repo id, folder) or synthetic: the real config of a known
model with random weights made directly in quantized form, in memory, layer by layer, so a
user can measure Mixtral-8x7B's shapes on their card before downloading 90 GB. Random
weights route near-uniformly: the worst case for the expert cache, not a trained model's.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import math
import os
import platform
import statistics
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

import moerun
from moerun import plan
from moerun.api import assemble, load_spec
from moerun.errors import MoerunError
from moerun.kernels import cpu_experts
from moerun.models import build_meta_model, get_architecture
from moerun.models.base import is_encoder_decoder, linear_parameters, parameter_roles, role_of
from moerun.moe.cache import CachedExperts
from moerun.moe.offload import (
    cache_stats,
    expert_formats,
    install_expert_cache,
    reset_cache_stats,
    routed_expert_modules,
)
from moerun.quant.format import ExpertFormat
from moerun.spec import LoadSpec, parse_size
from moerun.units import gib, params

DEFAULT_PP, DEFAULT_TG = 512, 128  # llama-bench's defaults: clipped, not refused, on a short-context model
MAX_REPETITIONS = 1000  # -r beyond it ran for ever; a mean over 1000 runs is as steady as one gets

RANDOM_ROUTING_NOTE = (
    "synthetic weights route near-uniformly: the worst case for the expert cache, not the routing of a trained model"
)


@dataclasses.dataclass
class BenchModel:
    """What a bench run measures: the LM, its plan, and how to describe it."""

    lm: nn.Module
    name: str
    plan: plan.Plan
    device: torch.device
    synthetic: bool
    layers_note: str = ""


# -- synthetic models --------------------------------------------------------------------


def _random_blobs(fmt: ExpertFormat, n: int, generator: torch.Generator) -> torch.Tensor:
    """n experts of `fmt` made directly in quantized form. Speed does not depend on the
    values, so one random blob is drawn per layer and every expert is a view of it
    (stride 0): no RAM for 100+ copies. On CUDA the pinned host store is materialised
    when the cache is installed, so copies there move real, distinct memory; on the CPU
    `synthetic_model` materialises it, or every expert would be read from the caches."""
    blob = torch.empty(fmt.blob_bytes, dtype=torch.uint8)
    views = fmt.views(blob)
    for s in fmt.sections:
        v = views[s.name]
        if s.dtype == torch.uint8:  # NF4 codes: uniform over the 16 levels
            v.copy_(torch.randint(0, 256, v.shape, dtype=torch.uint8, generator=generator))
        elif s.dtype == torch.int8:
            v.copy_(torch.randint(-127, 128, v.shape, dtype=torch.int8, generator=generator))
        elif s.name.endswith(("absmax", "scale")):  # weights of about 0.02 std
            v.fill_(0.04 if s.name.endswith("absmax") else 0.06 / 127)
        else:
            v.copy_((torch.randn(v.shape, generator=generator) * 0.02).to(s.dtype))
    return blob.expand(n, -1)


# Random values for synthetic weights come in blocks of this many (a prime, so that the
# repeats do not line up with rows): speed does not depend on the values, and drawing
# each of a big model's billions of normals took most of a synthetic bench's set-up.
RANDOM_BLOCK = 1_048_573


def _random_weights(shape, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    n = math.prod(shape)
    block = (torch.randn(min(n, RANDOM_BLOCK), generator=generator) * 0.02).to(dtype)
    if n <= RANDOM_BLOCK:
        return block.view(shape)
    return block.repeat(-(-n // RANDOM_BLOCK))[:n].view(shape)


class SyntheticSource:
    """`config`'s model (the first `layers` layers) with random weights, routed experts made
    directly in their quantized format: a source for `moerun.api.assemble`, as a
    checkpoint is. The model itself says what it holds (no headers: its checkpoint
    description stands in)."""

    def __init__(self, config: dict, name: str, layers: int | None = None, seed: int = 0):
        config = dict(config)
        # The weights are made here in moerun's own formats, whatever the release stores (FP8).
        config.pop("quantization_config", None)
        # Multimodal configs (Llama 4) keep the language model's fields in text_config.
        text = config["text_config"] = dict(config["text_config"]) if "text_config" in config else config
        self.note = get_architecture(text.get("model_type")).first_layers(text, layers) if layers else ""
        self.lm, family = build_meta_model(config)
        self._summary = plan.describe_model(self.lm, config, family.checkpoint_tensors(self.lm.args))
        if not self._summary.n_experts:
            self.note += (", " if self.note else "") + "no MoE layer among them (dense layers first): raise --layers"
        self.config, self.name, self.seed = config, name, seed

    def summary(self) -> plan.ModelSummary:
        return self._summary

    def build(self, memory_plan, spec, device, dtype, on_event):
        lm, g = self.lm, torch.Generator().manual_seed(self.seed)
        roles = parameter_roles(lm)
        # As load_model keeps them: the nn.Linear matrices in the plan's linear dtype.
        linears = linear_parameters(lm) if memory_plan.linear_dtype else set()
        for pname, p in list(lm.named_parameters()):
            if roles[pname] == "routed_experts":
                continue
            if "norm" in pname and p.dim() == 1:
                value = torch.ones(p.shape, dtype=dtype)
            else:
                at_rest = plan.DTYPES[memory_plan.linear_dtype] if pname in linears else dtype
                value = _random_weights(p.shape, at_rest, g)
            owner, _, leaf = pname.rpartition(".")
            setattr(lm.get_submodule(owner), leaf, nn.Parameter(value.to(device), requires_grad=False))
        lm.tie_weights()
        if routed_expert_modules(lm):  # e.g. DeepSeek-V3's first layers are dense
            fmts, n_experts, _ = expert_formats(lm, spec.bits, dtype)
            stores = {i: _random_blobs(fmts[i], n_experts[i], g) for i in fmts}
            if device.type == "cpu":
                stores = {i: s.contiguous() for i, s in stores.items()}
            slots = memory_plan.expert_slots_per_layer
            install_expert_cache(lm, stores, fmts, slots, device, dtype, spec.cold, spec.prefetch)
        return lm, None


@torch.inference_mode()
def synthetic_model(config: dict, name: str, spec: LoadSpec, layers: int | None = None, seed: int = 0) -> BenchModel:
    """Build `config`'s model (the first `layers` layers) with random weights, planned and
    placed by the same pipeline as a checkpoint (`moerun.api.assemble`)."""
    source = SyntheticSource(config, name, layers, seed)
    if not source.summary().n_experts:
        spec = dataclasses.replace(spec, expert_slots=None)  # no experts to give slots to
    device = spec.resolve_device()
    lm, memory_plan, _, _ = assemble(source, spec, device)
    return BenchModel(lm.eval(), name, memory_plan, device, True, source.note)


# -- timing ------------------------------------------------------------------------------


class SectionTimer:
    """Wall time per named section; synchronizes CUDA around each so time lands where it
    is spent. Used in one extra profiled pass only, never in the t/s figures."""

    def __init__(self, device: torch.device):
        self.seconds: dict[str, float] = defaultdict(float)
        self.cuda = device.type == "cuda"

    @contextmanager
    def __call__(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - t0


@contextmanager
def profiled(lm: nn.Module, timer: SectionTimer):
    """Attribute time to attention and MoE blocks and the lm_head (hooks), and to copies
    and CPU experts (each expert cache's `profiled`): what is left is the glue between
    them (embeddings, norms, residuals, sampling, Python)."""
    handles, stack = [], []

    def enter(name):
        def pre(module, args):
            stack.append(timer(name))
            stack[-1].__enter__()

        return pre

    def leave(module, args, out):
        stack.pop().__exit__(None, None, None)

    moe_blocks = {path.rpartition(".")[0] for _, path, _ in routed_expert_modules(lm)}
    for path, module in lm.named_modules():
        if role_of(module) == "attention":  # the layers' mixers
            kind = "attention"
        elif path in moe_blocks:
            kind = "moe"
        elif path == "lm_head":  # a weight read as large as several layers' attention
            kind = "lm_head"
        else:
            continue
        handles += [module.register_forward_pre_hook(enter(kind)), module.register_forward_hook(leave)]
    try:
        with ExitStack() as caches:
            for _, _, m in routed_expert_modules(lm):
                if isinstance(m, CachedExperts):
                    caches.enter_context(m.profiled(timer))
            yield
    finally:
        for h in handles:
            h.remove()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def run_prompt(lm, n_tokens: int, device, vocab: int, seed: int) -> float:
    """Prefill `n_tokens` random tokens into a fresh cache; seconds."""
    ids = torch.randint(0, vocab, (1, n_tokens), generator=torch.Generator().manual_seed(seed)).to(device)
    caches = lm.make_caches(1, n_tokens)
    _sync(device)
    t0 = time.perf_counter()
    if is_encoder_decoder(lm):  # the prompt is the encoder's; the decoder takes its start token
        lm.encode(ids, caches)
        lm(ids[:, :1], caches, 0, last_only=True)
    else:
        lm(ids, caches, 0, last_only=True)
    _sync(device)
    return time.perf_counter() - t0


@torch.inference_mode()
def run_generation(
    lm, n_tokens: int, device, vocab: int, seed: int, caches: list | None = None, graphs=None
) -> tuple[float, float, int]:
    """Greedy-decode `n_tokens` tokens after a one-token prompt, as llama-bench's tg does,
    eagerly or with `graphs` (a DecodeGraphs over `caches`: replayed CUDA graphs).
    Returns (seconds for the whole run, time to first token, tokens generated)."""
    token = int(torch.randint(0, vocab, (1,), generator=torch.Generator().manual_seed(seed)))
    caches = caches or lm.make_caches(1, n_tokens + 1)
    _sync(device)
    t0 = time.perf_counter()
    ttft, generated = 0.0, 0
    for pos in range(n_tokens):
        if graphs is not None:
            logits = graphs.step(token, pos)
        else:
            logits = lm(torch.tensor([[token]], device=device), caches, pos)
        token = int(logits[0, -1].argmax())  # the host sync a real decode loop has too
        generated += 1
        if pos == 0:
            ttft = time.perf_counter() - t0
    return time.perf_counter() - t0, ttft, generated


def peak_ram_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bench_model(
    bm: BenchModel, test: str, n: int, repetitions: int, vocab: int, progress=None, cuda_graphs: bool = False
) -> dict:
    """One test ("pp" or "tg") of `n` tokens: warm-up, `repetitions` timed runs, then one
    profiled run for the time shares (eager: its section timers hook the modules, which
    replayed graphs would bypass). tg with cuda_graphs decodes through DecodeGraphs; its
    warm-up run captures them."""
    from moerun.graphs import DecodeGraphs

    lm, device = bm.lm, bm.device
    caches = lm.make_caches(1, n + 1) if test == "tg" else None
    graphs = DecodeGraphs(lm, caches, capture_graphs=True) if test == "tg" and cuda_graphs else None

    def once(seed, use_graphs: bool = True):
        if test == "pp":
            return run_prompt(lm, n, device, vocab, seed), 0.0, n
        return run_generation(lm, n, device, vocab, seed, caches, graphs if use_graphs else None)

    once(0)  # warm-up: compiles, fills the cache, touches memory, captures the graphs
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    reset_cache_stats(lm)
    rates, ttfts, counted, wall = [], [], 0, 0.0
    for r in range(repetitions):
        seconds, ttft, tokens = once(r + 1)
        rates.append(tokens / seconds)
        ttfts.append(ttft if test == "tg" else seconds)
        counted += tokens
        wall += seconds
        if progress:
            progress()
    totals = cache_stats(lm).get("total", {})
    timer = SectionTimer(device)
    with profiled(lm, timer):
        t0 = time.perf_counter()
        once(repetitions + 1, use_graphs=False)
        profiled_total = time.perf_counter() - t0
    moe = timer.seconds.get("moe", 0.0)
    copies, cpu_experts = timer.seconds.get("copies", 0.0), timer.seconds.get("cpu_experts", 0.0)
    shares = {
        "attention": timer.seconds.get("attention", 0.0) / profiled_total,
        "experts": max(moe - copies - cpu_experts, 0.0) / profiled_total,
        "copies": copies / profiled_total,
        "cpu_experts": cpu_experts / profiled_total,
        "lm_head": timer.seconds.get("lm_head", 0.0) / profiled_total,
    }
    shares["other"] = max(1.0 - sum(shares.values()), 0.0)
    uses = totals.get("hits", 0) + totals.get("misses", 0)
    return {
        "test": f"{test}{n}",
        "tokens_per_run": n,
        "tokens_counted": counted,
        "repetitions": repetitions,
        "t_s_mean": statistics.mean(rates),
        "t_s_std": statistics.pstdev(rates) if len(rates) > 1 else 0.0,
        "ttft_s": statistics.mean(ttfts),
        "peak_vram_bytes": int(torch.cuda.max_memory_allocated()) if device.type == "cuda" else None,  # n/a
        "peak_ram_bytes": peak_ram_bytes(),
        "expert_hit_rate": totals.get("hits", 0) / uses if uses else 1.0,
        "bytes_copied_per_token": totals.get("bytes_copied", 0) / max(counted, 1),
        # No PCIe on the CPU: the "copies" there are host-to-host.
        "pcie_gb_s": (totals.get("bytes_copied", 0) / wall / 1e9 if wall else 0.0) if device.type == "cuda" else None,
        "cpu_experts_per_token": totals.get("cpu_experts", 0) / max(counted, 1),
        "time_share": shares,
    }


def machine_info() -> dict:
    """Names the machine, as llama-bench's header does."""
    info = {
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_kernels": cpu_experts.isa() or "not built (torch fallback)",
        "ram_bytes": _ram_bytes(),
        "torch": torch.__version__,
        "moerun": moerun.__version__,
        "python": platform.python_version(),
        "gpu": None,
        "vram_bytes": None,
        "driver": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, vram_bytes=props.total_memory, driver=_nvidia_driver(), cuda=torch.version.cuda)
    return info


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def _nvidia_driver() -> str | None:
    try:
        return open("/proc/driver/nvidia/version").readline().split("Kernel Module")[1].split()[0]
    except (OSError, IndexError):
        return None


def sweep(values: str | None, cast=str) -> list:
    """'512,1024' -> [512, 1024]; None -> [None]."""
    if values is None:
        return [None]
    return [cast(v.strip()) for v in str(values).split(",") if v.strip()]


def combinations(**lists) -> list[dict]:
    keys = list(lists)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(lists[k] for k in keys))]


# -- the sweep and its report ------------------------------------------------------------


def run_bench(
    model: str | None = None,
    synthetic: str | None = None,
    prompt_tokens: list[int] = (512,),
    gen_tokens: list[int] = (128,),
    repetitions: int = 3,
    bits: list[int] = (4,),
    vram: list[str | None] = (None,),
    cold: list[str] = ("gpu",),
    cuda_graphs: list[bool] = (True,),
    layers: int | None = None,
    spec: LoadSpec = LoadSpec(),
    progress=None,
) -> dict:
    """Every combination of bits x vram x cold x cuda_graphs, each with every pp and tg
    test (cuda_graphs only matters to tg on CUDA: it is forced off elsewhere). Returns
    {"machine", "rows", "notes"}; a row per (combination, test). spec: the rest of the
    load (device, dtype, ram, ctx, expert slots, threads, ...); each combination's bits,
    vram and cold replace its own."""
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)  # process-wide: the machine info reports it too
    if (model is None) == (synthetic is None):
        raise MoerunError("give a MODEL or --synthetic ALIAS (one of the two)")
    if not 1 <= repetitions <= MAX_REPETITIONS:
        raise MoerunError(f"repetitions must be 1 to {MAX_REPETITIONS}, got {repetitions}")
    for what, counts in (("prompt", prompt_tokens), ("generated", gen_tokens)):
        if any(not isinstance(n, int) or n < 0 for n in counts):
            raise MoerunError(f"{what} token counts must be whole numbers >= 0, got {list(counts)}")
    dev = spec.resolve_device()
    ctx, expert_slots = spec.ctx, spec.expert_slots
    notes = [RANDOM_ROUTING_NOTE] if synthetic else []
    rows = []
    graph_modes = sorted({bool(g) and dev.type == "cuda" for g in cuda_graphs}, reverse=True)
    for combo in combinations(bits=list(bits), vram=list(vram), cold=list(cold), graphs=graph_modes):
        budget = parse_size(combo["vram"]) if combo["vram"] is not None else plan.vram_budget(dev)
        combo_spec = dataclasses.replace(spec, device=dev, bits=combo["bits"], vram=budget, cold=combo["cold"])
        if synthetic:
            from moerun.registry import shipped_config

            config = shipped_config(synthetic)
            if config is None:
                raise MoerunError(
                    f"no shipped config for '{synthetic}': --synthetic takes an alias from `moerun models`"
                )
            bm = synthetic_model(config, synthetic, combo_spec, layers=layers)
            vocab = int(config.get("vocab_size") or config.get("text_config", {}).get("vocab_size"))
            if bm.layers_note and bm.layers_note not in " ".join(notes):
                notes.append(f"{synthetic}: {bm.layers_note}")
        else:
            m = load_spec(model, combo_spec)
            bm = BenchModel(m.lm, model, m.plan, dev, False)
            vocab = m.lm.lm_head.weight.shape[0]
        p = bm.plan
        limit = int(getattr(getattr(bm.lm, "args", None), "max_position_embeddings", None) or 4096)  # as the planner
        pp_counts, tg_counts = _within_context(prompt_tokens, gen_tokens, limit, bm.name, notes)
        if ctx is not None:  # --ctx is the window: a test longer than it is refused, not run past it
            for test, counts, extra in (("pp", pp_counts, 0), ("tg", tg_counts, 1)):
                too_long = [n for n in counts if n + extra > p.ctx]
                if too_long:
                    raise MoerunError(
                        f"{test}{too_long[0]} needs {too_long[0] + extra} positions; the context is "
                        f"{p.ctx} (--ctx {ctx}, at most the model's)"
                    )
        base = {
            "model": bm.name + (" (synthetic)" if bm.synthetic else ""),
            "size_bytes": p.weight_bytes,
            "params": p.total_params,
            "active_params": p.active_params,
            "bits": combo["bits"],
            "budget": (f"{expert_slots} slots/layer" if expert_slots else combo["vram"])
            or ("all" if budget is None else gib(budget)),
            "backend": dev.type + (f" offload cold={combo['cold']}" if p.expert_slots_per_layer < p.n_experts else ""),
            "expert_slots_per_layer": p.expert_slots_per_layer,
            "n_experts": p.n_experts,
            "dtype": p.dtype,
            "decode_bytes_per_token": p.decode_bytes_per_token,
        }
        for test, counts in (("pp", pp_counts), ("tg", tg_counts)):
            for n in counts:
                if not n or (test == "pp" and combo["graphs"] != graph_modes[0]):
                    continue  # prefill never uses graphs: measured once per combination
                graphs = test == "tg" and combo["graphs"]
                backend = base["backend"].replace(dev.type, f"{dev.type}+graphs", 1) if graphs else base["backend"]
                row = {**base, "backend": backend, "cuda_graphs": graphs}
                rows.append({**row, **bench_model(bm, test, n, repetitions, vocab, progress, graphs)})
        del bm
        gc.collect()  # prefetch hooks make reference cycles: free this model before the next
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    machine = machine_info()
    if dev.type == "cpu":
        # The bound of a CPU decode step: every weight byte it reads, at the read bandwidth.
        machine["ram_read_bytes_s"] = read_bandwidth()
        for r in rows:
            if r["test"].startswith("tg"):
                r["bound_t_s"] = machine["ram_read_bytes_s"] / max(r["decode_bytes_per_token"], 1)
    return {"machine": machine, "rows": rows, "notes": notes}


def _within_context(pp: list[int], tg: list[int], limit: int, name: str, notes: list[str]) -> tuple[list, list]:
    """The tests that fit the model's context: the default pp512 / tg128 are clipped to it
    (and a note says so); a size asked for explicitly that does not fit is refused."""

    def clip(test: str, counts: list[int], default: int, room: int) -> list[int]:
        out = []
        for n in counts:
            if n > room and n == default:
                note = f"{name}: {test}{n} clipped to {test}{room}, the model's context ({limit} tokens)"
                if note not in notes:
                    notes.append(note)
                n = room
            elif n > room:
                raise MoerunError(f"{test}{n} needs {n + (test == 'tg')} positions; {name}'s context is {limit} tokens")
            out.append(n)
        return out

    return clip("pp", list(pp), DEFAULT_PP, limit), clip("tg", list(tg), DEFAULT_TG, limit - 1)


def read_bandwidth(megabytes: int = 512) -> float:
    """Bytes/s of a streaming read of host memory on torch's threads (a sum over a buffer
    far beyond the caches; the median of 5)."""
    a = torch.ones(megabytes << 18, dtype=torch.float32)
    a.sum()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t0)
    return a.numel() * 4 / statistics.median(times)


def render_markdown(report: dict, width: int = 80) -> str:
    """llama-bench's table, then the per-test details in narrow tables, then the machine;
    every line but a table row with a long model name fits `width` columns."""
    import textwrap

    na = "n/a"
    lines = [
        "| model | size | params | bits | budget | backend | test | t/s |",
        "|---|---:|---:|---:|---|---|---|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['model']} | {gib(r['size_bytes'])} | {params(r['params'])} | {r['bits']} | {r['budget']} | "
            f"{r['backend']} | {r['test']} | {r['t_s_mean']:.2f} ± {r['t_s_std']:.2f} |"
        )
    # Details keyed by the test, plus whatever the sweep varies (bits, budget, backend).
    rows = report["rows"]
    varying = [k for k in ("bits", "budget", "backend") if len({str(r[k]) for r in rows}) > 1]
    keys = ["test", *varying]

    def table(columns: list[str], cells) -> list[str]:
        out = ["| " + " | ".join(keys + columns) + " |", "|" + "---|" * len(keys) + "---:|" * len(columns)]
        for r in rows:
            out.append("| " + " | ".join([str(r[k]) for k in keys] + cells(r)) + " |")
        return [""] + out

    def memory(r):
        per_token = gib(r["decode_bytes_per_token"]) if r["test"].startswith("tg") else "-"
        vram = gib(r["peak_vram_bytes"]) if r["peak_vram_bytes"] is not None else na
        return [
            f"{r['expert_slots_per_layer']}/{r['n_experts']}",
            f"{r['ttft_s'] * 1000:.1f} ms",
            vram,
            gib(r["peak_ram_bytes"]),
            per_token,
            f"{r['bound_t_s']:.1f}" if "bound_t_s" in r else "-",
        ]

    def experts(r):
        pcie = f"{r['pcie_gb_s']:.2f}" if r["pcie_gb_s"] is not None else na
        return [
            f"{r['expert_hit_rate']:.0%}",
            gib(r["bytes_copied_per_token"]),
            pcie,
            f"{r['cpu_experts_per_token']:.1f}",
        ]

    def shares(r):
        sh = r["time_share"]
        return [f"{sh[k]:.0%}" for k in ("attention", "experts", "copies", "cpu_experts", "lm_head", "other")]

    lines += table(["slots", "TTFT", "peak VRAM", "peak RAM", "read/token", "bound t/s"], memory)
    lines += table(["hit rate", "copied/token", "PCIe GB/s", "CPU experts/token"], experts)
    lines += table(["attention", "experts", "copies", "CPU experts", "lm_head", "other"], shares)
    m = report["machine"]
    gpu = f"{m['gpu']} ({gib(m['vram_bytes'])}, driver {m['driver']})" if m["gpu"] else "none"
    read = f", read {m['ram_read_bytes_s'] / 1e9:.1f} GB/s" if m.get("ram_read_bytes_s") else ""
    text = [
        f"machine: GPU {gpu}; CPU {m['cpu']} ({m['cpu_threads']} threads, kernels {m.get('cpu_kernels')}); "
        f"RAM {gib(m['ram_bytes'] or 0)}{read}; torch {m['torch']}; moerun {m['moerun']}"
    ]
    text += ["note: bound t/s = weight bytes a decode step reads / the measured read bandwidth"] if read else []
    text += [f"note: {n}" for n in report["notes"]]
    text += [
        "note: time shares come from one extra synchronized pass; other = the glue between them: "
        "embeddings, final norm, residuals, sampling, Python"
    ]
    lines.append("")
    for t in text:
        lines += textwrap.wrap(t, width, subsequent_indent="  ", break_on_hyphens=False, break_long_words=False)
    return "\n".join(lines)
