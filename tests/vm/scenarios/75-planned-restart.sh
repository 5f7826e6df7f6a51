#!/bin/sh
# timeout: 300
# (measured: 122-130 s with boot on the loaded 2-core host, 2026-11-30)
# A planned restart keeps /dev/ublkbN: ext4 mounted on the device and a
# writer W running (each file synced, then its name appended to an
# "acknowledged" list on tmpfs); the volume is split (a split time to keep).
# SIGUSR1 makes the server commit and exit 75 leaving the device; a new
# server takes it over ("recovered"). Three times: with the same binary,
# with a copy of it elsewhere (an upgrade), and by SIGTERM with the unit's
# SPLITMIRROR_KEEP_DEVICE_IN_USE=1 while mounted (systemctl restart); the
# final SIGTERM after the unmount removes the device. The mount stays, W
# finishes, every acknowledged file is intact, e2fsck is clean after the
# unmount. Also checked on the real server: the events program, `set`,
# SIGHUP, `list`, /dev/splitmirror/NAME and the split time across restarts.
. "${VMLIB:?run me through tests/vm/run.sh}"

MNT=/mnt
ACKED=/dev/shm/acked
EVENTS=/dev/shm/events
W_FILES=80

# put, good, writer, acked, show_log: tests/vm/lib.sh

# planned_restart LABEL [SIGNAL]: SIGUSR1 (or SIGNAL), exit 75, device and
# mount stay, a new server (whatever `splitmirror` is first in PATH)
# recovers the device.
planned_restart() {
    OLD_DEVICE=$DEVICE
    kill -"${2:-USR1}" "$SERVER_PID" || fail "cannot signal $SERVER_PID"
    wait "$SERVER_PID"; rc=$?
    SERVER_PID=
    show_log "$1: old server"
    [ $rc -eq 75 ] || fail "$1: server exited $rc after SIGUSR1, expected 75"
    [ -b "$OLD_DEVICE" ] || fail "$1: $OLD_DEVICE is gone after a planned restart"
    grep -q " $MNT ext4 " /proc/mounts || fail "$1: $MNT is no longer mounted"
    SERVER_ERR=$SCRATCH/server-$1.err; : >"$SERVER_ERR"
    start_server
    show_log "$1: new server"
    grep -q "recovered $DEVICE" "$SERVER_ERR" || fail "$1: the new server did not log 'recovered $DEVICE'"
    [ "$DEVICE" = "$OLD_DEVICE" ] || fail "$1: recovered $DEVICE, the old device was $OLD_DEVICE"
    [ "$(readlink /dev/splitmirror/vm0)" = "$DEVICE" ] || fail "$1: /dev/splitmirror/vm0 does not point at $DEVICE"
}

step "config: events program; format --assume-clean; run"
cat >/tmp/hook.sh <<'HOOK'
#!/bin/sh
echo "$SPLITMIRROR_EVENT $SPLITMIRROR_VOLUME $SPLITMIRROR_STATE $SPLITMIRROR_PREVIOUS_STATE" >>/dev/shm/events
HOOK
chmod 755 /tmp/hook.sh
printf 'events:\n  program: /tmp/hook.sh\n' >>"$CONFIG"
run splitmirror format -c "$CONFIG" --assume-clean
SERVER_ERR=$SCRATCH/server1.err; : >"$SERVER_ERR"
start_server
expect_state established
[ "$(readlink /dev/splitmirror/vm0)" = "$DEVICE" ] || fail "/dev/splitmirror/vm0 does not point at $DEVICE"
run splitmirror list
splitmirror list --json | grep -q "\"device\": \"$DEVICE\"" || fail "list --json does not show $DEVICE"

step "mkfs.ext4 on /dev/splitmirror/vm0, mount, split"
run mkfs.ext4 -q -F /dev/splitmirror/vm0
run mount -t ext4 /dev/splitmirror/vm0 "$MNT"
run sm split
expect_state split
SPLIT_TIME=$(json_get split_time "$(status_json)")
case $SPLIT_TIME in ''|null) fail "no split_time after split: $(status_json)" ;; esac
i=0
until grep -q "^state-change vm0 split established" "$EVENTS" 2>/dev/null; do
    i=$((i + 1)); [ $i -le 100 ] || fail "the events program did not see the split: $(cat "$EVENTS" 2>/dev/null)"
    sleep 0.1
