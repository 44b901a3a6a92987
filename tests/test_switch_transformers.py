"""The Switch Transformer (switch_transformers): a T5 encoder-decoder with top-1 sparse MLPs,
held against transformers 5.25's SwitchTransformersForConditionalGeneration on tiny random
checkpoints it saves (sharded, bf16), with a T5-style Unigram tokenizer whose sentinel
tokens (<extra_id_N>) are special added tokens, as in the real ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moerun
from moerun import plan
from moerun.errors import MoerunError
from moerun.models import build_meta_model
from moerun.moe.offload import routed_expert_modules
from moerun.weights import CheckpointWeights
from tests.model_fixtures import randomize_matrices, save_checkpoint
from tests.parity import caches_full_of_garbage, rel_err, static_steps

ROOT = Path(__file__).resolve().parents[1]
N_SENTINELS = 10
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "a", "cat", "sat", "on", "mat"]

# Small but not degenerate: 3 encoder blocks (sparse every 2nd: block 1), 3 decoder blocks
# (all sparse), 4 experts with a capacity of 3, so that a 17-token sequence drops tokens;
# 8 buckets up to distance 20, so that 17 positions reach the logarithmic buckets.
BLOCKS = dict(d_model=32, d_ff=48, d_kv=8, num_heads=4, num_layers=3, num_decoder_layers=3)
EXPERTS = dict(num_experts=4, expert_capacity=3, encoder_sparse_step=2, decoder_sparse_step=1)
BUCKETS = dict(relative_attention_num_buckets=8, relative_attention_max_distance=20)
CONFIG = dict(BLOCKS, **EXPERTS, **BUCKETS, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def write_t5_tokenizer(folder: Path) -> int:
    """A T5-style tokenizer (Unigram over Metaspace, `$A </s>`; <pad> 0, </s> 1, <unk> 2,
    sentinels <extra_id_9> .. <extra_id_0> last) -> its vocabulary size."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -1.0) for w in WORDS] + [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz,.!?'"]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<pad>", "</s>", "<unk>")])
    sentinels = [f"<extra_id_{i}>" for i in reversed(range(N_SENTINELS))]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in sentinels])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "T5Tokenizer",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "extra_ids": N_SENTINELS,
        "additional_special_tokens": sentinels[::-1],
        "model_max_length": 512,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.get_vocab_size(with_added_tokens=True)


def make_switch(folder: Path, seed: int = 0, shards: int = 3, **overrides) -> Path:
    import transformers

    vocab = write_t5_tokenizer(folder)
    config = transformers.SwitchTransformersConfig(vocab_size=vocab, **{**CONFIG, **overrides})
    torch.manual_seed(seed)
    model = transformers.SwitchTransformersForConditionalGeneration(config).to(torch.bfloat16)
    randomize_matrices(model, 0.3)
    return save_checkpoint(model, folder, shards)


def reference(folder: Path):
    import transformers

    cls = transformers.SwitchTransformersForConditionalGeneration
    return cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_switch(tmp_path_factory.mktemp("switch"))


@pytest.fixture(scope="module")
def pair(checkpoint):
    return moerun.load(str(checkpoint), device="cpu", dtype=torch.float32), reference(checkpoint)


def _ids(shape, seed: int, vocab: int = 50) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_logits_match_transformers(pair):
    ours, ref = pair
    enc, dec = _ids((2, 17), 0), _ids((2, 9), 1)
    with torch.no_grad():
        expected = ref(input_ids=enc, decoder_input_ids=dec).logits.float()
    got = ours.logits(enc, decoder_input_ids=dec)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert rel_err(got, expected) < 1e-4


def test_expert_capacity_drops_tokens_as_transformers_does(pair):
    """17 tokens over 4 experts of capacity 3 must drop some; with the capacity raised
    (nothing dropped) the logits change, so the parity above holds the dropping too."""
    ours, ref = pair
    enc, dec = _ids((1, 17), 0), _ids((1, 9), 1)
    routers = [m for m in ours.lm.modules() if type(m).__name__ == "Top1Router"]
    _, weights = routers[0].route(torch.randn(1, 17, 32))
    assert (weights == 0).any()
    before = ours.logits(enc, decoder_input_ids=dec)
    try:
        for r in routers:
            r.expert_capacity = 1000
        assert rel_err(ours.logits(enc, decoder_input_ids=dec), before) > 1e-3
    finally:
        for r in routers:
            r.expert_capacity = 3


def test_decode_steps_equal_a_full_decoder_forward(pair):
    """Encoder once, decoder prefill of 4 then 8 one-token steps against the static cache:
    the logits of one decoder forward of all 12 (a decoder of 1-token calls never drops)."""
    ours, _ = pair
    lm = ours.lm
    for r in (m for m in lm.modules() if type(m).__name__ == "Top1Router"):
        r.expert_capacity = 1000  # a full forward would drop tokens that single steps do not
    try:
        enc, dec = _ids((1, 10), 3), _ids((1, 12), 4)
        full = ours.logits(enc, decoder_input_ids=dec)
        with torch.no_grad():
            caches = lm.make_caches(1, 16)
            lm.encode(enc, caches)
            steps = [lm(dec[:, :4], caches, 0)] + [lm(dec[:, t : t + 1], caches, t) for t in range(4, 12)]
        assert rel_err(torch.cat(steps, dim=1), full) < 1e-5
    finally:
        for r in (m for m in lm.modules() if type(m).__name__ == "Top1Router"):
            r.expert_capacity = 3


