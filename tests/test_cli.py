"""The `moerun` command end to end: the real entry point run as a subprocess.

Each failure case damages a tiny checkpoint in one way and checks the user-facing contract:
exit code 1, exactly one `error: ...` line on stderr, no traceback, and the model folder left
exactly as it was (no half-written caches or converted files).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(
    *args: str, env: dict | None = None, timeout: float = 300, input: str | None = None
) -> subprocess.CompletedProcess:
    full_env = {
        **os.environ,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        # Never the network, never the user's real cache.
        "HF_HUB_OFFLINE": "1",
        "MOERUN_DEBUG": "",
        # A tiny model decodes ~100x faster on one thread than on many busy ones.
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    command = [sys.executable, "-m", "moerun", *args]
    return subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout, input=input)


def listing(folder: Path) -> list[tuple[str, int]]:
    """Every path under `folder` with its size, to prove a failed command wrote nothing."""
    if not folder.exists():
        return []
    return sorted((str(p.relative_to(folder)), p.stat().st_size if p.is_file() else -1) for p in folder.rglob("*"))


def assert_one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    assert len(lines[0]) > len("error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """One tiny two-shard Mixtral checkpoint, built once; tests copy it before damaging it."""
    # Imported here, not skipped on failure: a broken fixture or library must fail the tests.
    import torch

    from tests.model_fixtures import make_checkpoint

    return Path(
        make_checkpoint(tmp_path_factory.mktemp("pristine") / "tiny", arch="mixtral", dtype=torch.bfloat16, shards=2)
    )


@pytest.fixture
def ckpt(pristine, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(pristine, tmp_path / "tiny"))


@pytest.fixture(autouse=True)
def _hf_home(tmp_path, monkeypatch):
    # Whatever the library caches goes into the test's own folder.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


# --- commands that need no model ---------------------------------------------------------


def test_version():
    proc = run_cli("--version")
    assert proc.returncode == 0, proc.stderr
    from moerun import __version__

    assert proc.stdout.strip() == f"moerun {__version__}"


def test_models_lists_aliases():
    proc = run_cli("models", env={"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if "mixtral-8x7b" in line)
    assert "mistralai/Mixtral-8x7B-Instruct-v0.1" in line


def test_cli_module_does_not_import_torch():
    # `moerun --help` and `moerun models` must start fast: torch only inside model verbs.
    code = "import sys, moerun.cli, moerun.chat, moerun.registry; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_usage_error_keeps_exit_code_2(tmp_path):
    proc = run_cli("generate", str(tmp_path), "hi", "--bits", "5")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_folder(tmp_path):
    missing = tmp_path / "no-such-model"
    proc = run_cli("generate", str(missing), "hello")
    assert "no-such-model" in assert_one_line_error(proc)
    assert not missing.exists()


def test_unknown_model_name():
    assert_one_line_error(run_cli("generate", "not-a-model-alias", "hello"))


# --- damaged checkpoints -----------------------------------------------------------------


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _rewrite_tensor(folder: Path, edit) -> str:
    """Rewrite the shard holding an attention weight with `edit(tensors, name)` applied.

    Returns the name of the tensor edited. An attention projection is used because every
    architecture has one and its name does not depend on how experts are stored.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    for shard in _shards(folder):
        with safe_open(str(shard), "pt") as f:
            names = list(f.keys())
            target = next((n for n in names if n.endswith("layers.0.self_attn.q_proj.weight")), None)
            if target is None:
                continue
            metadata = f.metadata() or {"format": "pt"}
            tensors = {n: f.get_tensor(n) for n in names}
        edit(tensors, target)
        save_file(tensors, str(shard), metadata=metadata)
        return target
    raise AssertionError("no q_proj weight found in the fixture checkpoint")


def _drop(tensors, name):
    del tensors[name]


def _grow(tensors, name):
    import torch

    t = tensors[name]
    tensors[name] = torch.zeros((t.shape[0] + 1, *t.shape[1:]), dtype=t.dtype)


def _remove_config(folder: Path) -> None:
    (folder / "config.json").unlink()


def _remove_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.json").unlink()


def _unknown_model_type(folder: Path) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["model_type"] = "llama2000"
    path.write_text(json.dumps(config))


def _missing_tensor(folder: Path) -> None:
    name = _rewrite_tensor(folder, _drop)
    # Also drop it from the index, so the checkpoint is self-consistent but lacks the tensor.
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"].pop(name, None)
        index.write_text(json.dumps(data))


def _wrong_shape(folder: Path) -> None:
    _rewrite_tensor(folder, _grow)


def _truncated_shard(folder: Path) -> str:
    shard = _shards(folder)[-1]
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    return shard.name  # the error must say which file to re-download


