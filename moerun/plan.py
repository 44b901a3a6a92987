"""The memory planner: bytes by role, KV cache, and a budget turned into placement.

One source of truth for `load` (at run time) and `fit` (before a download): both describe
the checkpoint from config.json and the safetensors headers alone, never the weights.

Placement order on the compute device: non-expert weights and the KV cache for the chosen
context first, then as many expert slots per MoE layer as fit. Routed experts that are not
resident live in host RAM.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os

import torch

from moerun.config_checks import text_config
from moerun.errors import MoerunError
from moerun.layers import StateSpec
from moerun.quant.format import ExpertFormat
from moerun.spec import LoadSpec
from moerun.units import gib

ROLES = ("embeddings", "attention", "norms", "routers", "shared_experts", "dense_mlp", "routed_experts", "lm_head")

_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "U8": 1,
    "I8": 1,
    "I16": 2,
    "U16": 2,
    "I32": 4,
    "U32": 4,
    "I64": 8,
    "U64": 8,
    "BOOL": 1,
}


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cpu_computes(dtype: torch.dtype) -> bool:
    """Does this CPU multiply `dtype` matrices at full speed (oneDNN's own test: AVX-512 or
    ARM BF16 for bf16, AVX-512 FP16 / AMX-FP16 for fp16)? float32 always."""
    if dtype == torch.float32:
        return True
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if dtype == torch.float16:
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):  # a torch without oneDNN
        pass
    return False


def stored_dtype(config: dict) -> torch.dtype:
    """The dtype the checkpoint says its weights are in (bf16 when it does not say)."""
    return DTYPES.get(text_config(config).get("torch_dtype") or config.get("dtype") or "bfloat16", torch.bfloat16)


def default_dtype(config: dict, device_type: str) -> torch.dtype:
    """The dtype non-expert weights are computed in unless --dtype says otherwise: the
    checkpoint's own; on a CPU that cannot multiply it at full speed, float32 (a
    half-precision matmul emulated there is several times slower). The one rule `load`
    and `fit` share (with `linear_dtype` for what the matrices are kept in)."""
    stored = stored_dtype(config)
    if device_type == "cpu" and not cpu_computes(stored):
        return torch.float32
    return stored


def linear_dtype(config: dict, device_type: str, compute: torch.dtype) -> torch.dtype:
    """The dtype the nn.Linear matrices are kept in when the compute dtype is `compute`
    (chosen by default_dtype). On a CPU that computes in float32 only because it cannot
    multiply the checkpoint's bf16 / fp16 natively, they stay 16-bit at rest: a decode
    step's GEMVs (attention projections, dense MLPs, lm_head) read them through the C
    kernel, which widens them in registers, so a step reads half the bytes float32 costs,
    and decode is bound by those bytes; a prompt's matmuls widen them per call
    (kernels.cpu_linear). Elsewhere, and without the C kernels, the compute dtype."""
    from moerun.kernels import cpu_experts

    stored = stored_dtype(config)
    if (
        device_type == "cpu"
        and compute == torch.float32
        and stored in (torch.bfloat16, torch.float16)
        and not cpu_computes(stored)
        and cpu_experts.available()
    ):
        return stored
    return compute


@dataclasses.dataclass
class ModelSummary:
    """What the planner needs to know about a model, asked of the model itself: built on
    the meta device from config.json (no weights), it reports its parameters by role, its
    MoE layers and their experts, and each layer's decode state. The checkpoint's headers,
    when there are any, only add what the files store (bytes by role, and the tensors a
    text-only run never loads: a vision tower, multi-token-prediction layers)."""

    params_by_role: dict[str, int]
    stored_bytes_by_role: dict[str, int]
    # Of params_by_role, the nn.Linear matrices' (which linear_dtype may keep 16-bit).
    linear_params_by_role: dict[str, int]
    moe_layers: list[int]
    n_experts: int
    experts_per_token: int
    hidden_size: int
    expert_intermediate_size: int
    n_layers: int
    vocab_size: int
    max_context: int
    # What each layer's decode state costs (KV cache, latent, window ring, recurrent state).
    state_specs: list[StateSpec] = dataclasses.field(default_factory=list)
    # Routed-expert parameters and expert count of each MoE layer.
    routed_by_layer: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)
    # Tensors in the checkpoint the model never loads (vision tower, multi-token-prediction layers).
    unused_params: int = 0
    unused_bytes: int = 0
    warnings: list[str] = dataclasses.field(default_factory=list)
    expert_gated: bool = True  # gate and up rows per expert (False: relu² up rows only, Nemotron-H)

    @property
    def total_params(self) -> int:
        return sum(self.params_by_role.values())

    @property
    def stored_bytes(self) -> int:
        return sum(self.stored_bytes_by_role.values())

    @property
    def kv_kind(self) -> str:
        """The kinds of state the layers keep, for the report ("kv", "mla", "kv+window")."""
        kinds = []
        for spec in self.state_specs:
            kind = spec.kind + ("+window" if spec.window else "")
            if kind not in kinds:
                kinds.append(kind)
        return ", ".join(kinds) or "none"

    @property
    def params_per_expert(self) -> int:
        if self.routed_by_layer:
            params, experts = next(iter(self.routed_by_layer.values()))
            return params // max(experts, 1)
        return 3 * self.hidden_size * self.expert_intermediate_size

    @property
    def active_params(self) -> int:
        """Parameters a token touches: everything but the routed experts it is not sent to
        (embeddings included, as Mixtral's 12.9 B and Qwen3-30B-A3B's 3.3 B count them)."""
        routed = self.params_by_role.get("routed_experts", 0)
        k = self.experts_per_token
        active_routed = sum(p * min(k, e) // max(e, 1) for p, e in self.routed_by_layer.values())
        return self.total_params - routed + active_routed

    def kv_cache_bytes(self, ctx: int, dtype_bytes: int, batch: int = 1) -> int:
        """Bytes of every layer's decode state for `ctx` positions."""
        return sum(spec.nbytes(ctx, dtype_bytes, batch) for spec in self.state_specs)

    def fixed_state_bytes(self, dtype_bytes: int, batch: int = 1) -> int:
        """The part of the decode state that does not grow with the context (recurrent layers)."""
        return sum(spec.fixed_nbytes(dtype_bytes, batch) for spec in self.state_specs)


