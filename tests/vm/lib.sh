# Shared helpers for VM scenarios (POSIX sh, busybox). Source with:
#     . "${VMLIB:?run me through tests/vm/run.sh}"
# The VM's /init exports PRIMARY SECONDARY METADATA SPARE SCRATCH CONFIG VMLIB.
#
# Conventions: every helper fails the scenario (exit 1) with a message
# instead of returning an error, so scenarios read as straight-line steps.
# All device reads/writes use O_DIRECT so the guest page cache never serves
# stale data across split/restore.

TRACK=${TRACK:-131072}          # default track_size (128 KiB)
SERVER_PID=
DEVICE=
_srv_n=0

# fail MESSAGE... : print and exit 1 (stops a running server first, so its
# exit does not hide the message under a hung device)
fail() {
    echo "FAIL: $*" >&2
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "--- status at failure:" >&2
        timeout 10 splitmirror status -c "$CONFIG" >&2 2>&1 || true
        kill -TERM "$SERVER_PID" 2>/dev/null
    fi
    exit 1
}

step() { echo "=== $* ($(cut -d' ' -f1 /proc/uptime)s)"; }
info() { echo "    $*"; }

# run CMD...: run a command, fail with its exit code if it fails
run() {
    "$@" || fail "command failed (rc=$?): $*"
}

# expect_rc N CMD...: run a command, fail unless it exits with N
expect_rc() {
    _want=$1; shift
    "$@"; _got=$?
    [ "$_got" = "$_want" ] || fail "expected rc=$_want, got rc=$_got: $*"
}

# start_server [TIMEOUT_SECS]: `splitmirror run -c $CONFIG` in the background,
# waits (bounded) for "device: /dev/ublkbN"; sets SERVER_PID and DEVICE.
# With SERVER_ERR set, the server's log (stderr) goes to that file instead
# of the console (the caller greps it, then shows it).
start_server() {
    _t=${1:-60}
    _srv_n=$((_srv_n + 1))
    SERVER_OUT=$SCRATCH/server.$_srv_n.out
    : >"$SERVER_OUT"
    # stderr (logs) goes straight to the console log, or to $SERVER_ERR
    if [ -n "${SERVER_ERR:-}" ]; then
        splitmirror run -c "$CONFIG" >"$SERVER_OUT" 2>>"$SERVER_ERR" &
    else
        splitmirror run -c "$CONFIG" >"$SERVER_OUT" &
    fi
    SERVER_PID=$!
    _i=0
    while :; do
        DEVICE=$(sed -n 's/^device: *\(\/dev\/[^ ]*\).*/\1/p' "$SERVER_OUT" | head -n 1)
        [ -n "$DEVICE" ] && break
        if ! _alive "$SERVER_PID"; then
            wait "$SERVER_PID"; _rc=$?
            SERVER_PID=
            cat "$SERVER_OUT" >&2
            fail "splitmirror run exited (rc=$_rc) before printing 'device:'"
        fi
        _i=$((_i + 1))
        [ $_i -le $((_t * 10)) ] || { cat "$SERVER_OUT" >&2; fail "no 'device:' line from splitmirror run within ${_t}s"; }
        sleep 0.1
    done
    [ -b "$DEVICE" ] || fail "server printed device: $DEVICE but it is not a block device"
    info "server pid $SERVER_PID serves $DEVICE"
}

# _alive PID: running (not a zombie)
_alive() {
    [ -d "/proc/$1" ] || return 1
    _st=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null)
    [ "$_st" != Z ] && [ -n "$_st" ]
}

