#!/bin/sh
# timeout: 1800
# Scenario (c): incremental restore, then protected restore, each checked
# like the full restore (device shows the split image at once, secondary
# unchanged while restoring, partial- and full-track writes made during the
# restore survive). The incremental one ends established with
# secondary == primary; the protected one ends split with the secondary
# untouched, and its change tracking then names exactly the tracks that
# differ from the secondary (an incremental restore brings the split image
# back).
. "${VMLIB:?run me through tests/vm/run.sh}"

step "format --assume-clean; run with restore.rate_limit 2MiB"
run splitmirror format -c "$CONFIG" --assume-clean
set_restore_rate 2MiB
start_server
expect_state established
SIZE=$(dev_size "$DEVICE"); MIB=$((SIZE / 1048576)); N=$((SIZE / TRACK))

step "write known data A"
gen_file "$SCRATCH/A" "$MIB" 1
write_at "$DEVICE" 0 "$SCRATCH/A"
SHA_A=$(sha_file "$SCRATCH/A")
[ "$(sha_dev "$DEVICE")" = "$SHA_A" ] || fail "device does not read back A"

step "split; overwrite the first 32 MiB and one track in every MiB from 64 MiB on"
run sm split
expect_state split
fill_dev "$DEVICE" 0 32 2
fill_dev "$DEVICE" 64 $((MIB - 64)) 3 896k
CHANGED=$(( (32 * 1048576 / TRACK) + (MIB - 64) ))
c=$(json_get changed_since_split)
[ "$c" = "$CHANGED" ] || fail "changed_since_split is $c, expected $CHANGED"
[ "$(sha_dev "$DEVICE")" != "$SHA_A" ] || fail "overwrite did not change the device"
info "$c tracks changed since split (~$((c * TRACK / 1048576)) MiB: ~$((c * TRACK / 2097152))s to restore at 2 MiB/s)"

# the last two changed tracks: 1 MiB apart, near the end (still pending)
LAST=$(( (MIB - 1) * 1048576 / TRACK ))
restore_and_check "$SCRATCH/A" $((LAST - 8)) "$LAST" --incremental

step "wait: established, secondary == primary"
wait_idle 300
expect_state established
[ "$(sha_dev "$DEVICE")" = "$EXPECT_SHA" ] || fail "device changed after the incremental restore finished"
S=$(sha_dev "$SECONDARY")
[ "$S" = "$EXPECT_SHA" ] || { _find_bad "$SECONDARY" "$EXPECT"; fail "secondary ($S) != expected image after incremental restore"; }
cp "$EXPECT" "$SCRATCH/C"; SHA_C=$EXPECT_SHA
info "incremental restore ok; image C = $SHA_C"

step "restart with restore.rate_limit 8MiB (full protected restore of ${MIB} MiB: ~32 s)"
stop_server
[ "$(sha_dev "$PRIMARY")" = "$SHA_C" ] || fail "primary after stop != C"
set_restore_rate 8MiB
start_server
expect_state established
[ "$(sha_dev "$DEVICE")" = "$SHA_C" ] || fail "device after restart != C"

step "split; overwrite everything"
run sm split
expect_state split
fill_dev "$DEVICE" 0 "$MIB" 4
[ "$(json_get changed_since_split)" = "$N" ] || fail "changed_since_split != $N after full overwrite"

restore_and_check "$SCRATCH/C" $((N - 3)) $((N - 2)) --protect

step "wait: protected restore ends in split, secondary untouched"
wait_idle 300
j=$(status_json); info "status: $j"
[ "$(json_get state "$j")" = split ] || fail "protected restore did not end in split: $j"
[ "$(json_get operation "$j")" = null ] || fail "operation not null after wait: $j"
S=$(sha_dev "$SECONDARY")
[ "$S" = "$SHA_C" ] || fail "protected restore changed the secondary ($S, expected $SHA_C)"
D=$(sha_dev "$DEVICE")
[ "$D" = "$EXPECT_SHA" ] || { _find_bad "$DEVICE" "$EXPECT"; fail "device ($D) != split image + writes ($EXPECT_SHA)"; }
c=$(json_get changed_since_split "$j")
# only the two tracks written during the restore differ from the secondary
[ "$c" = 2 ] || fail "changed_since_split after protected restore is $c, expected 2 (the tracks written during it)"
info "ended split; secondary untouched; 2 tracks differ"

step "incremental restore brings the split image back"
run sm restore --incremental
D=$(sha_dev "$DEVICE")
[ "$D" = "$SHA_C" ] || { _find_bad "$DEVICE" "$SCRATCH/C"; fail "device after incremental restore != split image"; }
wait_idle 300
expect_state established
stop_server
P=$(sha_dev "$PRIMARY"); S=$(sha_dev "$SECONDARY")
{ [ "$P" = "$SHA_C" ] && [ "$S" = "$SHA_C" ]; } || fail "after final restore: primary $P secondary $S, expected $SHA_C"
cmp_devs "$PRIMARY" "$SECONDARY"
info "primary == secondary == split image"
echo "restore-incremental-protect ok"
