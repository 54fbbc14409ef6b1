# Second stage of the Hatchery guest init (see init.sh): PID 1, now in the composed root,
# where only /run/hatchery holds the initramfs's busybox, config and job.
# PID 1 must never exit (that panics the kernel), so it ends in poweroff.
B=/run/hatchery/busybox
. /run/hatchery/config

marker() { echo "@@@hatchery:$NONCE:$*@@@"; }

echo "$CONSOLE_LOGLEVEL" > /proc/sys/kernel/printk
marker begin
$B env -i $B sh /run/hatchery/job.sh < /dev/null
rc=$?
echo
marker "exit=$rc"
$B sync
$B poweroff -f
while :; do $B sleep 1; done