def _width(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else _DTYPE_BYTES.get(dtype, 2)


def describe_model(lm, config: dict, layout: dict, tensors: dict | None = None) -> ModelSummary:
    """Summarize `lm` (a family's Model, on the meta device or loaded) for the planner.

    layout: the family's checkpoint_tensors(args), name -> (shape, dtype, role).
    tensors: the checkpoint's headers, name -> (shape, dtype), when there are any; names
    the layout lacks are tensors the model never loads. Without headers the layout stands
    in for them (a shipped config, a synthetic model)."""
    from moerun.models.base import SparseMoeBlock, linear_parameters, parameter_roles
    from moerun.moe.offload import routed_expert_modules

    params, linear = dict.fromkeys(ROLES, 0), dict.fromkeys(ROLES, 0)
    linear_names = linear_parameters(lm)
    for name, role in parameter_roles(lm).items():
        params[role] = params.get(role, 0) + lm.get_parameter(name).numel()
        if name in linear_names:
            linear[role] = linear.get(role, 0) + lm.get_parameter(name).numel()
    routed_by_layer, intermediate, gated = {}, 0, True
    for i, _, module in routed_expert_modules(lm):
        routed_by_layer[i] = (module.n_params, module.n_experts)
        intermediate, gated = module.intermediate_size, module.act.gated
    blocks = [m for m in lm.modules() if isinstance(m, SparseMoeBlock)]
    stored = dict.fromkeys(ROLES, 0)
    unused_params = unused_bytes = 0
    for name, entry in (tensors if tensors is not None else layout).items():
        shape, dtype = entry[0], entry[1]
        nbytes = math.prod(shape) * _width(dtype)
        if name in layout:
            stored[layout[name][2]] += nbytes
        else:
            unused_bytes += nbytes
            unused_params += math.prod(shape)
    args = lm.args
    return ModelSummary(
        params_by_role=params,
        stored_bytes_by_role=stored,
        linear_params_by_role=linear,
        moe_layers=sorted(routed_by_layer),
        n_experts=max((e for _, e in routed_by_layer.values()), default=0),
        experts_per_token=blocks[0].top_k if blocks else 0,
        hidden_size=args.hidden_size,
        expert_intermediate_size=intermediate,
        n_layers=args.num_hidden_layers,
        vocab_size=args.vocab_size,
        max_context=int(getattr(args, "max_position_embeddings", None) or 4096),
        state_specs=lm.state_specs(),
        routed_by_layer=routed_by_layer,
        unused_params=unused_params,
        unused_bytes=unused_bytes,
        expert_gated=gated,
    )


def summarize(
    config: dict, tensors: dict[str, tuple[tuple[int, ...], str | torch.dtype]] | None = None
) -> ModelSummary:
    """Describe a checkpoint from its config (the family's model built on the meta device
    and asked) and, when given, its tensors' (shape, dtype) headers: the dtype as
    safetensors names it ("BF16") or as a torch.dtype. A model_type moerun does not
    implement gets a generic estimate from the headers alone, planned as a dense model."""
    from moerun.models import ARCHITECTURES, build_meta_model

    if config.get("model_type") not in ARCHITECTURES:
        return _generic_summary(config, tensors or {})
    lm, arch = build_meta_model(config)
    return describe_model(lm, config, arch.checkpoint_tensors(lm.args), tensors)


def _generic_summary(config: dict, tensors: dict) -> ModelSummary:
    """An architecture moerun does not know: parameters and bytes from the headers, no
    experts (no names are guessed at), no decode state."""
    text = text_config(config)
    n = sum(math.prod(shape) for shape, _ in tensors.values())
    nbytes = sum(math.prod(shape) * _width(dtype) for shape, dtype in tensors.values())
    params, stored = dict.fromkeys(ROLES, 0), dict.fromkeys(ROLES, 0)
    params["dense_mlp"], stored["dense_mlp"] = n, nbytes
    return ModelSummary(
        params_by_role=params,
        stored_bytes_by_role=stored,
        linear_params_by_role={},
        moe_layers=[],
        n_experts=0,
        experts_per_token=0,
        hidden_size=int(text.get("hidden_size") or 0),
        expert_intermediate_size=0,
        n_layers=int(text.get("num_hidden_layers") or 0),
        vocab_size=int(text.get("vocab_size") or 0),
        max_context=int(text.get("max_position_embeddings") or 4096),
        warnings=[
            f"unknown architecture '{config.get('model_type')}': a generic estimate from the headers, "
            "planned as a dense model"
        ],
    )


class Verdict(enum.StrEnum):
    """What a plan says of a model: a string enum, so that reports and JSON carry its word."""

    GPU = "gpu"  # everything resident on the GPU
    RAM = "ram"  # one memory pool (the CPU's RAM, Apple's unified memory) holds it all
    OFFLOAD = "offload"  # some expert slots per layer on the device, every expert in host RAM
    NO = "no"  # it does not fit: `Plan.reason` says why

    @property
    def resident(self) -> bool:
        """Everything in the one place it computes from: no expert copied in or out."""
        return self in (Verdict.GPU, Verdict.RAM)


@dataclasses.dataclass
class Plan:
    """Where everything goes, in bytes, and whether it fits (`verdict`)."""

    bits: int
    dtype: str
    ctx: int
    total_params: int
    active_params: int
    weight_bytes_by_role: dict[str, int]
    non_expert_bytes: int  # resident on the device
    kv_cache_bytes: int  # resident on the device
    expert_blob_bytes: int  # one expert at `bits`
    n_moe_layers: int
    n_experts: int
    expert_slots_per_layer: int
    slot_bytes: int  # resident on the device: slots x layers x blob
    host_store_bytes: int  # all experts in host RAM when offloading
    vram_budget: int | None
    ram_budget: int | None
    verdict: Verdict
    reason: str = ""
    experts_per_token: int = 0
    # One memory pool (the CPU, Apple silicon): `ram_budget` holds the device share too.
    unified: bool = False
    # What the nn.Linear matrices are kept in, when not `dtype`.
    linear_dtype: str | None = None

    @property
    def weight_bytes(self) -> int:
        return sum(self.weight_bytes_by_role.values())

    @property
    def decode_bytes_per_token(self) -> int:
        """Weight bytes one decode step reads: the non-expert weights (less the embedding
        table, of which one row is read) and k experts in every MoE layer."""
        dense = self.non_expert_bytes - self.weight_bytes_by_role.get("embeddings", 0)
        return dense + min(self.experts_per_token, self.n_experts) * self.n_moe_layers * self.expert_blob_bytes

    @property
    def gpu_bytes(self) -> int:
        return self.non_expert_bytes + self.kv_cache_bytes + self.slot_bytes

    @property
    def cpu_bytes(self) -> int:
        return self.host_store_bytes

    @property
    def ram_bytes(self) -> int:
        """Host RAM the plan takes: the expert store, and on one memory pool everything."""
        return self.gpu_bytes + self.host_store_bytes if self.unified else self.host_store_bytes

    def describe(self) -> str:
        """Where it goes, in words: "everything on the GPU (12.00 GiB)", "offload: ...", or
        "does not fit: <reason>"."""
        if self.verdict is Verdict.GPU:
            return f"everything on the GPU ({gib(self.gpu_bytes)})"
        if self.verdict is Verdict.RAM:
            return f"everything in RAM ({gib(self.ram_bytes)})"
        if self.verdict is Verdict.OFFLOAD:
            slots = f"{self.expert_slots_per_layer} of {self.n_experts} expert slots per layer"
            return f"offload: {slots} on the device ({gib(self.gpu_bytes)}), all experts in RAM ({gib(self.cpu_bytes)})"
        return f"does not fit: {self.reason}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(
            weight_bytes=self.weight_bytes, gpu_bytes=self.gpu_bytes, cpu_bytes=self.cpu_bytes, ram_bytes=self.ram_bytes
        )
        return d


