"""The dynamic encoding ONNX computes in the graph (``ReduceMin``/``ReduceMax`` and our own
formula) is `dynamic_encoding`'s, and its codes are `Quantizer.quantize`'s, bit for bit in
onnxruntime, for any float32 input (infinities, NaNs, tiny and huge values included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from export_helpers import ort_session
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

from qat_lightning.export import export_onnx
from qat_lightning.export.onnx_dynamic import onnx_dynamic_codes, onnx_dynamic_encoding
from qat_lightning.quant import Quantizer, QuantScheme
from qat_lightning.quant.grouped import dynamic_encoding

SCHEMES = {
    "token_affine_s8": QuantScheme(
        bits=8, symmetric=False, signed=True, granularity="per_token", dynamic=True
    ),
    "token_sym_s8_narrow": QuantScheme(
        bits=8, signed=True, narrow_range=True, granularity="per_token", dynamic=True
    ),
    "tensor_affine_u8": QuantScheme(bits=8, symmetric=False, signed=False, dynamic=True),
    "tensor_sym_s4": QuantScheme(bits=4, signed=True, dynamic=True),
}
FLOATS = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)
SCALED = st.sampled_from([1e-30, 1e-3, 1.0, 1e3, 1e30])


def _inputs(rows: int = 5, width: int = 24):
    return hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.just(rows), st.just(width)),
                      elements=FLOATS)  # fmt: skip


class _Codes(nn.Module):
    def __init__(self, scheme: QuantScheme) -> None:
        super().__init__()
        self.scheme = scheme

    def forward(self, x: torch.Tensor):
        return onnx_dynamic_codes(x, self.scheme)


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dynamic")
    return {
        name: ort_session(export_onnx(_Codes(s), torch.randn(2, 5, 24), directory / f"{name}.onnx"))
        for name, s in SCHEMES.items()
    }


def _reference(x: torch.Tensor, scheme: QuantScheme):
    scale, zero_point = dynamic_encoding(x, scheme)
    if scheme.granularity == "per_token":
        scale, zero_point = scale.unsqueeze(-1), zero_point.unsqueeze(-1)
    return Quantizer(scheme).quantize(x).codes, scale, zero_point


@settings(max_examples=200, deadline=None)
@given(x=_inputs(), factor=SCALED, name=st.sampled_from(list(SCHEMES)))
def test_the_graph_formula_is_dynamic_encoding_in_torch(x, factor, name):
    scheme = SCHEMES[name]
    x = torch.from_numpy(x) * factor
    scale, zero_point = onnx_dynamic_encoding(x, scheme)
    codes, ref_scale, ref_zp = _reference(x, scheme)
    assert torch.equal(scale, ref_scale) and torch.equal(zero_point, ref_zp.float())
    finite = ~torch.isnan(x)
    graph_codes = onnx_dynamic_codes(x, scheme)[0]
    assert torch.equal(graph_codes[finite], codes.float()[finite])


@settings(max_examples=60, deadline=None)
@given(x=_inputs(), factor=SCALED, name=st.sampled_from(list(SCHEMES)))
def test_onnxruntime_computes_the_same_encoding_and_codes(sessions, x, factor, name):
    scheme = SCHEMES[name]
    x = (torch.from_numpy(x) * factor).float()
    session = sessions[name]
    codes, scale, zero_point = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    ref_codes, ref_scale, ref_zp = _reference(x, scheme)
    np.testing.assert_array_equal(scale, ref_scale.numpy())
    np.testing.assert_array_equal(zero_point, ref_zp.float().numpy())
    finite = ~np.isnan(x.numpy())  # a NaN has no code
    np.testing.assert_array_equal(codes[finite], ref_codes.float().numpy()[finite])
