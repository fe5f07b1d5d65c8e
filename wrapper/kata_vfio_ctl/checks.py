"""What a readiness check found: `doctor`'s checks (doctor.py, kata_checks.py) return these.

A leaf: it imports nothing of ours, so every module with checks can use it.
"""

from __future__ import annotations

from kata_vfio.value import Value, as_dict

OK, WARN, FAIL = "ok", "warn", "fail"


class Check(Value):
    name: str
    status: str
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return as_dict(self)
