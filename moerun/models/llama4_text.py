"""Llama 4 text-only checkpoints (config.json `model_type: "llama4_text"` at the top level,
transformers' Llama4ForCausalLM): the language model of moerun/models/llama4.py, flat
config, tensors named `model.layers...` and `lm_head.weight` without the
`language_model.` prefix."""

from __future__ import annotations

from moerun.models import llama4
from moerun.models.llama4 import Model, ModelArgs, sanitize

# The tool-call format its chat template writes (moerun/tool_calls.py): As llama4: JSON `{"name": ...,
# "parameters": ...}` or pythonic `[f(a=1)]` calls.
TOOL_CALL_FORMAT = "llama4"

__all__ = ["Model", "ModelArgs", "sanitize", "checkpoint_tensors"]


def checkpoint_tensors(args: ModelArgs) -> dict:
    """Llama 4's layout without the prefix: name -> (shape, stored dtype, role)."""
    return llama4.checkpoint_tensors(args, prefix="")
