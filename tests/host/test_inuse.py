"""What the host stands on is "in use" (issue 15, "never bind what the host stands on"):
NICs that are ports of a bridge/bond/OVS, carry routes, or have a VLAN in use on them;
disks under mounts, swap and dm/md stacks matched by device number, not by name.

Real interfaces live in a network namespace of the test's own (veth and bridge: what
this machine's kernel has; bonds and VLANs are tested on Debian's kernel in the VM
test, tests/e2e/test_vm_host.py); the code is pointed at the namespace with an IPRoute of
it, or runs there whole (`ip netns exec`, the real kata-vfio-ctl on the fake host).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata_vfio.pci import PciAddress
from kata_vfio_host.usage import Link, NetView, network_uses, uses

from fakesys import FakeSysfs
from wrapper_run import SOURCE_PATH

# --- NICs: real interfaces in a namespace of our own ---------------------------------


class Netns:
    def __init__(self, name: str) -> None:
        self.name = name

    def ip(self, *args: str) -> None:
        subprocess.run(["ip", "-n", self.name, *args], check=True, capture_output=True)

    def uses(self, ifname: str) -> list[str]:
        from pyroute2 import NetNS

        with NetNS(self.name) as ns:
            return network_uses(ifname, ns)

    def link_local(self, ifname: str) -> str:
        """The interface's IPv6 link-local address, once the kernel has given it one."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            out = subprocess.run(
                ["ip", "-n", self.name, "-6", "-o", "addr", "show", "dev", ifname, "scope", "link"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            if "fe80::" in out:
                return out.split()[3].split("/")[0]
            time.sleep(0.1)
        raise AssertionError(f"{ifname} never got an IPv6 link-local address")


@pytest.fixture
def netns() -> Iterator[Netns]:
    name = f"kvinuse-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        ns = Netns(name)
        ns.ip("link", "add", "kv0", "type", "veth", "peer", "name", "kv1")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def both_up(ns: Netns) -> None:
    ns.ip("link", "set", "kv0", "up")
    ns.ip("link", "set", "kv1", "up")  # carrier: now the kernel gives each an fe80:: address


@pytest.mark.host
def test_an_up_interface_with_only_its_ipv6_link_local_address_is_free(netns: Netns) -> None:
    """Every up interface gets an fe80:: address (and the kernel's fe80::/64 and ff00::/8
    routes): alone that carries nothing of the host's. Main counted it as "up with
    addresses fe80::…", so every up NIC was in use."""
    both_up(netns)
    assert netns.link_local("kv0").startswith("fe80::")
    assert netns.uses("kv0") == []
    netns.ip("addr", "add", "2001:db8:5::1/64", "dev", "kv0")
    assert netns.uses("kv0") == [
        "interface kv0 is up with addresses 2001:db8:5::1",
    ]


@pytest.mark.host
@pytest.mark.parametrize(
    ("route", "shown"),
    [
        (["route", "add", "10.9.0.0/16", "dev", "kv0", "table", "100"], "10.9.0.0/16"),
        (["-6", "route", "add", "2001:db8:9::/48", "dev", "kv0"], "2001:db8:9::/48"),
        (
            ["route", "add", "10.8.0.0/16", "nexthop", "dev", "kv1", "nexthop", "dev", "kv0"],
            "10.8.0.0/16",
        ),
        (["route", "add", "default", "dev", "kv0", "table", "7"], "default"),
    ],
)
def test_a_route_through_an_interface_is_a_use(netns: Netns, route: list[str], shown: str) -> None:
    """Routes in any table, either family, as one nexthop of several: dpdk-devbind
    refuses an interface with routes. Main looked at routes only without addresses
    (every up interface has its link-local one) and in one family and table."""
    both_up(netns)
    netns.link_local("kv0")
    netns.ip(*route)
    assert netns.uses("kv0") == [f"interface kv0 carries routes ({shown})"]


@pytest.mark.host
def test_a_down_interface_with_an_address_is_free(netns: Netns) -> None:
    netns.ip("addr", "add", "192.0.2.77/24", "dev", "kv0")
    assert netns.uses("kv0") == []
    netns.ip("link", "set", "kv0", "up")
    assert netns.uses("kv0") == ["interface kv0 is up with addresses 192.0.2.77"]


@pytest.mark.host
def test_a_bridge_port_is_in_use_whether_the_bridge_is_up_or_down(netns: Netns) -> None:
    """Conservative: taking a port changes the bridge the admin built (brought up later,
    it lacks the port); the line says how to free it."""
    netns.ip("link", "add", "kvbr0", "type", "bridge")
    netns.ip("link", "set", "kv0", "master", "kvbr0")
    assert netns.uses("kv0") == [
        "interface kv0 is a member of bridge kvbr0, which is down "
        "(ip link set kv0 nomaster frees it)"
    ]
    netns.ip("link", "set", "kvbr0", "up")
    assert netns.uses("kv0") == ["interface kv0 is a member of bridge kvbr0, which is up"]
    netns.ip("link", "set", "kv0", "nomaster")
    assert netns.uses("kv0") == []


@pytest.mark.host
def test_bind_refuses_a_bridge_port_on_the_fake_host(
    netns: Netns, vfio_host: FakeSysfs, tmp_path: Path
) -> None:
    """The whole path: the real kata-vfio-ctl, run in the namespace, on a fake PCI
    function whose interface is the namespace's kv0."""
    vfio_host.add_device("0000:09:00.0", group=50, driver="e1000e", net=("kv0",))
    netns.ip("link", "add", "kvbr0", "type", "bridge")
    netns.ip("link", "set", "kv0", "master", "kvbr0")
    netns.ip("link", "set", "kvbr0", "up")
    config = tmp_path / "kv.toml"
    config.write_text(
        f'runtime = "/bin/true"\nsysfs = "{vfio_host.root}"\nstate_dir = "{tmp_path / "state"}"\n'
    )
    before = (vfio_host.dev_dir("0000:09:00.0") / "driver_override").read_text()

    def bind() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                netns.name,
                sys.executable,
                "-m",
                "kata_vfio_ctl.main",
                "bind",
                "0000:09:00.0",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "PYTHONPATH": SOURCE_PATH,
                "KATA_VFIO_CONFIG": str(config),
            },
        )

    refused = bind()
    assert refused.returncode == 1, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "kata-vfio-ctl: PCI device 0000:09:00.0 is in use: interface kv0 is a member of "
        "bridge kvbr0, which is up;"
    ), refused.stderr
    assert (vfio_host.dev_dir("0000:09:00.0") / "driver_override").read_text() == before


