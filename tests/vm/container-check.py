"""Runs as the container's process inside the test guest: opens what the hook made.

VFIO_GET_API_VERSION is _IO(';', 100) = 0x3B64 and returns VFIO_API_VERSION (0);
VFIO_GROUP_GET_STATUS is _IO(';', 103) = 0x3B67 on {u32 argsz; u32 flags}, flag 1 = viable.
"""

import fcntl
import json
import os
import struct

VFIO_GET_API_VERSION = 0x3B64
VFIO_GROUP_GET_STATUS = 0x3B67
VFIO_GROUP_FLAGS_VIABLE = 1

report = {"entries": sorted(os.listdir("/dev/vfio")), "groups": {}}
container = os.open("/dev/vfio/vfio", os.O_RDWR)
report["api_version"] = fcntl.ioctl(container, VFIO_GET_API_VERSION)
for name in report["entries"]:
    if name == "vfio":
        continue
    st = os.stat(f"/dev/vfio/{name}")
    fd = os.open(f"/dev/vfio/{name}", os.O_RDWR)
    argsz, flags = struct.unpack("II", fcntl.ioctl(fd, VFIO_GROUP_GET_STATUS,
                                                   struct.pack("II", 8, 0)))
    report["groups"][name] = {"viable": bool(flags & VFIO_GROUP_FLAGS_VIABLE),
                              "dev": [os.major(st.st_rdev), os.minor(st.st_rdev)]}
    os.close(fd)
print("KVFIO-CONTAINER " + json.dumps(report), flush=True)
