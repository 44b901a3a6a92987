"""config.json as transformers writes it, for every family at once: transformers saves
an optional key it was not given as null (ERNIE-4.5's num_nextn_predict_layers), and a
null means "not set", so it reads as the key left out (the field's default); where a
family's field admits None, null keeps the meaning the family gives it (DeepSeek's
q_lora_rank: null = no query compression, as in the reference)."""

from __future__ import annotations

import dataclasses

import pytest

from moerun.errors import MoerunError
from moerun.models import ARCHITECTURES, build_meta_model, get_architecture
from moerun.models.base import _admits_none, _field_hints

# transformers' default config of two families leaves out what moerun needs to build one.
COMPLETIONS = {"deepseek_v2": {"num_experts_per_tok": 6}, "lfm2_moe": {"layer_types": ["conv", "full_attention"] * 16}}


def transformers_config(model_type: str) -> dict:
    """The config.json transformers (the pinned test oracle) writes for `model_type` at
    its defaults, nulls included."""
    import transformers

    config = transformers.AutoConfig.for_model(model_type).to_dict()
    return {**config, **COMPLETIONS.get(model_type, {})}


def optional_fields(model_type: str) -> list[tuple[str, bool]]:
    """(name, whether None is a value of it) for every ModelArgs field with a default."""
    cls = get_architecture(model_type).ModelArgs
    hints = _field_hints(cls)
    return [
        (f.name, _admits_none(hints.get(f.name)))
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    ]


def outcome(args_cls, config: dict, name: str):
    """The value from_dict gives field `name` for `config`, or its one-line refusal."""
    try:
        return getattr(args_cls.from_dict(config), name)
    except MoerunError as e:
        return f"refused: {e}"


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_a_null_optional_key_reads_as_unset(model_type):
    args_cls = get_architecture(model_type).ModelArgs
    config = transformers_config(model_type)
    args_cls.from_dict(config)  # as saved, with the nulls transformers wrote
    nulled = []
    for name, admits_none in optional_fields(model_type):
        null = outcome(args_cls, {**config, name: None}, name)
        if admits_none:  # the family's own meaning of None: read, not refused as a wrong type
            assert not str(null).startswith(f"refused: config.json: {name} is null"), null
            continue
        assert null == outcome(args_cls, {k: v for k, v in config.items() if k != name}, name), name
        nulled.append(name)
    # Every such key null at once, and the model still builds (on the meta device).
    everything = {**config, **dict.fromkeys(nulled)}
    if isinstance(config.get("text_config"), dict):
        everything["text_config"] = {**config["text_config"], **{k: None for k in nulled if k in config["text_config"]}}
    build_meta_model(everything)


def test_lfm2_layer_types_must_name_every_layer():
    with pytest.raises(MoerunError, match="layer_types names 24 layers, num_hidden_layers is 32"):
        get_architecture("lfm2_moe").ModelArgs.from_dict(
            {**transformers_config("lfm2_moe"), "layer_types": ["conv"] * 24}
        )


def test_a_null_required_key_is_refused_in_one_line():
    config = {**transformers_config("mixtral"), "hidden_size": None}
    with pytest.raises(MoerunError, match="hidden_size is null, and mixtral needs a value"):
        get_architecture("mixtral").ModelArgs.from_dict(config)
