"""Shared core of kata-vfio: the PCI/sysfs model and the device manifest.

Imported by the host wrapper, the host tools and the guest hook alike, so it
uses the standard library only.
"""

__version__ = "0.1.0"
