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

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "U8": 1, "I8": 1,
                "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8, "BOOL": 1}  # fmt: skip
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EXPERT_INDEX = re.compile(r"\.experts\.(\d+)\.")
# Quantization side tensors: stored bytes, but not parameters (FP8 block scales, MXFP4 scales).
_SCALE = re.compile(r"(?:weight_scale_inv|weight_scale|_scales|\.scales)$")
# MXFP4 blocks (gpt-oss): two 4-bit values per stored byte.
_FP4_BLOCKS = re.compile(r"_blocks$")
# Tensors a text-only run never loads: vision towers and projectors of multimodal checkpoints.
_NOT_TEXT = re.compile(r"^(?:vision_model|vision_tower|visual|multi_modal_projector|mm_projector|audio)")
# Multimodal checkpoints prefix the text model (Llama 4: language_model.model.layers...).
_TEXT_PREFIX = re.compile(r"^(?:model\.)?language_model\.")


_ROUTED = re.compile(r"\.experts\.|\.block_sparse_moe\.(?:input|output)_linear\.")


def is_routed_expert(name: str) -> bool:
    """A routed expert's tensor (per-expert, stacked or fused, as Granite's input_linear),
    not a shared expert's."""
    return bool(_ROUTED.search(name)) and "shared" not in name


def classify(name: str) -> str:
    """The role of a checkpoint tensor, from its name."""
    name = _TEXT_PREFIX.sub("", name)
    if is_routed_expert(name):
        return "routed_experts"
    if "embed_tokens" in name or name.endswith("wte.weight"):
        return "embeddings"
    if name.startswith("lm_head"):
        return "lm_head"
    if "shared_expert" in name:
        return "shared_experts"
    if "self_attn" in name:
        return "attention"
    if re.search(r"\.(block_sparse_moe|mlp)\.gate\.(weight|e_score_correction_bias)$", name) or ".router." in name:
        return "routers"
    if "norm" in name:
        return "norms"
    return "dense_mlp"


def _text_config(config: dict) -> dict:
    """The language model's config: multimodal checkpoints (Llama 4) nest it in text_config."""
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config


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


def default_dtype(config: dict, device_type: str) -> torch.dtype:
    """The dtype non-expert weights are kept and computed in unless --dtype says otherwise:
    the checkpoint's own; on a CPU that cannot multiply it at full speed, float32 (twice
    the RAM and the bytes per token, but a half-precision matmul emulated there is slower
    still). The one rule `load` and `fit` share."""
    stored = DTYPES.get(_text_config(config).get("torch_dtype") or config.get("dtype") or "bfloat16", torch.bfloat16)
    if device_type == "cpu" and not cpu_computes(stored):
        return torch.float32
    return stored


def _first(config: dict, *keys, default=0):
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return default


@dataclasses.dataclass
class ModelSummary:
    """What the planner needs to know about a checkpoint, from config.json and headers.

    Parameters are counted from the tensors' shapes (MXFP4 blocks hold two per byte;
    quantization scales are bytes, not parameters); stored bytes are what the files hold.
    """

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
    # KV cache elements per token for each layer, with that layer's window (None: full context).
    kv_layers: list[tuple[int, int | None]] = dataclasses.field(default_factory=list)
    # Routed-expert parameters and expert count of each MoE layer.
    routed_by_layer: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)
    # Tensors a text-only run never loads (vision tower, multi-token-prediction layers).
    unused_params: int = 0
    unused_bytes: int = 0
    kv_kind: str = "gqa"  # "gqa" or "mla" (the cache holds the compressed latent)
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def total_params(self) -> int:
        return sum(self.params_by_role.values())

    @property
    def stored_bytes(self) -> int:
        return sum(self.stored_bytes_by_role.values())

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
        return batch * dtype_bytes * sum(elems * min(ctx, window or ctx) for elems, window in self.kv_layers)


def _kv_layers(text: dict, n_layers: int, n_kv_heads: int, head_dim: int) -> tuple[list, str]:
    """KV cache elements per token per layer. MLA (DeepSeek) caches the compressed latent
    and the shared rope key, kv_lora_rank + qk_rope_head_dim, not 2 x heads x head_dim."""
    if text.get("kv_lora_rank"):
        per = int(text["kv_lora_rank"]) + int(text.get("qk_rope_head_dim") or 0)
        return [(per, None)] * n_layers, "mla"
    per = 2 * n_kv_heads * head_dim
    types = text.get("layer_types")
    window = text.get("sliding_window")
    if isinstance(types, list) and len(types) == n_layers and window:
        return [(per, int(window) if t == "sliding_attention" else None) for t in types], "gqa"
    return [(per, None)] * n_layers, "gqa"


