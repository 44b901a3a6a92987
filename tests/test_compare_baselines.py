"""scripts/compare_baselines.py's pure helpers: the CPU accounting, the GGUF bytes per
token, the report's section in docs/BENCHMARKS.md (no llama.cpp, no model needed)."""

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("compare_baselines", ROOT / "scripts" / "compare_baselines.py")
cb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cb)

TICK = os.sysconf("SC_CLK_TCK")


def test_cpu_busy_seconds_counts_work_and_steal_not_idle_or_guest():
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat = "cpu  100 20 30 5000 400 6 7 8 900 900\ncpu0 50 10 15 2500 200 3 3 4 450 450\n"
    assert cb.cpu_busy_seconds(stat) == pytest.approx((100 + 20 + 30 + 6 + 7 + 8) / TICK)


def test_cpu_busy_seconds_reads_this_machine():
    first = cb.cpu_busy_seconds(Path("/proc/stat").read_text())
    sum(range(3_000_000))  # some work between the two reads
    assert cb.cpu_busy_seconds(Path("/proc/stat").read_text()) >= first > 0


def test_children_cpu_seconds_grows_with_a_finished_child():
    import subprocess
    import sys

    before = cb.children_cpu_seconds()
    subprocess.run([sys.executable, "-c", "sum(range(20_000_000))"], check=True)
    assert cb.children_cpu_seconds() > before


@pytest.mark.parametrize(
    ("busy", "child", "wall", "expected"),
    [(3.0, 2.0, 2.0, 0.5), (4.0, 4.0, 1.0, 0.0), (1.9, 2.0, 1.0, 0.0), (6.0, 1.0, 2.5, 2.0)],
)
def test_other_cores(busy, child, wall, expected):
    assert cb.other_cores(busy, child, wall) == pytest.approx(expected)


def test_run_threads():
    assert cb.run_threads("moerun", None) is None  # moerun's own default
    assert cb.run_threads("moerun", 3) == 3
    assert cb.run_threads("moerun-t1", 3) == 1
    assert cb.run_threads("llama.cpp", None) == os.cpu_count()
    assert cb.run_threads("llama.cpp-std", 2) == 2
    assert cb.run_threads("transformers", None) is None


def test_gguf_paths_and_quantize_args():
    folder = Path("/x")
    assert cb.gguf_path(folder, "llama.cpp", 16) == cb.gguf_path(folder, "llama.cpp-std", 16)
    assert cb.gguf_path(folder, "llama.cpp", 4).name == "llama-experts-q4_0.gguf"
    assert cb.gguf_path(folder, "llama.cpp-std", 4).name == "llama-std-q4_k_m.gguf"
    assert cb.gguf_path(folder, "llama.cpp-std", 8).name == "llama-std-q8_0.gguf"
    assert cb.quantize_args("llama.cpp-std", 4) == []  # plain llama-quantize: the file users download
    assert "--pure" in cb.quantize_args("llama.cpp", 4)


def _tensors(tied: bool):
    # (name, type, parameters, bytes): 2 layers, 8 experts of 100 bytes per stacked tensor
    t = [("token_embd.weight", "BF16", 500, 1000)]
    if not tied:
        t.append(("output.weight", "Q6_K", 500, 410))
    for layer in range(2):
        t += [
            (f"blk.{layer}.attn_q.weight", "BF16", 50, 100),
            (f"blk.{layer}.ffn_gate_inp.weight", "F32", 8, 32),
            *((f"blk.{layer}.ffn_{w}_exps.weight", "Q4_K", 1000, 800) for w in ("gate", "up", "down")),
        ]
    return t


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("tokens", [1, 2, 3, 64])
def test_gguf_bytes_per_token(tied, tokens):
    k, experts = 2, 8
    tensors = _tensors(tied)
    dense = 2 * (100 + 32) + (1000 if tied else 410)  # the embedding counts only as the output
    experts_bytes = 2 * 3 * 800 * min(k * tokens, experts) / experts
    got = cb.gguf_bytes_per_token(tensors, k, experts, tokens)
    assert got == pytest.approx((dense + experts_bytes) / tokens)


def test_gguf_types_sums_parameters_per_type():
    assert cb.gguf_types(_tensors(False)) == {"BF16": 600, "Q6_K": 500, "F32": 16, "Q4_K": 6000}


def test_bench_tests():
    assert cb.bench_tests([64, 512], 32) == [("pp64", 64), ("pp512", 512), ("tg32", 1)]
    assert cb.bench_tests([0], 32) == [("tg32", 1)]
    assert cb.bench_tests([16], 0) == [("pp16", 16)]


def test_replace_marked_section_replaces_only_between_its_markers():
    text = (
        "# B\n\n## 1\n<!-- compare_baselines:a -->\nold a\n<!-- /compare_baselines:a -->\n"
        "<!-- compare_baselines:b -->\nold b\n<!-- /compare_baselines:b -->\ntail\n"
    )
    got = cb.replace_marked_section(text, "a", "new a\nline 2\n", "## heading")
    assert got == text.replace("old a\n", "new a\nline 2\n")
    assert cb.replace_marked_section(got, "a", "new a\nline 2\n", "## heading") == got  # idempotent


def test_replace_marked_section_appends_a_section_when_the_markers_are_missing():
    got = cb.replace_marked_section("# B\n\ntext\n\n", "c", "body\n", "## C")
    assert got == "# B\n\ntext\n\n## C\n\n<!-- compare_baselines:c -->\nbody\n<!-- /compare_baselines:c -->\n"
    assert cb.replace_marked_section(got, "c", "other\n", "## C") == got.replace("body", "other")


def test_write_benchmarks_is_atomic_and_keeps_the_rest(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nkept\n")
    cb.write_benchmarks(path, "q", "table 1\n")
    cb.write_benchmarks(path, "q", "table 2\n")
    text = path.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n") and "table 2\n" in text and "table 1" not in text
    assert text.count("<!-- compare_baselines:q -->") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["BENCHMARKS.md"]  # no temporary file left


def test_busy_loops_start_and_stop():
    loops = cb.start_busy_loops(2)
    try:
        assert all(loop.poll() is None for loop in loops)
    finally:
        cb.stop_busy_loops(loops)
    assert all(loop.returncode is not None for loop in loops)
