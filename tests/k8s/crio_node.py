"""A CRI-O node of its own: the real crio (tests/k8s/crio_build.py), driven with crictl.

Its configuration is laid out as a node's would be, under a private root: <root>/etc/crio/
crio.conf (ours: private storage root and runroot, socket, exits, namespaces, logs, the
cgroupfs manager, runc with Debian's conmon as the default OCI runtime, no CNI plugins,
no NRI, a pause image of our own) and <root>/etc/crio/crio.conf.d/, where the drop-in is
the one `kata-vfio-ctl crio-register` writes; crio runs with --config and --config-dir
naming them, and <root>/usr/bin/crio is the binary, so `doctor` looks at this root as at a
node. Pods use the host's namespaces (network, IPC, PID): no CNI is needed. CRI-O's C helper
pinns, which pins a pod's own namespaces (here only UTS) on files, is not in any registry we
may use: `pinns_path` names PIN_NAMESPACES, ours, which does that job with util-linux's
`unshare --uts=FILE` (persistent namespaces) for the options CRI-O passes these pods.

The kata-vfio runtime is `runtime_type = "vm"`: CRI-O starts containerd-shim-kata-vfio-v2
with the containerd shim v2 protocol (`start`, then ttrpc), whose inner shim here is
Debian's containerd-shim-runc-v2 (the stand-in for Kata's). Images (busybox, a pause
image) are made here as OCI archives and put into CRI-O's storage with podman (the same
containers/storage); nothing is pulled from a registry. The host PCI view is a fake sysfs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fakesys import FakeSysfs
from k8s.node import (
    BUSYBOX_IMAGE,
    PAUSE_IMAGE,
    NodeError,
    _unmount_under,
    busybox_layer,
    make_v1_cgroup,
    oci_archive,
    poll_until,
    remove_v1_cgroup,
)

HANDLER = "kata-vfio"
# The inner shim kata-vfio's wrapper execs: runc's, standing in for Kata's. CRI-O gives every
# pod's infra container oomScoreAdj -998 (a fixed value, no setting to restrict it, unlike
# containerd's restrict_oom_score_adj); runc cannot write a value below its own process's
# without CAP_SYS_RESOURCE, which this machine withholds ("can't get final child's PID from
# pipe: EOF"), while Kata applies it inside its guest. On `start` (run in the bundle) the
# stand-in raises a lower value in config.json to this process's own, then execs runc's shim
# with the same argv.
STANDIN_SHIM = """\
#!{python}
import json, os, sys
if sys.argv[-1] == "start" and os.path.isfile("config.json"):
    with open("config.json") as f:
        spec = json.load(f)
    own = int(open("/proc/self/oom_score_adj").read())
    process = spec.get("process") or {{}}
    if process.get("oomScoreAdj", own) < own:
        process["oomScoreAdj"] = own
        with open("config.json.standin", "w") as f:
            json.dump(spec, f)
        os.replace("config.json.standin", "config.json")
os.execvp("containerd-shim-runc-v2", ["containerd-shim-runc-v2", *sys.argv[1:]])
"""


# What CRI-O runs as pinns (`pinns -d DIR -f NAME --uts [--ipc=host] [--net=host] [-s k=v+…]`):
# each namespace is kept on DIR/<ns>ns/NAME as a bind mount of its /proc/<pid>/ns file: a new
# one with `unshare --<ns>=FILE`, the host's ("=host") with `mount --bind /proc/self/ns/<ns>`.
# User and mount namespaces and sysctls are not what these pods ask for: refused in one line.
PIN_NAMESPACES = """#!{python}
import os, subprocess, sys
names = {{"-u": "uts", "--uts": "uts", "-i": "ipc", "--ipc": "ipc", "-n": "net",
          "--net": "net", "-c": "cgroup", "--cgroup": "cgroup"}}
given = {{"-d": "dir", "--dir": "dir", "-f": "filename", "--filename": "filename"}}
found, make, argv = {{}}, [], sys.argv[1:]
while argv:
    opt, _, val = argv.pop(0).partition("=")
    if opt in given:  # a value: -d DIR, --dir=DIR
        if not val and argv:
            val = argv.pop(0)
        found[given[opt]] = val
    elif opt in names:  # an optional value: --uts makes one, --ipc=host pins the host's
        make.append((names[opt], val == "host"))
    else:
        sys.exit(f"pin-namespaces: {{opt}} is not handled by this test node's stand-in for pinns")
