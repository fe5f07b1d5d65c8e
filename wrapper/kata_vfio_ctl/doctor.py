"""`kata-vfio-ctl doctor`: is this host ready for VFIO devices in Kata containers?

Each check says what it found and, when it is not fine, how to fix it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kata_vfio_ctl.checks import FAIL, OK, WARN, Check

if TYPE_CHECKING:
    from kata_vfio_host.settings import Settings

CAP_IPC_LOCK = 14


# DMI sys_vendor / product_name of the common hypervisors (the guest's side of them)
HYPERVISOR_VENDORS = (
    "QEMU",
    "KVM",
    "VMware",
    "Microsoft Corporation",
    "Xen",
    "innotek",
    "Amazon EC2",
    "Google",
    "OpenStack",
    "Parallels",
    "BHYVE",
    "Cloud Hypervisor",
)
IOMMU_ACPI_TABLES = ("DMAR", "IVRS")  # Intel VT-d, AMD-Vi


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def cpu_vendor(proc: Path) -> str:
    for line in _read(proc / "cpuinfo").splitlines():
        if line.startswith("vendor_id"):
            return line.split(":", 1)[1].strip()
    return ""


def iommu_params(proc: Path, cmdline: str) -> list[str]:
    """The kernel parameters to add: the vendor's IOMMU switch and passthrough mode."""
    vendor = cpu_vendor(proc)
    wanted = (
        ["intel_iommu=on"]
        if vendor == "GenuineIntel"
        else ["amd_iommu=on"]
        if vendor == "AuthenticAMD"
        else ["intel_iommu=on", "amd_iommu=on"]
    )
    have = cmdline.split()
    return [p for p in [*wanted, "iommu=pt"] if p not in have]


def hypervisor_of_host(sysfs: Path, proc: Path) -> str | None:
    """What says this host is itself a virtual machine: the cpuinfo `hypervisor` flag, or a
    hypervisor's name in DMI; None on bare metal."""
    dmi = " ".join(
        _read(sysfs / "class/dmi/id" / f).strip() for f in ("sys_vendor", "product_name")
    ).strip()
    for vendor in HYPERVISOR_VENDORS:
        if vendor.lower() in dmi.lower():
            return f"DMI says {dmi!r}"
    for line in _read(proc / "cpuinfo").splitlines():
        if line.startswith("flags") and "hypervisor" in line.split(":", 1)[-1].split():
            return "the CPU flags include 'hypervisor'"
    return None


def boot_loader(root: Path) -> str | None:
    """ "systemd-boot" (kernel-install reads /etc/kernel/cmdline), "grub" or None."""
    if (root / "etc/kernel/cmdline").is_file() or any(
        (root / d).is_dir()
        for d in ("boot/loader/entries", "boot/efi/loader/entries", "efi/loader/entries")
    ):
        return "systemd-boot"
    if (root / "etc/default/grub").is_file():
        return "grub"
    return None


def boot_steps(root: Path, params: list[str]) -> str:
    """How to add `params` to the kernel command line with this host's boot loader."""
    words = " ".join(params)
    loader = boot_loader(root)
    if loader == "systemd-boot":
        return (
            f"systemd-boot / kernel-install detected: add {words} to /etc/kernel/cmdline, "
            "run kernel-install add $(uname -r) /lib/modules/$(uname -r)/vmlinuz, reboot"
        )
    if loader == "grub":
        return (
            f"GRUB detected: add {words} to GRUB_CMDLINE_LINUX in /etc/default/grub, "
            "run update-grub (grub2-mkconfig -o /boot/grub2/grub.cfg where there is no "
            "update-grub), reboot"
        )
    return (
        f"no GRUB (/etc/default/grub) or systemd-boot (/etc/kernel/cmdline) found: add "
        f"{words} to the kernel command line of your boot loader, reboot"
    )


