"""Short names for the models moerun knows, so users can type `moerun chat mixtral-8x7b`.

An alias only names a Hub repo; the architecture is always read from the checkpoint's own
config.json (`model_type`), never inferred from the alias. `family` is for display.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# The tiny random checkpoint shipped inside the package, so `moerun chat demo` works offline.
DEMO_DIR: Path = Path(__file__).parent / "data" / "demo"

# The real config.json of each alias's repo, shipped so that `moerun models` and `fit`
# answer offline, and synthetic benchmarks can build the true shapes.
CONFIGS_DIR: Path = Path(__file__).parent / "data" / "configs"

# repo_id of the demo alias: it resolves to DEMO_DIR, not to the Hub.
EMBEDDED = "embedded"


@dataclass(frozen=True)
class Alias:
    """A short model name and the Hub repository it stands for."""

    name: str
    repo_id: str
    family: str
    description: str


ALIASES: dict[str, Alias] = {
    a.name: a
    for a in (
        Alias("demo", EMBEDDED, "demo", "tiny random MoE shipped with moerun; for trying the tool offline"),
        Alias(
            "mixtral-8x7b",
            "mistralai/Mixtral-8x7B-Instruct-v0.1",
            "mixtral",
            "46.7B total, 12.9B active; 32 layers x 8 experts, top-2",
        ),
        Alias(
            "mixtral-8x22b",
            "mistralai/Mixtral-8x22B-Instruct-v0.1",
            "mixtral",
            "141B total, 39B active; 56 layers x 8 experts, top-2",
        ),
        Alias(
            "qwen1.5-moe-a2.7b",
            "Qwen/Qwen1.5-MoE-A2.7B-Chat",
            "qwen2_moe",
            "14.3B total, 2.7B active; 60 experts top-4 plus a shared expert",
        ),
        Alias(
            "qwen2-57b-a14b",
            "Qwen/Qwen2-57B-A14B-Instruct",
            "qwen2_moe",
            "57B total, 14B active; 64 experts top-8 plus a shared expert",
        ),
        Alias(
            "qwen3-30b-a3b",
            "Qwen/Qwen3-30B-A3B",
            "qwen3_moe",
            "30.5B total, 3.3B active; 48 layers x 128 experts, top-8",
        ),
        Alias(
            "qwen3-235b-a22b",
            "Qwen/Qwen3-235B-A22B",
            "qwen3_moe",
            "235B total, 22B active; 94 layers x 128 experts, top-8",
        ),
        Alias(
            "deepseek-v2-lite",
            "deepseek-ai/DeepSeek-V2-Lite-Chat",
            "deepseek_v2",
            "15.7B total, 2.4B active; MLA attention, 64 experts top-6 plus 2 shared",
        ),
        Alias(
            "deepseek-v3",
            "deepseek-ai/DeepSeek-V3",
            "deepseek_v3",
            "671B total, 37B active; MLA, 256 experts top-8 plus 1 shared; stored in FP8",
        ),
        Alias(
            "olmoe-1b-7b",
            "allenai/OLMoE-1B-7B-0924-Instruct",
            "olmoe",
            "6.9B total, 1.3B active; 16 layers x 64 experts, top-8",
        ),
        Alias(
            "phi-3.5-moe",
            "microsoft/Phi-3.5-MoE-instruct",
            "phimoe",
            "41.9B total, 6.6B active; 32 layers x 16 experts, top-2",
        ),
        Alias(
            "gpt-oss-20b",
            "openai/gpt-oss-20b",
            "gpt_oss",
            "21B total, 3.6B active; 24 layers x 32 experts, top-4; MXFP4 experts",
        ),
        Alias(
            "gpt-oss-120b",
            "openai/gpt-oss-120b",
            "gpt_oss",
            "117B total, 5.1B active; 36 layers x 128 experts, top-4; MXFP4 experts",
        ),
        Alias(
            "llama-4-scout",
            "meta-llama/Llama-4-Scout-17B-16E-Instruct",
            "llama4",
            "109B total, 17B active; 48 layers x 16 experts, top-1 plus a shared expert",
        ),
        Alias(
            "jamba-mini",
            "ai21labs/AI21-Jamba-Mini-1.7",
            "jamba",
            "51.6B total, 12.1B active; Mamba with attention every 8th layer, 16 experts top-2 every 2nd",
        ),
        Alias(
            "lfm2-8b-a1b",
            "LiquidAI/LFM2-8B-A1B",
            "lfm2_moe",
            "8.3B total, 1.5B active; 18 short-conv + 6 attention layers, 32 experts top-4",
        ),
        Alias(
            "qwen3-next-80b-a3b",
            "Qwen/Qwen3-Next-80B-A3B-Instruct",
            "qwen3_next",
            "80B total, 3B active; 48 layers (36 Gated DeltaNet, 12 gated attention) x 512 experts, top-10 + shared",
        ),
        Alias(
            "qwen3.5-35b-a3b",
            "Qwen/Qwen3.5-35B-A3B",
            "qwen3_5_moe",
            "35B total, 3B active; 40 layers (30 Gated DeltaNet, 10 gated attention) x 256 experts, top-8 + shared",
        ),
        Alias(
            "qwen3.5-122b-a10b",
            "Qwen/Qwen3.5-122B-A10B",
            "qwen3_5_moe",
            "122B total, 10B active; 48 layers (36 Gated DeltaNet, 12 gated attention) x 256 experts, top-8 + shared",
        ),
        Alias(
            "granite-4.0-h-tiny",
            "ibm-granite/granite-4.0-h-tiny",
            "granitemoehybrid",
            "6.9B total, 1.5B active; 40 layers (36 Mamba-2, 4 attention), 64 experts top-6 plus a shared expert",
        ),
        Alias(
            "granite-4.0-h-small",
            "ibm-granite/granite-4.0-h-small",
            "granitemoehybrid",
            "32.2B total, 8.8B active; 40 layers (36 Mamba-2, 4 attention), 72 experts top-10 plus a shared expert",
        ),
        Alias(
            "glm-4.5-air",
            "zai-org/GLM-4.5-Air",
            "glm4_moe",
            "106B total, 12B active; 46 layers x 128 experts, top-8 plus a shared expert",
        ),
        Alias(
            "glm-4.7-flash",
            "zai-org/GLM-4.7-Flash",
            "glm4_moe_lite",
            "30B total, 3B active; MLA, 47 layers x 64 experts, top-4 plus a shared expert",
        ),
        Alias(
            "ernie-4.5-21b-a3b",
            "baidu/ERNIE-4.5-21B-A3B-PT",
            "ernie4_5_moe",
            "21B total, 3B active; 28 layers x 64 experts, top-6 plus 2 shared",
        ),
        Alias(
            "switch-base-8",
            "google/switch-base-8",
            "switch_transformers",
            "0.62B total, 0.22B active; T5 encoder-decoder, 12+12 layers, 8 experts top-1 every 2nd; "
            "span corruption, not chat",
        ),
        Alias(
            "switch-base-128",
            "google/switch-base-128",
            "switch_transformers",
            "7.4B total, 0.22B active; T5 encoder-decoder, 12+12 layers, 128 experts top-1 every 2nd; "
            "span corruption, not chat",
        ),
        Alias(
            "switch-large-128",
            "google/switch-large-128",
            "switch_transformers",
            "26B total, 0.74B active; T5 encoder-decoder, 24+24 layers, 128 experts top-1 every 2nd; "
            "span corruption, not chat",
        ),
    )
}


def lookup(name: str) -> Alias | None:
    """The alias called `name` (case-insensitive), or None."""
    return ALIASES.get(name.strip().lower())


def shipped_config(alias: str) -> dict | None:
    """The config.json shipped for `alias` (its default repo's), or None."""
    a = lookup(alias)
    if a is None:
        return None
    path = DEMO_DIR / "config.json" if a.repo_id == EMBEDDED else CONFIGS_DIR / f"{a.name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def alias_for_repo(repo_id: str) -> Alias | None:
    """The alias whose repo is `repo_id` (case-insensitive), or None."""
    repo_id = repo_id.lower()
    return next((a for a in ALIASES.values() if a.repo_id.lower() == repo_id), None)