# stop_server [TIMEOUT_SECS]: SIGTERM, wait (bounded) for exit 0, device gone.
stop_server() {
    _t=${1:-60}
    [ -n "$SERVER_PID" ] || fail "stop_server: no server running"
    kill -TERM "$SERVER_PID" 2>/dev/null || fail "stop_server: server $SERVER_PID already gone"
    _i=0
    while _alive "$SERVER_PID"; do
        _i=$((_i + 1))
        if [ $_i -gt $((_t * 10)) ]; then
            _p=$SERVER_PID; SERVER_PID=
            kill -KILL "$_p" 2>/dev/null
            fail "server did not exit within ${_t}s of SIGTERM"
        fi
        sleep 0.1
    done
    wait "$SERVER_PID"; _rc=$?
    _p=$SERVER_PID; SERVER_PID=
    [ "$_rc" = 0 ] || fail "server exited rc=$_rc after SIGTERM (want 0)"
    _i=0
    while [ -e "$DEVICE" ]; do
        _i=$((_i + 1))
        [ $_i -le 50 ] || fail "$DEVICE still exists after the server exited"
        sleep 0.1
    done
    info "server $_p exited 0, $DEVICE removed"
}

# sm CMD [ARGS]: a splitmirror client command on this volume, bounded
sm() {
    _c=$1; shift
    timeout 300 splitmirror "$_c" -c "$CONFIG" "$@"
}

# status_json: print `status --json` on one line (fails the scenario on error)
status_json() {
    _j=$(timeout 30 splitmirror status --json -c "$CONFIG") || fail "status --json failed (rc=$?)"
    printf '%s\n' "$_j" | tr -d '\n'
    echo
}