if not found.get("dir") or not found.get("filename") or not make:
    sys.exit("pin-namespaces: usage: -d DIR -f NAME and at least one namespace to make")
args = []
for ns, host in make:
    os.makedirs(os.path.join(found["dir"], ns + "ns"), exist_ok=True)
    target = os.path.join(found["dir"], ns + "ns", found["filename"])
    open(target, "a").close()
    if host:
        subprocess.run(["mount", "--bind", f"/proc/self/ns/{{ns}}", target], check=True)
    else:
        args.append(f"--{{ns}}={{target}}")
if args:
    subprocess.run(["unshare", *args, "true"], check=True)
"""


def crio_config(top: Path, root: Path, pinns: Path) -> str:
    """crio.conf for a private CRI-O: every path it writes is under `top`."""
    return f"""\
# A private CRI-O for kata-vfio's tests: nothing of it outside {top}
[crio]
root = "{top}/storage"
runroot = "{top}/run"
storage_driver = "overlay"
log_dir = "{top}/pod-logs"
version_file = "{top}/version"
version_file_persist = "{top}/version-persist"
clean_shutdown_file = "{top}/clean.shutdown"

[crio.api]
# listen: on the command line (the node's usual <root>/var/run/crio/crio.sock, where
# doctor asks the running CRI-O)
stream_address = "127.0.0.1"
stream_port = "0"

[crio.runtime]
default_runtime = "runc"
cgroup_manager = "cgroupfs"
conmon_cgroup = "pod"
pinns_path = "{pinns}"
namespaces_dir = "{top}/ns"
container_exits_dir = "{top}/exits"
container_attach_socket_dir = "{top}/attach"
hooks_dir = ["{top}/hooks"]
cdi_spec_dirs = ["{top}/cdi"]
decryption_keys_path = "{top}/keys"
irqbalance_config_file = "{top}/irqbalance"
irqbalance_config_restore_file = "{top}/orig_irq_banned_cpus"

[crio.runtime.runtimes.runc]
runtime_path = "{shutil.which("runc") or "/usr/sbin/runc"}"
runtime_root = "{top}/runc"
monitor_path = "{shutil.which("conmon") or "/usr/bin/conmon"}"

[crio.image]
pause_image = "{PAUSE_IMAGE}"
# empty: the pause image's own entrypoint (sleep)
pause_command = ""
signature_policy = "{top}/policy.json"

[crio.network]
network_dir = "{top}/cni-conf"
plugin_dirs = ["{top}/cni-bin"]

