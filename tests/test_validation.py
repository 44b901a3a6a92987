"""Bad checkpoints, configs, tokenizers, templates and arguments through the real CLI: each
gives exit code 1 (2 for a usage error), exactly one `error: ...` line on stderr naming what
is wrong, and no traceback.

The checkpoints are copies of the embedded demo model (3.7 MB, no transformers needed),
each damaged in one way. Most cases run `moerun.cli.main()` in this process (sys.argv set,
stderr captured, SystemExit's code read): the same entry point as the console script,
without ~3 s of imports per case. Two real subprocesses prove the process boundary.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from moerun.registry import DEMO_DIR
from tests.parity import run_main
from tests.test_cli import run_cli


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MOERUN_DEBUG", raising=False)


def cli(capsys, *args: str) -> tuple[int, str]:
    """Run `moerun ARGS` in-process; (exit code, the one error line) after checking the
    contract: one non-empty stderr line starting with `error: `, no traceback."""
    capsys.readouterr()
    code = run_main(*args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return code, lines[0]


@pytest.fixture
def model(tmp_path) -> Path:
    return Path(shutil.copytree(DEMO_DIR, tmp_path / "model"))


def patch_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# --- config.json ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, words",
    [
        ({"hidden_size": "128"}, 'hidden_size is "128", expected a whole number'),
        ({"hidden_size": None}, "hidden_size is null, and mixtral needs a value"),
        ({"num_hidden_layers": 0}, "num_hidden_layers is 0, must be at least 1"),
        ({"num_hidden_layers": -1}, "num_hidden_layers is -1, must be at least 1"),
        ({"num_experts_per_tok": 5}, "num_experts_per_tok is 5, must be 1 to num_local_experts (4)"),
        ({"num_experts_per_tok": 0}, "num_experts_per_tok is 0, must be 1 to num_local_experts (4)"),
        ({"num_local_experts": 0}, "num_local_experts is 0, must be at least 1"),
        ({"rms_norm_eps": [1e-5]}, "rms_norm_eps is list, expected a number"),
        ({"hidden_act": "gelu_new"}, 'hidden_act "gelu_new" is not supported (moerun implements silu)'),
    ],
    ids=["size-text", "size-null", "layers-0", "layers-neg", "topk-over", "topk-0", "experts-0", "eps-list", "act"],
)
def test_bad_config_value_is_named_with_its_file(capsys, model, change, words):
    patch_json(model / "config.json", **change)
    code, line = cli(capsys, "generate", str(model), "hi", "-n", "1")
    assert code == 1
    assert line == f"error: {model / 'config.json'}: {words}"


def test_fit_names_the_bad_value_too(capsys, model):
    patch_json(model / "config.json", num_attention_heads=0)
    assert cli(capsys, "fit", str(model)) == (
        1,
        f"error: {model / 'config.json'}: num_attention_heads is 0, must be at least 1",
    )


def test_expert_count_under_each_familys_name():
    """The check is declared per family, under the family's own key; a dense config (no
    expert count, or 0 where the family allows it) is not refused."""
    from moerun.errors import MoerunError
    from moerun.models import build_args

    base = {
        "vocab_size": 8,
        "hidden_size": 8,
        "intermediate_size": 8,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "moe_intermediate_size": 4,
    }
    for model_type, count, topk in [
        ("qwen3_moe", "num_experts", "num_experts_per_tok"),
        ("olmoe", "num_experts", "num_experts_per_tok"),
        ("deepseek_v2", "n_routed_experts", "num_experts_per_tok"),
        ("ernie4_5_moe", "moe_num_experts", "moe_k"),
    ]:
        config = {**base, "model_type": model_type, count: 4, topk: 5}
        with pytest.raises(MoerunError, match=rf"^config.json: {topk} is 5, must be 1 to {count} \(4\)$"):
            build_args(config)
        build_args({**config, topk: 4})
    build_args({**base, "model_type": "deepseek_v2", "n_routed_experts": None, "num_experts_per_tok": None})
    build_args({**base, "model_type": "granitemoehybrid", "num_local_experts": 0, "num_experts_per_tok": 0})


# --- the checkpoint against the config --------------------------------------------------


def test_fewer_layers_in_config_than_checkpoint(capsys, model):
    patch_json(model / "config.json", num_hidden_layers=3)
    code, line = cli(capsys, "generate", str(model), "hi", "-n", "1")
    assert code == 1
    assert "has layer 3 (model.layers.3." in line and "num_hidden_layers 3" in line


def test_multi_token_prediction_layers_still_load(capsys, model):
    # The same checkpoint, its last layer declared as an MTP layer (as DeepSeek-V3 and GLM do).
    patch_json(model / "config.json", num_hidden_layers=3, num_nextn_predict_layers=1)
    capsys.readouterr()
    assert run_main("generate", str(model), "hi", "-n", "1", "--json") == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 1


def _rewrite_safetensors(path: Path, edit) -> None:
    """Rebuild `path` from edit(header, data) -> (header, data)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = edit(json.loads(raw[8 : 8 + n]), raw[8 + n :])
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _gap(header, data):
    names = _by_offset(header)
    cut = header[names[0]]["data_offsets"][1]
    for k in names[1:]:  # 8 bytes of padding after the first tensor; the file size still adds up
        header[k]["data_offsets"] = [o + 8 for o in header[k]["data_offsets"]]
    return header, data[:cut] + b"\0" * 8 + data[cut:]


def _overlap(header, data):
    last = _by_offset(header)[-1]  # moved 8 bytes back into the tensor before it
    header[last]["data_offsets"] = [o - 8 for o in header[last]["data_offsets"]]
    return header, data[:-8]


