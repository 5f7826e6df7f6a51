#!/bin/sh
# timeout: 600
# Scenario (a), established: initial sync, fio randrw verify=crc32c through
# the device, ext4 on top (mkfs, files, umount, e2fsck clean), then
# primary == secondary byte for byte, and the volume comes back after a
# restart with the same content.
. "${VMLIB:?run me through tests/vm/run.sh}"

step "format (state syncing: every track to copy) and run"
run splitmirror format -c "$CONFIG"
start_server
j=$(status_json); info "status: $j"
expect_keys "$j" name device state track_size tracks changed_since_split restore_pending secondary_stale operation errors
s=$(json_get state "$j")
# the initial copy may already be over on an idle 256 MiB volume
case $s in syncing|established) ;; *) fail "state after format+run is '$s', expected syncing (or established once copied)" ;; esac
json_empty_array errors "$j" || fail "errors not empty on a fresh volume: $j"
[ "$(json_get name "$j")" = vm0 ] || fail "status name is not vm0: $j"
[ "$(json_get device "$j")" = "$DEVICE" ] || fail "status device is not $DEVICE: $j"
[ "$(json_get track_size "$j")" = "$TRACK" ] || fail "status track_size is not $TRACK: $j"
SIZE=$(dev_size "$DEVICE")
[ "$SIZE" = "$(dev_size "$PRIMARY")" ] || fail "device size $SIZE != primary size $(dev_size "$PRIMARY")"
[ "$(json_get tracks "$j")" = $((SIZE / TRACK)) ] || fail "status tracks is not $((SIZE / TRACK)): $j"

step "wait for the initial sync"
wait_idle 300
j=$(status_json); info "status: $j"
[ "$(json_get state "$j")" = established ] || fail "not established after wait: $j"
[ "$(json_get operation "$j")" = null ] || fail "operation not null after wait: $j"
[ "$(json_get secondary_stale "$j")" = 0 ] || fail "secondary_stale not 0 once established: $j"

step "fio randrw verify=crc32c through $DEVICE"
ENGINE=io_uring
fio --enghelp 2>/dev/null | grep -qw io_uring || ENGINE=libaio
fio --name=randrw --filename="$DEVICE" --size=64M --rw=randrw --rwmixread=50 \
    --bsrange=4k-64k --iodepth=16 --ioengine=$ENGINE --direct=1 \
    --verify=crc32c --verify_fatal=1 --randseed=10 --group_reporting \
    >"$SCRATCH/fio.txt" 2>&1
rc=$?
cat "$SCRATCH/fio.txt"
[ $rc -eq 0 ] || fail "fio exited $rc"
grep -q 'err= 0' "$SCRATCH/fio.txt" || fail "fio reported errors"
expect_state established

step "mkfs.ext4, mount, write files"
run mkfs.ext4 -F -q -E lazy_itable_init=0,lazy_journal_init=0 "$DEVICE"
mkdir -p /mnt/vol
run mount -t ext4 "$DEVICE" /mnt/vol
gen_file /mnt/vol/big 48 11
mkdir -p /mnt/vol/libs /mnt/vol/small
run cp -a /lib/x86_64-linux-gnu/. /mnt/vol/libs/
i=0
while [ $i -lt 300 ]; do
    echo "file $i" >"/mnt/vol/small/f$i"
    i=$((i + 1))
done
rm -f /mnt/vol/small/f1*            # some deletes too
(cd /mnt/vol && find . -type f | sort | xargs sha256sum) >"$SCRATCH/sums" || fail "sha256sum of files"
info "$(wc -l <"$SCRATCH/sums") files written, $(du -sm /mnt/vol | cut -f1) MiB"
run umount /mnt/vol

step "remount and check the files"
run mount -t ext4 -o ro "$DEVICE" /mnt/vol
(cd /mnt/vol && sha256sum -c -s "$SCRATCH/sums") || fail "file contents differ after remount"
run umount /mnt/vol

step "e2fsck -fn"
e2fsck -fn "$DEVICE" || fail "e2fsck found problems (rc=$?)"

step "stop the server; primary == secondary"
expect_state established
stop_server
cmp_devs "$PRIMARY" "$SECONDARY"
P=$(sha_dev "$PRIMARY")

step "restart: established, same content, files intact"
start_server
expect_state established
D=$(sha_dev "$DEVICE")
[ "$D" = "$P" ] || fail "device after restart ($D) != primary ($P)"
run mount -t ext4 -o ro "$DEVICE" /mnt/vol
(cd /mnt/vol && sha256sum -c -s "$SCRATCH/sums") || fail "file contents differ after restart"
run umount /mnt/vol
stop_server
echo "established ok"
