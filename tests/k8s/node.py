"""A Kubernetes node of its own: a real kubelet on a private containerd's CRI plugin.

No apiserver: the kubelet runs standalone, takes its pods from --pod-manifest-path (static
pods, written and removed as files) and serves its own APIs (the read-only port's /pods,
the PodResources socket). Its --root-dir is private, so is its device-plugins directory
(<root-dir>/device-plugins/kubelet.sock, where plugins register).

containerd (Debian's 1.6, or containerd 2 built by build.py for CDI, with its CRI plugin;
a containerd 2 node resolves CDI names from a private spec directory) has its own root,
state, sockets and configuration: images come from OCI archives made here from busybox
and imported with `ctr` (there is no image registry: the pod sandbox image is one of
them), the default
runtime is `kata-vfio` as `kata-vfio-ctl containerd-register` writes it: the shim wrapper
containerd-shim-kata-vfio-v2, whose inner shim is containerd-shim-runc-v2 (the stand-in
for Kata's). Pods use the host's network (no CNI). The host's PCI view is a fake sysfs.

What the kubelet would change on the host it is kept from: it runs in a mount namespace of
its own in which the kernel settings it sets at start (vm.overcommit_memory, kernel.panic,
kernel.panic_on_oops, ...) are private files, and its cgroups live under a cgroup root of
its own that is removed afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fakesys import FakeSysfs

NODE_NAME = "kata-vfio-node"
NAMESPACE = "k8s.io"  # containerd's namespace for CRI
PAUSE_IMAGE = "kata-vfio.test/pause:1"
BUSYBOX_IMAGE = "kata-vfio.test/busybox:1"
APPLETS = ("sh", "cat", "stat", "sleep", "ls", "echo", "true", "env", "test")
# What the kubelet writes at start unless it finds it so (its container manager's kernel
# tunables); inside its own mount namespace these are bind mounts of private copies
KERNEL_TUNABLES = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)
CGROUP_V1 = Path("/sys/fs/cgroup")
DEVICE_PLUGINS = Path("/var/lib/kubelet/device-plugins")  # fixed in the kubelet


class NodeError(Exception):
    pass


# -- images ---------------------------------------------------------------------------------
def _tar_add(
    tar: tarfile.TarFile,
    name: str,
    data: bytes | None = None,
    *,
    kind: bytes = tarfile.REGTYPE,
    mode: int = 0o755,
    link: str = "",
) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime, info.linkname = kind, mode, 0, link
    info.size = len(data or b"")
    tar.addfile(info, io.BytesIO(data) if data else None)


def busybox_layer() -> bytes:
    """One uncompressed layer: /bin/busybox (Debian's busybox-static) and some applets."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("bin", "dev", "proc", "sys", "tmp", "etc", "run"):
            _tar_add(tar, d, kind=tarfile.DIRTYPE)
        _tar_add(tar, "bin/busybox", Path("/bin/busybox").read_bytes())
        for applet in APPLETS:
            _tar_add(tar, f"bin/{applet}", kind=tarfile.SYMTYPE, mode=0o777, link="busybox")
    return buf.getvalue()


def oci_archive(out: Path, ref: str, layer: bytes, entrypoint: list[str] | None) -> Path:
    """An OCI image layout as a tar, named `ref` for containerd's importer."""
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> dict[str, Any]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"digest": digest, "size": len(data)}

    layer_desc = blob(layer)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], **({"Entrypoint": entrypoint} if entrypoint else {})},
        "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]},
    }
    config_desc = blob(json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config_desc},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **layer_desc}],
    }
    manifest_desc = blob(json.dumps(manifest).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **manifest_desc,
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {
                    "io.containerd.image.name": ref,
                    "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[1],
                },
            }
        ],
    }
    with tarfile.open(out, "w") as tar:
        _tar_add(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}', mode=0o644)
        _tar_add(tar, "index.json", json.dumps(index).encode(), mode=0o644)
        _tar_add(tar, "blobs", kind=tarfile.DIRTYPE)
        _tar_add(tar, "blobs/sha256", kind=tarfile.DIRTYPE)
        for digest, data in blobs.items():
            _tar_add(tar, f"blobs/sha256/{digest.split(':')[1]}", data, mode=0o644)
    return out


