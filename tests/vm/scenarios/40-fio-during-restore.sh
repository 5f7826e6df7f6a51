#!/bin/sh
# timeout: 1200
# Scenario (d): fio with verify=crc32c running through the device while a
# full restore runs (and on into the resync): 0 verify errors. fio starts
# after `restore` returns: from that instant the device is the split image,
# and fio only checks what it wrote itself. Outside fio's region the device
# must keep showing the split image, checked while fio runs.
. "${VMLIB:?run me through tests/vm/run.sh}"

step "format --assume-clean; run with restore.rate_limit 16MiB"
run splitmirror format -c "$CONFIG" --assume-clean
set_restore_rate 16MiB
start_server
expect_state established
expect_zero_copy_by_kernel
SIZE=$(dev_size "$DEVICE"); MIB=$((SIZE / 1048576))

step "write A, split, overwrite everything"
gen_file "$SCRATCH/A" "$MIB" 1
write_at "$DEVICE" 0 "$SCRATCH/A"
run sm split
expect_state split
fill_dev "$DEVICE" 0 "$MIB" 2

# fio region: [64 MiB, 160 MiB); the rest is checked against A
FOFF=64; FLEN=96
ENGINE=io_uring
fio --enghelp 2>/dev/null | grep -qw io_uring || ENGINE=libaio
FIO_ARGS="--name=during-restore --filename=$DEVICE --offset=${FOFF}M --size=${FLEN}M
 --rw=randwrite --bsrange=4k-64k --iodepth=16 --ioengine=$ENGINE --direct=1
 --verify=crc32c --verify_fatal=1 --verify_backlog=256 --randseed=42 --group_reporting"

step "restore (full), then at once fio randwrite+verify on ${FOFF}..$((FOFF + FLEN)) MiB"
run sm restore
s=$(state)
[ "$s" = restoring ] || fail "state after restore is '$s', expected restoring"
# shellcheck disable=SC2086  # FIO_ARGS is a word list on purpose
fio $FIO_ARGS >"$SCRATCH/fio.txt" 2>&1 &
FIO=$!

step "while fio runs: the rest of the device shows the split image"
a1=$(sha_region "$DEVICE" 0 $((FOFF * 1048576)))
b1=$(sha_file_region "$SCRATCH/A" 0 $((FOFF * 1048576)))
s1=$(state)
a2=$(sha_region "$DEVICE" $(((FOFF + FLEN) * 1048576)) $(((MIB - FOFF - FLEN) * 1048576)))
b2=$(sha_file_region "$SCRATCH/A" $(((FOFF + FLEN) * 1048576)) $(((MIB - FOFF - FLEN) * 1048576)))
s2=$(state)
info "states during the checks: $s1, $s2"
[ "$a1" = "$b1" ] || fail "0..${FOFF} MiB does not show the split image during the restore"
[ "$a2" = "$b2" ] || fail "$((FOFF + FLEN))..${MIB} MiB does not show the split image during the restore"

wait $FIO; rc=$?
s=$(state)
cat "$SCRATCH/fio.txt"
info "fio finished with rc=$rc, state $s"
[ $rc -eq 0 ] || fail "fio exited $rc (verify errors?)"
grep -q 'err= 0' "$SCRATCH/fio.txt" || fail "fio reported errors"
grep -qi 'verify.*fail\|bad magic\|crc32c: verify failed' "$SCRATCH/fio.txt" && fail "fio reported verify failures"
case $s in restoring|resyncing) info "fio ran entirely while the copy was running" ;;
    *) info "note: the copy finished before fio did (state $s)" ;; esac

step "wait: established; fio's data still verifies; secondary == primary"
wait_idle 300
expect_state established
# shellcheck disable=SC2086
fio $FIO_ARGS --verify_only >"$SCRATCH/fio-verify.txt" 2>&1 || { cat "$SCRATCH/fio-verify.txt"; fail "fio --verify_only after the restore failed"; }
grep -q 'err= 0' "$SCRATCH/fio-verify.txt" || { cat "$SCRATCH/fio-verify.txt"; fail "fio --verify_only reported errors"; }
info "fio --verify_only: ok"
[ "$(sha_region "$DEVICE" 0 $((FOFF * 1048576)))" = "$b1" ] || fail "head region changed after restore"
[ "$(sha_region "$DEVICE" $(((FOFF + FLEN) * 1048576)) $(((MIB - FOFF - FLEN) * 1048576)))" = "$b2" ] || fail "tail region changed after restore"
D=$(sha_dev "$DEVICE")
stop_server
P=$(sha_dev "$PRIMARY")
[ "$P" = "$D" ] || fail "primary ($P) != device content before stop ($D)"
cmp_devs "$PRIMARY" "$SECONDARY"
info "primary == secondary == $P"
echo "fio-during-restore ok"
