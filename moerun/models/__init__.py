"""Architecture registry and the weight loader.

Each family lives in its own file with `ModelArgs`, `Model` and `sanitize`; this module
dispatches on config.json's `model_type` and fills a model built on the meta device
from memory-mapped safetensors, one layer at a time.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from moerun.errors import MoerunError
from moerun.plan import is_routed_expert
from moerun.weights import CheckpointWeights

# Every module here but `base` is an architecture, named by its config.json model_type.
ARCHITECTURES = tuple(
    sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.name != "base")
)


def get_architecture(model_type: str | None):
    """The module implementing `model_type`, or a one-line refusal naming what is supported."""
    if model_type not in ARCHITECTURES:
        raise MoerunError(
            f"unsupported architecture '{model_type}' (model_type in config.json); "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    return importlib.import_module(f"moerun.models.{model_type}")


def build_args(config: dict):
    return get_architecture(config.get("model_type")).ModelArgs.from_dict(config)


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def load_model(
    folder: str | Path, config: dict, dtype: torch.dtype, device: torch.device | str, routed_experts: bool = True
) -> nn.Module:
    """Build the model for `config` and load its weights from `folder`, cast to `dtype` on `device`.

    Tensors are read per decoder layer, so host memory holds at most one layer's
    worth of checkpoint tensors beyond the model itself. With routed_experts=False the
    routed experts stay unloaded (on the meta device) for the expert cache to replace.
    """
    arch = get_architecture(config.get("model_type"))
    args = arch.ModelArgs.from_dict(config)
    with torch.device("meta"):
        model = arch.Model(args)
    expected = {n: p for n, p in model.named_parameters() if routed_experts or not is_routed_expert(n)}

    # Names an architecture keeps in float32 whatever `dtype` (e.g. DeepSeek-V3's router bias).
    keep_fp32 = tuple(getattr(arch, "FLOAT32_PARAMS", ()))
    with CheckpointWeights.open(folder) as ckpt:
        groups: dict[int | None, list[str]] = defaultdict(list)
        # Multimodal checkpoints (Llama 4) name the text model under a prefix; the rest
        # (vision tower, projector) is never read.
        prefix = getattr(arch, "CHECKPOINT_PREFIX", "")
        for name in ckpt.keys():
            if not routed_experts and is_routed_expert(name):
                continue
            if not name.startswith(prefix):
                continue
            m = _LAYER.match(name.removeprefix(prefix))
            groups[int(m.group(1)) if m else None].append(name)
        for key in sorted(groups, key=lambda k: -1 if k is None else k):
            tensors = arch.sanitize({name: ckpt.get(name) for name in groups[key]}, args)
            for name, tensor in tensors.items():
                if name not in expected:
                    continue  # e.g. rotary inv_freq buffers some exporters save
                param = expected.pop(name)
                if tuple(tensor.shape) != tuple(param.shape):
                    raise MoerunError(
                        f"tensor {name} has shape {list(tensor.shape)}, expected {list(param.shape)}"
                    )
                _assign(model, name, tensor.to(device=device, dtype=torch.float32 if name.endswith(keep_fp32) else dtype))

    if "lm_head.weight" in expected and getattr(args, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight
        expected.pop("lm_head.weight")
    if expected:
        raise MoerunError(f"tensor {next(iter(expected))} is missing from the checkpoint in {folder}")
    return model.eval().requires_grad_(False)


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_path, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_path)
    setattr(owner, leaf, nn.Parameter(tensor, requires_grad=False))
