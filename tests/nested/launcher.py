"""Test-only OCI runtime for tests/e2e/test_nested_host_e2e.py: a VM launcher that does Kata
1.x's part with a container's spec, and no more. Standard library only; run in L1 as
`/usr/bin/python3 -I -S launcher.py --launcher-config FILE <OCI command line>`.

It runs in the nested test's L1 (a virtme-ng TCG guest with a vIOMMU: a real IOMMU host) as
the inner runtime that kata-vfio execs (`runtime =` in kata-vfio's config.toml), under podman
4.3 and conmon. It STANDS IN FOR kata-runtime 1.x, its QEMU and kata-agent, as far as a
VFIO container's spec goes:

- kata-runtime's VFIO cold-plug (virtcontainers, `isVFIO()`): for each `/dev/vfio/N` in the
  spec's linux.devices, every device in /sys/kernel/iommu_groups/N/devices except bridges
  goes to the VM as `-device vfio-pci,host=ADDR`. The VM (L2) is what Kata's
  `enable_iommu = true` gives: q35 with `kernel-irqchip=split`,
  `intel-iommu,intremap=on,caching-mode=on` and `intel_iommu=on iommu=pt` on the kernel's
  command line; Kata's `-accel kvm -cpu host` (here L1's own KVM: TCG emulates SVM for L1);
  512 MB and one vCPU (L1's QEMU pins all of L2's RAM for VFIO), `-nodefaults` (q35's
  default NIC is an e1000e too), the serial console to a file.
- kata-runtime's `constraintGRPCSpec` (virtcontainers/kata_agent.go) on the spec that goes
  into the guest: no hooks, no seccomp (`disable_guest_seccomp`, Kata's default), no SELinux
  label, linux.resources without devices, pids, blockIO, hugepageLimits, network (and no
  cpuset), a systemd cgroup path as a cgroupfs one, no network or cgroup namespace and no
  namespace paths, no char device under `/dev/vfio/`. Annotations go in unchanged (the
  wrapper's `io.kata-vfio.manifest`, its guest_hook_path annotation).
- Kata's shared filesystem: Kata serves the rootfs and bind-mount sources to the guest over
  9p; here they are copied into a cpio archive appended to L2's initrd. `/dev/shm` becomes a
  tmpfs (what Kata does without a sandbox shm).
- kata-agent, in L2 (tests/nested/l2_container.py): the prestart hooks found in the
  guest_hook_path's `prestart/` (regular executable files, not symlinks; argv
  [name, "prestart"], empty environment), then runc runs the container. Its output lines
  come back over L2's serial console and are relayed to this process's stdout/stderr.

Not done (not needed by the test): networking (podman runs the containers with
`--network none`), exec, pause, resume, update, checkpoint; the spec's own (host) hooks are
not run; L2 loads no AppArmor policy, so a profile is dropped as well. The VM boots at
`start`, where Kata boots it at `create`.

The OCI command line podman 4.3 and conmon use: global flags (--root, --log, --log-format,
--systemd-cgroup, ...) are accepted and ignored, except that errors also go to --log as
JSON records (podman reads them back). `create --bundle B --pid-file P [--console-socket S]
ID` forks the container process: it calls setsid and is adopted by conmon (the subreaper)
when create exits; it keeps conmon's stdio (or uses the pty sent to S); it waits on a FIFO
until `start ID`, then boots L2, relays the container's output and exits with the
container's exit code. `state ID` prints the OCI state; `kill [--all] ID [SIG]` signals the
container process, and L2's QEMU dies with it (PR_SET_PDEATHSIG, and the process kills it
on TERM, INT, HUP and QUIT); `delete [--force] ID` returns once both are gone. All state
lives in the `state_dir` of the launcher's configuration (JSON: see `Config`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable

VERSION = "kata-vfio-test-l2-launcher 1"
VFIO_PREFIX = "/dev/vfio/"
# what kata-runtime 1.x's constraintGRPCSpec clears in linux.resources
RESOURCES_DROPPED = ("devices", "pids", "blockIO", "hugepageLimits", "network")
NAMESPACES_DROPPED = ("network", "cgroup")
PCI_BRIDGE_CLASS = 0x0604
SHM_MOUNT = {
    "destination": "/dev/shm",
    "type": "tmpfs",
    "source": "shm",
    "options": ["noexec", "nosuid", "nodev", "mode=1777", "size=65536k"],
}
# In L2: the program that plays kata-agent's part (put there by the test's archive), and
# where this launcher's per-container archive puts the container (guest-init.sh runs every
# /kvfio/scenarios/*/run)
L2_PROGRAM = "/kvfio/l2-container.py"
L2_DIR = "/kvfio/scenarios/00-container"
L2_RUN = f'#!/kvfio/bin/sh\nexec /usr/bin/python3 -I -S {L2_PROGRAM} "$1"\n'
# marked lines on L2's console (tests/nested/l2_container.py writes them)
MARK_OUT, MARK_ERR, MARK_EXIT, MARK_RECORD = "KVFIO-OUT ", "KVFIO-ERR ", "KVFIO-EXIT ", "KVFIO "
MARK_PIECE, MARK_LAST_PIECE = "KVFIO+ ", "KVFIO= "
GLOBAL_WITH_VALUE = ("--root", "--log", "--log-format", "--criu", "--rootless", "--launcher-config")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
PR_SET_PDEATHSIG = 1


class Failure(Exception):
    """One line for the user: podman shows it (stderr, and the --log record)."""


class Config:
    """The launcher's configuration (a JSON file written by the test in L1)."""

    def __init__(self, data: dict[str, object]) -> None:
        self.state_dir = str(data["state_dir"])  # per-container state
        self.console_dir = str(data["console_dir"])  # ID.console, ID.argv, ID.qemu.log
        self.qemu = str(data.get("qemu", "/usr/bin/qemu-system-x86_64"))
        self.kernel = str(data["kernel"])  # L2's kernel (vmlinux, PVH)
        self.initrd = str(data["initrd"])  # L2's initrd, 4-byte aligned length
        self.memory_mb = int(str(data.get("memory_mb", 512)))
        self.vcpus = int(str(data.get("vcpus", 1)))
        self.append = str(data.get("append", ""))  # more kernel parameters
        self.boot_timeout = float(str(data.get("boot_timeout", 180)))
        self.sysfs = str(data.get("sysfs", "/sys"))


