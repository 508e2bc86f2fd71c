#!/bin/sh
# PID 1 inside the kernel-test VM (see xtask's vm-test). The root is the host's / over virtiofs,
# read-only; /run is a tmpfs; the scratch folder is a writable 9p share. Runs $KLAB_CMD, streams
# its output to the virtio console, leaves its exit code in the scratch folder, powers off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm 2>/dev/null
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /var/tmp
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
mkdir -p /run/netns /run/tmp
export TMPDIR=/run/tmp HOME=/run/tmp
hostname meshd-vm
ip link set lo up
modprobe 9pnet_virtio && modprobe 9p
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 scratch "$KLAB_SCRATCH" || echo "vm: scratch mount failed"
OUT=/dev/hvc0; [ -c $OUT ] || OUT=/dev/console
exec 3<>$OUT
stty -onlcr <&3 2>/dev/console
cd "${KLAB_CWD:-$KLAB_SCRATCH}" 2>/dev/null || cd "$KLAB_SCRATCH"
# The command's output goes to a file that the console follows until the command exits: a
# process the command leaves behind cannot hold the VM open (as it could hold a pipe).
: > /run/output.log
{ /bin/sh "$KLAB_CMD" > /run/output.log 2>&1; echo $? > /run/vm_rc; } &
main=$!
tail -n +1 -f --pid=$main /run/output.log >&3 2>/dev/null
wait $main
rc=$(cat /run/vm_rc 2>/dev/null || echo 99)
left=$(ps -eo pid=,args= | awk '$2 !~ /^\[/ && $1 != 1 && $1 != '"$$"' {print}' | grep -v -e "ps -eo" -e awk -e "tail -n" -e guest-init.sh)
[ -n "$left" ] && printf 'vm: processes left running after the command:\n%s\n' "$left" | tee -a /run/output.log >&3
cp /run/output.log "$KLAB_SCRATCH/output.log"
echo "$rc" > "$KLAB_SCRATCH/exit_code"
sync
umount "$KLAB_SCRATCH" 2>/dev/null
busybox poweroff -f
