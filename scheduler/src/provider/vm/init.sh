#!/bin/busybox sh
# Hatchery guest init (PID 1), written into the initramfs by hatchery-scheduler's
# vm::initramfs. It composes a root from the host's own filesystem (read-only over
# virtio-9p, with a tmpfs overlay on top so that writes work and vanish at power-off),
# mounts a pure cgroup v2 hierarchy, makes that the root and hands over to stage2.sh,
# which runs the job, reports its exit status between markers and powers off.
# PID 1 must never exit (that panics the kernel), so every path ends in halt.
export PATH=/bin
. /hatchery/config

marker() { echo "@@@hatchery:$NONCE:$*@@@"; }
now() { read -r up _ < /proc/uptime; echo "$up"; }
halt() {
    sync
    poweroff -f
    while :; do sleep 1; done
}
die() {
    marker "error=$*"
    halt
}

[ -e /bin/mount ] || /bin/busybox --install -s /bin
mount -t proc proc /proc || die "mount /proc"
mount -t sysfs sysfs /sys || die "mount /sys"
mount -t devtmpfs devtmpfs /dev || die "mount /dev"
mount -t tmpfs -o mode=1777 tmpfs /tmp || die "mount /tmp"
marker "init uptime=$(now)"

while read -r ko; do
    [ -n "$ko" ] || continue
    insmod "/hatchery/modules/$ko" || die "insmod $ko"
done < /hatchery/modules.list

ip link set lo up || die "bring up lo"
if [ "$NETWORK" = 1 ]; then
    # qemu's user-mode network: the host's loopback is 10.0.2.2.
    ip link set eth0 up || die "bring up eth0"
    ip addr add 10.0.2.15/24 dev eth0 || die "address eth0"
    ip route add default via 10.0.2.2 || die "route via 10.0.2.2"
fi

p9=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o "$p9,cache=loose,ro" "$ROOT_TAG" /mnt/lower || die "mount 9p $ROOT_TAG"
mount -t tmpfs -o mode=0755 tmpfs /mnt/rw || die "mount the overlay's tmpfs"
mkdir -p /mnt/rw/upper /mnt/rw/work
R=/newroot
if mount -t overlay -o lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work overlay $R; then
    root=overlay
else
    mount -o bind,ro /mnt/lower $R || die "bind the host root"
    root=readonly
fi

mount -t proc proc $R/proc || die "mount $R/proc"
mount -t sysfs sysfs $R/sys || die "mount $R/sys"
# As systemd mounts it on a pure v2 host.
mount -t cgroup2 -o nsdelegate,memory_recursiveprot cgroup2 $R/sys/fs/cgroup \
    || mount -t cgroup2 cgroup2 $R/sys/fs/cgroup || die "mount cgroup2"
mount -t devtmpfs devtmpfs $R/dev || die "mount $R/dev"
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts || die "mount $R/dev/pts"
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm || die "mount $R/dev/shm"
# /tmp and /var/tmp stay the host's (read-only lower layer, writes to the RAM upper
# layer): a checkout under /tmp, as CI may use, must be reachable as the guest's cwd.
mount -t tmpfs -o mode=0755 tmpfs $R/run || die "mount $R/run"
mkdir -p $R/run/hatchery
cp /bin/busybox /hatchery/config /hatchery/job.sh /hatchery/stage2.sh $R/run/hatchery/ \
    || die "copy the job into $R/run/hatchery"

while read -r tag mode path; do
    [ -n "$tag" ] || continue
    mkdir -p "$R$path" 2>/dev/null
    mount -t 9p -o "$p9,$mode" "$tag" "$R$path" || die "mount 9p $tag at $path"
done < /hatchery/mounts.list

marker "ready root=$root uptime=$(now)"
# Make the composed root the mount namespace's root, as switch_root does, rather than
# only chroot into it: inside a chroot, unshare(CLONE_NEWUSER) fails with EPERM and the
# sandbox under test needs user namespaces.
cd $R || die "enter $R"
mount --move . / || die "move $R to /"
exec chroot . /run/hatchery/busybox sh /run/hatchery/stage2.sh
