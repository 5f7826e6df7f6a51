#!/bin/sh
# timeout: 120
# Plumbing: proves the VM itself against the real kernel, with no
# splitmirror feature involved, so a failure here means the tier is broken,
# not the product. ublk_drv is loaded and /dev/ublk-control exists; dm-mod
# and dm-flakey work (the fault scenarios need them); fio verifies data on a
# virtio disk with O_DIRECT; ext4 can be made, mounted and checked.
. "${VMLIB:?run me through tests/vm/run.sh}"

step "kernel and modules"
info "kernel $(uname -r), $(nproc) CPUs, $(sed -n 's/^MemTotal: *//p' /proc/meminfo) RAM"
[ -c /dev/ublk-control ] || fail "/dev/ublk-control missing (ublk_drv not loaded?)"
[ -d /sys/module/ublk_drv ] || fail "ublk_drv not in /sys/module"
for m in virtio_blk ext4 dm_mod dm_flakey; do
    [ -d "/sys/module/$m" ] || fail "module $m not loaded"
done
info "/dev/ublk-control ok; ublk_drv virtio_blk ext4 dm_mod dm_flakey loaded"

step "virtio disks"
for d in "$PRIMARY" "$SECONDARY" "$METADATA" "$SPARE"; do
    [ -b "$d" ] || fail "$d is not a block device"
    info "$d $(dev_size "$d") bytes"
done
[ "$(dev_size "$PRIMARY")" = "$(dev_size "$SECONDARY")" ] || fail "primary and secondary differ in size"

step "dmsetup targets lists flakey and error"
dmsetup targets >"$SCRATCH/targets" 2>&1 || { cat "$SCRATCH/targets"; fail "dmsetup targets failed"; }
cat "$SCRATCH/targets"
grep -q '^flakey' "$SCRATCH/targets" || fail "dm-flakey target not available"
grep -q '^error' "$SCRATCH/targets" || fail "dm error target not available"

step "dm linear over $SPARE, then swapped to flakey (always down): reads fail, swapped back: data intact"
SECTORS=$(blockdev --getsz "$SPARE")
echo "0 $SECTORS linear $SPARE 0" | dmsetup create kt || fail "dmsetup create kt"
dmsetup mknodes kt
[ -b /dev/mapper/kt ] || fail "/dev/mapper/kt missing after mknodes"
gen_file "$SCRATCH/k1" 1 7
write_at /dev/mapper/kt 1048576 "$SCRATCH/k1"
[ "$(sha_region "$SPARE" 1048576 1048576)" = "$(sha_file "$SCRATCH/k1")" ] || fail "write through dm linear did not reach $SPARE"
# the same live swap the fault scenario makes under the secondary
run dmsetup suspend kt
echo "0 $SECTORS flakey $SPARE 0 0 1" | dmsetup reload kt || fail "dmsetup reload kt (flakey)"
run dmsetup resume kt
if dd if=/dev/mapper/kt of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null; then
    fail "read through dm-flakey (always down) succeeded"
fi
info "flakey (up 0 s, down 1 s = always down): read fails as it should"
run dmsetup suspend kt
echo "0 $SECTORS linear $SPARE 0" | dmsetup reload kt || fail "dmsetup reload kt (linear)"
run dmsetup resume kt
[ "$(sha_region /dev/mapper/kt 1048576 1048576)" = "$(sha_file "$SCRATCH/k1")" ] || fail "data differs after swapping back"
run dmsetup remove kt

step "fio randrw verify=crc32c (io_uring if available) on $PRIMARY"
ENGINE=io_uring
fio --enghelp 2>/dev/null | grep -qw io_uring || ENGINE=libaio
info "engine $ENGINE"
fio --name=kernel --filename="$PRIMARY" --size=32M --rw=randrw --bsrange=4k-64k \
    --iodepth=16 --ioengine=$ENGINE --direct=1 --verify=crc32c --verify_fatal=1 \
    --randseed=1 --group_reporting >"$SCRATCH/fio.txt" 2>&1
rc=$?
grep -E 'IOPS|err=' "$SCRATCH/fio.txt"
[ $rc -eq 0 ] || { cat "$SCRATCH/fio.txt"; fail "fio exited $rc"; }
grep -q 'err= 0' "$SCRATCH/fio.txt" || { cat "$SCRATCH/fio.txt"; fail "fio reported errors"; }

step "mkfs.ext4, mount, write, umount, e2fsck on $SECONDARY"
run mkfs.ext4 -F -q "$SECONDARY"
mkdir -p /mnt/k
run mount -t ext4 "$SECONDARY" /mnt/k
gen_file /mnt/k/f 4 3
S1=$(sha_file /mnt/k/f)
run umount /mnt/k
run mount -t ext4 -o ro "$SECONDARY" /mnt/k
[ "$(sha_file /mnt/k/f)" = "$S1" ] || fail "file differs after remount"
run umount /mnt/k
e2fsck -fn "$SECONDARY" >/dev/null || fail "e2fsck found problems"

step "splitmirror binary runs"
splitmirror --help >"$SCRATCH/help" 2>&1 || { cat "$SCRATCH/help"; fail "splitmirror --help exited $?"; }
echo "kernel ok"
