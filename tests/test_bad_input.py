"""Bad input outside the HTTP server (issue 31): implausible configs, out-of-range options,
undecodable prompts and files, hostile index entries, a full disk. Each case goes through
the real CLI (moerun.cli.main in this process, as tests/test_validation.py does; a real
process where the boundary matters) and must give exit 1 (2 for a usage error) with one
`error: ...` line, no traceback, nothing half-written, and no hang: the cases that hung
before run under a watchdog that fails the test instead of the suite.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from moerun.registry import DEMO_DIR
from tests.hub_server import HubServer
from tests.test_validation import _env, cli, patch_json  # noqa: F401  (_env: its autouse fixture, offline)


@pytest.fixture
def model(tmp_path) -> Path:
    """A copy of the embedded demo model (3.7 MB), to damage."""
    return Path(shutil.copytree(DEMO_DIR, tmp_path / "model"))


def cli_within(seconds: float, capsys, *args: str) -> tuple[int, str]:
    """test_validation.cli (its one-line contract checked) in a thread, failing the test if
    the command has not returned after `seconds`."""
    result: list = []

    def run():
        try:
            result.append(cli(capsys, *args))
        except BaseException as e:  # the contract's assertion, raised again below
            result.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"moerun {' '.join(args)} still running after {seconds} s"
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


# --- configs no model has ------------------------------------------------------------------

HUGE = [
    ({"num_local_experts": 1_000_000_000}, "num_local_experts is 1000000000, more experts than any model has"),
    ({"num_hidden_layers": 1_000_000}, "num_hidden_layers is 1000000, more layers than any model has"),
    ({"hidden_size": 1e18}, "these sizes imply about 1.6e+37 parameters, more than any model has"),
    ({"sliding_window": -5}, "sliding_window is -5, must be at least 0"),
    (
        {"rope_parameters": {"rope_type": "default", "rope_theta": float("nan")}},
        "rope_parameters.rope_theta is NaN, must be a number above 0",
    ),
    ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, "rope_scaling.factor is 0, must be a number above 0"),
]


@pytest.mark.parametrize("verb", ["generate", "fit", "show"])
@pytest.mark.parametrize(
    "change, words", HUGE, ids=["experts", "layers", "hidden", "window", "nan-theta", "zero-factor"]
)
def test_an_implausible_config_is_refused_before_anything_is_built(capsys, model, verb, change, words):
    patch_json(model / "config.json", **change)
    args = [verb, str(model)] + (["hi", "-n", "1"] if verb == "generate" else [])
    code, line = cli_within(60, capsys, *args)
    assert line.startswith(f"error: {model / 'config.json'}: {words}"), line


def test_nan_in_any_number_field_is_refused():
    """NaN compares false with everything, so only a field with a minimum refused it; one
    without (DeepSeek-V3's routed_scaling_factor) took it and replied garbage."""
    import json

    from moerun.errors import MoerunError
    from moerun.models import build_args

    config = json.loads((DEMO_DIR.parent / "configs" / "deepseek-v3.json").read_text())
    build_args(config)
    with pytest.raises(MoerunError, match=r"^config.json: routed_scaling_factor is NaN, expected a number$"):
        build_args({**config, "routed_scaling_factor": float("nan")})


def test_released_configs_pass_the_size_checks():
    """Every shipped config (up to DeepSeek-V3 and Qwen3-235B) is far inside the bounds."""
    import json

    from moerun.config_checks import MAX_PARAMETERS, estimated_parameters
    from moerun.models import ARCHITECTURES, build_args

    configs = sorted((DEMO_DIR.parent / "configs").glob("*.json"))
    assert len(configs) > 10
    for path in configs:
        config = json.loads(path.read_text())
        if config.get("model_type") in ARCHITECTURES:
            build_args(config, str(path))
            assert estimated_parameters(config) < MAX_PARAMETERS / 10, path.name


def test_an_implausible_config_served_by_a_hub_is_refused_by_fit(capsys, model, monkeypatch, tmp_path):
    patch_json(model / "config.json", num_local_experts=1_000_000_000)
    with HubServer() as server:
        server.add_folder("bad/huge", model)
        for k, v in {
            "HF_ENDPOINT": server.url,
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_CACHE": str(tmp_path / "hub"),
            "HF_TOKEN": "",
            "MOERUN_RETRY_BASE_S": "0.001",
        }.items():
            monkeypatch.setenv(k, v)
        # huggingface_hub read HF_HUB_OFFLINE (1 in this module) once, when first imported.
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
        code, line = cli_within(60, capsys, "fit", "bad/huge")
    assert "config.json" in line and "num_local_experts is 1000000000, more experts than any model has" in line


# --- options out of range ------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, words",
    [
        (["generate", "demo", "hi", "--threads", "100000"], "Invalid value for '--threads': 100000 is not 1 to"),
        (["serve", "demo", "--threads", "0"], "Invalid value for '--threads': 0 is not 1 to"),
        (["bench", "demo", "--threads", "100000"], "Invalid value for '--threads': 100000 is not 1 to"),
        (["bench", "demo", "-r", "100000000000"], "Invalid value for '-r'"),
    ],
    ids=["generate-threads", "serve-threads-0", "bench-threads", "bench-r"],
)
def test_threads_and_repetitions_are_bounded(capsys, args, words):
    """--threads 100000 crashed OpenMP (exit 139, nothing printed); -r 1e11 ran for ever."""
    code, line = cli_within(60, capsys, *args)
    assert code == 2 and line.startswith(f"error: {words}"), line


