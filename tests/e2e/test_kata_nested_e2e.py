"""The host half for real, nested: podman → kata-vfio → Kata 1.x inside a virtme-ng L1 guest.

This host has no IOMMU, so tests/e2e/test_kata_e2e.py stands in for the host half of a
passthrough (fake sysfs, a test-only step dropping /dev/vfio/N). Here nothing is stood in
for: an L1 TCG guest booted by virtme-ng (this host's root over 9p, q35 with
`intel-iommu,intremap=on,caching-mode=on` and one e1000e at 00:10.0, ../shared/LAB.md
sections 3 and 7) is a real IOMMU host, and tests/kata/nested_l1.py runs there, against
L1's real /sys:

  kata-vfio-ctl bind 0000:00:10.0          e1000e -> vfio-pci in L1, /dev/vfio/N
  podman --runtime kata-vfio run --rm --device /dev/vfio/N busybox sh -c ...
    kata-vfio                              manifest from L1's real sysfs; no stripping
      kata-runtime 1.x --kata-config       hot-plugs the real VFIO group into its L2 VM
        L2 (vIOMMU from enable_iommu): kata-agent runs kata-vfio-hook, which finds the
        device by the manifest and rebinds it to vfio-pci; the container opens
        /dev/vfio/vfio and its group node, viable
  kata-vfio-ctl restore 0000:00:10.0       back to e1000e in L1
  podman run -d --annotation io.kata-vfio.devices=0000:00:10.0 ...   auto-bind ([autobind])
  podman rm -f                             the wrapper's delete: back to e1000e

L2 runs on KVM inside L1 (L1's `-cpu max` under TCG emulates AMD SVM with nested paging,
so L1 has a working /dev/kvm): Kata's own `accel=kvm` and `-cpu host` are kept. TCG inside
TCG boots L2 to kata-agent in 158-230 s (measured), over podman's hard-coded 240 s
container creation timeout; on L1's KVM it takes 30-60 s.

Test-only, as in the first test: the hypervisor `path` (console to a file; it returns once
L2's agent opened its port, see nested_l1.BOOT_WAIT), kernel/initrd paths, no
vhost-net/vsock, syslog listener, shared mount, and L1's cgroup v1 mounts. Kata is tuned
through its configuration only: `default_memory = 512` (L1's QEMU pins all of L2's RAM for
VFIO), `default_vcpus = 1`, `kernel_params += "mitigations=off"`. The containers run with
`--network none` (no podman network set-up inside L1).

Against an installed Kata 1.x only (`make test-kata`, tests/kata/installed.py): skipped when
none is given or virtme-ng is missing, unless KATA_VFIO_REQUIRE_KATA=1 (set by make
test-kata). About 3-6 minutes (two container cycles), more on a loaded host.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kata import harness, installed, rootfs
from kata.env import REPO, Unavailable, guest_kver
from nested.images import extract_vmlinux, l1_sources, uncompressed_initrd, vfio_viable

REQUIRE = os.environ.get("KATA_VFIO_REQUIRE_KATA") == "1"
L1_DEVICE = "0000:00:10.0"  # virtme-ng takes slot 5; ours from 0x10 up (LAB.md section 3)
# L1 from boot to its script's end: ~5 min measured (two container cycles), bounded so the
# whole test stays under 10 min
L1_TIMEOUT = float(os.environ.get("KATA_VFIO_NESTED_TIMEOUT", "540"))
BINARIES = ("kata-runtime", "kata-netmon", "kata-proxy", "kata-shim", "configuration-qemu.toml")

pytestmark = [pytest.mark.kata, pytest.mark.vm]


def _check(ok: bool, reason: str) -> None:
    if not ok:
        raise Unavailable(reason)


def prepare(top: Path) -> tuple[list[str], Path]:
    """Everything L1 needs, under `top` (shared into L1 at the same path): the Kata
    binaries (copied: L1 sees this host's root, but only `top` is certain to be shared), the
    guest image, the busybox rootfs and the plan. Returns the vng command and the plan."""
    _check(os.geteuid() == 0, "needs root")
    _check(shutil.which("podman") is not None, "needs podman (make venv)")
    venv_bin = Path(sys.executable).parent
    vng = venv_bin / "vng"
    _check(vng.exists(), f"needs virtme-ng in the venv ({vng}: make venv, the test extras)")
    _check((venv_bin / "kata-vfio").exists(), "kata-vfio is not installed here (make venv)")
    kver = guest_kver()
    # L1 boots this host's kernel; L2 the Kata guest kernel (Debian's by default)
    kernel = Path(f"/boot/vmlinuz-{kver}")
    _check(kernel.exists(), f"no kernel {kernel}")
    guest_kernel = installed.guest_kernel(kver)

    kata = installed.kata1()
    bins = top / "kata-bin"
    bins.mkdir(parents=True)
    for name in BINARIES:
        shutil.copy2(kata[name], bins / name)
    image = harness.build_guest_image(top / "kata-vfio-kata.img", kver, kata["kata-agent"])
    # uncompressed: L2 inflates gzip slowly, the loader copies a plain archive fast
    cpio = top / "kata-vfio-kata.cpio"
    cpio.write_bytes(uncompressed_initrd(image.read_bytes()))
    image.unlink()
    image = cpio
    busybox = rootfs.busybox_rootfs(top / "busybox")
    vfio_viable(top / "vfio-viable.c", busybox / "bin/vfio-viable")
    plan = top / "plan.json"
    plan.write_text(
        json.dumps(
            {
                "top": str(top),
                "venv_bin": str(venv_bin),
                "device": L1_DEVICE,
                "kernel": str(extract_vmlinux(guest_kernel, top / "vmlinux")),
                "image": str(image),
                "busybox": str(busybox),
                "binaries": {n: str(bins / n) for n in BINARIES},
                "debug": os.environ.get("KATA_VFIO_KATA_DEBUG") == "1",
            }
        )
    )
    l1_cmd = f"{venv_bin / 'python'} {REPO / 'tests/kata/nested_l1.py'} {plan}"
    vng_cmd = [
        str(vng),
        "--run",
        str(kernel),
        "--disable-kvm",
        "--disable-microvm",
        "--force-9p",
        "--cpus",
        "2",
        "--memory",
        "3G",
        "--append",
        "intel_iommu=on",
        "--rwdir",
        str(top),
        *l1_sources(),
        "--exec",
        l1_cmd,
        "--qemu-opts=-machine q35,kernel-irqchip=split "
        "-device intel-iommu,intremap=on,caching-mode=on "
        "-netdev user,id=kvfion0 -device e1000e,netdev=kvfion0,romfile=,addr=0x10",
    ]
    return vng_cmd, plan


@pytest.fixture(scope="module")
def nested(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    with harness.run_directory(request, "kata-vfio-nested.", "nested kata") as top:
        try:
            vng_cmd, _ = prepare(top)
        except Unavailable as exc:
            if REQUIRE:
                pytest.fail(f"KATA_VFIO_REQUIRE_KATA=1: {exc}")
            pytest.skip(str(exc))
        venv_bin = str(Path(sys.executable).parent)
        env = {**os.environ, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}"}
        started = time.monotonic()
        try:
            proc = subprocess.run(
                vng_cmd,
                env=env,
                text=True,
                capture_output=True,
                timeout=L1_TIMEOUT,
                stdin=subprocess.DEVNULL,
            )
            output = proc.stdout + "\n--- stderr ---\n" + proc.stderr
        except subprocess.TimeoutExpired as exc:
            # vng is gone; its QEMU (L1) is not: it runs the command line naming `top`
            harness.kill_pids(harness.qemu_pids(str(top)))
            output = (
                f"L1 timed out after {L1_TIMEOUT:g} s (KATA_VFIO_NESTED_TIMEOUT)\n"
                + str(exc.stdout or "")
                + "\n--- stderr ---\n"
                + str(exc.stderr or "")
            )
        took = time.monotonic() - started
        (top / "l1.out").write_text(output)
        path = top / "result.json"
        result = json.loads(path.read_text()) if path.exists() else {}
        result["l1_seconds"] = round(took, 1)
        result["l1_output_tail"] = output[-3000:]
        print(f"\nnested kata: L1 {took:.1f} s; steps: {json.dumps(result.get('steps'))}")
        yield result


def test_real_vfio_group_passes_through_kata_into_the_container(nested: dict) -> None:
    info = (
        json.dumps({k: v for k, v in nested.items() if k != "l1_output_tail"}, indent=1)[-6000:]
        + "\n"
        + nested.get("l1_output_tail", "")
    )
    assert "error" not in nested, info
    assert nested.get("l1", {}).get("driver") == "e1000e", info
    assert nested["l1"].get("kvm"), info  # L1's emulated SVM: L2 on KVM
    bind = nested.get("bind", {})
    assert bind.get("rc") == 0 and bind.get("driver") == "vfio-pci" and bind.get("node"), info
    run = nested.get("run", {})
    assert run.get("rc") == 0, info
    lines = run["out"].splitlines()
    groups = lines[0].split()
    assert "vfio" in groups and len(groups) == 2, info  # vfio + the L2 group of the device
    on_vfio = [x.split()[1] for x in lines if x.startswith("vfio-pci ")]
    assert len(on_vfio) == 1, info
    assert sorted(x.split()[1] for x in lines if x.startswith("opened ")) == sorted(
        f"/dev/vfio/{g}" for g in groups
    ), info
    guest_group = next(g for g in groups if g != "vfio")
    assert "api 0" in lines and f"group {guest_group} viable 1" in lines, info
    # kata-agent ran our hook in L2: its log (relayed through L2's console) names the
    # container, and maps L1's real device to the L2 address that ended on vfio-pci
    done = [r for r in nested.get("hook_log", []) if r.get("event") == "done"]
    assert done and done[-1].get("container_id") == run["cid"], info
    assert done[-1]["host_to_guest"] == {L1_DEVICE: on_vfio[0]}, info
    assert nested.get("qemu_left") == [], info  # --rm: L2 is gone
    restore = nested.get("restore", {})
    assert restore.get("rc") == 0 and restore.get("driver") == "e1000e", info
    # second cycle: auto-bind by the wrapper, `podman rm` gives the device back
    auto = nested.get("autobind_run", {})
    assert auto.get("rc") == 0 and auto.get("driver") == "vfio-pci", info
    auto_lines = auto["out"].splitlines()
    assert "api 0" in auto_lines and "ready" in auto_lines, info
    assert any(x.startswith("group ") and x.endswith(" viable 1") for x in auto_lines), info
    done = [r for r in nested.get("autobind_hook_log", []) if r.get("event") == "done"]
    assert done and done[-1].get("container_id") == auto["cid"], info
    assert list(done[-1]["host_to_guest"]) == [L1_DEVICE], info
    rm = nested.get("autobind_rm", {})
    assert rm.get("rc") == 0 and rm.get("driver") == "e1000e", info
    assert rm.get("qemu_left") == [], info
    assert nested.get("done"), info
