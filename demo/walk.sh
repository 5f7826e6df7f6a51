#!/bin/sh
# timeout: 600
# A walk through splitmirror on a real ublk device over two sparse files:
# bring up a volume, write, split, overwrite, restore, and show `status`
# while the split image is already visible. Needs root, ublk_drv and
# `splitmirror` on PATH (demo/run.sh arranges all that, in a VM if needed).
set -u

say() { printf '\n### %s\n' "$*"; }
die() { echo "DEMO FAILED: $*" >&2; [ -n "${PID:-}" ] && kill -TERM "$PID" 2>/dev/null; exit 1; }
sha() { dd if="$1" bs=1M count="$MIB" iflag=direct 2>/dev/null | sha256sum | cut -c1-16; }

MIB=64
D=$(mktemp -d "${TMPDIR:-/tmp}/splitmirror-demo.XXXXXX") || die "mktemp"
truncate -s 256M "$D/primary.img" "$D/secondary.img" || die "truncate"
cat >"$D/demo.yaml" <<YAML
name: demo
primary: primary.img
secondary: secondary.img
metadata: demo.meta
track_size: 128KiB
restore:
  rate_limit: 16MiB     # slow on purpose, so the restore is seen in progress
control:
  socket: $D/demo.sock
YAML
C="$D/demo.yaml"

say "a volume on two sparse 256 MiB files ($D)"
cat "$C"
splitmirror format -c "$C" --assume-clean || die "format failed"
splitmirror run -c "$C" >"$D/run.out" 2>"$D/run.log" &
PID=$!
i=0
until DEV=$(sed -n 's/^device: //p' "$D/run.out") && [ -n "$DEV" ]; do
    i=$((i + 1)); [ $i -lt 300 ] || { cat "$D/run.log"; die "no device after 30 s"; }
    kill -0 "$PID" 2>/dev/null || { cat "$D/run.log"; die "server exited"; }
    sleep 0.1
done
echo "server pid $PID: $DEV"
splitmirror status -c "$C"

say "write $MIB MiB of data A through $DEV"
dd if=/dev/urandom of="$D/A" bs=1M count=$MIB 2>/dev/null
dd if="$D/A" of="$DEV" bs=1M oflag=direct 2>/dev/null || die "write A"
A=$(sha "$D/A"); echo "A = $A, device reads $(sha "$DEV")"

say "split: the secondary is frozen as a point-in-time copy"
splitmirror split -c "$C" || die "split"

say "overwrite the same $MIB MiB with data B (primary only; tracks recorded)"
dd if=/dev/urandom of="$DEV" bs=1M count=$MIB oflag=direct 2>/dev/null || die "write B"
echo "device now reads $(sha "$DEV") (B); secondary still $(sha "$D/secondary.img")"
splitmirror status -c "$C"

say "restore: the split image is back at once, copied in the background"
splitmirror restore -c "$C" || die "restore"
NOW=$(sha "$DEV")
echo "right after 'restore' returned, the device reads $NOW (A = $A)"
[ "$NOW" = "$A" ] || die "the device does not show the split image"
splitmirror status -c "$C"

say "wait for the copy, then the volume mirrors again"
splitmirror wait -c "$C" || die "wait"
splitmirror status -c "$C"

say "stop (SIGTERM): metadata committed, device removed"
kill -TERM "$PID"; wait "$PID"; rc=$?
[ $rc -eq 0 ] || die "server exited $rc"
echo "primary $(sha "$D/primary.img"), secondary $(sha "$D/secondary.img"), A $A"
rm -rf "$D"
echo "demo ok"