def make_plan(
    summary: ModelSummary,
    bits: int,
    dtype: torch.dtype,
    vram: int | None,
    ram: int | None = None,
    ctx: int | None = None,
    expert_slots: int | None = None,
    unified: bool = False,
    linears: torch.dtype | None = None,
) -> Plan:
    """Turn budgets into placement. vram=None means the device holds everything.

    Non-expert weights stay in `dtype` (the nn.Linear matrices in `linears` when given); routed
    experts are stored at `bits` (16 means `dtype`). With fewer slots than experts, the
    host store holds every expert.
    unified: the device is host RAM (the CPU, Apple's unified memory), so `ram` must hold
    the device share and the store together; a plan that holds it all is "ram"."""
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    ctx = min(ctx or min(summary.max_context, 4096), summary.max_context)
    non_expert_roles = [r for r in ROLES if r != "routed_experts"]
    linear_bytes = torch.empty((), dtype=linears).element_size() if linears is not None else dtype_bytes
    by_role = {}
    for r in non_expert_roles:
        matrices = summary.linear_params_by_role.get(r, 0)
        by_role[r] = matrices * linear_bytes + (summary.params_by_role.get(r, 0) - matrices) * dtype_bytes
    E, L = summary.n_experts, len(summary.moe_layers)
    blob = 0
    if E:
        blob = ExpertFormat(
            bits, summary.hidden_size, summary.expert_intermediate_size, dtype, gated=summary.expert_gated
        ).blob_bytes
    by_role["routed_experts"] = blob * E * L
    non_expert = sum(by_role[r] for r in non_expert_roles)
    kv = summary.kv_cache_bytes(ctx, dtype_bytes)

    def plan(slots: int, verdict: Verdict, reason: str = "") -> Plan:
        host = blob * E * L if slots < E else 0
        return Plan(
            bits=bits,
            dtype=str(dtype).removeprefix("torch."),
            ctx=ctx,
            total_params=summary.total_params,
            active_params=summary.active_params,
            weight_bytes_by_role=by_role,
            non_expert_bytes=non_expert,
            kv_cache_bytes=kv,
            expert_blob_bytes=blob,
            n_moe_layers=L,
            n_experts=E,
            expert_slots_per_layer=slots,
            slot_bytes=slots * blob * L,
            host_store_bytes=host,
            vram_budget=vram,
            ram_budget=ram,
            verdict=verdict,
            reason=reason,
            experts_per_token=summary.experts_per_token,
            unified=unified,
            linear_dtype=str(linears).removeprefix("torch.") if linears not in (None, dtype) else None,
        )

    if expert_slots is not None:
        if not E:
            raise MoerunError("expert_slots was given, but this model has no routed experts")
        if not 1 <= expert_slots <= E:
            raise MoerunError(f"expert_slots must be between 1 and {E}, got {expert_slots}")
        p = plan(expert_slots, Verdict.GPU if expert_slots == E else Verdict.OFFLOAD)
    elif vram is None or non_expert + kv + blob * E * L <= vram:
        p = plan(E, Verdict.GPU)
    else:
        room = vram - non_expert - kv
        slots = room // (blob * L) if L and room > 0 else 0
        if slots < 1:
            need = non_expert + kv + blob * L
            return plan(
                0,
                Verdict.NO,
                f"needs at least {gib(need)} of device memory (weights {gib(non_expert)}, "
                f"KV cache {gib(kv)} at {ctx} tokens, one expert slot per layer "
                f"{gib(blob * L)}); the budget is {gib(vram)}",
            )
        p = plan(min(int(slots), E), Verdict.OFFLOAD)
    if unified and p.verdict is Verdict.GPU:
        p.verdict = Verdict.RAM
    if ram is not None and p.ram_bytes > ram:
        p.verdict = Verdict.NO
        if unified:
            parts = f"weights {gib(non_expert + p.slot_bytes)}, KV cache {gib(kv)} at {ctx} tokens"
            if p.host_store_bytes:
                parts += f", expert store {gib(p.host_store_bytes)}"
            p.reason = f"needs {gib(p.ram_bytes)} of RAM ({parts}); the budget is {gib(ram)}"
        else:
            p.reason = f"the expert store needs {gib(p.host_store_bytes)} of RAM; the budget is {gib(ram)}"
    return p


