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
    assert "plan: everything on the device" in err and "host n/a" in err
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


def test_an_unreachable_hub_is_a_network_error_and_offline_points_to_pull(tmp_path, monkeypatch):
    from moerun import api, hub

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused
    with pytest.raises(hub.HubUnreachable, match="cannot reach http://127.0.0.1:9"):
        api.pull_if_missing("mixtral-8x7b", bits=16)  # an alias with a shipped config: no fit from it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.MoerunError, match="`moerun pull mistralai/Mixtral-8x7B-Instruct-v0.1`"):
        hub.resolve("mixtral-8x7b")
