#!/bin/sh
# timeout: 900
# Device identity: the metadata records who the primary and the secondary
# are (status shows it). A config with the two swapped is refused by `run`
# (exit 2, one line naming the device, the identity expected and the one
# found) before any ublk device exists and without writing a byte; so is a
# secondary replaced by another disk. `replace-secondary --yes` records the
# spare disk; the volume is then degraded with every track to copy, and
# `establish` copies every track onto it (verify clean, devices equal).
. "${VMLIB:?run me through tests/vm/run.sh}"

no_ublk_device() {
    for d in /dev/ublkb* /dev/ublkc*; do
        [ -e "$d" ] && fail "$d exists after a refused run: a ublk device was left behind"
    done
    return 0
}

# refused_run NEEDLE...: `run` exits 2 with one stderr line holding every
# NEEDLE, leaves no ublk device, and changes neither data device nor the
# metadata.
refused_run() {
    _p=$(sha_dev "$PRIMARY"); _s=$(sha_dev "$SECONDARY"); _m=$(sha_dev "$METADATA")
    splitmirror run -c "$CONFIG" >"$SCRATCH/refused.out" 2>"$SCRATCH/refused.err"; _rc=$?
    cat "$SCRATCH/refused.err"
    [ "$_rc" = 2 ] || fail "run exited $_rc, expected 2"
    [ "$(grep -c . "$SCRATCH/refused.err")" = 1 ] || fail "run printed more than one line on stderr"
    [ ! -s "$SCRATCH/refused.out" ] || fail "run printed on stdout: $(cat "$SCRATCH/refused.out")"
    for _n in "$@"; do
        grep -qF -- "$_n" "$SCRATCH/refused.err" || fail "run's error lacks '$_n'"
    done
    no_ublk_device
    [ "$(sha_dev "$PRIMARY")" = "$_p" ] || fail "the refused run changed $PRIMARY"
    [ "$(sha_dev "$SECONDARY")" = "$_s" ] || fail "the refused run changed $SECONDARY"
    [ "$(sha_dev "$METADATA")" = "$_m" ] || fail "the refused run changed the metadata"
}

step "format --assume-clean; run; status shows both identities"
run splitmirror format -c "$CONFIG" --assume-clean
start_server
j=$(status_json); info "status: $j"
expect_keys "$j" primary primary_id secondary secondary_id
PID=$(json_get primary_id "$j"); SID=$(json_get secondary_id "$j")
if [ -z "$PID" ] || [ -z "$SID" ]; then fail "empty identity: $j"; fi
[ "$PID" != "$SID" ] || fail "primary and secondary have one identity ($PID): $j"
sm status >"$SCRATCH/status.txt" || fail "plain status failed"
cat "$SCRATCH/status.txt"
grep -qF "Primary Id : $PID" "$SCRATCH/status.txt" || fail "plain status lacks 'Primary Id : $PID'"
grep -qF "Secondary Id : $SID" "$SCRATCH/status.txt" || fail "plain status lacks 'Secondary Id : $SID'"

step "write 32 MiB through $DEVICE; stop"
run dd if=/dev/urandom of="$DEVICE" bs=1M count=32 oflag=direct 2>/dev/null
expect_state established
stop_server
cmp_devs "$PRIMARY" "$SECONDARY"
cp "$CONFIG" "$SCRATCH/good.yaml"

step "primary and secondary swapped in the config: refused"
set_config primary "$SECONDARY"
set_config secondary "$PRIMARY"
refused_run "primary $SECONDARY" "expected $PID, found $SID" "swapped"
cp "$SCRATCH/good.yaml" "$CONFIG"

step "the secondary replaced by the spare $SPARE: refused"
set_config secondary "$SPARE"
refused_run "secondary $SPARE" "expected $SID" "replace-secondary"
expect_rc 2 splitmirror replace-secondary -c "$CONFIG"
no_ublk_device

step "replace-secondary --yes"
run splitmirror replace-secondary -c "$CONFIG" --yes

step "run: degraded, every track to copy; the spare's identity is shown"
set_restore_rate 16MiB
start_server
N=$(($(dev_size "$DEVICE") / TRACK))
j=$(status_json); info "status: $j"
[ "$(json_get state "$j")" = degraded ] || fail "state after replace-secondary: $j"
[ "$(json_get changed_since_split "$j")" = "$N" ] || fail "want all $N tracks changed: $j"
NID=$(json_get secondary_id "$j")
case $NID in ''|"$SID"|"$PID") fail "secondary_id after replace is '$NID': $j" ;; esac
[ "$(json_get secondary "$j")" = "$SPARE" ] || fail "secondary is not $SPARE: $j"

step "establish (not --full) copies every track onto the new disk"
run sm establish
j=$(status_json); info "status: $j"
[ "$(json_get total "$j")" = "$N" ] || fail "establish copies $(json_get total "$j") tracks, want all $N: $j"
wait_idle 600
expect_state established
run sm verify
stop_server
cmp_devs "$PRIMARY" "$SPARE"

step "restart on the new pair: accepted"
start_server
expect_state established
stop_server
echo "identity ok"
