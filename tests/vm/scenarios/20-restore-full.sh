#!/bin/sh
# timeout: 1200
# Scenario (b): split, overwrite everything, full restore under
# restore.rate_limit. The device shows the split image as soon as `restore`
# returns; the secondary is unchanged while restoring; a partial-track and a
# full-track write made during the restore survive; after `wait` the volume
# is established and secondary == primary.
. "${VMLIB:?run me through tests/vm/run.sh}"

step "format --assume-clean (fresh zeroed disks are identical); rate-limit copies; run"
run splitmirror format -c "$CONFIG" --assume-clean
# 8 MiB/s: a full restore of 256 MiB takes ~32 s, long enough to check the
# secondary while it runs. The server reads the config at `run`.
set_restore_rate 8MiB
cat "$CONFIG"
start_server
expect_state established
expect_zero_copy_by_kernel
SIZE=$(dev_size "$DEVICE"); MIB=$((SIZE / 1048576)); N=$((SIZE / TRACK))
[ "$(json_get tracks)" = "$N" ] || fail "status tracks != $N"

step "write known data A (${MIB} MiB) through the device"
gen_file "$SCRATCH/A" "$MIB" 1
write_at "$DEVICE" 0 "$SCRATCH/A"
SHA_A=$(sha_file "$SCRATCH/A")
[ "$(sha_dev "$DEVICE")" = "$SHA_A" ] || fail "device does not read back A"
info "A sha256 $SHA_A"

step "split"
run sm split
expect_state split
[ "$(json_get changed_since_split)" = 0 ] || fail "changed_since_split not 0 right after split"

step "overwrite everything through the device"
fill_dev "$DEVICE" 0 "$MIB" 2
SHA_B=$(sha_dev "$DEVICE")
[ "$SHA_B" != "$SHA_A" ] || fail "overwrite did not change the device"
c=$(json_get changed_since_split)
[ "$c" = "$N" ] || fail "changed_since_split is $c after overwriting all $N tracks"
[ "$(sha_dev "$SECONDARY")" = "$SHA_A" ] || fail "secondary changed while split"
info "device now B ($SHA_B), secondary still A, $c tracks changed"

restore_and_check "$SCRATCH/A" $((N - 3)) $((N - 2))

step "wait: resync, then established"
wait_idle 300
j=$(status_json); info "status: $j"
[ "$(json_get state "$j")" = established ] || fail "not established after wait: $j"
[ "$(json_get operation "$j")" = null ] || fail "operation not null after wait: $j"
[ "$(sha_dev "$DEVICE")" = "$EXPECT_SHA" ] || fail "device content changed after the restore finished"

step "stop; primary == secondary == split image + writes"
stop_server
P=$(sha_dev "$PRIMARY"); S=$(sha_dev "$SECONDARY")
[ "$P" = "$EXPECT_SHA" ] || { _find_bad "$PRIMARY" "$EXPECT"; fail "primary ($P) is not the expected image ($EXPECT_SHA)"; }
[ "$S" = "$EXPECT_SHA" ] || { _find_bad "$SECONDARY" "$EXPECT"; fail "secondary ($S) is not the expected image ($EXPECT_SHA)"; }
cmp_devs "$PRIMARY" "$SECONDARY"
info "primary == secondary == $P"
echo "restore-full ok"
