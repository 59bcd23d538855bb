"""The registry of float type -> quantized type, looked up by MRO.

``@register_quant_module(nn.Linear)`` on ``QuantLinear`` makes surgery swap every ``nn.Linear``.
A module whose exact type is not registered is looked up along its class's MRO: a subclass of
a registered type (torch's ``NonDynamicallyQuantizableLinear``, a user's
``class MyLinear(nn.Linear)``) gets the registered quantized type, specialised to the subclass:
``QuantLinear[MyLinear]``, a class made once per subclass with bases ``(QuantLinear, MyLinear)``,
so the quantized module is still an instance of ``MyLinear`` (and ``to_float`` returns a
``MyLinear``). The quantized family's ``forward`` then replaces the subclass's own code, which is
only right if the subclass computes what its registered base computes: a subclass that overrides
a method of its base (``forward``, ``_conv_forward``, ...; ``__init__``, ``reset_parameters`` and
``extra_repr`` excepted) is not covered, and stays float with that reason in the report, until
its own quantized type is registered. An exact registration always wins over the MRO.

A float class from an optional dependency (Hugging Face ``transformers``' ``Conv1D``) is
registered lazily, by module path and class name (`register_lazy_quant_module`): the package
never imports the dependency, and the quantized type (which must subclass the float class) is
made by a factory the first time a lookup meets that class in a module's MRO, which can only
happen once the user's code has imported it.

A specialised class is made on first use, in the process that quantizes: a whole pickled
model holding one (``torch.save(model)``) loads back only where surgery has run for that
subclass; checkpoints (``state_dict``) and the exported artifacts do not depend on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

from qat_lightning.nn.base import QuantModule

# float type -> quantized type (exact registrations)
QUANT_MODULES: dict[type[nn.Module], type[nn.Module]] = {}
# (quantized type, float subclass) -> the quantized type specialised to the subclass
_SPECIALISED: dict[tuple[type, type], type] = {}

# (module path, qualified name) of a float class -> factory of its quantized type
_LAZY: dict[tuple[str, str], Callable[[type], type]] = {}

# Methods a subclass may override and still compute what its registered base computes.
_HARMLESS_OVERRIDES = frozenset({"__init__", "reset_parameters", "extra_repr", "__repr__"})

T = TypeVar("T", bound=type)


def register_quant_module(float_type: type[nn.Module]) -> Callable[[T], T]:
    """Class decorator: ``@register_quant_module(MyLayer)`` makes surgery swap ``MyLayer`` (and
    its subclasses that keep its methods) for the decorated quantized class, which must
    implement ``from_float``.

    Example:
        >>> @register_quant_module(MyGate)
        ... class QuantMyGate(QuantModule, MyGate): ...
    """

    def decorate(cls: T) -> T:
        if not hasattr(cls, "from_float"):
            raise TypeError(f"{cls.__name__} must define from_float to be registered")
        QUANT_MODULES[float_type] = cls
        return cls

    return decorate


def register_lazy_quant_module(
    module: str, qualname: str, factory: Callable[[type[nn.Module]], type[nn.Module]]
) -> None:
    """Register a quantized type for the float class ``module.qualname`` without importing it.

    ``factory(float_class)`` returns the quantized type (a class deriving from ``float_class``
    with ``from_float``); it is called, and its result registered as `register_quant_module`
    would, the first time a lookup (`quant_type_for`) meets a class of that module path and
    name in a module's MRO. An exact registration made earlier wins.

    Example:
        >>> register_lazy_quant_module("transformers.pytorch_utils", "Conv1D", make_quant_conv1d)
    """
    if not module or not qualname or not callable(factory):
        raise ValueError(
            f"register_lazy_quant_module({module!r}, {qualname!r}, {factory!r}) is invalid: "
            "allowed a module path, a class name and a callable taking the float class"
        )
    _LAZY[(module, qualname)] = factory


def _resolve_lazy(float_type: type) -> None:
    """Register the quantized type of every lazily registered class in ``float_type``'s MRO
    that has none yet."""
    if not _LAZY:
        return
    for base in float_type.__mro__:
        factory = _LAZY.get((base.__module__, base.__qualname__))
        if factory is not None and base not in QUANT_MODULES:
            register_quant_module(base)(factory(base))


def _registered_base(float_type: type) -> type | None:
    """The first class in ``float_type``'s MRO with a registration (itself first)."""
    _resolve_lazy(float_type)
    return next((base for base in float_type.__mro__ if base in QUANT_MODULES), None)


def overridden_methods(float_type: type, base: type) -> list[str]:
    """Methods of ``base`` that ``float_type`` (a subclass) or a class between them redefines,
    other than construction and printing."""
    between = float_type.__mro__[: float_type.__mro__.index(base)]
    return sorted(
        {
            name
            for cls in between
            for name, value in vars(cls).items()
            if callable(value) and name not in _HARMLESS_OVERRIDES and hasattr(base, name)
        }
    )


def unregistered_reason(module: nn.Module) -> str | None:
    """Why ``module``, a subclass of a registered type, is not covered by it (None otherwise)."""
    base = _registered_base(type(module))
    if base is None or base is type(module):
        return None
    if isinstance(module, nn.modules.lazy.LazyModuleMixin):
        return (
            f"{type(module).__name__} is a lazy module: run one forward (which makes it a "
            f"{base.__name__}) before quantizing"
        )
    overridden = overridden_methods(type(module), base)
    if not overridden:
        return None
    return (
        f"{type(module).__name__} subclasses {base.__name__} but overrides "
        f"{', '.join(overridden)}: register a quantized type for it (register_quant_module)"
    )


def quant_type_for(module: nn.Module) -> type[nn.Module] | None:
    """The quantized type for ``module``: its exact type's registration, else that of the
    nearest registered class in its MRO specialised to its type (see the module docstring);
    None where there is none, or where the subclass overrides its base's methods
    (`unregistered_reason` says which), and for modules that are quantized already."""
    float_type = type(module)
    if isinstance(module, QuantModule):
        return None
    _resolve_lazy(float_type)
    exact = QUANT_MODULES.get(float_type)
    if exact is not None:
        return exact
    base = _registered_base(float_type)
    if base is None or unregistered_reason(module) is not None:
        return None
    return specialise(QUANT_MODULES[base], float_type)


def specialise(qtype: type, float_type: type) -> type:
    """``qtype`` (made for a base class of ``float_type``) specialised to ``float_type``: the
    class with bases ``(qtype, float_type)``, made once (see the module docstring)."""
    key = (qtype, float_type)
    if key not in _SPECIALISED:
        name = f"{qtype.__name__}[{float_type.__name__}]"
        doc = f"{qtype.__name__} for {float_type.__qualname__}."
        specialised = type(qtype)(name, (qtype, float_type), {"__doc__": doc})
        # Findable by pickle under its name here (in this process: it is made on first use).
        specialised.__module__, specialised.__qualname__ = __name__, name
        globals()[name] = _SPECIALISED[key] = specialised
    return _SPECIALISED[key]