# -- the command line ---------------------------------------------------------------------
class Invocation:
    def __init__(self, argv: list[str]) -> None:
        self.globals: dict[str, str] = {}
        i = 0
        while i < len(argv) and argv[i].startswith("-"):
            flag = argv[i]
            if flag in ("--version", "-v"):
                break
            name, eq, value = flag.partition("=")
            if not eq and name in GLOBAL_WITH_VALUE and i + 1 < len(argv):
                value = argv[i + 1]
                i += 1
            self.globals[name] = value
            i += 1
        self.verb = argv[i] if i < len(argv) else ""
        self.options: dict[str, str] = {}
        self.positional: list[str] = []
        rest = argv[i + 1 :]
        j = 0
        while j < len(rest):
            arg = rest[j]
            if arg.startswith("-") and not arg.lstrip("-").isdigit():
                name, eq, value = arg.partition("=")
                takes_value = name in (
                    "--bundle",
                    "-b",
                    "--pid-file",
                    "--console-socket",
                    "--preserve-fds",
                    "--signal",
                )
                if not eq and takes_value and j + 1 < len(rest):
                    value = rest[j + 1]
                    j += 1
                self.options[name] = value
            else:
                self.positional.append(arg)
            j += 1

    def option(self, *names: str) -> str | None:
        for name in names:
            if name in self.options:
                return self.options[name]
        return None


