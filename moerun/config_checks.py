"""Checks on a whole config before any module is built from it: sizes no real model has
(a layer or expert count of a million hangs every loop over layers and experts, and the
memory grows with it) and RoPE parameters that are not finite numbers (NaN gives empty
replies). Called by BaseModelArgs.from_dict on the values it took, before the family's
__post_init__ runs, with the names every family uses for these fields. Also the one reader
of a multimodal config's nested text_config, for the planner, the server and `moerun show`.
"""

from __future__ import annotations

import json
import math

from moerun.errors import MoerunError

# Counts far above every released model, yet low enough that a loop over them ends at once
# (largest released: 126 layers in Llama-3.1-405B; 2048 experts in Switch-Transformers c-2048).
MAX_LAYERS = 1024
MAX_EXPERTS = 16384
# The parameter count a config implies, estimated without building anything (below). The
# largest released MoE holds ~1.0e12 (Kimi K2); ten times that is refused as a mistake.
MAX_PARAMETERS = 10**13

LAYER_COUNTS = (
    "num_hidden_layers",
    "num_layers",
    "num_decoder_layers",
    "num_sparse_decoder_layers",
    "num_sparse_encoder_layers",
    "num_dense_layers",
    "num_nextn_predict_layers",
)
EXPERT_COUNTS = (
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "moe_num_experts",
    "n_shared_experts",
    "moe_num_shared_experts",
    "num_experts_per_tok",
    "moe_k",
)
_HIDDEN = ("hidden_size", "d_model")
_EXPERT_WIDTH = ("moe_intermediate_size", "intermediate_size", "d_ff")
# RoPE values that must be above 0 (the others in the dict need only be finite).
_POSITIVE_ROPE = ("rope_theta", "factor", "original_max_position_embeddings")


def _first(values: dict, names: tuple) -> int:
    for name in names:
        value = values.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return value
    return 0


def estimated_parameters(values: dict) -> int:
    """A rough parameter count from the shared fields: per layer 4·D² of attention and
    E·3·D·I of experts (every layer taken as an MoE layer), plus embeddings and lm_head.
    Within a small factor of the truth for real models; only its order of magnitude is used."""
    layers, hidden = _first(values, LAYER_COUNTS[:2]), _first(values, _HIDDEN)
    experts = max(1, _first(values, EXPERT_COUNTS[:4]))
    width, vocab = _first(values, _EXPERT_WIDTH), _first(values, ("vocab_size",))
    return int(layers * (4 * hidden * hidden + experts * 3 * hidden * width) + 2 * vocab * hidden)


def _check_rope(key: str, params, source: str) -> None:
    if not isinstance(params, dict):
        return
    for name, value in params.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value) or (name in _POSITIVE_ROPE and value <= 0):
            shown = json.dumps(value) if math.isfinite(value) else str(value).replace("nan", "NaN")
            need = "a number above 0" if name in _POSITIVE_ROPE else "a finite number"
            raise MoerunError(f"{source}: {key}.{name} is {shown}, must be {need}")


def check_plausible(values: dict, source: str) -> None:
    """Refuse, in one line naming the key and `source`, a config whose counts or implied
    size no real model has, or whose RoPE parameters are not finite. `values` are the
    checked config values (defaults not yet applied)."""
    for names, limit, what in ((LAYER_COUNTS, MAX_LAYERS, "layers"), (EXPERT_COUNTS, MAX_EXPERTS, "experts")):
        for name in names:
            value = values.get(name)
            if isinstance(value, int) and value > limit:
                raise MoerunError(f"{source}: {name} is {value}, more {what} than any model has (at most {limit})")
    for key in ("rope_scaling", "rope_parameters"):
        _check_rope(key, values.get(key), source)
    n = estimated_parameters(values)
    if n > MAX_PARAMETERS:
        raise MoerunError(
            f"{source}: these sizes imply about {n:.1e} parameters, more than any model has (at most "
            f"{MAX_PARAMETERS:.0e}): check hidden_size, intermediate_size, vocab_size and the expert count"
        )


def text_config(config: dict) -> dict:
    """The language model's part of config.json: multimodal checkpoints (Llama 4) nest it in
    text_config, whose fields win over the wrapper's; any other config is its own."""
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config
