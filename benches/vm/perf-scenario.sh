#!/bin/sh
# timeout: 1800
# VM performance scenario: splitmirror vs the raw virtio disk and rublk's
# loop target over the same disk, in one boot, interleaved and repeated.
# Run it through benches/vm-perf.sh, which prepends the parameters below
# (PERF_*) and the fio job files from benches/fio/ (written to $SCRATCH),
# boots the VM through tests/vm/run.sh with rublk in the guest, and
# summarises the "PERF ..." lines this prints.
#
# One round = every target in turn, each running every job:
#   raw        fio straight on $PRIMARY (/dev/vda)
#   rublk      rublk's loop target over $PRIMARY (/dev/ublkb$RUBLK_ID)
#   rublk-async  (only if asked for) the same with rublk's --async-await
#   established  splitmirror (primary + secondary), mirroring
#   split      splitmirror after `split`
#   restoring  splitmirror during a full `restore`, a fresh one per job
#              (rate-limited; the state and progress at the job's end are
#              printed with its figure)
# After each restoring job the server is restarted without a rate limit to
# finish the restore and its resync quickly. Content is irrelevant here: raw and rublk write to the primary
# behind splitmirror's back.
. "${VMLIB:?run me through benches/vm-perf.sh}"

: "${PERF_ROUNDS:=3}" "${PERF_RUNTIME:=5}" "${PERF_RATE:=4MiB}"
: "${PERF_JOBS:=randread-4k-qd32 randwrite-4k-qd32}"
: "${PERF_TARGETS:=raw rublk established split restoring}"
RUBLK_ID=7

for j in $PERF_JOBS; do
    [ -f "$SCRATCH/$j.fio" ] || fail "no $SCRATCH/$j.fio: run me through benches/vm-perf.sh"
done
command -v rublk >/dev/null || fail "rublk not in the guest (benches/vm-perf.sh passes it with SPLITMIRROR_VM_EXTRA_BINS)"

echo "PERF-INFO kernel=$(uname -r) cpus=$(grep -c ^processor /proc/cpuinfo) rounds=$PERF_ROUNDS runtime=$PERF_RUNTIME rate=$PERF_RATE"

# cpu_ticks PID: user + system clock ticks of a process (all its threads);
# 0 without one
cpu_ticks() {
    if [ -n "$1" ] && [ -r "/proc/$1/stat" ]; then
        sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'
    else echo 0; fi
}
# idle_ticks: idle + iowait ticks of all guest CPUs
idle_ticks() { awk '/^cpu / { print $5 + $6 }' /proc/stat; }

# measure ROUND TARGET DEV [SERVER_PID]: every job once on DEV; one PERF line
# per job. The fio jobs are time-based; terse field 8 = read IOPS, 49 =
# write IOPS. server_ticks: CPU time (1/100 s) the ublk server used during
# the job (ramp included); idle_ticks: the guest's idle CPU time meanwhile.
measure() {
    for j in ${5:-$PERF_JOBS}; do
        _c0=$(cpu_ticks "${4:-}"); _i0=$(idle_ticks); _t0=$(cut -d' ' -f1 /proc/uptime)
        _out=$(DEV=$3 RUNTIME=$PERF_RUNTIME fio --minimal "$SCRATCH/$j.fio" 2>"$SCRATCH/fio.err") \
            || { cat "$SCRATCH/fio.err" >&2; fail "fio $j on $2 ($3) failed"; }
        _iops=$(printf '%s\n' "$_out" | awk -F';' 'NF > 49 { r = $8 + $49; printf "%d\n", r; exit }')
        if [ -z "$_iops" ] || [ "$_iops" -le 0 ]; then
            printf '%s\n' "$_out" >&2; fail "fio $j on $2: no IOPS in its output"
        fi
        _c1=$(cpu_ticks "${4:-}"); _i1=$(idle_ticks); _t1=$(cut -d' ' -f1 /proc/uptime)
        _extra=
        [ "$2" = restoring ] && _extra=" state_end=$(state) restored=$(json_get "done")/$(json_get total)"
        echo "PERF round=$1 target=$2 job=$j iops=$_iops server_ticks=$((_c1 - _c0)) idle_ticks=$((_i1 - _i0)) wall=$(echo "$_t0 $_t1" | awk '{ printf "%.1f", $2 - $1 }')$_extra"
    done
}

# start_rublk ID [ARGS]: rublk's loop target over $PRIMARY as /dev/ublkbID;
# sets RUBLK_PID
start_rublk() {
    _id=$1; shift
    rublk add loop -n "$_id" -q 1 -d 128 -f "$PRIMARY" --foreground "$@" >"$SCRATCH/rublk.$_id.out" 2>&1 &
    RUBLK_PID=$!
    _i=0
    until [ -b "/dev/ublkb$_id" ]; do
        _i=$((_i + 1))
        if [ $_i -gt 300 ] || ! kill -0 "$RUBLK_PID" 2>/dev/null; then
            cat "$SCRATCH/rublk.$_id.out" >&2; fail "rublk did not create /dev/ublkb$_id"
        fi
        sleep 0.1
    done
    info "rublk pid $RUBLK_PID serves /dev/ublkb$_id (loop over $PRIMARY${*:+; $*})"
}

step "format --assume-clean; rublk loop over $PRIMARY"
run splitmirror format -c "$CONFIG" --assume-clean
set_restore_rate 0
start_server
expect_state established
start_rublk "$RUBLK_ID"
RUBLK_SYNC_PID=$RUBLK_PID
# rublk-async: the same loop target on libublk's async/await path (one task
# per tag on a smol executor), the design splitmirror's queues use
RUBLK_ASYNC_PID=
case " $PERF_TARGETS " in
    *" rublk-async "*) start_rublk $((RUBLK_ID + 1)) --async-await; RUBLK_ASYNC_PID=$RUBLK_PID ;;
esac

r=1
while [ $r -le "$PERF_ROUNDS" ]; do
    step "round $r"
    for t in $PERF_TARGETS; do
        case $t in
            raw) measure $r raw "$PRIMARY" ;;
            rublk) measure $r rublk "/dev/ublkb$RUBLK_ID" "$RUBLK_SYNC_PID" ;;
            rublk-async) measure $r rublk-async "/dev/ublkb$((RUBLK_ID + 1))" "$RUBLK_ASYNC_PID" ;;
            established)
                expect_state established
                measure $r established "$DEVICE" "$SERVER_PID" ;;
            split)
                expect_state established
                run sm split
                measure $r split "$DEVICE" "$SERVER_PID" ;;
            restoring)
                # one fresh full restore per job: random writes restore the
                # tracks they hit (merges), so one restore does not outlast
                # a randwrite job (see docs/performance.md)
                for j in $PERF_JOBS; do
                    _s=$(state)
                    [ "$_s" = split ] || run sm split
                    # the rate limit is read at `run`: restart with it
                    stop_server
                    set_restore_rate "$PERF_RATE"
                    start_server
                    run sm restore
                    expect_state restoring
                    measure $r restoring "$DEVICE" "$SERVER_PID" "$j"
                    # finish the restore and its resync without a rate limit
                    stop_server
                    set_restore_rate 0
                    start_server
                    wait_idle 600
                    expect_state established
                done ;;
            *) fail "unknown target $t" ;;
        esac
    done
    # a round without restoring leaves the volume split: back to established
    if [ "$(state)" = split ]; then run sm establish; wait_idle 600; fi
    r=$((r + 1))
done

step "done"
for p in $RUBLK_SYNC_PID $RUBLK_ASYNC_PID; do kill -TERM "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
stop_server
echo "PERF-DONE"