def check_iommu(sysfs: Path, proc: Path, root: Path = Path("/")) -> Check:
    groups = sysfs / "kernel/iommu_groups"
    count = len(os.listdir(groups)) if groups.is_dir() else 0
    if count:
        return Check("iommu", OK, f"{count} IOMMU groups")
    cmdline = _read(proc / "cmdline").strip()
    tables = sysfs / "firmware/acpi/tables"
    has_table = any((tables / t).exists() for t in IOMMU_ACPI_TABLES)
    vm = hypervisor_of_host(sysfs, proc)
    if vm is not None and not has_table:
        return Check(
            "iommu",
            FAIL,
            f"no IOMMU groups: this host is a virtual machine ({vm}) "
            "without a virtual IOMMU (no DMAR or IVRS ACPI table)",
            "the VM's hypervisor must give it one (QEMU: -machine q35,"
            "kernel-irqchip=split -device intel-iommu,intremap=on,caching-mode=on); "
            "then boot it with " + " ".join(iommu_params(proc, cmdline) or ["iommu=pt"]),
        )
    params = iommu_params(proc, cmdline)
    if not params:
        return Check(
            "iommu",
            FAIL,
            "no IOMMU groups although the kernel command line has the IOMMU parameters",
            "enable VT-d / AMD-Vi in the firmware (BIOS/UEFI setup), reboot",
        )
    return Check(
        "iommu",
        FAIL,
        f"no IOMMU groups (the kernel command line lacks {' '.join(params)})",
        "enable VT-d / AMD-Vi in the firmware; " + boot_steps(root, params),
    )


def check_interrupt_remapping(proc: Path) -> Check:
    try:
        interrupts = (proc / "interrupts").read_text()
    except OSError:
        return Check("interrupt-remapping", WARN, "cannot read /proc/interrupts")
    if "IR-" in interrupts:
        return Check("interrupt-remapping", OK, "MSI interrupts are remapped (IR-)")
    return Check(
        "interrupt-remapping",
        FAIL,
        "no remapped interrupts in /proc/interrupts",
        "enable interrupt remapping (intremap) in firmware and kernel; vfio refuses "
        "devices without it unless vfio_iommu_type1 allow_unsafe_interrupts=1",
    )


def check_vfio_modules(sysfs: Path) -> Check:
    loaded = [
        m for m in ("vfio", "vfio_pci", "vfio_iommu_type1") if (sysfs / "module" / m).is_dir()
    ]
    if (sysfs / "bus/pci/drivers/vfio-pci").is_dir():
        return Check("vfio-modules", OK, f"vfio-pci registered (modules: {', '.join(loaded)})")
    from kata_vfio.run import CommandError, run

    try:
        found = run(
            ["modinfo", "-n", "vfio-pci"], what="looking for the vfio-pci module", timeout=30
        )
    except CommandError as err:
        return Check(
            "vfio-modules",
            FAIL,
            f"no vfio-pci module for this kernel ({err.message})",
            "install the kernel's modules package (vfio-pci, vfio_iommu_type1) and kmod (modinfo)",
        )
    return Check(
        "vfio-modules",
        OK,
        f"vfio-pci not loaded, available at {found.stdout.strip()} (kata-vfio-ctl bind loads it)",
    )


def check_podman(conf: Path) -> Check:
    import tomllib

    from kata_vfio.errors import KataVfioError
    from kata_vfio_ctl.textfile import read_text

    try:
        engine = tomllib.loads(read_text(conf, "containers.conf")).get("engine", {})
    except (KataVfioError, tomllib.TOMLDecodeError) as exc:
        if not isinstance(exc, KataVfioError) or conf.exists():
            return Check(
                "podman", FAIL, f"cannot read {conf}: {exc}", "fix the file, or pass --conf PATH"
            )
        engine = {}
    runtime = (engine.get("runtimes") or {}).get("kata-vfio")
    json_ok = "kata-vfio" in (engine.get("runtime_supports_json") or [])
    if runtime and json_ok:
        return Check("podman", OK, f"kata-vfio = {runtime} in {conf}")
    return Check(
        "podman",
        FAIL,
        f"kata-vfio is not registered in {conf}",
        "kata-vfio-ctl podman-register (or install)",
    )


def check_memlock(settings: Settings | None) -> Check:
    """What a VFIO container gets (the wrapper raises its RLIMIT_MEMLOCK); the limit of the
    shell doctor runs in says nothing about a container's."""
    if settings is None or settings.raise_memlock:
        return Check(
            "memlock",
            OK,
            "VFIO containers get RLIMIT_MEMLOCK unlimited "
            "(raise_memlock = true), enough for DMA mappings",
        )
    return Check(
        "memlock",
        WARN,
        "raise_memlock = false: VFIO containers keep the engine's "
        "RLIMIT_MEMLOCK (often 8 MiB), too little for DMA mappings",
        "pass --cap-add IPC_LOCK --ulimit memlock=-1:-1 to such containers, or set "
        "raise_memlock = true in config.toml",
    )


