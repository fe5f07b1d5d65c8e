"""Where a bind of N VFs spends its time, in a guest that is an SR-IOV host (bench/bindtrace.py
boots it): our Python's phases, timed per device and thread, and the kernel's, from ftrace's
function_graph tracer limited to the functions of the bind path (same clock: CLOCK_MONOTONIC).
Serial (one bind_groups call per VF) and concurrent (one call) alternate.
Prints "KVFIO <json>" records: one "bindtrace" per run, with per-phase sums and spans."""

import json
import os
import re
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, "/usr/lib/kata-vfio")
from kata_vfio import rebind
from kata_vfio.pci import PciAddress
from kata_vfio_host import bindings, ledger
from kata_vfio_host.bindings import bind_groups

try:
    from kata_vfio_host import giveback
    from kata_vfio_host.giveback import restore_all
except ImportError:  # a version from before the give-back had a module of its own
    giveback = bindings
    from kata_vfio_host.bindings import restore_all
from kata_vfio_host.ledger import ADMIN, Host
from kata_vfio_host.sriov import set_vf_count

COUNT = int(os.environ.get("BINDTRACE_COUNT", "32"))
ROUNDS = int(os.environ.get("BINDTRACE_ROUNDS", "2"))
POOLS = [int(p) for p in os.environ.get("BINDTRACE_POOLS", "0").split(",")]  # 0: ours
FTRACE = os.environ.get("BINDTRACE_FTRACE", "1") == "1"
POOL = [0]
TRACING = "/sys/kernel/tracing"
KERNEL_FUNCS = [
    "driver_override_store",
    "drivers_probe_store",
    "bus_find_device",
    "device_attach",
    "__device_attach",
    "bus_for_each_drv",
    "__driver_probe_device",
    "really_probe",
    "pci_device_probe",
    "local_pci_probe",
    "vfio_pci_probe",
    "vfio_pci_core_register_device",
    "vfio_assign_device_set",
    "vfio_pci_vf_init",
    "vfio_pci_probe_power_state",
    "vfio_pci_set_power_state",
    "pci_set_power_state",
    "vfio_register_group_dev",
    "vfio_create_group",
    "cdev_device_add",
    "device_add",
    "driver_bound",
    "driver_sysfs_add",
    "kobject_uevent_env",
    "pci_pm_runtime_suspend",
    "pci_pm_runtime_resume",
    "vfio_pci_core_runtime_suspend",
    "msleep",
    "usleep_range_state",
    "__mutex_lock_slowpath",
    "rwsem_down_write_slowpath",
    "rwsem_down_read_slowpath",
    "kernfs_fop_write_iter",
    "pm_runtime_work",
    "rpm_suspend",
    "rpm_resume",
    "iommu_group_get",
    "pci_dev_d3_sleep",
    "pci_power_up",
    "vfio_pci_core_enable",
    "device_links_driver_bound",
    "pci_read_config_word",
    "pci_write_config_word",
]

events = []  # (thread native id, label, detail, t0, t1)


def emit(**record):
    print("KVFIO " + json.dumps(record), flush=True)


def timed(label, fn, detail=None):
    def wrapper(*args, **kwargs):
        t0 = time.monotonic()
        try:
            return fn(*args, **kwargs)
        finally:
            d = detail(*args) if detail else ""
            events.append((threading.get_native_id(), label, d, t0, time.monotonic()))

    return wrapper


def timed_write(path, text):
    t0 = time.monotonic()
    try:
        rebind.write_attr(path, text)
    finally:
        path = str(path)
        events.append(
            (
                threading.get_native_id(),
                "write " + os.path.basename(path),
                os.path.basename(os.path.dirname(path)),
                t0,
                time.monotonic(),
            )
        )


def _wrap(module, name, detail=None):
    """Time module.name where it exists (the tool also looks into older versions)."""
    if hasattr(module, name):
        setattr(module, name, timed(name, getattr(module, name), detail))


def instrument():
    addr = lambda s, a, *r: str(a)  # noqa: E731
    for name in ("read_bind_state", "group_of", "read_device"):
        _wrap(bindings, name, addr)
    for name in (
        "group_members",
        "ensure_vfio_pci",
        "bind_all",
        "_bind_locked",
        "endpoints",
        "_live_claim",
    ):
        _wrap(bindings, name)
    for name in ("move_to", "bind_to"):  # the kernel work of one device
        _wrap(bindings, name, addr)
    _wrap(rebind, "current_driver", addr)
    if hasattr(bindings, "bind_pool_size"):
        default_pool = bindings.bind_pool_size
        bindings.bind_pool_size = lambda n: min(n, POOL[0]) if POOL[0] else default_pool(n)
    if hasattr(ledger, "_flock"):
        ledger._flock = _timed_acquire(ledger._flock)
    if hasattr(ledger, "Locks"):
        enter = ledger.Locks.__enter__

        def timed_enter(self):
            t0 = time.monotonic()
            enter(self)
            events.append((threading.get_native_id(), "flock acquire", "", t0, time.monotonic()))

        ledger.Locks.__enter__ = timed_enter
    bindings.editing = giveback.editing = _timed_cm("editing", ledger.editing)
    ledger._write_journal_file = timed("journal write", ledger._write_journal_file)
    ledger.read_journal_file = timed("journal read", ledger.read_journal_file)
    bindings.read_journal_file = giveback.read_journal_file = ledger.read_journal_file


