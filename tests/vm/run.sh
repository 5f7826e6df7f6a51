#!/usr/bin/env bash
# VM test tier: boots Debian's 6.12 kernel under qemu (TCG) with a real
# ublk_drv and runs each scenario script against a real /dev/ublkbN.
#
#   tests/vm/run.sh                 # every tests/vm/scenarios/*.sh, sorted
#   tests/vm/run.sh a.sh b.sh ...   # exactly these scripts, wherever they are
#
# See tests/vm/README.md for the environment variables and how it works.
set -uo pipefail
export LC_COLLATE=C
# The whole script is one brace group, so bash parses all of it before
# running any: editing run.sh during a (long) run cannot break that run.
{

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/../.." && pwd)
CACHE=${SPLITMIRROR_VM_CACHE:-$HOME/.cache/splitmirror-vm}
LOGDIR=${SPLITMIRROR_VM_LOGS:-$REPO/target/vm-logs}
DEFAULT_TIMEOUT=${SPLITMIRROR_VM_TIMEOUT:-600}
VM_MEM=${SPLITMIRROR_VM_MEM:-2G}
VM_SMP=${SPLITMIRROR_VM_SMP:-2}
BOOT_MARGIN=${SPLITMIRROR_VM_BOOT_MARGIN:-180}   # host-side slack over the scenario limit
DISK_MIB=${SPLITMIRROR_VM_DISK_MIB:-256}   # primary, secondary, spare; scenarios derive sizes from it
META_MIB=16
# Bump when the layout of the base initramfs changes in a way the cache key
# (which already covers build_base's source) would not notice.
BASE_FORMAT=2

# Modules loaded in this order (dependencies found in each .ko's modinfo are
# loaded first); "?" = optional (absent or failing is fine). dm-mod and
# dm-flakey are required: the fault scenarios put dm targets under the
# secondary; dm-log-writes and dm-snapshot the power-cut scenario (one
# write log under all three devices, replays checked on snapshots). The
# optional ones serve peer measurements (dm-mirror, dm-clone) and the NVMe/TCP
# scenario (target nvmet + nvmet-tcp, initiator nvme-tcp, over loopback),
# which fails, not skips, when they did not load.
MODULES=(ublk_drv virtio_blk crc16 mbcache jbd2 "?crc32c_generic" ext4
         dm-mod dm-flakey "?dm-delay" "?dm-log" "?dm-region-hash" "?dm-mirror" "?dm-clone" "?loop" dm-log-writes dm-snapshot
         "?nvmet" "?nvmet-tcp" "?nvme-tcp")

log() { printf '%s\n' "$*" >&2; }

# ---------------------------------------------------------------- scenarios
SCENARIOS=()
if [ $# -eq 0 ]; then
  # glob order follows LC_COLLATE (set to C above): 00-, 01-, 10-, ...
  for f in "$SCRIPT_DIR"/scenarios/*.sh; do [ -f "$f" ] && SCENARIOS+=("$f"); done
  if [ ${#SCENARIOS[@]} -eq 0 ]; then
    echo "vm: no scenarios in $SCRIPT_DIR/scenarios"; echo "vm: 0 passed, 1 failed"; exit 1
  fi
else
  for a in "$@"; do
    if [ ! -f "$a" ]; then
      echo "vm: no such scenario file: $a"; echo "vm: 0 passed, $# failed"; exit 1
    fi
    SCENARIOS+=("$(cd "$(dirname "$a")" && pwd)/$(basename "$a")")
  done
fi

# A setup failure (build, kernel, initramfs) fails every scenario: never a skip.
setup_fail() {
  echo "vm: setup failed: $*"
  for s in "${SCENARIOS[@]}"; do echo "FAIL $(basename "$s" .sh) (setup failed)"; done
  echo "vm: 0 passed, ${#SCENARIOS[@]} failed"
  exit 1
}

case $DISK_MIB in ''|*[!0-9]*) setup_fail "SPLITMIRROR_VM_DISK_MIB=$DISK_MIB is not a number of MiB" ;; esac
mkdir -p "$CACHE" "$LOGDIR" || setup_fail "cannot create $CACHE or $LOGDIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/splitmirror-vm.XXXXXX") || setup_fail "mktemp"
trap 'rm -rf "$WORK"' EXIT

for t in qemu-system-x86_64 busybox fio mke2fs e2fsck dmsetup blkdiscard fstrim cpio gzip xz dpkg-deb apt-get apt-cache flock ldd; do
  command -v "$t" >/dev/null 2>&1 || setup_fail "$t not found (run tests/vm/deps.sh)"
done

# ---------------------------------------------------------------- splitmirror
if [ -n "${SPLITMIRROR_BIN:-}" ]; then
  BIN=$(readlink -f "$SPLITMIRROR_BIN") || setup_fail "SPLITMIRROR_BIN=$SPLITMIRROR_BIN not found"
  [ -x "$BIN" ] || setup_fail "SPLITMIRROR_BIN=$SPLITMIRROR_BIN is not executable"
  log "vm: using prebuilt $BIN"
else
  log "vm: building splitmirror (static, release)"
  t0=$SECONDS
  ( cd "$REPO" && RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C target-feature=+crt-static" \
      cargo build --release --target x86_64-unknown-linux-gnu --bin splitmirror --bin log-replay ) >"$LOGDIR/build.log" 2>&1 \
    || { tail -n 40 "$LOGDIR/build.log"; setup_fail "cargo build failed (full log: $LOGDIR/build.log)"; }
  BIN="${CARGO_TARGET_DIR:-$REPO/target}/x86_64-unknown-linux-gnu/release/splitmirror"
  [ -x "$BIN" ] || setup_fail "build produced no $BIN"
  # the VM has no Rust runtime libraries: +crt-static must have worked
  # (grep without -q: under pipefail, grep -q quitting early can kill ldd
  # with SIGPIPE and turn a match into a failure)
  for b in "$BIN" "$(dirname "$BIN")/log-replay"; do
    if ldd "$b" 2>/dev/null | grep '=>' >/dev/null; then setup_fail "$b is not statically linked (crt-static ignored?)"; fi
  done
  log "vm: built in $((SECONDS - t0))s"
fi

# ---------------------------------------------------------------- kernel
# Newest linux-image-6.12.N+debX-amd64 (signed preferred, -unsigned accepted,
# never -dbg); SPLITMIRROR_VM_KERNEL_PKG pins a package name.
resolve_kernel_pkg() {
  if [ -n "${SPLITMIRROR_VM_KERNEL_PKG:-}" ]; then echo "$SPLITMIRROR_VM_KERNEL_PKG"; return; fi
  apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb[0-9]+-amd64(-unsigned)?$' 2>/dev/null \
    | awk '{print $1}' \
    | sed -n 's/^\(linux-image-6\.12\.\([0-9]*\)+deb[0-9]*-amd64\(-unsigned\)\{0,1\}\)$/\2 \3 \1/p' \
    | awk '{ if (NF == 3) print $1, 0, $3; else print $1, 1, $2 }' \
    | sort -k1,1n -k2,2n | tail -n 1 | awk '{print $3}'
}

# prints the load list (one "name file" or "? name file" per line), dependencies first
resolve_modules() { # $1 = extracted tree
  local tree=$1 moddir
  moddir=$(find "$tree" -maxdepth 4 -type d -path '*/modules/*' -name '[0-9]*' | head -n 1)
  [ -n "$moddir" ] || return 1
  declare -A seen=()
  emit() { # $1 name, $2 optional(0/1)
    local n=$1 opt=$2 f alt deps d
    [ -n "${seen[$n]:-}" ] && return 0
    seen[$n]=1
    alt=$(echo "$n" | tr '_-' '-_')
    f=$(find "$moddir" \( -name "$n.ko" -o -name "$n.ko.xz" -o -name "$n.ko.zst" -o -name "$alt.ko" -o -name "$alt.ko.xz" -o -name "$alt.ko.zst" \) | head -n 1)
    if [ -z "$f" ]; then
      if grep -qE "/($n|$alt)\.ko" "$moddir/modules.builtin" 2>/dev/null; then return 0; fi
      if [ "$opt" = 1 ]; then return 0; fi
      log "vm: required module $n not in the kernel package"; return 1
    fi
    deps=$(decompress_ko "$f" | tr '\0' '\n' | sed -n 's/^depends=//p' | head -n 1 | tr ',' ' ')
    for d in $deps; do emit "$d" "$opt" || return 1; done
    echo "$([ "$opt" = 1 ] && echo '? ')$(basename "$f" | sed 's/\.ko.*$//') $f"
  }
  local m
  for m in "${MODULES[@]}"; do
    if [ "${m#\?}" != "$m" ]; then emit "${m#\?}" 1 || return 1; else emit "$m" 0 || return 1; fi
  done
}
decompress_ko() {
  case $1 in
    *.xz) xz -dc "$1" ;;
    *.zst) zstd -dcq "$1" ;;
    *) cat "$1" ;;
  esac
}

# unpack_kernel TREE DESC: vmlinuz and the MODULES of an extracted kernel
# tree into $KDIR (sets nothing else; DESC is recorded as the package)
unpack_kernel() {
  local tree=$1 desc=$2 kimg list
  kimg=$(find "$tree" \( -path '*/boot/vmlinuz-*' -o -path '*/modules/*/vmlinuz' \) -type f | head -n 1)
  [ -n "$kimg" ] || { log "vm: no vmlinuz in $desc"; return 1; }
  list=$(resolve_modules "$tree") || return 1
  rm -rf "$KDIR.tmp"; mkdir -p "$KDIR.tmp/modules"
  cp "$kimg" "$KDIR.tmp/vmlinuz"
  : >"$KDIR.tmp/modules/load.list"
  while read -r a b c; do
    local opt="" name file
    if [ "$a" = "?" ]; then opt="?"; name=$b; file=$c; else name=$a; file=$b; fi
    decompress_ko "$file" >"$KDIR.tmp/modules/$name.ko"
    echo "${opt:--} $name" >>"$KDIR.tmp/modules/load.list"
  done <<<"$list"
  echo "$desc" >"$KDIR.tmp/package"
  rm -rf "$KDIR"
  echo "${MODULES[*]}" >"$KDIR.tmp/modules.want"
  mv "$KDIR.tmp" "$KDIR" && touch "$KDIR/ok"
}

# kernel_cached: $KDIR holds an unpacked kernel with today's MODULES
kernel_cached() {
  [ -f "$KDIR/ok" ] && [ "$(cat "$KDIR/modules.want" 2>/dev/null)" = "${MODULES[*]}" ]
}

# SPLITMIRROR_VM_KERNEL_DEBS="a.deb b.deb": a kernel from local packages
# (newer Debian kernels ship vmlinuz and modules in two, linux-binary-* and
# linux-modules-*; tests/vm/fetch-kernel.sh downloads them). Cached beside
# the default kernel, never replacing it; the version comes from the
# package names, so a cached kernel costs no unpacking.
fetch_kernel_debs() { # sets KVER, KDIR
  local -a debs; local d pkg dl desc=""
  read -r -a debs <<<"$SPLITMIRROR_VM_KERNEL_DEBS"
  KVER=
  for d in "${debs[@]}"; do
    [ -f "$d" ] || { log "vm: SPLITMIRROR_VM_KERNEL_DEBS: $d is not a file"; return 1; }
    pkg=$(dpkg-deb -f "$d" Package) || return 1
    case $pkg in linux-image-*|linux-binary-*|linux-modules-*)
      KVER=${pkg#linux-*-}; KVER=${KVER%-unsigned} ;;
    esac
    desc="$desc$pkg $(dpkg-deb -f "$d" Version) "
  done
  [ -n "$KVER" ] || { log "vm: SPLITMIRROR_VM_KERNEL_DEBS has no linux-image/binary/modules package"; return 1; }
  KDIR=$CACHE/kernel/$KVER
  kernel_cached && return 0
  dl=$CACHE/dl.$$; rm -rf "$dl"; mkdir -p "$dl/x"
  for d in "${debs[@]}"; do
    dpkg-deb -x "$d" "$dl/x" || { rm -rf "$dl"; return 1; }
  done
  unpack_kernel "$dl/x" "$desc" || { rm -rf "$dl"; return 1; }
  rm -rf "$dl"
}

fetch_kernel() { # sets KVER, KDIR
  local pkg dl
  if [ -n "${SPLITMIRROR_VM_KERNEL_DEBS:-}" ]; then fetch_kernel_debs; return; fi
  pkg=$(resolve_kernel_pkg)
  if [ -z "$pkg" ] && [ "$(id -u)" -eq 0 ]; then
    log "vm: no linux-image-6.12 in the apt lists; running apt-get update"
    apt-get update -qq >/dev/null 2>&1 || true
    pkg=$(resolve_kernel_pkg)
  fi
  if [ -z "$pkg" ]; then
    # offline: fall back to the newest cached kernel
    KVER=$(find "$CACHE/kernel" -mindepth 1 -maxdepth 1 -type d -name '6.12.*' -printf '%f\n' 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$KVER" ] || [ ! -f "$CACHE/kernel/$KVER/ok" ]; then
      log "vm: cannot resolve a linux-image-6.12.*-amd64 package (apt lists have none, nothing cached)"; return 1
    fi
    log "vm: apt knows no 6.12 kernel; using cached $KVER"
    KDIR=$CACHE/kernel/$KVER; return 0
  fi
  KVER=${pkg#linux-image-}; KVER=${KVER%-unsigned}
  KDIR=$CACHE/kernel/$KVER
  # the cached modules are the ones MODULES named when it was unpacked
  kernel_cached && return 0
  log "vm: fetching $pkg"
  dl=$CACHE/dl.$$; rm -rf "$dl"; mkdir -p "$dl"
  ( cd "$dl" && apt-get download -qq "$pkg" ) 2> >(grep -v 'Download is performed unsandboxed' >&2) \
    || { if [ "$(id -u)" -eq 0 ]; then apt-get update -qq >/dev/null 2>&1; ( cd "$dl" && apt-get download -qq "$pkg" 2>/dev/null ); else false; fi; } \
    || { rm -rf "$dl"; log "vm: apt-get download $pkg failed"; return 1; }
  dpkg-deb -x "$dl"/*.deb "$dl/x" || { rm -rf "$dl"; return 1; }
  unpack_kernel "$dl/x" "$(dpkg-deb -f "$dl"/*.deb Package Version | tr '\n' ' ')" || { rm -rf "$dl"; return 1; }
  rm -rf "$dl"
  # a newer 6.12 kernel replaces the cached one (the offline fallback needs
  # one); kernels from SPLITMIRROR_VM_KERNEL_DEBS stay
  find "$CACHE/kernel" -mindepth 1 -maxdepth 1 -type d -name '6.12.*' ! -name "$KVER" -exec rm -rf {} +
}

# ---------------------------------------------------------------- base initramfs
copy_with_libs() { # $1 = tree, then binaries (copied to their own path)
  local tree=$1 f l; shift
  for f in "$@"; do
    mkdir -p "$tree$(dirname "$f")"
    cp -L "$f" "$tree$f"
    for l in $(ldd "$f" 2>/dev/null | awk '/=> \//{print $3} /^[[:space:]]*\//{print $1}'); do
      [ -e "$tree$l" ] && continue
      mkdir -p "$tree$(dirname "$l")"
      cp -L "$l" "$tree$l"
    done
  done
}

base_inputs() { # everything the base initramfs is made of, for the cache key
  echo "format=$BASE_FORMAT kver=$KVER"
  cat "$KDIR/modules/load.list"
  dpkg-query -W busybox-static fio e2fsprogs dmsetup util-linux libc6 libgcc-s1 2>/dev/null
  declare -f build_base copy_with_libs
}

build_base() { # $1 = output .cpio (uncompressed, see below)
  local out=$1 tree=$WORK/base a b f
  rm -rf "$tree"; mkdir -p "$tree"
  for d in bin sbin usr/bin usr/sbin usr/local/bin lib lib64 etc/splitmirror dev proc sys run tmp mnt root var/tmp vm lib/modules; do
    mkdir -p "$tree/$d"
  done
  cp "$(command -v busybox)" "$tree/bin/busybox"
  for a in $(busybox --list); do
    [ -e "$tree/bin/$a" ] || ln -s busybox "$tree/bin/$a"
  done
  copy_with_libs "$tree" "$(command -v fio)" "$(command -v mke2fs)" "$(command -v e2fsck)" "$(command -v dmsetup)"
  # util-linux's blkdiscard (busybox's has no -z, BLKZEROOUT) and fstrim:
  # in /usr/sbin, ahead of busybox's applets in the VM's PATH
  copy_with_libs "$tree" "$(command -v blkdiscard)" "$(command -v fstrim)"
  for b in mkfs.ext4 mkfs.ext3 mkfs.ext2; do ln -sf mke2fs "$tree$(dirname "$(command -v mke2fs)")/$b"; done
  ln -sf e2fsck "$tree$(dirname "$(command -v e2fsck)")/fsck.ext4"
  # glibc dlopens libgcc_s for thread cancellation / unwinding
  for f in /lib/x86_64-linux-gnu/libgcc_s.so.1 /usr/lib/x86_64-linux-gnu/libgcc_s.so.1; do
    [ -e "$f" ] && { mkdir -p "$tree$(dirname "$f")"; cp -L "$f" "$tree$f"; break; }
  done
  cp /etc/mke2fs.conf "$tree/etc/mke2fs.conf"
  printf 'root:x:0:0:root:/root:/bin/sh\n' >"$tree/etc/passwd"
  printf 'root:x:0:\ndisk:x:6:\n' >"$tree/etc/group"
  cp "$KDIR"/modules/*.ko "$KDIR/modules/load.list" "$tree/lib/modules/"
  # Uncompressed on purpose: ~90 MB instead of ~39 MB gzipped, but the guest
  # kernel then only copies it; unpacking gzip under TCG cost ~1.5 s per boot
  # (measured, see README.md). The kernel accepts concatenated cpio archives.
  ( cd "$tree" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet ) >"$out.tmp" && mv "$out.tmp" "$out"
}

# ---------------------------------------------------------------- /init
write_init() { # $1 = path
  cat >"$1" <<'EOF'
#!/bin/sh
# splitmirror VM /init (generated by tests/vm/run.sh)
export PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/shm /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
echo "SPLITMIRROR-VM-INIT uptime=$(cut -d' ' -f1 /proc/uptime)"

result() { # $1 = rc, rest = note
  rc=$1; shift
  echo "SPLITMIRROR-VM-RESULT rc=$rc $* uptime=$(cut -d' ' -f1 /proc/uptime)"
  sync
  poweroff -f
  sleep 10
}

while read -r opt name; do
  if ! insmod "/lib/modules/$name.ko"; then
    if [ "$opt" = "?" ]; then
      echo "vm-init: optional module $name did not load (ignored)"
    else
      echo "vm-init: required module $name did not load"
      result 125 "setup=module-$name"
    fi
  fi
done </lib/modules/load.list

PRIMARY=/dev/vda SECONDARY=/dev/vdb METADATA=/dev/vdc SPARE=/dev/vdd
i=0
while ! { [ -b $PRIMARY ] && [ -b $SECONDARY ] && [ -b $METADATA ] && [ -b $SPARE ]; }; do
  i=$((i + 1))
  if [ $i -gt 100 ]; then echo "vm-init: virtio disks did not appear"; ls -l /dev; result 125 setup=disks; fi
  sleep 0.1
done
[ -e /dev/ublk-control ] || echo "vm-init: warning: /dev/ublk-control missing"

SCRATCH=/tmp/scratch
mkdir -p "$SCRATCH" /etc/splitmirror
CONFIG=/etc/splitmirror/vm0.yaml
cat >"$CONFIG" <<EOC
name: vm0
primary: $PRIMARY
secondary: $SECONDARY
metadata: $METADATA
EOC
VMLIB=/vm/lib.sh
SPLITMIRROR_VM=1
export PRIMARY SECONDARY METADATA SPARE SCRATCH CONFIG VMLIB SPLITMIRROR_VM
# Let Rust panics say where
export RUST_BACKTRACE=1
# the console is a tty: without this env_logger colours the logs
export RUST_LOG_STYLE=never

T=$(cat /vm/timeout)
NAME=$(cat /vm/name)
cd "$SCRATCH"
echo "SPLITMIRROR-VM-START name=$NAME timeout=${T}s uptime=$(cut -d' ' -f1 /proc/uptime)"
# Own session + process group, so the watchdog can kill everything it started.
# Output goes through a fifo, not straight to the console: the scenario's
# commands then see a pipe, not a terminal (no progress bars or colours in
# the log, as on CI), and cat copies it to the console.
mkfifo /run/scenario.out
cat /run/scenario.out &
catpid=$!
setsid sh /vm/scenario.sh </dev/null >/run/scenario.out 2>&1 &
pid=$!
(
  sleep "$T"
  echo "vm-init: scenario $NAME exceeded its time limit of ${T}s; killing it"
  : >/run/timed-out
  kill -TERM -"$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
  sleep 5
  kill -KILL -"$pid" 2>/dev/null
  sleep 5
  result 124 timeout=1
) &
wd=$!
wait "$pid"
rc=$?
kill "$wd" 2>/dev/null
# let cat drain the fifo before the result line; bounded, because a process
# the scenario left behind (e.g. a server after a failure) keeps it open
i=0
while kill -0 "$catpid" 2>/dev/null && [ $i -lt 30 ]; do sleep 0.1; i=$((i + 1)); done
# killed by the watchdog: report the timeout, not the signal's exit status
[ -e /run/timed-out ] && result 124 timeout=1
result "$rc"
EOF
  chmod 755 "$1"
}

# ---------------------------------------------------------------- build once per run
t0=$SECONDS
exec 9>"$CACHE/lock"
flock 9
fetch_kernel || { flock -u 9; setup_fail "could not fetch the kernel"; }
KEY=$(base_inputs | sha256sum | cut -c1-16)
BASE=$CACHE/base-$KVER-$KEY.cpio
if [ ! -s "$BASE" ]; then
  log "vm: building base initramfs for $KVER"
  build_base "$BASE" || { flock -u 9; setup_fail "could not build the base initramfs"; }
  # drop stale bases
  for f in "$CACHE"/base-*.cpio "$CACHE"/base-*.cpio.gz; do [ "$f" = "$BASE" ] || rm -f "$f"; done
fi
flock -u 9
log "vm: kernel $KVER ($(tr '\n' ' ' <"$KDIR/package")), base initramfs $(du -h "$BASE" | cut -f1), ready in $((SECONDS - t0))s"

# per-run overlay: /init, lib.sh, splitmirror
OV=$WORK/overlay
mkdir -p "$OV/usr/local/bin" "$OV/vm"
write_init "$OV/init"
cp "$SCRIPT_DIR/lib.sh" "$OV/vm/lib.sh"
if strip --strip-debug -o "$OV/usr/local/bin/splitmirror" "$BIN" 2>/dev/null; then :; else cp "$BIN" "$OV/usr/local/bin/splitmirror"; fi
chmod 755 "$OV/usr/local/bin/splitmirror"
# log-replay (the dm-log-writes replay tool of the power-cut scenario) is
# built with splitmirror; with SPLITMIRROR_BIN, the one next to it if any.
LOG_REPLAY=$(dirname "$BIN")/log-replay
if [ -x "$LOG_REPLAY" ]; then
  strip --strip-debug -o "$OV/usr/local/bin/log-replay" "$LOG_REPLAY" 2>/dev/null || cp "$LOG_REPLAY" "$OV/usr/local/bin/log-replay"
  chmod 755 "$OV/usr/local/bin/log-replay"
else
  log "vm: note: no $LOG_REPLAY; scenarios that replay a write log will fail"
fi
# a dynamically linked binary (e.g. SPLITMIRROR_BIN=/bin/true) still runs: bring its libraries
overlay_libs() { # $1 = binary
  # not grep -q: see the static check above (it made copying perf's
  # libraries fail now and then)
  if ldd "$1" 2>/dev/null | grep '=>' >/dev/null; then
    log "vm: note: $1 is dynamically linked; copying its libraries"
    for l in $(ldd "$1" | awk '/=> \//{print $3} /^[[:space:]]*\//{print $1}'); do
      [ -e "$OV$l" ] || { mkdir -p "$OV$(dirname "$l")"; cp -L "$l" "$OV$l"; }
    done
  fi
}
overlay_libs "$BIN"
# SPLITMIRROR_VM_EXTRA_BINS="path ...": more executables for the guest's
# /usr/local/bin, under their own names (benches/vm-perf.sh brings rublk).
read -r -a EXTRA_BINS <<<"${SPLITMIRROR_VM_EXTRA_BINS:-}"
for x in "${EXTRA_BINS[@]}"; do
  { [ -f "$x" ] && [ -x "$x" ]; } || setup_fail "SPLITMIRROR_VM_EXTRA_BINS: $x is not an executable file"
  cp -L "$x" "$OV/usr/local/bin/$(basename "$x")" || setup_fail "cannot copy $x into the overlay"
  overlay_libs "$x"
done
( cd "$OV" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet ) >"$WORK/run.cpio" \
  || setup_fail "could not pack the run overlay"

KERNEL=$KDIR/vmlinuz

# extra qemu arguments, split on blanks (e.g. "-d guest_errors")
read -r -a QEMU_EXTRA <<<"${SPLITMIRROR_VM_QEMU_ARGS:-}"
# qboot (qemu-system-data) only jumps to the kernel: no option ROMs, no boot
# menu, and it loads the initrd by DMA; with -nic none (no iPXE ROM) and
# -vga none a boot is ~2 s shorter than with SeaBIOS (see README.md).
BIOS_ARGS=()
QBOOT=${SPLITMIRROR_VM_BIOS-/usr/share/qemu/qboot.rom}
if [ -n "$QBOOT" ]; then
  [ -f "$QBOOT" ] || setup_fail "$QBOOT missing (install qemu-system-data, or SPLITMIRROR_VM_BIOS= for SeaBIOS)"
  BIOS_ARGS=(-bios "$QBOOT")
fi

# ---------------------------------------------------------------- run scenarios
scenario_timeout() {
  local t
  t=$(sed -n '1,30{s/^#[[:space:]]*timeout:[[:space:]]*\([0-9][0-9]*\).*/\1/p}' "$1" | head -n 1)
  echo "${t:-$DEFAULT_TIMEOUT}"
}

