#!/usr/bin/env python3
"""`make bench`: medians measured side by side in one run, printed as ratios.

Wrapper: `kata-vfio state` vs the inner runtime's own `state` (target <= +10 ms), and the
create-time edit for 1, 8 and 32 VFIO devices (target <= 40 ms for 8).
Hook, in one guest boot: wall time for 1 and for 4 devices against a bare
`python3 -I -S -c pass`, and the share that is the kernel's rebind
(targets: hook(1) <= 4x bare + kernel time, hook(N) <= 1.5x hook(1)).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "vm"), str(REPO / "initrd")]
RUNS = 30


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def run_timed(argv: list[str], env: dict[str, str], runs: int = RUNS) -> list[float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
        samples.append(time.perf_counter() - started)
    return samples


def bench_passthrough(work: Path) -> None:
    wrapper = Path(sys.executable).with_name("kata-vfio")
    bundle = work / "bundle"
    (bundle / "rootfs/bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", bundle / "rootfs/bin/busybox")
    (bundle / "rootfs/bin/sleep").symlink_to("busybox")
    subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"].update(terminal=False, args=["/bin/sleep", "600"])
    (bundle / "config.json").write_text(json.dumps(spec))
    config = work / "config.toml"
    config.write_text('runtime = "runc"\n')
    root = str(work / "runc-root")
    env = {"PATH": os.environ["PATH"], "KATA_VFIO_CONFIG": str(config)}
    subprocess.run(["runc", "--root", root, "create", "--bundle", str(bundle), "bench"],
                   check=True, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        run_timed([str(wrapper), "--root", root, "state", "bench"], env, 2)  # warm the cache
        inner, ours = [], []
        for _ in range(RUNS):  # interleaved, so both see the same machine noise
            inner += run_timed(["runc", "--root", root, "state", "bench"], env, 1)
            ours += run_timed([str(wrapper), "--root", root, "state", "bench"], env, 1)
        bare = run_timed([sys.executable, "-I", "-S", "-c", "pass"], env)
    finally:
        subprocess.run(["runc", "--root", root, "delete", "--force", "bench"], check=False)
    print(f"passthrough `state`: runc {median_ms(inner):.1f} ms, kata-vfio {median_ms(ours):.1f} ms"
          f" -> +{median_ms(ours) - median_ms(inner):.1f} ms (target <= +10 ms; "
          f"bare python3 -I -S start {median_ms(bare):.1f} ms)")


def bench_create(work: Path) -> None:
    from kata_vfio_host.settings import Settings
    from kata_vfio_runtime.spec_edit import edit_bundle

    from fakesys import FakeSysfs

    fs = FakeSysfs(work / "sys")
    addresses = []
    for g in range(32):
        addr = f"0000:{0x40 + g:02x}:00.0"
        fs.add_device(addr, group=100 + g, driver="vfio-pci")
        fs.add_vfio_group(100 + g)
        addresses.append(addr)
    settings = Settings(sysfs=str(fs.root))
    config = work / "create.toml"
    config.write_text(f'runtime = "/bin/true"\nsysfs = "{fs.root}"\nlog_file = "{work}/c.log"\n')
    wrapper = Path(sys.executable).with_name("kata-vfio")
    env = {"PATH": os.environ["PATH"], "KATA_VFIO_CONFIG": str(config)}
    for count in (1, 8, 32):
        bundle = work / f"create{count}"
        bundle.mkdir()
        subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True)
        spec = json.loads((bundle / "config.json").read_text())
        spec["annotations"] = {"io.kata-vfio.devices": ",".join(addresses[:count])}
        original = json.dumps(spec)
        edits, walls = [], []
        for _ in range(20):
            (bundle / "config.json").write_text(original)
            edits.append(edit_bundle(bundle, settings).seconds)
            (bundle / "config.json").write_text(original)
            walls += run_timed([str(wrapper), "create", "--bundle", str(bundle), "x"], env, 1)
        print(f"create edit, {count:2} devices: {median_ms(edits):6.2f} ms in-process"
              f"{' (target <= 40 ms)' if count == 8 else ''}; whole `kata-vfio create` "
              f"process {median_ms(walls):.0f} ms (python start, tomllib, jsonschema, structlog)")


def bench_hook(initrd: Path, kver: str) -> None:
    import vmtools

    e1000e_a, _, nvme, e1000_a, e1000_b = vmtools.DEFAULT_DEVICES
    with tempfile.TemporaryDirectory() as tmp:
        one = vmtools.host_manifest(Path(tmp) / "h1", [[nvme]])
        many = vmtools.host_manifest(Path(tmp) / "hn", [[e1000e_a], [nvme], [e1000_a, e1000_b]])
    script = "#!/kvfio/bin/sh\nexec /usr/bin/python3 -I -S /kvfio/bench.py \"$1\"\n"
    scenario = vmtools.Scenario("bench", one, script=script,
                                files={"manifest-1.json": one, "manifest-N.json": many})
    run = vmtools.boot(initrd, kver, [scenario])
    result = run.find("bench")
    bare, hook1, hookn = (median_ms(result[k]) for k in ("bare", "hook1", "hookN"))
    reb1, rebn = median_ms(result["rebind1"]), median_ms(result["rebindN"])
    n = result["devicesN"]
    print(f"hook (guest, TCG): bare python3 -I -S {bare:.0f} ms; hook(1) {hook1:.0f} ms "
          f"(kernel rebind {reb1:.0f} ms = {reb1 / hook1:.0%}); hook({n}) {hookn:.0f} ms "
          f"(kernel rebind {rebn:.0f} ms = {rebn / hookn:.0%})")
    print(f"  hook(1) - rebind = {(hook1 - reb1) / bare:.1f}x bare start (target <= 4x); "
          f"hook({n}) / hook(1) = {hookn / hook1:.2f} (target <= 1.5)")


def initrd_sizes(initrd: Path, kver: str) -> None:
    from build import build

    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "plain.img"
        build(kver, plain, with_hook=False)
        ours, base = initrd.stat().st_size, plain.stat().st_size
    print(f"initrd: {ours / 1e6:.1f} MB with kata-vfio vs {base / 1e6:.1f} MB for the same dracut "
          f"image without the module (+{(ours - base) / 1e6:.1f} MB: python3, the stdlib parts "
          "the hook imports, vfio modules)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--initrd", type=Path)
    parser.add_argument("--kver")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kata-vfio-bench.") as tmp:
        bench_passthrough(Path(tmp))
        bench_create(Path(tmp))
    if args.initrd and args.kver:
        initrd_sizes(args.initrd, args.kver)
        bench_hook(args.initrd, args.kver)
    return 0


if __name__ == "__main__":
    sys.exit(main())