def check_dpdk(settings: Settings | None, kata_config: Path | None) -> Check:
    """What a DPDK/SPDK program in a Kata container needs beyond the /dev/vfio nodes and
    locked memory (the memlock check): two vCPUs for testpmd's two lcores (or an --lcores
    map), /sys (read-only is enough) and a writable /run or /tmp."""
    needs = "DPDK needs /sys and a writable /run or /tmp in the container"
    vcpus = None
    if kata_config is not None:
        import tomllib

        from kata_vfio.errors import KataVfioError
        from kata_vfio_ctl.textfile import read_text

        try:
            text = read_text(kata_config, "Kata configuration")
            for table in tomllib.loads(text).get("hypervisor", {}).values():
                vcpus = table.get("default_vcpus", vcpus)
        except (KataVfioError, ValueError):
            pass
    if isinstance(vcpus, int) and 0 < vcpus < 2:
        return Check(
            "dpdk",
            WARN,
            f"{needs}; Kata gives guests {vcpus} vCPU: run testpmd "
            "with --lcores 0@0,1@0, or set default_vcpus = 2",
        )
    return Check("dpdk", OK, needs)


# --- the engines ------------------------------------------------------------------------

BIN_DIRS = ("usr/local/sbin", "usr/local/bin", "usr/sbin", "usr/bin", "sbin", "bin", "opt/kata/bin")
ENGINE_PROGRAMS = {
    "podman": "podman",
    "containerd": "containerd",
    "cri-o": "crio",
    "kubelet": "kubelet",
}
# what marks an engine as set up on a node even where its program sits elsewhere
ENGINE_FILES = {
    "podman": ("etc/containers/containers.conf",),
    "containerd": ("etc/containerd/config.toml",),
    "cri-o": ("etc/crio/crio.conf", "etc/crio/crio.conf.d"),
    "kubelet": ("var/lib/kubelet/device-plugins", "etc/kubernetes/kubelet.conf"),
}
KATA_SHIM = "containerd-shim-kata-v2"
# where Kata 1.x's containerd shim looks, and nowhere else (LAB.md section 4)
KATA1_SHIM_CONFIGS = (
    "/etc/kata-containers/configuration.toml",
    "/usr/share/defaults/kata-containers/configuration.toml",
)


def find_program(name: str, root: Path) -> str | None:
    """`name` in the host's program directories (on PATH too, for the real root)."""
    if root == Path("/"):
        import shutil

        path = os.environ.get("PATH", "") + ":" + ":".join("/" + d for d in BIN_DIRS)
        return shutil.which(name, path=path)
    for d in BIN_DIRS:
        candidate = root / d / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def detect_engines(root: Path, podman_conf: Path | None = None) -> list[str]:
    """The engines this node has: a program or its configuration."""
    found = []
    for engine, program in ENGINE_PROGRAMS.items():
        files = [root / f for f in ENGINE_FILES[engine]]
        if engine == "podman" and podman_conf is not None:
            files.append(podman_conf)
        if find_program(program, root) or any(f.exists() for f in files):
            found.append(engine)
    return found


def host_kata_release(
    kata_config: Path | None, kata_version: str | None, root: Path = Path("/")
) -> Any:
    """Which Kata the engines start (a kata3.KataRelease), or None when nothing tells."""
    from kata_vfio.errors import KataVfioError
    from kata_vfio_ctl import kata3

    if kata_version:
        try:
            return kata3.parse_release_option(kata_version)
        except KataVfioError:
            return None
    programs = tuple(p for p in (find_program("kata-runtime", root),) if p)
    release = kata3.release_from_program(programs) if programs else None
    if release is None and kata_config is not None and kata_config.is_file():
        try:
            release = kata3.release_from_keys(kata3.read_toml(kata_config))
        except KataVfioError:
            return None
    return release


def _version_line(program: str) -> str:
    from kata_vfio.run import CommandError, run

    try:
        out = run([program, "--version"], what=f"asking {program} its version", timeout=20)
    except CommandError:
        return ""
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""


