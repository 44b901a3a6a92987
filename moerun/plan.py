"""The memory planner: bytes by role, KV cache, and a budget turned into placement.

One source of truth for `load` (at run time) and `fit` (before a download): both describe
the checkpoint from config.json and the safetensors headers alone, never the weights.

Placement order on the compute device: non-expert weights and the KV cache for the chosen
context first, then as many expert slots per MoE layer as fit. Routed experts that are not
resident live in host RAM.
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch

from moerun.errors import MoerunError
from moerun.quant.format import ExpertFormat

ROLES = ("embeddings", "attention", "norms", "routers", "shared_experts", "dense_mlp", "routed_experts", "lm_head")

_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "U8": 1, "I8": 1, "I32": 4, "I64": 8}
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight$")


_ROUTED = re.compile(r"\.experts\.|\.block_sparse_moe\.(?:input|output)_linear\.")


def is_routed_expert(name: str) -> bool:
    """A routed expert's tensor (per-expert, stacked or fused, as Granite's input_linear),
    not a shared expert's."""
    return bool(_ROUTED.search(name)) and "shared" not in name


def classify(name: str) -> str:
    """The role of a checkpoint tensor, from its name."""
    if is_routed_expert(name):
        return "routed_experts"
    if "embed_tokens" in name:
        return "embeddings"
    if name.startswith("lm_head"):
        return "lm_head"
    if "shared_expert" in name:
        return "shared_experts"
    if "self_attn" in name:
        return "attention"
    if re.search(r"\.(block_sparse_moe|mlp)\.gate\.weight$", name) or ".router." in name:
        return "routers"
    if "norm" in name:
        return "norms"
    return "dense_mlp"


@dataclasses.dataclass
class ModelSummary:
    """What the planner needs to know about a checkpoint, from config.json and headers."""

    params_by_role: dict[str, int]
    stored_bytes_by_role: dict[str, int]
    moe_layers: list[int]
    n_experts: int
    experts_per_token: int
    hidden_size: int
    expert_intermediate_size: int
    n_layers: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int

    @property
    def total_params(self) -> int:
        return sum(self.params_by_role.values())

    @property
    def params_per_expert(self) -> int:
        return 3 * self.hidden_size * self.expert_intermediate_size

    @property
    def active_params(self) -> int:
        """Parameters a token touches: everything but the routed experts it is not sent to."""
        routed = self.params_by_role.get("routed_experts", 0)
        active_routed = len(self.moe_layers) * self.experts_per_token * self.params_per_expert
        return self.total_params - routed + active_routed

    def kv_cache_bytes(self, ctx: int, dtype_bytes: int, batch: int = 1) -> int:
        return 2 * self.n_layers * batch * self.n_kv_heads * self.head_dim * ctx * dtype_bytes


