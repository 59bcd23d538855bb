"""`QuantConfig`: which scheme each layer of a model gets, as one frozen, validated value.

Names are the qualified module names of ``model.named_modules()`` (``"layer1.0.conv1"``).
Patterns are `fnmatch` globs (``"fc"``, ``"layer4.*"``, ``"*.downsample.*"``); a pattern that
matches a container also matches everything inside it, so ``skip=["layer4"]`` skips the block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from qat_lightning.quant import QuantScheme

# The defaults of the design, one source of truth for every role: activations 8-bit affine
# unsigned with moving min/max ranges, weights 8-bit symmetric per-channel min/max. A dict given
# for a role is applied field by field over that role's default.
DEFAULT_INPUTS = QuantScheme(bits=8, symmetric=False, signed=False, observer="moving_minmax")
DEFAULT_PARAMS = QuantScheme(bits=8, symmetric=True, granularity="per_channel")
ROLE_DEFAULTS = {"inputs": DEFAULT_INPUTS, "params": DEFAULT_PARAMS}
OVERRIDE_KEYS = ("inputs", "params")


def matches(pattern: str, name: str) -> bool:
    """True if ``pattern`` matches ``name`` or one of its parents (``"a.b"`` for ``"a.b.c"``)."""
    parts = name.split(".")
    return any(fnmatchcase(".".join(parts[:i]), pattern) for i in range(len(parts), 0, -1))


def _plain(value: Any) -> Any:
    """Mappings and sequences as plain dicts / lists (e.g. from an OmegaConf DictConfig)."""
    if isinstance(value, QuantScheme) or value is None:
        return value
    if isinstance(value, Mapping) or hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    return value


def merge_scheme(
    base: QuantScheme | None, change: QuantScheme | Mapping[str, Any] | None, role: str
) -> QuantScheme | None:
    """``change`` applied field by field over ``base`` (a scheme or None replaces it).

    Over a ``base`` of None (that role float), a dict applies over the role's default
    (`ROLE_DEFAULTS`), so ``{"bits": 4}`` always means "the default scheme, at 4 bits".
    """
    if change is None or isinstance(change, QuantScheme):
        return change
    if not (isinstance(change, Mapping) or hasattr(change, "items")):
        raise ValueError(
            f"{role}={change!r} is invalid: allowed a QuantScheme, a dict of its fields or None"
        )
    fields = (base or ROLE_DEFAULTS[role]).to_dict()
    change = _plain(change)
    if change.get("granularity", fields["granularity"]) != "per_group":
        change.setdefault("group_size", None)  # a group size belongs to per_group only
    if change.get("dynamic", fields["dynamic"]):
        change.setdefault("observer", "minmax")  # a dynamic scheme observes nothing
    fields.update(change)
    _check_role(fields.get("dynamic"), fields.get("granularity"), role)
    return check_role(QuantScheme.from_any(fields), role)


def check_role(scheme: QuantScheme | None, role: str) -> QuantScheme | None:
    """``scheme`` if it suits ``role``: dynamic and per-token schemes are for activations
    (``inputs``), per-group schemes for weights (``params``).

    Raises:
        ValueError: naming the role, the field and what the role allows.
    """
    if scheme is not None:
        _check_role(scheme.dynamic, scheme.granularity, role)
    return scheme


def _check_role(dynamic: Any, granularity: Any, role: str) -> None:
    if role == "params" and dynamic is True:
        raise ValueError(
            "params: dynamic=True is for activations (a weight's range is known before it is "
            "used); allowed dynamic=False for weights"
        )
    if role == "inputs" and granularity == "per_group":
        raise ValueError(
            "inputs: granularity='per_group' is for weights; allowed for activations "
            "'per_tensor', 'per_channel', or 'per_token' with dynamic=True"
        )


def resolve_scheme(role: str, value: Any) -> QuantScheme | None:
    """The scheme of ``role`` (``"inputs"`` or ``"params"``): a `QuantScheme` as given, a dict
    merged field by field over the role's default, None for float."""
    return check_role(merge_scheme(ROLE_DEFAULTS[role], _plain(value), role), role)