def check_podman_engine(root: Path, conf: Path, release: Any) -> list[Check]:
    program = find_program("podman", root)
    version = _version_line(program) if program else ""
    seen = f" ({version})" if version else ""
    if release is not None and release.major >= 2:
        from kata_vfio.errors import KataVfioError
        from kata_vfio_ctl.podman_conf import registered

        try:
            value, _ = registered(conf)
            where = f"; kata-vfio is registered in {conf}" if value is not None else ""
        except KataVfioError as err:
            where = f"; {err.message}"
        return [
            Check(
                "podman",
                WARN,
                f"podman{seen} cannot run Kata containers with "
                f"{release}: podman -> kata-vfio -> kata-runtime needs Kata 1.x (Kata >= 2 "
                f"has no `kata-runtime create`, kata#722){where}",
                "run VFIO containers through containerd or CRI-O"
                + ("; kata-vfio-ctl podman-unregister" if "registered in" in where else ""),
            )
        ]
    check = check_podman(conf)
    return [Check(check.name, check.status, check.detail + seen, check.fix)]


def check_engine_kata(
    engine: str, kata_path: str | None, fallback: Path | None, release: Any, how: str = ""
) -> Check:
    """The plug-port settings in the configuration this engine's shim reads (kata#9014:
    the setting went into a file the shim does not load)."""
    from kata_vfio.errors import KataVfioError
    from kata_vfio_ctl import kata3
    from kata_vfio_ctl.kata_checks import check_plug

    path = Path(kata_path) if kata_path else fallback
    how = how or ("named by the kata-vfio runtime" if kata_path else "Kata's default")
    if path is None or not path.is_file():
        return Check(
            f"{engine}:plug",
            FAIL,
            f"{engine}'s kata-vfio runtime uses "
            f"{path or 'Kata configuration'} ({how}), which does not exist",
            "kata-vfio-ctl install (writes it and names it)",
        )
    try:
        data = kata3.read_toml(path)
    except KataVfioError as err:
        return Check(f"{engine}:plug", FAIL, err.message, err.hint)
    release = kata3.release_from_keys(data) or release or kata3.KataRelease(2, 0, "unknown")
    qemu = (data.get("hypervisor") or {}).get("qemu") or {}
    plug = check_plug(qemu, release)
    return Check(f"{engine}:plug", plug.status, f"{path} ({how}): " + plug.detail, plug.fix)


def check_containerd_engine(root: Path, kata_config: Path | None, release: Any) -> list[Check]:
    from kata_vfio.errors import KataVfioError
    from kata_vfio_ctl import containerd_conf, engine_shim

    conf = root / "etc/containerd/config.toml"
    program = find_program("containerd", root)
    version: tuple[int, int] | None = None
    if program:
        try:
            version = containerd_conf.containerd_binary_version(program)
        except KataVfioError:
            version = None
    seen = f"containerd {version[0]}.{version[1]}" if version else "containerd"
    try:
        table = containerd_conf.registered_containerd(conf)
    except KataVfioError as err:
        return [Check("containerd", FAIL, err.message, err.hint)]
    if table is None:
        return [
            Check(
                "containerd",
                FAIL,
                f"{seen}: kata-vfio is not registered in {conf}",
                f"kata-vfio-ctl containerd-register --conf {conf}, then restart containerd",
            )
        ]
    checks = [Check("containerd", OK, f"{seen}: kata-vfio ({table.get('runtime_type')}) in {conf}")]
    path = table.get("runtime_path")
    shim_on_path = find_program(engine_shim.SHIM_BINARY, root)
    if version is not None and version < (1, 7) and not shim_on_path:
        checks.append(
            Check(
                "containerd:shim",
                FAIL,
                f"{seen} ignores runtime_path "
                f"({path or 'not set'}) and finds no {engine_shim.SHIM_BINARY} on its "
                "PATH",
                f"ln -s {path or '<kata-vfio>/bin/' + engine_shim.SHIM_BINARY} "
                f"/usr/local/bin/{engine_shim.SHIM_BINARY}",
            )
        )
    elif path and not os.access(path, os.X_OK) and (version is None or version >= (1, 7)):
        checks.append(
            Check(
                "containerd:shim",
                FAIL,
                f"runtime_path {path} is not an executable file",
                "kata-vfio-ctl containerd-register --shim-path PATH",
            )
        )
    elif not path and not shim_on_path:
        checks.append(
            Check(
                "containerd:shim",
                FAIL,
                f"no runtime_path and no {engine_shim.SHIM_BINARY} on containerd's PATH",
                "kata-vfio-ctl containerd-register --shim-path PATH",
            )
        )
    else:
        checks.append(Check("containerd:shim", OK, f"{shim_on_path or path}"))
    checks.append(check_kata_shim(root, "containerd", release))
    options = table.get("options") or {}
    named = options.get("ConfigPath")
    if release is not None and release.major == 1 and named and named not in KATA1_SHIM_CONFIGS:
        # the 1.x shim loads its defaults first and never reads ConfigPath
        checks.append(
            Check(
                "containerd:kata-config",
                FAIL,
                f"{release}'s shim ignores "
                f"ConfigPath = {named!r}: it reads only " + " or ".join(KATA1_SHIM_CONFIGS),
                f"kata-vfio-ctl install --kata-config {KATA1_SHIM_CONFIGS[0]}",
            )
        )
        named = next(
            (p for p in KATA1_SHIM_CONFIGS if (root / p.lstrip("/")).is_file()),
            KATA1_SHIM_CONFIGS[0],
        )
        checks.append(
            check_engine_kata(
                "containerd",
                str(root / named.lstrip("/")),
                None,
                release,
                "what Kata 1.x's shim reads",
            )
        )
        return checks
    checks.append(check_engine_kata("containerd", named, kata_config, release))
    return checks