@pytest.mark.parametrize(
    "edit, words",
    [(_gap, "leaves a gap of 8 bytes before it"), (_overlap, "overlaps the tensor before it")],
    ids=["gap", "overlap"],
)
def test_safetensors_offsets_with_holes_or_overlaps(capsys, model, edit, words):
    path = model / "model.safetensors"
    _rewrite_safetensors(path, edit)
    code, line = cli(capsys, "generate", str(model), "hi", "-n", "1")
    assert code == 1
    assert line.startswith("error: model.safetensors is not a valid safetensors file (tensor ") and words in line


# --- tokenizer and chat template --------------------------------------------------------


def test_tokenizer_larger_than_the_model(capsys, model):
    tok = json.loads((model / "tokenizer.json").read_text())
    tok["added_tokens"].append(
        {
            "id": 384,
            "content": "<|extra|>",
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
    )
    (model / "tokenizer.json").write_text(json.dumps(tok))
    code, line = cli(capsys, "generate", str(model), "hi", "-n", "1")
    assert code == 1
    assert "token '<|extra|>' at id 384" in line and "vocab_size (config.json) is 384" in line


def test_tokenizer_within_the_vocab_loads():
    # Only ids at or past vocab_size matter: a tokenizer smaller than the embedding is usual.
    from moerun.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(DEMO_DIR)
    assert tok.tokens_from(384) == []
    assert [i for _, i in tok.tokens_from(382)] == [382, 383]


BOOM_TEMPLATE = (
    "{% for m in messages %}{% if m.content == 'boom' %}{{ 1 // 0 }}{% endif %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_template_that_raises(capsys, model):
    patch_json(model / "tokenizer_config.json", chat_template=BOOM_TEMPLATE)
    code, line = cli(capsys, "generate", str(model), "boom", "-n", "1")
    assert (code, line) == (1, "error: chat template failed: integer division or modulo by zero")


def test_chat_session_survives_a_template_error(model):
    """The real `moerun chat`, stdin piped: the failing turn gives one line, the next works."""
    patch_json(model / "tokenizer_config.json", chat_template=BOOM_TEMPLATE)
    proc = run_cli("chat", str(model), "-n", "4", "--dtype", "float32", input="boom\ncount from 7\n/exit\n")
    # Piped stdin: replies alone on stdout, the failed turn one line on stderr, exit 1
    # (a script must see that a turn failed), and the session went on to the next turn.
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == ["moerun: chat template failed: integer division or modulo by zero"]
    assert "7 8 9" in proc.stdout  # the next turn replied


# --- command-line arguments -------------------------------------------------------------


@pytest.mark.parametrize(
    "args, words",
    [
        (["bench", "demo", "-p", "-5"], "Invalid value for '-p': '-5': counts cannot be negative"),
        (["bench", "demo", "-n", "4,-1"], "Invalid value for '-n': '4,-1': counts cannot be negative"),
        (["bench", "demo", "--bits", "4,x"], "Invalid value for '--bits': '4,x' is not a whole number"),
        (["bench", "demo", "--cold", "gpu,warm"], "Invalid value: warm is not one of gpu, cpu, auto"),
        (["generate", "demo", "hi", "--seed", "-1"], "Invalid value for '--seed'"),
        (["generate", "demo", "hi", "--seed", str(1 << 63)], "Invalid value for '--seed'"),
        (["generate", "demo", "hi", "-n", "-5"], "Invalid value for '--max-new-tokens' / '-n'"),
        (["generate", "demo", "hi", "-t", "-1"], "Invalid value for '--temperature' / '-t'"),
        (["generate", "demo", "hi", "--top-p", "0"], "Invalid value for '--top-p': 0.0 is not in (0, 1]"),
        (["chat", "demo", "--top-p", "1.5"], "Invalid value for '--top-p': 1.5 is not in (0, 1]"),
        (["chat", "demo", "-n", "0"], "Invalid value for '--max-new-tokens' / '-n'"),
        (["serve", "demo", "-t", "-1"], "Invalid value for '--temperature' / '-t'"),
        (["generate", "demo", "hi", "--cold", "warm"], "Invalid value for '--cold': warm is not one of gpu, cpu, auto"),
        (["generate", "demo", "hi", "--top-k", "-1"], "Invalid value for '--top-k'"),
    ],
)
def test_bad_arguments_are_one_line_usage_errors(capsys, args, words):
    code, line = cli(capsys, *args)
    assert code == 2
    assert line.startswith(f"error: {words}"), line


@pytest.mark.parametrize(
    "args, words",
    [
        (["-p", "100000", "-n", "0"], "pp100000 needs 100000 positions"),
        (["-p", "0", "-n", "256"], "tg256 needs 257 positions"),
    ],
)
def test_bench_longer_than_the_models_context(capsys, args, words):
    code, line = cli(capsys, "bench", "demo", "-r", "1", *args)
    assert code == 1
    assert line == f"error: {words}; demo's context is 256 tokens"


def test_library_refuses_what_the_cli_refuses():
    from moerun.errors import MoerunError
    from moerun.generate import SamplingParams

    with pytest.raises(MoerunError, match="seed must be"):
        SamplingParams(seed=1 << 64)
    import moerun

    demo = moerun.load("demo", device="cpu", dtype="float32")
    with pytest.raises(MoerunError, match=r"^token id 384 is not in the model's vocabulary \(0 to 383\)$"):
        demo.generate([5, 384], max_new_tokens=1)


def test_usage_error_through_the_real_process():
    proc = run_cli("bench", "demo", "--bits", "4,x")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: Invalid value for '--bits': '4,x' is not a whole number or a comma list of them, e.g. 512 or 128,256"
    ]
