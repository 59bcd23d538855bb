"""QuantScheme: validation (one clear ValueError per bad field), ranges, from_any, frozenness."""

import dataclasses
import re

import pytest

from qat_lightning.quant import QuantScheme


def _rejects(field: str, value, allowed: str, **kwargs) -> None:
    """Constructing with ``kwargs`` fails with a message naming the field, value and range."""
    with pytest.raises(ValueError) as info:
        QuantScheme(**kwargs)
    message = str(info.value)
    assert f"QuantScheme.{field}={value!r}" in message, message
    assert re.search(allowed, message), message


@pytest.mark.parametrize("bits", [1, 17, 0, -8, 8.0, "8", True, None])
def test_bits_out_of_range_or_not_int(bits):
    _rejects("bits", bits, r"integer in 2\.\.16", bits=bits)


@pytest.mark.parametrize("granularity", ["per_row", "channel", "", None])
def test_granularity_unknown(granularity):
    _rejects("granularity", granularity, "per_tensor.*per_channel", granularity=granularity)


@pytest.mark.parametrize("axis", [1.0, "0", None, True])
def test_axis_not_int(axis):
    _rejects("axis", axis, "integer channel axis", granularity="per_channel", axis=axis)


@pytest.mark.parametrize("observer", ["max", "kl", "", None])
def test_observer_unknown(observer):
    _rejects(
        "observer",
        observer,
        "minmax.*moving_minmax.*percentile.*batch_percentile.*mse.*histogram.*entropy",
        observer=observer,
    )


@pytest.mark.parametrize("observer", ["entropy", "histogram"])
def test_histogram_observers_have_no_per_channel_form(observer):
    _rejects(
        "observer",
        observer,
        "per_channel scheme uses minmax, moving_minmax, percentile, batch_percentile or mse",
        granularity="per_channel",
        observer=observer,
    )
    assert QuantScheme(observer="entropy").observer == "entropy"  # per-tensor is fine


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5, "0.1", None])
def test_averaging_constant_range(value):
    _rejects("averaging_constant", value, r"number in \(0, 1\]", averaging_constant=value)


@pytest.mark.parametrize("value", [50.0, 10, 100.5, 101, "99", None])
def test_percentile_range(value):
    _rejects("percentile", value, r"number in \(50, 100\]", percentile=value)


def test_range_edges_are_accepted():
    QuantScheme(bits=2)
    QuantScheme(bits=16)
    QuantScheme(averaging_constant=1.0)
    QuantScheme(percentile=100)
    QuantScheme(representation="fixed_point", bits=8, frac_bits=0)
    QuantScheme(representation="fixed_point", bits=8, frac_bits=8)


def test_narrow_range_needs_signed():
    _rejects("narrow_range", True, "False for an unsigned scheme", narrow_range=True, signed=False)


@pytest.mark.parametrize("value", ["float", "fixed", "", None])
def test_representation_unknown(value):
    _rejects("representation", value, "int.*fixed_point", representation=value)


@pytest.mark.parametrize("frac_bits", [None, -1, 9, 4.0, True])
def test_fixed_point_frac_bits_missing_or_out_of_range(frac_bits):
    _rejects(
        "frac_bits",
        frac_bits,
        r"integer in 0\.\.bits \(8\) for fixed_point",
        representation="fixed_point",
        bits=8,
        frac_bits=frac_bits,
    )


def test_frac_bits_with_int_representation():
    _rejects("frac_bits", 4, "None unless representation='fixed_point'", frac_bits=4)


def test_fixed_point_cannot_be_affine():
    _rejects(
        "symmetric",
        False,
        "True for fixed_point",
        representation="fixed_point",
        frac_bits=4,
        symmetric=False,
    )


def test_fixed_point_cannot_be_learnable():
    _rejects(
        "learnable",
        True,
        "False for fixed_point",
        representation="fixed_point",
        frac_bits=4,
        learnable=True,
    )


@pytest.mark.parametrize("field", ["symmetric", "signed", "narrow_range", "learnable"])
@pytest.mark.parametrize("value", [1, 0, "True", None])
def test_boolean_fields_reject_non_bools(field, value):
    _rejects(field, value, "True or False", **{field: value})


@pytest.mark.parametrize(
    ("kwargs", "qmin", "qmax"),
    [
        ({}, -128, 127),
        ({"narrow_range": True}, -127, 127),
        ({"signed": False}, 0, 255),
        ({"bits": 4}, -8, 7),
        ({"bits": 4, "signed": False}, 0, 15),
        ({"bits": 2, "narrow_range": True}, -1, 1),
        ({"bits": 16}, -32768, 32767),
        ({"bits": 16, "signed": False}, 0, 65535),
    ],
)
def test_code_range(kwargs, qmin, qmax):
    scheme = QuantScheme(**kwargs)
    assert (scheme.qmin, scheme.qmax) == (qmin, qmax)


def test_from_any_accepts_dict_scheme_and_none():
    scheme = QuantScheme.from_any({"bits": 4, "granularity": "per_channel", "axis": 1})
    assert scheme == QuantScheme(bits=4, granularity="per_channel", axis=1)
    assert QuantScheme.from_any(scheme) is scheme
    assert QuantScheme.from_any(None) is None
    assert QuantScheme.from_any(scheme.to_dict()) == scheme


def test_from_any_unknown_key_is_named():
    with pytest.raises(ValueError, match=r"no field 'bitz'.*allowed.*'bits'"):
        QuantScheme.from_any({"bitz": 4})


def test_from_any_validates_values():
    with pytest.raises(ValueError, match=r"QuantScheme\.bits=1"):
        QuantScheme.from_any({"bits": 1})


def test_from_any_rejects_other_types():
    with pytest.raises(TypeError, match="QuantScheme or a dict"):
        QuantScheme.from_any(8)


def test_frozen():
    scheme = QuantScheme()
    with pytest.raises(dataclasses.FrozenInstanceError):
        scheme.bits = 4  # type: ignore[misc]
    assert scheme.bits == 8


def test_replace_validates_again():
    assert QuantScheme().replace(bits=4).bits == 4
    with pytest.raises(ValueError, match=r"QuantScheme\.bits=20"):
        QuantScheme().replace(bits=20)


def test_schemes_are_hashable_values():
    assert QuantScheme(bits=4) == QuantScheme(bits=4)
    assert len({QuantScheme(bits=4), QuantScheme(bits=4), QuantScheme()}) == 2
