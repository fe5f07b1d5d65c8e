"""kata_vfio.value: the one shape of the value types."""

from __future__ import annotations

import copy
import operator
import pickle

import pytest

from kata_vfio.pci import PciAddress, PciIdentity
from kata_vfio.value import Value, as_dict, build


class Port(Value):
    name: str
    index: int = 0
    tags: tuple[str, ...] = ()

    def label(self) -> str:
        return f"{self.name}/{self.index}"


class Named(Value, init=False):
    name: str

    def __new__(cls, name: object) -> Named:
        return build(cls, (str(name).strip(),))

    def __repr__(self) -> str:
        return "Named:" + super().__repr__()


def test_fields_defaults_and_methods() -> None:
    port = Port("eth0", tags=("a",))
    assert (port.name, port.index, port.tags, port.label()) == ("eth0", 0, ("a",), "eth0/0")
    assert Port(name="x", index=2) == Port("x", 2) and Port("x") != Port("y")
    assert repr(port) == "Port(name='eth0', index=0, tags=('a',))"
    assert as_dict(port) == {"name": "eth0", "index": 0, "tags": ("a",)}
    assert port._replace(index=3) == Port("eth0", 3, ("a",))
    assert sorted([Port("b"), Port("a", 2), Port("a", 1)]) == [
        Port("a", 1),
        Port("a", 2),
        Port("b"),
    ]
    assert len({Port("a"), Port("a")}) == 1


def test_values_are_immutable_and_have_no_instance_dict() -> None:
    port = Port("eth0")
    with pytest.raises(AttributeError):
        port.name = "eth1"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        port.other = 1  # type: ignore[attr-defined]
    assert not hasattr(port, "__dict__")


def test_copies_and_pickles_keep_the_fields() -> None:
    addr = PciAddress.parse("0000:03:00.1")
    ident = PciIdentity(0x8086, 0x10D3, 0x8086, 0x0001, 0x020000)
    for thing in (addr, ident, Port("eth0", 1)):
        assert copy.deepcopy(thing) == thing and type(copy.copy(thing)) is type(thing)
        assert pickle.loads(pickle.dumps(thing)) == thing
    assert str(pickle.loads(pickle.dumps(addr))) == "0000:03:00.1"


def test_an_own_new_normalises_and_super_works_in_methods() -> None:
    named = Named("  nvme ")
    assert named.name == "nvme" and repr(named) == "Named:('nvme',)"  # tuple's own repr


def test_a_field_without_default_after_one_with_is_refused() -> None:
    with pytest.raises(TypeError, match="without a default"):

        class Bad(Value):
            a: int = 0
            b: int


def test_order_false_leaves_the_ordering_to_the_class() -> None:
    from kata_vfio_ctl.kata3 import KataRelease

    # ordered by (major, minor) alone: the tuple's ordering would also compare `source`
    old, new = KataRelease(3, 2, "b-file"), KataRelease(3, 2, "a-program")
    assert old == new and operator.ne(old, new) is False  # != was the tuple's
    assert old <= new and old >= new and not old < new and not old > new
    assert KataRelease(2, 9, "z") < KataRelease(3, 0, "a") <= KataRelease(3, 0, "")

    class Loose(Value, order=False):
        name: str

    with pytest.raises(TypeError):
        _ = Loose("a") < Loose("b")  # type: ignore[operator]
    assert Loose("a") == Loose("a")


def test_the_class_statement_says_whether_it_writes_its_own_new() -> None:
    with pytest.raises(TypeError, match="init=False"):

        class Own(Value):
            name: str

            def __new__(cls, name: str) -> Own:
                return build(cls, (name,))

    with pytest.raises(TypeError, match="init=False"):

        class NoNew(Value, init=False):
            name: str


def test_a_value_type_derives_from_value_alone() -> None:
    assert Port.__mro__[1:] == (Value, tuple, object)
    with pytest.raises(TypeError, match="from Value alone"):

        class Deeper(Port):  # type: ignore[misc]
            extra: int