done

step "set restore.rate_limit live"
out=$(sm set restore.rate_limit=8MiB) || fail "set failed: $out"
[ "$out" = "set restore.rate_limit=8MiB" ] || fail "set printed: $out"
expect_rc 2 sm set ublk.depth=4

step "SIGHUP: the config file read again"
cp "$CONFIG" "$SCRATCH/config.orig"
printf 'restore:\n  rate_limit: 16MiB\nublk:\n  depth: 64\n' >>"$CONFIG"
kill -HUP "$SERVER_PID" || fail "cannot signal $SERVER_PID"
i=0
until grep -q "SIGHUP: applied" "$SERVER_ERR"; do
    i=$((i + 1)); [ $i -le 100 ] || { show_log "SIGHUP"; fail "no 'SIGHUP: applied' in the log"; }
    sleep 0.1
done
grep -q "not applied (they need a restart): ublk" "$SERVER_ERR" \
    || { show_log "SIGHUP"; fail "SIGHUP did not name ublk as needing a restart"; }
_alive "$SERVER_PID" || fail "the server died on SIGHUP"
# the device's shape must stay as it was for the recovery below
cp "$SCRATCH/config.orig" "$CONFIG"

step "writer W ($W_FILES files) on the mounted device"
rm -f "$ACKED"
writer w "$W_FILES" &
WPID=$!
i=0
while [ "$(acked)" -lt 8 ]; do
    i=$((i + 1)); [ $i -le 1200 ] || fail "writer acknowledged only $(acked) files in 120s"
    _alive "$WPID" || fail "writer ended early with $(acked) files"
    sleep 0.1
done

step "planned restart with the same binary (writer running)"
planned_restart same
info "$(acked) files acknowledged so far"

step "planned restart with another binary (an upgrade); it runs as the unit does"
mkdir -p /tmp/upgrade
cp "$(command -v splitmirror)" /tmp/upgrade/splitmirror
# the unit's environment: SIGTERM keeps a device in use (systemctl restart)
export SPLITMIRROR_KEEP_DEVICE_IN_USE=1
PATH=/tmp/upgrade:$PATH planned_restart upgrade
[ "$(readlink "/proc/$SERVER_PID/exe")" = /tmp/upgrade/splitmirror ] \
    || fail "the new server runs $(readlink "/proc/$SERVER_PID/exe"), not the upgrade"
[ "$(json_get split_time "$(status_json)")" = "$SPLIT_TIME" ] \
    || fail "split_time changed across restarts: $(status_json), was $SPLIT_TIME"

step "SIGTERM with the device mounted, as systemctl restart sends it"
planned_restart sigterm TERM
# (the server that took the SIGTERM logged to the upgrade step's file)
grep -q "is in use (mounted?) and SPLITMIRROR_KEEP_DEVICE_IN_USE is set" "$SCRATCH/server-upgrade.err" \
    || fail "the server did not say why SIGTERM kept the device"

step "the writer finishes"
i=0
while _alive "$WPID"; do
    i=$((i + 1)); [ $i -le 1800 ] || fail "writer still running 180s after the restarts ($(acked) acknowledged)"
    sleep 0.1
done
wait "$WPID"; rc=$?
[ $rc -eq 0 ] || fail "writer failed (rc=$rc) across the restarts"
[ "$(acked)" = "$W_FILES" ] || fail "writer acknowledged $(acked) of $W_FILES files"
n=0
while read -r f; do
    good "$f" || fail "acknowledged file $f missing or wrong"
    n=$((n + 1))
done <"$ACKED"
info "$n acknowledged files intact on the live mount"

step "establish; umount; e2fsck -fn; stop (not in use: the device goes); primary == secondary"
run sm establish --wait --timeout 300
expect_state established
run umount "$MNT"
e2fsck -fn "$DEVICE" || fail "e2fsck -fn found problems (rc=$?)"
info "events: $(tr '\n' ';' <"$EVENTS")"
grep -q "^operation-end vm0 established" "$EVENTS" || fail "no operation-end event for the establish"
stop_server
[ ! -e /dev/splitmirror/vm0 ] || fail "/dev/splitmirror/vm0 is still there after a clean stop"
cmp_devs "$PRIMARY" "$SECONDARY"
echo "planned-restart ok"
