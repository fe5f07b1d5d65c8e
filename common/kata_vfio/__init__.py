"""Shared core of kata-vfio: the PCI/sysfs model and the device manifest.

Imported by the host wrapper, the host tools and the guest hook alike, so it
uses the standard library only.

The lean-import rule (stated here once): the guest hook and ``kata-vfio create`` / the
shim's ``start`` run once per container, and every passthrough verb once per runtime
call, so the modules on those paths import at module level none of typing,
dataclasses, pathlib, re, json, enum, inspect, copy, contextlib, collections, functools,
tempfile (each costs a good part of a bare interpreter start), nor the heavy libraries
(structlog, jsonschema, tomllib, tomlkit, pyroute2, psutil). Such a module writes
``TYPE_CHECKING = False`` (not ``typing.TYPE_CHECKING``) and imports type-only names
under ``if TYPE_CHECKING:``, from the stub `kata_vfio.types` (Protocols, aliases) which
has no run-time module; value types are `value` classes (below). ruff's TID253
(pyproject.toml) and tests/project/test_lean_paths.py enforce it.

Value types: `value`, the one way kata-vfio writes a small immutable record.

    @value
    class PciIdentity:
        vendor: int
        device: int
        class_code: int = 0

        def describe(self) -> str: ...

The class becomes a tuple subclass with no instance dict (``__slots__ = ()``): one
read-only property per annotated field (an `itemgetter`, in annotation order), a
``__new__`` taking the fields positionally or by name (defaults as written), a
``Name(field=value, ...)`` repr unless the class writes its own, ``__match_args__``,
``_fields`` and ``_replace``; `as_dict` gives the fields by name. Equality, hashing and
ordering are the tuple's (field by field, in order). Methods, properties and class
methods stay as written. A class whose constructor normalises its arguments is
``@value(init=False)`` and writes its own ``__new__`` returning
``build(cls, (field, ...))``: mypy then checks calls against that ``__new__`` instead of
the fields' types. A class that compares by some fields only is ``@value(order=False)``
and writes its comparisons.

It imports nothing but the built-in `_operator`; mypy reads it through
`typing.dataclass_transform`, so the fields are checked like a frozen dataclass's.
"""

from __future__ import annotations

__version__ = "0.1.0"


TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar, dataclass_transform, overload

    _T = TypeVar("_T")

_SKIP = frozenset(("__dict__", "__weakref__", "__slots__"))


def _repr(self: tuple[Any, ...]) -> str:
    fields = ", ".join(f"{name}={field!r}" for name, field in zip(self._fields, self, strict=True))  # type: ignore[attr-defined]
    return f"{type(self).__name__}({fields})"


def _replace(self: Any, **changes: Any) -> Any:
    return type(self)(
        **{name: changes.pop(name, field) for name, field in zip(self._fields, self, strict=True)},
        **changes,
    )