def ram_budget() -> int:
    """The host RAM a plan may take by default: 90% of what is available now (MemAvailable;
    total memory where that cannot be read), the rest for the OS, activations and the
    tokenizer. The one default `load` and `fit` share."""
    return int(0.9 * free_ram())


def free_ram() -> int:
    """Available host memory (MemAvailable), or total memory where that cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


VRAM_RESERVE = 1 << 30  # the least a card keeps back for activations and the CUDA context


def vram_budget(device: torch.device) -> int | None:
    """The device memory a plan may take by default: free memory less a reserve (1 GiB, or
    5% of it on a large card); None on the CPU, where the 'device' is host RAM and holds
    everything unless a budget is set. The one default `load`, `fit` and `bench` share."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return max(int(free - max(VRAM_RESERVE, 0.05 * free)), 0)


def fewer_bits(plans: dict[int, Plan], bits: int) -> list[Plan]:
    """Of `plans` (by bits, at the same budgets), those below `bits` that fit, most bits first."""
    return [p for b, p in sorted(plans.items(), reverse=True) if b < bits and p.verdict is not Verdict.NO]


def bits_hint(plans: dict[int, Plan], bits: int) -> str:
    """For a refusal at `bits`: the fewer bits that fit, as options to pass ("; it fits
    with --bits 8 (19.25 GiB) or --bits 4 (12.10 GiB)"), or ""."""
    fits = [f"--bits {p.bits} ({gib(p.ram_bytes if p.unified else p.gpu_bytes)})" for p in fewer_bits(plans, bits)]
    return f"; it fits with {' or '.join(fits)}" if fits else ""


