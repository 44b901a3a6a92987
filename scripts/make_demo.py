"""Build the embedded `demo` model: a tiny Mixtral-style MoE trained on a synthetic chat corpus.

    python scripts/make_demo.py                 # writes moerun/data/demo
    python scripts/make_demo.py --out /tmp/demo --steps 200

Everything is seeded, so a run reproduces the same corpus, tokenizer and (up to the float
nondeterminism of the CPU kernels) the same weights. The model is trained with moerun's own
model code (moerun.models.mixtral) and written in the Hugging Face Hub layout that real
Mixtral checkpoints use (per-expert w1/w2/w3 tensors, config.json, tokenizer files), so that
moerun loads it through exactly the same path as a downloaded model, and transformers loads it too.

The corpus is ChatML dialogues with a handful of checkable skills (counting up and down,
the alphabet, repeating and reversing a word). The model is a toy that shows the pipeline
works; it is not a language model.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moerun.models import mixtral  # noqa: E402

SEED = 1234
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 384  # 256 bytes + 3 special tokens + merges
MAX_LEN = 256

# ChatML, as trained. Tools (never trained on) render in Mistral's style, the format of the
# mixtral family (moerun/models/mixtral.py): a short [AVAILABLE_TOOLS] line naming them, and
# past calls as [TOOL_CALLS][{"name", "arguments"}]; both are plain text to this tokenizer.
CHAT_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\n[AVAILABLE_TOOLS]' + (tools | map(attribute='function') | map(attribute='name')"
    " | join(',')) + '[/AVAILABLE_TOOLS]<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
    "{% if message.tool_calls %}{{ '[TOOL_CALLS]' + (message.tool_calls | map(attribute='function') | list | tojson) }}{% endif %}"
    "{{ '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CONFIG = dict(
    architectures=["MixtralForCausalLM"],
    model_type="mixtral",
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    num_local_experts=4,
    num_experts_per_tok=2,
    hidden_act="silu",
    max_position_embeddings=MAX_LEN,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    sliding_window=None,
    tie_word_embeddings=False,
    attention_dropout=0.0,
    initializer_range=0.02,
    router_aux_loss_coef=0.01,
    router_jitter_noise=0.0,
    output_router_logits=False,
    use_cache=True,
    torch_dtype="bfloat16",
)

# ---------------------------------------------------------------------------- corpus

LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORDS = [
    "cat",
    "dog",
    "sun",
    "moon",
    "star",
    "tree",
    "fish",
    "bird",
    "cake",
    "milk",
    "rain",
    "snow",
    "book",
    "lamp",
    "door",
    "frog",
    "ship",
    "king",
    "blue",
    "red",
    "green",
    "hello",
    "world",
    "apple",
    "house",
    "music",
    "water",
    "robot",
    "pizza",
    "river",
]
RUN = 8  # how many items a count or an alphabet run lists


def _skill_count_up(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 99 - RUN + 1)
    return f"count from {n}", " ".join(str(i) for i in range(n, n + RUN))


def _skill_count_down(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(RUN - 1, 99)
    return f"count down from {n}", " ".join(str(i) for i in range(n, n - RUN, -1))


def _skill_alphabet(rng: random.Random) -> tuple[str, str]:
    i = rng.randint(0, len(LETTERS) - RUN)
    return f"alphabet from {LETTERS[i]}", " ".join(LETTERS[i : i + RUN])


def _skill_repeat(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    return f"repeat: {w}", " ".join([w] * 3)


def _skill_reverse(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    return f"reverse: {w}", w[::-1]


SKILLS = {
    "count up": _skill_count_up,
    "count down": _skill_count_down,
    "alphabet": _skill_alphabet,
    "repeat": _skill_repeat,
    "reverse": _skill_reverse,
}


def dialogue(rng: random.Random) -> list[dict]:
    """One to three user/assistant turns, each a random skill."""
    turns = rng.choices([1, 2, 3], weights=[6, 3, 1])[0]
    messages = []
    for _ in range(turns):
        question, answer = SKILLS[rng.choice(list(SKILLS))](rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


def render(messages: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


# ------------------------------------------------------------------------- tokenizer


def train_tokenizer(rng: random.Random, n_dialogues: int = 20000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Train on the text between the special tokens; they are added tokens, never merged.
    texts = []
    for _ in range(n_dialogues):
        for m in dialogue(rng):
            texts += [m["role"] + "\n", m["content"]]
    tok.train_from_iterator(texts, trainer=trainer)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2], "special tokens must come first"
    return tok


def encode_dialogue(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and a 0/1 loss mask: 1 on the assistant's reply and its <|im_end|>."""
    ids, mask = [], []
    for m in messages:
        head = tok.encode(f"<|im_start|>{m['role']}\n", add_special_tokens=False).ids
        body = tok.encode(m["content"] + "<|im_end|>", add_special_tokens=False).ids
        tail = tok.encode("\n", add_special_tokens=False).ids
        learn = 1 if m["role"] == "assistant" else 0
        ids += head + body + tail
        mask += [0] * len(head) + [learn] * len(body) + [0] * len(tail)
    return ids, mask


