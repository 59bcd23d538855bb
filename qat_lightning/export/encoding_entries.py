"""The entries of ``encodings.json``: one per quantized tensor, written and read back.

Every entry has the scheme's fields (``bits``, ``symmetric``, ``signed``, ``narrow_range``,
``representation``, ``frac_bits``, ``dtype``, ``qmin``, ``qmax``), ``granularity``,
``axis``, ``dynamic`` and AIMET's ``enc_type`` (``PER_TENSOR``, ``PER_CHANNEL``,
``PER_BLOCK``), and, for a static encoding, ``scale`` and ``zero_point`` as flat lists.

- **Per block** (``granularity="per_group"``, AIMET's ``enc_type: PER_BLOCK``): a weight
  ``(rows, in)`` with one scale per ``block_size`` consecutive elements of its last axis
  (``block_axis``); ``scale`` / ``zero_point`` are the ``scale_shape = [rows, in /
  block_size]`` values flattened row by row (AIMET 1.0.0 writes the same flat list with
  ``block_size``); ``group_size`` repeats ``block_size`` in our own terms.
- **Dynamic** (``dynamic: true``, ``granularity`` ``per_tensor`` or ``per_token``): the
  encoding is computed from each tensor at run time, so there is no ``scale`` and no
  ``zero_point``; ``enc_type`` is ``PER_TENSOR`` or ``PER_TOKEN``.

`apply_entry` gives a fresh QAT quantizer the saved encoding, checking that the entry fits
it (dynamic against dynamic, the number of scales); `ExportError` names the tensor where
it does not.
"""

from __future__ import annotations

from typing import Any

import torch

from qat_lightning.export._files import ExportError
from qat_lightning.export.qdq import onnx_container
from qat_lightning.quant import Quantizer, QuantScheme

_BIAS_FIELDS = {
    "bits": 32,
    "symmetric": True,
    "signed": True,
    "narrow_range": False,
    "representation": "int",
    "frac_bits": None,
    "dtype": "int32",
    "qmin": -(2**31),
    "qmax": 2**31 - 1,
}


def _scheme_fields(scheme: QuantScheme | None) -> dict[str, Any]:
    if scheme is None:  # an int32 bias at the accumulator scale
        return dict(_BIAS_FIELDS)
    fields = {k: getattr(scheme, k) for k in ("bits", "symmetric", "signed", "narrow_range")}
    fields |= {"representation": scheme.representation, "frac_bits": scheme.frac_bits}
    fields |= {"dtype": str(onnx_container(scheme)).removeprefix("torch.")}
    return fields | {"qmin": scheme.qmin, "qmax": scheme.qmax}


def entry(
    name: str,
    scheme: QuantScheme | None,
    scale: torch.Tensor | None = None,
    zero_point: torch.Tensor | None = None,
) -> dict[str, Any]:
    """The ``encodings.json`` entry of tensor ``name`` (``scheme`` None: an int32 bias).

    ``scale`` / ``zero_point`` are left out for a dynamic scheme (pass None).
    """
    fields = {"name": name, **_scheme_fields(scheme)}
    if scheme is not None and scheme.dynamic:
        granularity = scheme.granularity
        return fields | {
            "granularity": granularity,
            "enc_type": granularity.upper(),
            "axis": None,
            "dynamic": True,
        }
    shape = list(scale.shape)
    flat_scale = scale.detach().float().cpu().reshape(-1)
    flat_zp = zero_point.detach().round().to(torch.int64).cpu().reshape(-1)
    if scheme is not None and scheme.per_group:
        layout = {
            "granularity": "per_group",
            "enc_type": "PER_BLOCK",
            "axis": 0,
            "block_axis": len(shape) - 1,
            "block_size": scheme.group_size,
            "group_size": scheme.group_size,
            "scale_shape": shape,
        }
    else:
        per_channel = scheme is None or (scheme.per_channel and flat_scale.numel() > 0)
        layout = {
            "granularity": "per_channel" if per_channel else "per_tensor",
            "enc_type": "PER_CHANNEL" if per_channel else "PER_TENSOR",
            "axis": (0 if scheme is None else scheme.axis) if per_channel else None,
        }
    return (
        fields
        | layout
        | {
            "dynamic": False,
            "scale": flat_scale.tolist(),
            "zero_point": flat_zp.tolist(),
        }
    )


def quantizer_entry(name: str, quantizer: Quantizer) -> dict[str, Any]:
    """The entry of a (frozen) quantizer's encoding."""
    if quantizer.scheme.dynamic:
        return entry(name, quantizer.scheme)
    return entry(name, quantizer.scheme, *quantizer.encoding())


def apply_entry(quantizer: Quantizer | None, saved: dict[str, Any] | None) -> None:
    """Give a (fresh) QAT quantizer the saved encoding, or switch it off if it had none.

    Raises:
        ExportError: the entry is dynamic and the quantizer is not (or the other way), or
            its number of scales does not fit the quantizer's (names the tensor).
    """
    if quantizer is None:
        return
    if saved is None:
        quantizer.enable_fake_quant(False).enable_observer(False)
        return
    name = saved.get("name", "?")
    if bool(saved.get("dynamic", False)) != quantizer.scheme.dynamic:
        raise ExportError(
            f"load_quantized: tensor {name!r} was saved with dynamic="
            f"{bool(saved.get('dynamic', False))} but this model's quantizer has dynamic="
            f"{quantizer.scheme.dynamic}; allowed the config the artifact was saved with"
        )
    if quantizer.scheme.dynamic:  # nothing to set: the encoding is each tensor's own
        quantizer.enable_fake_quant(True).enable_observer(False)
        return
    values = len(saved["scale"])
    if quantizer.scheme.per_group:
        shape = tuple(saved.get("scale_shape", quantizer.scale.shape))
    elif quantizer.scheme.per_channel:
        shape = (values,)
    else:
        shape = tuple(quantizer.scale.shape)
    if torch.Size(shape).numel() != values:
        raise ExportError(
            f"load_quantized: tensor {name!r} has {values} saved scale(s), this model's "
            f"quantizer ({quantizer.scheme.granularity}) takes shape {tuple(shape)}; allowed "
            "the architecture and config the artifact was saved with"
        )
    scale = torch.tensor(saved["scale"], dtype=torch.float32).reshape(shape)
    zero_point = torch.tensor(saved["zero_point"], dtype=torch.int32).reshape(shape)
    quantizer._set_encoding(scale, zero_point)
    quantizer.initialized.fill_(1)
    quantizer.enable_fake_quant(True).enable_observer(False)