DAMAGE = {
    "no-config": (_remove_config, "config.json"),
    "no-tokenizer": (_remove_tokenizer, "tokenizer"),
    "unknown-model-type": (_unknown_model_type, "llama2000"),
    "missing-tensor": (_missing_tensor, "q_proj"),
    "wrong-shape": (_wrong_shape, "q_proj"),
    "truncated-shard": (_truncated_shard, None),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_gives_one_error_line(ckpt, damage):
    damage_fn, expected = DAMAGE[damage]
    named = damage_fn(ckpt)
    if expected is None:
        expected = named
    assert expected, "every damage must name what the error line has to mention"
    before = listing(ckpt)
    proc = run_cli("generate", str(ckpt), "hello", "--max-new-tokens", "2", "--device", "cpu")
    line = assert_one_line_error(proc)
    assert expected in line, line
    assert listing(ckpt) == before, "a failed load left files behind in the model folder"


def test_debug_env_shows_traceback(ckpt):
    _unknown_model_type(ckpt)
    proc = run_cli("generate", str(ckpt), "hello", "--device", "cpu", env={"MOERUN_DEBUG": "1"})
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr
    assert "llama2000" in proc.stderr


# --- success -----------------------------------------------------------------------------


def _eos_ids(folder: Path) -> set[int]:
    """eos_token_id (an int or a list) from config.json and generation_config.json."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        path = folder / name
        value = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
        ids.update([value] if isinstance(value, int) else value or [])
    return ids


def _templated_prompt_ids(folder: Path, prompt: str) -> list[int]:
    """The prompt as one user turn of the checkpoint's chat template, computed from the
    tokenizer alone rather than by the code under test."""
    from moerun.tokenizer import Tokenizer

    messages = [{"role": "user", "content": prompt}]
    return Tokenizer.from_dir(folder).apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def _reply_ids(out: dict, max_new_tokens: int, eos: set[int]) -> list[int]:
    """Check how a greedy --json run ended; return its ids without the stopping eos.
    It either ran to the limit with no eos, or stopped on an eos kept as the last id."""
    ids, stats = out["token_ids"], out["stats"]
    assert stats["generated_tokens"] == len(ids), stats
    if stats["finish_reason"] == "length":
        assert len(ids) == max_new_tokens and not set(ids) & eos, (ids, eos)
        return ids
    assert stats["finish_reason"] == "stop", stats
    assert 1 <= len(ids) <= max_new_tokens and ids[-1] in eos and not set(ids[:-1]) & eos, (ids, eos)
    return ids[:-1]


def test_generate_json(ckpt):
    from moerun.generate import GenerationStats
    from moerun.tokenizer import Tokenizer

    proc = run_cli("generate", str(ckpt), "Hello there", "--max-new-tokens", "8", "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"text", "token_ids", "stats"}
    ids, stats = out["token_ids"], out["stats"]
    assert all(type(t) is int for t in ids), ids
    assert {f.name for f in dataclasses.fields(GenerationStats)} <= set(stats), stats
    eos = _eos_ids(ckpt)
    assert eos, "the fixture checkpoint declares no eos id"
    reply = _reply_ids(out, 8, eos)
    # Without --raw the prompt goes through the chat template.
    assert stats["prompt_tokens"] == len(_templated_prompt_ids(ckpt, "Hello there"))
    # The text is the decode of the generated ids, eos left out.
    assert out["text"] == Tokenizer.from_dir(ckpt).decode(reply)


def test_generate_json_stops_on_generation_config_eos(ckpt):
    # The tiny model rarely emits a real eos, so make one of its greedy tokens an eos id
    # (eos ids do not change the logits): the same run must then stop right on it.
    from moerun.tokenizer import Tokenizer

    args = ("generate", str(ckpt), "Hello there", "--max-new-tokens", "8", "--device", "cpu", "--json")
    first_proc = run_cli(*args)
    assert first_proc.returncode == 0, first_proc.stderr
    first = json.loads(first_proc.stdout)
    assert first["stats"]["finish_reason"] == "length", first
    ids = first["token_ids"]
    stop_at = ids.index(ids[2])  # the first time that id comes up
    path = ckpt / "generation_config.json"
    gen = json.loads(path.read_text())
    gen["eos_token_id"] = sorted(_eos_ids(ckpt) | {ids[2]})
    path.write_text(json.dumps(gen))
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["stats"]["finish_reason"] == "stop", out
    assert out["token_ids"] == ids[: stop_at + 1]
    assert _reply_ids(out, 8, _eos_ids(ckpt)) == ids[:stop_at]
    assert out["text"] == Tokenizer.from_dir(ckpt).decode(ids[:stop_at])


def test_generate_streams_text_to_stdout_and_stats_to_stderr(ckpt):
    common = ("generate", str(ckpt), "Hello there", "--max-new-tokens", "8", "--device", "cpu")
    proc = run_cli(*common)
    assert proc.returncode == 0, proc.stderr
    # Greedy decoding is deterministic: the streamed text is the --json text, plus a newline
    # when the text does not already end with one.
    as_json = json.loads(run_cli(*common, "--json").stdout)
    expected = as_json["text"]
    assert proc.stdout == (expected if expected == "" or expected.endswith("\n") else expected + "\n")
    stats = as_json["stats"]
    assert f"prompt: {stats['prompt_tokens']} tokens," in proc.stderr, proc.stderr
    assert f"generation: {stats['generated_tokens']} tokens," in proc.stderr, proc.stderr
    assert "tok/s" not in proc.stdout
    assert "peak memory: " in proc.stderr and "tok/s" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("prompt: "), proc.stderr  # no blank line, no spinner off a terminal


def test_generate_raw(ckpt):
    from moerun.tokenizer import Tokenizer

    prompt = "The quick brown"
    common = ("generate", str(ckpt), prompt, "--max-new-tokens", "4", "--device", "cpu", "--temperature", "0", "--json")
    raw = run_cli(*common, "--raw")
    assert raw.returncode == 0, raw.stderr
    templated = run_cli(*common)
    assert templated.returncode == 0, templated.stderr
    raw_out, templated_out = json.loads(raw.stdout), json.loads(templated.stdout)
    raw_stats, templated_stats = raw_out["stats"], templated_out["stats"]
    # --raw encodes the prompt as is ...
    plain = Tokenizer.from_dir(ckpt).encode(prompt)
    assert raw_stats["prompt_tokens"] == len(plain)
    # ... while the default wraps it in the chat template, whose role markers add tokens.
    assert templated_stats["prompt_tokens"] == len(_templated_prompt_ids(ckpt, prompt))
    assert templated_stats["prompt_tokens"] > raw_stats["prompt_tokens"]
    _reply_ids(raw_out, 4, _eos_ids(ckpt))
