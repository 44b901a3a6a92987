"""GLM-4.7-Flash (zai-org/GLM-4.7-Flash, model_type glm4_moe_lite): DeepSeek-V3's model
(MLA, shared + routed experts, the sigmoid router with correction bias) under GLM's
config. What differs from deepseek_v3, all in the config (the modules are V3's):

- dense or sparse per layer from `mlp_layer_types` ("dense" / "sparse"), by default the
  first layer dense and the rest sparse; `first_k_dense_replace` and `moe_layer_freq`
  are ignored, as transformers ignores them;
- other defaults: routed_scaling_factor 1.8, no groups (n_group = topk_group = 1),
  rms_norm_eps 1e-5, one shared expert, top-4 of 64, the released widths;
- rope's default frequencies honour partial_rotary_factor over qk_rope_head_dim (V3's
  ignore it; the release sets 1.0, and moerun's Rotary honours it for every family);
- the multi-token-prediction layer is model.layers.47 (V3's: 61), never loaded.
"""

from __future__ import annotations

import dataclasses

from moerun.errors import MoerunError
from moerun.models import deepseek_v3 as v3
from moerun.models.deepseek_v3 import FLOAT32_PARAMS, Model, check_loadable, checkpoint_tensors, sanitize  # noqa: F401  (V3's modules, rules and layout)


@dataclasses.dataclass(kw_only=True)
class ModelArgs(v3.ModelArgs):
    moe_intermediate_size: int = 1536
    n_routed_experts: int | None = 64
    num_experts_per_tok: int | None = 4
    n_shared_experts: int | None = 1
    routed_scaling_factor: float = 1.8
    # kv_lora_rank 512 and qk_rope_head_dim 64 as DeepSeek's.
    q_lora_rank: int | None = 768
    qk_nope_head_dim: int = 192
    v_head_dim: int = 256
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 202752
    mlp_layer_types: list[str] | None = None

    def __post_init__(self):
        super().__post_init__()
        L = self.num_hidden_layers
        types = self.mlp_layer_types or ["dense"] + ["sparse"] * (L - 1)
        if len(types) != L or not set(types) <= {"dense", "sparse"}:
            raise MoerunError(
                f"{self.model_type}: mlp_layer_types must give 'dense' or 'sparse' for each of {L} layers"
            )
        self.moe_layers = {i for i, kind in enumerate(types) if kind == "sparse" and self.n_routed_experts}
