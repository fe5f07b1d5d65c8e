"""`kata-vfio-ctl doctor`: is this host ready for VFIO devices in Kata containers?

Each check says what it found and, when it is not fine, how to fix it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kata_vfio_host.settings import Settings

OK, WARN, FAIL = "ok", "warn", "fail"
CAP_IPC_LOCK = 14
HOOK_IN_IMAGE = "usr/share/oci/hooks/prestart/kata-vfio-hook"


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def check_iommu(sysfs: Path, proc: Path) -> Check:
    groups = sysfs / "kernel/iommu_groups"
    count = len(os.listdir(groups)) if groups.is_dir() else 0
    try:
        cmdline = (proc / "cmdline").read_text().strip()
    except OSError:
        cmdline = "?"
    if count:
        return Check("iommu", OK, f"{count} IOMMU groups")
    return Check("iommu", FAIL, f"no IOMMU groups (kernel command line: {cmdline})",
                 "enable VT-d / AMD-Vi in the firmware and boot with intel_iommu=on iommu=pt "
                 "(Intel) or amd_iommu=on (AMD)")


def check_interrupt_remapping(proc: Path) -> Check:
    try:
        interrupts = (proc / "interrupts").read_text()
    except OSError:
        return Check("interrupt-remapping", WARN, "cannot read /proc/interrupts")
    if "IR-" in interrupts:
        return Check("interrupt-remapping", OK, "MSI interrupts are remapped (IR-)")
    return Check("interrupt-remapping", FAIL, "no remapped interrupts in /proc/interrupts",
                 "enable interrupt remapping (intremap) in firmware and kernel; vfio refuses "
                 "devices without it unless vfio_iommu_type1 allow_unsafe_interrupts=1")


def check_vfio_modules(sysfs: Path) -> Check:
    loaded = [m for m in ("vfio", "vfio_pci", "vfio_iommu_type1")
              if (sysfs / "module" / m).is_dir()]
    if (sysfs / "bus/pci/drivers/vfio-pci").is_dir():
        return Check("vfio-modules", OK, f"vfio-pci registered (modules: {', '.join(loaded)})")
    from kata_vfio.run import CommandError, run

    try:
        found = run(["modinfo", "-n", "vfio-pci"], what="looking for the vfio-pci module",
                    timeout=30)
    except CommandError as err:
        return Check("vfio-modules", FAIL, f"no vfio-pci module for this kernel ({err.message})",
                     "install the kernel's modules package (vfio-pci, vfio_iommu_type1) "
                     "and kmod (modinfo)")
    return Check("vfio-modules", OK, f"vfio-pci not loaded, available at "
                 f"{found.stdout.strip()} (kata-vfio-ctl bind loads it)")


def check_kata(path: Path | None, guest_hook_path: str, annotations: dict[str, str]
               ) -> list[Check]:
    from kata_vfio_ctl.kata_conf import check

    if path is None or not path.exists():
        return [Check("kata-config", FAIL, "no Kata configuration.toml found",
                      "install Kata, or pass --kata-config PATH")]
    import tomllib

    from kata_vfio.errors import KataVfioError

    try:
        checks = [Check(f"kata:{key}", OK if ok else FAIL, f"{path}",
                        "" if ok else f"set {fix} (kata-vfio-ctl install does it)")
                  for key, ok, fix in check(path, guest_hook_path, annotations)]
        checks.append(check_kata_initrd(path))
    except (OSError, UnicodeError, tomllib.TOMLDecodeError, KataVfioError) as exc:
        detail = (exc.message if isinstance(exc, KataVfioError) else
                  f"cannot read {path}: {exc.strerror if isinstance(exc, OSError) else exc}")
        return [Check("kata-config", FAIL, detail, "fix the file, or pass --kata-config PATH")]
    return checks


def check_kata_initrd(path: Path) -> Check:
    import tomllib

    from kata_vfio.run import CommandError, run
    from kata_vfio_ctl.kata_conf import hypervisor_table
    from kata_vfio_ctl.textfile import read_text

    _, table = hypervisor_table(tomllib.loads(read_text(path, "Kata configuration")), path)
    initrd = table.get("initrd")
    if not initrd:
        return Check("kata:initrd", FAIL, "Kata boots an image, not an initrd",
                     "build one with `make initrd` and set initrd = \"…\" in " + str(path))
    try:
        # the listing (lsinitrd IMG FILE would print the file's contents instead)
        listing = run(["lsinitrd", str(initrd)], what=f"listing {initrd}", timeout=120)
    except CommandError as err:
        return Check("kata:initrd", FAIL, f"cannot look inside {initrd}: {err.message}",
                     err.hint)
    if any(line.split()[-1:] == [HOOK_IN_IMAGE] and line.startswith("-rwx")
           for line in listing.stdout.splitlines()):
        return Check("kata:initrd", OK, f"{initrd} has the kata-vfio hook")
    return Check("kata:initrd", FAIL, f"{initrd} has no kata-vfio hook",
                 "build the guest image with `make initrd` (initrd/90kata-vfio)")


def check_podman(conf: Path) -> Check:
    import tomllib

    from kata_vfio.errors import KataVfioError
    from kata_vfio_ctl.textfile import read_text

    try:
        engine = tomllib.loads(read_text(conf, "containers.conf")).get("engine", {})
    except (KataVfioError, tomllib.TOMLDecodeError) as exc:
        if not isinstance(exc, KataVfioError) or conf.exists():
            return Check("podman", FAIL, f"cannot read {conf}: {exc}",
                         "fix the file, or pass --conf PATH")
        engine = {}
    runtime = (engine.get("runtimes") or {}).get("kata-vfio")
    json_ok = "kata-vfio" in (engine.get("runtime_supports_json") or [])
    if runtime and json_ok:
        return Check("podman", OK, f"kata-vfio = {runtime} in {conf}")
    return Check("podman", FAIL, f"kata-vfio is not registered in {conf}",
                 "kata-vfio-ctl podman-register (or install)")


def check_memlock(proc: Path) -> Check:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    cap_eff = 0
    try:
        for line in (proc / "self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                cap_eff = int(line.split()[1], 16)
    except OSError:
        pass
    unlimited = soft == resource.RLIM_INFINITY
    detail = (f"RLIMIT_MEMLOCK {'unlimited' if unlimited else f'{soft // 1024} KiB'}, "
              f"CAP_IPC_LOCK {'held' if cap_eff >> CAP_IPC_LOCK & 1 else 'not held'} here")
    if unlimited or soft >= 1 << 30:
        return Check("memlock", OK, detail)
    return Check("memlock", WARN, detail,
                 "programs that map DMA memory need --cap-add IPC_LOCK and a large "
                 "--ulimit memlock in the container")


def check_dpdk(settings: Settings | None, kata_config: Path | None) -> Check:
    """What a DPDK/SPDK program in a Kata container needs beyond the /dev/vfio nodes:
    locked memory for DMA, two vCPUs for testpmd's two lcores (or an --lcores map),
    /sys (read-only is enough) and a writable /run or /tmp."""
    needs = "DPDK needs RLIMIT_MEMLOCK or CAP_IPC_LOCK, /sys, a writable /run or /tmp"
    problems = []
    if settings is not None and not settings.raise_memlock:
        problems.append("raise_memlock = false: pass --cap-add IPC_LOCK or "
                        "--ulimit memlock=-1:-1 yourself")
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
        problems.append(f"Kata gives guests {vcpus} vCPU: run testpmd with "
                        "--lcores 0@0,1@0, or set default_vcpus = 2")
    if problems:
        return Check("dpdk", WARN, f"{needs}; " + "; ".join(problems))
    return Check("dpdk", OK, f"{needs}: VFIO containers get RLIMIT_MEMLOCK unlimited")


def run_checks(sysfs: Path, proc: Path, kata_config: Path | None, containers_conf: Path,
               guest_hook_path: str, annotations: dict[str, str],
               settings: Settings | None = None, kata_version: str | None = None
               ) -> list[Check]:
    return [check_iommu(sysfs, proc), check_interrupt_remapping(proc), check_vfio_modules(sysfs),
            *check_kata_release(kata_config, guest_hook_path, annotations, settings,
                                kata_version),
            check_podman(containers_conf), check_memlock(proc),
            check_dpdk(settings, kata_config)]


def check_kata_release(path: Path | None, guest_hook_path: str, annotations: dict[str, str],
                       settings: Settings | None, kata_version: str | None) -> list[Check]:
    """Kata >= 2: the generated configuration (kata3.py); Kata 1.x: the in-place settings."""
    if settings is not None:
        from kata_vfio_ctl.kata3 import doctor_checks

        checks = doctor_checks(path, settings, kata_version=kata_version)
        if checks is not None:
            return checks
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
