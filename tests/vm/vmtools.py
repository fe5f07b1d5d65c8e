"""A QEMU guest with a virtual IOMMU, for tests, the demo and the benchmarks.

`make initrd`'s image is booted unchanged; a second, test-only cpio archive is
appended (the kernel unpacks both) with busybox, runc, a tiny container, the
native drivers of the emulated devices and the scenarios to run. The guest's
PID 1 is that archive's /kvfio/init (rdinit=), which reports on the serial
console in "KVFIO <json>" lines. TCG only: nested KVM hangs on these machines.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent / "initrd"))
from pyclosure import closure, shared_libs  # noqa: E402

from kata_vfio.pci import PciIdentity  # noqa: E402

GUEST_PYTHON = "/usr/bin/python3.11"
HOOK_IN_GUEST = "/usr/share/oci/hooks/prestart/kata-vfio-hook"


@dataclass(frozen=True)
class EmulatedDevice:
    """One QEMU device, with the PCI identity a host would report for it."""

    qemu: str  # -device argument
    guest_driver: str  # the native guest driver module
    identity: PciIdentity
    mac: str | None = None
    netdev: str | None = None  # a -netdev argument the device needs, given before it
    drive: str | None = None  # a -drive argument the device needs, given before it


E1000E_ID = PciIdentity(0x8086, 0x10D3, 0x8086, 0x0000, 0x020000)
E1000_ID = PciIdentity(0x8086, 0x100E, 0x1AF4, 0x1100, 0x020000)
NVME_ID = PciIdentity(0x1B36, 0x0010, 0x1AF4, 0x1100, 0x010802)


def e1000e(mac: str, **placement: str) -> EmulatedDevice:
    where = "".join(f",{k}={v}" for k, v in placement.items())
    return EmulatedDevice(f"e1000e,mac={mac}{where}", "e1000e", E1000E_ID, mac)


def e1000e_on_hub(mac: str, port: str, hub: int = 0, **placement: str) -> EmulatedDevice:
    """An e1000e on port `port` of QEMU hub `hub`: two on one hub forward to each other
    (LAB.md section 1), without any network outside the VM. No option ROM: nothing boots
    from it."""
    where = "".join(f",{k}={v}" for k, v in placement.items())
    return EmulatedDevice(
        f"e1000e,netdev={port},mac={mac},romfile={where}",
        "e1000e",
        E1000E_ID,
        mac,
        netdev=f"hubport,id={port},hubid={hub}",
    )


def e1000(mac: str, **placement: str) -> EmulatedDevice:
    where = "".join(f",{k}={v}" for k, v in placement.items())
    return EmulatedDevice(f"e1000,mac={mac}{where}", "e1000", E1000_ID, mac)


def nvme(serial: str, **placement: str) -> EmulatedDevice:
    where = "".join(f",{k}={v}" for k, v in placement.items())
    return EmulatedDevice(f"nvme,serial={serial}{where}", "nvme", NVME_ID)


def nvme_with_disk(serial: str, image: Path, **placement: str) -> EmulatedDevice:
    """An NVMe drive with one namespace backed by the raw file `image` (nvmeXn1 and its
    partitions in the guest)."""
    where = "".join(f",{k}={v}" for k, v in placement.items())
    drive_id = f"kvdisk-{serial}"
    return EmulatedDevice(
        f"nvme,serial={serial},drive={drive_id}{where}",
        "nvme",
        NVME_ID,
        drive=f"file={image},if=none,id={drive_id},format=raw",
    )


def nvme_sriov_pf(max_vfs: int, **placement: str) -> tuple[EmulatedDevice, ...]:
    """QEMU's NVMe controller as an SR-IOV PF (its subsystem device first); each VF gets
    its own IOMMU group in the guest."""
    where = "".join(f",{k}={v}" for k, v in placement.items())
    return (
        EmulatedDevice("nvme-subsys,id=kvsub0,nqn=kvsub0", "nvme", NVME_ID),
        EmulatedDevice(
            f"nvme,serial=kvfio-pf,subsys=kvsub0,sriov_max_vfs={max_vfs},"
            f"sriov_vq_flexible={2 * max_vfs},sriov_vi_flexible={max_vfs},"
            f"max_ioqpairs={2 * max_vfs + 2},msix_qsize={max_vfs + 2}{where}",
            "nvme",
            NVME_ID,
        ),
    )


# The default guest: two e1000e and an NVMe drive on the root complex (a group each),
# and two e1000 behind a PCIe-to-PCI bridge (one group, bridge included).
BRIDGE = "pcie-pci-bridge,id=pbr,bus=pcie.0,addr=0x8"
DEFAULT_DEVICES = (
    e1000e("52:54:00:00:00:01", addr="0x3"),
    e1000e("52:54:00:00:00:02", addr="0x4"),
    nvme("kvfio-nvme-1", addr="0x5"),
    e1000("52:54:00:00:01:01", bus="pbr", addr="0x1"),
    e1000("52:54:00:00:01:02", bus="pbr", addr="0x2"),
)


RUN_SCENARIO = '#!/kvfio/bin/sh\nexec /usr/bin/python3 -I -S /kvfio/scenario.py "$1"\n'


@dataclass
class Scenario:
    """A container to create in the guest: its manifest and what its process runs."""

    name: str
    manifest_json: str
    command: list[str] = field(
        default_factory=lambda: ["/usr/bin/python3", "-I", "-S", "/check.py"]
    )
    script: str | None = None  # a shell script run instead of the container (bench)
    files: dict[str, str] = field(default_factory=dict)  # extra files in the scenario dir
    spec: dict[str, Any] | None = None  # the bundle's whole config.json (else container_spec)


def kernel_image(kver: str) -> Path:
    return Path(f"/boot/vmlinuz-{kver}")


MERGED_USR = ("bin", "sbin", "lib", "lib64")  # symlinks into /usr in the dracut image


def _copy(src: str | Path, root: Path, dst: str | Path | None = None) -> None:
    rel = str(dst or src).lstrip("/")
    if rel.split("/", 1)[0] in MERGED_USR:
        rel = "usr/" + rel  # a real /lib in the appended archive would replace the symlink
    target = root / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, target, follow_symlinks=True)


def native_modules(kver: str, drivers: list[str]) -> list[str]:
    """insmod order for the drivers and their dependencies."""
    ordered: list[str] = []
    for drv in drivers:
        out = subprocess.run(
            ["modprobe", "--show-depends", "-S", kver, drv],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for line in out.splitlines():
            if line.startswith("insmod "):
                ko = line.split()[1]
                if ko not in ordered:
                    ordered.append(ko)
    return ordered


def container_spec(name: str, scenario: Scenario) -> dict[str, Any]:
    spec = _runc_spec()
    spec["process"]["terminal"] = False
    spec["process"]["args"] = scenario.command
    spec["root"] = {"path": "/kvfio/ctr/rootfs", "readonly": True}
    spec["hostname"] = name
    spec["mounts"].append(
        {"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro"]}
    )
    spec["hooks"] = {"prestart": [guest_prestart_hook()]}
    spec["annotations"] = {"io.kata-vfio.manifest": scenario.manifest_json}
    return spec


def guest_prestart_hook() -> dict[str, Any]:
    """Our hook as an OCI prestart hook, as kata-agent runs guest hooks: [name, "prestart"],
    empty environment, 10 s."""
    return {"path": HOOK_IN_GUEST, "args": ["kata-vfio-hook", "prestart"], "env": [], "timeout": 10}


def _runc_spec() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["runc", "spec", "--bundle", tmp], check=True)
        return json.loads((Path(tmp) / "config.json").read_text())


STDLIB_SKIP = (
    "test",
    "idlelib",
    "tkinter",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "turtledemo",
    "__pycache__",
)


# The guest-side test programs, each named: nothing goes into a test VM by pattern.
GUEST_PROGRAMS = {
    "guest-scenario.py": "/kvfio/scenario.py",
    "guest-hosttest.py": "/kvfio/hosttest.py",
    "guest-bench.py": "/kvfio/bench.py",
    "guest-sriov.py": "/kvfio/sriov.py",
    "guest-bindbench.py": "/kvfio/bindbench.py",
    "guest-netdevsim.py": "/kvfio/netdevsim.py",
    "guest-bindtrace.py": "/kvfio/bindtrace.py",
    "guest-persist.py": "/kvfio/persist.py",
    "guest-plugin.py": "/kvfio/plugin.py",
}
HOST_PACKAGES = (
    "kata_vfio",
    "kata_vfio_host",
    "kata_vfio_ctl",
    "kata_vfio_runtime",
    "pyroute2",
    "psutil",
    "tomlkit",
    "jsonschema",
    "jsonschema_specifications",
    "referencing",
    "rpds",
    "attr",
    "attrs",
    "typing_extensions.py",
    "structlog",
)
PLUGIN_PACKAGES = ("grpc", "google")  # the device plugin's gRPC: grpcio, protobuf


def add_host_tools(root: Path, more: tuple[str, ...] = ()) -> None:
    """kata-vfio-ctl and what it imports (pyroute2, psutil, ...), and the whole standard
    library: the guest then plays an IOMMU host for the host tools. `more`: further
    top-level names of the venv's site-packages (PLUGIN_PACKAGES)."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths(vars={"base": "/usr", "installed_base": "/usr"})["stdlib"])
    for path in stdlib.rglob("*"):
        rel = path.relative_to(stdlib)
        if path.is_file() and not any(
            part in STDLIB_SKIP or part.startswith("config-") for part in rel.parts
        ):
            _copy(path, root)
            if path.suffix == ".so":
                for lib in shared_libs(str(path)):
                    _copy(lib, root)
    site = Path(sysconfig.get_paths()["purelib"])
    for package in (*HOST_PACKAGES, *more):
        top = site / package
        for path in top.rglob("*") if top.is_dir() else [top]:
            if path.is_file() and "__pycache__" not in path.parts:
                _copy(path, root, f"/usr/lib/kata-vfio/{path.relative_to(site)}")
                if path.suffix == ".so":
                    for lib in shared_libs(str(path)):
                        _copy(lib, root)


