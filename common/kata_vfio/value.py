"""`Value`: the one way kata-vfio writes a small immutable record (a value type).

    class PciIdentity(Value):
        vendor: int
        device: int
        class_code: int = 0

        def describe(self) -> str: ...

The class is a tuple subclass with no instance dict (``__slots__ = ()``), made once by
`Value`'s metaclass from the class body: one read-only property per annotated field (in
annotation order), a ``__new__`` taking the fields positionally or by name (defaults as
written), a ``Name(field=value, ...)`` repr unless the class writes its own,
``__match_args__``, ``_fields`` and ``_replace``; `as_dict` gives the fields by name.
Equality, hashing and ordering are the tuple's (field by field, in order). Methods,
properties and class methods stay as written. A class whose constructor normalises its
arguments is ``class Name(Value, init=False)`` and writes its own ``__new__`` returning
``build(cls, (field, ...))``: mypy then checks calls against that ``__new__`` instead of
the fields' types. A class that orders by some fields only is
``class Name(Value, order=False)``: it gets none of the tuple's ``<``, ``<=``, ``>``,
``>=`` and writes its own (``functools.total_ordering`` fills in the rest). A class that
writes its own ``__eq__`` gets the ``!=`` that negates it, not the tuple's.

A module of its own, not the package's `__init__`: the hook with no manifest makes no value
class and so never loads it. It imports nothing and makes each class once (a decorator
would make it twice: the class statement's class, then the tuple subclass), because the
hook and ``create`` make these classes on every start. mypy reads it through
`typing.dataclass_transform`, so the fields are checked like a frozen dataclass's.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TypeVar, dataclass_transform

    _T = TypeVar("_T")

_ORDERING = ("__lt__", "__le__", "__gt__", "__ge__")


# A field's property reads `self[index]` through a function made from `_get0` with the
# index as its constant, once per index; a class's `__new__` is the template of its arity
# below under the class's own parameter names. So making a value class compiles nothing and
# imports nothing (an exec costs ~80 µs a class, `_operator`'s itemgetter ~70 µs on its
# first import: on every start of the hook and of create).
def _get0(self):  # type: ignore[no-untyped-def]
    return self[0]


_getters = [_get0]


def _getter(index: int) -> Any:
    while len(_getters) <= index:
        code = _get0.__code__
        at = len(_getters)
        code = code.replace(
            co_consts=tuple(at if type(c) is int else c for c in code.co_consts),
            co_name=f"_get{at}",
            co_qualname=f"_get{at}",
        )
        _getters.append(_function(code, globals(), f"_get{at}"))
    return _getters[index]


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


_tuple_new = tuple.__new__
_function: Any = type(_get0)
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
)


def as_dict(record: object) -> dict[str, Any]:
    """A value's fields by name (shallow: nested values stay values)."""
    fields: tuple[Any, ...] = record  # type: ignore[assignment]
    return dict(zip(record._fields, fields, strict=True))  # type: ignore[attr-defined]


def _make_new(qualname: str, fields: tuple[str, ...], defaults: tuple[Any, ...]) -> Any:
    code = _NEW[len(fields)].__code__  # type: ignore[union-attr]
    code = code.replace(
        co_varnames=("_cls", *fields, *code.co_varnames[len(fields) + 1 :]),
        co_name="__new__",
        co_qualname=f"{qualname}.__new__",
    )
    return _function(code, globals(), "__new__", defaults or None)


def _repr(self: Any) -> str:
    fields = ", ".join(f"{name}={field!r}" for name, field in zip(self._fields, self, strict=True))
    return f"{type(self).__name__}({fields})"


class _Shape(type):
    """`Value`'s metaclass: turns a class body's annotations into the tuple's fields."""

    def __new__(
        mcls,
        name: str,
        bases: tuple[type, ...],
        namespace: dict[str, Any],
        *,
        init: bool = True,
        order: bool = True,
    ) -> _Shape:
        if bases == (tuple,):  # Value itself
            return type.__new__(mcls, name, bases, namespace)
        if bases != (Value,):
            raise TypeError(f"{name}: a value type derives from Value alone")
        fields = tuple(namespace.get("__annotations__", ()))
        if not fields or (init and len(fields) >= len(_NEW)):
            raise TypeError(
                f"{name}: a value type has 1 to {len(_NEW) - 1} fields (more with init=False)"
            )
        if ("__new__" in namespace) == init:
            raise TypeError(
                f"{name}: a value type with its own __new__ is (Value, init=False), and only it"
            )
        defaults = []
        for index, field in enumerate(fields):
            if field in namespace:
                defaults.append(namespace[field])
            elif defaults:
                raise TypeError(f"{name}.{field}: a field without a default after one with one")
            namespace[field] = property(_getter(index), doc=field)
        namespace["__slots__"] = ()
        namespace["_fields"] = namespace["__match_args__"] = fields
        if init:
            namespace["__new__"] = _make_new(namespace["__qualname__"], fields, tuple(defaults))
        if "__repr__" not in namespace:  # per class: super().__repr__() is the tuple's
            namespace["__repr__"] = _repr
        if "__eq__" in namespace:  # != from the class's ==, not the tuple's field by field
            namespace.setdefault("__ne__", object.__ne__)
        if not order:
            for method in _ORDERING:
                namespace.setdefault(method, getattr(object, method))
        return type.__new__(mcls, name, bases, namespace)


if TYPE_CHECKING:

    @dataclass_transform(eq_default=True, order_default=True, frozen_default=True)
    class Value(metaclass=_Shape):
        """A value type: ``class Name(Value)``, ``(Value, init=False)``,
        ``(Value, order=False)`` (see the module docstring)."""

        _fields: tuple[str, ...]

        def _replace(self: _T, **changes: Any) -> _T: ...

    def build(cls: type[_T], fields: tuple[Any, ...]) -> _T:
        """The instance of `cls` with these fields: what a value class's own `__new__`
        (one that normalises its arguments) returns."""
else:

    class Value(tuple, metaclass=_Shape):
        __slots__ = ()

        def _replace(self, **changes):
            return type(self)(
                **{
                    name: changes.pop(name, field)
                    for name, field in zip(self._fields, self, strict=True)
                },
                **changes,
            )

        def __getnewargs__(self):
            return tuple(self)  # copy and pickle call __new__ with the fields, not one tuple

    build = tuple.__new__