def summarize(config: dict, tensors: dict[str, tuple[tuple[int, ...], str | torch.dtype]]) -> ModelSummary:
    """Describe a checkpoint from its config and its tensors' (shape, dtype): the dtype as
    safetensors names it ("BF16") or as a torch.dtype. A tied lm_head is not a tensor of
    its own and is counted once, as the embeddings.

    Routed experts are found by name in every layout moerun knows: one tensor per expert
    (`experts.{e}.w1`, `experts.{e}.gate_proj`), stacked (`experts.gate_up_proj` [E, ...],
    gpt-oss MXFP4 `_blocks`), or fused (Granite's `input_linear` [E, 2I, D]). A checkpoint
    whose experts cannot be found is planned as a dense model, with a warning."""
    text = _text_config(config)
    n_layers = int(_first(text, "num_hidden_layers", "n_layer", "num_layers"))
    params = dict.fromkeys(ROLES, 0)
    stored = dict.fromkeys(ROLES, 0)
    unused_params = unused_bytes = 0
    per_expert: dict[int, set[int]] = {}  # layer -> expert ids seen in per-expert names
    stacked: dict[int, int] = {}  # layer -> E from a stacked tensor's first dim
    routed: dict[int, int] = {}  # layer -> routed parameters
    intermediate = 0
    for name, (shape, dtype) in tensors.items():
        width = torch.empty((), dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else _DTYPE_BYTES.get(dtype, 2)
        n = math.prod(shape)
        nbytes = n * width
        n_params = 0 if _SCALE.search(name) else (2 * n if _FP4_BLOCKS.search(name) else n)
        layer = _LAYER.search(name)
        if _NOT_TEXT.match(name) or (layer and n_layers and int(layer.group(1)) >= n_layers):
            # Vision towers, and DeepSeek-V3's multi-token-prediction layer (index num_hidden_layers).
            unused_params += n_params
            unused_bytes += nbytes
            continue
        role = classify(name)
        params[role] += n_params
        stored[role] += nbytes
        if role != "routed_experts" or layer is None:
            continue
        L = int(layer.group(1))
        routed[L] = routed.get(L, 0) + n_params
        m = _EXPERT_INDEX.search(name)
        if m:
            per_expert.setdefault(L, set()).add(int(m.group(1)))
            if re.search(r"\.(w1|gate_proj)\.weight$", name):
                intermediate = shape[0]
        elif n_params and len(shape) >= 2:
            stacked[L] = max(stacked.get(L, 0), shape[0])
            if len(shape) >= 3 and re.search(r"gate_up|input_linear", name):
                # [E, 2I, D] (Granite), [E, 2I, D/32, 16] (gpt-oss MXFP4) or [E, D, 2I] (Llama 4)
                hidden_ = int(_first(text, "hidden_size", "n_embd", "d_model"))
                intermediate = (shape[1] if shape[1] != hidden_ else shape[2]) // 2
    experts_by_layer = {L: len(per_expert.get(L, ())) or stacked.get(L, 0) for L in routed}
    routed_by_layer = {L: (routed[L], experts_by_layer[L]) for L in sorted(routed) if experts_by_layer[L]}
    hidden = int(_first(text, "hidden_size", "n_embd", "d_model"))
    if routed_by_layer and not intermediate and hidden:
        # Stacked or fused layouts: I from the parameters of one expert (3 x D x I, plus biases).
        p, e = next(iter(routed_by_layer.values()))
        intermediate = p // e // (3 * hidden)
    n_heads = int(_first(text, "num_attention_heads", "n_head", default=1))
    head_dim = int(text.get("head_dim") or (hidden // n_heads if n_heads else 0))
    n_kv_heads = int(_first(text, "num_key_value_heads", default=n_heads))
    kv_layers, kv_kind = _kv_layers(text, n_layers, n_kv_heads, head_dim)
    warnings = []
    if not routed_by_layer:
        warnings.append("no routed experts found in the tensor names: planned as a dense model (generic estimate)")
    return ModelSummary(
        params_by_role=params,
        stored_bytes_by_role=stored,
        moe_layers=sorted(routed_by_layer),
        n_experts=max((e for _, e in routed_by_layer.values()), default=0),
        experts_per_token=int(_first(text, "num_experts_per_tok", "experts_per_token", "moe_topk", "top_k")),
        hidden_size=hidden,
        expert_intermediate_size=intermediate,
        n_layers=n_layers,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        vocab_size=int(text.get("vocab_size") or 0),
        max_context=int(text.get("max_position_embeddings") or 4096),
        kv_layers=kv_layers,
        routed_by_layer=routed_by_layer,
        unused_params=unused_params,
        unused_bytes=unused_bytes,
        kv_kind=kv_kind,
        warnings=warnings,
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
    experts_per_token: int = 0

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
            verdict=verdict, reason=reason, experts_per_token=summary.experts_per_token,
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
