"""NVIDIA Nemotron-H (nemotron_h: NVIDIA-Nemotron-3-Nano-30B-A3B, the Nemotron-H dense
releases): a stack of single-mixer residual blocks, x + mixer(norm(x)), each one of
Mamba-2 ("M"), attention without positions ("*"), a relu² MLP ("-") or an MoE ("E"), as
`hybrid_override_pattern` or transformers 5's `layers_block_type` lists them.

The MoE routes DeepSeek-V3's way (sigmoid scores in float32, a correction bias for the
choice only, top-2-sum groups, renormalised with 1e-20, times routed_scaling_factor) to
non-gated relu² experts, plus one always-on relu² shared expert; with `moe_latent_size`
(Nemotron 3 Super) the routed experts work in a smaller latent space between
fc1_latent_proj and fc2_latent_proj. Norms multiply their weight in float32.

The checkpoint names the backbone `backbone.` (embeddings, layers.N.norm / .mixer, norm_f)
and keeps one tensor per expert and projection.

Shape legend: N tokens, D hidden, L latent (D without one), E experts, I expert intermediate.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from moerun.errors import MoerunError
from moerun.layers import Attention, RMSNorm
from moerun.models.base import CausalLM, CheckpointLayout, MixerBlock, SparseMoeBlock, TransformerArgs, spec
from moerun.moe.experts import RELU2, RoutedExperts
from moerun.moe.routing import Router
from moerun.recurrent.mamba2 import Mamba2Mixer, mamba2_tensors

# The checkpoint's text-model names -> ours (moerun.models.text_model_name); `mtp.*`
# (multi-token prediction) is never read.
CHECKPOINT_PREFIX = {"backbone.": "model.", "lm_head.": "lm_head."}
FLOAT32_PARAMS = (".e_score_correction_bias",)

KINDS = {
    "M": "mamba",
    "linear_attention": "mamba",
    "mamba": "mamba",
    "*": "attention",
    "full_attention": "attention",
    "attention": "attention",
    "-": "mlp",
    "mlp": "mlp",
    "E": "moe",
    "moe": "moe",
}

# Older configs spell the Mamba fields with a mamba_ prefix (transformers still reads them).
LEGACY = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_chunk_size": "chunk_size",
    "mamba_dt_min": "time_step_min",
    "mamba_conv_bias": "use_conv_bias",
}


@dataclasses.dataclass(kw_only=True)
class ModelArgs(TransformerArgs):
    # transformers 5 saves no num_hidden_layers: the pattern's length is the depth.
    num_hidden_layers: int = spec(0, minimum=0)
    intermediate_size: int = 21504
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    head_dim: int | None = 128
    hybrid_override_pattern: str | None = None
    layers_block_type: list[str] | None = None
    layer_types: list[str] | None = None
    layer_norm_epsilon: float = 1e-5
    hidden_act: str | None = spec(None)  # unread: the blocks' activations are the two below
    mlp_hidden_act: str = "relu2"
    mlp_bias: bool = False
    mamba_num_heads: int = 128
    mamba_head_dim: int = 64
    mamba_hidden_act: str = "silu"
    ssm_state_size: int = 128
    n_groups: int = 8
    conv_kernel: int = 4
    chunk_size: int = 128
    time_step_min: float = 0.001
    use_conv_bias: bool = True
    use_bias: bool = False
    n_routed_experts: int = spec(8, minimum=1)
    num_experts_per_tok: int = spec(2, top_k_of="n_routed_experts")
    moe_intermediate_size: int = 7688
    moe_shared_expert_intermediate_size: int = 7688
    moe_latent_size: int | None = None
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    mamba_n_groups: int | None = None
    mamba_d_conv: int | None = None
    mamba_chunk_size: int | None = None
    mamba_dt_min: float | None = None
    mamba_conv_bias: bool | None = None
    max_position_embeddings: int = 4096

    def __post_init__(self):
        types = self.layers_block_type or self.layer_types or list(self.hybrid_override_pattern or "")
        unknown = sorted({t for t in types if t not in KINDS})
        if not types or unknown:
            raise MoerunError(f"nemotron_h: the layer pattern must list M / * / - / E blocks, got {types or None}")
        # The pattern is the depth; a smaller num_hidden_layers keeps the first layers only
        # (bench's --layers), as transformers' own configs never disagree otherwise.
        if 0 < self.num_hidden_layers < len(types):
            types = types[: self.num_hidden_layers]
        self.kinds = [KINDS[t] for t in types]
        self.num_hidden_layers = len(self.kinds)
        self.rms_norm_eps = self.layer_norm_epsilon
        for old, new in LEGACY.items():
            if getattr(self, old) is not None:
                setattr(self, new, getattr(self, old))
        super().__post_init__()
        if "mlp" in self.kinds or "moe" in self.kinds:
            if self.mlp_hidden_act != "relu2":
                raise MoerunError(f"nemotron_h: mlp_hidden_act {self.mlp_hidden_act!r} is not supported (relu2 is)")
        if "mamba" in self.kinds and self.mamba_hidden_act != "silu":
            raise MoerunError(f"nemotron_h: mamba_hidden_act {self.mamba_hidden_act!r} is not supported (silu is)")
        self.moe_layers = [i for i, k in enumerate(self.kinds) if k == "moe"]

    def mamba_dims(self) -> dict:
        return dict(
            hidden_size=self.hidden_size,
            n_heads=self.mamba_num_heads,
            head_dim=self.mamba_head_dim,
            n_groups=self.n_groups,
            state_size=self.ssm_state_size,
            conv_kernel=self.conv_kernel,
            proj_bias=self.use_bias,
            conv_bias=self.use_conv_bias,
        )


class Norm(RMSNorm):
    """Nemotron-H's RMSNorm: the weight multiplies in float32, then the cast."""

    scale_in_float32 = True