def build_test_cpio(
    out: Path,
    kver: str,
    scenarios: list[Scenario],
    devices: tuple[EmulatedDevice, ...],
    host_tools: bool = False,
    modules: tuple[str, ...] = (),
    files: dict[str, Path] | None = None,
    trees: dict[str, Path] | None = None,
    host_packages: tuple[str, ...] = (),
) -> None:
    """The test-only archive appended to the product initrd. `modules`: more kernel modules
    (by name, with what they depend on) loaded at boot; `files`: guest path -> host file,
    an executable with the shared libraries it links; `trees`: guest directory -> host
    directory copied as it is, symlinks kept (a container's root filesystem);
    `host_packages`: more site packages with the host tools (add_host_tools)."""
    with tempfile.TemporaryDirectory(prefix="kvfio-cpio.") as tmp:
        root = Path(tmp)
        _copy(HERE / "guest-init.sh", root, "/kvfio/init")
        (root / "kvfio/init").chmod(0o755)
        _copy("/bin/busybox", root, "/kvfio/bin/busybox")
        for applet in ("sh", "cat", "ls", "sleep", "echo", "insmod", "poweroff", "mount", "true"):
            (root / "kvfio/bin" / applet).symlink_to("busybox")
        for name, dest in GUEST_PROGRAMS.items():
            _copy(HERE / name, root, dest)
        for binary in ("/usr/sbin/runc",):
            _copy(binary, root)
            for lib in shared_libs(binary):
                _copy(lib, root)
        # the guest-side test programs need a few more stdlib modules than the hook
        extra = closure(GUEST_PYTHON, HERE, ("json", "subprocess", "struct", "fcntl", "time"))
        for src, dst in extra:
            _copy(src, root, dst)
        kos = native_modules(kver, [*sorted({d.guest_driver for d in devices}), *modules])
        for ko in kos:
            _copy(ko, root)
        (root / "kvfio/native-modules").write_text("".join(m + "\n" for m in kos))
        for dest, src in (files or {}).items():
            _copy(src, root, dest)
            if os.access(src, os.X_OK):
                for lib in shared_libs(str(src)):
                    _copy(lib, root)
        for dest, src in (trees or {}).items():
            shutil.copytree(src, root / dest.lstrip("/"), symlinks=True)
        if host_tools:
            add_host_tools(root, host_packages)
        ctr = root / "kvfio/ctr/rootfs"
        for d in ("proc", "sys", "dev", "tmp", "usr"):
            (ctr / d).mkdir(parents=True, exist_ok=True)
        for link in ("bin", "lib", "lib64", "sbin"):
            (ctr / link).symlink_to(f"usr/{link}")
        _copy(HERE / "container-check.py", root, "/kvfio/ctr/rootfs/check.py")
        for i, scenario in enumerate(scenarios):
            sdir = root / "kvfio/scenarios" / f"{i:02d}-{scenario.name}"
            (sdir / "bundle").mkdir(parents=True)
            spec = (
                scenario.spec
                if scenario.spec is not None
                else container_spec(scenario.name, scenario)
            )
            (sdir / "bundle/config.json").write_text(json.dumps(spec))
            for fname, content in scenario.files.items():
                (sdir / fname).write_text(content)
            run = sdir / "run"
            run.write_text(scenario.script if scenario.script is not None else RUN_SCENARIO)
            run.chmod(0o755)
        files = subprocess.run(
            ["find", ".", "-mindepth", "1"], cwd=root, check=True, capture_output=True, text=True
        ).stdout
        with open(out, "wb") as f:
            subprocess.run(
                ["cpio", "--quiet", "-o", "-H", "newc"],
                cwd=root,
                input=files.encode(),
                stdout=f,
                check=True,
            )


