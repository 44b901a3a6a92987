"""`moerun bench`: llama-bench-style rows, sweeps, synthetic models of every alias offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from moerun import bench
from moerun.registry import ALIASES
from moerun.spec import LoadSpec
from tests.model_fixtures import make_checkpoint

ROW_FIELDS = {
    "model",
    "size_bytes",
    "params",
    "active_params",
    "bits",
    "budget",
    "backend",
    "test",
    "t_s_mean",
    "t_s_std",
    "ttft_s",
    "peak_vram_bytes",
    "peak_ram_bytes",
    "expert_hit_rate",
    "bytes_copied_per_token",
    "pcie_gb_s",
    "cpu_experts_per_token",
    "time_share",
    "tokens_per_run",
    "tokens_counted",
    "repetitions",
}
MACHINE_FIELDS = {"gpu", "vram_bytes", "driver", "cpu", "ram_bytes", "torch", "moerun"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("bench"), "qwen3_moe", dtype=torch.bfloat16, shards=1)


def run_cli(*args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "moerun", "bench", *args], capture_output=True, text=True, env=env)


def check_row(row: dict) -> None:
    assert ROW_FIELDS <= set(row)
    assert row["t_s_mean"] > 0 and row["t_s_std"] >= 0 and row["ttft_s"] > 0
    assert row["tokens_counted"] == row["tokens_per_run"] * row["repetitions"]  # tokens counted = tokens asked
    assert 0 <= row["expert_hit_rate"] <= 1 and row["bytes_copied_per_token"] >= 0 and row["peak_ram_bytes"] > 0
    assert row["params"] > 0 and row["size_bytes"] > 0 and row["active_params"] <= row["params"]
    shares = row["time_share"]
    assert set(shares) == {"attention", "experts", "copies", "cpu_experts", "lm_head", "other"}
    assert all(v >= 0 for v in shares.values()) and abs(sum(shares.values()) - 1) < 0.05


def test_json_report_has_every_field_and_consistent_numbers(folder, tmp_path):
    proc = run_cli(
        str(folder),
        "-p",
        "8",
        "-n",
        "4",
        "-r",
        "2",
        "--bits",
        "16,4",
        "--expert-slots",
        "1",
        "--device",
        "cpu",
        "-o",
        "json",
        env_extra={"MOERUN_CACHE": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert MACHINE_FIELDS <= set(report["machine"])
    rows = report["rows"]
    assert [(r["bits"], r["test"]) for r in rows] == [(16, "pp8"), (16, "tg4"), (4, "pp8"), (4, "tg4")]
    for row in rows:
        check_row(row)
        assert row["expert_hit_rate"] < 1 and row["bytes_copied_per_token"] > 0  # one slot: it must miss
    assert rows[2]["size_bytes"] < rows[0]["size_bytes"]  # 4-bit experts are smaller


def test_sweep_gives_one_row_per_combination(folder, tmp_path):
    report = bench.run_bench(
        model=str(folder),
        prompt_tokens=[4, 8],
        gen_tokens=[2],
        repetitions=1,
        bits=[8],
        cold=["gpu", "cpu"],
        spec=LoadSpec(expert_slots=2, device="cpu"),
    )
    combos = [(r["backend"], r["test"]) for r in report["rows"]]
    assert len(combos) == len(set(combos)) == 2 * 3
    assert {t for _, t in combos} == {"pp4", "pp8", "tg2"}
    cpu_rows = [r for r in report["rows"] if "cold=cpu" in r["backend"]]
    assert cpu_rows and all(r["cpu_experts_per_token"] > 0 for r in cpu_rows)


def test_markdown_is_llama_bench_shaped(folder):
    proc = run_cli(str(folder), "-p", "4", "-n", "2", "-r", "1", "--bits", "16", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "| model | size | params | bits | budget | backend | test | t/s |"
    assert any("| pp4 |" in line and " ± " in line for line in lines)
    assert any(line.startswith("machine: GPU none; CPU ") for line in lines)


# The fast tier benches one plain MoE, one hybrid and the encoder-decoder (each family is
# held against the reference in test_families); every alias is the slow tier's.
FAST_ALIASES = ("qwen3-30b-a3b", "qwen3.5-35b-a3b", "switch-base-8")


def synthetic_bench(alias: str, prompt_tokens: int, expert_slots: int) -> dict:
    """`moerun bench --synthetic alias` on the CPU: one round of 2 tokens at 4 bits, the first layer only."""
    spec = LoadSpec(expert_slots=expert_slots, device="cpu")
    return bench.run_bench(
        synthetic=alias, prompt_tokens=[prompt_tokens], gen_tokens=[2], repetitions=1, bits=[4], layers=1, spec=spec
    )


@pytest.mark.parametrize(
    "alias",
    [
        a if a in FAST_ALIASES else pytest.param(a, marks=pytest.mark.slow)
        for a in sorted(a for a in ALIASES if a != "demo")
    ],
)
def test_synthetic_runs_offline_for_every_alias(alias, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    report = synthetic_bench(alias, prompt_tokens=2, expert_slots=1)
    assert len(report["rows"]) == 2
    for row in report["rows"]:
        check_row(row)
        assert row["model"] == f"{alias} (synthetic)"
    assert bench.RANDOM_ROUTING_NOTE in report["notes"]
    assert any("first 1 of" in note for note in report["notes"])


def test_synthetic_quantized_and_offloaded(monkeypatch):
    report = synthetic_bench("qwen3-30b-a3b", prompt_tokens=4, expert_slots=4)
    for row in report["rows"]:
        check_row(row)
        assert row["bits"] == 4 and row["expert_slots_per_layer"] == 4 and row["expert_hit_rate"] < 1


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "give a MODEL or --synthetic"),
        (["--synthetic", "gpt-9"], "no shipped config for 'gpt-9'"),
        (["--synthetic", "mixtral-8x7b", "-o", "xml"], None),
    ],
)
def test_bad_input_is_one_line(args, message):
    proc = run_cli(*args, "--device", "cpu")
    if message is None:  # a usage error: click's own message and exit code 2
        assert proc.returncode == 2
        return
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {proc.stderr.strip().removeprefix('error: ')}"]
    assert message in proc.stderr
