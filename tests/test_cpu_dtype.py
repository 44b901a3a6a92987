"""On the CPU moerun keeps a bf16 checkpoint's non-expert weights in bf16 where the CPU
multiplies bf16 natively (half the RAM and bytes per token of float32); elsewhere it
computes in float32 but keeps the nn.Linear matrices in bf16 at rest (the C GEMV widens
them in registers); float32 throughout when asked; --dtype and --threads on the command
line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import moerun
from moerun import plan
from moerun.kernels import cpu_experts
from moerun.models.base import linear_parameters
from moerun.moe.offload import routed_expert_modules
from tests.model_fixtures import make_checkpoint
from tests.parity import rel_err
from tests.test_cli import run_cli

IDS = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("bf16"), "qwen3_moe", dtype=torch.bfloat16)


def test_default_dtype_follows_the_checkpoint_and_the_cpu(monkeypatch):
    bf16, fp16, fp32 = {"torch_dtype": "bfloat16"}, {"torch_dtype": "float16"}, {"torch_dtype": "float32"}
    monkeypatch.setattr(plan, "cpu_computes", lambda dtype: True)
    assert plan.default_dtype(bf16, "cpu") == torch.bfloat16
    assert plan.default_dtype(fp16, "cpu") == torch.float16
    monkeypatch.setattr(plan, "cpu_computes", lambda dtype: dtype == torch.float32)
    assert plan.default_dtype(bf16, "cpu") == torch.float32  # no native bf16: float32 is faster there
    assert plan.default_dtype(bf16, "cuda") == torch.bfloat16
    assert plan.default_dtype(fp32, "cpu") == plan.default_dtype(fp32, "cuda") == torch.float32
    # multimodal configs keep it in text_config
    assert plan.default_dtype({"text_config": {"torch_dtype": "float16"}}, "cuda") == torch.float16
    # float32 compute for want of native bf16: the matrices stay 16-bit where the C kernels read them
    at_rest = torch.bfloat16 if cpu_experts.available() else torch.float32
    assert plan.linear_dtype(bf16, "cpu", torch.float32) == at_rest
    assert plan.linear_dtype(fp16, "cpu", torch.float32) == (
        torch.float16 if cpu_experts.available() else torch.float32
    )
    assert plan.linear_dtype(bf16, "cuda", torch.bfloat16) == torch.bfloat16
    assert plan.linear_dtype(fp32, "cpu", torch.float32) == torch.float32
    monkeypatch.setattr(plan, "cpu_computes", lambda dtype: True)
    assert plan.linear_dtype(bf16, "cpu", torch.bfloat16) == torch.bfloat16


def non_expert_bytes(model) -> int:
    experts = {id(p) for _, _, m in routed_expert_modules(model.lm) for p in m.parameters()}
    return sum(p.numel() * p.element_size() for p in model.lm.parameters() if id(p) not in experts)


def matrix_dtypes(model) -> set[torch.dtype]:
    names = linear_parameters(model.lm)
    return {p.dtype for n, p in model.lm.named_parameters() if n in names}


@pytest.mark.parametrize("bits", [16, 4])
def test_the_default_on_this_cpu_against_float32(bf16_checkpoint, bits, tmp_path, monkeypatch):
    monkeypatch.setenv("MOERUN_CACHE", str(tmp_path / "cache"))
    default = moerun.load(str(bf16_checkpoint), bits=bits, device="cpu")
    wide = moerun.load(str(bf16_checkpoint), bits=bits, device="cpu", dtype="float32")
    expected = torch.bfloat16 if plan.cpu_computes(torch.bfloat16) else torch.float32
    assert default.dtype == expected and default.plan.dtype == str(expected).removeprefix("torch.")
    assert matrix_dtypes(wide) == {torch.float32}
    if expected == torch.bfloat16:
        assert non_expert_bytes(default) * 2 == non_expert_bytes(wide)
        # bf16 rounding of activations and weights, nothing more
        assert rel_err(default.logits(IDS), wide.logits(IDS)) < 3e-2
    else:  # float32 compute here, over the file's own bf16 matrices: the same values
        assert rel_err(default.logits(IDS), wide.logits(IDS)) < 1e-5


@pytest.mark.parametrize("bits", [16, 4])
def test_matrices_at_rest_in_bf16_compute_as_float32(bf16_checkpoint, bits, tmp_path, monkeypatch):
    """A CPU without native bf16 (forced here, so every machine runs it): float32 compute,
    the nn.Linear matrices kept as the file's bf16, so a step reads half their bytes; the
    logits those of float32 throughout within float32 rounding, in the prompt (widened
    matmuls) and in decode steps (the C GEMV), and the plan counts what is held."""
    if not cpu_experts.available():
        pytest.skip("the C kernels are not built: the matrices stay float32 (checked in the test above)")
    monkeypatch.setenv("MOERUN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(plan, "cpu_computes", lambda dtype: dtype == torch.float32)
    at_rest = moerun.load(str(bf16_checkpoint), bits=bits, device="cpu")
    wide = moerun.load(str(bf16_checkpoint), bits=bits, device="cpu", dtype="float32")
    assert at_rest.dtype == torch.float32 and matrix_dtypes(at_rest) == {torch.bfloat16}
    assert at_rest.plan.linear_dtype == "bfloat16" and wide.plan.linear_dtype is None
    saved = non_expert_bytes(wide) - non_expert_bytes(at_rest)
    assert saved == wide.plan.non_expert_bytes - at_rest.plan.non_expert_bytes > 0
    assert rel_err(at_rest.logits(IDS), wide.logits(IDS)) < 1e-5
    a = at_rest.generate(IDS[0].tolist(), max_new_tokens=12, temperature=0)
    b = wide.generate(IDS[0].tolist(), max_new_tokens=12, temperature=0)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 12


def test_cli_dtype_and_threads():
    proc = run_cli("generate", "demo", "count from 7", "--dtype", "float32", "--threads", "1", "-n", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    text32 = json.loads(proc.stdout)["text"]
    proc = run_cli("generate", "demo", "count from 7", "-n", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["text"] == text32  # the demo is exact in bf16 too
    bad = run_cli("generate", "demo", "hi", "--dtype", "float64")
    assert bad.returncode != 0 and "--dtype" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_cli("generate", "demo", "hi", "--threads", "0")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr


def test_bench_reports_threads_kernels_and_the_bound():
    proc = run_cli("bench", "demo", "-p", "8", "-n", "4", "-r", "1", "--bits", "4", "--threads", "1", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["machine"]["cpu_threads"] == 1
    assert report["machine"]["ram_read_bytes_s"] > 1e8
    tg = next(r for r in report["rows"] if r["test"] == "tg4")
    assert tg["decode_bytes_per_token"] > 0 and tg["bound_t_s"] > 0


@pytest.mark.parametrize("given", [None, "ACTIVE"])
def test_openmp_threads_wait_passively_unless_told(given):
    """libgomp reads OMP_WAIT_POLICY when torch loads it: importing moerun first sets
    PASSIVE (spinning threads lose a core another process holds), a user's own value stays."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = "import moerun, os, torch; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == (given or "PASSIVE")
