"""What a readiness check found: `doctor`'s checks (doctor.py, kata_checks.py) return these.

A leaf: it imports nothing of ours, so every module with checks can use it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)
