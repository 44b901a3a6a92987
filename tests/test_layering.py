"""The import graph runs one way: a module imports only from its own layer or the ones
below it (docs/ARCHITECTURE.md), read from the source (function-level imports too), so
that a kernel never learns about checkpoints and the expert cache never reaches up into
the families."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import moerun

PACKAGE = Path(moerun.__file__).parent

# Lowest first. `moerun` is the package's own __init__ (its version; the API it loads lazily).
LAYERS = [
    {
        "moerun",
        "errors",
        "units",
        "paths",
        "gpus",
        "registry",
        "weights",
        "tokenizer",
        "config_checks",
        "spec",
        "progress",
    },
    {"quant", "hub"},
    {"kernels"},
    {"layers", "rope", "recurrent", "graphs"},
    {"moe"},
    {"models"},
    {"plan", "generate", "fit", "json_constraint", "tool_calls", "library"},
    {"api"},
    {"serve", "server_protocol", "server_responses", "served_model", "cli", "chat", "bench"},
    {"__main__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _part(module: str) -> str:
    """moerun.moe.cache -> moe; moerun -> moerun."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _imports(path: Path) -> set[str]:
    """Every moerun module `path` imports, anywhere in it."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "moerun"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "moerun":
            for a in node.names:  # `from moerun import hub` imports moerun.hub; `import __version__` the package
                full = f"{node.module}.{a.name}"
                is_module = (PACKAGE.parent / (full.replace(".", "/") + ".py")).is_file() or (
                    PACKAGE.parent / full.replace(".", "/")
                ).is_dir()
                out.add(full if is_module else node.module)
    return out


def test_every_module_has_a_layer():
    parts = {_part(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)) for p in PACKAGE.rglob("*.py")}
    assert parts - {"__init__"} <= set(RANK), sorted(parts - set(RANK))


# The package's face: `moerun.load` / `moerun.Model`, imported lazily on first use.
FACE = ("moerun/__init__.py", "moerun.api")


def test_no_import_climbs_to_a_higher_layer():
    climbs = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = _part(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"))
        for target in _imports(path):
            if RANK[_part(target)] > RANK[here] and (str(path.relative_to(PACKAGE.parent)), target) != FACE:
                climbs.append(f"{path.relative_to(PACKAGE.parent)} imports {target}")
    assert not climbs, climbs


def test_no_module_outside_models_imports_a_family():
    families = {p.stem for p in (PACKAGE / "models").glob("*.py")} - {"__init__", "base"}
    reaching = [
        f"{path.relative_to(PACKAGE.parent)} imports {target}"
        for path in PACKAGE.rglob("*.py")
        if "models" not in path.relative_to(PACKAGE).parts[:1]
        for target in _imports(path)
        if target.split(".")[-1] in families and ".models." in f".{target}."
    ]
    assert not reaching, reaching


def test_expert_residency_and_compute_stay_apart():
    """The residency decides where an expert lives and hands back slots; a backend computes
    from rows it is given. Neither imports the other; only the cache joins them."""
    compute = ("moerun.kernels", "moerun.moe.backends", "moerun.moe.experts")
    residency = [t for t in _imports(PACKAGE / "moe" / "residency.py") if t.startswith(compute)]
    backends = [t for t in _imports(PACKAGE / "moe" / "backends.py") if t.startswith("moerun.moe.residency")]
    assert not residency and not backends, residency + backends


def test_every_family_keeps_the_contract_and_a_broken_one_is_named():
    import types

    from moerun.models import ARCHITECTURES, get_architecture
    from moerun.models.base import Family

    for name in ARCHITECTURES:
        family = get_architecture(name)
        assert isinstance(family, Family) and family.name == name and get_architecture(name) is family
    # The defaults stand in for the optional hooks; a family's own hook replaces them.
    mixtral, switch = get_architecture("mixtral"), get_architecture("switch_transformers")
    assert mixtral.layer_of("model.layers.7.mlp.w", None) == 7 and mixtral.layer_of("lm_head.weight", None) is None
    assert switch.layer_of("decoder.block.1.layer.0.w", types.SimpleNamespace(num_layers=3)) == 4
    config = {"num_hidden_layers": 6}
    assert mixtral.first_layers(config, 2) == "first 2 of 6 layers" and config["num_hidden_layers"] == 2
    broken = types.ModuleType("moerun.models.broken")
    broken.ModelArgs, broken.Model = object, object
    with pytest.raises(TypeError, match="lacks sanitize, checkpoint_tensors"):
        Family(broken)


def test_one_units_module_writes_bytes_and_parameter_counts():
    from moerun import units

    assert units.gib(1024) == "1.0 KiB" and units.gib(3 * 2**20) == "3.0 MiB" and units.gib(12 * 2**30) == "12.00 GiB"
    assert (
        units.params(46_700_000_000) == "46.70 B" and units.params(1_870_000) == "1.87 M" and units.params(950) == "950"
    )
    assert units.params_short(30_530_000_000) == "30.5B" and units.params_short(1_870_000) == "1.9M"