# json_get KEY [JSON]: the first value of "KEY" (strings unquoted; numbers,
# true/false/null as written). JSON defaults to a fresh `status --json`.
json_get() {
    _k=$1
    if [ $# -ge 2 ]; then _j=$2; else _j=$(status_json) || exit 1; fi
    printf '%s\n' "$_j" | tr -d '\n' \
        | grep -oE "\"$_k\"[[:space:]]*:[[:space:]]*(\"[^\"]*\"|[^,}[:space:]]+)" \
        | head -n 1 \
        | sed -E "s/^\"$_k\"[[:space:]]*:[[:space:]]*//; s/^\"(.*)\"\$/\\1/"
}

state() { json_get state; }

# expect_zero_copy_by_kernel: with the default `ublk.zero_copy: auto` the
# device runs with zero copy exactly when the kernel's ublk_drv has
# automatic buffer registration (6.16 and later): status says so.
expect_zero_copy_by_kernel() {
    _v=$(uname -r | sed -E 's/^([0-9]+)\.([0-9]+).*/\1 \2/')
    # shellcheck disable=SC2086  # two words on purpose
    set -- $_v
    if [ "$1" -gt 6 ] || { [ "$1" -eq 6 ] && [ "$2" -ge 16 ]; }; then _want=true; else _want=false; fi
    _zc=$(json_get zero_copy)
    [ "$_zc" = "$_want" ] || fail "zero_copy is '$_zc' on kernel $(uname -r), expected $_want"
    info "zero copy: $_zc (kernel $(uname -r))"
}

# expect_state S: current state must be S
expect_state() {
    _s=$(state)
    [ "$_s" = "$1" ] || fail "state is '$_s', expected '$1'"
}

# wait_idle [SECS]: `splitmirror wait`, bounded
wait_idle() {
    _t=${1:-300}
    timeout "$_t" splitmirror wait -c "$CONFIG" --timeout "$_t" || fail "splitmirror wait failed (rc=$?)"
}

# sha_dev DEV [MIB [SKIP_MIB]]: sha256 of a device (or region) with O_DIRECT reads
sha_dev() {
    if [ $# -ge 2 ]; then
        dd if="$1" bs=1M count="$2" skip="${3:-0}" iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1
    else
        dd if="$1" bs=1M iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1
    fi
}

# sha_file FILE: sha256 of a file
sha_file() { sha256sum "$1" | cut -d' ' -f1; }

# _bs OFFSET LEN: the largest of 1 MiB, 128 KiB, 4 KiB dividing both. Every
# O_DIRECT request is a round trip through ublk under TCG (a few ms), so 4 KiB
# requests made a 32 MiB region take ~20 s; 1 MiB ones take ~1 s.
_bs() {
    for _bz in 1048576 131072 65536 4096; do
        if [ $(($1 % _bz)) = 0 ] && [ $(($2 % _bz)) = 0 ]; then echo $_bz; return; fi
    done
    fail "_bs: $1/$2 not 4 KiB aligned"
}

# sha_region DEV OFFSET LEN (bytes, multiples of 4096): sha256 of a byte range
sha_region() {
    _z=$(_bs "$2" "$3") || exit 1
    dd if="$1" bs="$_z" skip=$(($2 / _z)) count=$(($3 / _z)) iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1
}

# sha_file_region FILE OFFSET LEN
sha_file_region() {
    _z=$(_bs "$2" "$3") || exit 1
    dd if="$1" bs="$_z" skip=$(($2 / _z)) count=$(($3 / _z)) 2>/dev/null | sha256sum | cut -d' ' -f1
}

# write_at DEV OFFSET FILE [FILE_OFFSET LEN]: O_DIRECT write of FILE (or a
# range of it) to DEV at OFFSET (bytes, multiples of 4096), fsync'd
write_at() {
    _dev=$1; _off=$2; _src=$3
    if [ $# -ge 5 ]; then _fo=$4; _len=$5; else _fo=0; _len=$(stat -c %s "$_src"); fi
    _z=$(_bs "$_off" "$_len") || exit 1
    [ $((_fo % _z)) = 0 ] || _z=4096
    dd if="$_src" of="$_dev" bs="$_z" skip=$((_fo / _z)) count=$((_len / _z)) seek=$((_off / _z)) \
        oflag=direct conv=notrunc,fsync 2>/dev/null || fail "write of $_src to $_dev@$_off failed"
}

# patch_file FILE OFFSET SRC: the same write applied to a reference image file
patch_file() {
    dd if="$3" of="$1" bs=4096 seek=$(($2 / 4096)) conv=notrunc 2>/dev/null || fail "patch of $1 failed"
}

# dev_size DEV: size in bytes
dev_size() { blockdev --getsize64 "$1"; }

# same_devs A B [MIB]: fail unless A and B hold the same bytes (first MIB MiB)
same_devs() {
    _a=$(sha_dev "$1" ${3:+"$3"}); _b=$(sha_dev "$2" ${3:+"$3"})
    [ "$_a" = "$_b" ] || fail "$1 and $2 differ (sha256 $_a vs $_b)"
    info "$1 == $2 ($_a)"
}

# gen_file PATH MIB SEED: MIB MiB of pseudo-random data (fio's generator,
# fresh random per 1 MiB write, reproducible per SEED; much faster than
# /dev/urandom under TCG)
gen_file() {
    rm -f "$1"
    fio --name=gen --filename="$1" --size="$2"M --rw=write --bs=1M --refill_buffers \
        --randseed="$3" --ioengine=psync --output=/dev/null || fail "gen_file $1"
}

# fill_dev DEV OFFSET_MIB MIB SEED [SKIP]: O_DIRECT pseudo-random writes to a
# device region; with SKIP (e.g. 896k) fio writes 128 KiB then skips SKIP bytes,
# i.e. one 128 KiB track every 128k+SKIP
fill_dev() {
    if [ -n "${5:-}" ]; then _rw="write:$5"; _bs=128k; else _rw="write"; _bs=1M; fi
    fio --name=fill --filename="$1" --offset="$2"M --size="$3"M --rw="$_rw" --bs="$_bs" \
        --refill_buffers --randseed="$4" --ioengine=psync --direct=1 --end_fsync=1 \
        --output=/dev/null || fail "fill_dev $1 $2M+$3M failed"
}

# set_restore_rate RATE: set (or add) restore.rate_limit in $CONFIG; the
# server reads it at `run`, so call this before start_server.
set_restore_rate() {
    if grep -q '^  rate_limit:' "$CONFIG"; then
        sed -i "s/^  rate_limit:.*/  rate_limit: $1/" "$CONFIG"
    elif grep -q '^restore:' "$CONFIG"; then
        awk -v r="$1" '{ print } /^restore:/ { print "  rate_limit: " r }' "$CONFIG" >"$CONFIG.new" && mv "$CONFIG.new" "$CONFIG"
    else
        printf 'restore:\n  rate_limit: %s\n' "$1" >>"$CONFIG"
    fi
}

# restore_and_check REF T1 T2 [restore options]
#   REF: file holding the split image (= the secondary's content).
#   Runs `splitmirror restore [options]` and checks, while the restore runs:
#     - state is `restoring` when `restore` returns, operation.kind restore
#     - the device shows REF at once (probe tracks 0, T1, T2, last)
#     - a partial-track write (4 KiB at T1 + 8 KiB) and a full-track write
#       (track T2) go through
#     - the secondary's sha256 is still sha256(REF), and the state is still
#       `restoring` after that read (else the check proved nothing)
#     - the whole device reads as REF + the two writes
#   Leaves EXPECT (file: REF + the two writes) and EXPECT_SHA for the caller,
#   who then waits and checks the end state.
#   T1, T2 must be tracks the restore copies (any for a full restore,
#   changed-since-split ones for --incremental), ideally near the end so they
#   are still pending when written.
restore_and_check() {
    _ref=$1; _t1=$2; _t2=$3; shift 3
    _n=$(($(stat -c %s "$_ref") / TRACK))
    _sha_ref=$(sha_file "$_ref")
    # prepare the writes and the expected image before starting
    dd if=/dev/urandom of="$SCRATCH/p_partial" bs=4096 count=1 2>/dev/null
    dd if=/dev/urandom of="$SCRATCH/p_full" bs="$TRACK" count=1 2>/dev/null
    _off1=$((_t1 * TRACK + 8192)); _off2=$((_t2 * TRACK))
    EXPECT=$SCRATCH/expect.img
    cp "$_ref" "$EXPECT" || fail "cannot copy $_ref (tmpfs full?)"
    patch_file "$EXPECT" "$_off1" "$SCRATCH/p_partial"
    patch_file "$EXPECT" "$_off2" "$SCRATCH/p_full"
    EXPECT_SHA=$(sha_file "$EXPECT")

    step "restore $*"
    _t0=$(cut -d' ' -f1 /proc/uptime)
    sm restore "$@" || fail "splitmirror restore $* failed (rc=$?)"
    _t1s=$(cut -d' ' -f1 /proc/uptime)
    info "restore returned after $(echo "$_t0 $_t1s" | awk '{printf "%.2f", $2 - $1}')s"
    _j=$(status_json)
    info "status: $_j"
    _s=$(json_get state "$_j")
    [ "$_s" = restoring ] || fail "state right after restore is '$_s', expected 'restoring' (is restore.rate_limit honoured?)"
    [ "$(json_get kind "$_j")" = restore ] || fail "operation.kind is not restore: $_j"
    _wi=false; _wp=false
    for _a in "$@"; do
        case $_a in --incremental) _wi=true ;; --protect) _wp=true ;; esac
    done
    [ "$(json_get incremental "$_j")" = $_wi ] || fail "operation.incremental is not $_wi: $_j"
    [ "$(json_get protect "$_j")" = $_wp ] || fail "operation.protect is not $_wp: $_j"
    expect_num_gt "$(json_get restore_pending "$_j")" 0 "restore_pending right after restore"
    [ "$(json_get total "$_j")" -gt 0 ] 2>/dev/null || fail "operation.total is not a positive count: $_j"

    step "device shows the split image at once"
    for _t in 0 "$_t1" "$_t2" $((_n - 1)); do
        [ "$(sha_region "$DEVICE" $((_t * TRACK)) "$TRACK")" = "$(sha_file_region "$_ref" $((_t * TRACK)) "$TRACK")" ] \
            || fail "track $_t does not show the split image right after restore returned"
    done
    info "tracks 0 $_t1 $_t2 $((_n - 1)) match the split image"

    step "partial-track write (track $_t1 +8KiB, 4KiB) and full-track write (track $_t2) during the restore"
    write_at "$DEVICE" "$_off1" "$SCRATCH/p_partial"
    write_at "$DEVICE" "$_off2" "$SCRATCH/p_full"

    step "secondary unchanged while restoring"
    # Quick and always conclusive: the two tracks just written (the host's
    # writes must go to the primary only while restoring), read while the
    # state is still `restoring`.
    for _t in "$_t1" "$_t2"; do
        [ "$(sha_region "$SECONDARY" $((_t * TRACK)) "$TRACK")" = "$(sha_file_region "$_ref" $((_t * TRACK)) "$TRACK")" ] \
            || fail "track $_t of the secondary changed during the restore (state now $(state))"
    done
    _s=$(state)
    [ "$_s" = restoring ] || fail "restore no longer running after reading 2 tracks (state $_s): lower restore.rate_limit so the checks mean something"
    info "tracks $_t1 $_t2 of the secondary still hold the split image, state restoring"
    # Whole secondary: reading it takes ~10-20 s under TCG. Conclusive only
    # if the restore is still running afterwards: once it ends, the resync
    # legitimately copies the tracks written during it to the secondary (the
    # end state is checked by the caller).
    _sec=$(sha_dev "$SECONDARY")
    _s=$(state)
    if [ "$_s" = restoring ]; then
        [ "$_sec" = "$_sha_ref" ] || fail "secondary changed during the restore (sha256 $_sec, split image $_sha_ref)"
        info "secondary sha256 $_sec == split image, state still restoring"
    elif [ "$_sec" = "$_sha_ref" ]; then
        info "secondary sha256 $_sec == split image (state now $_s)"
    else
        info "note: restore ended while the secondary was read (state $_s); whole-secondary check inconclusive, the end state is checked later"
    fi

    step "device = split image + the two writes"
    _dev=$(sha_dev "$DEVICE")
    [ "$_dev" = "$EXPECT_SHA" ] || { _find_bad "$DEVICE" "$EXPECT"; fail "device content wrong during/after restore (sha256 $_dev, expected $EXPECT_SHA)"; }
    info "device sha256 $_dev as expected (state now $(state))"
}

# _find_bad DEV FILE: print where DEV and FILE first differ
_find_bad() {
    _o=$(dd if="$1" bs=1M iflag=direct 2>/dev/null | cmp - "$2" 2>&1)
    [ -n "$_o" ] || return 0
    echo "    cmp $1 $2: $_o" >&2
    _b=$(echo "$_o" | sed -n 's/.*char \([0-9]*\).*/\1/p')
    [ -n "$_b" ] && echo "    first difference at byte $((_b - 1)) = track $(((_b - 1) / TRACK))" >&2
}

# cmp_devs A B: fail unless the two devices hold the same bytes. Compared
# by sha256 of O_DIRECT reads (no stale page cache: the server writes with
# O_DIRECT); busybox cmp compares a byte at a time, ~60 s for 256 MiB under
# TCG, so cmp only runs on a mismatch, to say where the first difference is.
cmp_devs() {
    _a=$(sha_dev "$1"); _b=$(sha_dev "$2")
    if [ "$_a" != "$_b" ]; then
        blockdev --flushbufs "$1" "$2" 2>/dev/null
        cmp "$1" "$2" >"$SCRATCH/cmp.out" 2>&1
        cat "$SCRATCH/cmp.out" >&2
        _b=$(sed -n 's/.*char \([0-9]*\).*/\1/p' "$SCRATCH/cmp.out")
        [ -n "$_b" ] && echo "    first difference at byte $((_b - 1)) = track $(((_b - 1) / TRACK))" >&2
        fail "$1 and $2 differ"
    fi
    info "$1 == $2 (sha256 $_a)"
}

# expect_keys JSON KEY...: every KEY appears as a JSON object key
expect_keys() {
    _j=$1; shift
    for _k in "$@"; do
        printf '%s\n' "$_j" | grep -q "\"$_k\"[[:space:]]*:" || fail "status --json lacks \"$_k\": $_j"
    done
}

# json_empty_array KEY JSON: true if "KEY": []
json_empty_array() {
    printf '%s\n' "$2" | tr -d ' \n\t' | grep -q "\"$1\":\[\]"
}

# expect_num_gt VALUE MIN WHAT: VALUE is an integer > MIN
expect_num_gt() {
    case $1 in ''|*[!0-9]*) fail "$3 is '$1', not a non-negative integer" ;; esac
    [ "$1" -gt "$2" ] || fail "$3 is $1, expected > $2"
}