class Relu2MLP(nn.Module):
    """down(relu(up(x))²): the dense blocks and the shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, role: str = "dense_mlp"):
        super().__init__()
        self.role = role
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.square(torch.relu(self.up_proj(x))))


class LatentMoeBlock(SparseMoeBlock):
    """The MoE with routed experts in a latent space: fc2(experts(fc1(x))) + shared(x),
    routed on x."""

    def __init__(self, router, experts, shared, hidden_size: int, latent_size: int, bias: bool, names: dict):
        super().__init__(router, experts, shared=shared, names=names)
        self.fc1_latent_proj = nn.Linear(hidden_size, latent_size, bias=bias)
        self.fc2_latent_proj = nn.Linear(latent_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [N, D]
        ids, weights = self.router(flat)
        out = self.fc2_latent_proj(self.experts(self.fc1_latent_proj(flat), ids, weights))
        return (out + self._modules[self._names["shared"]](flat)).reshape(x.shape)


def moe_block(args: ModelArgs) -> SparseMoeBlock:
    router = Router(
        args.hidden_size,
        args.n_routed_experts,
        args.num_experts_per_tok,
        scoring="sigmoid",
        renormalize=args.norm_topk_prob,
        scaling=args.routed_scaling_factor,
        correction_bias=True,
        n_group=args.n_group,
        topk_group=args.topk_group,
        group_score="top2_sum",
        float32_logits=True,
        renorm_eps=1e-20,
    )
    latent = args.moe_latent_size or args.hidden_size
    experts = RoutedExperts(args.n_routed_experts, latent, args.moe_intermediate_size, act=RELU2)
    shared = Relu2MLP(args.hidden_size, args.moe_shared_expert_intermediate_size, args.mlp_bias)
    names = {"router": "gate", "shared": "shared_experts"}
    if args.moe_latent_size:
        return LatentMoeBlock(router, experts, shared, args.hidden_size, latent, args.mlp_bias, names)
    return SparseMoeBlock(router, experts, shared=shared, names=names)


def mixer(args: ModelArgs, kind: str) -> nn.Module:
    if kind == "mamba":
        # The reference's mixer clamps dt below at time_step_min only (not the config's time_step_limit).
        return Mamba2Mixer(
            **args.mamba_dims(),
            chunk_size=args.chunk_size,
            eps=args.rms_norm_eps,
            time_step_limit=(args.time_step_min, math.inf),
        )
    if kind == "attention":
        return Attention(args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim, None)
    if kind == "mlp":
        return Relu2MLP(args.hidden_size, args.intermediate_size, args.mlp_bias)
    return moe_block(args)


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        D, eps = args.hidden_size, args.rms_norm_eps
        layers = [MixerBlock(mixer(args, kind), D, eps, norm=Norm(D, eps)) for kind in args.kinds]
        super().__init__(args, layers)
        self.model.norm = Norm(D, eps)


RENAMES = {"model.embeddings.weight": "model.embed_tokens.weight", "model.norm_f.weight": "model.norm.weight"}


def stack_up_down(weights: dict[str, torch.Tensor], prefix: str, n_experts: int) -> None:
    """`{prefix}.{e}.up_proj.weight` / `.down_proj.weight` -> `{prefix}.w13` [E, I, L], `.w2`
    [E, L, I], in place; a no-op when already stacked."""
    if f"{prefix}.w13" in weights or f"{prefix}.0.up_proj.weight" not in weights:
        return
    for ours, theirs in (("w13", "up_proj"), ("w2", "down_proj")):
        names = [f"{prefix}.{e}.{theirs}.weight" for e in range(n_experts)]
        missing = [n for n in names if n not in weights]
        if missing:
            raise MoerunError(f"tensor {missing[0]} is missing from the checkpoint")
        weights[f"{prefix}.{ours}"] = torch.stack([weights.pop(n) for n in names])


def sanitize(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Checkpoint names -> ours: backbone. -> model. (embeddings, norm_f renamed), the
    routed experts stacked."""
    out = {}
    for name, tensor in weights.items():
        if name.startswith("backbone."):
            name = "model." + name.removeprefix("backbone.")
        out[RENAMES.get(name, name)] = tensor
    for i in args.moe_layers:
        stack_up_down(out, f"model.layers.{i}.mixer.experts", args.n_routed_experts)
    return out