def test_static_decode_step_equals_eager_decode(pair):
    """The CUDA-graph decode step (position on the device, self-attention over a fixed span,
    cross-attention over the whole encoder buffer masked by the prompt's length), run
    eagerly as if being captured: equal to eager decode, with garbage in the unused
    buffers, across a span bucket change, without a host sync outside the expert layers;
    and a second prompt of another length through the same states."""
    lm = pair[0].lm
    with torch.no_grad():
        for enc in (_ids((1, 10), 7), _ids((1, 5), 8)):
            dec = _ids((1, 20), 9)
            caches = lm.make_caches(1, 24)
            lm.encode(enc, caches)
            lm(dec[:, :8], caches, 0)
            expected = torch.cat([lm(dec[:, t : t + 1], caches, t) for t in range(8, 20)], dim=1)
            caches = caches_full_of_garbage(lm, 24)
            lm.encode(enc, caches)
            lm(dec[:, :8], caches, 0)
            got, cuts = static_steps(lm, caches, dec, 8, as_if_capturing=True)
            assert rel_err(got, expected) < 1e-5
            assert cuts and all(type(c).__name__ in ("RoutedExperts", "CachedExperts") for c in cuts)


def test_greedy_tokens_match_transformers_generate(pair):
    ours, ref = pair
    prompt = ours.tokenizer.encode("the quick brown <extra_id_0> over the lazy dog")
    out = ours.generate(prompt, max_new_tokens=16, ignore_eos=True)
    with torch.no_grad():
        hf = ref.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, 1:].tolist()
    assert len(out.token_ids) == 16
    assert out.token_ids[: len(hf)] == hf and len(hf) >= 4


def test_sentinel_tokens_round_trip_and_show_in_the_output(pair):
    ours, _ = pair
    tok = ours.tokenizer
    ids = tok.encode("the <extra_id_0> fox <extra_id_1>")
    assert ids[-1] == 1  # </s>, as T5's post-processor adds it
    assert tok._tok.token_to_id("<extra_id_0>") in ids and tok._tok.token_to_id("<extra_id_1>") in ids
    # A reply made of sentinels and words is shown with its sentinels.
    sentinel = tok._tok.token_to_id("<extra_id_0>")
    out = ours.generate([sentinel, *tok.encode("fox")], max_new_tokens=8, ignore_eos=True)
    assert out.text == tok.decode(out.token_ids, skip_special_tokens=False)
    assert (
        tok.decode([sentinel] + tok.encode("fox", add_special_tokens=False), skip_special_tokens=False)
        == "<extra_id_0> fox"
    )