def plan_load(
    summary: ModelSummary,
    spec: LoadSpec,
    device: torch.device,
    dtype: torch.dtype,
    name: str,
    linears: torch.dtype | None = None,
) -> Plan:
    """The plan for loading `name` as `spec` asks on `device`: its budgets (or the defaults:
    free VRAM less a reserve, most of the available RAM: on the CPU RAM holds it all, so it
    is checked as VRAM is, before anything is allocated); refused with numbers, and with
    the fewer bits that would fit, when it does not."""
    vram = spec.vram if spec.vram is not None else vram_budget(device)
    ram = spec.ram if spec.ram is not None else ram_budget()
    unified = device.type == "cpu"
    chosen = make_plan(
        summary, spec.bits, dtype, vram, ram, spec.ctx, spec.expert_slots, unified=unified, linears=linears
    )
    if chosen.verdict is Verdict.NO:
        hint = ""
        if not spec.expert_slots:  # a refusal with --expert-slots is about those slots, not the bits
            fewer = {
                b: make_plan(summary, b, dtype, vram, ram, spec.ctx, unified=unified, linears=linears) for b in (8, 4)
            }
            hint = bits_hint(fewer, spec.bits)
        raise MoerunError(f"{name} does not fit: {chosen.reason}{hint}")
    return chosen
