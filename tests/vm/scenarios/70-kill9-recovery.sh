#!/bin/sh
# timeout: 260
# (measured: 127 s with boot on the loaded 2-core host, 2026-11-25)
# Kill -9 of the server mid-restore with a filesystem writer running. ext4
# on the device; files A before the split, B after it (rolled back by the
# restore), then a full rate-limited `restore`, the split image mounted and
# a writer W (each file synced, then its name appended to an "acknowledged"
# list on tmpfs). The server is killed with SIGKILL while the restore copies
# and W writes; a new server recovers the device (user recovery:
# /dev/ublkbN stays, W's blocked I/O goes on and W finishes). The restore
# then completes, e2fsck is clean, A and every acknowledged W file is there
# with its content, B is not. Without user recovery in the driver the new
# server recreates the device (fallback): the old mount is dropped and the
# checks run on a remount; the scenario prints which path it took.
. "${VMLIB:?run me through tests/vm/run.sh}"

MNT=/mnt
ACKED=/dev/shm/acked      # tmpfs: outside the device
W_FILES=60

# put, good, writer, acked, show_log: tests/vm/lib.sh

step "format --assume-clean; restore at 4 MiB/s; run"
run splitmirror format -c "$CONFIG" --assume-clean
set_restore_rate 4MiB
SERVER_ERR=$SCRATCH/server1.err; : >"$SERVER_ERR"
start_server
expect_state established

step "mkfs.ext4, files A"
run mkfs.ext4 -q -F "$DEVICE"
run mount -t ext4 "$DEVICE" "$MNT"
for f in a1 a2 a3 a4 a5; do put $f || fail "writing $f"; done
run umount "$MNT"

step "split, files B (to be rolled back)"
run sm split
expect_state split
run mount -t ext4 "$DEVICE" "$MNT"
for f in b1 b2 b3 b4 b5; do put $f || fail "writing $f"; done
run umount "$MNT"

step "full restore (rate-limited); mount the split image"
run sm restore
expect_state restoring
run mount -t ext4 "$DEVICE" "$MNT"
for f in a1 a2 a3 a4 a5; do good $f || fail "$f missing or wrong on the split image"; done
for f in b1 b2 b3 b4 b5; do [ ! -e "$MNT/$f" ] || fail "$f (written after the split) survived the restore"; done

step "writer W ($W_FILES files) on the restoring volume"
rm -f "$ACKED"
writer w "$W_FILES" &
WPID=$!
i=0
while [ "$(acked)" -lt 8 ]; do
    i=$((i + 1)); [ $i -le 1200 ] || fail "writer acknowledged only $(acked) files in 120s"
    _alive "$WPID" || fail "writer ended early with $(acked) files"
    sleep 0.1
done
j=$(status_json); info "status before the kill: $j"
[ "$(json_get state "$j")" = restoring ] || fail "restore no longer running before the kill: $j"

step "kill -9 the server (restore and writer running)"
OLD_DEVICE=$DEVICE
info "recorded device id: $(cat /run/splitmirror/vm0.ublk-id 2>/dev/null || echo none)"
kill -KILL "$SERVER_PID" || fail "cannot kill $SERVER_PID"
wait "$SERVER_PID"; rc=$?
SERVER_PID=
[ $rc -eq 137 ] || fail "killed server exited $rc, expected 137"
AT_KILL=$(acked)
info "killed; $AT_KILL files acknowledged; writer alive: $(_alive "$WPID" && echo yes || echo no)"
show_log "killed server"
if [ -e "/sys/class/ublk-char/ublkc${OLD_DEVICE#/dev/ublkb}" ]; then
    info "$OLD_DEVICE's char device is still there"
fi
sleep 1

step "start the server again"
SERVER_ERR=$SCRATCH/server2.err; : >"$SERVER_ERR"
start_server
show_log "new server"
if grep -q "recovered $DEVICE" "$SERVER_ERR"; then
    PATH_TAKEN=recovered
    [ "$DEVICE" = "$OLD_DEVICE" ] || fail "recovered $DEVICE, but the old device was $OLD_DEVICE"
elif grep -q "recreated $DEVICE" "$SERVER_ERR"; then
    PATH_TAKEN=recreated
else
    fail "the new server logged neither 'recovered $DEVICE' nor 'recreated $DEVICE'"
fi
echo "path taken: $PATH_TAKEN"

if [ "$PATH_TAKEN" = recovered ]; then
    step "the writer finishes on the recovered device"
    i=0
    while _alive "$WPID"; do
        i=$((i + 1)); [ $i -le 1800 ] || fail "writer still blocked 180s after recovery ($(acked) acknowledged)"
        sleep 0.1
    done
    wait "$WPID"; rc=$?
    [ $rc -eq 0 ] || fail "writer failed (rc=$rc) after recovery"
    [ "$(acked)" = "$W_FILES" ] || fail "writer acknowledged $(acked) of $W_FILES files"
    info "writer done: $(acked) files ($AT_KILL before the kill)"
else
    step "fallback: drop the old mount, remount the new device"
    kill "$WPID" 2>/dev/null
    wait "$WPID"
    umount "$MNT" 2>/dev/null || umount -l "$MNT" || fail "cannot drop the old mount"
    # replays the journal, so that e2fsck -n below sees a consistent fs
    run mount -t ext4 "$DEVICE" "$MNT"
    info "remounted; $(acked) files acknowledged before the kill"
fi

step "the restore completes"
wait_idle 300
j=$(status_json); info "status: $j"
[ "$(json_get state "$j")" = established ] || fail "not established after wait: $j"

step "umount, e2fsck -fn, remount, check files"
run umount "$MNT"
e2fsck -fn "$DEVICE" || fail "e2fsck -fn found problems (rc=$?)"
run mount -t ext4 -o ro "$DEVICE" "$MNT"
for f in a1 a2 a3 a4 a5; do good $f || fail "$f missing or wrong"; done
for f in b1 b2 b3 b4 b5; do [ ! -e "$MNT/$f" ] || fail "$f (rolled back) is back"; done
n=0
while read -r f; do
    good "$f" || fail "acknowledged file $f missing or wrong"
    n=$((n + 1))
done <"$ACKED"
info "$n acknowledged files intact"
run umount "$MNT"

step "stop; primary == secondary"
stop_server
show_log "new server"
[ ! -e /run/splitmirror/vm0.ublk-id ] || fail "the device id file is still there after a clean stop"
cmp_devs "$PRIMARY" "$SECONDARY"
echo "kill9-recovery ok ($PATH_TAKEN)"