# wait_state S [SECS]: poll `status` until the state is S (bounded)
wait_state() {
    _t=${2:-60}; _i=0
    while :; do
        _s=$(state)
        [ "$_s" = "$1" ] && return 0
        _i=$((_i + 1))
        [ $_i -le $((_t * 5)) ] || fail "state did not become '$1' within ${_t}s (still '$_s')"
        sleep 0.2
    done
}

# set_config KEY VALUE: replace a top-level "KEY: ..." line of $CONFIG
set_config() {
    grep -q "^$1:" "$CONFIG" || fail "set_config: no top-level '$1:' in $CONFIG"
    sed -i "s|^$1:.*|$1: $2|" "$CONFIG"
}

# dm_linear NAME DEV: /dev/mapper/NAME, a linear map over all of DEV.
# busybox has no udev: mknodes creates the node (without it, writes to
# /dev/mapper/NAME would go to a regular file on the tmpfs).
dm_linear() {
    _sz=$(blockdev --getsz "$2") || fail "blockdev --getsz $2"
    echo "0 $_sz linear $2 0" | dmsetup create "$1" || fail "dmsetup create $1"
    dmsetup mknodes "$1"
    [ -b "/dev/mapper/$1" ] || fail "/dev/mapper/$1 is not a block device after mknodes"
}

