"""Every family, one table: each row is a tiny random checkpoint saved by transformers
5.25 (sharded, bf16) with the family's quirks turned on, and every row passes the same
checks against the reference:

- float32 logits within 1e-4 relative error, and 32 greedy tokens identical, also through
  `moerun generate --json` in a fresh process; a second reply equal to a fresh model's;
- KV-cache decode equal to a full forward, and the static (CUDA-graph) decode step equal
  to eager decode, without a host sync outside the expert layers;
- 4-bit experts through a one-slot cache equal to 4-bit fully resident;
- the family's checkpoint_tensors equal to the saved headers, and sanitize of that
  layout (as meta tensors) giving exactly the model's parameters;
- the plan counting what the loaded model holds (parameters, and the state its layers
  allocate for the planned context);
- on a CPU without native bf16 (forced), the matrices kept bf16 at rest under float32
  compute: the logits and greedy tokens of float32 throughout, the bytes as planned.

The rows' configs and makers live with each family's own tests (tests/test_<family>.py),
which add what is particular to it."""

from __future__ import annotations

import functools
import json

import pytest
import torch

import moerun
from moerun import plan
from moerun.kernels import cpu_experts
from moerun.models import build_meta_model
from moerun.models.base import linear_parameters
from moerun.weights import CheckpointWeights
from tests import (
    test_deepseek,
    test_glm4_moe_lite,
    test_gpt_oss_llama4,
    test_jamba_lfm2,
    test_mamba2_families,
    test_more_families,
    test_new_families,
    test_qwen3_next,
)
from tests.model_fixtures import load_pair, make_checkpoint
from tests.parity import (
    check_cli_greedy,
    check_greedy_32,
    check_kv_cache_decode,
    check_logits,
    check_offloaded_4bit_equals_resident,
    check_second_generation_equals_a_fresh_one,
    check_static_decode,
    rel_err,
)


def _plain(arch: str, folder, **config):
    return make_checkpoint(folder, arch, dtype=torch.bfloat16, shards=3, **config)


# row id -> (maker(folder) -> folder, checkpoint prefixes the model never loads)
ROWS = {
    "mixtral": (functools.partial(_plain, "mixtral"), ()),
    "qwen2_moe": (functools.partial(_plain, "qwen2_moe"), ()),
    "qwen3_moe": (functools.partial(_plain, "qwen3_moe"), ()),
    **{arch: (functools.partial(_plain, arch, **config), ()) for arch, config in test_more_families.CONFIGS.items()},
    "gpt_oss": (test_gpt_oss_llama4.make_gpt_oss, ()),
    "llama4": (test_gpt_oss_llama4.make_llama4, test_gpt_oss_llama4.VISION),
    "llama4_text": (test_gpt_oss_llama4.make_llama4_text, ()),
    **{
        f"deepseek-{case}": (functools.partial(test_deepseek.make_deepseek, case=case), ())
        for case in test_deepseek.CASES
    },
    **{
        f"glm4_moe_lite-{case}": (functools.partial(test_glm4_moe_lite.make_glm, case=case), ())
        for case in test_glm4_moe_lite.CASES
    },
    **{arch: (functools.partial(test_new_families.make_family, arch), ()) for arch in test_new_families.CONFIGS},
    "jamba": (test_jamba_lfm2.make_jamba, ()),
    "lfm2_moe": (test_jamba_lfm2.make_lfm2_moe, ()),
    "qwen3_next": (test_qwen3_next.make_qwen3_next, ()),
    "qwen3_5_moe_text": (test_qwen3_next.make_qwen3_5_moe_text, ()),
    "qwen3_5_moe": (test_qwen3_next.make_qwen3_5_moe, test_qwen3_next.VISION),
    "granitemoehybrid": (test_mamba2_families.make_granitemoehybrid, ()),
    "nemotron_h": (test_mamba2_families.make_nemotron_h, ()),
    "nemotron_h-latent": (test_mamba2_families.make_nemotron_h_latent, ()),
}


pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module", params=list(ROWS))
def checkpoint(request, tmp_path_factory):
    make, not_loaded = ROWS[request.param]
    return make(tmp_path_factory.mktemp(request.param)), not_loaded


@pytest.fixture(scope="module")
def pair(checkpoint):
    return load_pair(checkpoint[0])


def test_logits_match_transformers(pair):
    check_logits(*pair)


def test_32_greedy_tokens_match_transformers(pair):
    check_greedy_32(*pair)


def test_moerun_generate_json_gives_the_greedy_tokens(checkpoint, pair):
    check_cli_greedy(checkpoint[0], pair[1])


def test_a_second_generation_equals_a_fresh_ones(checkpoint, pair):
    check_second_generation_equals_a_fresh_one(pair[0], checkpoint[0])


def test_kv_cache_decode_equals_full_forward(pair):
    check_kv_cache_decode(pair[0])


def test_static_decode_step_equals_eager_decode(pair):
    check_static_decode(pair[0])


def test_4bit_one_slot_equals_4bit_resident(checkpoint):
    check_offloaded_4bit_equals_resident(checkpoint[0])


def test_checkpoint_tensors_are_the_saved_checkpoint_and_sanitize_to_the_model(checkpoint):
    folder, not_loaded = checkpoint
    lm, arch = build_meta_model(json.loads((folder / "config.json").read_text()))
    layout = arch.checkpoint_tensors(lm.args)
    with CheckpointWeights.open(folder) as ckpt:
        saved = {n: tuple(shape) for n, (shape, _) in ckpt.headers().items() if not n.startswith(not_loaded)}
    assert {n: shape for n, (shape, _, _) in layout.items()} == saved
    sanitized = arch.sanitize({n: torch.empty(shape, device="meta") for n, (shape, _, _) in layout.items()}, lm.args)
    assert {n: tuple(t.shape) for n, t in sanitized.items()} == {n: tuple(p.shape) for n, p in lm.named_parameters()}


def test_the_plan_is_what_the_model_holds(checkpoint):
    folder, _ = checkpoint
    model = moerun.load(str(folder), device="cpu", dtype=torch.float32, ctx=48)
    assert model.plan.total_params == model.num_parameters
    states = [c for c in model.kv_caches if c is not None]  # a layer may keep none (an MLP-only block)
    assert states and all(c.max_len == 48 for c in states)
    assert sum(c.nbytes for c in states) == model.plan.kv_cache_bytes


@pytest.mark.skipif(not cpu_experts.available(), reason="without the C kernels the matrices stay float32")
def test_matrices_at_rest_in_bf16_equal_float32(checkpoint, pair, monkeypatch):
    folder, _ = checkpoint
    monkeypatch.setattr(plan, "cpu_computes", lambda dtype: dtype == torch.float32)
    at_rest, wide = moerun.load(str(folder), device="cpu", ctx=64), pair[0]
    names = linear_parameters(at_rest.lm)
    held = {p.dtype for n, p in at_rest.lm.named_parameters() if n in names}
    assert at_rest.dtype == torch.float32 and held == {torch.bfloat16}
    saved = sum(p.numel() * (4 - p.element_size()) for n, p in at_rest.lm.named_parameters() if n in names)
    assert wide.plan.non_expert_bytes - at_rest.plan.non_expert_bytes == saved > 0
    ids = torch.randint(0, 200, (1, 9), generator=torch.Generator().manual_seed(1))
    assert rel_err(at_rest.logits(ids), wide.logits(ids)) < 1e-5  # the prompt: matmuls over widened weights
    a = at_rest.generate(ids[0].tolist(), max_new_tokens=8, temperature=0).token_ids
    assert a == wide.generate(ids[0].tolist(), max_new_tokens=8, temperature=0).token_ids  # decode: the C GEMV
