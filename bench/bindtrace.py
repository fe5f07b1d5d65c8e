#!/usr/bin/env python3
"""Where the time of a bind of N VFs goes (real kernel, TCG guest): boots the SR-IOV guest of
`make bench` and runs tests/vm/guest-bindtrace.py in it; prints its records as JSON lines
(`--raw`) or a per-phase table. Not part of `make bench`: a tool for looking into it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "vm"), str(REPO / "initrd")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--initrd", type=Path, required=True)
    parser.add_argument("--kver", required=True)
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--smp", type=int, default=2)
    parser.add_argument(
        "--pools", default="0", help="comma-separated thread counts to compare (0: ours)"
    )
    parser.add_argument("--no-ftrace", action="store_true", help="Python timestamps only")
    parser.add_argument("--brief", action="store_true", help="only the walls and top phases")
    parser.add_argument("--raw", type=Path, help="write every record here as JSON lines")
    args = parser.parse_args()
    import vmtools

    script = (
        f"#!/kvfio/bin/sh\nexport BINDTRACE_COUNT={args.count} "
        f"BINDTRACE_ROUNDS={args.rounds} BINDTRACE_POOLS={args.pools} "
        f"BINDTRACE_FTRACE={0 if args.no_ftrace else 1}\n"
        'exec /usr/bin/python3 -I -S /kvfio/bindtrace.py "$1"\n'
    )
    run = vmtools.boot(
        args.initrd,
        args.kver,
        [vmtools.Scenario("bindtrace", "{}", script=script)],
        devices=vmtools.nvme_sriov_pf(32, addr="0x10"),
        host_tools=True,
        memory_mb=1536,
        smp=args.smp,
    )
    records = [r for r in run.records if str(r.get("event", "")).startswith("bindtrace")]
    if args.raw:
        args.raw.write_text("".join(json.dumps(r) + "\n" for r in records))
    if not any(r["event"] == "bindtrace" for r in records):
        print("no result; console tail:\n" + run.console[-3000:])
        return 1
    for r in records:
        if r["event"] == "bindtrace-setup":
            print(f"not traceable: {', '.join(r['missing']) or 'none'}")
        if r["event"] == "bindtrace-restore":
            print(f"  restore --all of those {r['count']} VFs: {r['restore_ms']:.0f} ms")
        if r["event"] != "bindtrace":
            continue
        print(f"\n{r['mode']} bind of {r['count']} VFs: {r['wall_ms']:.0f} ms")
        if args.brief:
            continue
        print(f"  {'phase':38} {'n':>4} {'sum ms':>8} {'mean ms':>8} {'union ms':>9}")
        for side in ("python", "kernel"):
            for label, s in sorted(r[side].items(), key=lambda kv: -kv[1]["sum_ms"]):
                print(
                    f"  {side[:2]} {label:35} {s['n']:4} {s['sum_ms']:8.1f} "
                    f"{s['mean_ms']:8.2f} {s['union_ms']:9.1f}"
                    + (f"  {','.join(s['comms'])}" if side == "kernel" else "")
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