def check_kata_shim(root: Path, engine: str, release: Any) -> Check:
    """kata-vfio's shim execs Kata's own (Kata 1.x and >= 2 both have one)."""
    shim = find_program(KATA_SHIM, root)
    kata = str(release) if release is not None else "Kata (version unknown)"
    if shim is None:
        return Check(
            f"{engine}:kata",
            FAIL,
            f"no {KATA_SHIM} for kata-vfio's shim to start",
            "install Kata Containers (its containerd shim v2)",
        )
    return Check(f"{engine}:kata", OK, f"{kata}, {shim}")


def crio_runtime(root: Path) -> tuple[dict[str, Any] | None, Path | None]:
    """The kata-vfio runtime as CRI-O reads it: crio.conf, then crio.conf.d/*.conf in order
    (a later file's keys win); and the last file that set it."""
    import tomllib

    files = [root / "etc/crio/crio.conf"]
    dropins = root / "etc/crio/crio.conf.d"
    if dropins.is_dir():
        files += sorted(p for p in dropins.iterdir() if p.name.endswith(".conf"))
    table: dict[str, Any] | None = None
    where = None
    for f in files:
        try:
            data = tomllib.loads(f.read_text())
        except (OSError, UnicodeError, tomllib.TOMLDecodeError):
            continue
        found = (((data.get("crio") or {}).get("runtime") or {}).get("runtimes") or {}).get(
            "kata-vfio"
        )
        if isinstance(found, dict):
            table = {**(table or {}), **found}
            where = f
    return table, where


CRIO_SOCKET = "var/run/crio/crio.sock"  # CRI-O's default listen, under the node's root


def check_crio_running(root: Path, program: str | None) -> Check:
    """Whether the CRI-O running on this node has loaded kata-vfio (a drop-in written after
    it started is not read until CRI-O restarts)."""
    import tomllib

    from kata_vfio.run import CommandError, run

    sock = root / CRIO_SOCKET
    if not sock.exists():
        return Check("cri-o:running", WARN, f"{sock} is missing: is CRI-O running?")
    if program is None:
        return Check("cri-o:running", WARN, f"{sock} is there, but no crio program to ask it")
    try:
        out = run(
            [program, "status", "--socket", str(sock), "config"],
            what=f"asking CRI-O at {sock} its configuration",
            timeout=20,
        )
        running = tomllib.loads(out.stdout)
    except (CommandError, tomllib.TOMLDecodeError) as err:
        return Check(
            "cri-o:running",
            WARN,
            f"CRI-O at {sock} did not say its configuration: " + str(err).splitlines()[0][:200],
        )
    runtimes = ((running.get("crio") or {}).get("runtime") or {}).get("runtimes") or {}
    if "kata-vfio" not in runtimes:
        return Check(
            "cri-o:running",
            FAIL,
            f"the CRI-O running at {sock} has not loaded "
            "kata-vfio (it was registered after CRI-O started): pods asking for "
            "runtime handler kata-vfio are refused",
            "restart CRI-O (systemctl restart crio)",
        )
    return Check(
        "cri-o:running", OK, f"the CRI-O running at {sock} serves runtime handler kata-vfio"
    )


