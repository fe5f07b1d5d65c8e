"""Runs as the container's process inside the test guest: opens what the hook made.

VFIO_GET_API_VERSION is _IO(';', 100) = 0x3B64 and returns VFIO_API_VERSION (0);
VFIO_GROUP_GET_STATUS is _IO(';', 103) = 0x3B67 on {u32 argsz; u32 flags}, flag 1 = viable.
Also reports the hook's /run/kata-vfio files (devices.json, env) as the container sees them.
`--stay`: after the report, wait; SIGUSR1 reports again, SIGTERM/SIGKILL ends it (a
container that lives while another of its pod starts).
"""

import fcntl
import json
import os
import signal
import struct
import sys

VFIO_GET_API_VERSION = 0x3B64
VFIO_GROUP_GET_STATUS = 0x3B67
VFIO_GROUP_FLAGS_VIABLE = 1
RUN_DIR = "/run/kata-vfio"


def run_files():
    """The hook's files: content and mode of each; None when there is no such directory."""
    if not os.path.isdir(RUN_DIR):
        return None
    files = {}
    for name in sorted(os.listdir(RUN_DIR)):
        path = os.path.join(RUN_DIR, name)
        st = os.lstat(path)
        with open(path) as f:
            text = f.read()
        files[name] = {"mode": oct(st.st_mode), "text": text}
    return files


def report():
    out = {"entries": sorted(os.listdir("/dev/vfio")), "groups": {}}
    container = os.open("/dev/vfio/vfio", os.O_RDWR)
    out["api_version"] = fcntl.ioctl(container, VFIO_GET_API_VERSION)
    os.close(container)
    for name in out["entries"]:
        if name == "vfio":
            continue
        st = os.stat(f"/dev/vfio/{name}")
        fd = os.open(f"/dev/vfio/{name}", os.O_RDWR)
        _argsz, flags = struct.unpack(
            "II", fcntl.ioctl(fd, VFIO_GROUP_GET_STATUS, struct.pack("II", 8, 0))
        )
        out["groups"][name] = {
            "viable": bool(flags & VFIO_GROUP_FLAGS_VIABLE),
            "dev": [os.major(st.st_rdev), os.minor(st.st_rdev)],
        }
        os.close(fd)
    out["run_files"] = run_files()
    print("KVFIO-CONTAINER " + json.dumps(out), flush=True)


if "--stay" in sys.argv:
    signal.signal(signal.SIGUSR1, lambda *_: report())
report()
while "--stay" in sys.argv:
    signal.pause()
