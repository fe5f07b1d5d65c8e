"""Runs in L2 (test-only; tests/nested/launcher.py's VM): kata-agent's part with a container.

The launcher's archive puts the container in a scenario directory (argv[1]: `id`,
`bundle/config.json` with the spec as kata-runtime 1.x sends it, `bundle/rootfs`); the
image's /kvfio/init (tests/vm/guest-init.sh) runs us after loading the native drivers.
As kata-agent 1.x does, we add the guest hooks from the sandbox's guest_hook_path
(`io.katacontainers.config.hypervisor.guest_hook_path`, else /usr/share/oci/hooks): every
regular, executable, non-symlink file in its `prestart/`, in name order, called with argv
[name, "prestart"] and an empty environment (runc passes the OCI state on stdin); then runc
runs the container (`--no-pivot`: the rootfs is in the initramfs). kata-runtime drops the
container's network namespace from the spec and the agent puts the container into the
sandbox's; this L2 has no sandbox, so the container gets a network namespace of its own
(with podman's `--network none` both have only loopback; runc refuses net.* sysctls, which
podman sets, without one).

On the serial console (through the kernel's log when the command line has
kvfio.console=kmsg, long lines in pieces: see say()): "KVFIO-OUT <json string>" /
"KVFIO-ERR <json string>" per line of the container's stdout / stderr (runc's own errors
included), "KVFIO <json>" records (the guest's PCI drivers, the kata-vfio hook's log once
the container runs) and finally "KVFIO-EXIT <code>".
"""

import json
import os
import subprocess
import sys
import threading

GUEST_HOOK_PATH_ANNOTATION = "io.katacontainers.config.hypervisor.guest_hook_path"
DEFAULT_GUEST_HOOK_PATH = "/usr/share/oci/hooks"
HOOK_LOG = "/tmp/kata-vfio-hook.log"
PCI = "/sys/bus/pci/devices"
lock = threading.Lock()
PIECE = 800  # bytes of a line per kernel log record


def kmsg_console():
    """/dev/kmsg, opened, when the kernel command line asks for it (kvfio.console=kmsg, see
    tests/vm/guest-init.sh); else None: the lines go to stdout, the console's tty."""
    with open("/proc/cmdline") as f:
        if "kvfio.console=kmsg" not in f.read().split():
            return None
    return os.open("/dev/kmsg", os.O_WRONLY)


KMSG = kmsg_console()


def say(line):
    """One line on the console. Through /dev/kmsg a record holds at most ~1 KB: a longer line
    goes in pieces, "KVFIO+ <piece>" for all but the last, "KVFIO= <last piece>"
    (tests/nested/launcher.py's Pieces joins them)."""
    with lock:
        if KMSG is None:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
            return
        data = line.encode(errors="replace")
        if len(data) <= PIECE:
            os.write(KMSG, b"<2>" + data + b"\n")
            return
        for start in range(0, len(data), PIECE):
            mark = b"KVFIO= " if start + PIECE >= len(data) else b"KVFIO+ "
            os.write(KMSG, b"<2>" + mark + data[start : start + PIECE] + b"\n")


def emit(**record):
    say("KVFIO " + json.dumps(record))


def drivers():
    out = {}
    for addr in sorted(os.listdir(PCI)):
        link = os.path.join(PCI, addr, "driver")
        out[addr] = os.path.basename(os.readlink(link)) if os.path.islink(link) else None
    return out


def guest_hooks(hook_path):
    hooks = []
    prestart = os.path.join(hook_path, "prestart")
    names = sorted(os.listdir(prestart)) if os.path.isdir(prestart) else []
    for name in names:
        path = os.path.join(prestart, name)
        if os.path.isfile(path) and not os.path.islink(path) and os.access(path, os.X_OK):
            hooks.append({"path": path, "args": [name, "prestart"], "env": []})
    return hooks


def hook_log():
    try:
        with open(HOOK_LOG) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []


class HookLogOnce:
    """The hook's log, sent once the container's first line comes (the prestart hooks ran
    before its process started), or at its end."""

    def __init__(self):
        self.sent = False

    def send(self):
        with lock:
            if self.sent:
                return
            self.sent = True
        emit(event="hook_log", records=hook_log(), drivers=drivers())


def relay(stream, mark, once):
    for raw in stream:
        once.send()
        say(mark + json.dumps(raw.decode(errors="replace").rstrip("\n")))


def main():
    scenario = sys.argv[1]
    bundle = os.path.join(scenario, "bundle")
    with open(os.path.join(scenario, "id")) as f:
        cid = f.read().strip()
    config = os.path.join(bundle, "config.json")
    with open(config) as f:
        spec = json.load(f)
    annotations = spec.get("annotations") or {}
    hooks = guest_hooks(annotations.get(GUEST_HOOK_PATH_ANNOTATION) or DEFAULT_GUEST_HOOK_PATH)
    if hooks:
        spec["hooks"] = {"prestart": hooks}
    namespaces = spec.setdefault("linux", {}).setdefault("namespaces", [])
    if not any(ns.get("type") == "network" for ns in namespaces):
        namespaces.append({"type": "network"})
    with open(config, "w") as f:
        json.dump(spec, f)
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    emit(
        event="l2",
        id=cid,
        uptime=uptime,
        drivers=drivers(),
        hooks=[h["path"] for h in hooks],
        vfio_in_spec=[
            d.get("path")
            for d in spec.get("linux", {}).get("devices") or []
            if str(d.get("path", "")).startswith("/dev/vfio")
        ],
        resources_devices=spec.get("linux", {}).get("resources", {}).get("devices"),
    )
    proc = subprocess.Popen(
        ["/usr/sbin/runc", "--root", "/run/runc", "run", "--no-pivot", "--bundle", bundle, cid],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    once = HookLogOnce()
    threads = [
        threading.Thread(target=relay, args=(s, m, once))
        for s, m in ((proc.stdout, "KVFIO-OUT "), (proc.stderr, "KVFIO-ERR "))
    ]
    for t in threads:
        t.start()
    code = proc.wait()
    for t in threads:
        t.join()
    once.send()
    say(f"KVFIO-EXIT {code}")


main()