def summarize(config: dict, tensors: dict[str, tuple[tuple[int, ...], str | torch.dtype]]) -> ModelSummary:
    """Describe a checkpoint from its config and its tensors' (shape, dtype): the dtype as
    safetensors names it ("BF16") or as a torch.dtype. A tied lm_head is not a tensor of
    its own and is counted once, as the embeddings."""
    params = dict.fromkeys(ROLES, 0)
    stored = dict.fromkeys(ROLES, 0)
    layers: dict[int, set[int]] = {}
    intermediate = 0
    for name, (shape, dtype) in tensors.items():
        role = classify(name)
        n = math.prod(shape)
        params[role] += n
        width = torch.empty((), dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else _DTYPE_BYTES.get(dtype, 2)
        stored[role] += n * width
        m = _EXPERT.match(name)
        if m:
            layers.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
            if m.group(3) in ("w1", "gate_proj"):
                intermediate = shape[0]
    n_heads = int(config.get("num_attention_heads") or 1)
    hidden = int(config.get("hidden_size") or 0)
    head_dim = config.get("head_dim") or (hidden // n_heads if n_heads else 0)
    return ModelSummary(
        params_by_role=params,
        stored_bytes_by_role=stored,
        moe_layers=sorted(layers),
        n_experts=max((len(v) for v in layers.values()), default=0),
        experts_per_token=int(config.get("num_experts_per_tok") or 0),
        hidden_size=hidden,
        expert_intermediate_size=intermediate,
        n_layers=int(config.get("num_hidden_layers") or 0),
        n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
        head_dim=int(head_dim),
        vocab_size=int(config.get("vocab_size") or 0),
        max_context=int(config.get("max_position_embeddings") or 4096),
    )


@dataclasses.dataclass
class Plan:
    """Where everything goes, in bytes. `verdict`: "gpu" (all resident on the device),
    "offload" (some expert slots per layer, the rest in host RAM) or "no"."""

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
    verdict: str
    reason: str = ""

    @property
    def weight_bytes(self) -> int:
        return sum(self.weight_bytes_by_role.values())

    @property
    def gpu_bytes(self) -> int:
        return self.non_expert_bytes + self.kv_cache_bytes + self.slot_bytes

    @property
    def cpu_bytes(self) -> int:
        return self.host_store_bytes

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(weight_bytes=self.weight_bytes, gpu_bytes=self.gpu_bytes, cpu_bytes=self.cpu_bytes)
        return d


def make_plan(
    summary: ModelSummary,
    bits: int,
    dtype: torch.dtype,
    vram: int | None,
    ram: int | None = None,
    ctx: int | None = None,
    expert_slots: int | None = None,
) -> Plan:
    """Turn budgets into placement. vram=None means the device holds everything.

    Non-expert weights stay in `dtype`; routed experts are stored at `bits` (16 means
    `dtype`). With fewer slots than experts, the host store holds every expert."""
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    ctx = min(ctx or min(summary.max_context, 4096), summary.max_context)
    non_expert_roles = [r for r in ROLES if r != "routed_experts"]
    by_role = {r: summary.params_by_role.get(r, 0) * dtype_bytes for r in non_expert_roles}
    E, L = summary.n_experts, len(summary.moe_layers)
    blob = 0
    if E:
        blob = ExpertFormat(bits, summary.hidden_size, summary.expert_intermediate_size, dtype).blob_bytes
    by_role["routed_experts"] = blob * E * L
    non_expert = sum(by_role[r] for r in non_expert_roles)
    kv = summary.kv_cache_bytes(ctx, dtype_bytes)

    def plan(slots: int, verdict: str, reason: str = "") -> Plan:
        host = blob * E * L if slots < E else 0
        return Plan(
            bits=bits, dtype=str(dtype).removeprefix("torch."), ctx=ctx,
            total_params=summary.total_params, active_params=summary.active_params,
            weight_bytes_by_role=by_role, non_expert_bytes=non_expert, kv_cache_bytes=kv,
            expert_blob_bytes=blob, n_moe_layers=L, n_experts=E, expert_slots_per_layer=slots,
            slot_bytes=slots * blob * L, host_store_bytes=host, vram_budget=vram, ram_budget=ram,
            verdict=verdict, reason=reason,
        )  # fmt: skip

    if expert_slots is not None:
        if not E:
            raise MoerunError("expert_slots was given, but this model has no routed experts")
        if not 1 <= expert_slots <= E:
            raise MoerunError(f"expert_slots must be between 1 and {E}, got {expert_slots}")
        p = plan(expert_slots, "gpu" if expert_slots == E else "offload")
    elif vram is None or non_expert + kv + blob * E * L <= vram:
        p = plan(E, "gpu")
    else:
        room = vram - non_expert - kv
        slots = room // (blob * L) if L and room > 0 else 0
        if slots < 1:
            need = non_expert + kv + blob * L
            return plan(0, "no", f"needs at least {gib(need)} of device memory (weights {gib(non_expert)}, "
                                 f"KV cache {gib(kv)} at {ctx} tokens, one expert slot per layer "
                                 f"{gib(blob * L)}); the budget is {gib(vram)}")  # fmt: skip
        p = plan(min(int(slots), E), "offload")
    if ram is not None and p.host_store_bytes > ram:
        p.verdict = "no"
        p.reason = f"the expert store needs {gib(p.host_store_bytes)} of RAM; the budget is {gib(ram)}"
    return p


def gib(n: int | float) -> str:
    """Bytes for people: GiB, MiB or KiB, whichever reads best."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}  # fmt: skip


def parse_size(text: str | int | None) -> int | None:
    """'12GiB', '12GB', '12000MB', '1.5g', 123 -> bytes (GiB/MiB binary, GB/MB decimal)."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise MoerunError(f"cannot read size '{text}': use e.g. 12GiB, 12GB or 12000MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
