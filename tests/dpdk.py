"""dpdk-testpmd in a container, as the DPDK tests run it (the one-level VM test in
`make test`, the real-Kata test in `make test-kata`): the command, and the port statistics
it prints, parsed."""

from __future__ import annotations

import re

# every device on vfio-pci in the guest is a port; --lcores 0@0,1@0: both lcores on one CPU
# (Kata 1.x gives guests one vCPU); SECONDS is replaced by the caller
TESTPMD = """
set -e
A=""
for d in /sys/bus/pci/drivers/vfio-pci/0000:*; do A="$A -a ${d##*/}"; done
echo "ports:$A"
ls /dev/vfio
timeout -s INT SECONDS dpdk-testpmd --lcores 0@0,1@0 $A --iova-mode=va --no-huge -m 256 \\
    -- --total-num-mbufs=2048 --tx-first --stats-period 5 </dev/null || true
"""
# the same, each port from the hook's /run/kata-vfio/env (the README's line), no /sys scan
TESTPMD_FROM_ENV = TESTPMD.replace(
    'A=""\nfor d in /sys/bus/pci/drivers/vfio-pci/0000:*; do A="$A -a ${d##*/}"; done\n',
    "A=$(sed -n 's/^PCIDEVICE_[A-Z0-9_]*=/,/; s/,/ -a /gp' /run/kata-vfio/env)\n",
)
assert TESTPMD_FROM_ENV != TESTPMD


def port_stats(out: str) -> list[tuple[int, int, int]]:
    """(port, RX-packets, TX-packets) per statistics block, in output order."""
    stats = []
    port = -1
    rx = None
    for line in out.splitlines():
        if "statistics" in line:  # NIC statistics blocks only, not the final forward totals
            m = re.search(r"NIC statistics for port (\d+)", line)
            port = int(m.group(1)) if m else -1
        m = re.search(r"RX-packets:\s*(\d+)", line)
        if m:
            rx = int(m.group(1))
        m = re.search(r"TX-packets:\s*(\d+)", line)
        if m and rx is not None and port >= 0:
            stats.append((port, rx, int(m.group(1))))
            rx = None
    return stats