def log_error(inv: Invocation | None, message: str) -> None:
    os.write(2, f"l2-launcher: {message}\n".encode())
    log = inv.globals.get("--log") if inv else None
    if log:
        record = {
            "level": "error",
            "msg": message,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        try:
            with open(log, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError:
            pass


# -- processes ----------------------------------------------------------------------------
def proc_stat(pid: int) -> tuple[str, str] | None:
    """(state letter, start time) of a process, None when there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], fields[19]


def alive(pid: int, starttime: str) -> bool:
    """The process we started is there and not a zombie (conmon has not reaped it yet)."""
    st = proc_stat(pid) if pid > 0 else None
    return st is not None and st[0] not in ("Z", "X") and st[1] == starttime


def wait_gone(pids: list[tuple[int, str]], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(alive(p, s) for p, s in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def tail(path: str, size: int = 1500) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-size:]
    except OSError:
        return ""


class Pieces:
    """Joins the lines L2 wrote in pieces (a kernel log record holds ~1 KB; see
    tests/nested/l2_container.py's say()): feed the console's lines in order, get back
    whole lines, None for a piece that is not the last."""

    def __init__(self) -> None:
        self.partial = ""

    def feed(self, line: str) -> str | None:
        if line.startswith(MARK_PIECE):
            self.partial += line[len(MARK_PIECE) :]
            return None
        if line.startswith(MARK_LAST_PIECE):
            line, self.partial = self.partial + line[len(MARK_LAST_PIECE) :], ""
        return line


def console_lines(text: str) -> list[str]:
    """A whole console file's lines, pieces joined."""
    pieces = Pieces()
    lines = (pieces.feed(line) for line in text.replace("\r", "").splitlines())
    return [line for line in lines if line is not None]


def write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            n = os.write(fd, data)
        except OSError:
            return  # nobody reads any more (conmon gone): the container goes on
        data = data[n:]


# -- what kata-runtime does with the spec -------------------------------------------------
def vfio_devices(spec: dict[str, object], sysfs: str) -> list[str]:
    """The host devices the VM gets: every non-bridge member of each /dev/vfio/N group."""
    linux = spec.get("linux")
    devices = linux.get("devices") if isinstance(linux, dict) else None
    out: list[str] = []
    for dev in devices if isinstance(devices, list) else []:
        path = str(dev.get("path", ""))
        if (
            dev.get("type") != "c"
            or not path.startswith(VFIO_PREFIX)
            or path == VFIO_PREFIX + "vfio"
        ):
            continue
        group = path[len(VFIO_PREFIX) :]
        gdir = f"{sysfs}/kernel/iommu_groups/{group}/devices"
        try:
            members = sorted(os.listdir(gdir))
        except OSError as exc:
            raise Failure(f"{path}: no IOMMU group {group} ({gdir}: {exc.strerror})") from None
        for addr in members:
            with open(f"{gdir}/{addr}/class") as f:
                if int(f.read(), 16) >> 8 == PCI_BRIDGE_CLASS:
                    continue  # bridges stay on the host, as Kata leaves them
            if addr not in out:
                out.append(addr)
    return out


def is_systemd_cgroup(path: str) -> bool:
    parts = path.split(":")
    return len(parts) == 3 and parts[0].endswith(".slice")


def guest_spec(spec: dict[str, object], bundle: str, stage: str) -> dict[str, object]:
    """The spec as kata-runtime 1.x sends it to the agent (constraintGRPCSpec), with the
    rootfs and bind-mount sources at their places in L2 (copied under `stage`, the
    container's directory in the archive)."""
    g = json.loads(json.dumps(spec))
    g.pop("hooks", None)
    root = g.get("root") or {}
    rootfs = root.get("path", "rootfs")
    rootfs = rootfs if rootfs.startswith("/") else os.path.join(bundle, rootfs)
    subprocess.run(["cp", "-a", f"{rootfs}/.", f"{stage}/bundle/rootfs"], check=True)
    g["root"] = {"path": "rootfs", "readonly": bool(root.get("readonly"))}
    process = g.setdefault("process", {})
    process.pop("selinuxLabel", None)
    process.pop("apparmorProfile", None)
    linux = g.setdefault("linux", {})
    linux.pop("seccomp", None)
    resources = linux.get("resources") or {}
    for key in RESOURCES_DROPPED:
        resources.pop(key, None)
    cpu = resources.get("cpu")
    if isinstance(cpu, dict):
        cpu.pop("cpus", None)
        cpu.pop("mems", None)
    cgroups_path = str(linux.get("cgroupsPath", ""))
    if is_systemd_cgroup(cgroups_path):
        _, prefix, name = cgroups_path.split(":")
        linux["cgroupsPath"] = f"/{prefix}/{name}"
    linux["namespaces"] = [
        {"type": ns["type"]}
        for ns in linux.get("namespaces") or []
        if ns.get("type") not in NAMESPACES_DROPPED
    ]
    linux["devices"] = [
        d
        for d in linux.get("devices") or []
        if not (d.get("type") == "c" and str(d.get("path", "")).startswith(VFIO_PREFIX))
    ]
    mounts = []
    for i, mount in enumerate(g.get("mounts") or []):
        options = mount.get("options") or []
        if mount.get("destination") == "/dev/shm":
            mount = dict(SHM_MOUNT)  # noqa: PLW2901
        elif mount.get("type") == "bind" or "bind" in options or "rbind" in options:
            name = f"{i:02d}-{os.path.basename(mount['source'].rstrip('/')) or 'root'}"
            os.makedirs(f"{stage}/mounts", exist_ok=True)
            subprocess.run(["cp", "-a", mount["source"], f"{stage}/mounts/{name}"], check=True)
            mount["source"] = f"{L2_DIR}/mounts/{name}"
        mounts.append(mount)
    g["mounts"] = mounts
    edited: dict[str, object] = g
    return edited


def container_archive(spec: dict[str, object], bundle: str, cid: str, sdir: str) -> str:
    """The container for L2: a newc cpio archive adding L2_DIR (its run script, id, bundle
    with the guest spec and rootfs, the bind-mount sources) to L2's initrd."""
    stage_root = f"{sdir}/stage"
    stage = stage_root + L2_DIR
    os.makedirs(f"{stage}/bundle/rootfs")
    g = guest_spec(spec, bundle, stage)
    with open(f"{stage}/bundle/config.json", "w") as f:
        json.dump(g, f)
    with open(f"{stage}/id", "w") as f:
        f.write(cid + "\n")
    with open(f"{stage}/run", "w") as f:
        f.write(L2_RUN)
    os.chmod(f"{stage}/run", 0o755)
    out = f"{sdir}/container.cpio"
    names = subprocess.run(
        ["find", ".", "-mindepth", "1"], cwd=stage_root, check=True, capture_output=True
    ).stdout
    with open(out, "wb") as f:
        subprocess.run(
            ["cpio", "--quiet", "-o", "-H", "newc"],
            cwd=stage_root,
            input=names,
            stdout=f,
            check=True,
        )
    shutil.rmtree(stage_root)
    return out


def qemu_argv(cfg: Config, cid: str, devices: list[str], initrd: str, console: str) -> list[str]:
    # kvfio.console=kmsg: L2's lines through the kernel's log (tests/vm/guest-init.sh says
    # why), unthrottled, without timestamps
    append = (
        "console=ttyS0 rdinit=/kvfio/init intel_iommu=on iommu=pt panic=-1 loglevel=4 "
        "kvfio.console=kmsg printk.devkmsg=on printk.time=0 " + cfg.append
    ).strip()
    argv = [
        cfg.qemu,
        "-name",
        f"kata-vfio-l2-{cid[:12]}",
        "-accel",
        "kvm",
        "-machine",
        "q35,kernel-irqchip=split",
        "-cpu",
        "host",
        "-smp",
        str(cfg.vcpus),
        "-m",
        str(cfg.memory_mb),
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        f"file:{console}",
        "-device",
        "intel-iommu,intremap=on,caching-mode=on",
        "-kernel",
        cfg.kernel,
        "-initrd",
        initrd,
        "-append",
        append,
    ]
    for addr in devices:
        argv += ["-device", f"vfio-pci,host={addr}"]
    return argv


# -- the container process ----------------------------------------------------------------
def _die_with_parent() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class _BootTimeout(Exception):
    """L2 did not reach its init in time; the message is the console's tail."""


def _run_l2(
    cfg: Config, argv: list[str], sdir: str, base: str, console: str, mark: Callable[[str], None]
) -> tuple[int | None, subprocess.Popen[bytes]]:
    """One boot of L2: QEMU started, the console relayed until L2 is off; returns the
    container's exit code (None if L2 never said it) and the QEMU process."""
    with open(base + ".qemu.log", "ab") as qlog:
        qemu = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=qlog,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 (one thread)
        )
    st = proc_stat(qemu.pid)
    write_atomic(f"{sdir}/qemu.pid", f"{qemu.pid} {st[1] if st else ''}\n")
    mark("QEMU started")
    started = time.monotonic()

    def stop(signum: int, _frame: object) -> None:
        qemu.kill()
        qemu.wait()
        os._exit(128 + signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, stop)
    code: int | None = None
    booted = False
    pending = b""
    pieces = Pieces()
    console_file = None
    while True:
        ended = qemu.poll() is not None
        if console_file is None and os.path.exists(console):
            console_file = open(console, "rb")  # noqa: SIM115 (read to the end below)
        chunk = console_file.read() if console_file else b""
        if chunk:
            mark("L2 console's first output")
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            whole = pieces.feed(raw.decode(errors="replace").replace("\r", ""))
            if whole is None:
                continue
            line = whole
            if line.startswith(MARK_RECORD):
                booted = True
                mark("L2 init")
            for prefix, fd_out in ((MARK_OUT, 1), (MARK_ERR, 2)):
                if line.startswith(prefix):
                    try:
                        text = json.loads(line[len(prefix) :])
                    except ValueError:
                        continue
                    mark("the container's first output")
                    write_all(fd_out, (str(text) + "\n").encode())
            if line.startswith(MARK_EXIT):
                code = int(line[len(MARK_EXIT) :].split()[0])
                mark("the container's exit")
        if ended and not chunk:
            mark("L2 off")
            break
        if not booted and time.monotonic() - started > cfg.boot_timeout:
            qemu.kill()
            qemu.wait()
            if console_file is not None:
                console_file.close()
            raise _BootTimeout(tail(console))
        if not chunk:
            time.sleep(0.1)
    if console_file is not None:
        console_file.close()
    return code, qemu


def supervise(cfg: Config, cid: str, sdir: str, devices: list[str]) -> int:
    """The container process, from `start` on: boots L2, relays, returns the exit code."""
    fd = os.open(f"{sdir}/start.fifo", os.O_WRONLY)  # blocks until `start` opens it
    os.write(fd, b"0")
    os.close(fd)
    t0 = time.monotonic()
    base = f"{cfg.console_dir}/{cid}"
    timing: dict[str, float] = {}

    def mark(what: str) -> None:  # seconds since start, in ID.timing.json
        if what not in timing:
            timing[what] = round(time.monotonic() - t0, 1)
            write_atomic(base + ".timing.json", json.dumps(timing))

    initrd = f"{sdir}/initrd.img"
    shutil.copyfile(cfg.initrd, initrd)
    with open(initrd, "ab") as out, open(f"{sdir}/container.cpio", "rb") as part:
        out.write(b"\0" * (-out.tell() % 4))  # each archive 4-byte aligned
        shutil.copyfileobj(part, out)
    mark("L2 initrd written")
    console = base + ".console"
    argv = qemu_argv(cfg, cid, devices, initrd, console)
    write_atomic(base + ".argv", "\n".join(argv) + "\n")
    # L2 on L1's emulated KVM (SVM under TCG) now and then never reaches its init, with no
    # console output at all (seen once in ~10 runs, the second L2 of a test). That is the
    # emulation under the stand-in, not kata-vfio: one more boot of the same VM, said in
    # the timing record, before giving up.
    for attempt in (1, 2):
        try:
            code, qemu = _run_l2(cfg, argv, sdir, base, console, mark)
            break
        except _BootTimeout as exc:
            mark(f"L2 boot {attempt} did not reach init")
            if attempt == 2:
                raise Failure(
                    f"L2 did not reach its init within {cfg.boot_timeout:g} s, "
                    f"twice; console tail:\n{exc}"
                ) from None
            try:
                os.replace(console, f"{console}.attempt{attempt}")
            except FileNotFoundError:
                pass
    if code is None:
        raise Failure(
            f"L2 ended without the container's exit status (QEMU exit "
            f"{qemu.returncode}); QEMU said:\n{tail(base + '.qemu.log')}\n"
            f"console tail:\n{tail(console)}"
        )
    return code


# -- verbs ----------------------------------------------------------------------------------
def load_state(cfg: Config, cid: str) -> tuple[str, dict[str, object]]:
    if not cid or "/" in cid or cid.startswith("."):
        raise Failure(f"bad container id {cid!r}")
    sdir = f"{cfg.state_dir}/{cid}"
    try:
        with open(f"{sdir}/state.json") as f:
            return sdir, json.load(f)
    except FileNotFoundError:
        raise Failure(f"container {cid} does not exist") from None


def status_of(sdir: str, state: dict[str, object]) -> str:
    if not alive(int(str(state["pid"])), str(state["starttime"])):
        return "stopped"
    return "created" if os.path.exists(f"{sdir}/start.fifo") else "running"


def cmd_create(cfg: Config, inv: Invocation) -> int:
    cid = inv.positional[0] if inv.positional else ""
    bundle = os.path.abspath(inv.option("--bundle", "-b") or ".")
    pid_file = inv.option("--pid-file")
    console_socket = inv.option("--console-socket")
    if not cid or "/" in cid or cid.startswith("."):
        raise Failure(f"create: bad container id {cid!r}")
    with open(f"{bundle}/config.json") as f:
        spec = json.load(f)
    devices = vfio_devices(spec, cfg.sysfs)
    sdir = f"{cfg.state_dir}/{cid}"
    try:
        os.makedirs(sdir)
    except FileExistsError:
        raise Failure(f"container {cid} already exists") from None
    os.makedirs(cfg.console_dir, exist_ok=True)
    container_archive(spec, bundle, cid, sdir)
    os.mkfifo(f"{sdir}/start.fifo", 0o600)
    master = slave = -1
    if console_socket:
        master, slave = os.openpty()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 255
        try:
            os.setsid()
            if slave >= 0:
                import fcntl
                import termios

                os.close(master)
                fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
                for fd in (0, 1, 2):
                    os.dup2(slave, fd)
                os.close(slave)
            code = supervise(cfg, cid, sdir, devices)
        except Failure as exc:
            log_error(inv, str(exc))
        except BaseException as exc:  # the container process reports and ends
            log_error(inv, f"container process: {exc!r}")
        os._exit(code)
    if master >= 0:
        import socket

        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(console_socket or "")
            socket.send_fds(s, [os.ttyname(slave).encode()], [master])
        os.close(master)
        os.close(slave)
    st = proc_stat(pid)
    state = {
        "id": cid,
        "pid": pid,
        "starttime": st[1] if st else "",
        "bundle": bundle,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "annotations": spec.get("annotations") or {},
        "devices": devices,
    }
    write_atomic(f"{sdir}/state.json", json.dumps(state))
    if pid_file:
        write_atomic(pid_file, str(pid))
    return 0


def cmd_start(cfg: Config, inv: Invocation) -> int:
    import select

    cid = inv.positional[0] if inv.positional else ""
    sdir, state = load_state(cfg, cid)
    fifo = f"{sdir}/start.fifo"
    if not os.path.exists(fifo):
        raise Failure(f"container {cid} is not in the created state")
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        poll = select.poll()
        poll.register(fd, select.POLLIN)
        deadline = time.monotonic() + 10
        while True:
            if poll.poll(100):
                if os.read(fd, 1) == b"0":
                    break
                raise Failure(f"container {cid}: its process went away before start")
            if status_of(sdir, state) == "stopped" or time.monotonic() > deadline:
                raise Failure(f"container {cid}: its process is not there to start")
    finally:
        os.close(fd)
    os.unlink(fifo)
    return 0


def cmd_state(cfg: Config, inv: Invocation) -> int:
    cid = inv.positional[0] if inv.positional else ""
    sdir, state = load_state(cfg, cid)
    status = status_of(sdir, state)
    print(
        json.dumps(
            {
                "ociVersion": "1.0.2",
                "id": cid,
                "status": status,
                "pid": state["pid"] if status != "stopped" else 0,
                "bundle": state["bundle"],
                "created": state["created"],
                "annotations": state["annotations"],
            },
            indent=2,
        )
    )
    return 0


def parse_signal(text: str) -> int:
    if text.isdigit():
        return int(text)
    name = text.upper()
    try:
        return int(signal.Signals[name if name.startswith("SIG") else "SIG" + name])
    except KeyError:
        raise Failure(f"unknown signal {text!r}") from None


def cmd_kill(cfg: Config, inv: Invocation) -> int:
    cid = inv.positional[0] if inv.positional else ""
    sig = parse_signal(inv.positional[1] if len(inv.positional) > 1 else "TERM")
    sdir, state = load_state(cfg, cid)
    if status_of(sdir, state) == "stopped":
        raise Failure(f"container {cid} is not running")
    os.kill(int(str(state["pid"])), sig)
    return 0


def cmd_delete(cfg: Config, inv: Invocation) -> int:
    cid = inv.positional[0] if inv.positional else ""
    force = "--force" in inv.options or "-f" in inv.options
    try:
        sdir, state = load_state(cfg, cid)
    except Failure:
        if force:
            return 0
        raise
    status = status_of(sdir, state)
    if status == "running" and not force:
        raise Failure(f"container {cid} is running: stop it first or use --force")
    procs = [(int(str(state["pid"])), str(state["starttime"]))]
    try:
        with open(f"{sdir}/qemu.pid") as f:
            qpid, _, qstart = f.read().strip().partition(" ")
        procs.append((int(qpid), qstart))
    except (OSError, ValueError):
        pass
    for pid, start in procs:
        if alive(pid, start):
            os.kill(pid, signal.SIGKILL)
    if not wait_gone(procs, 20):
        raise Failure(f"container {cid}: its process or L2's QEMU did not go away")
    shutil.rmtree(sdir)
    return 0


VERBS = {
    "create": cmd_create,
    "start": cmd_start,
    "state": cmd_state,
    "kill": cmd_kill,
    "delete": cmd_delete,
}


def main(argv: list[str]) -> int:
    inv = Invocation(argv)
    if "--version" in argv[:1] or inv.verb in ("--version", "-v"):
        print(VERSION)
        return 0
    try:
        path = inv.globals.get("--launcher-config")
        if not path:
            raise Failure("needs --launcher-config FILE")
        with open(path) as f:
            cfg = Config(json.load(f))
        verb = VERBS.get(inv.verb)
        if verb is None:
            raise Failure(f"{inv.verb or '(no command)'}: not supported by this test launcher")
        return verb(cfg, inv)
    except Failure as exc:
        log_error(inv, str(exc))
    except (OSError, ValueError, KeyError, subprocess.CalledProcessError) as exc:
        log_error(inv, f"{inv.verb}: {exc}")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