def _timed_acquire(flock):
    import contextlib

    @contextlib.contextmanager
    def wrapper(path, *args):
        t0 = time.monotonic()
        with flock(path, *args):
            events.append(
                (threading.get_native_id(), "flock acquire", path.name, t0, time.monotonic())
            )
            yield

    return wrapper


def _timed_cm(label, cm):
    import contextlib

    @contextlib.contextmanager
    def wrapper(*args):
        t0 = time.monotonic()
        with cm(*args) as value:
            yield value
        events.append((threading.get_native_id(), label, "", t0, time.monotonic()))

    return wrapper


def tracefs(name, value):
    with open(os.path.join(TRACING, name), "w") as f:
        f.write(value)


def setup_ftrace():
    if not os.path.exists(os.path.join(TRACING, "trace")):
        os.makedirs(TRACING, exist_ok=True)
        os.system(f"/kvfio/bin/mount -t tracefs tracefs {TRACING}")
    tracefs("tracing_on", "0")
    tracefs("current_tracer", "nop")
    tracefs("trace_clock", "mono")
    tracefs("buffer_size_kb", "16384")
    available = set()
    with open(os.path.join(TRACING, "available_filter_functions")) as f:
        for line in f:
            available.add(line.split()[0])
    funcs = [f for f in KERNEL_FUNCS if f in available]
    with open(os.path.join(TRACING, "set_ftrace_filter"), "w") as f:
        for fn in funcs:
            f.write(fn + "\n")
    tracefs("current_tracer", "function_graph")
    for opt in ("funcgraph-abstime", "funcgraph-proc", "funcgraph-tail"):
        tracefs("trace_options", opt)
    tracefs("trace_options", "nofuncgraph-irqs")
    return funcs, sorted(set(KERNEL_FUNCS) - set(funcs))


LINE = re.compile(
    r"^\s*(\d+\.\d+)\s*\|\s*(\d+)\)\s*(\S+)-(\d+)\s*\|\s*(?:[+!#*@$&]\s*)?"
    r"(?:(\d+\.\d+) us)?\s*\|\s*(.*)$"
)


def read_ftrace():
    """[(pid, comm, func, start, end)] from function_graph's text."""
    out, stacks = [], {}
    with open(os.path.join(TRACING, "trace")) as f:
        for line in f:
            m = LINE.match(line)
            if not m:
                continue
            ts, _cpu, comm, pid, dur, body = m.groups()
            ts, pid, body = float(ts), int(pid), body.strip()
            stack = stacks.setdefault(pid, [])
            if body.endswith("{"):
                stack.append((body[:-1].strip().rstrip("()"), ts, comm))
            elif body.startswith("}"):
                name = (
                    body.split("/*")[1].split("*/")[0].strip().rstrip("()")
                    if "/*" in body
                    else None
                )
                while stack:
                    fn, t0, c = stack.pop()
                    if name is None or fn == name:
                        parent = stack[-1][0] if stack else ""
                        out.append(
                            (pid, c, fn, t0, t0 + float(dur or 0) / 1e6 if dur else ts, parent)
                        )
                        break
            elif body.endswith(";") and dur:
                out.append(
                    (
                        pid,
                        comm,
                        body[:-1].strip().rstrip("()"),
                        ts,
                        ts + float(dur) / 1e6,
                        stack[-1][0] if stack else "",
                    )
                )
    return out


