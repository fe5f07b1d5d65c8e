#!/usr/bin/env python3
"""`make demo`: the whole path, in a guest with a virtual IOMMU, explained as it goes.

1. On the "host", the wrapper's own code turns a container's device request into
   the manifest annotation (a fake host sysfs stands in: this machine has no IOMMU).
2. A QEMU q35 guest with intel-iommu boots `make initrd`'s image (TCG, ~10 s).
3. runc in the guest creates the container with kata-vfio-hook as its prestart hook,
   as kata-agent does; the container then opens its VFIO groups itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "vm"))
import vmtools


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--initrd", type=Path, required=True)
    parser.add_argument("--kver", required=True)
    args = parser.parse_args()
    e1000e_a, _e1000e_b, nvme, e1000_a, e1000_b = vmtools.DEFAULT_DEVICES
    groups = [[e1000e_a], [nvme], [e1000_a, e1000_b]]
    with tempfile.TemporaryDirectory() as tmp:
        manifest = vmtools.host_manifest(Path(tmp) / "sys", groups)
    print("== 1. host: the wrapper's manifest for the container (annotation io.kata-vfio.manifest)")
    for group in json.loads(manifest)["groups"]:
        names = ", ".join(f"{d['host_address']} [{d['vendor'][2:]}:{d['device'][2:]}]"
                          for d in group["devices"])
        print(f"   host IOMMU group {group['host_group']}: {names}")
    print("\n== 2. booting the guest (QEMU q35 + intel-iommu, TCG) with the kata-vfio initrd ...")
    run = vmtools.boot(args.initrd, args.kver, [vmtools.Scenario("demo", manifest)])
    try:
        before = run.find("scenario", "demo")
        result = run.find("result", "demo")
    except AssertionError as err:
        print(f"demo: the guest did not report back:\n{err}", file=sys.stderr)
        return 1
    print(f"   guest booted in {run.find('booted')['uptime']} s (guest clock)")
    print("   guest PCI devices, before the container:")
    print(f"     {'address':14} {'ids':11} {'group':>5}  driver")
    for addr, ids in before["ids"].items():
        print(f"     {addr:14} {ids[0][2:]}:{ids[1][2:]} {before['groups'][addr] or '-':>5}  "
              f"{before['drivers_before'][addr] or '(none)'}")
    print("\n== 3. runc creates the container; kata-vfio-hook runs as its prestart hook")
    for entry in result["hook_log"]:
        if entry["event"] == "found":
            print(f"   found host {entry['host_address']} as guest {entry['guest_address']} "
                  f"(on {entry['driver']})")
        elif entry["event"] == "bind":
            print(f"   bound {entry['guest_address']}: {entry['from_driver']} -> vfio-pci "
                  f"in {entry['ms']:.0f} ms")
        elif entry["event"] == "group mapping":
            print(f"   host group -> guest group: {entry['host_to_guest']}")
        elif entry["event"] == "done":
            print(f"   hook done in {entry['total_ms']:.0f} ms: {entry['steps_ms']}")
        elif entry["level"] == "error":
            print(f"   hook failed: {entry.get('error')}")
    if result["rc"] != 0:
        print(f"demo: container creation failed: {result['stderr'].strip()}", file=sys.stderr)
        return 1
    print("\n== 4. inside the container")
    for line in result["stdout"].splitlines():
        if line.startswith("KVFIO-CONTAINER "):
            report = json.loads(line.split(" ", 1)[1])
            print(f"   ls /dev/vfio: {' '.join(report['entries'])}")
            print(f"   VFIO_GET_API_VERSION on /dev/vfio/vfio: {report['api_version']}")
            for group, info in report["groups"].items():
                print(f"   /dev/vfio/{group} (char {info['dev'][0]}:{info['dev'][1]}) opened, "
                      f"viable={info['viable']}")
            env = (report.get("run_files") or {}).get("env")
            if env:
                print(f"   cat /run/kata-vfio/env: {env['text'].strip()}")
    changed = {a: d for a, d in result["drivers_after"].items()
               if d != before["drivers_before"][a]}
    print(f"\n   guest drivers now: {changed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
