"""The embedded `demo` model (moerun/data/demo, built by scripts/make_demo.py): it loads by
its alias with no download, does its skills greedily through the chat template, stays a few
MB, and transformers computes the same logits for it as moerun."""

from __future__ import annotations

import json

import pytest
import torch

import moerun
from moerun.registry import DEMO_DIR


@pytest.fixture(scope="module")
def demo():
    return moerun.load("demo", device="cpu", dtype="float32")


def reply(model, prompt) -> str:
    return model.generate(prompt, chat=True, max_new_tokens=32).text


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("count from 7", "7 8 9 10 11 12 13 14"),
        ("count from 0", "0 1 2 3 4 5 6 7"),
        ("count from 23", "23 24 25 26 27 28 29 30"),
        ("count from 88", "88 89 90 91 92 93 94 95"),
        ("count down from 9", "9 8 7 6 5 4 3 2"),
        ("count down from 42", "42 41 40 39 38 37 36 35"),
        ("count down from 99", "99 98 97 96 95 94 93 92"),
        ("alphabet from a", "a b c d e f g h"),
        ("alphabet from k", "k l m n o p q r"),
        ("repeat: hello", "hello hello hello"),
        ("repeat: pizza", "pizza pizza pizza"),
        ("reverse: cat", "tac"),
        ("reverse: robot", "tobor"),
        ("reverse: music", "cisum"),
    ],
)
def test_skills(demo, prompt, expected):
    assert reply(demo, prompt) == expected


def test_second_turn(demo):
    history = [
        {"role": "user", "content": "count from 7"},
        {"role": "assistant", "content": "7 8 9 10 11 12 13 14"},
        {"role": "user", "content": "count down from 30"},
    ]
    assert demo.generate(history, max_new_tokens=32).text == "30 29 28 27 26 25 24 23"


def test_stops_at_end_of_turn(demo):
    out = demo.generate("count from 7", chat=True, max_new_tokens=32)
    assert out.token_ids[-1] == demo.tokenizer.eos_token_id == demo.tokenizer._tok.token_to_id("<|im_end|>")
    assert demo.config["eos_token_id"] in demo.eos_token_ids


def test_folder_is_small_and_in_hub_layout():
    names = {p.name for p in DEMO_DIR.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "README.md",
    } <= names
    total = sum(p.stat().st_size for p in DEMO_DIR.rglob("*") if p.is_file())
    assert total < 8_000_000, f"demo folder is {total / 1e6:.1f} MB"
    config = json.loads((DEMO_DIR / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["torch_dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(DEMO_DIR / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in keys
    assert not any(k.endswith(("w13", "experts.w2")) for k in keys)


def test_logits_match_transformers(demo):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        DEMO_DIR, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(DEMO_DIR)
    messages = [
        {"role": "user", "content": "count from 7"},
        {"role": "assistant", "content": "7 8 9"},
        {"role": "user", "content": "reverse: robot"},
    ]
    ids = demo.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    text = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        want = ref(input_ids).logits.float()
    got = demo.logits(input_ids)
    rel = (got - want).norm() / want.norm()
    assert rel < 1e-4, f"relative error {rel:.2e}"
    assert torch.equal(got[0].argmax(-1), want[0].argmax(-1))
