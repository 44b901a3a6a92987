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
from tests.model_fixtures import make_checkpoint, reference_model

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe"]
# A sliding window shorter than the sequences below, so that it changes the result.
WINDOWED = {
    "mixtral": dict(sliding_window=6),
    "qwen2_moe": dict(use_sliding_window=True, sliding_window=6, max_window_layers=2),
    "qwen3_moe": dict(use_sliding_window=True, sliding_window=6),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


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
    ids = torch.randint(0, ours.tokenizer.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(ids).logits.float()
    got = ours.logits(ids)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert rel_err(got, expected) < 1e-4


def test_32_greedy_tokens_match_transformers(pair):
    _, _, ours, ref = pair
    prompt = ours.tokenizer.encode("The quick brown fox")
    out = ours.generate(prompt, max_new_tokens=32, ignore_eos=True)
    assert len(out.token_ids) == 32 and out.stats.finish_reason == "length"

    # Reference 1: greedy by full forwards in transformers (no cache anywhere).
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(32):
            ids = torch.cat([ids, ref(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.token_ids == ids[0, len(prompt) :].tolist()

    # Reference 2: transformers' own generate(), which stops at its eos ids.
    with torch.no_grad():
        hf = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt) :].tolist()
    assert out.token_ids[: len(hf)] == hf


def test_kv_cache_decode_equals_full_forward(pair):
    _, _, ours, _ = pair
    lm = ours.lm
    ids = torch.randint(0, ours.tokenizer.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    full = ours.logits(ids)
    caches = lm.make_caches(1, 20)
    with torch.no_grad():
        stepwise = [lm(ids[:, :8], caches, 0)]
        for t in range(8, 20):
            stepwise.append(lm(ids[:, t : t + 1], caches, t))
    assert rel_err(torch.cat(stepwise, dim=1), full) < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_sliding_window_matches_and_matters(tmp_path, arch):
    folder = make_checkpoint(tmp_path / "w", arch, dtype=torch.float32, shards=1, **WINDOWED[arch])
    ours = moerun.load(str(folder), device="cpu")
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference_model(folder)(ids).logits
    assert rel_err(ours.logits(ids), expected) < 1e-4
    # The same weights without the window give other logits past the window's reach.
    plain = make_checkpoint(tmp_path / "p", arch, dtype=torch.float32, shards=1)
    assert rel_err(moerun.load(str(plain), device="cpu").logits(ids)[:, 8:], expected[:, 8:]) > 1e-3


@pytest.mark.parametrize("stored", [torch.float16, torch.float32])
def test_other_storage_dtypes_load(tmp_path, stored):
    folder = make_checkpoint(tmp_path, "qwen3_moe", dtype=stored, shards=1)
    assert (folder / "model.safetensors").exists()
    ours = moerun.load(str(folder), device="cpu")
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
        moerun.load(str(folder), device="cpu")
    assert all(name in str(err.value) for name in ARCHS)