@dataclass
class GuestRun:
    console: str
    records: list[dict[str, Any]]

    def find(self, event: str, name: str | None = None) -> dict[str, Any]:
        for r in self.records:
            if r.get("event") == event and (name is None or r.get("name") == name):
                return r
        raise AssertionError(f"no {event} {name or ''} record; console:\n{self.console[-6000:]}")

    def record(self, event: str, **match: Any) -> dict[str, Any]:
        """The first record of `event` whose fields have the values in `match`."""
        for r in self.records:
            if r.get("event") == event and all(r.get(k) == v for k, v in match.items()):
                return r
        raise AssertionError(f"no {event} {match}; console:\n{self.console[-4000:]}")


def boot(
    initrd: Path,
    kver: str,
    scenarios: list[Scenario],
    devices: tuple[EmulatedDevice, ...] = DEFAULT_DEVICES,
    timeout: float = 300,
    memory_mb: int = 1024,
    console_log: Path | None = None,
    host_tools: bool = False,
    smp: int = 1,
    modules: tuple[str, ...] = (),
    files: dict[str, Path] | None = None,
    trees: dict[str, Path] | None = None,
    reboots: bool = False,
    host_packages: tuple[str, ...] = (),
) -> GuestRun:
    """Boot the product initrd plus the test archive; return the console and KVFIO records.
    `modules`, `files`, `trees` and `host_packages`: see build_test_cpio. `reboots`: a
    guest reboot boots the same VM again (QEMU resets it) instead of ending the run."""
    with tempfile.TemporaryDirectory(prefix="kvfio-vm.") as tmp:
        combined = Path(tmp) / "initrd.img"
        console_file = console_log or Path(tmp) / "console.log"
        test_cpio = Path(tmp) / "test.cpio"
        build_test_cpio(
            test_cpio, kver, scenarios, devices, host_tools, modules, files, trees, host_packages
        )
        with open(combined, "wb") as out:
            for part in (initrd, test_cpio):
                data = part.read_bytes()
                # each archive must start 4-byte aligned: pad with zeros, which the kernel skips
                out.write(data + b"\0" * (-len(data) % 512))
        cmd = [
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-machine",
            "q35,kernel-irqchip=split",
            "-device",
            "intel-iommu,intremap=on,caching-mode=on",
            "-cpu",
            "max",
            "-smp",
            str(smp),
            "-m",
            str(memory_mb),
            "-display",
            "none",
            *([] if reboots else ["-no-reboot"]),
            "-nodefaults",
            "-serial",
            f"file:{console_file}",
            "-monitor",
            "none",
            "-kernel",
            str(kernel_image(kver)),
            "-initrd",
            str(combined),
            "-append",
            "console=ttyS0 rdinit=/kvfio/init intel_iommu=on iommu=pt panic=-1 loglevel=4",
            "-device",
            BRIDGE,
        ]
        for dev in devices:
            if dev.netdev:
                cmd += ["-netdev", dev.netdev]
            if dev.drive:
                cmd += ["-drive", dev.drive]
            cmd += ["-device", dev.qemu]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
            )
            stderr = proc.stderr.decode(errors="replace")
        except subprocess.TimeoutExpired:
            stderr = f"QEMU killed after {timeout:g} s"
        console = console_file.read_bytes().decode(errors="replace").replace("\r", "")
    records = []
    for line in console.splitlines():
        if line.startswith("KVFIO "):
            try:
                records.append(json.loads(line[len("KVFIO ") :]))
            except ValueError:
                pass
    return GuestRun(console + stderr, records)