# The first line of a guest kernel's crash report on the console
KERNEL_CRASH_RE='\] (Oops|BUG|general protection fault)|Kernel panic - not syncing'
# True when the guest kernel oopsed or panicked before the scenario printed
# its result, and no frame of the trace is ublk_drv's (the "Modules linked
# in" line always names it, so only "function+0x../0x.." frames count).
guest_kernel_crashed() {
  grep -aq 'SPLITMIRROR-VM-RESULT' "$1" && return 1
  grep -aqE "$KERNEL_CRASH_RE" "$1" || return 1
  ! sed -n '/SPLITMIRROR-VM-START/,$p' "$1" | grep -aqE 'ublk[a-z0-9_]*\+0x[0-9a-f]+/0x'
}
# The first lines of the guest's kernel report, or the log's tail
crash_excerpt() {
  grep -aE -m 1 -A 14 "$KERNEL_CRASH_RE" "$1" || tail -n 8 "$1"
}

passed=0 failed=0 retried=0
SUMMARY=$LOGDIR/summary.txt
echo "kernel $KVER; $(date -u +%FT%TZ)" >"$SUMMARY"
for s in "${SCENARIOS[@]}"; do
  name=$(basename "$s" .sh)
  tmo=$(scenario_timeout "$s")
  sw=$WORK/$name
  rm -rf "$sw"; mkdir -p "$sw/cpio/vm"
  cp "$s" "$sw/cpio/vm/scenario.sh"
  echo "$tmo" >"$sw/cpio/vm/timeout"
  echo "$name" >"$sw/cpio/vm/name"
  ( cd "$sw/cpio" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet ) >"$sw/scen.cpio"
  cat "$BASE" "$WORK/run.cpio" "$sw/scen.cpio" >"$sw/initrd.cpio"
  truncate -s "${DISK_MIB}M" "$sw/primary.img" "$sw/secondary.img" "$sw/spare.img"
  truncate -s "${META_MIB}M" "$sw/metadata.img"
  logf=$LOGDIR/$name.log
  start=$SECONDS
  # A guest that dies before the scenario's START marker (TCG has crashed
  # Debian's kernel in early boot, in scheduler init) never ran any of
  # splitmirror; a guest kernel that crashed mid-scenario with no ublk_drv
  # function in its trace (CI has seen a slab allocation fault under a
  # dm-linear read, with an impossible EFLAGS value) died of the emulated
  # machine, not of a result. Either is booted once more, loudly, with the
  # first log kept; a second death fails. A scenario that printed its
  # result, or a crash through ublk_drv's code, is never retried.
  # cache=unsafe: the guest still sees a volatile write cache and sends
  # flushes exactly as with cache=none; only the host skips fsync for these
  # throwaway files. It avoids O_DIRECT on the host (not every CI filesystem
  # supports it, e.g. tmpfs) and is the fastest.
  # --foreground: qemu stays in our process group, so Ctrl-C (or killing
  # run.sh's group) stops it too instead of leaving an orphan VM running
  for attempt in 1 2; do
    timeout --foreground -k 10 $((tmo + BOOT_MARGIN)) qemu-system-x86_64 \
      -accel tcg -m "$VM_MEM" -smp "$VM_SMP" \
      -kernel "$KERNEL" -initrd "$sw/initrd.cpio" \
      -append "console=ttyS0 quiet panic=-1" \
      -nographic -no-reboot -nic none -vga none "${BIOS_ARGS[@]}" \
      -drive file="$sw/primary.img",if=virtio,format=raw,cache=unsafe,discard=unmap \
      -drive file="$sw/secondary.img",if=virtio,format=raw,cache=unsafe,discard=unmap \
      -drive file="$sw/metadata.img",if=virtio,format=raw,cache=unsafe,discard=unmap \
      -drive file="$sw/spare.img",if=virtio,format=raw,cache=unsafe,discard=unmap \
      "${QEMU_EXTRA[@]}" \
      </dev/null 2>&1 | sed -u 's/\r//g' >"$logf"  # -u: the log grows live (tail -f it)
    qrc=${PIPESTATUS[0]}
    if [ "$qrc" = 124 ] || [ "$qrc" = 137 ] || [ "$attempt" = 2 ]; then break; fi
    if ! grep -aq 'SPLITMIRROR-VM-START' "$logf"; then
      why="the guest died before the scenario started"
    elif guest_kernel_crashed "$logf"; then
      why="the guest kernel crashed outside ublk_drv during the scenario"
    else
      break
    fi
    echo "vm: $name: $why (qemu rc=$qrc; log kept as $logf.try1); booting it again"
    crash_excerpt "$logf" | sed 's/^/    | /'
    mv "$logf" "$logf.try1"
    echo "$name retried: $why (first log: $logf.try1)" >>"$SUMMARY"
    retried=$((retried + 1))
  done
  el=$((SECONDS - start))
  res=$(grep -a -o 'SPLITMIRROR-VM-RESULT rc=[0-9]*.*' "$logf" | head -n 1)
  rc=$(echo "$res" | sed -n 's/^SPLITMIRROR-VM-RESULT rc=\([0-9]*\).*/\1/p')
  t_init=$(grep -a -o 'SPLITMIRROR-VM-START .*uptime=[0-9.]*' "$logf" | head -n 1 | sed 's/.*uptime=//')
  t_end=$(echo "$res" | sed -n 's/.*uptime=\([0-9.]*\).*/\1/p')
  detail=""
  if [ -z "$rc" ]; then
    if [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then detail="no result: VM killed after $((tmo + BOOT_MARGIN))s"
    else detail="no result: VM did not boot or died (qemu rc=$qrc)"; fi
    rc=none
  elif echo "$res" | grep -q 'timeout=1'; then detail="timed out after ${tmo}s"
  elif echo "$res" | grep -q 'setup='; then detail="VM setup failed: $(echo "$res" | sed -n 's/.*setup=\([^ ]*\).*/\1/p')"
  fi
  if [ "$rc" = 0 ]; then
    passed=$((passed + 1))
    echo "PASS $name (${el}s)"
  else
    failed=$((failed + 1))
    echo "FAIL $name (rc=$rc, ${el}s${detail:+; $detail})"
    # tail of the scenario's output (everything after the START marker if there is one)
    if grep -q 'SPLITMIRROR-VM-START' "$logf"; then
      sed -n '/SPLITMIRROR-VM-START/,$p' "$logf" | tail -n 40 | sed 's/^/    | /'
    else
      tail -n 40 "$logf" | sed 's/^/    | /'
    fi
    echo "    full log: $logf"
  fi
  echo "$name rc=$rc elapsed=${el}s guest_start=${t_init:-?}s guest_end=${t_end:-?}s" >>"$SUMMARY"
  [ -n "${SPLITMIRROR_VM_KEEP:-}" ] || rm -rf "$sw"
done
log "vm: logs in $LOGDIR (summary.txt: per-scenario guest uptime at start/end)"
[ "$retried" -eq 0 ] || echo "vm: $retried scenario(s) booted again after the guest died outside splitmirror (see $SUMMARY)"
echo "vm: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
exit
}
