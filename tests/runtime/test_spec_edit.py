from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from kata_vfio.errors import DeviceError, SpecError
from kata_vfio.manifest import (
    DEVICES_ANNOTATION,
    GUEST_HOOK_PATH_ANNOTATION,
    MANIFEST_ANNOTATION,
    Manifest,
)
from kata_vfio_host.settings import Settings
from kata_vfio_runtime.spec_edit import apply_plan, edit_bundle, plan_edit

from fakesys import FakeSysfs
from ocischema import schema_errors


def settings_for(fs: FakeSysfs, **extra: Any) -> Settings:
    return Settings(sysfs=str(fs.root), **extra)


def write_spec(bundle: Path, change: Any) -> dict[str, Any]:
    spec = json.loads((bundle / "config.json").read_text())
    change(spec)
    (bundle / "config.json").write_text(json.dumps(spec, indent=1))
    return spec


def vfio_device(group: int, minor: int) -> dict[str, Any]:
    # what `podman --device /dev/vfio/N` writes, fileMode with the type bits included
    return {
        "path": f"/dev/vfio/{group}",
        "type": "c",
        "major": 243,
        "minor": minor,
        "fileMode": 8630,
        "uid": 0,
        "gid": 0,
    }


def test_group_from_device_entry(vfio_host: FakeSysfs, bundle: Path) -> None:
    write_spec(bundle, lambda s: s["linux"].setdefault("devices", []).append(vfio_device(12, 0)))
    result = edit_bundle(bundle, settings_for(vfio_host))
    assert result.written
    spec = json.loads((bundle / "config.json").read_text())
    paths = [d["path"] for d in spec["linux"]["devices"]]
    assert paths.count("/dev/vfio/12") == 1 and "/dev/vfio/vfio" in paths
    vfio = next(d for d in spec["linux"]["devices"] if d["path"] == "/dev/vfio/vfio")
    assert (vfio["major"], vfio["minor"], vfio["type"]) == (10, 196, "c")
    rules = spec["linux"]["resources"]["devices"]
    assert {"allow": True, "type": "c", "major": 243, "minor": 0, "access": "rwm"} in rules
    assert {"allow": True, "type": "c", "major": 10, "minor": 196, "access": "rwm"} in rules
    # the runc default "deny all" rule stays first, the allows come after it
    assert rules[0] == {"allow": False, "access": "rwm"}
    manifest = Manifest.from_json(spec["annotations"][MANIFEST_ANNOTATION])
    assert [str(g.host_group) for g in manifest.groups] == ["12"]
    dev = manifest.groups[0].devices[0]
    assert (
        str(dev.host_address),
        dev.identity.vendor,
        dev.identity.device,
        dev.identity.class_code,
    ) == ("0000:03:00.0", 0x8086, 0x10D3, 0x020000)
    assert spec["annotations"][GUEST_HOOK_PATH_ANNOTATION] == "/usr/share/oci/hooks"


def test_devices_by_address_add_nodes_rules_and_skip_bridges(
    vfio_host: FakeSysfs, bundle: Path
) -> None:
    write_spec(
        bundle,
        lambda s: s.setdefault("annotations", {}).update(
            {DEVICES_ANNOTATION: "0000:04:01.0, 0000:03:00.0"}
        ),
    )
    extras = {"io.katacontainers.config.hypervisor.enable_iommu": "true"}
    edit_bundle(bundle, settings_for(vfio_host, annotations=extras))
    spec = json.loads((bundle / "config.json").read_text())
    nodes = {d["path"]: (d["major"], d["minor"]) for d in spec["linux"]["devices"]}
    assert nodes == {
        "/dev/vfio/vfio": (10, 196),
        "/dev/vfio/12": (243, 0),
        "/dev/vfio/13": (243, 1),
    }
    manifest = Manifest.from_json(spec["annotations"][MANIFEST_ANNOTATION])
    group13 = next(g for g in manifest.groups if g.host_group.number == 13)
    assert [str(d.host_address) for d in group13.devices] == ["0000:04:00.0", "0000:04:01.0"]
    assert spec["annotations"]["io.katacontainers.config.hypervisor.enable_iommu"] == "true"
    assert schema_errors(spec) == []


def test_edit_is_idempotent(vfio_host: FakeSysfs, bundle: Path) -> None:
    write_spec(
        bundle,
        lambda s: s.setdefault("annotations", {}).update({DEVICES_ANNOTATION: "0000:04:00.0"}),
    )
    assert edit_bundle(bundle, settings_for(vfio_host)).written
    once = (bundle / "config.json").read_bytes()
    inode = os.stat(bundle / "config.json").st_ino
    again = edit_bundle(bundle, settings_for(vfio_host))
    assert not again.written
    assert (bundle / "config.json").read_bytes() == once
    assert os.stat(bundle / "config.json").st_ino == inode


