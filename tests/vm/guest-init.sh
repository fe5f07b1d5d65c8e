#!/kvfio/bin/busybox sh
# Test-only PID 1 of the guest (rdinit=/kvfio/init): sets up a minimal system,
# loads the native drivers of the emulated devices, then runs the scenarios the
# host harness put under /kvfio/scenarios and reports on the serial console.
# Lines starting with "KVFIO " are what the host parses.
export PATH=/kvfio/bin:/usr/sbin:/usr/bin:/sbin:/bin
bb=/kvfio/bin/busybox
$bb mkdir -p /proc /sys /dev /run /tmp
$bb mount -t proc proc /proc
$bb mount -t sysfs sysfs /sys
$bb mount -t devtmpfs devtmpfs /dev
$bb mount -t tmpfs tmpfs /run
$bb mount -t tmpfs tmpfs /tmp
# cgroup v1 hierarchies, as older Kata guests use; the hook allows its nodes in "devices"
$bb mount -t tmpfs cgroup /sys/fs/cgroup
for c in devices memory pids cpu,cpuacct freezer blkio; do
    $bb mkdir -p /sys/fs/cgroup/$c
    $bb mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c
done
while read -r ko; do $bb insmod "$ko" 2>/dev/null; done < /kvfio/native-modules
# kvfio.console=kmsg (the nested test's L2, KVM nested in TCG): our lines go through the
# kernel's log, whose console write polls the UART, not through the tty, whose output waits
# for transmit interrupts and stops for good when one is lost (seen there: a line cut off
# and nothing more). "<2>": a level the console shows under loglevel=4.
say() { echo "$*"; }
if $bb grep -qw kvfio.console=kmsg /proc/cmdline; then
    say() { echo "<2>$*" > /dev/kmsg; }
fi
say "KVFIO {\"event\": \"booted\", \"uptime\": \"$($bb cut -d' ' -f1 /proc/uptime)\"}"
for s in /kvfio/scenarios/*; do
    [ -x "$s/run" ] && "$s/run" "$s"
done
say "KVFIO {\"event\": \"end\"}"
$bb sync
$bb poweroff -f
