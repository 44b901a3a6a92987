"""Decode speed of quantized, offloaded experts, by bits, expert slots and cold policy.

Writes a synthetic checkpoint with Mixtral-8x7B's expert shape (D=4096, I=14336, 8 experts,
top-2) and attention shape (32 heads, 8 kv heads) but only a few layers and the demo's
small vocabulary, then loads it through moerun's real path (quantized cache, expert store,
slots) and times greedy decode. Random weights route near-uniformly: a worst case for the
cache, not the routing of a trained model.

    python scripts/bench_offload.py --layers 2 --bits 16,8,4 --slots 8,4,2,1 --cold gpu,cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import moerun
from moerun.registry import DEMO_DIR

MIXTRAL = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    num_local_experts=8,
    num_experts_per_tok=2,
)


def write_checkpoint(folder: Path, layers: int, seed: int = 0) -> Path:
    """A checkpoint of MIXTRAL's shapes with `layers` layers, one shard per layer, bf16."""
    if (folder / "config.json").exists():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_DIR / name, tmp / name)
    vocab = json.loads((DEMO_DIR / "config.json").read_text())["vocab_size"]
    D, I, E = MIXTRAL["hidden_size"], MIXTRAL["intermediate_size"], MIXTRAL["num_local_experts"]
    H, KV, hd = MIXTRAL["num_attention_heads"], MIXTRAL["num_key_value_heads"], D // MIXTRAL["num_attention_heads"]
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.02):
        return (torch.randn(shape, generator=g) * std).to(torch.bfloat16)

    weight_map = {}

    def shard(tensors: dict, name: str):
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    shard(
        {
            "model.embed_tokens.weight": rand(vocab, D),
            "model.norm.weight": torch.ones(D, dtype=torch.bfloat16),
            "lm_head.weight": rand(vocab, D),
        },
        "model-embed.safetensors",
    )
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {
            p + "input_layernorm.weight": torch.ones(D, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(D, dtype=torch.bfloat16),
            p + "self_attn.q_proj.weight": rand(H * hd, D),
            p + "self_attn.k_proj.weight": rand(KV * hd, D),
            p + "self_attn.v_proj.weight": rand(KV * hd, D),
            p + "self_attn.o_proj.weight": rand(D, H * hd),
            p + "block_sparse_moe.gate.weight": rand(E, D),
        }
        for e in range(E):
            q = f"{p}block_sparse_moe.experts.{e}."
            t.update({q + "w1.weight": rand(I, D), q + "w3.weight": rand(I, D), q + "w2.weight": rand(D, I)})
        shard(t, f"model-layer{i:02d}.safetensors")
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "vocab_size": vocab,
        "num_hidden_layers": layers,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "max_position_embeddings": 4096,
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
        **MIXTRAL,
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(folder)
    return folder


def bench_one(folder, bits, slots, cold, tokens, repeats, device, dtype, prefetch=True) -> dict:
    t0 = time.perf_counter()
    model = moerun.load(
        str(folder), bits=bits, expert_slots=slots, cold=cold, device=device, dtype=dtype, prefetch=prefetch, ctx=256
    )
    load_s = time.perf_counter() - t0
    prompt = list(range(10, 26))
    model.generate(prompt, max_new_tokens=2, ignore_eos=True)  # warm-up
    rates = []
    model.reset_stats()
    for _ in range(repeats):
        out = model.generate(prompt, max_new_tokens=tokens, ignore_eos=True)
        rates.append(out.stats.generation_tps)
    total = model.stats.get("total", {})
    uses = total.get("hits", 0) + total.get("misses", 0)
    n_tokens = repeats * (tokens + len(prompt))
    return {
        "bits": bits,
        "slots": slots,
        "cold": cold,
        "prefetch": prefetch,
        "tg_tps_mean": statistics.mean(rates),
        "tg_tps_std": statistics.pstdev(rates),
        "hit_rate": total.get("hits", 0) / uses if uses else 1.0,
        "copied_bytes_per_token": total.get("bytes_copied", 0) / n_tokens,
        "cpu_experts": total.get("cpu_experts", 0),
        "load_seconds": load_s,
        "device_bytes_planned": model.plan.gpu_bytes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--bits", default="16,8,4")
    ap.add_argument("--slots", default="8,4,2,1")
    ap.add_argument("--cold", default="gpu,cpu")
    ap.add_argument("--tokens", type=int, default=8, help="generated tokens per repetition")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workdir", default="/tmp/moerun-bench")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--hidden", type=int, default=MIXTRAL["hidden_size"], help="smaller for a smoke test")
    ap.add_argument("--intermediate", type=int, default=MIXTRAL["intermediate_size"])
    args = ap.parse_args()
    MIXTRAL.update(hidden_size=args.hidden, intermediate_size=args.intermediate)

    shape = f"{args.hidden}x{args.intermediate}"
    folder = write_checkpoint(Path(args.workdir) / f"mixtral-shape-{shape}-{args.layers}l", args.layers)
    dtype = torch.bfloat16
    rows = []
    for bits in map(int, args.bits.split(",")):
        for slots in map(int, args.slots.split(",")):
            for cold in args.cold.split(","):
                if slots == MIXTRAL["num_local_experts"] and cold != args.cold.split(",")[0]:
                    continue  # nothing is cold when every expert is resident
                row = bench_one(folder, bits, slots, cold, args.tokens, args.repeats, args.device, dtype)
                rows.append(row)
                print(
                    f"bits={bits:2d} slots={slots} cold={cold:4s}  tg {row['tg_tps_mean']:.3f} ± "
                    f"{row['tg_tps_std']:.3f} tok/s  hit {row['hit_rate']:.0%}  "
                    f"copied/token {row['copied_bytes_per_token'] / 2**20:.0f} MiB",
                    flush=True,
                )
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "moerun": moerun.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine, "layers": args.layers, "rows": rows}, indent=2))
    print("\n| bits | slots/layer | cold | tg t/s | hit rate | copied/token |")
    print("|---:|---:|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['bits']} | {r['slots']} | {r['cold']} | {r['tg_tps_mean']:.3f} ± {r['tg_tps_std']:.3f} | "
            f"{r['hit_rate']:.0%} | {r['copied_bytes_per_token'] / 2**20:.0f} MiB |"
        )


if __name__ == "__main__":
    main()
