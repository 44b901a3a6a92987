"""`moerun fit` and the planner on the real layouts of the alias table: header-only Hub
repos served over loopback (tests/hub_server.py), local folders, and the plan `fit`
prints against what `load` then allocates."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moerun import fit, plan, registry
from moerun.errors import MoerunError
from moerun.models import checkpoint_layout
from moerun.spec import LoadSpec, parse_size
from tests.hub_server import HubServer, real_file, safetensors_header_file

ROOT = Path(__file__).resolve().parents[1]


def header_repo(config: dict, shards: int) -> dict:
    """config.json plus `shards` virtual safetensors files holding the family's real
    tensor names and shapes (from the shipped config), as on the Hub."""
    tensors = [(name, (shape, dtype)) for name, (shape, dtype, _) in checkpoint_layout(config).items()]
    per = -(-len(tensors) // shards)
    files = {"config.json": real_file(json.dumps(config).encode())}
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = dict(tensors[i * per : (i + 1) * per])
        files[name] = safetensors_header_file(part)
        weight_map.update(dict.fromkeys(part, name))
    files["model.safetensors.index.json"] = real_file(json.dumps({"metadata": {}, "weight_map": weight_map}).encode())
    return files


@pytest.fixture(scope="module")
def server():
    with HubServer() as s:
        s.add_repo("mistralai/Mixtral-8x7B-Instruct-v0.1", header_repo(registry.shipped_config("mixtral-8x7b"), 19))
        s.add_repo("Qwen/Qwen3-30B-A3B", header_repo(registry.shipped_config("qwen3-30b-a3b"), 16))
        yield s


def run_cli(*args, env=None, tmp_path=None):
    full = {**os.environ, "PYTHONPATH": str(ROOT), "MOERUN_DEBUG": "", "HF_HUB_OFFLINE": "0", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "moerun", *args], cwd=ROOT, env=full, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def hub_env(server, tmp_path, monkeypatch):
    env = {"HF_ENDPOINT": server.url, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "0"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.mark.parametrize(
    "alias, total, active, max_read",
    [("mixtral-8x7b", 46.70e9, 12.88e9, 1_000_000), ("qwen3-30b-a3b", 30.53e9, 3.34e9, 4_000_000)],
)
def test_fit_from_hub_headers_counts_known_models(server, hub_env, alias, total, active, max_read):
    before = server.bytes_sent
    proc = run_cli("fit", alias, "--vram", "24GiB", "--ram", "64GiB", "--json", env=hub_env)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["source"] == "hub"
    assert abs(d["total_params"] - total) / total < 0.01
    assert abs(d["active_params"] - active) / active < 0.01
    for key in ("weight_bytes", "kv_cache_bytes", "gpu_bytes", "cpu_bytes", "expert_slots_per_layer"):
        assert isinstance(d[key], int)
    assert d["verdict"] in ("gpu", "offload", "no")
    sent = server.bytes_sent - before
    # Headers only: a few hundred KB for a 90 GB checkpoint (Qwen3's 18,867 tensor names
    # make its headers ~2 MB), never the weights.
    assert sent < max_read and sent < d["stored_bytes"] / 10_000, sent
    assert d["metadata_bytes_read"] <= sent
    weights = [r for r in server.requests if r[1].endswith(".safetensors") and r[0] == "GET"]
    assert weights and all(r[2] and r[2].startswith("bytes=") for r in weights)


def assert_fits_80_columns(text: str) -> None:
    """No line wider than 80, no cell cut to "1…", no table title split over lines."""
    for line in text.splitlines():
        assert len(line) <= 80 and "…" not in line, line


def test_fit_report_is_readable(hub_env):
    proc = run_cli(
        "fit",
        "mistralai/Mixtral-8x7B-Instruct-v0.1",
        "--vram",
        "24GB",
        "--ram",
        "64000MB",
        "--bits",
        "4",
        "--ctx",
        "8192",
        "--dtype",
        "bfloat16",
        env={**hub_env, "COLUMNS": "80"},
    )
    assert proc.returncode == 0, proc.stderr
    assert_fits_80_columns(proc.stdout)
    assert "weights at 4 bits (experts), bfloat16 (the rest):" in proc.stdout.splitlines()
    out = " ".join(proc.stdout.split())
    for text in (
        "routed experts",
        "45.1B",
        "active per token: 12.9B of 46.7B",
        "KV cache (GQA) at 8192 tokens: 1.00 GiB",
        "offload",
        "tok/s",
        "recommended: --bits",
    ):
        assert text in out, out


def test_fit_verdicts_follow_budgets(hub_env):
    def verdict(vram, ram=None, bits=4):
        return fit.fit("mixtral-8x7b", bits=bits, vram=vram, ram=ram, dtype="bfloat16", measure=False).plan

    assert verdict("80GiB", "64GiB").verdict == "gpu"
    p = verdict("12GiB", "64GiB")
    assert p.verdict == "offload" and 1 <= p.expert_slots_per_layer < 8 and p.cpu_bytes > 20 * 2**30
    p = verdict("2GiB", "64GiB")
    assert p.verdict == "no" and "needs at least" in p.reason
    assert verdict("12GiB", "8GiB").verdict == "no"  # the expert store does not fit in RAM
    assert verdict("80GiB", "64GiB", bits=16).verdict == "no"  # 87 GiB of bf16
    r = fit.fit("mixtral-8x7b", vram="80GiB", ram="64GiB", dtype="bfloat16", measure=False)
    assert r.recommended_bits == 8


def test_mla_kv_cache_holds_the_latent():
    cfg = registry.shipped_config("deepseek-v2-lite")
    s = plan.summarize(cfg)
    assert s.kv_kind == "mla"
    assert s.kv_cache_bytes(1000, 2) == 27 * (512 + 64) * 1000 * 2
    cfg = registry.shipped_config("qwen3-30b-a3b")
    s = plan.summarize(cfg)
    assert s.kv_cache_bytes(1000, 2) == 2 * 48 * 4 * 128 * 1000 * 2


@pytest.mark.parametrize(
    "alias, total, active",
    [
        ("mixtral-8x22b", 140.6e9, 39.2e9),
        ("qwen1.5-moe-a2.7b", 14.3e9, 2.69e9),
        ("qwen2-57b-a14b", 57.4e9, 14.2e9),
        ("qwen3-235b-a22b", 235.1e9, 22.2e9),
        ("deepseek-v2-lite", 15.7e9, 2.66e9),  # 2.4 B active without the embedding table
        ("deepseek-v3", 671.0e9, 37.5e9),  # the MTP layer is not counted
        ("olmoe-1b-7b", 6.92e9, 1.28e9),
        ("phi-3.5-moe", 41.9e9, 6.6e9),
        ("gpt-oss-20b", 20.9e9, 4.19e9),  # OpenAI's 3.6 B leaves out the embedding table
        ("gpt-oss-120b", 116.8e9, 5.71e9),
        ("llama-4-scout", 107.8e9, 17.2e9),  # the vision tower (~1 B) is counted apart
        # Published: 106B total, 12B active (without the embeddings and lm_head: 12.18B).
        ("glm-4.5-air", 106.0e9, 13.42e9),
        # Published: "30B-A3B"; active 3.26B without embeddings and lm_head.
        ("glm-4.7-flash", 30.0e9, 3.90e9),
        # Published: "21B total, 3B active", rounded down: transformers counts 21.83B / 3.35B
        # on the meta device for this config (3.09B active without the embeddings).
        ("ernie-4.5-21b-a3b", 21.83e9, 3.35e9),
        # Published: 52B total / 12B active (AI21's model card and discussions).
        ("jamba-mini", 52.0e9, 12.11e9),
        # Published: 8.3B / 1.5B, the active count rounded: 1.56B with the (tied) embeddings.
        ("lfm2-8b-a1b", 8.3e9, 1.56e9),
        # Published 80B / 3B (active without embeddings and lm_head: 3.25B).
        ("qwen3-next-80b-a3b", 80.0e9, 3.88e9),
        # Published 35B / 3B (2.44B without embeddings and lm_head); the vision tower apart.
        ("qwen3.5-35b-a3b", 35.0e9, 3.46e9),
        # Published 122B / 10B (9.77B with embeddings: the published figure is rounded).
        ("qwen3.5-122b-a10b", 122.0e9, 9.77e9),
        # Published 7B / 1B (IBM's docs: "7B-A1B"); 1.47B active with the tied embeddings.
        ("granite-4.0-h-tiny", 6.94e9, 1.47e9),
        # Published 32B / 9B (one IBM page: 32.2B).
        ("granite-4.0-h-small", 32.2e9, 8.80e9),
        # Published 620M / 7.4B / 26B (the model cards); encoder and decoder counted, one
        # expert active per token: T5-base's and T5-large's sizes (tied embeddings once).
        ("switch-base-8", 0.619e9, 0.223e9),
        ("switch-base-128", 7.42e9, 0.224e9),
        ("switch-large-128", 26.3e9, 0.741e9),
    ],
)
def test_layouts_of_the_alias_table(alias, total, active):
    cfg = registry.shipped_config(alias)
    s = plan.summarize(cfg)
    assert abs(s.total_params - total) / total < 0.01, s.total_params
    assert abs(s.active_params - active) / active < 0.01, s.active_params
    assert not s.warnings and s.n_experts > 1


def test_other_formats_are_counted_by_stored_bytes():
    cfg = registry.shipped_config("deepseek-v3")
    s = plan.summarize(cfg)
    # FP8 weights with float32 128x128 block scales: just over one byte per parameter.
    assert 1.0 < s.stored_bytes / s.total_params < 1.05
    cfg = registry.shipped_config("gpt-oss-20b")
    s = plan.summarize(cfg)
    routed = s.stored_bytes_by_role["routed_experts"] * 8 / s.params_by_role["routed_experts"]
    assert 4.2 < routed < 4.3  # MXFP4: 4 bits + one 8-bit scale per 32 values
    assert s.expert_intermediate_size == 2880


def test_the_plan_asks_the_model_and_looks_headers_up_in_its_layout():
    D, I, E, L = 64, 32, 4, 2
    cfg = {
        "model_type": "granitemoe",
        "hidden_size": D,
        "intermediate_size": I,
        "num_hidden_layers": L,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_local_experts": E,
        "num_experts_per_tok": 2,
        "vocab_size": 100,
    }
    s = plan.summarize(cfg)  # no headers: the family's own description of its checkpoint
    assert s.n_experts == E and s.expert_intermediate_size == I and s.moe_layers == [0, 1]
    assert s.active_params == s.total_params - L * E * 3 * D * I // 2
    assert s.stored_bytes == 2 * s.total_params and s.unused_params == 0
    # Headers with a tensor the layout lacks: counted as stored but never loaded.
    headers = {n: (shape, dtype) for n, (shape, dtype, _) in checkpoint_layout(cfg).items()}
    headers["vision_model.patch_embed.weight"] = ((10, D), "BF16")
    with_vision = plan.summarize(cfg, headers)
    assert with_vision.unused_params == 10 * D and with_vision.total_params == s.total_params
    dense = plan.summarize({**cfg, "model_type": "mystery"}, {"model.embed_tokens.weight": ((100, D), "BF16")})
    assert dense.n_experts == 0 and dense.total_params == 100 * D and "generic estimate" in dense.warnings[0]


def test_no_module_outside_the_models_names_a_family_or_a_checkpoint_tensor():
    import re

    # A checkpoint name (`mlp.experts.0.w1`), not prose or a module like cpu_experts.
    pattern = re.compile(r"model_type ==|(?<!\w)experts\.[\w{]|block_sparse_moe|input_linear|self_attn")
    offenders = []
    for path in sorted((ROOT / "moerun").rglob("*.py")):
        if "models" in path.relative_to(ROOT / "moerun").parts:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_sizes_accept_units():
    assert parse_size("12GiB") == 12 * 2**30
    assert parse_size("12GB") == 12 * 10**9
    assert parse_size("12000MB") == 12 * 10**9


# -- local folders: the plan fit prints is what load allocates ------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.model_fixtures import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("tiny"), "qwen3_moe", shards=2)


@pytest.mark.parametrize("bits", [16, 4])
def test_fit_plan_equals_what_load_allocates(tiny, bits, tmp_path, monkeypatch):
    import moerun
    from tests.test_offload import device_bytes

    monkeypatch.setenv("MOERUN_CACHE", str(tmp_path / "cache"))
    full = fit.fit(str(tiny), bits=bits, ctx=256, measure=False, dtype="float32").plan
    budget = full.non_expert_bytes + full.kv_cache_bytes + 2 * full.expert_blob_bytes * full.n_moe_layers + 100
    # fit --vram plans a GPU of that size; the CPU's load with that budget simulates one.
    proc = run_cli(
        "fit", str(tiny), "--bits", str(bits), "--ctx", "256", "--vram", str(budget), "--json", "--dtype", "float32"
    )
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed["source"] == "folder" and printed["verdict"] == "offload"
    model = moerun.load(str(tiny), bits=bits, device="cpu", ctx=256, vram=budget, dtype="float32")
    assert model.plan.expert_slots_per_layer == printed["expert_slots_per_layer"] == 2
    assert abs(device_bytes(model) - printed["gpu_bytes"]) <= 0.05 * printed["gpu_bytes"]


def test_models_table_offline(tmp_path):
    proc = run_cli("models", env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path), "COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    assert_fits_80_columns(proc.stdout)
    verdicts = (
        {"yes", "yes, GPU", "offload", "no"} if "this GPU" in proc.stdout else {"yes", "no"}
    )  # no GPU: no offload
    for line in proc.stdout.splitlines()[2:]:
        if line[:1].isalnum() and "B " in line:
            assert re.split(r"\s{2,}", line.strip())[-1].split(" (")[0] in verdicts, line
    for alias in (
        "mixtral-8x7b",
        "mixtral-8x22b",
        "qwen1.5-moe-a2.7b",
        "qwen2-57b-a14b",
        "qwen3-30b-a3b",
        "qwen3-235b-a22b",
        "deepseek-v2-lite",
        "deepseek-v3",
        "olmoe-1b-7b",
        "phi-3.5-moe",
        "gpt-oss-20b",
        "gpt-oss-120b",
        "llama-4-scout",
        "glm-4.5-air",
        "glm-4.7-flash",
        "ernie-4.5-21b-a3b",
    ):
        assert alias in proc.stdout
    row = next(line for line in proc.stdout.splitlines() if "mixtral-8x7b" in line)
    assert "46.7B" in row and "12.9B" in row and any(v in row for v in ("yes", "offload", "no"))
    row = next(line for line in proc.stdout.splitlines() if "deepseek-v3" in line)
    assert "671.0B" in row and "no" in row


# -- planning a machine that is not this one, and this CPU's RAM --------------------------------

NO_GPU = {"HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}  # a machine without a GPU, offline: shipped configs


def test_fit_for_a_named_card_on_a_machine_without_one(tmp_path):
    proc = run_cli(
        "fit",
        "--gpu",
        "rtx-3060",
        "--ram",
        "32GiB",
        "mixtral-8x7b",
        "--json",
        env={**NO_GPU, "HF_HUB_CACHE": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["device"] == "cuda" and d["gpu"]["key"] == "rtx-3060"
    assert d["vram_budget"] == 12 * 2**30 and d["ram_budget"] == 32 * 2**30
    assert d["dtype"] == "bfloat16"  # the GPU's 16-bit dtype, not this CPU's float32
    # bf16 K and V for 4096 positions: 32 layers x 8 KV heads x 128 dims x 2 bytes, not doubled.
    assert d["kv_cache_bytes"] == 2 * 32 * 8 * 128 * 4096 * 2
    assert d["weight_bytes_by_role"]["attention"] == 2 * d["params_by_role"]["attention"]
    assert d["verdicts_by_bits"] == {"16": "no", "8": "no", "4": "offload"} and d["recommended_bits"] == 4
    assert d["gpu_bytes"] <= d["vram_budget"] and d["cpu_bytes"] <= d["ram_budget"]
    bw = d["bandwidths"]
    assert bw["vram"] == 360e9 and bw["source"]["vram"] == "rtx-3060 table"
    assert abs(bw["pcie"] - 16 * 1.969e9 * 0.8) < 1e6  # PCIe 4.0 x16 as pinned copies achieve it
    assert d["decode_tok_s"]["high"] == pytest.approx(360e9 / d["decode_bytes_per_token"])
    assert 0 < d["decode_tok_s"]["low"] < d["decode_tok_s"]["high"]


def test_fit_vram_plans_that_gpu_in_its_16_bit_dtype():
    """--vram on any machine plans a GPU of that size: bf16, as the card table does."""
    bare = fit.fit("mixtral-8x7b", bits=4, vram="12GiB", ram="32GiB", measure=False)
    card = fit.fit("mixtral-8x7b", bits=4, gpu="rtx-3060", ram="32GiB", measure=False)
    assert bare.device == "cuda" and bare.dtype == card.dtype == torch_bf16()
    assert bare.plan.to_dict() == card.plan.to_dict()


def torch_bf16():
    import torch

    return torch.bfloat16


def test_cpu_plan_holds_everything_in_ram_and_never_offloads(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine, without its GPU if it has one
    for ram in ("20GiB", "40GiB", "200GiB"):
        r = fit.fit("mixtral-8x7b", ram=ram, dtype="bfloat16", measure=False)
        assert r.device == "cpu" and set(r.to_dict()["verdicts_by_bits"].values()) <= {"ram", "no"}
        for p in r.plans.values():
            assert p.vram_budget is None and p.unified
            assert (p.verdict == "ram") == (p.ram_bytes <= p.ram_budget)  # RAM holds weights, KV cache and experts
    r = fit.fit("mixtral-8x7b", ram="20GiB", dtype="bfloat16", measure=False)
    assert r.plan.verdict == "no" and "of RAM" in r.plan.reason and r.recommended_bits is None
    assert any("--bits 4 with" in s and "RAM" in s for s in r.suggestions)
    r = fit.fit("mixtral-8x7b", ram="40GiB", dtype="bfloat16", measure=False)
    assert r.to_dict()["verdicts_by_bits"] == {"16": "no", "8": "no", "4": "ram"} and r.recommended_bits == 4
    assert r.tok_s[0] == r.tok_s[1] > 0


def test_suggestions_when_it_does_not_fit():
    r = fit.fit("mixtral-8x7b", bits=16, gpu="rtx-4090", ram="64GiB", measure=False)
    assert r.plan.verdict == "no" and r.suggestions[0].startswith("--bits 8: offload")
    r = fit.fit("mixtral-8x7b", bits=4, gpu="rtx-3060", ram="16GiB", measure=False)
    assert r.suggestions == ["--bits 4 with 23.62 GiB of RAM: offload, 2 of 8 experts per layer on the GPU"]
    r = fit.fit("qwen3-235b-a22b", gpu="m3-max", measure=False)  # unified: a larger chip, not more RAM
    assert r.device == "unified" and r.plan.verdict == "no" and "--gpu m2-ultra" in r.suggestions[-1]
    r = fit.fit("deepseek-v3", bits=16, gpu="rtx-4090", ram="64GiB", measure=False)
    across = r.suggestions[-1]
    assert "vLLM or SGLang with expert parallelism" in across and "~18 GPUs of 80 GB" in across, across


def test_gpu_and_ram_specs():
    from moerun import gpus

    assert gpus.gpu("RTX 3060").key == gpus.gpu("3060").key == "rtx-3060"
    assert gpus.gpu("m3-max").unified and gpus.gpu("4060-ti-16gb").pcie_lanes == 8
    assert gpus.parse_ram("ddr5-5600x2") == (None, 89.6e9)
    assert gpus.parse_ram("32GiB,ddr4-3200x4") == ("32GiB", 3200e6 * 8 * 4)
    assert gpus.parse_bandwidth("90GB/s") == 90e9
    with pytest.raises(MoerunError, match="--gpu list"):
        gpus.gpu("voodoo-5")
    r = fit.fit("mixtral-8x7b", gpu="rtx-4090", ram="64GiB,ddr5-5600x2", measure=False)
    assert r.plan.ram_budget == 64 * 2**30 and r.bw.ram == 89.6e9 and r.bw.source["ram"] == "given"


@pytest.fixture(scope="module")
def header_only_olmoe(tmp_path_factory) -> Path:
    """OLMoE-1B-7B as a real folder whose one safetensors file has the real header and a
    sparse, never-written data region (13 GiB on paper, nothing on disk): what a load must
    refuse from its plan before it reads a weight."""
    from tests.tokenizer_fixtures import write_tokenizer

    folder = tmp_path_factory.mktemp("olmoe")
    config = registry.shipped_config("olmoe-1b-7b")
    (folder / "config.json").write_text(json.dumps(config))
    write_tokenizer(folder)
    f = safetensors_header_file({n: (shape, dtype) for n, (shape, dtype, _) in checkpoint_layout(config).items()})
    with open(folder / "model.safetensors", "wb") as out:
        out.write(f.head)
        out.truncate(f.size)
    return folder


def test_cpu_load_that_cannot_fit_in_ram_is_refused_before_allocating(header_only_olmoe, tmp_path):
    env = {**NO_GPU, "MOERUN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = run_cli(
        "generate", str(header_only_olmoe), "hi", "--device", "cpu", "--dtype", "bfloat16", "--ram", "8GiB", env=env
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("error: ") and "does not fit: needs" in lines[0] and "of RAM" in lines[0]
    assert "the budget is 8.00 GiB; it fits with --bits 8" in lines[0] and "or --bits 4" in lines[0], lines[0]
    assert not (tmp_path / "cache").exists()  # nothing was built
    import moerun

    # No bits fits 1 GiB: no hint.
    with pytest.raises(MoerunError, match=r"needs .* of RAM .* the budget is 1.00 GiB$"):
        moerun.load(str(header_only_olmoe), bits=4, device="cpu", dtype="bfloat16", ram="1GiB")


def test_ctx_is_the_window_and_is_enforced(tmp_path):
    """A 57-token prompt with --ctx 16 is refused in one line, as llama-cli refuses a prompt
    longer than n_ctx; bench refuses a test longer than the window."""
    prompt = " ".join(["hello"] * 57)
    proc = run_cli(
        "generate", "demo", prompt, "--raw", "--ctx", "16", "-n", "4", env={**NO_GPU, "OMP_NUM_THREADS": "1"}
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and proc.stdout == "", proc.stderr
    assert "the planned context is 16" in lines[0] and "--ctx" in lines[0]
    from moerun import bench

    with pytest.raises(MoerunError, match="pp57 needs 57 positions; the context is 16"):
        bench.run_bench(
            model="demo", prompt_tokens=[57], gen_tokens=[4], repetitions=1, spec=LoadSpec(ctx=16, device="cpu")
        )
    with pytest.raises(MoerunError, match="tg16 needs 17 positions; the context is 16"):
        bench.run_bench(
            model="demo", prompt_tokens=[0], gen_tokens=[16], repetitions=1, spec=LoadSpec(ctx=16, device="cpu")
        )


def test_fit_text_at_80_columns_says_what_would_make_it_fit(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from moerun.cli import app

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    runner = CliRunner()
    env = {"COLUMNS": "80", "HF_HUB_OFFLINE": "1"}
    out = runner.invoke(app, ["fit", "--gpu", "list"], env=env)
    assert out.exit_code == 0, out.output
    assert_fits_80_columns(out.output)
    for key in ("rtx-3060", "rtx-4090", "rtx-5090", "rx-7900-xtx", "rtx-a6000", "l4", "m3-ultra"):
        assert f"\n{key} " in out.output
    out = runner.invoke(app, ["fit", "deepseek-v3", "--bits", "16", "--gpu", "rtx-4090", "--ram", "64GiB"], env=env)
    assert out.exit_code == 0, out.output
    assert_fits_80_columns(out.output)
    text = " ".join(out.output.split())
    assert "to make it fit: --bits 4 on a 48 GiB card" in text and "vLLM or SGLang with expert parallelism" in text
