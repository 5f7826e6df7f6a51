#!/usr/bin/env bash
# Downloads a newer Debian kernel for the VM harness and prints the two
# package paths for SPLITMIRROR_VM_KERNEL_DEBS:
#
#   export SPLITMIRROR_VM_KERNEL_DEBS="$(bash tests/vm/fetch-kernel.sh)"
#   bash benches/vm-perf.sh        # now boots that kernel
#
# Newer Debian kernels (7.x, trixie-backports) ship vmlinuz and the modules
# in two packages, linux-binary-V-amd64 and linux-modules-V-amd64, that the
# host's Debian 12 apt lists do not know; this reads the suite's Packages
# index from the mirror, picks the newest V of the series, checks each
# download's SHA256 against the index and keeps the files under
# ~/.cache/splitmirror-vm/debs/.
#
# Environment: KERNEL_SUITE (trixie-backports), KERNEL_SERIES (7),
# DEBIAN_MIRROR (http://deb.debian.org/debian).
set -euo pipefail
SUITE=${KERNEL_SUITE:-trixie-backports}
SERIES=${KERNEL_SERIES:-7}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DIR=${SPLITMIRROR_VM_CACHE:-$HOME/.cache/splitmirror-vm}/debs
mkdir -p "$DIR"
log() { printf '%s\n' "$*" >&2; }

index=$DIR/Packages-$SUITE
curl -fsS -m 120 "$MIRROR/dists/$SUITE/main/binary-amd64/Packages.xz" | xz -dc >"$index.tmp" \
  || { log "fetch-kernel: cannot read $MIRROR/dists/$SUITE/main/binary-amd64/Packages.xz"; exit 1; }
mv "$index.tmp" "$index"

# "VERSION FILENAME SHA256" for each linux-{binary,modules}-SERIES.*-amd64
entries() { # $1 = binary|modules
  awk -v kind="$1" -v series="$SERIES" '
    /^Package: /{ pkg = $2; fn = ""; sha = "" }
    /^Filename: /{ fn = $2 }
    /^SHA256: /{ sha = $2 }
    /^$/{
      re = "^linux-" kind "-" series "\\.[0-9]+\\.[0-9]+\\+deb[0-9]+-amd64$"
      if (pkg ~ re && fn != "") { v = pkg; sub("^linux-" kind "-", "", v); sub("-amd64$", "", v); print v, fn, sha }
      pkg = ""
    }' "$index"
}
ver=$(entries binary | awk '{print $1}' | sort -V | tail -n 1)
[ -n "$ver" ] || { log "fetch-kernel: $SUITE has no linux-binary-$SERIES.*-amd64"; exit 1; }
out=()
for kind in binary modules; do
  read -r _ fn sha < <(entries "$kind" | awk -v v="$ver" '$1 == v' | head -n 1) \
    || { log "fetch-kernel: $SUITE has no linux-$kind-$ver-amd64"; exit 1; }
  f=$DIR/$(basename "$fn")
  if ! echo "$sha  $f" | sha256sum -c --status 2>/dev/null; then
    log "fetch-kernel: downloading $(basename "$fn")"
    curl -fsS -m 900 -o "$f.tmp" "$MIRROR/$fn" || { log "fetch-kernel: download of $fn failed"; exit 1; }
    echo "$sha  $f.tmp" | sha256sum -c --status || { rm -f "$f.tmp"; log "fetch-kernel: $fn does not match the index's SHA256"; exit 1; }
    mv "$f.tmp" "$f"
  fi
  out+=("$f")
done
echo "${out[*]}"