def test_the_library_bounds_threads_and_repetitions_too():
    import os

    import moerun
    from moerun.bench import run_bench
    from moerun.errors import MoerunError

    too_many = 4 * (os.cpu_count() or 1) + 1
    with pytest.raises(MoerunError, match=rf"^threads must be 1 to {too_many - 1} \(4 per core"):
        moerun.load("demo", threads=too_many)
    with pytest.raises(MoerunError, match=r"^repetitions must be 1 to 1000, got 100000000000$"):
        run_bench(model="demo", repetitions=100_000_000_000)


# --- a disk that fills while the quantized cache is written --------------------------------


def test_a_disk_that_fills_mid_write_is_one_line_and_leaves_nothing_trusted(
    capsys, tmp_path, monkeypatch, free_disk_bytes
):
    """A real full disk: a 256 KiB tmpfs under MOERUN_CACHE, with the free-space check before
    the build told there is room (`free_disk_bytes`), so the real write meets ENOSPC
    after the first layer file (safetensors reported it as `SafetensorError ... os error 28`)."""
    import subprocess

    disk = tmp_path / "small-disk"
    disk.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mount.stderr.strip()}")
    try:
        cache = disk / "cache"
        monkeypatch.setenv("MOERUN_CACHE", str(cache))
        free_disk_bytes(1 << 30)
        code, line = cli_within(120, capsys, "generate", "demo", "hi", "--bits", "4", "--device", "cpu", "-n", "1")
        assert code == 1 and "the disk filled while writing the quantized expert cache" in line, line
        assert str(cache) in line and "MOERUN_CACHE" in line, line
        left = [p for p in disk.rglob("*") if not p.is_dir()]
        assert all(p.name.endswith(".lock") and p.stat().st_size == 0 for p in left), left  # no layer, no temp
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# --- text that is not what it should be: prompts, tokenizer files, templates ---------------


def test_a_prompt_that_is_not_utf8_is_one_line(capsys, model, tmp_path, monkeypatch):
    """Undecodable bytes from -f, stdin or argv (which Python hands over as lone surrogates)
    reached the tokenizer: `TypeError: TextInputSequence must be str`, or for -f an
    `AttributeError ... 'strerror'`."""
    import io

    bad = tmp_path / "prompt.txt"
    bad.write_bytes(b"hi \xff\xfe there")
    assert cli_within(60, capsys, "generate", "demo", "-f", str(bad), "-n", "1") == (
        1,
        f"error: the prompt file {bad} is not UTF-8 text (byte 0xff at offset 3)",
    )
    assert cli_within(60, capsys, "generate", "demo", "hi \udcff", "-n", "1") == (
        1,
        "error: the PROMPT argument is not UTF-8 text (byte 0xff at character 3)",
    )
    for errors in ("surrogateescape", "strict"):  # as Python decodes stdin under a C locale, and otherwise
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"hi \xff"), encoding="utf-8", errors=errors))
        code, line = cli_within(60, capsys, "generate", "demo", "-", "-n", "1")
        assert line.startswith("error: the prompt from stdin is not UTF-8 text (byte 0xff at "), line


def test_non_utf8_argv_through_the_real_process(tmp_path):
    from tests.test_cli import run_cli

    proc = run_cli("generate", "demo", b"hi \xff", "-n", "1")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines() == ["error: the PROMPT argument is not UTF-8 text (byte 0xff at character 3)"]


def test_chat_goes_on_after_a_message_that_is_not_utf8():
    """The real `moerun chat`, stdin piped: the bad message is one line, the next is answered."""
    import os
    import subprocess
    import sys

    from tests.test_cli import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "MOERUN_DEBUG": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "moerun", "chat", "demo", "-n", "2"],
        input=b"hi \xff\nhello\n",
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=300,
    )
    err = proc.stderr.decode()
    assert proc.returncode == 1, err  # a turn failed: a script must see it
    assert err.splitlines() == ["moerun: the message is not UTF-8 text (byte 0xff at character 3)"]
    assert proc.stdout.strip(), "the next message was not answered"


