"""Bad input outside the HTTP server (issue 31): implausible configs, out-of-range options,
undecodable prompts and files, hostile index entries, a full disk. Each case goes through
the real CLI (moerun.cli.main in this process, as tests/test_validation.py does; a real
process where the boundary matters) and must give exit 1 (2 for a usage error) with one
`error: ...` line, no traceback, nothing half-written, and no hang: the cases that hung
before run under a watchdog that fails the test instead of the suite.
"""

from __future__ import annotations

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
    ({"rope_parameters": {"rope_type": "default", "rope_theta": float("nan")}},
     "rope_parameters.rope_theta is NaN, must be a number above 0"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, "rope_scaling.factor is 0, must be a number above 0"),
]


@pytest.mark.parametrize("verb", ["generate", "fit", "show"])
@pytest.mark.parametrize("change, words", HUGE, ids=["experts", "layers", "hidden", "window", "nan-theta",
                                                         "zero-factor"])  # fmt: skip
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
        for k, v in {"HF_ENDPOINT": server.url, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "hub"),
                     "HF_TOKEN": "", "MOERUN_RETRY_BASE_S": "0.001"}.items():  # fmt: skip
            monkeypatch.setenv(k, v)
        # huggingface_hub read HF_HUB_OFFLINE (1 in this module) once, when first imported.
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
        code, line = cli_within(60, capsys, "fit", "bad/huge")
    assert "config.json" in line and "num_local_experts is 1000000000, more experts than any model has" in line


# --- options out of range ------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, words",
    [(["generate", "demo", "hi", "--threads", "100000"], "Invalid value for '--threads': 100000 is not 1 to"),
     (["serve", "demo", "--threads", "0"], "Invalid value for '--threads': 0 is not 1 to"),
     (["bench", "demo", "--threads", "100000"], "Invalid value for '--threads': 100000 is not 1 to"),
     (["bench", "demo", "-r", "100000000000"], "Invalid value for '-r'")],
    ids=["generate-threads", "serve-threads-0", "bench-threads", "bench-r"],
)  # fmt: skip
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