def boot_sriov_host(program: str, console_log: Path, max_vfs: int = 4, **options: Any) -> GuestRun:
    """One boot of the guest as an SR-IOV host for the host tools: QEMU's NVMe as a PF
    with `max_vfs` VFs (slot 6), kata-vfio-ctl in the guest, and the guest program
    `program` (a GUEST_PROGRAMS destination) run once. `options`: more of boot's.
    Skips (a failure in CI) without `make initrd` (KATA_VFIO_INITRD, KATA_VFIO_KVER)."""
    import pytest

    initrd = Path(os.environ.get("KATA_VFIO_INITRD", "build/kata-vfio-initrd.img"))
    kver = os.environ.get("KATA_VFIO_KVER", "")
    if not initrd.exists() or not kver or not kernel_image(kver).exists():
        pytest.skip("needs `make initrd` (KATA_VFIO_INITRD, KATA_VFIO_KVER): run `make test`")
    script = f'#!/kvfio/bin/sh\nexec /usr/bin/python3 -I -S {program} "$1"\n'
    name = Path(program).stem
    return boot(
        initrd,
        kver,
        [Scenario(name, "{}", script=script)],
        devices=nvme_sriov_pf(max_vfs, addr="0x6"),
        console_log=console_log,
        host_tools=True,
        **options,
    )


