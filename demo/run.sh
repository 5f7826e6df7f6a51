#!/usr/bin/env bash
# The README's main-job command: shows splitmirror working on a real
# /dev/ublkbN. On a host with ublk_drv (as root) it runs demo/walk.sh here;
# on a host without it (like the build hosts) it runs the same walk inside
# a VM booting Debian's 6.12 kernel (tests/vm/run.sh) and prints what it did.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

if [ -c /dev/ublk-control ] && [ "$(id -u)" -eq 0 ]; then
  cargo build --release --bin splitmirror
  PATH="$REPO/target/release:$PATH" exec sh demo/walk.sh
fi
# The VM's packages (qemu, busybox, e2fsprogs, ...), as CI installs them:
# does nothing when they are all there, apt-get install otherwise.
bash tests/vm/deps.sh
command -v cargo >/dev/null || { echo "demo: cargo not found: install Rust (https://rustup.rs) first" >&2; exit 1; }
echo "demo: no usable /dev/ublk-control here (needs ublk_drv and root);"
echo "demo: running the walk in a VM with Debian's 6.12 kernel (first run downloads it)"
logs=${SPLITMIRROR_VM_LOGS:-$REPO/target/vm-logs}
rc=0
SPLITMIRROR_VM_LOGS=$logs bash tests/vm/run.sh demo/walk.sh || rc=$?
echo "---- what the walk printed inside the VM ($logs/walk.log):"
# The console log carries kernel and init lines too: show the walk's part.
sed -n '/### a volume on two sparse/,/^demo ok\|DEMO FAILED/p' "$logs/walk.log" | grep -v '^\[ *[0-9.]*\]' || cat "$logs/walk.log"
exit "$rc"
