#!/usr/bin/env python3
"""Run Kata 3.x's `kata-runtime` where this host lacks what it stats, without changing the host.

kata-runtime's configuration loader refuses to go on without /dev/vhost-vsock (it only stats
it: utils.SupportsVsocks) and dies without a syslog socket at /dev/log ("Unix syslog delivery
error"). Run under `unshare -m --propagation private`, this script lays an overlay over /dev
(lower: the real /dev, upper: a scratch dir), so in this mount namespace only:
/dev/vhost-vsock is an empty file and /dev/log a datagram socket this script drains. Then it
runs the given command as nobody and passes on its stdout, stderr and exit code.

As nobody because as root `kata-env` asks /dev/vhost-vsock for a free vsock context ID with
an ioctl, trying every 32-bit CID in turn (utils.FindContextID): on the stand-in file that
never ends. Unprivileged, it reports the socket path as "<<unknown>>" and skips that.

Usage: unshare -m --propagation private kata_env.py SCRATCH_DIR -- COMMAND...
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

NOBODY = 65534


def drain(sock: socket.socket) -> None:
    while True:
        try:
            sock.recv(65536)
        except OSError:
            return


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    scratch, command = Path(argv[0]), argv[2:]
    upper, work = scratch / "upper", scratch / "work"
    upper.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "mount",
            "-t",
            "overlay",
            "kata-vfio-test-dev",
            "-o",
            f"lowerdir=/dev,upperdir={upper},workdir={work}",
            "/dev",
        ],
        check=True,
    )
    Path("/dev/vhost-vsock").touch()
    try:
        os.unlink("/dev/log")
    except FileNotFoundError:
        pass
    log = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    log.bind("/dev/log")
    os.chmod("/dev/log", 0o666)
    threading.Thread(target=drain, args=(log,), daemon=True).start()
    done = subprocess.run(
        command, capture_output=True, check=False, user=NOBODY, group=NOBODY, extra_groups=[]
    )
    sys.stdout.buffer.write(done.stdout)
    sys.stderr.buffer.write(done.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