def summarize(mode, wall, t_begin, t_end, kernel):
    """Per phase: count, sum of durations, and the span (first start to last end); the
    union of the intervals (time with at least one in flight) shows the concurrency."""

    def stats(items):
        items = [(a, b) for a, b in items if b >= t_begin and a <= t_end]
        if not items:
            return None
        total = sum(b - a for a, b in items)
        ivs = sorted(items)
        union, cur_a, cur_b = 0.0, *ivs[0]
        for a, b in ivs[1:]:
            if a > cur_b:
                union += cur_b - cur_a
                cur_a, cur_b = a, b
            else:
                cur_b = max(cur_b, b)
        union += cur_b - cur_a
        return {
            "n": len(items),
            "sum_ms": round(total * 1e3, 2),
            "mean_ms": round(total / len(items) * 1e3, 3),
            "union_ms": round(union * 1e3, 2),
            "first_ms": round((ivs[0][0] - t_begin) * 1e3, 2),
            "last_end_ms": round((max(b for _, b in items) - t_begin) * 1e3, 2),
        }

    py = {}
    for label in sorted({e[1] for e in events}):
        s = stats([(e[3], e[4]) for e in events if e[1] == label])
        if s:
            py[label] = s
    kfn = {}
    for fn in sorted({k[2] for k in kernel}):
        s = stats([(k[3], k[4]) for k in kernel if k[2] == fn])
        if s:
            s["comms"] = sorted({k[1] for k in kernel if k[2] == fn})[:4]
            kfn[fn] = s
    for fn in (
        "__mutex_lock_slowpath",
        "rwsem_down_write_slowpath",
        "rwsem_down_read_slowpath",
        "usleep_range_state",
        "msleep",
    ):
        for parent in sorted({k[5] for k in kernel if k[2] == fn}):
            s = stats([(k[3], k[4]) for k in kernel if k[2] == fn and k[5] == parent])
            if s:
                s["comms"] = []
                kfn[f"{fn} in {parent or '?'}"] = s
    emit(
        event="bindtrace",
        mode=mode,
        count=COUNT,
        wall_ms=round(wall * 1e3, 1),
        python=py,
        kernel=kfn,
    )


def timeline(t_begin):
    """The concurrent run's per-device timeline: thread, then each phase's start-end."""
    rows = {}
    for tid, label, detail, a, b in events:
        if label.startswith("write ") or label in ("current_driver", "move_to", "bind_to"):
            rows.setdefault(detail, []).append(
                (label, tid, round((a - t_begin) * 1e3, 2), round((b - t_begin) * 1e3, 2))
            )
    return rows


def main():
    pf = next(
        a
        for a in sorted(os.listdir("/sys/bus/pci/devices"))
        if os.path.exists(f"/sys/bus/pci/devices/{a}/sriov_totalvfs")
    )
    host = Host(Path("/sys"), Path("/run/kata-vfio-bench"), write=timed_write)
    vfs = set_vf_count(host, PciAddress.parse(pf), COUNT)
    bind_groups(host, vfs[:1], ADMIN)  # loads vfio-pci
    restore_all(host)
    if FTRACE:  # vfio-pci's functions are traceable once it is loaded
        funcs, missing = setup_ftrace()
        emit(event="bindtrace-setup", traced=funcs, missing=missing)
    instrument()
    some = vfs[:COUNT]
    for rnd in range(ROUNDS):
        for mode in ["serial"] + [f"concurrent-p{p}" if p else "concurrent" for p in POOLS]:
            POOL[0] = int(mode.split("-p")[1]) if "-p" in mode else 0
            events.clear()
            if FTRACE:
                tracefs("trace", "")
                tracefs("tracing_on", "1")
            t_begin = time.monotonic()
            if mode == "serial":
                for vf in some:
                    bind_groups(host, [vf], ADMIN)
            else:
                bind_groups(host, some, ADMIN)
            t_end = time.monotonic()
            time.sleep(0.3)  # let the runtime-suspend work that the binds queued finish
            kernel = []
            if FTRACE:
                tracefs("tracing_on", "0")
                kernel = read_ftrace()
            summarize(mode, t_end - t_begin, t_begin, t_end + 0.3, kernel)
            if mode.startswith("concurrent") and rnd == ROUNDS - 1 and FTRACE:
                emit(event="bindtrace-timeline", rows=timeline(t_begin))
                emit(
                    event="bindtrace-kernel",
                    rows=[
                        (p, c, f, round((a - t_begin) * 1e3, 3), round((b - t_begin) * 1e3, 3), up)
                        for p, c, f, a, b, up in kernel
                        if f
                        in (
                            "drivers_probe_store",
                            "vfio_pci_probe",
                            "pci_set_power_state",
                            "__mutex_lock_slowpath",
                            "driver_override_store",
                            "vfio_register_group_dev",
                            "msleep",
                            "pm_runtime_work",
                            "rwsem_down_write_slowpath",
                            "rwsem_down_read_slowpath",
                        )
                    ],
                )
            t0 = time.monotonic()
            report = restore_all(host)
            emit(
                event="bindtrace-restore",
                after=mode,
                count=COUNT,
                restore_ms=round((time.monotonic() - t0) * 1e3, 1),
            )
            assert not report.failed, report.failed
    set_vf_count(host, PciAddress.parse(pf), 0)


main()
