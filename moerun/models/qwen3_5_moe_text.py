"""Qwen3.5 MoE text-only checkpoints (config.json `model_type: "qwen3_5_moe_text"` at the
top level, transformers' Qwen3_5MoeForCausalLM): the language model of
moerun/models/qwen3_5_moe.py, flat config, tensors named `model.layers...` and
`lm_head.weight`, experts one tensor per expert and projection as transformers saves them
(fused ones load too)."""

from __future__ import annotations

from moerun.models import qwen3_5_moe
from moerun.models.qwen3_5_moe import Model, ModelArgs, sanitize

__all__ = ["Model", "ModelArgs", "sanitize", "checkpoint_tensors", "other_checkpoint_layouts"]

# The text model only: an `mtp.*` layer the checkpoint may carry is not read.
CHECKPOINT_PREFIX = {"model.": "model.", "lm_head.": "lm_head."}

# The tool-call format its chat template writes (moerun/tool_calls.py): As qwen3_5_moe:
# `<tool_call><function=NAME><parameter=KEY>...`.
TOOL_CALL_FORMAT = "qwen"


def checkpoint_tensors(args: ModelArgs) -> dict:
    """The text model's layout without the prefix: name -> (shape, stored dtype, role)."""
    return qwen3_5_moe.checkpoint_tensors(args, prefix="model.", fused_experts=False)


def other_checkpoint_layouts(args: ModelArgs) -> list[dict]:
    """The experts fused (save_pretrained(save_original_format=False)) read too."""
    return [qwen3_5_moe.checkpoint_tensors(args, prefix="model.", fused_experts=True)]
