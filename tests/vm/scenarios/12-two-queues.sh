#!/bin/sh
# timeout: 1200
# Two ublk queues (`ublk.queues: 2`), one fio job pinned to each CPU, so
# both queue threads mark and commit tracks at once: fio randwrite with
# verify while established, more writes while split, an incremental
# restore with fio writing (and verifying) on both queues during it, then
# the split image verifies with the first run's fio data, the restore's
# writes verify, the untouched rest is intact, and the mirror is equal.
. "${VMLIB:?run me through tests/vm/run.sh}"

step "format --assume-clean; run with ublk.queues 2, restore.rate_limit 8MiB"
run splitmirror format -c "$CONFIG" --assume-clean
printf 'ublk:\n  queues: 2\n' >>"$CONFIG"
set_restore_rate 8MiB
start_server
expect_state established
SIZE=$(dev_size "$DEVICE"); MIB=$((SIZE / 1048576))

ENGINE=io_uring
fio --enghelp 2>/dev/null | grep -qw io_uring || ENGINE=libaio
# fio_two SEED OFF_MIB [fio options]: two jobs, 32 MiB each at OFF_MIB and
# OFF_MIB+32, pinned to CPU 0 and CPU 1 (so to ublk queue 0 and 1)
fio_two() {
    _seed=$1; _off=$2; shift 2
    fio --rw=randwrite --bsrange=4k-64k --iodepth=16 --ioengine="$ENGINE" \
        --direct=1 --verify=crc32c --verify_fatal=1 --verify_backlog=256 \
        --randseed="$_seed" --size=32M --group_reporting "$@" \
        --name=q0 --filename="$DEVICE" --offset="${_off}M" --cpus_allowed=0 \
        --name=q1 --filename="$DEVICE" --offset="$((_off + 32))M" --cpus_allowed=1 \
        >"$SCRATCH/fio.txt" 2>&1 || { cat "$SCRATCH/fio.txt"; fail "fio (seed $_seed at ${_off} MiB $*) failed"; }
    grep -q 'err= 0' "$SCRATCH/fio.txt" || { cat "$SCRATCH/fio.txt"; fail "fio (seed $_seed $*) reported errors"; }
    info "fio seed $_seed at ${_off}..$((_off + 64)) MiB $*: ok"
}

# Both queues in use: blk-mq maps each CPU's software queue to one hardware
# queue (one ublk queue thread); debugfs lists the mapping as hctxQ/cpuN.
# fio's jobs are pinned to CPU 0 and CPU 1, so they must land on different
# queues (which CPU gets which queue is the kernel's choice: 6.12 maps CPU 0
# to queue 0, 7.3 to queue 1).
mount | grep -q ' /sys/kernel/debug ' || mount -t debugfs none /sys/kernel/debug \
    || fail "cannot mount debugfs"
DBG=/sys/kernel/debug/block/${DEVICE#/dev/}
# queue_of CPU: the hardware queue the CPU's requests go to
queue_of() {
    for _h in "$DBG"/hctx*; do
        [ -d "$_h/cpu$1" ] && { echo "${_h##*/hctx}"; return 0; }
    done
    return 1
}
Q0=$(queue_of 0) || Q0=none
Q1=$(queue_of 1) || Q1=none
if [ "$Q0" = none ] || [ "$Q1" = none ] || [ "$Q0" = "$Q1" ]; then
    find "$DBG" -name 'cpu*' >&2
    fail "CPU 0 and CPU 1 are not on two different queues of $DEVICE"
fi
info "CPU 0 -> queue $Q0, CPU 1 -> queue $Q1"

step "known data A everywhere"
gen_file "$SCRATCH/A" "$MIB" 1
write_at "$DEVICE" 0 "$SCRATCH/A"
TAIL_SHA=$(sha_file_region "$SCRATCH/A" $((128 * 1048576)) $(((MIB - 128) * 1048576)))

step "established: fio randwrite+verify on both queues, 0..64 MiB"
fio_two 42 0

step "split; fio on both queues over 0..64 MiB, and 64..128 MiB overwritten"
run sm split
expect_state split
fio_two 43 0
fill_dev "$DEVICE" 64 64 2

step "restore --incremental, at once fio on both queues over 64..128 MiB"
run sm restore --incremental
s=$(state)
[ "$s" = restoring ] || fail "state after restore is '$s', expected restoring"
fio_two 44 64
s=$(state)
case $s in restoring) info "fio ran while the copy was running" ;;
    *) info "note: the copy finished before fio did (state $s)" ;; esac

step "wait: established; the split image and the restore's writes verify"
wait_idle 300
expect_state established
fio_two 42 0 --verify_only
fio_two 44 64 --verify_only
[ "$(sha_region "$DEVICE" $((128 * 1048576)) $(((MIB - 128) * 1048576)))" = "$TAIL_SHA" ] \
    || fail "128..${MIB} MiB is no longer A"
info "128..${MIB} MiB still A"
D=$(sha_dev "$DEVICE")
stop_server
P=$(sha_dev "$PRIMARY")
[ "$P" = "$D" ] || fail "primary ($P) != device content before stop ($D)"
cmp_devs "$PRIMARY" "$SECONDARY"
echo "two-queues ok"
