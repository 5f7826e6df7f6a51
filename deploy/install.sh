#!/usr/bin/env bash
# Installs splitmirror for systemd:
#   /usr/local/bin/splitmirror                  the binary (built if not given)
#   /etc/systemd/system/splitmirror@.service    the unit template
#   /etc/modules-load.d/splitmirror.conf        loads ublk_drv at boot
#   /etc/splitmirror/example.yaml               a commented config to copy
#   /var/lib/splitmirror/                       metadata files (mode 0700)
# Existing configs are never overwritten; enabling a volume is left to you:
#   cp /etc/splitmirror/example.yaml /etc/splitmirror/vol0.yaml; edit it
#   splitmirror format -c /etc/splitmirror/vol0.yaml
#   systemctl enable --now splitmirror@vol0
#
# Usage: deploy/install.sh [--binary PATH]
#   DESTDIR=/some/root deploy/install.sh   stages into a tree (packaging,
#                                          tests/deploy.sh); no systemctl then
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
DESTDIR=${DESTDIR:-}
BIN=

while [ $# -gt 0 ]; do
  case $1 in
    --binary) BIN=${2:?--binary needs a path}; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

if [ -z "$DESTDIR" ] && [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (or set DESTDIR to stage into a directory)" >&2
  exit 1
fi

if [ -z "$BIN" ]; then
  echo "install.sh: building splitmirror (release)"
  (cd "$REPO" && cargo build --release --bin splitmirror)
  BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/splitmirror
fi
[ -x "$BIN" ] || { echo "install.sh: $BIN is not an executable" >&2; exit 1; }

install -D -m 0755 "$BIN" "$DESTDIR/usr/local/bin/splitmirror"
install -D -m 0644 "$HERE/splitmirror@.service" "$DESTDIR/etc/systemd/system/splitmirror@.service"
install -d -m 0755 "$DESTDIR/etc/modules-load.d"
echo ublk_drv >"$DESTDIR/etc/modules-load.d/splitmirror.conf"
install -d -m 0755 "$DESTDIR/etc/splitmirror"
# example.yaml is ours: refresh it. NAME.yaml files are the admin's.
install -m 0644 "$HERE/example.yaml" "$DESTDIR/etc/splitmirror/example.yaml"
install -d -m 0700 "$DESTDIR/var/lib/splitmirror"

if [ -z "$DESTDIR" ]; then
  # load the driver now too, so a first `systemctl start` works before a reboot
  modprobe ublk_drv || echo "install.sh: warning: modprobe ublk_drv failed (kernel without CONFIG_BLK_DEV_UBLK?)" >&2
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
  fi
fi
echo "install.sh: installed into ${DESTDIR:-/}"
echo "next: cp /etc/splitmirror/example.yaml /etc/splitmirror/NAME.yaml, edit, splitmirror format -c ..., systemctl enable --now splitmirror@NAME"
