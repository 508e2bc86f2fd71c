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
{ /bin/sh "$KLAB_CMD"; echo $? > /run/vm_rc; } 2>&1 | tee "$KLAB_SCRATCH/output.log" >&3
rc=$(cat /run/vm_rc)
echo "$rc" > "$KLAB_SCRATCH/exit_code"
sync
umount "$KLAB_SCRATCH" 2>/dev/null
busybox poweroff -f
