"""The habits of llama.cpp and ollama users (issue 18): prompts from a file or stdin,
--verbose, a spinner while loading, output that fits 80 columns, hints that name
`moerun pull`. In-process through Typer's runner where the process boundary does not
matter; a pty of 80 columns where the terminal is the point."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest
from typer.testing import CliRunner

from moerun.cli import app
from moerun.spec import LoadSpec

ARGS = ["demo", "-n", "3", "--device", "cpu", "--json"]


def invoke(args, input=None, env=None):
    return CliRunner().invoke(app, args, input=input, env={"COLUMNS": "80", **(env or {})})


def token_ids(result) -> list[int]:
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)["token_ids"]


def test_prompt_from_a_file_from_dash_and_from_a_pipe(tmp_path):
    want = token_ids(invoke(["generate", ARGS[0], "count from 7", *ARGS[1:]]))
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("count from 7\n")  # a file's final newline is not part of the prompt
    assert token_ids(invoke(["generate", ARGS[0], "-f", str(prompt), *ARGS[1:]])) == want
    assert token_ids(invoke(["generate", ARGS[0], "-", *ARGS[1:]], input="count from 7\n")) == want
    assert token_ids(invoke(["generate", *ARGS], input="count from 7\n")) == want  # no PROMPT, stdin a pipe


def test_prompt_errors(tmp_path):
    empty = invoke(["generate", *ARGS], input="")
    assert empty.exit_code != 0 and "empty" in str(empty.exception)
    missing = invoke(["generate", ARGS[0], "-f", str(tmp_path / "nope.txt"), *ARGS[1:]])
    assert missing.exit_code != 0 and "cannot read the prompt file" in str(missing.exception)
    both = invoke(["generate", ARGS[0], "hi", "-f", str(tmp_path / "nope.txt"), *ARGS[1:]])
    assert both.exit_code == 2 and "not both" in both.output


def test_verbose_prints_the_plan_and_timings():
    result = invoke(["generate", "demo", "hi", "-n", "2", "--device", "cpu", "--verbose"])
    assert result.exit_code == 0, result.output
    err = result.stderr
    assert re.search(r"^loaded demo in [\d.]+ s: cpu, \w+, 16-bit experts, ctx 256$", err, re.M), err
    assert "plan: everything in RAM (no GPU)" in err and "host n/a" in err
    assert re.search(r"^time to first token: \d+ ms", err, re.M), err
    quiet = invoke(["generate", "demo", "hi", "-n", "2", "--device", "cpu"])
    assert "plan:" not in quiet.stderr and "time to first token" not in quiet.stderr


COMMANDS = ["", "generate", "chat", "serve", "bench", "models", "fit", "pull", "ls", "rm", "show"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_fits_80_columns_and_flags_show_no_type(command):
    result = invoke([command, "--help"] if command else ["--help"])
    assert result.exit_code == 0, result.output
    wide = [line for line in result.stdout.splitlines() if len(line) > 80]
    assert not wide, wide
    assert "<bool>" not in result.stdout


def test_threads_is_one_option_on_every_verb_that_computes():
    for command in ("generate", "chat", "serve", "bench"):
        out = invoke([command, "--help"]).stdout
        assert "--threads" in out, command


def test_a_revision_in_the_cache_is_loaded_never_pulled(tmp_path, monkeypatch):
    from moerun import api

    for command in ("generate", "chat", "serve", "bench"):
        assert "--revision" in invoke([command, "--help"]).stdout, command
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: any Hub request fails
    api.pull_if_missing("mixtral-8x7b", LoadSpec(revision="main"))  # not cached, yet not pulled: the Hub not asked
    with pytest.raises(api.MoerunError, match="not in the local Hugging Face cache"):
        api.load_spec("mixtral-8x7b", LoadSpec(revision="main"))


def test_an_unreachable_hub_is_a_network_error_and_offline_points_to_pull(tmp_path, monkeypatch):
    from moerun import api, hub

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused
    with pytest.raises(hub.HubUnreachable, match="cannot reach http://127.0.0.1:9"):
        api.pull_if_missing("mixtral-8x7b", LoadSpec(bits=16))  # an alias with a shipped config: no fit from it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.MoerunError, match="`moerun pull mistralai/Mixtral-8x7B-Instruct-v0.1`"):
        hub.resolve("mixtral-8x7b")


def test_bench_at_80_columns_with_na_params_and_the_context_clip(monkeypatch, tmp_path):
    from moerun import bench

    monkeypatch.setenv("MOERUN_CACHE", str(tmp_path))
    # pp512 is the default: on the 256-token demo it is clipped to pp256, and a note says so.
    report = bench.run_bench(
        model="demo", prompt_tokens=[512], gen_tokens=[2], repetitions=1, bits=[16], spec=LoadSpec(device="cpu")
    )
    assert [r["test"] for r in report["rows"]] == ["pp256", "tg2"]
    assert any("pp512 clipped to pp256" in n for n in report["notes"])
    assert all(r["peak_vram_bytes"] is None and r["pcie_gb_s"] is None for r in report["rows"])
    md = bench.render_markdown(report)
    wide = [line for line in md.splitlines() if len(line) > 80]
    assert not wide, wide
    assert "0.00 B" not in md and "| 1.87 M |" in md, md
    assert "n/a" in md and "0.0 KiB | 422" not in md
    with pytest.raises(bench.MoerunError, match="pp300 needs 300 positions; demo's context is 256"):
        bench.run_bench(
            model="demo", prompt_tokens=[300], gen_tokens=[0], repetitions=1, bits=[16], spec=LoadSpec(device="cpu")
        )


def test_bench_piped_prints_progress_lines(tmp_path):
    result = invoke(
        ["bench", "demo", "-p", "8", "-n", "2", "-r", "1", "--bits", "16", "--device", "cpu"],
        env={"MOERUN_PROGRESS_S": "0.2", "MOERUN_CACHE": str(tmp_path)},
    )
    assert result.exit_code == 0, (result.output, result.exception)
    assert re.search(r"^bench: \d/2 runs done, \d+ s$", result.stderr, re.M), result.stderr
    assert result.stdout.startswith("| model |")


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pty")
def test_a_spinner_says_what_is_loading_on_a_terminal(tmp_path):
    from tests.test_chat_pty import ROOT, Terminal

    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "COLUMNS": "80",
        "MOERUN_CACHE": str(tmp_path),
        "TERM": "xterm",
    }
    term = Terminal(["generate", "demo", "count from 7", "-n", "3", "--device", "cpu"], env)
    try:
        # Shown before torch is imported: the first seconds are no longer silent. (That the
        # spinner is gone before the first token is what every generate test on a pipe and
        # the chat pty tests see.)
        term.expect(r"loading demo: starting torch", timeout=60)
    finally:
        term.close()
