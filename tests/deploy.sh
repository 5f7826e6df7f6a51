#!/usr/bin/env bash
# Checks deploy/: the unit template passes `systemd-analyze verify` (as the
# instance splitmirror@vol0.service), and install.sh stages a complete tree
# under DESTDIR. Fails loudly when systemd-analyze is missing: a skipped
# check would look like a passed one.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
UNIT=$REPO/deploy/splitmirror@.service

command -v systemd-analyze >/dev/null 2>&1 || {
  echo "deploy: FAIL: systemd-analyze not found (apt-get install systemd)" >&2; exit 1; }

T=$(mktemp -d "${TMPDIR:-/tmp}/splitmirror-deploy.XXXXXX")
trap 'rm -rf "$T"' EXIT
fail() { echo "deploy: FAIL: $*" >&2; exit 1; }

# verify checks that ExecStart's binary exists: point it at a stand-in.
mkdir -p "$T/bin" "$T/units"
printf '#!/bin/sh\nexit 0\n' >"$T/bin/splitmirror"; chmod 755 "$T/bin/splitmirror"
grep -q '^ExecStart=/usr/local/bin/splitmirror run -c /etc/splitmirror/%i.yaml$' "$UNIT" \
  || fail "ExecStart is not '/usr/local/bin/splitmirror run -c /etc/splitmirror/%i.yaml'"
sed "s|/usr/local/bin/splitmirror|$T/bin/splitmirror|" "$UNIT" >"$T/units/splitmirror@vol0.service"

echo "== systemd-analyze verify splitmirror@vol0.service"
# --man=no: Documentation= links are not checked against installed man pages.
# Every message about our unit counts as a failure (verify exits 0 on some
# warnings, e.g. unknown keys); messages about the host's own units do not.
out=$(cd "$T/units" && SYSTEMD_LOG_LEVEL=warning systemd-analyze verify --man=no ./splitmirror@vol0.service 2>&1) \
  || { echo "$out"; fail "systemd-analyze verify exited non-zero"; }
[ -n "$out" ] && echo "$out"
if echo "$out" | grep -q 'splitmirror'; then fail "systemd-analyze verify complained about the unit"; fi

echo "== unit properties"
# the properties the design depends on (see comments in the unit)
# shellcheck disable=SC2016  # $MAINPID is systemd's, not the shell's
for want in 'Type=notify' 'Restart=on-failure' 'DefaultDependencies=no' 'Before=local-fs-pre.target' \
            'LimitMEMLOCK=infinity' 'ProtectSystem=strict' 'RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6' \
            'SuccessExitStatus=75' 'RestartForceExitStatus=75' 'ExecReload=/bin/kill -HUP $MAINPID' \
            'Environment=SPLITMIRROR_KEEP_DEVICE_IN_USE=1' \
            'NoNewPrivileges=yes' 'ProtectHome=yes' 'PrivateTmp=yes' 'RuntimeDirectory=splitmirror'; do
  grep -qx "$want" "$UNIT" || fail "unit lacks '$want'"
done
# these would hide or block the block devices and /dev/ublk*
for bad in PrivateDevices DevicePolicy DeviceAllow ProtectClock; do
  if grep -q "^$bad=" "$UNIT"; then fail "unit sets $bad=, which blocks access to the disks or ublk devices"; fi
done
echo "ok"

echo "== install.sh into DESTDIR"
DESTDIR=$T/root "$REPO/deploy/install.sh" --binary "$T/bin/splitmirror" >/dev/null
for f in usr/local/bin/splitmirror etc/systemd/system/splitmirror@.service \
         etc/modules-load.d/splitmirror.conf etc/splitmirror/example.yaml; do
  [ -s "$T/root/$f" ] || fail "install.sh did not install /$f"
done
[ -x "$T/root/usr/local/bin/splitmirror" ] || fail "installed binary is not executable"
[ "$(stat -c %a "$T/root/var/lib/splitmirror")" = 700 ] || fail "/var/lib/splitmirror is not mode 0700"
grep -qx ublk_drv "$T/root/etc/modules-load.d/splitmirror.conf" || fail "modules-load.d does not load ublk_drv"
cmp -s "$UNIT" "$T/root/etc/systemd/system/splitmirror@.service" || fail "installed unit differs from deploy/"
echo "ok"

echo "== example.yaml keys"
# only keys of the config contract (unknown keys are an error at run time)
bad=$(sed -n 's/^\([a-z_]*\):.*/\1/p' "$REPO/deploy/example.yaml" \
      | grep -vxE 'name|primary|secondary|metadata|track_size|secondary_missing|ublk|restore|control|metrics|events' || true)
[ -z "$bad" ] || fail "example.yaml has unknown top-level keys: $bad"
echo "ok"
echo "== the Debian package (packaging/build-deb.sh), extracted into a temp root"
command -v dpkg-deb >/dev/null 2>&1 || fail "dpkg-deb not found (apt-get install dpkg)"
(cd "$REPO" && cargo build --release --bin splitmirror) >"$T/build.log" 2>&1 \
  || { cat "$T/build.log"; fail "cargo build failed"; }
