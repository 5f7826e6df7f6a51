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
info "refused with rc=$rc"

step "format --force --assume-clean"
run splitmirror format -c "$CONFIG" --force --assume-clean

step "unknown config key is a config error (exit 2)"
cp "$CONFIG" "$SCRATCH/bad.yaml"
echo "no_such_key: 1" >>"$SCRATCH/bad.yaml"
splitmirror format -c "$SCRATCH/bad.yaml" --force; rc=$?
[ $rc -eq 2 ] || fail "format with an unknown key exited $rc, expected 2"

echo "smoke ok"