def test_spec_without_vfio_is_not_rewritten(vfio_host: FakeSysfs, bundle: Path) -> None:
    before = (bundle / "config.json").read_bytes()
    st = os.stat(bundle / "config.json")
    result = edit_bundle(bundle, settings_for(vfio_host))
    assert result.plan is None and not result.written
    assert (bundle / "config.json").read_bytes() == before
    assert os.stat(bundle / "config.json").st_mtime_ns == st.st_mtime_ns


def test_unknown_fields_order_and_mode_survive(vfio_host: FakeSysfs, bundle: Path) -> None:
    def change(s: dict[str, Any]) -> None:
        s["x-vendor-extension"] = {"keep": [1, 2, 3]}
        s["linux"]["devices"] = [vfio_device(13, 1)]

    original = write_spec(bundle, change)
    os.chmod(bundle / "config.json", 0o640)
    edit_bundle(bundle, settings_for(vfio_host))
    spec = json.loads((bundle / "config.json").read_text())
    assert list(spec)[: len(original)] == list(original)
    assert spec["x-vendor-extension"] == {"keep": [1, 2, 3]}
    assert list(spec["linux"]) == list(original["linux"]) + (
        [] if "resources" in original["linux"] else ["resources"]
    )
    assert os.stat(bundle / "config.json").st_mode & 0o777 == 0o640
    # podman's own entry (fileMode with type bits) is left exactly as it was
    assert spec["linux"]["devices"][0] == vfio_device(13, 1)
    assert list(os.listdir(bundle)) == ["rootfs", "config.json"] or sorted(os.listdir(bundle)) == [
        "config.json",
        "rootfs",
    ]


def test_vf_mac_is_looked_up_without_failing_when_unknown(vfio_host: FakeSysfs) -> None:
    spec: dict[str, Any] = {"annotations": {DEVICES_ANNOTATION: "0000:06:10.0"}}
    plan = plan_edit(spec, settings_for(vfio_host))
    assert plan is not None
    (dev,) = plan.manifest.devices
    assert str(dev.host_address) == "0000:06:10.0" and dev.mac is None  # no such PF netdev here
    new = apply_plan(spec, plan)
    assert spec == {"annotations": {DEVICES_ANNOTATION: "0000:06:10.0"}}  # input untouched
    assert {
        "path": "/dev/vfio/21",
        "type": "c",
        "major": 243,
        "minor": 2,
        "fileMode": 0o666,
        "uid": 0,
        "gid": 0,
    } in new["linux"]["devices"]


def test_mac_from_link_picks_the_vf() -> None:
    from kata_vfio_host.netinfo import mac_from_link

    class Msg:
        def __init__(self, attrs: dict[str, Any]) -> None:
            self.attrs = attrs

        def get_attr(self, name: str) -> Any:
            return self.attrs.get(name)

        def get_attrs(self, name: str) -> list[Any]:
            return list(self.attrs.get(name, []))

    infos = [
        Msg({"IFLA_VF_MAC": {"vf": i, "mac": mac}})
        for i, mac in enumerate(["00:00:00:00:00:00", "52:54:00:AA:BB:CC"])
    ]
    link = Msg({"IFLA_VFINFO_LIST": Msg({"IFLA_VF_INFO": infos})})
    assert mac_from_link(link, 1) == "52:54:00:aa:bb:cc"
    assert mac_from_link(link, 0) is None
    assert mac_from_link(Msg({}), 0) is None


@pytest.mark.parametrize("text", ["", " , "])
def test_empty_device_annotation_is_refused(vfio_host: FakeSysfs, text: str) -> None:
    from kata_vfio.errors import DeviceError

    with pytest.raises(DeviceError, match="is empty"):
        plan_edit({"annotations": {DEVICES_ANNOTATION: text}}, settings_for(vfio_host))


@pytest.mark.parametrize(
    "path", ["/dev/../dev/vfio/12", "//dev/vfio/12", "/dev/vfio/./12", "/dev/vfio//12"]
)
def test_non_canonical_vfio_paths_are_refused(
    vfio_host: FakeSysfs, bundle: Path, path: str
) -> None:
    """Issue 7, defect 8: `/dev/../dev/vfio/14` passed unedited and unchecked."""
    entry = {**vfio_device(12, 0), "path": path}
    write_spec(bundle, lambda s: s["linux"].setdefault("devices", []).append(entry))
    before = (bundle / "config.json").read_bytes()
    with pytest.raises(SpecError, match="not canonical; write it as /dev/vfio/12"):
        edit_bundle(bundle, settings_for(vfio_host))
    assert (bundle / "config.json").read_bytes() == before


