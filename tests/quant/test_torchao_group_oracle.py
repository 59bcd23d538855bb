"""torchao's per-group int4 and per-token int8 fake quantizers as oracles (test-only).

torchao is never a dependency of the package (the dev extra installs it for these tests). They
import it from the environment or from a side directory where it was installed without its
dependencies (``pip install --target /tmp/torchao_side --no-deps torchao==0.18.*``; another
directory through ``QAT_TORCHAO_SIDE``), and skip, saying why, where it does not import.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qat_lightning.quant import Quantizer, QuantScheme, fake_quantize


def _torchao():
    side = os.environ.get("QAT_TORCHAO_SIDE", "/tmp/torchao_side")
    if os.path.isdir(side) and side not in sys.path:
        sys.path.append(side)
    try:
        from torchao.quantization.qat import IntxFakeQuantizeConfig
        from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer
        from torchao.quantization.quant_primitives import (
            MappingType,
            choose_qparams_affine,
        )
    except Exception as error:  # not installed, or built for another torch
        pytest.skip(f"torchao does not import here ({type(error).__name__}: {error})")
    return IntxFakeQuantizeConfig, IntxFakeQuantizer, MappingType, choose_qparams_affine


@settings(max_examples=30, deadline=None)
@given(
    out=st.integers(1, 8),
    groups=st.integers(1, 4),
    group_size=st.sampled_from([8, 32, 64]),
    seed=st.integers(0, 2**16),
)
def test_affine_int4_per_group_agrees_with_torchao(out, groups, group_size, seed):
    """torchao's integer-zero-point affine mapping (``choose_qparams_affine``, ASYMMETRIC,
    blocks ``(1, group_size)``) and its ``_fake_quantize_affine``: the same scales, zero points
    and values. (Its QAT ``IntxFakeQuantizer`` for asymmetric int4 uses the tinygemm form
    instead, with a float zero point; that is another scheme.)"""
    _torchao()
    from torchao.quantization.quant_primitives import (
        MappingType,
        _fake_quantize_affine,
        choose_qparams_affine,
    )

    w = torch.randn(out, groups * group_size, generator=torch.Generator().manual_seed(seed))
    block = (1, group_size)
    eps = torch.finfo(torch.float32).eps
    scale, zp = choose_qparams_affine(
        w, MappingType.ASYMMETRIC, block, torch.int8, -8, 7, eps, torch.float32, torch.int32
    )
    theirs = _fake_quantize_affine(w, block, scale, zp, torch.int8, -8, 7)
    scheme = QuantScheme(bits=4, symmetric=False, granularity="per_group", group_size=group_size)
    q = Quantizer(scheme, shape=tuple(w.shape))
    with q.compute_encodings():
        q(w)
    torch.testing.assert_close(q.scale, scale.reshape(out, groups), rtol=1e-6, atol=0)
    assert (q.zero_point - zp.reshape(out, groups)).abs().max() <= 1
    ours = q(w)
    step = q.quantize(w).broadcast_encoding()[0]
    diff = (ours - theirs).abs()
    assert (diff <= step * 1.001).all()
    assert int((diff > 1e-6 * (1 + w.abs())).sum()) <= max(1, w.numel() // 100)


@settings(max_examples=30, deadline=None)
@given(out=st.integers(1, 8), group_size=st.sampled_from([16, 32]), seed=st.integers(0, 2**16))
def test_symmetric_int4_per_group_on_torchaos_scales(out, group_size, seed):
    """torchao's symmetric scale is ``amax / 7.5`` (``(qmax - qmin) / 2``), ours ``amax / 7``
    (no clipping of the positive end): given torchao's scales, the fake quant agrees."""
    config_type, fq_type, mapping, choose = _torchao()
    w = torch.randn(out, 2 * group_size, generator=torch.Generator().manual_seed(seed))
    theirs = fq_type(config_type(torch.int4, group_size=group_size, is_symmetric=True))(w)
    scale, zp = choose(
        w,
        mapping.SYMMETRIC,
        (1, group_size),
        torch.int8,
        -8,
        7,
        torch.finfo(torch.float32).eps,
        torch.float32,
        torch.int32,
    )
    scheme = QuantScheme(bits=4, granularity="per_group", group_size=group_size)
    ours = fake_quantize(w, scale.reshape(out, 2).float(), zp.reshape(out, 2).int(), scheme)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(tokens=st.integers(1, 16), dim=st.integers(2, 64), seed=st.integers(0, 2**16))
def test_dynamic_per_token_int8_agrees_with_torchao(tokens, dim, seed):
    config_type, fq_type, _, _ = _torchao()
    x = torch.randn(tokens, dim, generator=torch.Generator().manual_seed(seed)) * 3
    theirs = fq_type(config_type(torch.int8, "per_token", is_symmetric=False))(x)
    scheme = QuantScheme(symmetric=False, granularity="per_token", dynamic=True)
    q = Quantizer(scheme)
    ours = q(x)
    step = q.quantize(x).broadcast_encoding()[0]
    assert ((ours - theirs).abs() <= step * 1.01).all()
    assert ((ours - theirs).abs() <= 1e-5 * (1 + x.abs())).float().mean() >= 0.9