# ----------------------------------------------------------------------------- model


def build_model(config: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    lm = mixtral.Model(mixtral.ModelArgs.from_dict(config))
    std = config["initializer_range"]
    n_layers = config["num_hidden_layers"]
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "experts.w2")):
                # Residual-branch outputs: scaled down with depth (GPT-2 style).
                p.normal_(0.0, std / math.sqrt(2 * n_layers))
            else:
                p.normal_(0.0, std)
    return lm


def batch_tensors(tok, rng: random.Random, batch: int, pad_id: int):
    seqs = [encode_dialogue(tok, dialogue(rng)) for _ in range(batch)]
    T = min(max(len(s[0]) for s in seqs), MAX_LEN)
    ids = torch.full((batch, T), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, T), dtype=torch.float32)
    for b, (s, m) in enumerate(seqs):
        s, m = s[:T], m[:T]
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(m)] = torch.tensor(m, dtype=torch.float32)
    return ids, mask


def train(lm, tok, steps: int, batch: int, lr: float, seed: int, log_every: int = 25) -> float:
    rng = random.Random(seed)
    gates = []
    hooks = [
        layer.block_sparse_moe.gate.register_forward_hook(lambda mod, inp, out: gates.append(out))
        for layer in lm.model.layers
    ]
    n_experts, top_k = lm.args.num_local_experts, lm.args.num_experts_per_tok
    aux_coef = CONFIG["router_aux_loss_coef"]
    decay = [p for n, p in lm.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in lm.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
        eps=1e-8,
    )
    warmup = max(1, min(60, steps // 10))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

    lm.train()
    t0, running = time.time(), None
    usage = torch.zeros(lm.args.num_hidden_layers, n_experts)
    for step in range(steps):
        ids, mask = batch_tensors(tok, rng, batch, pad_id=0)
        inputs, targets, tmask = ids[:, :-1], ids[:, 1:], mask[:, 1:]
        gates.clear()
        logits = lm(inputs, lm.make_caches(*inputs.shape), 0)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        loss = (nll * tmask.reshape(-1)).sum() / tmask.sum()
        # Switch-style load balancing over the real (non-pad) tokens, as Mixtral's aux loss.
        real = (inputs != 0).reshape(-1) | (torch.arange(inputs.shape[1]) == 0).repeat(inputs.shape[0])
        aux = 0.0
        for layer, g in enumerate(gates):
            g = g.reshape(-1, n_experts)[real]
            probs = torch.softmax(g.float(), dim=-1)
            chosen = F.one_hot(torch.topk(probs, top_k, dim=-1).indices, n_experts).sum(1).float()
            aux = aux + n_experts * (chosen.mean(0) * probs.mean(0)).sum() / top_k
            usage[layer] += chosen.sum(0).detach()
        total = loss + aux_coef * aux / len(gates)

        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()

        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if step % log_every == 0 or step == steps - 1:
            print(
                f"step {step:5d}/{steps}  loss {loss.item():.4f}  (avg {running:.4f})  "
                f"lr {lr_at(step):.2e}  {time.time() - t0:6.1f}s",
                flush=True,
            )
    for h in hooks:
        h.remove()
    share = usage / usage.sum(1, keepdim=True)
    print("expert load per layer:", [[round(x, 2) for x in row] for row in share.tolist()])
    lm.eval()
    return running


# ------------------------------------------------------------------------------ save


def unstacked_state_dict(lm, config: dict) -> dict[str, torch.Tensor]:
    """Our stacked experts (w13 [E, 2I, D], w2 [E, D, I]) -> Mixtral's per-expert w1/w3/w2."""
    inter = config["intermediate_size"]
    out = {}
    for name, p in lm.state_dict().items():
        p = p.detach().to(torch.bfloat16)
        if name.endswith("experts.w13"):
            prefix = name[: -len("w13")]
            for e in range(p.shape[0]):
                out[f"{prefix}{e}.w1.weight"] = p[e, :inter].contiguous()
                out[f"{prefix}{e}.w3.weight"] = p[e, inter:].contiguous()
        elif name.endswith("experts.w2"):
            prefix = name[: -len("w2")]
            for e in range(p.shape[0]):
                out[f"{prefix}{e}.w2.weight"] = p[e].contiguous()
        else:
            out[name] = p.contiguous()
    return out


MODEL_CARD = """\
---
license: apache-2.0
library_name: moerun
tags: [mixtral, moe, toy]
---

# moerun demo: a toy Mixture-of-Experts

This folder is the `demo` model that ships inside moerun, so that `moerun chat demo`
and `moerun generate demo "count from 7"` work offline, with no download.

**What it is.** A Mixtral-architecture MoE ({params} parameters, {size}): {layers} layers,
hidden size {hidden}, {heads} attention heads over {kv} key/value heads, {experts} experts per layer
with top-{topk} routing, expert intermediate size {inter}, a {vocab}-token byte-level BPE
vocabulary and a context of {ctx} tokens. Weights are bfloat16, stored with the real
Mixtral tensor names (`block_sparse_moe.experts.N.w1/w2/w3`), so it loads through the same
code path as a downloaded Mixtral, and in transformers (`MixtralForCausalLM`).

It was trained from scratch in a few minutes on two CPU cores by `scripts/make_demo.py`
(seeded; rerun it to rebuild this folder), with moerun's own model code, on synthetic
ChatML dialogues (loss on the assistant's replies only).

**What it can do** (greedy decoding, through the chat template):

| prompt | reply |
|---|---|
| `count from 7` | `7 8 9 10 11 12 13 14` (any start 0-92) |
| `count down from 9` | `9 8 7 6 5 4 3 2` (any start 7-99) |
| `alphabet from k` | `k l m n o p q r` (any letter a-s) |
| `repeat: hello` | `hello hello hello` |
| `reverse: robot` | `tobor` |

`repeat:` and `reverse:` know only the {nwords} words of their training list:
{words}.

**What it is not.** A language model. It knows nothing beyond these patterns, and any
other prompt gets a confident, meaningless answer in the same style. It exists to show
that tokenizer, chat template, routing, experts, the KV cache and the sampler work end to
end, and as a fixture for tests.
"""


def write_folder(out: Path, lm, tok, config: dict) -> None:
    from safetensors.torch import save_file

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    im_end, eot = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    full = {**config, "bos_token_id": eot, "eos_token_id": im_end, "pad_token_id": eot}
    (out / "config.json").write_text(json.dumps(full, indent=2) + "\n")
    gen = {"bos_token_id": eot, "eos_token_id": [im_end, eot], "pad_token_id": eot, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    save_file(unstacked_state_dict(lm, config), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # save_file creates it owner-only; it ships in the wheel
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    tok_config = {
        "added_tokens_decoder": added,
        "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_LEN,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    n_params = sum(p.numel() for p in lm.parameters())
    size = sum(f.stat().st_size for f in [out / "model.safetensors"])
    (out / "README.md").write_text(
        MODEL_CARD.format(
            params=f"{n_params / 1e6:.2f}M",
            size=f"{size / 1e6:.1f} MB on disk",
            layers=config["num_hidden_layers"],
            hidden=config["hidden_size"],
            heads=config["num_attention_heads"],
            kv=config["num_key_value_heads"],
            experts=config["num_local_experts"],
            topk=config["num_experts_per_tok"],
            inter=config["intermediate_size"],
            vocab=config["vocab_size"],
            ctx=MAX_LEN,
            nwords=len(WORDS),
            words=", ".join(WORDS),
        )
    )


# ---------------------------------------------------------------------------- checks


def evaluate(folder: Path) -> dict[str, tuple[int, int]]:
    """Greedy replies of the saved model, loaded by moerun, on every input of each skill."""
    import moerun

    model = moerun.load(str(folder), device="cpu")
    cases: dict[str, list[tuple[str, str]]] = {name: [] for name in SKILLS}
    for n in range(0, 99 - RUN + 2):
        cases["count up"].append((f"count from {n}", " ".join(str(i) for i in range(n, n + RUN))))
    for n in range(RUN - 1, 100):
        cases["count down"].append((f"count down from {n}", " ".join(str(i) for i in range(n, n - RUN, -1))))
    for i in range(len(LETTERS) - RUN + 1):
        cases["alphabet"].append((f"alphabet from {LETTERS[i]}", " ".join(LETTERS[i : i + RUN])))
    for w in WORDS:
        cases["repeat"].append((f"repeat: {w}", " ".join([w] * 3)))
        cases["reverse"].append((f"reverse: {w}", w[::-1]))
    results = {}
    for name, items in cases.items():
        ok, failures = 0, []
        for prompt, want in items:
            got = model.generate(prompt, chat=True, max_new_tokens=32).text
            if got == want:
                ok += 1
            else:
                failures.append(f"{prompt!r} -> {got!r} (want {want!r})")
        results[name] = (ok, len(items))
        print(f"  {name:11s} {ok:3d}/{len(items)}" + (f"   e.g. {failures[0]}" if failures else ""))
    # A second turn must work too, as in `moerun chat`.
    history = [
        {"role": "user", "content": "count from 7"},
        {"role": "assistant", "content": "7 8 9 10 11 12 13 14"},
        {"role": "user", "content": "reverse: robot"},
    ]
    print("  two turns:", repr(model.generate(history, max_new_tokens=32).text))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "moerun" / "data" / "demo")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-eval", action="store_true", help="skip the greedy check of every skill")
    args = ap.parse_args()

    t_start = time.time()
    torch.set_num_threads(args.threads)
    random.seed(SEED)
    torch.manual_seed(SEED)

    tok = train_tokenizer(random.Random(SEED))
    print(f"tokenizer: {tok.get_vocab_size()} tokens; e.g. {tok.encode('count from 17').tokens}")
    assert tok.get_vocab_size() == VOCAB_SIZE

    lm = build_model(CONFIG, SEED)
    n_params = sum(p.numel() for p in lm.parameters())
    per_expert = 3 * CONFIG["hidden_size"] * CONFIG["intermediate_size"]
    print(
        f"model: {n_params / 1e6:.2f}M parameters ({n_params * 2 / 1e6:.1f} MB in bf16), "
        f"{CONFIG['num_hidden_layers']} layers x {CONFIG['num_local_experts']} experts "
        f"({per_expert / 1e3:.0f}K each), top-{CONFIG['num_experts_per_tok']}"
    )

    t_train = time.time()
    final = train(lm, tok, args.steps, args.batch, args.lr, SEED + 1)
    train_s = time.time() - t_train
    print(f"training: {args.steps} steps in {train_s:.0f}s, final loss (smoothed, assistant tokens) {final:.2e}")

    write_folder(args.out, lm, tok, CONFIG)
    sizes = {f.name: f.stat().st_size for f in sorted(args.out.iterdir())}
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v / 1e3:.0f} KB" for k, v in sizes.items()))
    print(f"total {sum(sizes.values()) / 1e6:.2f} MB")

    if not args.no_eval:
        print("greedy check (moerun.load of the saved folder):")
        evaluate(args.out)
    print(f"done in {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