# -- configuration ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def containerd_config(top: Path, sock: Path, cdi_dir: Path | None = None) -> str:
    """containerd 1.6, CRI plugin on, default runtime kata-vfio (its table is added by
    `kata-vfio-ctl containerd-register`), no CNI, images only from our archives. With
    `cdi_dir` (containerd 2, which reads this version 2 file as it migrates it): CDI on,
    specs only from that directory (not the host's /etc/cdi and /var/run/cdi)."""
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    cdi = [f"  enable_cdi = {'true' if cdi_dir else 'false'}"]
    if cdi_dir is not None:
        cdi.append(f'  cdi_spec_dirs = ["{cdi_dir}"]')
    return "\n".join(
        [
            "version = 2",
            f'root = "{top / "root"}"',
            f'state = "{top / "state"}"',
            f'[grpc]\n  address = "{sock}"',
            f'[ttrpc]\n  address = "{sock}.ttrpc"',
            f'[debug]\n  address = "{sock}.debug"',
            f"[{cri}]",
            f'  sandbox_image = "{PAUSE_IMAGE}"',
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
            *cdi,
            # no CAP_SYS_RESOURCE on this machine: a container may not get a lower
            # oom_score_adj than containerd's (the kubelet asks -998 for sandboxes)
            "  restrict_oom_score_adj = true",
            f"[{cri}.containerd]",
            '  default_runtime_name = "kata-vfio"',
            '  snapshotter = "overlayfs"',
            f"[{cri}.cni]",
            f'  bin_dir = "{top / "cni-bin"}"',
            f'  conf_dir = "{top / "cni-conf"}"',
            "",
        ]
    )


def kubelet_config(node: KubeletNode) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "staticPodPath": str(node.manifests),
        "fileCheckFrequency": "1s",
        "syncFrequency": "5s",
        "containerRuntimeEndpoint": f"unix://{node.containerd_sock}",
        "imageServiceEndpoint": f"unix://{node.containerd_sock}",
        # no systemd here (the machine's init is not systemd): containerd's runc shim
        # without options uses cgroupfs too
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": node.cgroup_root,
        "failSwapOn": False,
        "failCgroupV1": False,
        "address": "127.0.0.1",
        "port": node.port,
        "readOnlyPort": node.read_only_port,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": node.healthz_port,
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "podLogsDir": str(node.top / "pod-logs"),
        "volumePluginDir": str(node.top / "volume-plugins"),
        "makeIPTablesUtilChains": False,
        "hairpinMode": "none",
        "resolvConf": "/etc/resolv.conf",
        # the machine's disks and memory belong to others too: never evict, never GC
        "evictionHard": {
            "memory.available": "1Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "shutdownGracePeriod": "0s",
        "registerNode": False,
        "serializeImagePulls": False,
    }