def _cli(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "moerun", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_moerun_generate_json_gives_transformers_greedy_tokens(checkpoint, pair):
    """No --raw: a span-corruption model takes its prompt raw anyway."""
    _, ref = pair
    text = "the quick <extra_id_0> jumps over <extra_id_1> dog"
    proc = _cli("generate", str(checkpoint), text, "--json", "-n", "12", "--device", "cpu", "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    prompt = moerun.tokenizer.Tokenizer.from_dir(checkpoint).encode(text)
    assert out["stats"]["prompt_tokens"] == len(prompt)
    with torch.no_grad():
        hf = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, 1:].tolist()
    if hf[-1] == 1:  # transformers stopped at </s>, as moerun does
        assert out["token_ids"] == hf and out["stats"]["finish_reason"] == "stop"
    else:
        assert out["token_ids"] == hf


def test_moerun_chat_refuses_in_one_line(checkpoint):
    proc = _cli("chat", str(checkpoint), "--device", "cpu")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not a chat model" in lines[0], proc.stderr


def test_the_server_completes_raw_prompts_and_refuses_chat(pair):
    """Over the API as in the CLI: /v1/completions gives generate's tokens, sentinels shown;
    /v1/chat/completions is a 400 for a model that does not chat."""
    from starlette.testclient import TestClient

    from moerun.serve import build_app

    ours, _ = pair
    text = "the quick <extra_id_0> jumps over <extra_id_1> dog"
    expected = ours.generate(text, chat=False, max_new_tokens=8, ignore_eos=True)
    with TestClient(build_app(ours, name="switch")) as http:
        out = http.post("/v1/completions", json={"model": "switch", "prompt": text, "max_tokens": 8, "temperature": 0})
        assert out.status_code == 200, out.text
        served = out.json()["choices"][0]["text"]
        assert served and expected.text.startswith(served)  # the same tokens, up to an end-of-text stop
        assert out.json()["usage"]["prompt_tokens"] == len(ours.tokenizer.encode(text))
        refused = http.post(
            "/v1/chat/completions", json={"model": "switch", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert refused.status_code == 400 and "does not chat" in refused.json()["error"]["message"]


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_one_slot_equals_quantized_resident(checkpoint, bits):
    enc, dec = _ids((2, 11), 5), _ids((2, 6), 6)
    resident = moerun.load(str(checkpoint), bits=bits, device="cpu", dtype="float32")
    offloaded = moerun.load(str(checkpoint), bits=bits, device="cpu", dtype="float32", expert_slots=1)
    expected = resident.logits(enc, decoder_input_ids=dec)
    assert rel_err(offloaded.logits(enc, decoder_input_ids=dec), expected) < 1e-6
    assert offloaded.stats["total"]["misses"] > 0
    # Against the 16-bit experts: each quantized expert layer within its format's noise
    # (NF4 ~13% on these tiny random ReLU experts, int8 ~1%), and at 8 bits the logits too.
    full = moerun.load(str(checkpoint), device="cpu", dtype="float32")
    x, ids, w = torch.randn(20, 32), torch.randint(0, 4, (20, 1)), torch.ones(20, 1)
    pairs = list(zip(routed_expert_modules(full.lm), routed_expert_modules(resident.lm)))
    assert [i for (i, _, _), _ in pairs] == [1, 3, 4, 5]
    for (_, _, exact), (_, _, quantized) in pairs:
        assert rel_err(quantized(x, ids, w), exact(x, ids, w)) < (0.2 if bits == 4 else 0.02)
    if bits == 8:
        assert rel_err(expected, full.logits(enc, decoder_input_ids=dec)) < 0.05


def test_checkpoint_tensors_are_the_saved_checkpoint_and_sanitize_to_the_model(checkpoint):
    lm, arch = build_meta_model(json.loads((checkpoint / "config.json").read_text()))
    layout = arch.checkpoint_tensors(lm.args)
    with CheckpointWeights.open(checkpoint) as ckpt:
        saved = {n: tuple(shape) for n, (shape, _) in ckpt.headers().items()}
    assert {n: shape for n, (shape, _, _) in layout.items()} == saved
    sanitized = arch.sanitize({n: torch.empty(shape, device="meta") for n, (shape, _, _) in layout.items()}, lm.args)
    assert {n: tuple(t.shape) for n, t in sanitized.items()} == {n: tuple(p.shape) for n, p in lm.named_parameters()}


def test_the_plan_counts_encoder_and_decoder(checkpoint):
    model = moerun.load(str(checkpoint), device="cpu", dtype=torch.float32, ctx=48)
    assert model.plan.total_params == model.num_parameters
    assert model.plan.n_moe_layers == 4 and model.plan.experts_per_token == 1
    summary = plan.summarize(json.loads((checkpoint / "config.json").read_text()))
    assert summary.moe_layers == [1, 3, 4, 5]  # encoder block 1, decoder blocks 0-2
    routed = summary.params_by_role["routed_experts"]
    assert summary.active_params == summary.total_params - routed + routed // 4
    states = [c for c in model.kv_caches if c is not None]
    assert len(states) == 3 and all(s.max_len == 48 for s in states)
    assert sum(s.nbytes for s in states) == model.plan.kv_cache_bytes


def test_an_unsupported_activation_is_refused(tmp_path):
    folder = make_switch(tmp_path / "gelu", shards=1)
    config = json.loads((folder / "config.json").read_text())
    config["dense_act_fn"] = "gelu_new"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoerunError, match="activation 'gelu_new' is not supported"):
        moerun.load(str(folder), device="cpu")


def test_untied_stack_embeddings_are_read_as_transformers_saves_them(tmp_path):
    """tie_word_embeddings false: transformers 5.25 saves `encoder.embed_tokens`,
    `decoder.embed_tokens`, `shared` and `lm_head` apart, and each stack embeds with its
    own table; reading `shared` for both gives other tokens from the first one."""
    folder = make_switch(tmp_path / "untied", shards=2, tie_word_embeddings=False)
    with CheckpointWeights.open(folder) as ckpt:
        names = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
        tables = {n: ckpt.get(n) for n in names}
        saved = {n: tuple(shape) for n, (shape, _) in ckpt.headers().items()}
    assert not torch.equal(tables["shared.weight"], tables["encoder.embed_tokens.weight"])
    assert not torch.equal(tables["encoder.embed_tokens.weight"], tables["decoder.embed_tokens.weight"])
    lm, arch = build_meta_model(json.loads((folder / "config.json").read_text()))
    assert {n: shape for n, (shape, _, _) in arch.checkpoint_tensors(lm.args).items()} == saved
    ours, ref = moerun.load(str(folder), device="cpu", dtype=torch.float32), reference(folder)
    enc, dec = _ids((2, 17), 0), _ids((2, 9), 1)
    with torch.no_grad():
        expected = ref(input_ids=enc, decoder_input_ids=dec).logits.float()
    assert rel_err(ours.logits(enc, decoder_input_ids=dec), expected) < 1e-4
    prompt = ours.tokenizer.encode("the quick brown <extra_id_0> over the lazy dog")
    with torch.no_grad():
        hf = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, 1:].tolist()
    assert ours.generate(prompt, max_new_tokens=12, ignore_eos=True).token_ids[: len(hf)] == hf and len(hf) >= 4
