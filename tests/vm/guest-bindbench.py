"""`make bench` in a guest that is an SR-IOV host: binding 1, 8 and 32 VFs to vfio-pci one
group at a time vs all at once (kata_vfio_host.bindings.bind_groups, concurrent kernel work).
Prints one "KVFIO <json>" record per count."""

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, "/usr/lib/kata-vfio")
from kata_vfio.pci import PciAddress
from kata_vfio_host.bindings import bind_groups
from kata_vfio_host.giveback import restore_all
from kata_vfio_host.ledger import ADMIN, Host
from kata_vfio_host.sriov import set_vf_count

PCI = "/sys/bus/pci/devices"
ROUNDS = {1: 11, 8: 11, 32: 5}  # more of the short runs: one host hiccup is their whole time
pf = next(
    a for a in sorted(os.listdir(PCI)) if os.path.exists(os.path.join(PCI, a, "sriov_totalvfs"))
)
host = Host(Path("/sys"), Path("/run/kata-vfio-bench"))
vfs = set_vf_count(host, PciAddress.parse(pf), 32)


def timed(action):
    began = time.perf_counter()
    action()
    took = time.perf_counter() - began
    report = restore_all(host)
    assert not report.failed, report.failed
    return took * 1e3


timed(lambda: bind_groups(host, vfs[:1], ADMIN))  # loads vfio-pci: not part of a bind
for count in (1, 8, 32):
    some = vfs[:count]
    serials, concurrents = [], []
    for _ in range(ROUNDS[count]):  # alternated, medians: TCG timing is noisy, the host shared
        serials.append(timed(lambda some=some: [bind_groups(host, [vf], ADMIN) for vf in some]))
        concurrents.append(timed(lambda some=some: bind_groups(host, some, ADMIN)))
    print(
        "KVFIO "
        + json.dumps(
            {
                "event": "bindbench",
                "count": count,
                "serial_ms": statistics.median(serials),
                "concurrent_ms": statistics.median(concurrents),
                # each round's pair, run back to back: their ratio is less exposed to host load
                "ratios": sorted(c / s for s, c in zip(serials, concurrents, strict=True)),
            }
        ),
        flush=True,
    )
set_vf_count(host, PciAddress.parse(pf), 0)
