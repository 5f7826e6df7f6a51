#!/usr/bin/env bash
# Builds the Debian package of splitmirror with dpkg-deb (no other tools):
#   /usr/bin/splitmirror                           the binary
#   /lib/systemd/system/splitmirror@.service       the unit (ExecStart=/usr/bin/splitmirror)
#   /usr/lib/modules-load.d/splitmirror.conf       loads ublk_drv at boot
#   /etc/splitmirror/example.yaml                  the commented example (a conffile)
#   /usr/share/man/man1/splitmirror*.1.gz          man pages, generated from the CLI
#   bash, zsh and fish completions, generated from the CLI
#   /usr/share/doc/splitmirror/                    README, operations and interface docs
# The postinst creates /var/lib/splitmirror (0700), loads ublk_drv and
# reloads systemd. No udev rule: the server keeps /dev/splitmirror/NAME.
#
# Usage: packaging/build-deb.sh [--binary PATH] [--out DIR]
#   prints the path of the .deb it wrote (default DIR: target/debian)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
BIN=
OUT=${CARGO_TARGET_DIR:-$REPO/target}/debian

while [ $# -gt 0 ]; do
  case $1 in
    --binary) BIN=${2:?--binary needs a path}; shift 2 ;;
    --out) OUT=${2:?--out needs a directory}; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-deb.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
command -v dpkg-deb >/dev/null || { echo "build-deb.sh: dpkg-deb not found (apt-get install dpkg)" >&2; exit 1; }

if [ -z "$BIN" ]; then
  (cd "$REPO" && cargo build --release --bin splitmirror) >&2
  BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/splitmirror
fi
[ -x "$BIN" ] || { echo "build-deb.sh: $BIN is not an executable" >&2; exit 1; }

VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$REPO/Cargo.toml" | head -n 1)
ARCH=$(dpkg --print-architecture)
PKG=$(mktemp -d "${TMPDIR:-/tmp}/splitmirror-deb.XXXXXX")
trap 'rm -rf "$PKG"' EXIT
R=$PKG/root

install -d "$R/DEBIAN" "$R/usr/bin" "$R/lib/systemd/system" "$R/usr/lib/modules-load.d" \
           "$R/etc/splitmirror" "$R/usr/share/man/man1" "$R/usr/share/doc/splitmirror" \
           "$R/usr/share/bash-completion/completions" "$R/usr/share/zsh/vendor-completions" \
           "$R/usr/share/fish/vendor_completions.d"
strip --strip-debug -o "$R/usr/bin/splitmirror" "$BIN" 2>/dev/null || cp "$BIN" "$R/usr/bin/splitmirror"
chmod 0755 "$R/usr/bin/splitmirror"
sed 's|/usr/local/bin/splitmirror|/usr/bin/splitmirror|' "$REPO/deploy/splitmirror@.service" \
  >"$R/lib/systemd/system/splitmirror@.service"
echo ublk_drv >"$R/usr/lib/modules-load.d/splitmirror.conf"
install -m 0644 "$REPO/deploy/example.yaml" "$R/etc/splitmirror/example.yaml"

"$BIN" man "$PKG/man"
for page in "$PKG"/man/*.1; do gzip -9n -c "$page" >"$R/usr/share/man/man1/$(basename "$page").gz"; done
"$BIN" completions bash >"$R/usr/share/bash-completion/completions/splitmirror"
"$BIN" completions zsh >"$R/usr/share/zsh/vendor-completions/_splitmirror"
"$BIN" completions fish >"$R/usr/share/fish/vendor_completions.d/splitmirror.fish"
for f in README.md docs/operations.md docs/interface.md; do
  install -m 0644 "$REPO/$f" "$R/usr/share/doc/splitmirror/$(basename "$f")"
done
printf 'splitmirror\nLicense: MIT OR Apache-2.0\n' >"$R/usr/share/doc/splitmirror/copyright"

echo /etc/splitmirror/example.yaml >"$R/DEBIAN/conffiles"
cat >"$R/DEBIAN/control" <<CONTROL
Package: splitmirror
Version: $VERSION
Architecture: $ARCH
Maintainer: splitmirror developers <splitmirror@localhost>
Depends: libc6, kmod
Recommends: systemd
Section: admin
Priority: optional
Installed-Size: $(du -sk "$R" | cut -f1)
Description: ublk server: two disks as one block device with split and instant restore
 A primary and a secondary device as one /dev/ublkbN: mirror, split (a
 point-in-time copy on the secondary) and instant restore of the split
 image, with crash-consistent metadata. Needs Linux with ublk_drv.
CONTROL
cat >"$R/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
# DPKG_ROOT is set when dpkg installs into another root (--root with
# --force-script-chrootless, as tests/deploy.sh does): then only the files
# under that root are touched, never the running host.
set -e
if [ "$1" = configure ]; then
  install -d -m 0700 "$DPKG_ROOT/var/lib/splitmirror"
  if [ -z "$DPKG_ROOT" ]; then
    modprobe ublk_drv 2>/dev/null || echo "splitmirror: modprobe ublk_drv failed (kernel without CONFIG_BLK_DEV_UBLK?)" >&2
    if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
  fi
fi
exit 0
POSTINST
cat >"$R/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
if [ -z "$DPKG_ROOT" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
exit 0
POSTRM
chmod 0755 "$R/DEBIAN/postinst" "$R/DEBIAN/postrm"

mkdir -p "$OUT"
DEB=$OUT/splitmirror_${VERSION}_${ARCH}.deb
dpkg-deb --root-owner-group --build "$R" "$DEB" >&2
echo "$DEB"
