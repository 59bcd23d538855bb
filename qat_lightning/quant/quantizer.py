"""`Quantizer`: one tensor's observer, encoding and switches, as an `nn.Module`.

All of it is state_dict state: scale and zero point (buffers, or parameters when learnable),
the observer's statistics, and the two switches. A checkpoint therefore resumes exactly, and
`deepcopy` / `.to()` / DDP carry everything. A dtype cast of the model (`.half()`, `.double()`)
moves this state but keeps its dtypes (float32 scale, int32 zero point), so it changes no code.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from qat_lightning.quant.functional import (
    EPS,
    code_dtype,
    encodings_from_range,
    expand_encoding,
    fake_quantize,
)
from qat_lightning.quant.grouped import dynamic_encoding, group_shape
from qat_lightning.quant.host_float32 import encoding_from_host_range
from qat_lightning.quant.observers import ChannelCountError, make_observer
from qat_lightning.quant.qtensor import QTensor
from qat_lightning.quant.scheme import QuantScheme


class Quantizer(nn.Module):
    """Observes a tensor, holds its encoding, and fake-quantizes it.

    Misuse is reported, not absorbed: fake quantization (or `quantize`) before any
    calibration warns once; `compute_encodings` on all-zero data warns; a per-channel tensor
    with another channel count than before, or an encoding that would resize a learnable
    scale, raises. Messages name the quantizer by its ``label`` (set by `label_quantizers`)
    and its scheme.

    Args:
        scheme: what to do.
        num_channels: channels along ``scheme.axis`` for a per-channel scheme. Required for a
            learnable per-channel scheme (its scale is a parameter the optimizer must see);
            otherwise sized on the first observation.
        shape: the shape of the tensor a per-group scheme quantizes (its scale then has shape
            ``(*shape[:-1], shape[-1] // group_size)``; `GroupSizeError` if the group size
            does not divide ``shape[-1]``). Required for a learnable per-group scheme.

    A dynamic scheme has no observer and nothing to calibrate: each tensor's own min/max
    gives its encoding at run time (``initialized`` is 1 from the start, and the
    ``scale``/``zero_point`` buffers are unused placeholders).

    Example:
        >>> q = Quantizer(QuantScheme(bits=8))
        >>> with q.compute_encodings():
        ...     _ = q(torch.randn(64))
        >>> y = q(torch.randn(64))          # fake-quantized
        >>> codes = q.quantize(torch.randn(64)).codes  # int8
    """

    def __init__(
        self,
        scheme: QuantScheme,
        num_channels: int | None = None,
        shape: tuple[int, ...] | torch.Size | None = None,
    ) -> None:
        super().__init__()
        if scheme.per_channel and scheme.learnable and not num_channels:
            raise ValueError(
                "Quantizer: a learnable per_channel scheme needs num_channels, so its scale "
                "parameter exists before the optimizer is built"
            )
        if scheme.per_group and scheme.learnable and shape is None:
            raise ValueError(
                "Quantizer: a learnable per_group scheme needs shape (the tensor's), so its "
                "scale parameter exists before the optimizer is built"
            )
        self.scheme = scheme
        self.observer = make_observer(scheme)
        if scheme.per_group:
            shape = group_shape(shape, scheme.group_size) if shape is not None else (0,)
        else:
            shape = (num_channels or 0,) if scheme.per_channel else ()
        scale = torch.ones(shape)
        zero_point = torch.zeros(shape, dtype=torch.float32 if scheme.learnable else torch.int32)
        if scheme.learnable:
            self.scale = nn.Parameter(scale)
            self.zero_point = nn.Parameter(zero_point, requires_grad=not scheme.symmetric)
        else:
            self.register_buffer("scale", scale)
            self.register_buffer("zero_point", zero_point)
        self.register_buffer("observer_enabled", torch.ones((), dtype=torch.uint8))
        self.register_buffer("fake_quant_enabled", torch.ones((), dtype=torch.uint8))
        # 1 once the encoding was set from data (or is fixed, as for fixed point).
        self.register_buffer("initialized", torch.zeros((), dtype=torch.uint8))
        self._calibrating = False  # inside compute_encodings(): observe even in eval mode
        self._init_checked = False  # seen initialized, or warned that it is not (once)
        # The (min, max) of the tensor `observe` just saw, where the observer read it.
        self._observed_range: tuple[float, float] | None = None
        # The (scale, zero point) `observe` just set, as Python values, where it computed
        # them on the host (per tensor on the CPU): the fake quant then reads no buffer.
        self._host_encoding: tuple[float, int] | None = None
        # Quantizers made during this one's compute_encodings() (a rewrite's fallback gives
        # back an input quantizer pruned against it), each with whether it calibrates on its
        # own data (its source left the model) or, on exit, takes this one's final encoding
        # (the grid its module was fed on).
        self._followers: list[tuple[Quantizer, bool]] = []
        # What messages call this quantizer: its qualified name once `label_quantizers` ran.
        self.label: str | None = None
        if scheme.representation == "fixed_point":
            self._set_encoding(
                *encodings_from_range(torch.zeros(shape), torch.zeros(shape), scheme)
            )
            self.initialized.fill_(1)
        if scheme.dynamic:
            self.initialized.fill_(1)  # nothing to calibrate

    # -- switches ---------------------------------------------------------------------------
    def enable_observer(self, enabled: bool = True) -> Quantizer:
        self.observer_enabled.fill_(int(enabled))
        return self

    def enable_fake_quant(self, enabled: bool = True) -> Quantizer:
        self.fake_quant_enabled.fill_(int(enabled))
        return self

    @property
    def is_initialized(self) -> bool:
        return bool(self.initialized)

    # -- encodings --------------------------------------------------------------------------
    @torch.no_grad()
    def update_encodings(self) -> None:
        """Set scale and zero point from what the observer has seen so far.

        Does nothing for fixed point (its scale is fixed), for a dynamic scheme (its scale
        is each tensor's own) or before any observation.
        """
        self._update_encodings(has_data=False)

    def _update_encodings(self, has_data: bool) -> None:
        """`update_encodings`; ``has_data``: the observer just said it has (no sync to ask)."""
        if self.scheme.representation == "fixed_point" or self.scheme.dynamic:
            return
        if not (has_data or self.observer.has_data):
            return
        scale, zero_point = encodings_from_range(*self.observer.calculate_range(), self.scheme)
        self._set_encoding(scale, zero_point)
        self.initialized.fill_(1)

    def _set_host_encoding(self) -> bool:
        """`update_encodings` right after an observation the observer merged on the host
        (`Observer.host_range`, valid for that one call only), for an integer scheme whose
        encoding buffers are plain CPU float32 / int32 scalars: the encoding of that range
        computed on the host (`encoding_from_host_range`, bit for bit the tensor form),
        written to the buffers and kept in ``_host_encoding``. False otherwise."""
        host = self.observer.host_range
        scale, zero_point = self.scale, self.zero_point
        if (
            host is None
            or self.scheme.representation != "int"
            or self.scheme.dynamic
            or self.scheme.learnable
            or scale.shape != ()
            or scale.device.type != "cpu"
            or scale.dtype != torch.float32
            or zero_point.dtype != torch.int32
        ):
            return False
        s, z = encoding_from_host_range(*host, self.scheme)
        scale.fill_(s)
        zero_point.fill_(z)
        self.initialized.fill_(1)
        self._host_encoding = (s, z)
        return True

    def _set_encoding(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        for name, value in (("scale", scale), ("zero_point", zero_point)):
            current = getattr(self, name)
            value = value.to(device=current.device, dtype=current.dtype)
            if current.shape != value.shape:
                if self.scheme.learnable:  # the optimizer holds this parameter: never resize
                    raise ValueError(
                        f"{self.describe()}: its learnable {name} has shape "
                        f"{tuple(current.shape)} and cannot take an encoding of shape "
                        f"{tuple(value.shape)}: num_channels (or, per group, shape) must "
                        "match the tensor it quantizes"
                    )
                current.data = torch.empty_like(value)
            current.data.copy_(value)

    @property
    def saw_only_zeros(self) -> bool:
        """Calibrated on data whose range is ``[0, 0]`` everywhere (its scale is the smallest
        positive one, which rounds any real input to the ends of the code range)."""
        if self.scheme.representation == "fixed_point" or self.scheme.dynamic:
            return False
        if not self.observer.has_data:
            return False
        mn, mx = self.observer.calculate_range()
        return bool((mn == 0).all() and (mx == 0).all())

    def describe(self) -> str:
        """How messages name this quantizer: its label (qualified name) and its scheme."""
        where = f" {self.label!r}" if self.label else ""
        return f"Quantizer{where} ({self.extra_repr()})"

    @contextmanager
    def observing(self) -> Iterator[Quantizer]:
        """Inside the block the observer (when enabled) observes in eval mode too, as in
        training mode; nothing is reset nor fixed. Calibration runs a model this way, so that
        a part the user keeps in eval mode (a frozen backbone) is calibrated like the rest."""
        was = self._calibrating
        self._calibrating = True
        try:
            yield self
        finally:
            self._calibrating = was

    @contextmanager
    def compute_encodings(self) -> Iterator[Quantizer]:
        """Observe (without fake quant) inside the block; fix the encodings on exit.

        The AIMET idiom: run calibration data through inside, and leave with frozen encodings
        and fake quantization on.
        """
        self.observer.reset()
        self.enable_observer(True).enable_fake_quant(False)
        self._calibrating = True
        try:
            yield self
        finally:
            self._calibrating = False
            self.update_encodings()
            self.enable_observer(False).enable_fake_quant(True)
            for follower, on_its_own in self._followers:
                follower._calibrating = False
                if on_its_own:
                    follower.update_encodings()
                else:
                    follower.load_state_dict(self.state_dict())
                follower.enable_observer(False).enable_fake_quant(True)
            self._followers.clear()
        if self.saw_only_zeros:
            warn_only_zeros([("", self)])

    # -- the three views of a tensor ---------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake quantization: observe (if enabled), then quantize-dequantize (if enabled).

        Observers run in training mode (or inside `compute_encodings`) only: evaluating or
        serving a model never moves its encodings.
        """
        if self.scheme.dynamic:
            if not bool(self.fake_quant_enabled):
                return x
            return fake_quantize(x, *dynamic_encoding(x, self.scheme), self.scheme)
        if not self.observe(x):
            return x
        if not self._init_checked:
            self._check_initialized()
        if self.scheme.learnable:
            with torch.no_grad():  # LSQ may push a step size through zero; keep it positive
                self.scale.clamp_(min=EPS)
        return fake_quantize(
            x,
            self.scale,
            self.zero_point,
            self.scheme,
            batch_range=self._observed_range,
            encoding=self._host_encoding,
        )

    def observe(self, x: torch.Tensor) -> bool:
        """The first half of ``forward`` for a static scheme: observe ``x`` (in training mode or
        inside `compute_encodings`, with the observer on) and update the encoding (unless it is
        learnable, or fake quantization is off). Returns whether fake quantization is on.
        Layers that fake-quantize only part of what they observe (`QuantEmbedding`'s rows)
        call this, then fake-quantize with ``scale`` and ``zero_point`` themselves."""
        # Each flag is read once: on a GPU every read is a device-to-host sync.
        fake_quant_enabled = bool(self.fake_quant_enabled)
        self._observed_range = self._host_encoding = None
        if (self.training or self._calibrating) and self.observer_enabled:
            try:
                has_data = self.observer.observe(x)
            except ChannelCountError as error:
                raise ChannelCountError(f"{self.describe()}: {error}") from error
            self._observed_range = self.observer.batch_range
            encode = fake_quant_enabled and not self.scheme.learnable
            if encode and not self._set_host_encoding():
                self._update_encodings(has_data)
        return fake_quant_enabled

    def _check_initialized(self) -> None:
        """Warn (once) if this quantizer quantizes before it has an encoding. Read once per
        quantizer, not per forward: on a GPU each read is a device-to-host sync."""
        self._init_checked = True
        if self.initialized:
            return
        warnings.warn(
            f"{self.describe()} quantizes before any calibration, with scale "
            f"{self.scale.detach().flatten()[:1].tolist()} and zero point 0: calibrate it "
            "first (`with quantizer.compute_encodings(): ...`) or train it with the observer on",
            stacklevel=3,
        )

    @torch.no_grad()
    def quantize(self, x: torch.Tensor) -> QTensor:
        """Integer codes of ``x`` under the current encoding (bit-exact with `forward`)."""
        if not self._init_checked:
            self._check_initialized()
        scale, zero_point = self.encoding(x if self.scheme.dynamic else None)
        s, z = scale, zero_point
        if self.scheme.multi_scale and scale.dim() > 0:
            s = expand_encoding(scale, x.dim(), self.scheme)
            z = expand_encoding(zero_point, x.dim(), self.scheme)
        codes = torch.clamp(
            torch.round(x.float() * (1.0 / s)) + z, self.scheme.qmin, self.scheme.qmax
        )
        return QTensor(codes.to(code_dtype(self.scheme)), scale, zero_point, self.scheme)

    def dequantize(self, q: QTensor) -> torch.Tensor:
        """Float values of codes (``(q - zero_point) * scale``)."""
        return q.dequantize()

    def encoding(self, x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Detached float32 scale (clamped positive, as in `forward`) and int32 zero point.

        A dynamic scheme's encoding is that of a tensor: pass it as ``x`` (without ``x`` the
        placeholders, scale 1 and zero point 0, are returned).
        """
        if x is not None and self.scheme.dynamic:
            return dynamic_encoding(x, self.scheme)
        # An optimizer step may have pushed a learnable scale below zero since the last forward.
        scale = self.scale.detach().float().clamp(min=EPS)
        zero_point = self.zero_point.detach()
        if zero_point.is_floating_point():
            zero_point = zero_point.round().clamp(self.scheme.qmin, self.scheme.qmax)
        return scale, zero_point.to(torch.int32)

    # -- dtype casts and checkpoints ---------------------------------------------------------
    def _apply(self, fn, recurse=True):
        # Casting the model (`.double()`, `.half()`, Lightning's "16-true") moves this module's
        # state but keeps its dtypes: a float16 scale would move every code, and the fused
        # kernels take float32 scales and int32 zero points only.
        def same_dtype(t: torch.Tensor) -> torch.Tensor:
            applied = fn(t)
            return applied if applied.dtype == t.dtype else t.to(device=applied.device)

        return super()._apply(same_dtype, recurse)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("scale", "zero_point"):
            incoming = state_dict.get(prefix + name)
            current = getattr(self, name)
            # Buffers sized lazily take the checkpoint's shape; a learnable scale is a
            # parameter the optimizer holds, so a mismatch stays torch's size-mismatch error.
            if (
                incoming is not None
                and incoming.shape != current.shape
                and not self.scheme.learnable
            ):
                current.data = torch.empty_like(
                    incoming, dtype=current.dtype, device=current.device
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        s = self.scheme
        kind = "sym" if s.symmetric else "affine"
        rep = f"Q{s.bits - s.frac_bits}.{s.frac_bits}" if s.frac_bits is not None else "int"
        flags = ("" if s.signed else "unsigned, ") + ("learnable, " if s.learnable else "")
        if s.dynamic:
            flags += "dynamic, "
        granularity = s.granularity + (f"({s.group_size})" if s.per_group else "")
        observer = "none" if s.dynamic else s.observer
        return f"{s.bits}-bit {kind} {rep}, {flags}{granularity}, observer={observer}"


def label_quantizers(model: nn.Module) -> None:
    """Give every `Quantizer` in ``model`` its qualified name as the label its messages use."""
    for name, module in model.named_modules():
        if isinstance(module, Quantizer):
            module.label = name


def warn_only_zeros(named: Iterable[tuple[str, Quantizer]]) -> list[str]:
    """Warn once, in one line, about the quantizers calibrated on all-zero data.

    Args:
        named: ``(name, quantizer)`` pairs, e.g. ``model.named_modules()`` filtered to
            quantizers (a quantizer's own label is used where ``name`` is empty).

    Returns:
        The names warned about (empty if none).
    """
    names = [name or q.describe() for name, q in named if q.saw_only_zeros]
    if names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        warnings.warn(
            f"{len(names)} quantizer(s) calibrated on all-zero data ({shown}): their range is "
            "[0, 0] and their scale the smallest positive one; calibrate on representative "
            "data or skip these layers",
            stacklevel=2,
        )
    return names