def host_manifest(
    sysfs_root: Path,
    groups: list[list[EmulatedDevice]],
    hotplug_timeout: float = 5.0,
    first_group: int = 30,
    resources: dict[int, str] | None = None,
) -> str:
    """The manifest the host wrapper's own code writes for these devices, each inner
    list one host IOMMU group bound to vfio-pci (a fake host sysfs stands in for the host).
    Host group numbers (and buses) count from `first_group`; `resources`: index in
    `groups` -> resource name, asked for as a device plugin does
    (io.kata-vfio.resource.<name>), the others by address."""
    from kata_vfio.manifest import MANIFEST_ANNOTATION
    from kata_vfio_host.settings import Settings
    from kata_vfio_runtime.spec_edit import plan_edit

    for d in ("bus/pci/devices", "kernel/iommu_groups", "class/vfio"):
        (sysfs_root / d).mkdir(parents=True, exist_ok=True)
    wanted: list[str] = []
    named: dict[str, list[str]] = {}
    for index, members in enumerate(groups):
        g = first_group + index
        resource = (resources or {}).get(index)
        asked = wanted if resource is None else named.setdefault(resource, [])
        gdir = sysfs_root / "kernel/iommu_groups" / str(g) / "devices"
        gdir.mkdir(parents=True)
        (sysfs_root / "class/vfio" / str(g)).mkdir(parents=True)
        (sysfs_root / "class/vfio" / str(g) / "dev").write_text(f"243:{g}\n")
        for f, dev in enumerate(members):
            addr = f"0000:{g:02x}:00.{f}"
            ddir = sysfs_root / "devices" / addr
            ddir.mkdir(parents=True)
            ident = dev.identity
            for attr, value in (
                ("vendor", ident.vendor),
                ("device", ident.device),
                ("subsystem_vendor", ident.subsystem_vendor),
                ("subsystem_device", ident.subsystem_device),
            ):
                (ddir / attr).write_text(f"0x{value:04x}\n")
            (ddir / "class").write_text(f"0x{ident.class_code:06x}\n")
            os.symlink(f"../../../kernel/iommu_groups/{g}", ddir / "iommu_group")
            (sysfs_root / "bus/pci/drivers/vfio-pci").mkdir(parents=True, exist_ok=True)
            os.symlink("../../../bus/pci/drivers/vfio-pci", ddir / "driver")
            os.symlink(f"../../../devices/{addr}", sysfs_root / "bus/pci/devices" / addr)
            os.symlink(f"../../../../devices/{addr}", gdir / addr)
            asked.append(addr)
    annotations = {
        f"io.kata-vfio.resource.{name}": ",".join(addresses) for name, addresses in named.items()
    }
    if wanted:
        annotations["io.kata-vfio.devices"] = ",".join(wanted)
    spec: dict[str, Any] = {"annotations": annotations}
    plan = plan_edit(spec, Settings(sysfs=str(sysfs_root), hotplug_timeout=hotplug_timeout))
    assert plan is not None
    return plan.annotations[MANIFEST_ANNOTATION]