# --- NICs: the rules on links the namespace here cannot make --------------------------


def view(*links: Link, addresses: dict[int, list[str]] | None = None) -> NetView:
    return NetView({link.index: link for link in links}, addresses or {}, {})


def test_an_open_vswitch_port_is_in_use_though_ovs_system_is_down() -> None:
    """ovs-system, the datapath every OVS port's master is, is always down."""
    net = view(Link(1, "ovs-system", kind="openvswitch"), Link(2, "eth3", up=True, master=1))
    assert net.uses("eth3") == ["interface eth3 is an Open vSwitch port"]


def test_a_port_of_a_down_bond_is_in_use() -> None:
    net = view(Link(1, "bond0", kind="bond"), Link(2, "eth3", master=1))
    assert net.uses("eth3") == [
        "interface eth3 is a member of bond bond0, which is down "
        "(ip link set eth3 nomaster frees it)"
    ]


def test_a_vlan_in_use_on_an_interface_makes_it_in_use() -> None:
    """eth3 itself has nothing; its VLAN carries the host's address."""
    net = view(
        Link(2, "eth3", up=True),
        Link(5, "eth3.100", kind="vlan", up=True, lower=2),
        Link(6, "mv0", kind="macvlan", up=True, lower=2),
        addresses={5: ["198.51.100.4"]},
    )
    assert net.uses("eth3") == [
        "interface eth3.100 is up with addresses 198.51.100.4 (vlan on eth3)"
    ]


def test_a_veth_peer_is_no_upper() -> None:
    """A veth's IFLA_LINK names its peer: the peer's use is not the interface's."""
    net = view(
        Link(2, "kv0", kind="veth", up=True, lower=3),
        Link(3, "kv1", kind="veth", up=True, lower=2),
        addresses={2: ["192.0.2.9"]},
    )
    assert net.uses("kv1") == []


# --- disks: by device number, through stacks, in the host tools and the guest hook ----


NVME_FN = "0000:05:00.0"  # the fake host's NVMe drive (vfio_host fixture), on nvme


