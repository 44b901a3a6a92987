"""`moerun fit`: will a model fit this machine, and how fast could it decode, before any
download. Reads config.json and the safetensors headers only (a local folder, the Hub by
HTTP range requests, or a shipped config for an alias), then asks the one planner
(`moerun.plan`, which `load` also uses) for a placement at 16, 8 and 4 bits.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from moerun import gpus, hub, plan, registry
from moerun.errors import MoerunError
from moerun.models import check_config
from moerun.plan import Verdict
from moerun.spec import check_bits, dtype_name, parse_size
from moerun.units import gib
from moerun.weights import CheckpointWeights

# Conservative bandwidths used when nothing can be measured (bytes/s): a mid-range
# consumer card, PCIe 4.0 x16 as achieved by pinned copies, dual-channel DDR4/DDR5.
DEFAULT_VRAM_BW = 400e9
DEFAULT_PCIE_BW = 16e9
DEFAULT_RAM_BW = 30e9


# -- metadata: config + (shape, dtype) of every tensor, from wherever it can be had -------------


@dataclasses.dataclass
class Metadata:
    config: dict
    tensors: dict[str, tuple[tuple[int, ...], str | torch.dtype]] | None  # None: no headers (shipped config)
    source: str  # "folder", "cache", "hub" or "shipped config"
    name: str
    download_bytes: int | None = None  # what `pull` would fetch (None: unknown or local)
    bytes_read: int = 0  # metadata bytes received from the network


def folder_metadata(folder: Path, source: str, name: str) -> Metadata:
    config = hub.read_config(folder)
    check_config(config, Path(folder) / "config.json")
    with CheckpointWeights.open(folder) as ckpt:
        tensors = ckpt.headers()
    return Metadata(config, tensors, source, name)


def hub_metadata(repo_id: str, revision: str | None = None) -> Metadata:
    repo = hub.remote_repo(repo_id, revision)
    counter = hub.ByteCounter()
    if "config.json" not in repo.files:
        raise MoerunError(f"{repo_id} has no config.json: not a transformers model repo")
    config = hub.read_remote_json(repo, "config.json", counter)
    check_config(config, f"config.json of {repo_id}")
    tensors = hub.read_remote_headers(repo, counter)
    return Metadata(config, tensors, "hub", repo_id, download_bytes=repo.size, bytes_read=counter.n)


def shipped_metadata(alias: str) -> Metadata | None:
    """The config shipped for `alias`, without headers: the family's own description of
    its checkpoint (checkpoint_tensors) stands in for them."""
    config = registry.shipped_config(alias)
    if config is None:
        return None
    return Metadata(config, None, "shipped config", alias)


def metadata(name: str, revision: str | None = None, offline_ok: bool = True) -> Metadata:
    """A folder; else a repo in the local cache; else the Hub; else (offline) the config
    shipped for an alias, with tensor shapes derived from it."""
    text = name.strip()
    if text and Path(text).expanduser().is_dir():
        return folder_metadata(hub.resolve(text), "folder", text)
    repo_id = hub.repo_id_for(text)
    if repo_id is None:
        return folder_metadata(hub.resolve(text), "folder", text)  # the demo, or a clear error
    if hub.is_cached(repo_id, revision):
        folder = hub.resolve(repo_id, revision)
        if any(folder.glob("*.safetensors")):
            return folder_metadata(folder, "cache", repo_id)
    shipped = (shipped_metadata(text) or _shipped_for_repo(repo_id)) if offline_ok and not revision else None
    if hub.is_offline() and shipped is not None:
        return shipped
    try:
        return hub_metadata(repo_id, revision)
    except hub.HubUnreachable:
        if shipped is None:
            raise
        return shipped


def _shipped_for_repo(repo_id: str) -> Metadata | None:
    alias = registry.alias_for_repo(repo_id)
    return shipped_metadata(alias.name) if alias else None


# -- budgets and bandwidths --------------------------------------------------------------------


@dataclasses.dataclass
class Bandwidths:
    vram: float
    pcie: float
    ram: float
    source: dict[str, str]  # each: "measured", "from device properties" or "default"


def bandwidths(cuda: bool, measure: bool = True) -> Bandwidths:
    """VRAM from the device's memory clock and bus width, RAM by timing a 256 MiB copy,
    PCIe by timing a pinned host->device copy; conservative defaults otherwise."""
    vram, pcie, ram = DEFAULT_VRAM_BW, DEFAULT_PCIE_BW, DEFAULT_RAM_BW
    src = {"vram": "default", "pcie": "default", "ram": "default"}
    if measure:
        try:
            a = torch.empty(64 << 20, dtype=torch.float32)
            b = torch.empty_like(a)
            b.copy_(a)
            t = time.perf_counter()
            for _ in range(3):
                b.copy_(a)
            # a copy reads and writes every byte
            ram, src["ram"] = 2 * 3 * a.numel() * 4 / (time.perf_counter() - t), "measured"
        except RuntimeError:
            pass
    if cuda:
        props = torch.cuda.get_device_properties(0)
        clock, bus = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
        if clock and bus:  # kHz, bits; double data rate
            vram, src["vram"] = 2 * clock * 1e3 * bus / 8, "from device properties"
        if measure:
            host = torch.empty(64 << 20, dtype=torch.uint8, pin_memory=True)
            dev = torch.empty_like(host, device="cuda")
            dev.copy_(host)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(3):
                dev.copy_(host, non_blocking=True)
            torch.cuda.synchronize()
            pcie, src["pcie"] = 3 * host.numel() / (time.perf_counter() - t), "measured"
    return Bandwidths(vram, pcie, ram, src)


# -- the answer --------------------------------------------------------------------------------


@dataclasses.dataclass
class FitReport:
    meta: Metadata
    summary: plan.ModelSummary
    plan: plan.Plan
    plans: dict[int, plan.Plan]  # bits -> plan at the same budgets
    recommended_bits: int | None
    device: str  # "cuda" (this GPU, or the one planned), "cpu" (host RAM computes) or "unified" (Apple)
    dtype: torch.dtype
    bw: Bandwidths
    tok_s: tuple[float, float]  # decode bounds at batch 1: (low, high)
    warnings: list[str]
    gpu: gpus.Gpu | None = None  # the card planned for (--gpu), None: this machine
    suggestions: list[str] = dataclasses.field(default_factory=list)  # the smallest changes that make it fit

    def to_dict(self) -> dict:
        p, s = self.plan, self.summary
        need = 0
        if p.verdict is Verdict.NO:
            if p.vram_budget is not None and p.gpu_bytes > p.vram_budget:
                need = p.gpu_bytes - p.vram_budget
            elif p.ram_budget is not None:
                need = p.ram_bytes - p.ram_budget
        return {
            "model": self.meta.name,
            "source": self.meta.source,
            "model_type": self.meta.config.get("model_type"),
            "total_params": s.total_params,
            "active_params": s.active_params,
            "params_by_role": s.params_by_role,
            "unused_params": s.unused_params,
            "stored_bytes": s.stored_bytes + s.unused_bytes,
            "download_bytes": self.meta.download_bytes,
            "metadata_bytes_read": self.meta.bytes_read,
            "bits": p.bits,
            "dtype": p.dtype,
            "device": self.device,
            "gpu": dataclasses.asdict(self.gpu) if self.gpu else None,
            "weight_bytes": p.weight_bytes,
            "weight_bytes_by_role": p.weight_bytes_by_role,
            "ctx": p.ctx,
            "kv_cache_bytes": p.kv_cache_bytes,
            "decode_bytes_per_token": p.decode_bytes_per_token,
            # Of which recurrent state: a fixed size, whatever the context.
            "fixed_state_bytes": s.fixed_state_bytes(torch.empty((), dtype=self.dtype).element_size()),
            "kv_kind": s.kv_kind,
            "gpu_bytes": p.gpu_bytes,
            "cpu_bytes": p.cpu_bytes,
            "ram_bytes": p.ram_bytes,
            "vram_budget": p.vram_budget,
            "ram_budget": p.ram_budget,
            "n_moe_layers": p.n_moe_layers,
            "n_experts": p.n_experts,
            "experts_per_token": s.experts_per_token,
            "expert_slots_per_layer": p.expert_slots_per_layer,
            "verdict": p.verdict,
            "reason": p.reason,
            "short_by_bytes": max(need, 0),
            "verdicts_by_bits": {str(b): q.verdict for b, q in self.plans.items()},
            "recommended_bits": self.recommended_bits,
            "suggestions": self.suggestions,
            "decode_tok_s": {"low": self.tok_s[0], "high": self.tok_s[1]},
            "bandwidths": {"vram": self.bw.vram, "pcie": self.bw.pcie, "ram": self.bw.ram, "source": self.bw.source},
            "warnings": self.warnings,
        }


def recommend(plans: dict[int, plan.Plan]) -> int | None:
    """The most bits that keep everything resident (on the GPU, or in the one memory
    pool); else the fewest bits that offload (fewest bytes per miss); None when nothing fits."""
    for bits in (16, 8, 4):
        if bits in plans and plans[bits].verdict.resident:
            return bits
    for bits in (4, 8, 16):
        if bits in plans and plans[bits].verdict is Verdict.OFFLOAD:
            return bits
    return None


def decode_bounds(s: plan.ModelSummary, p: plan.Plan, bw: Bandwidths, device: str) -> tuple[float, float]:
    """Tokens/s at batch 1 from the bytes each token reads: the non-expert weights (less the
    embedding table, of which one row is read) and k experts per MoE layer. High: every
    expert resident. Low: every routed expert a miss, copied over PCIe or computed from RAM,
    whichever is faster (moerun --cold auto)."""
    if p.verdict is Verdict.NO:
        return 0.0, 0.0
    experts = min(s.experts_per_token, p.n_experts) * p.n_moe_layers * p.expert_blob_bytes
    dense = p.decode_bytes_per_token - experts
    local = bw.vram if device == "cuda" else bw.ram
    high = local / max(p.decode_bytes_per_token, 1)
    if p.verdict.resident or device != "cuda":  # one memory pool: every expert is read from it anyway
        return high, high
    miss = experts / max(bw.pcie, bw.ram)
    return 1 / (dense / local + miss), high


# Beyond this, no one machine holds the model: eight cards of the 80 GB class.
ONE_MACHINE_BYTES = 8 * gpus.DATACENTER.memory_bytes


def suggest(
    summary: plan.ModelSummary,
    plans: dict[int, plan.Plan],
    chosen: plan.Plan,
    dtype: torch.dtype,
    unified: bool,
    card: gpus.Gpu | None,
) -> list[str]:
    """When `chosen` does not fit: the smallest changes that make it fit, each one line:
    fewer bits; else a shorter context; else more RAM (or a larger card); and when no one
    machine holds the model at these bits, the engines that serve it across machines."""
    if chosen.verdict is not Verdict.NO:
        return []
    out = []
    vram, ram, ctx = chosen.vram_budget, chosen.ram_budget, chosen.ctx
    linears = plan.DTYPES[chosen.linear_dtype] if chosen.linear_dtype else None
    fewer = plan.fewer_bits(plans, chosen.bits)
    if fewer:
        q = fewer[0]
        need = q.ram_bytes if q.unified else q.gpu_bytes
        out.append(f"--bits {q.bits}: {_fits_words(q)} ({gib(need)})")
    chip = card is not None and card.unified  # its memory is the chip's: a larger chip, not more RAM
    low = min(chosen.bits, 4) if not fewer else None  # bits alone do not do it: try the rest at 4 bits
    if low is not None:
        shorter = ctx // 2
        while shorter >= 256:
            q = plan.make_plan(summary, low, dtype, vram, ram, shorter, unified=unified, linears=linears)
            if q.verdict is not Verdict.NO:
                out.append(f"--bits {low} --ctx {shorter}: {_fits_words(q, chip)}")
                break
            shorter //= 2
        q = plan.make_plan(summary, low, dtype, vram, None, ctx, unified=unified, linears=linears)  # more RAM, same GPU
        if q.verdict is not Verdict.NO and not chip:
            out.append(f"--bits {low} with {gib(q.ram_bytes)} of RAM: {_fits_words(q)}")
        else:  # a larger card (or chip), with the RAM that then takes
            budget = vram if not unified else ram
            for g in sorted((g for g in gpus.GPUS.values() if g.unified == unified), key=lambda g: g.memory_gib):
                if budget is not None and g.memory_bytes <= budget:
                    continue
                q = plan.make_plan(
                    summary,
                    low,
                    dtype,
                    None if unified else g.memory_bytes,
                    g.memory_bytes if unified else None,
                    ctx,
                    unified=unified,
                    linears=linears,
                )
                if q.verdict is not Verdict.NO:
                    extra = f" with {gib(q.ram_bytes)} of RAM" if not unified and q.ram_bytes > (ram or 0) else ""
                    out.append(
                        f"--bits {low} on a {g.memory_gib} GiB {'chip' if unified else 'card'} "
                        f"(--gpu {g.key}){extra}: {_fits_words(q, chip)}"
                    )
                    break
    need = chosen.non_expert_bytes + chosen.kv_cache_bytes + chosen.weight_bytes_by_role.get("routed_experts", 0)
    if need > ONE_MACHINE_BYTES:
        per = gpus.DATACENTER
        n = -(-need // int(0.9 * per.memory_bytes))
        line = (
            f"at {chosen.bits} bits no one machine holds its {gib(need)}: vLLM or SGLang with "
            f"expert parallelism serve it across machines, on ~{n} GPUs of 80 GB"
        )
        if card is not None and not card.unified:
            line += f" (~{-(-need // int(0.9 * card.memory_bytes))} of the {card.key})"
        out.append(line)
    return out


def _fits_words(p: plan.Plan, chip: bool = False) -> str:
    if p.verdict is Verdict.GPU:
        return "fits on the GPU"
    if p.verdict is Verdict.RAM:
        return "fits in unified memory" if chip else "fits in RAM"
    return f"offload, {p.expert_slots_per_layer} of {p.n_experts} experts per layer on the GPU"


def fit(
    name: str,
    bits: int | None = None,
    vram: int | str | None = None,
    ram: int | str | None = None,
    ctx: int | None = None,
    revision: str | None = None,
    dtype: str | None = None,
    measure: bool = True,
    meta: Metadata | None = None,
    gpu: str | None = None,
    ram_bandwidth: str | None = None,
) -> FitReport:
    """Plan `name` (alias, repo id or folder) for this machine, or for the card `gpu` (see
    moerun.gpus; or a bare `vram` budget) in a host with `ram`: a size ("32GiB"), a memory
    spec ("ddr5-5600x2", its bandwidth) or both ("32GiB,ddr5-5600x2"). A GPU that is
    planned, this one or another, computes in the checkpoint's 16-bit dtype; only this
    machine's CPU may need float32."""
    if bits is not None:
        check_bits(bits)
    card = gpus.gpu(gpu) if gpu else None
    if card is not None and vram is not None:
        raise MoerunError("give --gpu or --vram, not both (--gpu sets the card's memory)")
    ram_size, ram_bw = gpus.parse_ram(ram) if isinstance(ram, str) else (ram, None)
    if ram_bandwidth is not None:
        ram_bw = gpus.parse_bandwidth(ram_bandwidth)
    meta = meta or metadata(name, revision)
    summary = plan.summarize(meta.config, meta.tensors)
    cuda = torch.cuda.is_available()
    vram_budget, ram_budget = parse_size(vram), parse_size(ram_size)
    if card is not None and card.unified:
        device, ram_budget = "unified", ram_budget or card.memory_bytes
    elif card is not None or vram_budget is not None:
        # A GPU of that size, maybe not here (--vram 0 too: a card with no room, not no card).
        device, vram_budget = "cuda", vram_budget if vram_budget is not None else card.memory_bytes
    elif cuda:
        device, vram_budget = "cuda", plan.vram_budget(torch.device("cuda"))
    else:
        device = "cpu"
    if ram_budget is None:
        ram_budget = plan.ram_budget()
    unified = device != "cuda"
    warnings = list(summary.warnings)
    dtype = dtype_name(dtype)
    if dtype == "auto":  # as moerun.load chooses
        device_type = "cpu" if device == "cpu" else "cuda"
        torch_dtype = plan.default_dtype(meta.config, device_type)
        linears = plan.linear_dtype(meta.config, device_type, torch_dtype)
    else:
        torch_dtype = linears = plan.DTYPES[dtype]
    if device == "cpu":
        compute_dtype = str(torch_dtype).removeprefix("torch.")
        if linears != torch_dtype:
            compute_dtype += f", matrices kept {str(linears).removeprefix('torch.')}"
        warnings.append(f"no CUDA GPU: planned for the CPU, host RAM holds it all ({compute_dtype} unless --dtype)")
    plans = {
        b: plan.make_plan(summary, b, torch_dtype, vram_budget, ram_budget, ctx, unified=unified, linears=linears)
        for b in (16, 8, 4)
    }
    recommended = recommend(plans)
    chosen = plans[bits or recommended or 4]
    if meta.source == "shipped config":
        warnings.append(
            "the Hub was not reached (offline): sizes from the config shipped with moerun, not the repo's headers"
        )
    bw = bandwidths(cuda and card is None, measure)
    if card is not None:
        bw.vram, bw.source["vram"] = card.bandwidth, f"{card.key} table"
        bw.pcie, bw.source["pcie"] = card.pcie_bandwidth, f"{card.key} table" if not card.unified else "n/a"
        if card.unified:
            bw.ram, bw.source["ram"] = card.bandwidth, f"{card.key} table"
    if ram_bw is not None:
        bw.ram, bw.source["ram"] = ram_bw, "given"
    report = FitReport(
        meta,
        summary,
        chosen,
        plans,
        recommended,
        device,
        torch_dtype,
        bw,
        decode_bounds(summary, chosen, bw, device),
        warnings,
        card,
    )
    report.suggestions = suggest(summary, plans, chosen, torch_dtype, unified, card)
    return report


def quick_verdict(name: str, offline_only: bool = True) -> FitReport | None:
    """A fit from metadata already on this machine (the cache, or the shipped config),
    without the network; None when there is none."""
    try:
        repo_id = hub.repo_id_for(name)
        if repo_id and hub.is_cached(repo_id) and any(hub.resolve(repo_id).glob("*.safetensors")):
            meta = folder_metadata(hub.resolve(repo_id), "cache", name)
        else:
            meta = shipped_metadata(name)
        if meta is None:
            return None
        return fit(name, meta=meta, measure=False)
    except MoerunError:
        return None
