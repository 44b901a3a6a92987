"""Qwen3.5 MoE (Qwen3.5-35B-A3B, Qwen3.5-122B-A10B, Qwen3.5-397B-A17B; Qwen3.6 shares it):
the language model of Qwen3_5MoeForConditionalGeneration, Qwen3-Next's hybrid
(moerun/models/qwen3_next.py) with every layer MoE, the top-k always renormalised, and
the DeltaNet's projections ungrouped (`in_proj_qkv`, `in_proj_z`, `in_proj_b`,
`in_proj_a`). Its multimodal RoPE (mrope) is plain RoPE for text: every position axis
holds the token's position.

config.json nests the language model in `text_config`; the release names it
`model.language_model.*` beside `lm_head.weight`, a vision tower (`model.visual.*`) and a
multi-token-prediction layer (`mtp.*`), neither of which a text-only run reads, and stores
each layer's experts fused (`experts.gate_up_proj` [E, 2I, D], `experts.down_proj`
[E, D, I]). Text-only checkpoints: moerun/models/qwen3_5_moe_text.py.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from moerun.models import qwen3_next
from moerun.models.qwen3_next import Model

__all__ = ["Model", "ModelArgs", "sanitize", "checkpoint_tensors", "other_checkpoint_layouts"]

TEXT_PREFIX = "model.language_model."
# The text model's checkpoint names -> ours; the rest (vision tower, mtp) is not read.
CHECKPOINT_PREFIX = {TEXT_PREFIX: "model.", "lm_head.": "lm_head."}

# The tool-call format its chat template writes (moerun/tool_calls.py): Qwen3.5's template writes
# `<tool_call><function=NAME><parameter=KEY>...`.
TOOL_CALL_FORMAT = "qwen"


@dataclasses.dataclass(kw_only=True)
class ModelArgs(qwen3_next.ModelArgs):
    intermediate_size: int | None = None  # no dense layers
    num_experts: int = 256
    num_experts_per_tok: int = 8
    max_position_embeddings: int = 262144

    grouped_projections: ClassVar[bool] = False
    nested_text_config: ClassVar[bool] = True  # in the multimodal release's config

    def __post_init__(self):
        # Every layer is MoE and the top-k is always renormalised, whatever the config says.
        self.norm_topk_prob, self.decoder_sparse_step, self.mlp_only_layers = True, 1, []
        super().__post_init__()


def sanitize(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Checkpoint names -> ours: `model.language_model.` becomes `model.`, tensors outside
    the text model are dropped, experts become w13 and w2 (fused or one per expert)."""
    text = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")
    out = {}
    for name, tensor in weights.items():
        if name.startswith(TEXT_PREFIX):
            out["model." + name.removeprefix(TEXT_PREFIX)] = tensor
        elif name.startswith(text):
            out[name] = tensor
    return qwen3_next.sanitize(out, args)


def checkpoint_tensors(args: ModelArgs, prefix: str = TEXT_PREFIX, fused_experts: bool = True) -> dict:
    """The released checkpoint's text model: name -> (shape, stored dtype, role). The
    vision tower and the mtp layer are left out (never loaded)."""
    tensors = qwen3_next.text_layout(args, fused_experts).tensors
    return {(prefix + n.removeprefix("model.") if n.startswith("model.") else n): v for n, v in tensors.items()}


def other_checkpoint_layouts(args: ModelArgs) -> list[dict]:
    """sanitize reads the experts one tensor per expert too (save_pretrained's default)."""
    return [checkpoint_tensors(args, fused_experts=False)]