def test_fit_with_a_zero_vram_budget_plans_a_card_with_no_room(capsys):
    """--vram 0 is a budget of nothing (it was read as no budget: `AttributeError`)."""
    import sys

    from moerun.cli import main

    argv, sys.argv = sys.argv, ["moerun", "fit", "demo", "--vram", "0", "--json"]
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    assert code in (0, None), err
    report = json.loads(out)
    assert report["vram_budget"] == 0 and report["device"] == "cuda" and report["verdict"] == "no"


@pytest.mark.parametrize("value", [{"content": 5}, 5, ["<s>"]], ids=["content-5", "number", "list"])
def test_a_special_token_that_is_not_text_is_one_line(capsys, model, value):
    patch_json(model / "tokenizer_config.json", bos_token=value)
    code, line = cli_within(60, capsys, "generate", str(model), "hi", "-n", "1")
    path = model / "tokenizer_config.json"
    assert line.startswith(f"error: {path}: bos_token is {json.dumps(value)}, expected a token"), line


def test_a_binary_chat_template_is_named(capsys, model):
    template = model / "chat_template.jinja"
    template.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xd8")
    code, line = cli_within(60, capsys, "generate", str(model), "hi", "-n", "1")
    assert line == f"error: {template} is not UTF-8 text (byte 0x89 at offset 0): a chat template is a Jinja text file"


def test_no_chat_template_is_one_moerun_line(model):
    """The fallback's warning was a two-line Python UserWarning (file:line, then the text)."""
    from tests.test_cli import run_cli

    config = json.loads((model / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    proc = run_cli("generate", str(model), "hi", "-n", "1")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert "moerun: this model has no chat template; using a plain 'role: content' format" in lines, lines
    assert not any("Warning" in line or "warn(" in line for line in lines), lines


# --- the checkpoint's index and dtypes -----------------------------------------------------


def _indexed(model: Path, weight_map_for) -> Path:
    """The demo as a sharded checkpoint: its one file renamed to a shard, with an index whose
    weight_map is weight_map_for(name) for each tensor."""
    from safetensors import safe_open

    shard = model / "model-00001-of-00001.safetensors"
    (model / "model.safetensors").rename(shard)
    with safe_open(str(shard), "pt") as f:
        names = list(f.keys())
    index = model / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {n: weight_map_for(n) for n in names}}))
    return index


def test_a_weight_map_value_that_is_not_a_file_name_is_one_line(capsys, model):
    index = _indexed(model, lambda n: 5 if n == "model.norm.weight" else "model-00001-of-00001.safetensors")
    code, line = cli_within(60, capsys, "generate", str(model), "hi", "-n", "1")
    words = "weight_map gives model.norm.weight the file 5, expected a file name; re-download it"
    assert line == f"error: {index}: {words}"


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_a_weight_map_naming_a_file_outside_the_folder_is_refused(capsys, model, tmp_path, where):
    """A real, valid checkpoint lies outside the model folder: before, it was opened and loaded."""
    outside = tmp_path / "elsewhere" / "x.safetensors"
    outside.parent.mkdir()
    shutil.copy(model / "model.safetensors", outside)
    name = "../elsewhere/x.safetensors" if where == "parent" else str(outside)
    index = _indexed(model, lambda n: name)
    first = next(iter(json.loads(index.read_text())["weight_map"]))
    code, line = cli_within(60, capsys, "generate", str(model), "hi", "-n", "1")
    assert line == f"error: {index}: weight_map names {name!r} for {first}, a path outside the model folder; refused"


def test_a_snapshot_whose_files_link_into_blobs_still_loads(tmp_path):
    """A Hub snapshot's weight files are symlinks to ../../blobs: the entry's own name is
    judged, not where the link leads."""
    from moerun.weights import CheckpointWeights

    storage = tmp_path / "models--o--n"
    snapshot = storage / "snapshots" / ("a" * 40)
    (storage / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    shutil.copy(DEMO_DIR / "model.safetensors", storage / "blobs" / "b1")
    (snapshot / "model-00001-of-00001.safetensors").symlink_to("../../blobs/b1")
    names = list(CheckpointWeights.open(DEMO_DIR).keys())
    (snapshot / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: "model-00001-of-00001.safetensors" for n in names}})
    )
    with CheckpointWeights.open(snapshot) as ckpt:
        assert ckpt.keys() == sorted(names)


def test_a_float_weight_stored_as_an_integer_type_is_refused(capsys, model):
    """A norm stored as I16 was cast to float silently: a garbage reply, exit 0."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(model / "model.safetensors"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"].round().to(torch.int16)
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    code, line = cli_within(60, capsys, "generate", str(model), "hi", "-n", "1")
    assert line.startswith(
        "error: tensor model.norm.weight is stored as int16, an integer type where a floating-point weight belongs"
    ), line
