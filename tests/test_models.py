"""Mixtral, Qwen2-MoE and Qwen3-MoE beyond the checks every family passes (those are in
tests/test_families.py, whose rows for them are made here): sliding windows that
matter, other storage dtypes, YaRN scaling in both config spellings, sanitize, and the
refusal of an unknown architecture."""

from __future__ import annotations

import json

import pytest
import torch

import moerun
from moerun.errors import MoerunError
from moerun.models import get_architecture
from tests.model_fixtures import make_checkpoint, reference_model
from tests.parity import check_sanitize_stacks_experts, rel_err, sanitize_args

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe"]
# A sliding window shorter than the sequences below, so that it changes the result.
WINDOWED = {
    "mixtral": dict(sliding_window=6),
    "qwen2_moe": dict(use_sliding_window=True, sliding_window=6, max_window_layers=2),
    "qwen3_moe": dict(use_sliding_window=True, sliding_window=6),
}


@pytest.fixture(scope="module", params=ARCHS)
def checkpoint(request, tmp_path_factory):
    arch = request.param
    return arch, make_checkpoint(tmp_path_factory.mktemp(arch), arch, dtype=torch.bfloat16, shards=3)


def test_checkpoint_is_sharded_bf16(checkpoint):
    _, folder = checkpoint
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("arch", ARCHS)
def test_sliding_window_matches_and_matters(tmp_path, arch):
    folder = make_checkpoint(tmp_path / "w", arch, dtype=torch.float32, shards=1, **WINDOWED[arch])
    ours = moerun.load(str(folder), device="cpu", dtype="float32")
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference_model(folder)(ids).logits
    assert rel_err(ours.logits(ids), expected) < 1e-4
    # The same weights without the window give other logits past the window's reach.
    plain = make_checkpoint(tmp_path / "p", arch, dtype=torch.float32, shards=1)
    assert rel_err(moerun.load(str(plain), device="cpu", dtype="float32").logits(ids)[:, 8:], expected[:, 8:]) > 1e-3


@pytest.mark.parametrize("stored", [torch.float16, torch.float32])
def test_other_storage_dtypes_load(tmp_path, stored):
    folder = make_checkpoint(tmp_path, "qwen3_moe", dtype=stored, shards=1)
    assert (folder / "model.safetensors").exists()
    ours = moerun.load(str(folder), device="cpu", dtype="float32")
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference_model(folder)(ids).logits
    assert rel_err(ours.logits(ids), expected) < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_sanitize_stacks_experts_and_is_idempotent(arch):
    module = get_architecture(arch)
    args = sanitize_args(module, arch, intermediate_size=6, moe_intermediate_size=3, shared_expert_intermediate_size=5)
    inter = 6 if arch == "mixtral" else 3
    names = ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    prefix = "model.layers.0." + ("block_sparse_moe.experts" if arch == "mixtral" else "mlp.experts")
    check_sanitize_stacks_experts(module, args, prefix, {"model.norm.weight": torch.ones(4)}, inter, names)


def test_unknown_architecture_is_refused_with_the_list(tmp_path):
    folder = make_checkpoint(tmp_path, "mixtral", shards=1)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama2000"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoerunError, match="unsupported architecture 'llama2000'") as err:
        moerun.load(str(folder), device="cpu", dtype="float32")
    assert all(name in str(err.value) for name in ARCHS)


YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_yarn_scaling_matches_transformers_and_matters(tmp_path, arch):
    # head_dim spelled out: transformers' YaRN reads config.head_dim, which Mixtral's config leaves None.
    folder = make_checkpoint(tmp_path / "yarn", arch, dtype=torch.float32, shards=1, rope_parameters=YARN, head_dim=16)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = reference_model(folder)(ids).logits
    assert rel_err(moerun.load(str(folder), device="cpu", dtype="float32").logits(ids), expected) < 1e-4
    # The Hub's spelling of the same scaling (Qwen3's model card): rope_scaling + rope_theta.
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_parameters")
    config.update(
        rope_theta=10000.0, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    )
    (folder / "config.json").write_text(json.dumps(config))
    assert rel_err(moerun.load(str(folder), device="cpu", dtype="float32").logits(ids), expected) < 1e-4
    plain = make_checkpoint(tmp_path / "plain", arch, dtype=torch.float32, shards=1, head_dim=16)
    assert rel_err(moerun.load(str(plain), device="cpu", dtype="float32").logits(ids), expected) > 1e-3
