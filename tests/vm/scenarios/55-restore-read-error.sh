#!/bin/sh
# timeout: 900
# Faults during a restore: one track of the (split, read-only) secondary
# cannot be read. The secondary is a dm map over the second virtio disk
# with the `error` target over one track. With `on_error: pause` (the
# default) the copy stops at that track: `status` shows it paused with the
# track in `errors`, `wait` exits 1 saying so instead of waiting for ever,
# a host read of that track fails with EIO while reads of the others (the
# split image) succeed. The map is then repaired, the server's retry (every
# 30 s) resumes the restore, and it ends established with primary ==
# secondary == the split image.
. "${VMLIB:?run me through tests/vm/run.sh}"

step "secondary = dm linear 'sec' over $SECONDARY"
dm_linear sec "$SECONDARY"
SECTORS=$(blockdev --getsz "$SECONDARY")
set_config secondary /dev/mapper/sec
run splitmirror format -c "$CONFIG" --assume-clean
set_restore_rate 16MiB
start_server
expect_state established
SIZE=$(dev_size "$DEVICE"); MIB=$((SIZE / 1048576)); N=$((SIZE / TRACK))

step "A everywhere (mirrored), split, B everywhere"
gen_file "$SCRATCH/A" "$MIB" 1
write_at "$DEVICE" 0 "$SCRATCH/A"
run sm split
fill_dev "$DEVICE" 0 "$MIB" 2
SHA_A=$(sha_file "$SCRATCH/A")

# The bad track: 3/4 into the volume, so the copy reaches it after a few
# seconds at 16 MiB/s.
BAD=$((N * 3 / 4))
SPT=$((TRACK / 512))   # sectors per track
B0=$((BAD * SPT))
step "secondary track $BAD (sectors $B0..$((B0 + SPT))) starts failing every read"
dm_swap sec "$(printf '0 %s linear %s 0\n%s %s error\n%s %s linear %s %s' \
    "$B0" "$SECONDARY" "$B0" "$SPT" $((B0 + SPT)) $((SECTORS - B0 - SPT)) "$SECONDARY" $((B0 + SPT)))"

step "full restore; wait gives up with the error once the copy stays paused"
run sm restore
expect_state restoring
# 5 s of grace instead of one retry (35 s): the retry is tested below
SPLITMIRROR_WAIT_PAUSED_GRACE=5 timeout 300 splitmirror wait -c "$CONFIG" --timeout 240 \
    >"$SCRATCH/wait.out" 2>"$SCRATCH/wait.err"
rc=$?
cat "$SCRATCH/wait.err"
[ $rc = 1 ] || fail "wait exited $rc on a paused restore, expected 1"
grep -q "paused" "$SCRATCH/wait.err" || fail "wait's error does not say the copy is paused"
j=$(status_json); info "status: $j"
[ "$(json_get state "$j")" = restoring ] || fail "not restoring while paused: $j"
[ "$(json_get paused "$j")" = true ] || fail "operation.paused is not true: $j"
printf '%s\n' "$j" | grep -q "track $BAD" || fail "errors do not name track $BAD: $j"
done_tracks=$(json_get "done" "$j")
expect_num_gt "$done_tracks" $((BAD - 2)) "tracks restored before the bad one"

step "host reads: the bad track fails with EIO, the others show the split image"
if dd if="$DEVICE" of=/dev/null bs="$TRACK" skip="$BAD" count=1 iflag=direct 2>"$SCRATCH/dd.err"; then
    fail "reading the unreadable pending track $BAD succeeded"
fi
cat "$SCRATCH/dd.err"
for t in 0 $((BAD - 1)) $((BAD + 1)) $((N - 1)); do
    [ "$(sha_region "$DEVICE" $((t * TRACK)) "$TRACK")" = "$(sha_file_region "$SCRATCH/A" $((t * TRACK)) "$TRACK")" ] \
        || fail "track $t does not show the split image while the copy is paused"
done

step "repair the secondary; wait (default grace) sees the retry resume the restore to the end"
dm_swap sec "0 $SECTORS linear $SECONDARY 0"
wait_idle 300
j=$(status_json); info "status: $j"
[ "$(json_get state "$j")" = established ] || fail "not established after the repair: $j"
[ "$(sha_dev "$DEVICE")" = "$SHA_A" ] || fail "device is not the split image after the restore"

step "stop; primary == secondary == split image"
stop_server
run dmsetup remove sec
[ "$(sha_dev "$PRIMARY")" = "$SHA_A" ] || fail "primary is not the split image"
cmp_devs "$PRIMARY" "$SECONDARY"
echo "restore-read-error ok"
