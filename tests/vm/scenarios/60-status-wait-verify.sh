#!/bin/sh
# timeout: 1200
# Client commands against a live server: exit codes of the contract
# (1 server unreachable, 3 not valid in this state), every `status --json`
# field, `wait` (returns at once when idle, gives up with --timeout, blocks
# until a copy is done), incremental and full `establish`, and `verify`:
# clean volume -> 0; tracks changed since split are not compared; a track
# of the secondary corrupted behind the server's back while the tables say
# it is identical -> exit 1 naming that track; a full establish repairs it.
. "${VMLIB:?run me through tests/vm/run.sh}"

step "no server: client commands exit 1 (server unreachable)"
run splitmirror format -c "$CONFIG" --assume-clean
expect_rc 1 sm status
expect_rc 1 sm wait

step "run with restore.rate_limit 32MiB (a full copy of 256 MiB takes ~8 s)"
set_restore_rate 32MiB
start_server
SIZE=$(dev_size "$DEVICE"); N=$((SIZE / TRACK))
j=$(status_json); info "status: $j"
expect_keys "$j" name device state track_size tracks changed_since_split restore_pending secondary_stale operation errors
[ "$(json_get name "$j")" = vm0 ] || fail "name: $j"
[ "$(json_get device "$j")" = "$DEVICE" ] || fail "device: $j"
[ "$(json_get state "$j")" = established ] || fail "state: $j"
[ "$(json_get track_size "$j")" = "$TRACK" ] || fail "track_size: $j"
[ "$(json_get tracks "$j")" = "$N" ] || fail "tracks (want $N): $j"
for k in changed_since_split restore_pending secondary_stale; do
    [ "$(json_get $k "$j")" = 0 ] || fail "$k not 0 on a clean established volume: $j"
done
[ "$(json_get operation "$j")" = null ] || fail "operation not null: $j"
json_empty_array errors "$j" || fail "errors not empty: $j"
sm status >"$SCRATCH/status.txt" || fail "plain status failed"
cat "$SCRATCH/status.txt"
grep -q established "$SCRATCH/status.txt" || fail "plain status does not say established"

step "commands not valid while established exit 3"
expect_rc 3 sm restore
expect_rc 3 sm establish

step "wait returns at once when idle"
run timeout 10 splitmirror wait -c "$CONFIG"

step "write A (64 MiB), verify: clean"
gen_file "$SCRATCH/A" 64 1
write_at "$DEVICE" 0 "$SCRATCH/A"
sm verify >"$SCRATCH/v0" 2>&1; rc=$?
cat "$SCRATCH/v0"
[ $rc -eq 0 ] || fail "verify of a clean volume exited $rc"

step "split; split again exits 3; write tracks 10..19"
run sm split
expect_state split
expect_rc 3 sm split
dd if=/dev/urandom of="$SCRATCH/t10" bs="$TRACK" count=10 2>/dev/null
write_at "$DEVICE" $((10 * TRACK)) "$SCRATCH/t10"
j=$(status_json); info "status: $j"
[ "$(json_get changed_since_split "$j")" = 10 ] || fail "changed_since_split is not 10: $j"
[ "$(json_get secondary_stale "$j")" = 10 ] || info "note: secondary_stale is $(json_get secondary_stale "$j") (10 tracks differ)"

step "verify while split skips the changed tracks: exit 0"
sm verify >"$SCRATCH/v1" 2>&1; rc=$?
cat "$SCRATCH/v1"
[ $rc -eq 0 ] || fail "verify while split exited $rc (it must not compare tracks changed since split)"

step "establish (incremental) copies the 10 tracks"
run sm establish --wait
j=$(status_json); info "status: $j"
[ "$(json_get state "$j")" = established ] || fail "not established after establish --wait: $j"
[ "$(json_get changed_since_split "$j")" = 0 ] || fail "changed_since_split not 0: $j"
[ "$(sha_region "$SECONDARY" $((10 * TRACK)) $((10 * TRACK)))" = "$(sha_file "$SCRATCH/t10")" ] \
    || fail "the 10 tracks did not reach the secondary"