def nvme_disk(fs: FakeSysfs, numbers: dict[str, str]) -> None:
    """nvme0n1 with two partitions below the fake host's NVMe function, and the dm/md
    devices of `numbers` in devices/virtual/block; each gets its ``dev`` number."""
    disk = fs.add_child_block(NVME_FN, "nvme0n1", ("nvme0n1p1", "nvme0n1p2"), child="nvme/nvme0")
    for name, number in numbers.items():
        if name.startswith("nvme0n1"):
            path = disk if name == "nvme0n1" else disk / name
        else:
            path = fs.root / "devices/virtual/block" / name
            path.mkdir(parents=True)
            os.symlink(f"../../devices/virtual/block/{name}", fs.root / "class/block" / name)
        (path / "dev").write_text(number + "\n")


def hold(fs: FakeSysfs, lower: str, upper: str) -> None:
    """`upper` (dm/md) stacked on `lower`: class/block/<lower>/holders/<upper>."""
    holders = fs.root / "class/block" / lower / "holders"
    holders.mkdir(exist_ok=True)
    os.symlink(os.path.relpath(fs.root / "devices/virtual/block" / upper, holders), holders / upper)


def proc_tables(tmp_path: Path, mountinfo: list[tuple[str, str, str]], swaps: str = "") -> Path:
    """A /proc with mountinfo (major:minor, mount point, source), mounts (the same without
    numbers, as a real /proc has both) and swaps."""
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self/mountinfo").write_text(
        "".join(
            f"{20 + i} 1 {number} / {where} rw,relatime shared:1 - ext4 {source} rw\n"
            for i, (number, where, source) in enumerate(mountinfo)
        )
    )
    (proc / "self/mounts").write_text(
        "".join(f"{source} {where} ext4 rw 0 0\n" for _, where, source in mountinfo)
    )
    (proc / "swaps").write_text("Filename\t\tType\t\tSize\tUsed\tPriority\n" + swaps)
    return proc


@pytest.mark.parametrize(
    ("source", "where"),
    [
        ("/dev/root", "/"),  # root= on the kernel's command line
        ("/dev/disk/by-uuid/2f1c0c1e-9c6a", "/srv"),  # a link udev may have renamed since
    ],
)
def test_a_partition_mounted_by_another_name_is_found_by_its_number(
    vfio_host: FakeSysfs, tmp_path: Path, source: str, where: str
) -> None:
    """Main matched the source's name only: it took the disk the host's root is on."""
    nvme_disk(vfio_host, {"nvme0n1": "259:0", "nvme0n1p1": "259:1", "nvme0n1p2": "259:2"})
    proc = proc_tables(tmp_path, [("0:21", "/run", "tmpfs"), ("259:2", where, source)])
    assert uses(vfio_host.root, proc, PciAddress.parse(NVME_FN)) == [
        f"block device /dev/nvme0n1p2 is mounted on {where}"
    ]


def test_swap_on_a_device_mapper_node_is_found_by_its_number(
    vfio_host: FakeSysfs, tmp_path: Path
) -> None:
    """Without udev, dmsetup makes /dev/mapper/<name> a node of its own, not a link to
    dm-N: the swap table's path says nothing of dm-1 but its st_rdev does."""
    from kata_vfio.blockuse import BlockUsers

    nvme_disk(vfio_host, {"nvme0n1p1": "259:1", "dm-1": "254:1"})
    hold(vfio_host, "nvme0n1p1", "dm-1")
    root = tmp_path / "root"
    (root / "dev/mapper").mkdir(parents=True)
    os.mknod(root / "dev/mapper/swap", 0o600 | 0o060000, os.makedev(254, 1))
    proc = proc_tables(tmp_path, [], swaps="/dev/mapper/swap  partition  1048572  0  -2\n")
    users = BlockUsers(vfio_host.root, proc, root)
    assert users.user("nvme0n1p1") == "under dm-1, which is active swap"
    assert users.user("nvme0n1p2") is None


