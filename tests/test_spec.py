"""The load spec: every loading option checked once, in moerun.spec, and said two ways (a
sentence for the library, a usage phrase for the CLI); the plan's verdict as a type."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moerun.errors import MoerunError
from moerun.spec import LoadSpec, OptionError, max_threads


@pytest.mark.parametrize(
    "fields, message, usage",
    [
        (dict(bits=3), "bits must be 4, 8 or 16, got 3", "3 is not one of 4, 8, 16"),
        (dict(cold="disk"), "cold must be one of gpu, cpu, auto, got 'disk'", "disk is not one of gpu, cpu, auto"),
        (
            dict(dtype="int8"),
            "unknown dtype 'int8': use one of bfloat16, float16, float32",
            "int8 is not one of auto, bfloat16, float16, float32",
        ),
        (dict(threads=0), f"threads must be 1 to {max_threads()} (4 per core", "0 is not 1 to"),
    ],
)
def test_each_option_is_refused_once_in_two_voices(fields, message, usage):
    with pytest.raises(OptionError) as refused:
        LoadSpec(**fields)
    assert str(refused.value).startswith(message) and refused.value.usage.startswith(usage)


def test_a_spec_is_a_frozen_value_with_sizes_in_bytes_and_checked_again_when_replaced():
    spec = LoadSpec(vram="12GiB", ram=2**30, dtype=None)
    assert (spec.vram, spec.ram, spec.dtype) == (12 * 2**30, 2**30, "auto")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.bits = 4
    with pytest.raises(MoerunError, match="cannot read size"):
        LoadSpec(ram="lots")
    with pytest.raises(OptionError, match="bits must be"):
        dataclasses.replace(spec, bits=5)
    assert LoadSpec(dtype=torch.float32).dtype == "float32"  # a torch.dtype, by its name


def test_cuda_graphs_off_cuda_are_refused_by_the_spec():
    with pytest.raises(MoerunError, match="CUDA graphs need a CUDA device"):
        LoadSpec(device="cpu", cuda_graphs=True).resolve_device()
    with pytest.raises(MoerunError, match="unknown device 'tpu'"):
        LoadSpec(device="tpu").resolve_device()


def test_the_verdict_is_a_type_that_still_reads_as_its_word():
    import json

    from moerun.plan import Verdict

    assert Verdict.OFFLOAD == "offload" and f"{Verdict.NO}" == "no" and json.dumps(Verdict.RAM) == '"ram"'
    assert Verdict.GPU.resident and Verdict.RAM.resident and not Verdict.OFFLOAD.resident


def test_the_cli_declares_each_loading_option_once_as_a_spec_field():
    from moerun.cli.options import LOAD_OPTIONS

    fields = [o.field for o in LOAD_OPTIONS]
    assert len(fields) == len(set(fields)) and set(fields) <= {f.name for f in dataclasses.fields(LoadSpec)}