[crio.nri]
enable_nri = false
"""


@dataclass
class CrioNode:
    top: Path
    fs: FakeSysfs
    crio_bins: Path  # crio (tests/k8s/crio_build.py)
    crictl: Path
    shim: Path  # containerd-shim-kata-vfio-v2
    ctl: Path  # kata-vfio-ctl
    root: Path = field(init=False)  # the node's /, as doctor sees it
    state_dir: Path = field(init=False)
    log_file: Path = field(init=False)
    sock: Path = field(init=False)
    env: dict[str, str] = field(init=False)
    cgroup_parent: str = field(init=False)
    proc: subprocess.Popen[bytes] | None = None
    _log: Any = None

    def __post_init__(self) -> None:
        self.root = self.top / "root"
        self.state_dir = self.top / "kata-vfio-state"
        self.log_file = self.top / "kata-vfio.log"
        self.sock = self.root / "var/run/crio/crio.sock"
        self.cgroup_parent = f"/kata-vfio-crio-{os.getpid()}"
        for d in (
            "cni-conf",
            "cni-bin",
            "hooks",
            "cdi",
            "keys",
            "ns",
            "exits",
            "attach",
            "pod-logs",
            "runc",
        ):
            (self.top / d).mkdir(parents=True, exist_ok=True)
        (self.top / "policy.json").write_text(
            json.dumps({"default": [{"type": "insecureAcceptAnything"}]})
        )
        standin = self.top / "bin" / "containerd-shim-standin-v2"
        standin.parent.mkdir()
        standin.write_text(STANDIN_SHIM.format(python=sys.executable))
        standin.chmod(0o755)
        config = self.top / "kata-vfio.toml"
        config.write_text(
            f'shim = "{standin}"\nsysfs = "{self.fs.root}"\n'
            f'log_file = "{self.log_file}"\nstate_dir = "{self.state_dir}"\n'
            # runc stands in for Kata: it cannot raise RLIMIT_MEMLOCK here
            "raise_memlock = false\n"
        )
        path = os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        # CRI-O hands its environment to the shims it starts (KATA_VFIO_CONFIG)
        self.env = {"PATH": path, "KATA_VFIO_CONFIG": str(config), "HOME": str(self.top)}
        (self.root / "usr/bin").mkdir(parents=True)
        (self.root / "usr/bin/crio").symlink_to(self.crio_bins / "crio")
        self.sock.parent.mkdir(parents=True)
        self.conf.parent.mkdir(parents=True)
        pinns = self.top / "bin" / "pin-namespaces"
        pinns.write_text(PIN_NAMESPACES.format(python=sys.executable))
        pinns.chmod(0o755)
        self.conf.write_text(crio_config(self.top, self.root, pinns))
        self.dropins.mkdir()

    @property
    def conf(self) -> Path:
        return self.root / "etc/crio/crio.conf"

    @property
    def dropins(self) -> Path:
        return self.root / "etc/crio/crio.conf.d"

    @property
    def dropin(self) -> Path:
        return self.dropins / "50-kata-vfio.conf"

    def register(self) -> subprocess.CompletedProcess[str]:
        """`kata-vfio-ctl crio-register`, as a user runs it, into this node's drop-ins
        (the FIFOs CRI-O makes for the shim in a runtime root of this node's own)."""
        return subprocess.run(
            [
                str(self.ctl),
                "crio-register",
                "--dropin",
                str(self.dropin),
                "--shim-path",
                str(self.shim),
                "--runtime-root",
                str(self.top / "vm-root"),
            ],
            env=self.env,
            text=True,
            capture_output=True,
        )

    # -- CRI-O itself
    def start(self, timeout: float = 120) -> None:
        make_v1_cgroup(self.cgroup_parent)
        self._log = open(self.top / "crio.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                str(self.crio_bins / "crio"),
                "--config",
                str(self.conf),
                "--config-dir",
                str(self.dropins),
                "--listen",
                str(self.sock),
            ],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.top,
        )
        deadline = time.monotonic() + timeout
        while self.crictl_run("version").returncode != 0:
            if self.proc.poll() is not None:
                raise NodeError(f"crio exited with {self.proc.returncode}:\n" + self.log_tail())
            if time.monotonic() > deadline:
                raise NodeError("crio did not come up:\n" + self.log_tail())
            time.sleep(0.3)

    def load_images(self) -> None:
        """busybox and the pause image into CRI-O's storage (podman, same storage)."""
        layer = busybox_layer()
        for ref, entrypoint in ((PAUSE_IMAGE, ["/bin/sleep", "2147483647"]), (BUSYBOX_IMAGE, None)):
            archive = oci_archive(
                self.top / (ref.split("/")[1].split(":")[0] + ".tar"), ref, layer, entrypoint
            )
            r = subprocess.run(
                [
                    "podman",
                    "--root",
                    str(self.top / "storage"),
                    "--runroot",
                    str(self.top / "run"),
                    "--storage-driver",
                    "overlay",
                    "pull",
                    "-q",
                    f"oci-archive:{archive}",
                ],
                env=self.env,
                text=True,
                capture_output=True,
                timeout=120,
            )
            if r.returncode != 0:
                raise NodeError(f"podman pull oci-archive:{archive}: {r.stderr.strip()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def teardown(self) -> None:
        with contextlib.suppress(Exception):
            if self.proc is not None and self.proc.poll() is None:
                for pod in self.crictl_run("pods", "-q").stdout.split():
                    self.crictl_run("stopp", pod)
                    self.crictl_run("rmp", "-f", pod)
        self.stop()
        # shims outlive CRI-O by design: end those of this node's bundles
        for pid in _processes_mentioning(str(self.top)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # what is left in this node's cgroups is this node's: a pod whose start failed
        # can leave runc's `runc init` waiting there once its shim is gone
        remove_v1_cgroup(self.cgroup_parent, kill_left=True)
        _unmount_under(self.top)

    def log_tail(self, chars: int = 4000) -> str:
        path = self.top / "crio.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    # -- crictl
    def crictl_run(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        config = self.top / "crictl.yaml"
        if not config.exists():
            config.write_text(
                json.dumps(
                    {
                        "runtime-endpoint": f"unix://{self.sock}",
                        "image-endpoint": f"unix://{self.sock}",
                        "timeout": 60,
                    }
                )
            )
        return subprocess.run(
            [str(self.crictl), "--config", str(config), *args],
            env=self.env,
            text=True,
            capture_output=True,
            timeout=timeout,
        )

    def crictl_ok(self, *args: str) -> str:
        r = self.crictl_run(*args)
        if r.returncode != 0:
            raise NodeError(f"crictl {' '.join(args)}: {r.stderr.strip()}\n" + self.log_tail(2500))
        return r.stdout

    def crictl_json(self, *args: str) -> Any:
        return json.loads(self.crictl_ok(*args))

    # -- pods
    def pod_config(self, name: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
        host = {"network": 2, "pid": 2, "ipc": 2}  # NODE: the host's namespaces
        return {
            "metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}", "attempt": 0},
            "annotations": annotations or {},
            "log_directory": str(self.top / "pod-logs" / name),
            "linux": {
                "cgroup_parent": f"{self.cgroup_parent}/{name}",
                "security_context": {"namespace_options": host},
            },
        }

    def container_config(self, command: list[str]) -> dict[str, Any]:
        return {
            "metadata": {"name": "app"},
            "image": {"image": BUSYBOX_IMAGE},
            "command": command,
            "log_path": "app.log",
            "linux": {},
        }

    def run_pod(self, name: str, annotations: dict[str, str] | None = None) -> str:
        """`crictl runp --runtime kata-vfio`: the pod sandbox's id."""
        path = self.top / f"{name}-pod.json"
        path.write_text(json.dumps(self.pod_config(name, annotations)))
        return self.crictl_ok("runp", "--runtime", HANDLER, str(path)).strip()

    def create_container(self, pod_id: str, name: str, command: list[str]) -> str:
        pod = self.top / f"{name}-pod.json"
        ctr = self.top / f"{name}-ctr.json"
        ctr.write_text(json.dumps(self.container_config(command)))
        return self.crictl_ok("create", pod_id, str(ctr), str(pod)).strip()

    def remove_pod(self, pod_id: str) -> None:
        self.crictl_ok("stopp", pod_id)
        self.crictl_ok("rmp", pod_id)

    def claims(self) -> dict[str, dict[str, Any]]:
        from ledgerfiles import claims

        return claims(self.state_dir)

    def events(self) -> list[dict[str, Any]]:
        if not self.log_file.exists():
            return []
        return [json.loads(line) for line in self.log_file.read_text().splitlines() if line]

    def wait_for(self, check: Any, timeout: float, what: str) -> Any:
        return poll_until(check, timeout, what, lambda: "crio: " + self.log_tail(3000))


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    needle = text.encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            argv = (proc / "cmdline").read_bytes()
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if argv.split(b"\0")[0].endswith(b"-v2") and (needle in argv or cwd.startswith(text)):
            pids.append(int(proc.name))
    return pids


@contextlib.contextmanager
def crio_node(
    top: Path, fs: FakeSysfs, crio_bins: Path, crictl: Path, shim: Path, ctl: Path
) -> Iterator[CrioNode]:
    node = CrioNode(top, fs, crio_bins, crictl, shim, ctl)
    try:
        yield node
    finally:
        node.teardown()


def require_tools() -> str | None:
    for tool in ("runc", "conmon", "containerd-shim-runc-v2", "podman"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian's runc, conmon, containerd, podman)"
    if not Path("/bin/busybox").exists():
        return "/bin/busybox is not installed (Debian's busybox-static)"
    return None