def check_crio_engine(root: Path, kata_config: Path | None, release: Any) -> list[Check]:
    from kata_vfio_ctl import crio_conf, engine_shim

    table, where = crio_runtime(root)
    program = find_program("crio", root)
    version = _version_line(program) if program else ""
    seen = f"{version}: " if version else ""
    if table is None:
        return [
            Check(
                "cri-o",
                FAIL,
                f"{seen}kata-vfio is not registered in {root / 'etc/crio'}",
                "kata-vfio-ctl crio-register, then restart CRI-O",
            )
        ]
    checks = [
        Check(
            "cri-o",
            OK,
            f"{seen}kata-vfio (runtime_type = {table.get('runtime_type')!r}) in {where}",
        ),
        check_crio_running(root, program),
    ]
    path = str(table.get("runtime_path") or "")
    if table.get("runtime_type") != "vm":
        checks.append(
            Check(
                "cri-o:shim",
                FAIL,
                f"runtime_type = {table.get('runtime_type')!r}: "
                "CRI-O would run the shim as an OCI runtime",
                'kata-vfio-ctl crio-register (writes runtime_type = "vm")',
            )
        )
    elif not os.path.basename(path).startswith(engine_shim.SHIM_PREFIX):
        checks.append(
            Check(
                "cri-o:shim",
                FAIL,
                f"runtime_path {path!r}: CRI-O runs only shims named {engine_shim.SHIM_PREFIX}*",
                f"kata-vfio-ctl crio-register --shim-path /…/{engine_shim.SHIM_BINARY}",
            )
        )
    elif not os.access(path, os.X_OK):
        checks.append(
            Check(
                "cri-o:shim",
                FAIL,
                f"runtime_path {path} is not an executable file",
                "kata-vfio-ctl crio-register --shim-path PATH",
            )
        )
    else:
        checks.append(Check("cri-o:shim", OK, path))
    root_dir = str(table.get("runtime_root") or "")
    if table.get("runtime_type") == "vm" and not os.path.isabs(root_dir):
        checks.append(
            Check(
                "cri-o:runtime-root",
                FAIL,
                f"runtime_root = {root_dir!r}: CRI-O "
                "hands the shim its stdio FIFOs under the relative path crio/fifo, "
                'which the shim opens from the bundle: every pod fails ("opening '
                'file crio/fifo/io/...: no such file or directory")',
                "kata-vfio-ctl crio-register (writes runtime_root = "
                f'"{crio_conf.CRIO_RUNTIME_ROOT}"), then restart CRI-O',
            )
        )
    ours = [
        a
        for a in table.get("allowed_annotations") or []
        if str(a).startswith(crio_conf.CRIO_FOREIGN_PREFIX)
    ]
    if ours:
        checks.append(
            Check(
                "cri-o:annotations",
                FAIL,
                f"allowed_annotations lists {ours}: "
                'CRI-O accepts only annotations it knows there ("invalid '
                'allowed_annotation") and passes io.kata-vfio.* anyway',
                "kata-vfio-ctl crio-register (rewrites the drop-in without them)",
            )
        )
    checks.append(check_kata_shim(root, "cri-o", release))
    checks.append(
        check_engine_kata("cri-o", table.get("runtime_config_path"), kata_config, release)
    )
    return checks