@dataclass(frozen=True)
class QuantConfig:
    """What `quantize_model` does to a model.

    Args:
        inputs: the activation scheme (every quantized module's inputs and output): a
            `QuantScheme`, or a dict of its fields applied over the default; ``None`` keeps
            activations float (weight-only quantization). Default (`DEFAULT_INPUTS`): 8-bit
            affine unsigned, moving min/max.
        params: the weight scheme, likewise; ``None`` keeps weights float (activation-only).
            Default (`DEFAULT_PARAMS`): 8-bit symmetric per-channel, min/max. ``inputs`` and
            ``params`` both None is an error unless an override quantizes something.
        overrides: glob on module names -> ``{"inputs": {...}, "params": {...}}``, each dict
            merged field by field over the scheme the module has without it (over the role's
            default where that is None); a value ``None`` makes that side float. When several
            patterns match a module they apply in the mapping's order, later ones winning.
        skip: globs of module names left float (the match is reported as ``skipped``).
        fuse: fuse Conv/Linear + BatchNorm (+ ReLU) into one quantized module.

    Example:
        >>> QuantConfig.from_any({"params": {"bits": 4}, "skip": ["fc"],
        ...                       "overrides": {"layer4.*": {"params": {"bits": 8}}}})
    """

    inputs: QuantScheme | None = DEFAULT_INPUTS
    params: QuantScheme | None = DEFAULT_PARAMS
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    skip: tuple[str, ...] = ()
    fuse: bool = True

    def __post_init__(self) -> None:
        for side in OVERRIDE_KEYS:
            try:
                scheme = resolve_scheme(side, getattr(self, side))
            except (TypeError, ValueError) as err:
                raise ValueError(f"QuantConfig.{side}: {err}") from err
            object.__setattr__(self, side, scheme)
        skip = _plain(self.skip)
        skip = [skip] if isinstance(skip, str) else skip
        if not isinstance(skip, Iterable) or not all(isinstance(p, str) for p in skip):
            raise ValueError(f"QuantConfig.skip={self.skip!r} is invalid: allowed a list of globs")
        object.__setattr__(self, "skip", tuple(skip))
        if not isinstance(self.fuse, bool):
            raise ValueError(f"QuantConfig.fuse={self.fuse!r} is invalid: allowed True or False")
        object.__setattr__(self, "overrides", self._checked_overrides(_plain(self.overrides)))
        something = any(v is not None for c in self.overrides.values() for v in c.values())
        if self.inputs is None and self.params is None and not something:
            raise ValueError(
                "QuantConfig(inputs=None, params=None) is invalid: it quantizes nothing; "
                "allowed a scheme for at least one of them (or an override that sets one)"
            )

    def _checked_overrides(self, overrides: Any) -> dict[str, dict[str, Any]]:
        if not isinstance(overrides, dict):
            raise ValueError(
                f"QuantConfig.overrides={overrides!r} is invalid: allowed a dict of "
                "glob -> {'inputs': {...}, 'params': {...}}"
            )
        checked: dict[str, dict[str, Any]] = {}
        for pattern, change in overrides.items():
            where = f"QuantConfig.overrides[{pattern!r}]"
            if not isinstance(pattern, str):
                raise ValueError(f"{where}: the key must be a glob string")
            if not isinstance(change, dict):
                raise ValueError(
                    f"{where}={change!r} is invalid: allowed a dict with keys {OVERRIDE_KEYS}"
                )
            unknown = sorted(set(change) - set(OVERRIDE_KEYS))
            if unknown:
                raise ValueError(
                    f"{where} has unknown key {unknown[0]!r}: allowed {list(OVERRIDE_KEYS)}"
                )
            for side, value in change.items():
                if value is not None and not isinstance(value, (dict, QuantScheme)):
                    raise ValueError(
                        f"{where}[{side!r}]={value!r} is invalid: allowed a dict of "
                        "QuantScheme fields, a QuantScheme or None"
                    )
                try:  # validate now, against the defaults, so a typo fails before any surgery
                    merge_scheme(getattr(self, side), value, side)
                except ValueError as err:
                    raise ValueError(f"{where}[{side!r}]: {err}") from err
            checked[pattern] = dict(change)
        return checked

    @classmethod
    def from_any(
        cls, value: QuantConfig | Mapping[str, Any] | None = None, **changes: Any
    ) -> QuantConfig:
        """A config from a config, a dict of its fields (e.g. Hydra's) or None (defaults),
        with ``changes`` applied on top."""
        if value is None:
            value = {}
        if isinstance(value, QuantConfig):
            return dataclasses.replace(value, **changes) if changes else value
        if not (isinstance(value, Mapping) or hasattr(value, "items")):
            raise TypeError(f"expected a QuantConfig or a dict, got {type(value).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        merged = {**dict(value.items()), **changes}
        unknown = sorted(set(merged) - fields)
        if unknown:
            raise ValueError(f"QuantConfig has no field {unknown[0]!r}: allowed {sorted(fields)}")
        return cls(**merged)

    # -- per-name lookups ------------------------------------------------------------------
    def skip_pattern(self, name: str) -> str | None:
        """The first skip pattern matching ``name``, or None."""
        return next((p for p in self.skip if matches(p, name)), None)

    def schemes_for(self, name: str) -> tuple[QuantScheme | None, QuantScheme | None]:
        """(inputs, params) schemes of the module called ``name``, overrides applied."""
        inputs, params = self.inputs, self.params
        for pattern, change in self.overrides.items():
            if matches(pattern, name):
                if "inputs" in change:
                    inputs = merge_scheme(inputs, change["inputs"], "inputs")
                if "params" in change:
                    params = merge_scheme(params, change["params"], "params")
        return inputs, params

    def unmatched_patterns(self, names: Iterable[str]) -> list[str]:
        """Override and skip patterns that match none of ``names``."""
        names = list(names)
        patterns = [*self.overrides, *self.skip]
        return [p for p in patterns if not any(matches(p, n) for n in names)]
