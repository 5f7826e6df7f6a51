#!/usr/bin/env bash
# Install what the test suite (tests/run-all.sh, which calls this first) and
# the VM test tier (tests/vm/run.sh) need on Debian 12.
# Idempotent: when every package is already installed it does nothing
# (no apt-get update), so calling it on every CI run costs well under a second.
set -euo pipefail

PKGS=(
  qemu-system-x86   # qemu-system-x86_64, run with -accel tcg
  qemu-system-data  # qboot.rom: the fast firmware run.sh boots with
  busybox-static    # the VM's userland
  fio               # I/O load + verify inside the VM
  e2fsprogs         # mkfs.ext4 / e2fsck (+ /etc/mke2fs.conf)
  dmsetup           # dm-flakey / dm-error fault tests inside the VM
  cpio gzip xz-utils  # initramfs packing, .ko.xz decompression
  libclang-dev      # bindgen in libublk-sys (static splitmirror build)
  binutils          # strip: keeps the per-run initramfs small
  shellcheck        # tests/run-all.sh lints these scripts
  systemd           # systemd-analyze verify in tests/deploy.sh
  coreutils findutils sed grep util-linux  # host-side script tools (flock); blkdiscard, fstrim for the VM
  apt dpkg          # apt-get download / dpkg-deb -x for the kernel package
  curl ca-certificates  # tests/vm/fetch-kernel.sh: the newer kernel's packages
)

missing=()
for p in "${PKGS[@]}"; do
  st=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
  [ "$st" = installed ] || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "vm deps: all installed"
else
  echo "vm deps: installing ${missing[*]}"
  SUDO=
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The static build needs the std library for the explicit target; it is the
# host target here, so this only matters on unusual toolchains. The suite's
# style checks need rustfmt and clippy.
if command -v rustup >/dev/null 2>&1; then
  for c in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep "^$c" >/dev/null || rustup component add "$c"
  done
  if ! rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-gnu; then
    rustup target add x86_64-unknown-linux-gnu
  fi
fi