def test_md_over_dm_over_a_partition_mounted_makes_the_drive_in_use(
    vfio_host: FakeSysfs, tmp_path: Path
) -> None:
    nvme_disk(vfio_host, {"nvme0n1p1": "259:1", "dm-0": "254:0", "md127": "9:127"})
    hold(vfio_host, "nvme0n1p1", "dm-0")
    hold(vfio_host, "dm-0", "md127")
    proc = proc_tables(tmp_path, [("9:127", "/raid", "/dev/md/data")])
    assert uses(vfio_host.root, proc, PciAddress.parse(NVME_FN)) == [
        "block device /dev/nvme0n1p1 is under md127, which is mounted on /raid"
    ]


def test_the_guest_hook_finds_a_volume_mounted_through_its_mapper_node(
    vfio_host: FakeSysfs, tmp_path: Path
) -> None:
    """In the guest no udev runs either: a dm volume on the drive mounted as
    /dev/mapper/data. Main's hook matched "data" against dm-0 and gave the drive away."""
    from kata_vfio.pci import read_device
    from kata_vfio_hook.vmdeps import VmDependencies

    nvme_disk(vfio_host, {"nvme0n1": "259:0", "dm-0": "254:0"})
    hold(vfio_host, "nvme0n1", "dm-0")
    proc = proc_tables(tmp_path, [("254:0", "/data", "/dev/mapper/data")])
    deps = VmDependencies(vfio_host.root, proc, ipv4=lambda _: None)
    assert (
        deps.reason(read_device(vfio_host.root, PciAddress.parse(NVME_FN)))
        == "block device nvme0n1 is under dm-0, which is mounted on /data"
    )


# --- NICs in the guest hook: /sys and /proc, no netlink library ----------------------


def guest_nic(fs: FakeSysfs, tmp_path: Path, flags: str = "0x1003") -> Path:
    """eth7 (up, no address) on a fake guest's e1000e, and a virtual bridge/VLAN dir."""
    fs.add_device("0000:00:07.0", group=7, driver="e1000e", net=("eth7",))
    net = fs.dev_dir("0000:00:07.0") / "net/eth7"
    (net / "flags").write_text(flags + "\n")
    virtual = fs.root / "devices/virtual/net"
    for name in ("br0", "eth7.5"):
        (virtual / name).mkdir(parents=True)
        (virtual / name / "flags").write_text("0x1003\n")
        os.symlink(f"../../devices/virtual/net/{name}", fs.root / "class/net" / name)
    (tmp_path / "proc/net").mkdir(parents=True)
    (tmp_path / "proc/net/if_inet6").write_text(
        "fe800000000000005054fffe00000001 07 40 20 80 eth7\n"
    )  # its link-local only
    return net


def hook_reason(fs: FakeSysfs, tmp_path: Path, ipv4: dict[str, str] | None = None) -> str | None:
    from kata_vfio.pci import read_device
    from kata_vfio_hook.vmdeps import VmDependencies

    deps = VmDependencies(fs.root, tmp_path / "proc", ipv4=(ipv4 or {}).get)
    return deps.reason(read_device(fs.root, PciAddress.parse("0000:00:07.0")))


def test_the_guest_hook_leaves_an_interface_with_only_link_local(
    fakesys: FakeSysfs, tmp_path: Path
) -> None:
    guest_nic(fakesys, tmp_path)
    assert hook_reason(fakesys, tmp_path) is None


def test_the_guest_hook_refuses_a_bridge_port(fakesys: FakeSysfs, tmp_path: Path) -> None:
    net = guest_nic(fakesys, tmp_path, flags="0x1002")  # the port itself may be down
    os.symlink("../../../../virtual/net/br0", net / "master")
    assert hook_reason(fakesys, tmp_path) == "interface eth7 is a member of br0"


def test_the_guest_hook_refuses_an_interface_with_routes(
    fakesys: FakeSysfs, tmp_path: Path
) -> None:
    guest_nic(fakesys, tmp_path)
    (tmp_path / "proc/net/route").write_text(
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth7\t0000090A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n"
    )
    assert hook_reason(fakesys, tmp_path) == "interface eth7 carries routes"


def test_the_guest_hook_refuses_an_interface_whose_vlan_has_an_address(
    fakesys: FakeSysfs, tmp_path: Path
) -> None:
    net = guest_nic(fakesys, tmp_path)
    os.symlink("../../../../virtual/net/eth7.5", net / "upper_eth7.5")
    assert (
        hook_reason(fakesys, tmp_path, {"eth7.5": "10.5.0.2"})
        == "interface eth7.5 is up with address 10.5.0.2 (on eth7)"
    )
