"""What every engine's create and delete do to a bundle and the ledger.

The podman wrapper (`kata-vfio create`) and the shim wrapper (`containerd-shim-
kata-vfio-v2 start`) both call `prepare_bundle`; their delete paths both call
`release_after_delete`. Imported only on those paths: it pulls in the settings,
the ledger and the JSON-lines event log.
"""

from __future__ import annotations

import os

from kata_vfio.boundary import step
from kata_vfio.defaults import SELECT_ANNOTATION, VF_CONFIG_ANNOTATION
from kata_vfio.errors import DeviceError
from kata_vfio.jsonlog import wrapper_log
from kata_vfio.pci import PciAddress, group_of
from kata_vfio_host.bindings import acquire, apply_vf_config
from kata_vfio_host.ledger import ContainerId, Host
from kata_vfio_host.settings import Settings
from kata_vfio_runtime.spec_edit import (
    EditResult,
    edit_bundle,
    is_sandbox,
    load_spec,
    requested_addresses,
    requested_groups,
    sandbox_spec,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from kata_vfio.types import StrPath


def host_of(settings: Settings) -> Host:
    return Host(sysfs=settings.sysfs, state_dir=settings.state_dir)


def prepare_bundle(
    container_id: str | None, bundle: StrPath, settings: Settings, host: Host, log: Any
) -> EditResult:
    """Claim (and, if the allow-list permits, auto-bind) the container's devices, then edit
    <bundle>/config.json. On any failure nothing stays bound or claimed for it."""
    acquired = None
    try:
        with step(f"reading {bundle}/config.json"):
            spec, _ = load_spec(bundle)
        groups = list(requested_groups(spec))
        addresses = requested_addresses(spec)
        select = (spec.get("annotations") or {}).get(SELECT_ANNOTATION)
        if is_sandbox(spec):
            return _edit_sandbox(
                bundle, spec, settings, bool(groups or addresses or select is not None), log
            )
        chosen: list[PciAddress] = []
        macs: dict[PciAddress, str] = {}
        if (spec.get("annotations") or {}).get(VF_CONFIG_ANNOTATION) is not None and not (
            groups or addresses or select is not None
        ):
            raise DeviceError(
                f"{VF_CONFIG_ANNOTATION} names VFs the container does not ask for",
                "ask for them with io.kata-vfio.devices or io.kata-vfio.select",
            )
        if groups or addresses or select is not None:
            acquired = ContainerId.parse(container_id)

            checks: list[Any] = []  # one walk over /proc for every device auto-bound

            def in_use(addr: PciAddress) -> list[str]:
                if not checks:  # only when something is auto-bound: create stays lean
                    from pathlib import Path

                    from kata_vfio_host.usage import use_checker

                    checks.append(use_checker(host.sysfs, Path("/proc")))
                result: list[str] = checks[0](addr)
                return result

            with step("claiming the container's IOMMU groups"):
                if select is None:
                    bound = acquire(
                        host,
                        acquired,
                        groups,
                        addresses,
                        settings.autobind_allow,
                        str(bundle),
                        in_use=in_use,
                    )
                else:
                    from kata_vfio_host.allocate import (
                        Pool,
                        allocation_lock,
                        choose,
                        parse_select,
                    )

                    requests = parse_select(str(select))
                    named = frozenset(
                        {g.number for g in groups}
                        | {group_of(host.sysfs, a).number for a in addresses}
                    )
                    # the lock covers the choice and its claims only: the binds of one
                    # allocation run while the next one chooses
                    pool = Pool(host, settings.autobind_allow, acquired)  # what devices are
                    lock = allocation_lock(host)
                    with lock:
                        chosen = choose(
                            host, requests, settings.autobind_allow, acquired, named, pool=pool
                        )
                        bound = acquire(
                            host,
                            acquired,
                            groups,
                            addresses + chosen,
                            settings.autobind_allow,
                            str(bundle),
                            in_use=in_use,
                            on_claimed=lock.release,
                        )
                    log.info("allocated", select=select, devices=[str(a) for a in chosen])
            if bound:
                log.info("auto-bound", devices=[str(a) for a in bound])
            vf_config = (spec.get("annotations") or {}).get(VF_CONFIG_ANNOTATION)
            if vf_config is not None:
                from kata_vfio_host.vfconfig import parse_vf_config

                with step("setting the VFs' MAC and VLAN on their PF"):
                    done = apply_vf_config(host, acquired, str(vf_config))
                    macs = {s.vf: s.mac for s in parse_vf_config(str(vf_config)) if s.mac}
                log.info("VF settings", settings=done)
        with step(f"editing {bundle}/config.json"):
            result = edit_bundle(bundle, settings, tuple(chosen), macs, spec)
    except BaseException as exc:
        from kata_vfio.boundary import describe
        from kata_vfio_host.giveback import release_container

        log.error("create refused", bundle=str(bundle), error=describe(exc)[0])
        if acquired is not None:
            report = release_container(host, acquired)
            if report.failed:
                log.error("give back failed", failures=report.failed)
        raise
    if result.plan is not None:
        log.info(
            "spec edited" if result.written else "spec already edited",
            bundle=str(bundle),
            groups=[str(g.host_group) for g in result.plan.manifest.groups],
            devices=[str(d.host_address) for d in result.plan.manifest.devices],
            memlock="unlimited" if result.plan.memlock is not None else "as the spec says",
            edit_ms=round(result.seconds * 1000, 3),
        )
    elif result.written:
        log.warning(
            "removed manifest/guest-hook annotations the container brought itself",
            bundle=str(bundle),
        )
    return result


def _edit_sandbox(
    bundle: StrPath, spec: dict[str, Any], settings: Settings, asks: bool, log: Any
) -> EditResult:
    """A CRI pod sandbox: nothing claimed, no manifest, no nodes (see sandbox_spec)."""
    import time

    from kata_vfio.files import write_atomically
    from kata_vfio.jsoncodec import dumps

    started = time.perf_counter()
    new = sandbox_spec(spec, settings, asks)
    if new != spec:
        with step(f"editing {bundle}/config.json"):
            write_atomically(
                os.path.join(bundle, "config.json"), dumps(new).encode(), durable=False
            )
    if asks:
        log.info("pod sandbox: its containers get the devices they ask for", bundle=str(bundle))
    return EditResult(None, new != spec, time.perf_counter() - started)


def release_after_delete(container_id: str, settings: Settings, host: Host) -> list[str]:
    """The container is gone: give its devices back. Returns the failures, one line each."""
    from kata_vfio_host.giveback import release_container

    log = wrapper_log(settings.log_file, container_id=container_id, verb="delete")
    report = release_container(host, container_id)
    log.info(
        "devices given back",
        devices=report.restored,
        failures=report.failed,
        vf_settings=report.vf_settings,
    )
    return report.failed
