"""The project's exceptions. Each carries what went wrong and what to do next.

Only entry points turn them into a one-line message; everything below raises.
"""

from __future__ import annotations


class KataVfioError(Exception):
    """Base class: `message` says what is wrong, `hint` what to do about it."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message

    def __str__(self) -> str:
        return self.one_line()


class UsageError(KataVfioError):
    """The command line is wrong."""

    exit_code = 2


class ConfigError(KataVfioError):
    """A kata-vfio configuration file is missing, unreadable or invalid."""


class SpecError(KataVfioError):
    """The OCI bundle or its config.json cannot be used."""


class DeviceError(KataVfioError):
    """A PCI device or IOMMU group is unknown, malformed or not usable."""


class BindError(DeviceError):
    """The kernel did not move a device to the driver asked for."""


class HookError(KataVfioError):
    """The guest hook could not give the container its VFIO devices."""