def checkpoint_tensors(args: ModelArgs) -> dict:
    """The released checkpoint's tensors: name -> (shape, stored dtype, role)."""
    D, V, E = args.hidden_size, args.vocab_size, args.n_routed_experts
    L = args.moe_latent_size or D
    t = CheckpointLayout(args)
    t.add("backbone.embeddings.weight", (V, D), "embeddings")
    for i, kind in enumerate(args.kinds):
        p = f"backbone.layers.{i}"
        t.add(f"{p}.norm.weight", (D,), "norms")
        m = f"{p}.mixer"
        if kind == "mamba":
            mamba2_tensors(t, m, **args.mamba_dims())
        elif kind == "attention":
            t.attention(m)
        elif kind == "mlp":
            t.linear(f"{m}.up_proj", args.intermediate_size, D, "dense_mlp", args.mlp_bias)
            t.linear(f"{m}.down_proj", D, args.intermediate_size, "dense_mlp", args.mlp_bias)
        else:
            t.add(f"{m}.gate.weight", (E, D), "routers")
            t.add(f"{m}.gate.e_score_correction_bias", (E,), "routers", dtype="F32")
            for e in range(E):
                t.add(f"{m}.experts.{e}.up_proj.weight", (args.moe_intermediate_size, L), "routed_experts")
                t.add(f"{m}.experts.{e}.down_proj.weight", (L, args.moe_intermediate_size), "routed_experts")
            S = args.moe_shared_expert_intermediate_size
            t.linear(f"{m}.shared_experts.up_proj", S, D, "shared_experts", args.mlp_bias)
            t.linear(f"{m}.shared_experts.down_proj", D, S, "shared_experts", args.mlp_bias)
            if args.moe_latent_size:
                t.linear(f"{m}.fc1_latent_proj", L, D, "dense_mlp", args.mlp_bias)
                t.linear(f"{m}.fc2_latent_proj", D, L, "dense_mlp", args.mlp_bias)
    t.add("backbone.norm_f.weight", (D,), "norms")
    if not args.tie_word_embeddings:
        t.linear("lm_head", V, D, "lm_head")
    return t.tensors
