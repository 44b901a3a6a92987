"""Each architecture held against transformers on tiny random checkpoints saved by it
(sharded, bf16): float32 logits within 1e-4 relative error, 32 greedy tokens identical,
and KV-cache decode equal to a full forward."""

from __future__ import annotations

import json

import pytest
import torch

import moerun
from moerun.errors import MoerunError
from moerun.models import get_architecture
from tests.parity import check_greedy_32, check_kv_cache_decode, check_logits, check_static_decode, rel_err
from tests.model_fixtures import make_checkpoint, reference_model

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


@pytest.fixture(scope="module")
def pair(checkpoint):
    arch, folder = checkpoint
    ours = moerun.load(str(folder), device="cpu", dtype=torch.float32)
    return arch, folder, ours, reference_model(folder)


def test_checkpoint_is_sharded_bf16(checkpoint):
    _, folder = checkpoint
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"


def test_logits_match_transformers(pair):
    _, _, ours, ref = pair
    check_logits(ours, ref)


def test_32_greedy_tokens_match_transformers(pair):
    _, _, ours, ref = pair
    check_greedy_32(ours, ref)


def test_kv_cache_decode_equals_full_forward(pair):
    _, _, ours, _ = pair
    check_kv_cache_decode(ours)


def test_static_decode_step_equals_eager_decode(pair):
    _, _, ours, _ = pair
    check_static_decode(ours)


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
    cfg = {"model_type": arch, "vocab_size": 8, "hidden_size": 4, "intermediate_size": 6, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1, "num_experts_per_tok": 1,
           "num_local_experts": 2, "num_experts": 2, "moe_intermediate_size": 3, "shared_expert_intermediate_size": 5}
    args = module.ModelArgs.from_dict(cfg)
    inter = 6 if arch == "mixtral" else 3
    names = ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    prefix = "model.layers.0." + ("block_sparse_moe.experts" if arch == "mixtral" else "mlp.experts")
    fake = {}
    for e in range(2):
        fake[f"{prefix}.{e}.{names[0]}.weight"] = torch.full((inter, 4), 10.0 * e + 1)
        fake[f"{prefix}.{e}.{names[1]}.weight"] = torch.full((inter, 4), 10.0 * e + 3)
        fake[f"{prefix}.{e}.{names[2]}.weight"] = torch.full((4, inter), 10.0 * e + 2)
    fake["model.norm.weight"] = torch.ones(4)
    out = module.sanitize(fake, args)
    assert set(out) == {f"{prefix}.w13", f"{prefix}.w2", "model.norm.weight"}
    assert out[f"{prefix}.w13"].shape == (2, 2 * inter, 4) and out[f"{prefix}.w2"].shape == (2, 4, inter)
    # Gate rows first, then up rows: expert 1's gate is 11, its up 13.
    assert out[f"{prefix}.w13"][1, 0, 0] == 11 and out[f"{prefix}.w13"][1, -1, 0] == 13
    assert module.sanitize(out, args).keys() == out.keys()


def test_unknown_architecture_is_refused_with_the_list(tmp_path):
    folder = make_checkpoint(tmp_path, "mixtral", shards=1)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama2000"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoerunError, match="unsupported architecture 'llama2000'") as err:
        moerun.load(str(folder), device="cpu", dtype="float32")
    assert all(name in str(err.value) for name in ARCHS)