# -- the node -------------------------------------------------------------------------------
@dataclass
class KubeletNode:
    top: Path
    fs: FakeSysfs
    bins: Path  # kubelet and crictl (tests/k8s/build.py)
    shim: Path  # containerd-shim-kata-vfio-v2
    ctl: Path  # kata-vfio-ctl
    containerd_bins: Path | None = None  # containerd 2's (build.py --containerd); None: PATH's
    state_dir: Path = field(init=False)
    log_file: Path = field(init=False)
    manifests: Path = field(init=False)
    root_dir: Path = field(init=False)
    containerd_sock: Path = field(init=False)
    env: dict[str, str] = field(init=False)
    cgroup_root: str = field(init=False)
    port: int = field(default_factory=free_port)
    read_only_port: int = field(default_factory=free_port)
    healthz_port: int = field(default_factory=free_port)
    _procs: list[tuple[subprocess.Popen[bytes], Any]] = field(default_factory=list)
    kubelet_proc: subprocess.Popen[bytes] | None = None
    _created: list[Path] = field(default_factory=list)  # host directories made for it

    def __post_init__(self) -> None:
        self.state_dir = self.top / "kata-vfio-state"
        self.log_file = self.top / "kata-vfio.log"
        self.manifests = self.top / "manifests"
        self.root_dir = self.top / "kubelet"
        self.containerd_sock = self.top / "containerd.sock"
        self.cgroup_root = f"/kata-vfio-kubelet-{os.getpid()}-{self.top.name}"
        for d in (
            self.manifests,
            self.root_dir,
            self.top / "cni-bin",
            self.top / "cni-conf",
            self.top / "pod-logs",
            self.top / "volume-plugins",
        ):
            d.mkdir(parents=True, exist_ok=True)

    # -- paths the tests use
    @property
    def cdi_dir(self) -> Path | None:
        """Where containerd 2 reads CDI specs (None: containerd 1.6, no CDI)."""
        return self.top / "cdi" if self.containerd_bins is not None else None

    @property
    def device_plugins(self) -> Path:
        return self.root_dir / "device-plugins"

    @property
    def pod_resources_sock(self) -> Path:
        return self.root_dir / "pod-resources" / "kubelet.sock"

    # -- starting and stopping
    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.top / f"{name}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._procs.append((proc, log))
        return proc

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.top / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def start_containerd(self) -> None:
        config = self.top / "kata-vfio.toml"
        config.write_text(
            f'shim = "containerd-shim-runc-v2"\nsysfs = "{self.fs.root}"\n'
            f'log_file = "{self.log_file}"\nstate_dir = "{self.state_dir}"\n'
            # runc stands in for Kata: it cannot raise RLIMIT_MEMLOCK here
            "raise_memlock = false\n"
        )
        # containerd 1.6 ignores the runtime_path kata-vfio-ctl writes (1.7 reads it) and
        # looks for containerd-shim-kata-vfio-v2 on its PATH
        bindir = self.top / "bin"
        bindir.mkdir(exist_ok=True)
        (bindir / self.shim.name).symlink_to(self.shim)
        path = os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        # containerd 2's own runc shim is not on the PATH: it answers `start` with
        # bootstrap version 3, and containerd 2 then creates the pod's other containers
        # in the sandbox's shim without running any shim binary, the wrapper included.
        # Debian's (1.6) answers with a plain address (as shims on containerd 1.x's shim
        # library do), so containerd 2 runs the wrapper for every container
        self.env = {
            "PATH": f"{bindir}:{path}",
            "KATA_VFIO_CONFIG": str(config),
            "HOME": str(self.top),
        }
        conf = self.top / "containerd.toml"
        if self.cdi_dir is not None:
            self.cdi_dir.mkdir(exist_ok=True)
        conf.write_text(containerd_config(self.top, self.containerd_sock, self.cdi_dir))
        # the runtime table is the one users get from kata-vfio-ctl
        subprocess.run(
            [
                str(self.ctl),
                "containerd-register",
                "--conf",
                str(conf),
                "--shim-path",
                str(self.shim),
            ],
            check=True,
            capture_output=True,
            env=self.env,
        )
        binary = str(self.containerd_bins / "containerd") if self.containerd_bins else "containerd"
        proc = self._spawn("containerd", [binary, "--config", str(conf)])
        deadline = time.monotonic() + 60
        while self.ctr("version").returncode != 0:
            if proc.poll() is not None:
                raise NodeError("containerd exited:\n" + self.log_tail("containerd"))
            if time.monotonic() > deadline:
                raise NodeError("containerd did not come up:\n" + self.log_tail("containerd"))
            time.sleep(0.2)
        layer = busybox_layer()
        for ref, entrypoint in ((PAUSE_IMAGE, ["/bin/sleep", "2147483647"]), (BUSYBOX_IMAGE, None)):
            archive = oci_archive(self.top / f"{ref.split('/')[1]}.tar", ref, layer, entrypoint)
            result = self.ctr("-n", NAMESPACE, "images", "import", str(archive))
            if result.returncode != 0:
                raise NodeError(f"ctr images import {archive}: {result.stderr.strip()}")

    def start_kubelet(self) -> None:
        config = self.top / "kubelet.yaml"
        config.write_text(json.dumps(kubelet_config(self), indent=1))  # JSON is YAML
        make_v1_cgroup(self.cgroup_root)
        private = self.top / "proc-sys"
        # unshare gives the kubelet a private mount namespace; the kernel settings it
        # writes are bind mounts of copies there (the host keeps its own)
        script = ["set -e"]
        for i, name in enumerate(KERNEL_TUNABLES):
            source = Path("/proc/sys") / name
            if source.exists():
                copy = private / str(i)
                script.append(f"cat {source} > {copy}; mount --bind {copy} {source}")
        private.mkdir(exist_ok=True)
        # the kubelet's device manager serves /var/lib/kubelet/device-plugins whatever its
        # --root-dir: in its namespace that path is <root-dir>/device-plugins
        self.device_plugins.mkdir(exist_ok=True)
        for d in (DEVICE_PLUGINS.parent, DEVICE_PLUGINS):
            if not d.exists():
                d.mkdir()
                self._created.append(d)
        script.append(f"mount --bind {self.device_plugins} {DEVICE_PLUGINS}")
        script.append('exec "$@"')
        cmd = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "\n".join(script),
            "kubelet",
            str(self.bins / "kubelet"),
            f"--config={config}",
            f"--root-dir={self.root_dir}",
            f"--cert-dir={self.top / 'pki'}",
            f"--hostname-override={NODE_NAME}",
            "--v=2",
        ]
        self.kubelet_proc = self._spawn("kubelet", cmd)
        deadline = time.monotonic() + 120
        while not self.healthy():
            if self.kubelet_proc.poll() is not None:
                raise NodeError("the kubelet exited:\n" + self.log_tail("kubelet"))
            if time.monotonic() > deadline:
                raise NodeError("the kubelet did not become healthy:\n" + self.log_tail("kubelet"))
            time.sleep(0.5)

    def stop_kubelet(self) -> None:
        proc = self.kubelet_proc
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def teardown(self) -> None:
        """Pods, kubelet, containers, containerd, cgroups: everything this node started."""
        for manifest in self.manifests.iterdir():
            manifest.unlink()
        if self.kubelet_proc is not None and self.kubelet_proc.poll() is None:
            with contextlib.suppress(Exception):
                # stopped is enough: the sandboxes are removed below (the kubelet takes
                # its time to remove those of static pods, 30 s and more)
                self.wait_for(
                    lambda: all(
                        p["state"] == "SANDBOX_NOTREADY"
                        for p in self.crictl_json("pods", "-o", "json")["items"]
                    ),
                    30,
                    "the kubelet to stop its pods",
                )
        self.stop_kubelet()
        with contextlib.suppress(Exception):
            for pod in self.crictl_json("pods", "-q", raw=True).split():
                self.crictl("stopp", pod)
                self.crictl("rmp", "-f", pod)
        for proc, log in reversed(self._procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
            log.close()
        # shims outlive containerd by design: end those of this containerd
        for pid in _shims_of(self.containerd_sock):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        remove_v1_cgroup(self.cgroup_root)
        _unmount_under(self.top)
        for d in reversed(self._created):
            with contextlib.suppress(OSError):
                d.rmdir()

    # -- looking at it
    def ctr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        ctr = str(self.containerd_bins / "ctr") if self.containerd_bins else "ctr"
        return subprocess.run(
            [ctr, "--address", str(self.containerd_sock), *args],
            env=self.env,
            text=True,
            capture_output=True,
            timeout=timeout,
        )

    def crictl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        config = self.top / "crictl.yaml"
        if not config.exists():
            config.write_text(
                json.dumps(
                    {
                        "runtime-endpoint": f"unix://{self.containerd_sock}",
                        "image-endpoint": f"unix://{self.containerd_sock}",
                        "timeout": 30,
                    }
                )
            )
        return subprocess.run(
            [str(self.bins / "crictl"), "--config", str(config), *args],
            env=self.env,
            text=True,
            capture_output=True,
            timeout=timeout,
        )

    def crictl_json(self, *args: str, raw: bool = False) -> Any:
        result = self.crictl(*args)
        if result.returncode != 0:
            raise NodeError(f"crictl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout if raw else json.loads(result.stdout)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.healthz_port}/healthz", timeout=2
            ) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def kubelet_pods(self) -> list[dict[str, Any]]:
        """The pods the kubelet itself reports (its read-only port's /pods)."""
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.read_only_port}/pods", timeout=10
        ) as r:
            return list(json.load(r)["items"] or [])  # null before the first pod

    def ledger(self) -> Any:
        from kata_vfio_host.ledger import Host

        return Host(self.fs.root, self.state_dir)

    def claims(self) -> dict[str, dict[str, Any]]:
        """group -> its claim as the ledger records it (the ledger's own reader)."""
        from kata_vfio_host.ledger import read_journal_file

        return {str(g): c.to_obj() for g, c in read_journal_file(self.ledger()).claims.items()}

    def holders(self) -> dict[int, str]:
        """group -> the container id holding it now (live claims only)."""
        from kata_vfio_ctl.plugin_ledger import live_holders

        return live_holders(self.ledger())

    def events(self) -> list[dict[str, Any]]:
        if not self.log_file.exists():
            return []
        return [json.loads(line) for line in self.log_file.read_text().splitlines() if line]

    # -- pods
    def write_pod(
        self,
        name: str,
        command: list[str],
        *,
        annotations: dict[str, str] | None = None,
        limits: dict[str, str] | None = None,
        restart: str = "Never",
    ) -> Path:
        """A static pod of one container `app` on the host's network."""
        container: dict[str, Any] = {
            "name": "app",
            "image": BUSYBOX_IMAGE,
            "imagePullPolicy": "Never",
            "command": command,
        }
        if limits:
            container["resources"] = {"limits": limits}
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "annotations": annotations or {}},
            "spec": {
                "hostNetwork": True,
                "dnsPolicy": "Default",
                "restartPolicy": restart,
                "terminationGracePeriodSeconds": 1,
                "containers": [container],
            },
        }
        path = self.manifests / f"{name}.json"
        tmp = self.top / f".{name}.json"  # the kubelet reads every file there: move in whole
        tmp.write_text(json.dumps(pod))
        os.replace(tmp, path)
        return path

    def delete_pod(self, name: str) -> None:
        (self.manifests / f"{name}.json").unlink()

    def sandbox(self, name: str) -> dict[str, Any] | None:
        pods = self.crictl_json(
            "pods", "--label", f"io.kubernetes.pod.name={name}-{NODE_NAME}", "-o", "json"
        )["items"]
        return pods[0] if pods else None

    def container(self, name: str, container: str = "app") -> dict[str, Any] | None:
        sandbox = self.sandbox(name)
        if sandbox is None:
            return None
        items = self.crictl_json(
            "ps", "-a", "--pod", sandbox["id"], "--name", f"^{container}$", "-o", "json"
        )["containers"]
        return items[0] if items else None

    def wait_for(self, check: Any, timeout: float, what: str) -> Any:
        return poll_until(
            check, timeout, what, lambda: "kubelet: " + self.log_tail("kubelet", 4000)
        )

    def wait_exited(self, name: str, timeout: float = 120) -> dict[str, Any]:
        def exited() -> dict[str, Any] | None:
            c = self.container(name)
            return c if c is not None and c["state"] == "CONTAINER_EXITED" else None

        return self.wait_for(exited, timeout, f"pod {name}'s container to exit")  # type: ignore[no-any-return]

    def log_files(self, name: str, container: str = "app") -> list[Path]:
        """The kubelet's log files of a static pod's container (<podLogsDirectory>/
        <namespace>_<pod>_<uid>/<container>/<restart>.log), CRI log format."""
        pattern = f"default_{name}-{NODE_NAME}_*/{container}/*.log"
        return sorted((self.top / "pod-logs").glob(pattern))

    def first_line_seconds(
        self, name: str, command: list[str], timeout: float = 120, **pod: Any
    ) -> tuple[float, str]:
        """Seconds from writing a static pod's manifest to its container's first output
        line in the kubelet's log file, and that line (for the benchmark)."""
        started = time.monotonic()
        self.write_pod(name, command, **pod)
        deadline = started + timeout
        while time.monotonic() < deadline:
            for f in self.log_files(name):
                text = f.read_text(errors="replace")
                if "\n" in text:
                    # CRI log line: <time> <stream> <P|F> <text>
                    return time.monotonic() - started, text.split("\n")[0].split(" ", 3)[-1]
            time.sleep(0.01)
        raise NodeError(
            f"pod {name} printed nothing in {timeout:.0f} s\n" + self.log_tail("kubelet", 3000)
        )

    def logs(self, container_id: str) -> str:
        result = self.crictl("logs", container_id)
        return result.stdout + result.stderr

    def spec_of(self, container_id: str) -> dict[str, Any]:
        """The OCI spec containerd's CRI generated and the shim wrapper edited (the
        bundle's config.json, what the runtime really ran)."""
        bundle = self.top / "state" / "io.containerd.runtime.v2.task" / NAMESPACE / container_id
        return json.loads((bundle / "config.json").read_text())  # type: ignore[no-any-return]