step "split; establish --full; status shows the running copy; wait --timeout 1 gives up"
run sm split
run sm establish --full
j=$(status_json); info "status: $j"
s=$(json_get state "$j")
[ "$s" = syncing ] || fail "state right after establish --full is '$s', expected syncing: $j"
[ "$(json_get kind "$j")" = establish ] || fail "operation.kind is not establish: $j"
[ "$(json_get total "$j")" = "$N" ] || fail "operation.total is not $N for --full: $j"
p=$(json_get percent "$j")
case $p in ''|*[!0-9.]*) fail "operation.percent is not a number: $j" ;; esac
t0=$(cut -d' ' -f1 /proc/uptime)
timeout 20 splitmirror wait -c "$CONFIG" --timeout 1 >"$SCRATCH/w1" 2>&1; rc=$?
t1=$(cut -d' ' -f1 /proc/uptime)
cat "$SCRATCH/w1"
[ $rc -ne 0 ] || fail "wait --timeout 1 during an ~8 s copy exited 0"
[ $rc -ne 124 ] || fail "wait --timeout 1 did not return within 20 s"
info "wait --timeout 1 gave up with rc=$rc after $(echo "$t0 $t1" | awk '{printf "%.1f", $2 - $1}')s"

step "wait blocks until the copy is done (plain lines when not a terminal)"
timeout 300 splitmirror wait -c "$CONFIG" >"$SCRATCH/w2" 2>&1; rc=$?
tail -n 5 "$SCRATCH/w2"
[ $rc -eq 0 ] || fail "wait exited $rc"
if tr -d '\n' <"$SCRATCH/w2" | grep -q "$(printf '\r')"; then fail "wait drew a progress bar (carriage returns) on a non-terminal"; fi
j=$(status_json); info "status: $j"
[ "$(json_get state "$j")" = established ] || fail "not established after wait: $j"
[ "$(json_get operation "$j")" = null ] || fail "operation not null after wait: $j"

step "stop; corrupt 4 KiB of track 1234 on the secondary (tables say identical); restart"
stop_server
cmp_devs "$PRIMARY" "$SECONDARY"
BAD=1234
dd if=/dev/urandom of="$SCRATCH/junk" bs=4096 count=1 2>/dev/null
write_at "$SECONDARY" $((BAD * TRACK + 8192)) "$SCRATCH/junk"
start_server
expect_state established
# the device reads the primary's copy of that track, not the corrupted one
# (whole-device hashes cost ~20 s each under TCG; 10-established covers restarts)
GOOD=$(sha_region "$PRIMARY" $((BAD * TRACK)) "$TRACK")
[ "$(sha_region "$DEVICE" $((BAD * TRACK)) "$TRACK")" = "$GOOD" ] || fail "device track $BAD does not read the primary's data"

step "verify names track $BAD and exits 1"
sm verify >"$SCRATCH/v2" 2>&1; rc=$?
cat "$SCRATCH/v2"
[ $rc -eq 1 ] || fail "verify with a corrupted secondary exited $rc, expected 1"
grep -qw "$BAD" "$SCRATCH/v2" || fail "verify output does not name track $BAD"
[ "$(sha_region "$DEVICE" $((BAD * TRACK)) "$TRACK")" = "$GOOD" ] || fail "verify changed what the device reads at track $BAD"

step "split + establish --full repairs it; verify clean"
run sm split
run sm establish --full --wait
expect_state established
sm verify >"$SCRATCH/v3" 2>&1; rc=$?
cat "$SCRATCH/v3"
[ $rc -eq 0 ] || fail "verify after establish --full exited $rc"
stop_server
cmp_devs "$PRIMARY" "$SECONDARY"
echo "status-wait-verify ok"