def check_kubelet_engine(root: Path, settings: Settings | None) -> list[Check]:
    from kata_vfio_ctl.devplugin import DEFAULT_KUBELET_DIR, KUBELET_SOCKET

    plugins = root / DEFAULT_KUBELET_DIR.lstrip("/")
    resources = [str(r.get("name")) for r in (settings.device_plugin_resources if settings else ())]
    kubelet_up = (plugins / KUBELET_SOCKET).exists()
    checks = [
        Check(
            "kubelet",
            OK if kubelet_up else WARN,
            f"{plugins / KUBELET_SOCKET} "
            + ("is there" if kubelet_up else "is missing: is the kubelet running?"),
        )
    ]
    if not resources:
        checks.append(
            Check(
                "kubelet:device-plugin",
                OK,
                "no [[device_plugin.resource]] in "
                "config.toml: pods name devices by annotation (io.kata-vfio.devices "
                "or io.kata-vfio.select)",
            )
        )
        return checks
    missing = [n for n in resources if not (plugins / f"kata-vfio-{n}.sock").exists()]
    if missing:
        checks.append(
            Check(
                "kubelet:device-plugin",
                FAIL,
                "config.toml offers "
                + ", ".join(f"kata-vfio.io/{n}" for n in resources)
                + ", but "
                + ", ".join(f"kata-vfio-{n}.sock" for n in missing)
                + f" is not in {plugins}: the device plugin is not running",
                "start kata-vfio-ctl device-plugin (kata-vfio-ctl k8s --daemonset "
                "prints its DaemonSet)",
            )
        )
    else:
        checks.append(
            Check(
                "kubelet:device-plugin",
                OK,
                "serving " + ", ".join(f"kata-vfio.io/{n}" for n in resources) + f" in {plugins}",
            )
        )
    return checks


def check_engines(
    root: Path,
    podman_conf: Path,
    kata_config: Path | None,
    settings: Settings | None,
    kata_version: str | None,
) -> list[Check]:
    """Each engine this node has, checked for what kata-vfio needs of it."""
    engines = detect_engines(root, podman_conf)
    release = host_kata_release(kata_config, kata_version, root)
    checks: list[Check] = []
    if "podman" in engines:
        checks += check_podman_engine(root, podman_conf, release)
    if "containerd" in engines:
        checks += check_containerd_engine(root, kata_config, release)
    if "cri-o" in engines:
        checks += check_crio_engine(root, kata_config, release)
    if "kubelet" in engines:
        checks += check_kubelet_engine(root, settings)
    served = [c.name for c in checks if c.name in ("containerd", "cri-o") and c.status == OK]
    for i, c in enumerate(checks):
        if c.name == "podman" and c.status == FAIL and "not registered" in c.detail and served:
            # podman beside a registered CRI engine: one way in is enough
            checks[i] = Check(
                c.name,
                WARN,
                c.detail + f" (kata-vfio is registered with {' and '.join(served)})",
                c.fix,
            )
    if not engines:
        checks.append(
            Check(
                "engines",
                FAIL,
                "no podman, containerd, CRI-O or kubelet found",
                "install the container engine kata-vfio should serve",
            )
        )
    return checks


def run_checks(
    sysfs: Path,
    proc: Path,
    kata_config: Path | None,
    containers_conf: Path,
    guest_hook_path: str,
    annotations: dict[str, str],
    settings: Settings | None = None,
    kata_version: str | None = None,
    root: Path = Path("/"),
) -> list[Check]:
    return [
        check_iommu(sysfs, proc, root),
        check_interrupt_remapping(proc),
        check_vfio_modules(sysfs),
        *check_kata_release(kata_config, guest_hook_path, annotations, settings, kata_version),
        *check_engines(root, containers_conf, kata_config, settings, kata_version),
        check_memlock(settings),
        check_dpdk(settings, kata_config),
    ]


def check_kata_release(
    path: Path | None,
    guest_hook_path: str,
    annotations: dict[str, str],
    settings: Settings | None,
    kata_version: str | None,
) -> list[Check]:
    """Kata >= 2: the generated configuration (kata3.py); Kata 1.x: the in-place settings."""
    if settings is not None:
        from kata_vfio_ctl.kata_checks import doctor_checks

        checks = doctor_checks(path, settings, kata_version=kata_version)
        if checks is not None:
            return checks
    from kata_vfio_ctl.kata_checks import check_kata

    return check_kata(path, guest_hook_path, annotations)


def render(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        lines.append(f"[{c.status:4}] {c.name}: {c.detail}")
        if c.fix:
            lines.append(f"       fix: {c.fix}")
    return "\n".join(lines)


def as_json(checks: list[Check]) -> list[dict[str, Any]]:
    return [c.as_dict() for c in checks]