def test_device_numbers_must_match_the_host(vfio_host: FakeSysfs, bundle: Path) -> None:
    """Issue 7, defect 8: a /dev/vfio/N entry's major:minor was never checked."""
    write_spec(bundle, lambda s: s["linux"].setdefault("devices", []).append(vfio_device(12, 5)))
    before = (bundle / "config.json").read_bytes()
    with pytest.raises(
        DeviceError,
        match=r"/dev/vfio/12 as 243:5, but the host's "
        r"/dev/vfio/12 is 243:0",
    ):
        edit_bundle(bundle, settings_for(vfio_host))
    assert (bundle / "config.json").read_bytes() == before


def memlock(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in spec["process"].get("rlimits", []) if r["type"] == "RLIMIT_MEMLOCK"]


def test_vfio_containers_get_memlock_for_dma(vfio_host: FakeSysfs, bundle: Path) -> None:
    """Issue 8: DPDK pins DMA memory; inside the VM it is the guest's, so raise the limit."""

    def ask(s: dict[str, Any]) -> None:
        s["annotations"] = {DEVICES_ANNOTATION: "0000:03:00.0"}
        s["process"]["rlimits"] = [
            {"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024},
            {"type": "RLIMIT_MEMLOCK", "hard": 65536, "soft": 65536},
        ]

    write_spec(bundle, ask)
    edit_bundle(bundle, settings_for(vfio_host))
    spec = json.loads((bundle / "config.json").read_text())
    assert memlock(spec) == [{"type": "RLIMIT_MEMLOCK", "hard": 2**64 - 1, "soft": 2**64 - 1}]
    assert {"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024} in spec["process"]["rlimits"]
    assert schema_errors({"ociVersion": "1.0.2", "process": spec["process"]}) == []


def test_memlock_switch_and_plain_containers(vfio_host: FakeSysfs, bundle: Path) -> None:
    write_spec(bundle, lambda s: s.update(annotations={DEVICES_ANNOTATION: "0000:03:00.0"}))
    edit_bundle(bundle, settings_for(vfio_host, raise_memlock=False))
    assert memlock(json.loads((bundle / "config.json").read_text())) == []

    def plain(s: dict[str, Any]) -> None:
        s.update(annotations={})
        s["linux"]["devices"] = []

    write_spec(bundle, plain)
    edit_bundle(bundle, settings_for(vfio_host))  # no device: nothing raised
    assert memlock(json.loads((bundle / "config.json").read_text())) == []


def test_vfio_containers_get_a_tmpfs_for_dpdks_socket(vfio_host: FakeSysfs, bundle: Path) -> None:
    """Issue 8: DPDK binds a Unix socket under /run/dpdk; Kata 1.x's 9p rootfs refuses it."""
    write_spec(bundle, lambda s: s.update(annotations={DEVICES_ANNOTATION: "0000:03:00.0"}))
    edit_bundle(bundle, settings_for(vfio_host))
    spec = json.loads((bundle / "config.json").read_text())
    ours = [m for m in spec["mounts"] if m["destination"] == "/run/dpdk"]
    assert ours == [
        {
            "destination": "/run/dpdk",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "nodev", "mode=755", "size=64m"],
        }
    ]
    assert schema_errors({"ociVersion": "1.0.2", "mounts": ours}) == []
    edit_bundle(bundle, settings_for(vfio_host))  # idempotent: no second mount
    assert (
        len(
            [
                m
                for m in json.loads((bundle / "config.json").read_text())["mounts"]
                if m["destination"] == "/run/dpdk"
            ]
        )
        == 1
    )


def test_a_container_with_its_own_run_keeps_it(vfio_host: FakeSysfs, bundle: Path) -> None:
    def ask(s: dict[str, Any]) -> None:
        s["annotations"] = {DEVICES_ANNOTATION: "0000:03:00.0"}
        s["mounts"].append({"destination": "/run", "type": "tmpfs", "source": "tmpfs"})

    write_spec(bundle, ask)
    edit_bundle(bundle, settings_for(vfio_host))
    destinations = [
        m["destination"] for m in json.loads((bundle / "config.json").read_text())["mounts"]
    ]
    assert "/run/dpdk" not in destinations and destinations.count("/run") == 1
    write_spec(
        bundle, lambda s: s.update(mounts=[m for m in s["mounts"] if m["destination"] != "/run"])
    )
    edit_bundle(bundle, settings_for(vfio_host, dpdk_run_tmpfs=False))
    assert "/run/dpdk" not in [
        m["destination"] for m in json.loads((bundle / "config.json").read_text())["mounts"]
    ]
