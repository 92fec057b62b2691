"""Quantization formats as data: presets, the parametric grammar, dict round trips, bad names."""

from __future__ import annotations

import json

import pytest

from famex.errors import FamexError
from famex.quant.formats import PRESETS, QuantFormat, parse_format


def test_presets_hold_the_runtime_conventions():
    for b in (2, 3, 4, 5, 6, 8):
        f = PRESETS[f"int{b}"]
        assert (f.kind, f.bits, f.group_size, f.symmetric, f.activations) == ("int", b, 64, False, "none")
    assert PRESETS["int4-w4a16"] == QuantFormat("int", 4, 128, True, "bf16")
    assert PRESETS["int8-w8a16"] == QuantFormat("int", 8, None, True, "bf16")
    fp8 = PRESETS["fp8"]
    assert (fp8.kind, fp8.group_size, fp8.scale_dtype, fp8.activations) == ("fp8", None, "fp32", "fp8-token")
    nv = PRESETS["nvfp4"]
    assert (nv.kind, nv.bits, nv.group_size, nv.scale_dtype, nv.global_scale, nv.activations) == ("fp4", 4, 16, "e4m3", True, "nvfp4")
    assert PRESETS["nvfp4a16"].activations == "none" and PRESETS["nvfp4a16"].global_scale


@pytest.mark.parametrize(
    "name, expect",
    [
        ("int3-g128", dict(kind="int", bits=3, group_size=128, symmetric=False)),
        ("int4-ch-sym", dict(bits=4, group_size=None, symmetric=True)),
        ("int6-g32", dict(bits=6, group_size=32, symmetric=False)),
        ("int4-w4a16-fp32", dict(group_size=128, symmetric=True, scale_dtype="fp32")),
        ("fp8-a16", dict(kind="fp8", activations="none")),
        ("nvfp4-a16", dict(kind="fp4", activations="none")),
        ("int8-afp8", dict(bits=8, activations="fp8-token")),
    ],
)
def test_parametric_names(name, expect):
    fmt = parse_format(name)
    for key, value in expect.items():
        assert getattr(fmt, key) == value, (name, key)


def test_names_and_dicts_round_trip():
    names = list(PRESETS) + ["int3-g128", "int4-ch-sym", "int6-g32-fp32", "int2-g32-sym-fp16", "fp8-a16", "fp8-g128",
                             "nvfp4-a16", "int8-ch-afp8", "INT4"]
    for name in names:
        fmt = parse_format(name)
        assert parse_format(fmt.name) == fmt, name
        d = json.loads(json.dumps(fmt.to_dict()))
        assert QuantFormat.from_dict(d) == fmt
    assert parse_format("nvfp4-a16").name == "nvfp4a16"
    assert parse_format("int4-g128-sym").name == "int4-w4a16"


@pytest.mark.parametrize("bad", ["int9", "int4-g", "fp4", "nvfp4-asym", "int4-a4", "int4-zz", "", "gptq"])
def test_unknown_names_list_the_valid_ones(bad):
    with pytest.raises(FamexError) as e:
        parse_format(bad)
    assert "int4-w4a16" in str(e.value) and "nvfp4" in str(e.value)


@pytest.mark.parametrize(
    "fields",
    [
        dict(kind="fp4", bits=4, group_size=16, symmetric=False, scale_dtype="e4m3", global_scale=True),
        dict(kind="fp4", bits=4, group_size=32, symmetric=True, scale_dtype="e4m3", global_scale=True),
        dict(kind="int", bits=1, group_size=64, symmetric=False, scale_dtype="bf16"),
        dict(kind="int", bits=4, group_size=64, symmetric=True, scale_dtype="e4m3"),
        dict(kind="fp8", bits=8, group_size=None, symmetric=True, scale_dtype="fp32", activations="nvfp4"),
        dict(kind="int", bits=4, group_size=0, symmetric=True, scale_dtype="fp32"),
        dict(kind="int", bits=4, group_size=64, symmetric=True, scale_dtype="fp32", colour="red"),
    ],
)
def test_inconsistent_formats_are_refused(fields):
    with pytest.raises(FamexError):
        QuantFormat.from_dict(fields)


def test_bits_per_weight():
    assert parse_format("int4").bits_per_weight(4096) == 4 + 32 / 64  # bf16 scale + bias per 64
    assert parse_format("nvfp4").bits_per_weight(4096) == 4 + 8 / 16
