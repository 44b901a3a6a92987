"""Turn latency over a multi-turn chat, with and without prefix reuse (docs/BENCHMARKS.md).

Drives moerun.chat.ChatSession (what `moerun chat` and, per request, `moerun serve` run)
over TURNS user turns of about USER tokens, each reply exactly REPLY tokens (eos ignored,
so both runs do the same work), on a tiny random Mixtral-architecture checkpoint made
with transformers (a dev dependency) or on the embedded demo. Runs alternate between
reuse on and off; medians per turn over the rounds.

    python scripts/bench_prefix_reuse.py [--model demo] [--turns 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import moerun  # noqa: E402
from moerun.chat import ChatSession  # noqa: E402

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def tiny_checkpoint(folder: Path) -> Path:
    from tests.model_fixtures import make_checkpoint

    return make_checkpoint(
        folder,
        "mixtral",
        dtype=torch.float32,
        shards=1,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
    )


def one_chat(model, turns: int, reply: int, reuse: bool, user_words: int) -> list[dict]:
    session = ChatSession(model, max_new_tokens=reply, ignore_eos=True, reuse_prefix=reuse)
    model.forget_prefix()
    out = []
    for t in range(turns):
        text = " ".join(WORDS[(t + i) % len(WORDS)] for i in range(user_words))
        t0 = time.perf_counter()
        session.send(text)
        s = session.last_stats
        out.append(
            {
                "turn": t + 1,
                "seconds": time.perf_counter() - t0,
                "prompt": s.prompt_tokens,
                "prefilled": s.prefilled_tokens,
                "prompt_s": s.prompt_seconds,
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="demo, a folder, or none for the tiny random checkpoint")
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--reply", type=int, default=24)
    ap.add_argument("--user-words", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        name = args.model or str(tiny_checkpoint(Path(tmp) / "tiny"))
        model = moerun.load(name, device="cpu", threads=args.threads)
        one_chat(model, 2, 4, True, args.user_words)  # warm-up
        runs = {True: [], False: []}
        for _ in range(args.rounds):
            for reuse in (True, False):
                runs[reuse].append(one_chat(model, args.turns, args.reply, reuse, args.user_words))
    rows = []
    for t in range(args.turns):
        row = {"turn": t + 1, "prompt": runs[True][0][t]["prompt"]}
        for reuse, key in ((True, "with"), (False, "without")):
            row[key] = statistics.median(r[t]["seconds"] for r in runs[reuse])
            row[key + "_prefilled"] = runs[reuse][0][t]["prefilled"]
        rows.append(row)
    if args.json:
        print(json.dumps({"model": model.describe(), "rows": rows}))
        return
    print(f"{model.describe()}; {args.turns} turns, replies of {args.reply} tokens, median of {args.rounds} rounds")
    print("| turn | prompt tokens | prefilled with reuse | turn s, with reuse | turn s, without | ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['turn']} | {r['prompt']} | {r['with_prefilled']} | {r['with']:.3f} | {r['without']:.3f} | "
            f"{r['without'] / r['with']:.2f}x |"
        )
    w, wo = statistics.median(r["with"] for r in rows), statistics.median(r["without"] for r in rows)
    print(
        f"median turn: {w:.3f} s with reuse, {wo:.3f} s without ({wo / w:.2f}x); "
        f"turn {args.turns}: {rows[-1]['with']:.3f} s vs {rows[-1]['without']:.3f} s"
    )


if __name__ == "__main__":
    main()
