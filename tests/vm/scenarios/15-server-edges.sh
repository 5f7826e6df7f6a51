#!/bin/sh
# timeout: 400
# Server edges: a second server on the same devices is refused (exit 1, "in
# use"); split + incremental establish copies only what changed; verify finds
# a track corrupted behind the server's back and `establish --full` repairs
# it; SIGINT stops the server with exit 0 and removes the device and socket.
. "${VMLIB:?run me through tests/vm/run.sh}"

step "format --assume-clean and run"
run splitmirror format -c "$CONFIG" --assume-clean
start_server
expect_state established

step "a second server on the same devices is refused"
splitmirror run -c "$CONFIG" >"$SCRATCH/second.out" 2>"$SCRATCH/second.err"; rc=$?
cat "$SCRATCH/second.err"
[ $rc -eq 1 ] || fail "second server exited $rc, expected 1"
grep -q "in use" "$SCRATCH/second.err" || fail "second server's error does not say the device is in use"
[ ! -s "$SCRATCH/second.out" ] || fail "second server printed on stdout: $(cat "$SCRATCH/second.out")"
expect_state established

step "write data, verify clean"
fill_dev "$DEVICE" 0 32 3
sm verify || fail "verify on a fresh mirror failed (rc=$?)"

step "split, change 3 tracks, incremental establish"
run sm split
dd if=/dev/urandom of="$SCRATCH/p4k" bs=4096 count=1 2>/dev/null
write_at "$DEVICE" $((5 * TRACK)) "$SCRATCH/p4k"
write_at "$DEVICE" $((9 * TRACK + 4096)) "$SCRATCH/p4k"
write_at "$DEVICE" $((200 * TRACK)) "$SCRATCH/p4k"
c=$(json_get changed_since_split)
[ "$c" = 3 ] || fail "changed_since_split is $c, expected 3"
run sm establish --wait
j=$(status_json); info "status: $j"
[ "$(json_get state "$j")" = established ] || fail "not established after establish --wait: $j"
sm verify || fail "verify after incremental establish failed (rc=$?)"

step "corrupt one secondary track behind the server's back; verify finds it"
dd if=/dev/urandom of="$SCRATCH/junk" bs=4096 count=1 2>/dev/null
dd if="$SCRATCH/junk" of="$SECONDARY" bs=4096 seek=$((77 * TRACK / 4096)) oflag=direct conv=notrunc,fsync 2>/dev/null \
    || fail "cannot write the secondary directly"
sm verify >"$SCRATCH/verify.out" 2>&1; rc=$?
cat "$SCRATCH/verify.out"
[ $rc -ne 0 ] || fail "verify did not report the corrupted track"
grep -q 77 "$SCRATCH/verify.out" || fail "verify did not name track 77"

step "split + establish --full repairs it"
run sm split
run sm establish --full --wait
expect_state established
sm verify || fail "verify after establish --full failed (rc=$?)"

step "SIGINT: exit 0, device and socket gone"
SOCK=$(sed -n 's/^ *socket: *//p' "$CONFIG"); SOCK=${SOCK:-/run/splitmirror/vm0.sock}
kill -INT "$SERVER_PID"
i=0
while _alive "$SERVER_PID"; do
    i=$((i + 1)); [ $i -le 600 ] || fail "server did not exit within 60s of SIGINT"
    sleep 0.1
done
wait "$SERVER_PID"; rc=$?; SERVER_PID=
[ $rc -eq 0 ] || fail "server exited $rc after SIGINT"
sleep 0.5
[ ! -e "$DEVICE" ] || fail "$DEVICE still exists"
[ ! -e "$SOCK" ] || fail "socket $SOCK still exists"
same_devs "$PRIMARY" "$SECONDARY"
echo "server-edges ok"
