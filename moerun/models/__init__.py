"""Architecture registry and the weight loader.

Each family lives in its own file with `ModelArgs`, `Model` and `sanitize`; this module
dispatches on config.json's `model_type` and fills a model built on the meta device
from memory-mapped safetensors, one layer at a time.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from moerun.errors import MoerunError
from moerun.models.base import Family, linear_parameters, parameter_roles
from moerun.weights import CheckpointWeights, check_finite

# Every module here but `base` is an architecture, named by its config.json model_type.
ARCHITECTURES = tuple(sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.name != "base"))


_FAMILIES: dict[str, Family] = {}


def get_architecture(model_type: str | None) -> Family:
    """The family implementing `model_type` (its file seen through the Family contract),
    or a one-line refusal naming what is supported."""
    if model_type not in ARCHITECTURES:
        raise MoerunError(
            f"unsupported architecture '{model_type}' (model_type in config.json); "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    if model_type not in _FAMILIES:
        _FAMILIES[model_type] = Family(importlib.import_module(f"moerun.models.{model_type}"))
    return _FAMILIES[model_type]


def build_args(config: dict, source: str = "config.json"):
    """The family's ModelArgs for `config` (checked; errors name `source`)."""
    return get_architecture(config.get("model_type")).ModelArgs.from_dict(config, source)


def check_config(config: dict, source: str | Path):
    """Refuse, in one line naming the key and `source` (the file it came from), a config
    its family's ModelArgs does not accept: a value of the wrong type or out of range,
    an activation moerun does not implement. An unknown model_type is the caller's to
    refuse or estimate (fit does the latter). Returns the ModelArgs (None for those)."""
    if config.get("model_type") in ARCHITECTURES:
        return build_args(config, str(source))
    return None


def build_meta_model(config: dict):
    """(the family's Model for `config` on the meta device, its module): no memory, no
    weights; what the planner, fit and bench ask about shapes, roles and state."""
    arch = get_architecture(config.get("model_type"))
    args = arch.ModelArgs.from_dict(config)
    with torch.device("meta"):
        return arch.Model(args), arch


def checkpoint_layout(config: dict) -> dict[str, tuple[tuple[int, ...], str, str]]:
    """The family's description of the checkpoint `config` belongs to: name -> (shape,
    stored dtype, role), as its checkpoint_tensors(args) gives it."""
    arch = get_architecture(config.get("model_type"))
    return arch.checkpoint_tensors(arch.ModelArgs.from_dict(config))


def load_model(
    folder: str | Path,
    config: dict,
    dtype: torch.dtype,
    device: torch.device | str,
    routed_experts: bool = True,
    ckpt: CheckpointWeights | None = None,
    linear_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Build the model for `config` and load its weights from `folder` (or the already
    open `ckpt`), cast to `dtype` on `device` (the nn.Linear layers' weights and biases to
    `linear_dtype` when given: see moerun.plan.linear_dtype).

    Tensors are read per decoder layer, so host memory holds at most one layer's
    worth of checkpoint tensors beyond the model itself. With routed_experts=False the
    routed experts stay unloaded (on the meta device) for the expert cache to replace."""
    arch = get_architecture(config.get("model_type"))
    args = arch.ModelArgs.from_dict(config)
    arch.check_loadable(args)  # e.g. a storage format moerun cannot read yet
    with torch.device("meta"):
        model = arch.Model(args)
    roles = parameter_roles(model)
    expected = {n: p for n, p in model.named_parameters() if routed_experts or roles[n] != "routed_experts"}

    # Names an architecture keeps in float32 whatever `dtype` (e.g. DeepSeek-V3's router bias).
    keep_fp32 = arch.float32_params
    linears = linear_parameters(model) if linear_dtype not in (None, dtype) else set()
    with contextlib.ExitStack() as stack:
        if ckpt is None:
            ckpt = stack.enter_context(CheckpointWeights.open(folder))
        skip = set() if routed_experts else arch.routed_checkpoint_names(args, ckpt.keys())
        groups: dict[int | None, list[str]] = defaultdict(list)
        # Multimodal checkpoints (Llama 4, Qwen3.5) name the text model under a prefix;
        # the rest (vision tower, projector) is never read.
        for name in ckpt.keys():
            ours = arch.text_model_name(name)
            if name in skip or ours is None:
                continue
            groups[arch.layer_of(ours, args)].append(name)
        n_layers, n_mtp = args.num_hidden_layers, getattr(args, "num_nextn_predict_layers", 0)
        for key in sorted(groups, key=lambda k: -1 if k is None else k):
            if key is not None and key >= n_layers:
                if key < n_layers + n_mtp:
                    continue  # a multi-token-prediction layer (DeepSeek-V3, GLM): not run
                raise MoerunError(
                    f"the checkpoint in {folder} has layer {key} ({groups[key][0]}), but config.json gives "
                    f"num_hidden_layers {n_layers}"
                    + (f" and num_nextn_predict_layers {n_mtp}" if n_mtp else "")
                    + ": the config and the weights disagree"
                )
            tensors = arch.sanitize({name: ckpt.get(name) for name in groups[key]}, args)
            for name, tensor in tensors.items():
                if name not in expected:
                    continue  # e.g. rotary inv_freq buffers some exporters save
                param = expected.pop(name)
                if tuple(tensor.shape) != tuple(param.shape):
                    raise MoerunError(f"tensor {name} has shape {list(tensor.shape)}, expected {list(param.shape)}")
                if not tensor.is_floating_point():  # an I16 norm cast to float is silent garbage
                    raise MoerunError(
                        f"tensor {name} is stored as {str(tensor.dtype).removeprefix('torch.')}, "
                        "an integer type where a floating-point weight belongs; the checkpoint is "
                        "damaged or in a format moerun does not read"
                    )
                if name.endswith(keep_fp32):
                    target = torch.float32
                else:
                    # At rest in 16 bits only what the checkpoint stores in 16 bits or fewer,
                    # bf16 and fp16 as they are: no stored value is rounded.
                    at_rest = name in linears and tensor.element_size() <= 2
                    target = dtype if not at_rest else tensor.dtype if tensor.element_size() == 2 else linear_dtype
                tensor = tensor.to(device=device, dtype=target)
                # NaN/Inf (or a value the cast overflowed) would answer with garbage: checked after
                # the cast, in full but for resident routed experts (sampled: they are most bytes).
                check_finite(name, tensor, sample=1 << 16 if roles[name] == "routed_experts" else None)
                _assign(model, name, tensor)

    model.tie_weights()
    if expected:
        raise MoerunError(f"tensor {next(iter(expected))} is missing from the checkpoint in {folder}")
    return model.eval().requires_grad_(False)


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_path, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_path)
    setattr(owner, leaf, nn.Parameter(tensor, requires_grad=False))
