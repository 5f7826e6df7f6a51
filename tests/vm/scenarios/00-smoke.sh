#!/bin/sh
# timeout: 120
# Smoke: the VM has a ublk driver, the binary runs, `format` works and keeps
# to the contract (refuses to overwrite valid metadata without --force,
# exit 2 for a config error). Needs no server.
. "${VMLIB:?run me through tests/vm/run.sh}"

step "ublk driver present"
[ -c /dev/ublk-control ] || fail "/dev/ublk-control missing (ublk_drv not loaded?)"
info "/dev/ublk-control ok; kernel $(uname -r)"

step "splitmirror --help"
splitmirror --help >"$SCRATCH/help.txt" 2>&1 || { cat "$SCRATCH/help.txt"; fail "splitmirror --help exited $?"; }
head -n 20 "$SCRATCH/help.txt"

step "format"
cat "$CONFIG"
run splitmirror format -c "$CONFIG"

step "format again without --force must refuse"
splitmirror format -c "$CONFIG"; rc=$?
[ $rc -ne 0 ] || fail "format overwrote valid metadata without --force"
# the contract names no code for this refusal: a usage (2) or state (3)
# error, never 1 (that would claim an I/O failure)
case $rc in 2|3) ;; *) fail "format refused with rc=$rc, expected 2 or 3" ;; esac
info "refused with rc=$rc"

step "format --force --assume-clean"
run splitmirror format -c "$CONFIG" --force --assume-clean

step "unknown config key is a config error (exit 2)"
cp "$CONFIG" "$SCRATCH/bad.yaml"
echo "no_such_key: 1" >>"$SCRATCH/bad.yaml"
splitmirror format -c "$SCRATCH/bad.yaml" --force; rc=$?
[ $rc -eq 2 ] || fail "format with an unknown key exited $rc, expected 2"

step "bad value (track_size 3KiB: not a power of two) is a config error (exit 2)"
sed 's/^name:.*/name: vm0\ntrack_size: 3KiB/' "$CONFIG" >"$SCRATCH/bad2.yaml"
grep -q '^track_size: 3KiB' "$SCRATCH/bad2.yaml" || fail "could not write bad2.yaml"
expect_rc 2 splitmirror format -c "$SCRATCH/bad2.yaml" --force

step "secondary smaller than the primary: devices mismatched (exit 2)"
half=$(($(blockdev --getsz "$SECONDARY") / 2))
echo "0 $half linear $SPARE 0" | dmsetup create small || fail "dmsetup create small"
dmsetup mknodes small
sed "s|^secondary:.*|secondary: /dev/mapper/small|" "$CONFIG" >"$SCRATCH/small.yaml"
expect_rc 2 splitmirror format -c "$SCRATCH/small.yaml" --force
run dmsetup remove small

echo "smoke ok"