def _shims_of(sock: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"-v2") and str(sock).encode() in argv:
            pids.append(int(proc.name))
    return pids


def _unmount_under(top: Path) -> None:
    """containerd's overlay and shm mounts of this node's pods, innermost first."""
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    for target in sorted(
        (m for m in mounts if m.startswith(str(top) + "/")), key=len, reverse=True
    ):
        subprocess.run(["umount", "-l", target], capture_output=True)


@contextlib.contextmanager
def running_node(
    top: Path, fs: FakeSysfs, bins: Path, shim: Path, ctl: Path, containerd_bins: Path | None = None
) -> Iterator[KubeletNode]:
    node = KubeletNode(top, fs, bins, shim, ctl, containerd_bins)
    try:
        node.start_containerd()
        node.start_kubelet()
        yield node
    finally:
        node.teardown()


def kubelet_version(bins: Path) -> str:
    return subprocess.run(
        [str(bins / "kubelet"), "--version"], capture_output=True, text=True
    ).stdout.strip()


def require_tools() -> str | None:
    """What is missing for a node here, or None."""
    for tool in ("containerd", "ctr", "containerd-shim-runc-v2", "runc", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian's containerd, runc, util-linux)"
    if not Path("/bin/busybox").exists():
        return "/bin/busybox is not installed (Debian's busybox-static)"
    return None


# -- a node's cgroups of its own (cgroupfs on this host's v1 hierarchies) ---------------------


def cgroup_v1_hierarchies() -> list[Path]:
    if not CGROUP_V1.is_dir():
        return []
    return [
        p
        for p in CGROUP_V1.iterdir()
        if p.is_dir() and not p.is_symlink() and (p / "cgroup.procs").exists()
    ]


def make_v1_cgroup(name: str) -> None:
    """`name` (e.g. /kata-vfio-kubelet-PID) in every hierarchy; cpuset's needs its values."""
    for hierarchy in cgroup_v1_hierarchies():
        d = hierarchy / name.lstrip("/")
        d.mkdir(exist_ok=True)
        if hierarchy.name == "cpuset":
            for attr in ("cpuset.cpus", "cpuset.mems"):
                (d / attr).write_text((hierarchy / attr).read_text())


def remove_v1_cgroup(name: str, *, kill_left: bool = False) -> None:
    """`name` and everything below it, deepest first; `kill_left`: first SIGKILL what is
    still in it (a node's own processes only ever run there)."""
    for _ in range(50 if kill_left else 0):
        left = {
            int(pid)
            for hierarchy in cgroup_v1_hierarchies()
            for procs in (hierarchy / name.lstrip("/")).rglob("cgroup.procs")
            for pid in procs.read_text().split()
        }
        if not left:
            break
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    for hierarchy in cgroup_v1_hierarchies():
        top = hierarchy / name.lstrip("/")
        if not top.is_dir():
            continue
        for d in sorted(
            (p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
        ):
            with contextlib.suppress(OSError):
                d.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()


def poll_until(check: Any, timeout: float, what: str, log_tail: Any) -> Any:
    """check()'s first true value, polled every 0.2 s; after `timeout` s a NodeError naming
    `what`, with `log_tail()` (the node's log) to show why."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise NodeError(f"timed out after {timeout:.0f} s waiting for {what}\n" + log_tail())
        time.sleep(0.2)