# dm_swap NAME TABLE: live table swap (suspend waits for in-flight I/O;
# new I/O queues until resume, so the user of the device sees no gap)
dm_swap() {
    dmsetup suspend "$1" || fail "dmsetup suspend $1"
    echo "$2" | dmsetup reload "$1" || { dmsetup resume "$1"; fail "dmsetup reload $1 '$2'"; }
    dmsetup resume "$1" || fail "dmsetup resume $1"
    info "dm $1 now: $(dmsetup table "$1")"
}

# randwrite_job FILE: the 4k random-write QD32 fio job of the VM bench
# scenarios (benches/vm/*-scenario.sh); run it with DEV=... RUNTIME=...
randwrite_job() {
    cat >"$1" <<'X'
[global]
filename=${DEV}
ioengine=io_uring
direct=1
time_based=1
runtime=${RUNTIME}
ramp_time=2
group_reporting=1
randrepeat=0
norandommap=1
[randwrite-4k-qd32]
rw=randwrite
bs=4k
iodepth=32
X
}

# write_iops [FILE]: write IOPS from fio --minimal output (terse field 49)
write_iops() { awk -F';' '{ printf "%d", $49 }' ${1:+"$1"}; }

# proc_ticks PID: user + system CPU ticks (1/100 s) of a process
proc_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }

# ---- acknowledged files on a mounted filesystem (restart and crash scenarios)
# The caller sets MNT (mount point), ACKED (a file outside it listing the
# names acknowledged so far) and SERVER_ERR (the server's stderr).

# put NAME: a 64 KiB file of NAME lines on $MNT
put() { yes "$1" | head -c 65536 >"$MNT/$1"; }
# good NAME: $MNT/NAME exists with the content `put` wrote
good() { yes "$1" | head -c 65536 | cmp -s - "$MNT/$1"; }
# writer PREFIX COUNT: PREFIX1..COUNT, each synced, then acknowledged
writer() {
    _w=1
    while [ $_w -le "$2" ]; do
        put "$1$_w" || exit 1
        sync || exit 1
        echo "$1$_w" >>"$ACKED"
        _w=$((_w + 1))
        sleep 0.1
    done
}
# acked: how many files are acknowledged so far
acked() { if [ -f "$ACKED" ]; then wc -l <"$ACKED" | tr -d ' '; else echo 0; fi; }
# show_log WHEN: the server's stderr, framed
show_log() { echo "--- server log ($1):"; cat "$SERVER_ERR"; echo "---"; }