DEB=$("$REPO/packaging/build-deb.sh" --binary "${CARGO_TARGET_DIR:-$REPO/target}/release/splitmirror" \
      --out "$T/deb" 2>"$T/deb.log") || { cat "$T/deb.log"; fail "build-deb.sh failed"; }
[ -s "$DEB" ] || fail "build-deb.sh wrote no package"
info=$(dpkg-deb -f "$DEB" Package Version Architecture)
echo "$info" | grep -qx 'Package: splitmirror' || fail "package name: $info"
echo "$info" | grep -qx "Architecture: $(dpkg --print-architecture)" || fail "architecture: $info"
dpkg-deb -x "$DEB" "$T/pkg"
dpkg-deb -e "$DEB" "$T/pkg/DEBIAN"
for f in usr/bin/splitmirror lib/systemd/system/splitmirror@.service usr/lib/modules-load.d/splitmirror.conf \
         etc/splitmirror/example.yaml usr/share/man/man1/splitmirror.1.gz usr/share/man/man1/splitmirror-restore.1.gz \
         usr/share/man/man1/splitmirror-list.1.gz usr/share/bash-completion/completions/splitmirror \
         usr/share/zsh/vendor-completions/_splitmirror usr/share/fish/vendor_completions.d/splitmirror.fish \
         usr/share/doc/splitmirror/operations.md DEBIAN/postinst DEBIAN/conffiles; do
  [ -s "$T/pkg/$f" ] || fail "the package lacks /$f"
done
"$T/pkg/usr/bin/splitmirror" --version | grep -q '^splitmirror ' || fail "the packaged binary does not run"
gzip -dc "$T/pkg/usr/share/man/man1/splitmirror.1.gz" | grep -q '^\.TH splitmirror' || fail "splitmirror.1 is not a man page"
grep -q 'complete .*splitmirror' "$T/pkg/usr/share/bash-completion/completions/splitmirror" \
  || fail "the bash completion does not complete splitmirror"
grep -qx /etc/splitmirror/example.yaml "$T/pkg/DEBIAN/conffiles" || fail "example.yaml is not a conffile"
PUNIT=$T/pkg/lib/systemd/system/splitmirror@.service
grep -q '^ExecStart=/usr/bin/splitmirror run -c /etc/splitmirror/%i.yaml$' "$PUNIT" \
  || fail "the packaged unit does not start /usr/bin/splitmirror"
mkdir -p "$T/punits"
sed "s|/usr/bin/splitmirror|$T/pkg/usr/bin/splitmirror|" "$PUNIT" >"$T/punits/splitmirror@vol0.service"
out=$(cd "$T/punits" && SYSTEMD_LOG_LEVEL=warning systemd-analyze verify --man=no ./splitmirror@vol0.service 2>&1) \
  || { echo "$out"; fail "systemd-analyze verify of the packaged unit exited non-zero"; }
if echo "$out" | grep -q 'splitmirror'; then echo "$out"; fail "systemd-analyze verify complained about the packaged unit"; fi
echo "ok ($(basename "$DEB"))"
echo "== the Debian package installed and removed by dpkg, in a throwaway root"
# dpkg's own install path (unpack, conffiles, postinst configure, remove),
# into $T/root instead of the host: the maintainer scripts run chrootless
# and honour DPKG_ROOT, so the running system is never touched.
ROOT=$T/root
mkdir -p "$ROOT/var/lib/dpkg/info" "$ROOT/var/lib/dpkg/updates"
: >"$ROOT/var/lib/dpkg/status"
dpkgr() { dpkg --root="$ROOT" --force-script-chrootless --force-depends --force-not-root "$@"; }
dpkgr -i "$DEB" >"$T/dpkg-i.log" 2>&1 || { cat "$T/dpkg-i.log"; fail "dpkg -i of the package failed"; }
dpkg-query --admindir="$ROOT/var/lib/dpkg" -W -f='${db:Status-Status}' splitmirror | grep -qx installed \
  || fail "dpkg does not list splitmirror as installed"
for f in usr/bin/splitmirror lib/systemd/system/splitmirror@.service etc/splitmirror/example.yaml; do
  [ -s "$ROOT/$f" ] || fail "after dpkg -i, /$f is missing"
done
[ -d "$ROOT/var/lib/splitmirror" ] || fail "postinst did not create /var/lib/splitmirror"
[ "$(stat -c %a "$ROOT/var/lib/splitmirror")" = 700 ] || fail "/var/lib/splitmirror is not 0700"
"$ROOT/usr/bin/splitmirror" --version | grep -q '^splitmirror ' || fail "the installed binary does not run"
dpkgr -r splitmirror >"$T/dpkg-r.log" 2>&1 || { cat "$T/dpkg-r.log"; fail "dpkg -r failed"; }
[ ! -e "$ROOT/usr/bin/splitmirror" ] || fail "dpkg -r left /usr/bin/splitmirror"
[ -e "$ROOT/etc/splitmirror/example.yaml" ] || fail "dpkg -r removed the conffile (only purge may)"
echo "ok"
echo "deploy: all checks passed"
