"""Encodings and codes worked out by hand, one per representation."""

import torch

from qat_lightning.quant import Quantizer, QuantScheme, encodings_from_range


def _calibrated(scheme: QuantScheme, *values: float) -> Quantizer:
    q = Quantizer(scheme)
    with q.compute_encodings():
        q(torch.tensor(values))
    return q


def test_symmetric_amax_form_of_pytorch_quantization():
    # NVIDIA pytorch-quantization: q = clamp(round(x * qmax / amax), min_bound, qmax), with
    # min_bound = -qmax - 1 (non-narrow) or -qmax (narrow_range). Calibrating on [-2.54, 1.0]
    # gives amax = 2.54, scale = 2.54 / 127 = 0.02 (in float32 1/scale is exactly 50.0, so the
    # products below are exact and the .5 cases are true ties, rounded half to even):
    #    x      x * 50    code (non-narrow)   code (narrow)
    #   0.01      0.5     0  (tie -> even)     0
    #   1.0      50.0    50                   50
    #  -3.0    -150.0  -128  (clipped)      -127  (clipped)
    #   2.54    127.0   127                  127
    #  -2.54   -127.0  -127                 -127
    #   0.03      1.5     2  (tie -> even)     2
    #   0.05      2.5     2  (tie -> even)     2
    #  -0.01     -0.5     0  (tie -> even)     0
    #   1.27     63.5    64  (tie -> even)    64
    x = torch.tensor([0.01, 1.0, -3.0, 2.54, -2.54, 0.03, 0.05, -0.01, 1.27])
    expected = [0, 50, -128, 127, -127, 2, 2, 0, 64]
    for narrow, low in ((False, -128), (True, -127)):
        q = _calibrated(QuantScheme(bits=8, narrow_range=narrow), -2.54, 1.0)
        scale, zero_point = q.encoding()
        assert torch.equal(scale, torch.tensor(2.54) / 127)
        assert int(zero_point) == 0
        codes = q.quantize(x).codes
        assert codes.dtype == torch.int8
        assert codes.tolist() == [low if c == -128 else c for c in expected]
        # Fake quant returns code * scale.
        assert torch.equal(q(x), codes.float() * scale)


def test_symmetric_unsigned_uses_max_only():
    # Unsigned symmetric: amax = max(x) = 2.55, scale = 2.55 / 255 = 0.01; negatives clip to 0.
    q = _calibrated(QuantScheme(bits=8, signed=False), -5.0, 2.55)
    scale, zero_point = q.encoding()
    assert torch.equal(scale, torch.tensor(2.55) / 255)
    assert int(zero_point) == 0
    codes = q.quantize(torch.tensor([-0.5, 0.0, 1.0, 2.55, 3.0])).codes
    assert codes.dtype == torch.uint8
    assert codes.tolist() == [0, 0, 100, 255, 255]


def test_affine_encoding_uint8():
    # min -1, max 3 on 0..255: scale = (3 - -1) / 255 = 4/255,
    # zero_point = 0 - round(-1 / scale) = round(63.75) = 64.
    # Codes round(x * 255/4) + 64: -1 -> -64 + 64 = 0, 0 -> 64, 1 -> 64 + 64 = 128,
    # 3 -> 191 + 64 = 255, 5 -> clipped to 255, -2 -> clipped to 0.
    q = _calibrated(QuantScheme(bits=8, symmetric=False, signed=False), -1.0, 3.0, 0.5)
    scale, zero_point = q.encoding()
    assert torch.equal(scale, torch.tensor(4.0) / 255)
    assert int(zero_point) == 64
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0, 5.0, -2.0])
    codes = q.quantize(x).codes
    assert codes.tolist() == [0, 64, 128, 255, 255, 0]
    # Zero is exactly representable; the ends are off by the zero point's rounding (0.25 step).
    y = q(x)
    assert float(y[1]) == 0.0
    torch.testing.assert_close(y[0], torch.tensor(-64 * 4 / 255), rtol=1e-6, atol=0)


def test_affine_range_is_stretched_to_include_zero():
    # All-positive data [2, 6] is quantized over [0, 6]: scale 6/255, zero point 0.
    scale, zero_point = encodings_from_range(
        torch.tensor(2.0), torch.tensor(6.0), QuantScheme(symmetric=False, signed=False)
    )
    assert torch.equal(scale, torch.tensor(6.0) / 255)
    assert int(zero_point) == 0
    # All-negative data [-6, -2] on signed codes: zero point at qmax.
    scale, zero_point = encodings_from_range(
        torch.tensor(-6.0), torch.tensor(-2.0), QuantScheme(symmetric=False)
    )
    assert torch.equal(scale, torch.tensor(6.0) / 255)
    assert int(zero_point) == 127


def test_fixed_point_q4_4():
    # Q4.4: 8-bit signed, 4 fractional bits: scale 2**-4, codes round(x * 16) in [-128, 127].
    #    x        x * 16    code
    #   0.03125     0.5      0  (tie -> even)
    #   0.09375     1.5      2  (tie -> even)
    #   1.0        16.0     16
    #  -3.3       -52.8    -53
    #   7.9375    127.0    127
    #   8.0       128.0    127  (clipped)
    #  -8.0      -128.0   -128
    #  -9.0      -144.0   -128  (clipped)
    scheme = QuantScheme(bits=8, representation="fixed_point", frac_bits=4)
    q = Quantizer(scheme)
    scale, zero_point = q.encoding()
    assert float(scale) == 2.0**-4 and int(zero_point) == 0
    x = torch.tensor([0.03125, 0.09375, 1.0, -3.3, 7.9375, 8.0, -8.0, -9.0])
    codes = q.quantize(x).codes
    assert codes.tolist() == [0, 2, 16, -53, 127, 127, -128, -128]
    assert torch.equal(q(x), codes.float() / 16)
    # No observer moves a fixed-point scale, whatever it sees.
    with q.compute_encodings():
        q(torch.tensor([1000.0, -1000.0]))
    assert float(q.encoding()[0]) == 2.0**-4


def test_fixed_point_unsigned_q0_8():
    # Unsigned Q0.8: scale 2**-8, codes round(x * 256) in [0, 255].
    q = Quantizer(QuantScheme(bits=8, signed=False, representation="fixed_point", frac_bits=8))
    codes = q.quantize(torch.tensor([0.5, 0.25, -0.1, 0.999, 1.5])).codes
    assert codes.tolist() == [128, 64, 0, 255, 255]


def test_per_channel_encodings_are_per_slice():
    # Two channels along axis 1 with amax 1.27 and 12.7: scales 0.01 and 0.1.
    scheme = QuantScheme(bits=8, granularity="per_channel", axis=1)
    q = Quantizer(scheme)
    with q.compute_encodings():
        q(torch.tensor([[1.27, -12.7], [-0.5, 3.0]]))
    scale, zero_point = q.encoding()
    assert torch.equal(scale, torch.tensor([1.27, 12.7]) / 127)
    assert zero_point.tolist() == [0, 0]
    codes = q.quantize(torch.tensor([[0.5, 0.5], [2.0, -20.0]])).codes
    assert codes.tolist() == [[50, 5], [127, -128]]
