"""Short names for the models moerun knows, so users can type `moerun chat mixtral-8x7b`.

An alias only names a Hub repo; the architecture is always read from the checkpoint's own
config.json (`model_type`), never inferred from the alias. `family` is for display.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The tiny random checkpoint shipped inside the package, so `moerun chat demo` works offline.
DEMO_DIR: Path = Path(__file__).parent / "data" / "demo"

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
        Alias("mixtral-8x7b", "mistralai/Mixtral-8x7B-Instruct-v0.1", "mixtral",
              "46.7B total, 12.9B active; 32 layers x 8 experts, top-2"),
        Alias("mixtral-8x22b", "mistralai/Mixtral-8x22B-Instruct-v0.1", "mixtral",
              "141B total, 39B active; 56 layers x 8 experts, top-2"),
        Alias("qwen1.5-moe-a2.7b", "Qwen/Qwen1.5-MoE-A2.7B-Chat", "qwen2_moe",
              "14.3B total, 2.7B active; 60 experts top-4 plus a shared expert"),
        Alias("qwen2-57b-a14b", "Qwen/Qwen2-57B-A14B-Instruct", "qwen2_moe",
              "57B total, 14B active; 64 experts top-8 plus a shared expert"),
        Alias("qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B", "qwen3_moe",
              "30.5B total, 3.3B active; 48 layers x 128 experts, top-8"),
        Alias("qwen3-235b-a22b", "Qwen/Qwen3-235B-A22B", "qwen3_moe",
              "235B total, 22B active; 94 layers x 128 experts, top-8"),
    )
}


def lookup(name: str) -> Alias | None:
    """The alias called `name` (case-insensitive), or None."""
    return ALIASES.get(name.strip().lower())
