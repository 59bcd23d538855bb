"""`QTensor`: integer codes with the encoding that gives them meaning."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qat_lightning.quant.functional import channel_view, expand_encoding
from qat_lightning.quant.scheme import QuantScheme


@dataclass
class QTensor:
    """Integer ``codes`` and their encoding: ``value = (codes - zero_point) * scale``.

    ``scale`` and ``zero_point`` are 0-d for per-tensor schemes and 1-d (one per channel along
    ``axis``, by default ``scheme.axis``) for per-channel ones. Per group they have shape
    ``(*codes.shape[:-1], codes.shape[-1] // group_size)`` (groups of ``group_size`` along
    the last axis; ``group_size`` is taken from the scheme); per token ``codes.shape[:-1]``.
    ``scheme`` is ``None`` for an int32 accumulator, which has no bit width of its own.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    scheme: QuantScheme | None
    axis: int | None = None
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.codes.is_floating_point():
            raise TypeError(f"QTensor codes must be an integer tensor, got {self.codes.dtype}")
        if self.group_size is None and self.scheme is not None and self.scheme.per_group:
            self.group_size = self.scheme.group_size
        if self.group_size is not None:
            want = (*self.codes.shape[:-1], self.codes.shape[-1] // self.group_size)
            if self.codes.shape[-1] % self.group_size or tuple(self.scale.shape) != want:
                raise ValueError(
                    f"QTensor: codes of shape {tuple(self.codes.shape)} in groups of "
                    f"{self.group_size} need a scale of shape {want}, got "
                    f"{tuple(self.scale.shape)}"
                )

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def broadcast_encoding(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point shaped to broadcast against ``codes``."""
        scale, zp = self.scale, self.zero_point
        if self.scheme is not None and self.scheme.granularity in ("per_group", "per_token"):
            ndim = self.codes.dim()
            return expand_encoding(scale, ndim, self.scheme), expand_encoding(zp, ndim, self.scheme)
        if scale.dim() > 0 and scale.numel() > 0:
            axis = self.axis if self.axis is not None else self.scheme.axis
            axis %= self.codes.dim()
            return channel_view(scale, self.codes.dim(), axis), channel_view(
                zp, self.codes.dim(), axis
            )
        return scale, zp

    def centered(self, dtype: torch.dtype = torch.int32) -> torch.Tensor:
        """``codes - zero_point`` as integers (the form integer arithmetic works on)."""
        _, zp = self.broadcast_encoding()
        return self.codes.to(dtype) - zp.round().to(dtype)

    def centered_float(self) -> torch.Tensor:
        """``codes - zero_point`` in float32: exact for codes of a scheme (16 bits at most),
        not for an int32 accumulator (use `centered`)."""
        if self.scheme is None or self.scheme.bits > 16:
            raise ValueError("QTensor.centered_float: needs codes of at most 16 bits")
        _, zp = self.broadcast_encoding()
        return self.codes.float() - zp.float()

    def dequantize(self) -> torch.Tensor:
        """The float32 values the codes stand for."""
        scale, _ = self.broadcast_encoding()
        if self.scheme is not None and self.scheme.bits <= 16:
            return self.centered_float() * scale.float()
        return self.centered(torch.int64).float() * scale.float()