def _getnewargs(self: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(self)  # copy and pickle call __new__ with the fields, not one tuple


# `__new__` of 1..16 fields, compiled with this module: a class takes the one of its
# arity under its own parameter names (CodeType.replace), so making a value class compiles
# nothing (an exec costs ~80 µs a class, on every start of the hook and of create).
def _new1(_cls, a):  # type: ignore[no-untyped-def]
    return _tuple_new(_cls, (a,))


def _new2(_cls, a, b):  # type: ignore[no-untyped-def]
    return _tuple_new(_cls, (a, b))


def _new3(_cls, a, b, c):  # type: ignore[no-untyped-def]
    return _tuple_new(_cls, (a, b, c))


def _new4(_cls, a, b, c, d):  # type: ignore[no-untyped-def]
    return _tuple_new(_cls, (a, b, c, d))


def _new5(_cls, a, b, c, d, e):  # type: ignore[no-untyped-def]
    return _tuple_new(_cls, (a, b, c, d, e))


def _new6(_cls, a, b, c, d, e, f):  # type: ignore[no-untyped-def]
    return _tuple_new(_cls, (a, b, c, d, e, f))


def _new7(_cls, a, b, c, d, e, f, g):  # type: ignore[no-untyped-def]
    return _tuple_new(_cls, (a, b, c, d, e, f, g))


def _new8(_cls, a, b, c, d, e, f, g, h):  # type: ignore[no-untyped-def]
    return _tuple_new(_cls, (a, b, c, d, e, f, g, h))


def _new9(_cls, a, b, c, d, e, f, g, h, i):  # type: ignore[no-untyped-def]
    return _tuple_new(_cls, (a, b, c, d, e, f, g, h, i))


def _new10(_cls, a, b, c, d, e, f, g, h, i, j):  # type: ignore[no-untyped-def]
    return _tuple_new(_cls, (a, b, c, d, e, f, g, h, i, j))


def _new11(_cls, a, b, c, d, e, f, g, h, i, j, k):  # type: ignore[no-untyped-def]
    return _tuple_new(_cls, (a, b, c, d, e, f, g, h, i, j, k))


def _new12(_cls, a, b, c, d, e, f, g, h, i, j, k, m):  # type: ignore[no-untyped-def]
    return _tuple_new(_cls, (a, b, c, d, e, f, g, h, i, j, k, m))


def _new13(_cls, a, b, c, d, e, f, g, h, i, j, k, m, n):  # type: ignore[no-untyped-def]
    return _tuple_new(_cls, (a, b, c, d, e, f, g, h, i, j, k, m, n))


def _new14(_cls, a, b, c, d, e, f, g, h, i, j, k, m, n, o):  # type: ignore[no-untyped-def]
    return _tuple_new(_cls, (a, b, c, d, e, f, g, h, i, j, k, m, n, o))


def _new15(_cls, a, b, c, d, e, f, g, h, i, j, k, m, n, o, p):  # type: ignore[no-untyped-def]
    return _tuple_new(_cls, (a, b, c, d, e, f, g, h, i, j, k, m, n, o, p))


def _new16(_cls, a, b, c, d, e, f, g, h, i, j, k, m, n, o, p, q):  # type: ignore[no-untyped-def]
    return _tuple_new(_cls, (a, b, c, d, e, f, g, h, i, j, k, m, n, o, p, q))


_tuple_new = tuple.__new__
_NEW = (
    None,
    _new1,
    _new2,
    _new3,
    _new4,
    _new5,
    _new6,
    _new7,
    _new8,
    _new9,
    _new10,
    _new11,
    _new12,
    _new13,
    _new14,
    _new15,
    _new16,
)
_function: Any = type(_new1)
_WRAPPERS = (classmethod, staticmethod)


def as_dict(record: object) -> dict[str, Any]:
    """A value's fields by name (shallow: nested values stay values)."""
    fields: tuple[Any, ...] = record  # type: ignore[assignment]
    return dict(zip(record._fields, fields, strict=True))  # type: ignore[attr-defined]


def _make_new(name: str, fields: tuple[str, ...], defaults: dict[str, Any]) -> Any:
    if not 0 < len(fields) < len(_NEW):
        raise TypeError(f"{name}: a value type has 1 to {len(_NEW) - 1} fields")
    template = _NEW[len(fields)]
    code = template.__code__  # type: ignore[union-attr]
    code = code.replace(
        co_varnames=("_cls", *fields, *code.co_varnames[len(fields) + 1 :]),
        co_name="__new__",
        co_qualname=f"{name}.__new__",
    )
    return _function(code, globals(), "__new__", tuple(defaults.values()) or None)


def _value(cls: type) -> type:
    from _operator import itemgetter  # a built-in module; here, not at the top: the hook

    # without a manifest makes no value class
    own = cls.__dict__
    annotations = own.get("__annotations__")
    fields = tuple(cls.__annotations__ if annotations is None else annotations)
    defaults = {}
    for field in fields:
        if field in own:
            defaults[field] = own[field]
        elif defaults:
            raise TypeError(
                f"{cls.__name__}.{field}: a field without a default after one with a default"
            )
    namespace = {k: v for k, v in own.items() if k not in _SKIP and k not in defaults}
    namespace["__slots__"] = ()
    namespace["_fields"] = namespace["__match_args__"] = fields
    for index, field in enumerate(fields):
        namespace[field] = property(itemgetter(index), doc=field)
    if "__new__" not in own:
        namespace["__new__"] = _make_new(cls.__qualname__, fields, defaults)
    namespace.setdefault("__repr__", _repr)
    namespace.setdefault("_replace", _replace)
    namespace.setdefault("__getnewargs__", _getnewargs)
    made = type(cls.__name__, (tuple,), namespace)
    for attribute in namespace.values():  # zero-argument super() and __class__ in methods
        # (type checks, not getattr with a default: a failed lookup costs a microsecond)
        function = attribute.__func__ if type(attribute) in _WRAPPERS else attribute
        if type(function) is _function and "__class__" in function.__code__.co_freevars:
            cells = function.__closure__
            cells[function.__code__.co_freevars.index("__class__")].cell_contents = made
    return made


if TYPE_CHECKING:

    @overload
    def value(cls: type[_T], /) -> type[_T]: ...
    @overload
    def value(*, init: bool = True, order: bool = True) -> Callable[[type[_T]], type[_T]]: ...
    @dataclass_transform(eq_default=True, order_default=True, frozen_default=True)
    def value(cls: Any = None, /, *, init: bool = True, order: bool = True) -> Any:
        """`@value`; `init=False`: a class with a `__new__` of its own; `order=False`: one
        that compares by its own `__eq__`/`__lt__` (not every field)."""

    def build(cls: type[_T], fields: tuple[Any, ...]) -> _T:
        """The instance of `cls` with these fields: what a value class's own `__new__`
        (one that normalises its arguments) returns."""
else:

    def value(cls: Any = None, /, *, init: bool = True, order: bool = True) -> Any:
        return _value if cls is None else _value(cls)

    build = tuple.__new__
