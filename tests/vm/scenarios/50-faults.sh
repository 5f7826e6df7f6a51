#!/bin/sh
# timeout: 600
# Faults: the secondary fails while mirroring. The secondary is a dm map
# over the second virtio disk; with fio writing (and verifying) through the
# device, the map is swapped live to the `error` target. Expected: state
# `degraded`, the host I/O goes on with no error (fio verifies its data),
# changes are tracked as in split, `split`/`restore` are refused (exit 3).
# Then the map is swapped back and `establish` resyncs: established, and
# after stopping the server the primary and the secondary disk are equal.
. "${VMLIB:?run me through tests/vm/run.sh}"

step "secondary = dm linear 'sec' over $SECONDARY"
dm_linear sec "$SECONDARY"
SECTORS=$(blockdev --getsz "$SECONDARY")
set_config secondary /dev/mapper/sec
cat "$CONFIG"

step "format --assume-clean; run"
run splitmirror format -c "$CONFIG" --assume-clean
start_server
expect_state established
[ "$(dev_size "$DEVICE")" = "$(dev_size "$PRIMARY")" ] || fail "device size != primary size"

step "write A (32 MiB at 128 MiB), mirrored to the secondary"
gen_file "$SCRATCH/A" 32 1
write_at "$DEVICE" $((128 * 1048576)) "$SCRATCH/A"
[ "$(sha_region "$SECONDARY" $((128 * 1048576)) $((32 * 1048576)))" = "$(sha_file "$SCRATCH/A")" ] \
    || fail "A did not reach the secondary while established"

ENGINE=io_uring
fio --enghelp 2>/dev/null | grep -qw io_uring || ENGINE=libaio
# rate-limited so the fault surely lands while fio writes (~12 s of I/O)
FIO_ARGS="--name=fault --filename=$DEVICE --offset=0 --size=96M --rw=randwrite
 --bsrange=4k-64k --iodepth=8 --ioengine=$ENGINE --direct=1
 --verify=crc32c --verify_fatal=1 --verify_backlog=64 --randseed=5 --group_reporting"

step "fio randwrite+verify on 0..96 MiB; after 2 s the secondary starts failing every I/O"
# shellcheck disable=SC2086  # FIO_ARGS is a word list on purpose
fio $FIO_ARGS --rate=8m >"$SCRATCH/fio.txt" 2>&1 &
FIO=$!
sleep 2
_alive "$FIO" || { cat "$SCRATCH/fio.txt"; fail "fio ended before the fault was injected (too fast? raise --size)"; }
dm_swap sec "0 $SECTORS error"
wait_state degraded 60
j=$(status_json); info "status: $j"
! json_empty_array errors "$j" || fail "status shows no error while degraded: $j"

step "host I/O goes on: fio finishes without errors"
wait $FIO; rc=$?
grep -E 'IOPS|err=' "$SCRATCH/fio.txt"
[ $rc -eq 0 ] || { cat "$SCRATCH/fio.txt"; fail "fio exited $rc after the secondary failed"; }
grep -q 'err= 0' "$SCRATCH/fio.txt" || { cat "$SCRATCH/fio.txt"; fail "fio reported I/O errors"; }
expect_state degraded

step "writes while degraded are tracked; A still reads back"
gen_file "$SCRATCH/B" 8 2
write_at "$DEVICE" $((200 * 1048576)) "$SCRATCH/B"
[ "$(sha_region "$DEVICE" $((200 * 1048576)) $((8 * 1048576)))" = "$(sha_file "$SCRATCH/B")" ] || fail "B does not read back while degraded"
[ "$(sha_region "$DEVICE" $((128 * 1048576)) $((32 * 1048576)))" = "$(sha_file "$SCRATCH/A")" ] || fail "A changed while degraded"
c=$(json_get changed_since_split)
# B alone is 64 tracks; fio's writes after the fault add more
expect_num_gt "$c" 63 "changed_since_split while degraded"
info "$c tracks changed since the secondary failed"

step "split and restore are not valid while degraded (exit 3)"
expect_rc 3 sm split
expect_rc 3 sm restore

step "the secondary comes back; establish resyncs"
dm_swap sec "0 $SECTORS linear $SECONDARY 0"
run sm establish
wait_idle 300
j=$(status_json); info "status: $j"
[ "$(json_get state "$j")" = established ] || fail "not established after establish + wait: $j"
[ "$(json_get changed_since_split "$j")" = 0 ] || fail "changed_since_split not 0 after the resync: $j"
[ "$(json_get secondary_stale "$j")" = 0 ] || fail "secondary_stale not 0 after the resync: $j"

step "fio's data still verifies after the resync"
# shellcheck disable=SC2086
fio $FIO_ARGS --verify_only >"$SCRATCH/fio-v.txt" 2>&1 || { cat "$SCRATCH/fio-v.txt"; fail "fio --verify_only failed"; }
D=$(sha_dev "$DEVICE")

step "stop; primary == secondary disk"
stop_server
run dmsetup remove sec
[ "$(sha_dev "$PRIMARY")" = "$D" ] || fail "primary != device content before stop"
cmp_devs "$PRIMARY" "$SECONDARY"
echo "faults ok"
