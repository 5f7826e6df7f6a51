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
#   rublk-zc   (only if asked for) the same with rublk's --zero-copy (the
#              driver's automatic buffer registration; kernels after 6.12)
#   established  splitmirror (primary + secondary), mirroring
#   split      splitmirror after `split`
#   established-copy, split-copy, restore-load-copy  (only if asked for)
#              the same with `ublk.zero_copy: off` (the server restarted
#              for them): what zero copy buys splitmirror where the driver
#              offers it
#   restoring  splitmirror during a full `restore`, a fresh one per job
#              (rate-limited; the state and progress at the job's end are
#              printed with its figure)
#   raw2       the job on $PRIMARY and on $SECONDARY at once; its figure is
#              the lower of the two per-disk IOPS (the ceiling of a
#              mirrored write), both are printed
#   dm-mirror  the kernel's dm-mirror (core log, 512 KiB regions, nosync)
#              over $PRIMARY and $SECONDARY, with the server stopped (it
#              holds the disks O_EXCL)
#   restore-load  a default, unthrottled full restore with PERF_LOAD_JOB
#              (no ramp) started with it: the host IOPS of the job and the
#              restore's time to done (state leaves `restoring`)
# The targets run in a shuffled order each round (shuf), each bringing the
# volume to the state it needs. For splitmirror's targets the PERF line also
# has the server's own counters over the job (its /metrics): ring_waits,
# the waits of its queue threads in their io_urings, and requests, the host
# requests; requests per wait is how well the queues batch.
# After each restoring job the server is restarted without a rate limit to
# finish the restore and its resync quickly. Content is irrelevant here: raw and rublk write to the primary
# behind splitmirror's back.
#
# PERF_PROFILE=1 (benches/vm-perf.sh's VM_PERF_PROFILE=1, which brings perf
# into the guest) adds one more round after the measured ones: every target
# with a server process (all but raw) runs the jobs in PERF_PROFILE_JOBS
# under a system-wide `perf record -a -e cpu-clock -g` (TCG has no PMU),
# and the reports (all CPU time by command, then the server process's own
# samples: `perf report --pid`) are printed as "PROF target=T job=J KIND
# ..." lines. That round's figures are printed as "PERF-PROF ..."
# (perturbed by perf, kept out of the summary).
# Not `perf record -p PID`: per-task events switch the perf_sched_events
# static key on and off, and that live patching of __schedule under TCG
# with 2 vCPUs killed the guest kernel (int3 oops in __schedule) at the end
# of one such recording; system-wide cpu-clock events patch nothing.
. "${VMLIB:?run me through benches/vm-perf.sh}"

: "${PERF_ROUNDS:=3}" "${PERF_RUNTIME:=5}" "${PERF_RATE:=4MiB}"
: "${PERF_JOBS:=randread-4k-qd32 randwrite-4k-qd32}"
: "${PERF_TARGETS:=raw rublk established split restoring}"
: "${PERF_PROFILE:=0}" "${PERF_PROFILE_JOBS:=randwrite-4k-qd32}" "${PERF_PROFILE_FREQ:=999}"
: "${PERF_LOAD_JOB:=randwrite-4k-qd32}"
RUBLK_ID=7
# set during the profiled round
PROFILING=

for j in $PERF_JOBS; do
    [ -f "$SCRATCH/$j.fio" ] || fail "no $SCRATCH/$j.fio: run me through benches/vm-perf.sh"
done
command -v rublk >/dev/null || fail "rublk not in the guest (benches/vm-perf.sh passes it with SPLITMIRROR_VM_EXTRA_BINS)"

echo "PERF-INFO kernel=$(uname -r) cpus=$(grep -c ^processor /proc/cpuinfo) rounds=$PERF_ROUNDS runtime=$PERF_RUNTIME rate=$PERF_RATE"

if [ "$PERF_PROFILE" = 1 ]; then
    for j in $PERF_PROFILE_JOBS; do
        [ -f "$SCRATCH/$j.fio" ] || fail "PERF_PROFILE_JOBS: no $SCRATCH/$j.fio"
    done
    command -v perf >/dev/null || fail "PERF_PROFILE=1 but perf is not in the guest (benches/vm-perf.sh passes it with SPLITMIRROR_VM_EXTRA_BINS)"
    # kernel symbols from /proc/kallsyms; any process, any event
    echo 0 >/proc/sys/kernel/kptr_restrict || fail "cannot set kernel.kptr_restrict"
    echo -1 >/proc/sys/kernel/perf_event_paranoid || fail "cannot set kernel.perf_event_paranoid"
    # fail now, not after the measured rounds, if perf cannot sample here
    perf record -q -N -a -e cpu-clock -o "$SCRATCH/perf.smoke" -- sleep 0.2 >"$SCRATCH/perf.smoke.err" 2>&1 \
        || { cat "$SCRATCH/perf.smoke.err" >&2; fail "perf record does not work in the guest"; }
    perf report -i "$SCRATCH/perf.smoke" --stdio >/dev/null 2>"$SCRATCH/perf.smoke.err" \
        || { cat "$SCRATCH/perf.smoke.err" >&2; fail "perf report does not work in the guest"; }
    rm -f "$SCRATCH/perf.smoke" "$SCRATCH/perf.smoke.err"
    echo "PERF-INFO profile=$(perf --version | tr ' ' '_') freq=$PERF_PROFILE_FREQ jobs='$PERF_PROFILE_JOBS'"
fi

# cpu_ticks PID: user + system clock ticks of a process (all its threads);
# 0 without one
cpu_ticks() {
    if [ -n "$1" ] && [ -r "/proc/$1/stat" ]; then
        sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'
    else echo 0; fi
}
# idle_ticks: idle + iowait ticks of all guest CPUs
idle_ticks() { awk '/^cpu / { print $5 + $6 }' /proc/stat; }

# prof_start TARGET JOB PID: perf record of all CPUs in the background
# until prof_stop, whose reports look at PID (the server); sets PROF_PID,
# PROF_DATA, PROF_SERVER
prof_start() {
    [ -n "$3" ] || fail "no server process to profile for $1"
    PROF_SERVER=$3
    PROF_DATA=$SCRATCH/perf.$1.$2.data
    # -N: no copy of every sampled binary into ~/.debug (tmpfs)
    perf record -N -a -F "$PERF_PROFILE_FREQ" -e cpu-clock -g -o "$PROF_DATA" \
        >"$SCRATCH/perf-record.out" 2>&1 &
    PROF_PID=$!
}

# prof_stop TARGET JOB: stop perf record, print its reports as PROF lines
prof_stop() {
    kill -INT "$PROF_PID" 2>/dev/null
    wait "$PROF_PID"
    [ -s "$PROF_DATA" ] || { cat "$SCRATCH/perf-record.out" >&2; fail "perf record of $1 during $2 wrote no data"; }
    _p="PROF target=$1 job=$2"
    sed -n "s/^\[ perf record: \(Captured.*\) \]\$/$_p record: \1/p" "$SCRATCH/perf-record.out"
    _r="$SCRATCH/perf-report.out"
    # all CPU time (both vCPUs, idle = swapper) by command
    prof_report all --no-children --sort comm >"$_r"
    head -n 10 "$_r" | sed "s/^/$_p cpu: /"
    # from here on only the server's samples, in % of them. Every sort
    # starts with pid (= thread, tid:name): perf report --pid filters whole
    # entries, so an entry merged across processes (e.g. vp_notify of fio
    # and of the server) would be dropped or kept as a whole
    # kernel vs user space: self time of [k] vs [.] symbols
    prof_report server --no-children --sort pid,sym --percent-limit 0 >"$_r"
    awk -v p="$_p" '{ for (i = 2; i <= NF; i++) if ($i == "[k]") k += $1; else if ($i == "[.]") u += $1 }
        END { printf "%s share: kernel=%.1f%% user=%.1f%%\n", p, k, u }' "$_r"
    # threads, then kernel vs user space per thread
    prof_report server --no-children --sort pid >"$_r"
    head -n 12 "$_r" | sed "s/^/$_p thread: /"
    prof_report server --no-children --sort pid,dso >"$_r"
    head -n 12 "$_r" | sed "s/^/$_p thread-dso: /"
    # hottest symbols, self time
    prof_report server --no-children --sort pid,dso,sym >"$_r"
    head -n 30 "$_r" | sed "s/^/$_p self: /"
    # where the kernel time comes from: system calls, then kernel functions
    # with their callees (kernel call chains are complete; user ones are
    # not: the binaries have no frame pointers, and what looks like a
    # kernel address among them is such garbage)
    prof_report server --children --sort pid,sym >"$_r"
    grep -E '\[k\] __(x64|do)_sys_' "$_r" | head -n 15 | sed "s/^/$_p syscall: /"
    grep -F '[k]' "$_r" | grep -vE '\[k\] (__(x64|do)_sys_|0x)' | head -n 25 | sed "s/^/$_p kernel-incl: /"
    rm -f "$PROF_DATA" "$_r"
}

# prof_report all|server ARGS: the entries of a perf report of PROF_DATA:
# of all samples, or of process PROF_SERVER's in % of them (its warnings go
# to the console; a failure fails the scenario)
prof_report() {
    _scope=$1; shift
    if [ "$_scope" = all ]; then set -- --percentage absolute "$@"
    else set -- --pid "$PROF_SERVER" --percentage relative "$@"; fi
    perf report -i "$PROF_DATA" --stdio -g none --percent-limit 0.1 "$@" \
        >"$SCRATCH/perf-report.raw" 2>"$SCRATCH/perf-report.err" \
        || { cat "$SCRATCH/perf-report.err" >&2; fail "perf report $* failed"; }
    sed 's/^/perf report: /' "$SCRATCH/perf-report.err" >&2
    grep -v -e '^#' -e '^[[:space:]]*$' "$SCRATCH/perf-report.raw"
    rm -f "$SCRATCH/perf-report.raw"
}

# server_counters: "RING_WAITS HOST_REQUESTS" from the server's /metrics
# (metrics.listen is set below; busybox's wget in the guest)
server_counters() {
    wget -q -O - "http://127.0.0.1:$METRICS_PORT/metrics" >"$SCRATCH/metrics.txt" \
        || fail "cannot read the server's /metrics"
    awk '/^splitmirror_queue_ring_waits_total/ { w = $NF }
         /^splitmirror_host_requests_total/ { r += $NF }
         END { printf "%d %d\n", w, r }' "$SCRATCH/metrics.txt"
}
METRICS_PORT=9477

# measure ROUND TARGET DEV [SERVER_PID [JOBS]]: every job once on DEV; one
# PERF line per job (PERF-PROF, under perf record, in the profiled round,
# with the profile of SERVER_PID). The fio jobs are time-based; terse field 8 = read IOPS,
# 49 = write IOPS. server_ticks: CPU time (1/100 s) the ublk server used
# during the job (ramp included); idle_ticks: the guest's idle CPU time
# meanwhile.
measure() {
    for j in ${5:-$PERF_JOBS}; do
        [ -n "$PROFILING" ] && prof_start "$2" "$j" "${4:-}"
        _m0w=0; _m0r=0; _m1w=0; _m1r=0
        [ -n "${4:-}" ] && [ "${4:-}" = "$SERVER_PID" ] && read -r _m0w _m0r <<EOF2
$(server_counters)
EOF2
        _c0=$(cpu_ticks "${4:-}"); _i0=$(idle_ticks); _t0=$(cut -d' ' -f1 /proc/uptime)
        _out=$(DEV=$3 RUNTIME=$PERF_RUNTIME fio --minimal "$SCRATCH/$j.fio" 2>"$SCRATCH/fio.err") \
            || { cat "$SCRATCH/fio.err" >&2; fail "fio $j on $2 ($3) failed"; }
        _iops=$(printf '%s\n' "$_out" | awk -F';' 'NF > 49 { r = $8 + $49; printf "%d\n", r; exit }')
        if [ -z "$_iops" ] || [ "$_iops" -le 0 ]; then
            printf '%s\n' "$_out" >&2; fail "fio $j on $2: no IOPS in its output"
        fi
        _c1=$(cpu_ticks "${4:-}"); _i1=$(idle_ticks); _t1=$(cut -d' ' -f1 /proc/uptime)
        [ -n "${4:-}" ] && [ "${4:-}" = "$SERVER_PID" ] && read -r _m1w _m1r <<EOF2
$(server_counters)
EOF2
        _extra=
        # splitmirror's own counters: host requests per wait of its queue
        # threads in their rings (the batching)
        if [ -n "${4:-}" ] && [ "${4:-}" = "$SERVER_PID" ]; then
            _extra=" ring_waits=$((_m1w - _m0w)) requests=$((_m1r - _m0r))"
        fi
        [ "$2" = restoring ] && _extra=" state_end=$(state) restored=$(json_get "done")/$(json_get total)"
        echo "PERF${PROFILING:+-PROF} round=$1 target=$2 job=$j iops=$_iops server_ticks=$((_c1 - _c0)) idle_ticks=$((_i1 - _i0)) wall=$(echo "$_t0 $_t1" | awk '{ printf "%.1f", $2 - $1 }')$_extra"
        [ -n "$PROFILING" ] && prof_stop "$2" "$j"
    done
}

# measure_raw2 ROUND: every job on both raw disks at once; the figure is
# the lower per-disk IOPS, both are printed
measure_raw2() {
    for j in $PERF_JOBS; do
        _i0=$(idle_ticks); _t0=$(cut -d' ' -f1 /proc/uptime)
        DEV=$PRIMARY RUNTIME=$PERF_RUNTIME fio --minimal "$SCRATCH/$j.fio" >"$SCRATCH/raw2.p" 2>"$SCRATCH/raw2.p.err" &
        _fp=$!
        DEV=$SECONDARY RUNTIME=$PERF_RUNTIME fio --minimal "$SCRATCH/$j.fio" >"$SCRATCH/raw2.s" 2>"$SCRATCH/raw2.s.err" &
        _fs=$!
        wait "$_fp" || { cat "$SCRATCH/raw2.p.err" >&2; fail "fio $j on $PRIMARY (raw2) failed"; }
        wait "$_fs" || { cat "$SCRATCH/raw2.s.err" >&2; fail "fio $j on $SECONDARY (raw2) failed"; }
        _p=$(awk -F';' 'NF > 49 { printf "%d\n", $8 + $49; exit }' "$SCRATCH/raw2.p")
        _s=$(awk -F';' 'NF > 49 { printf "%d\n", $8 + $49; exit }' "$SCRATCH/raw2.s")
        { [ -n "$_p" ] && [ -n "$_s" ] && [ "$_p" -gt 0 ] && [ "$_s" -gt 0 ]; } || fail "fio $j (raw2): no IOPS"
        _min=$_p; [ "$_s" -lt "$_min" ] && _min=$_s
        _i1=$(idle_ticks); _t1=$(cut -d' ' -f1 /proc/uptime)
        echo "PERF round=$1 target=raw2 job=$j iops=$_min iops_primary=$_p iops_secondary=$_s server_ticks=0 idle_ticks=$((_i1 - _i0)) wall=$(echo "$_t0 $_t1" | awk '{ printf "%.1f", $2 - $1 }')"
    done
}

# measure_dm_mirror ROUND: every job on the kernel's dm-mirror over both
# disks; the server is stopped meanwhile (it holds them O_EXCL)
measure_dm_mirror() {
    stop_server
    _sectors=$(blockdev --getsz "$PRIMARY")
    _s2=$(blockdev --getsz "$SECONDARY")
    [ "$_s2" -lt "$_sectors" ] && _sectors=$_s2
    modprobe dm-mirror 2>/dev/null || true
    echo "0 $_sectors mirror core 2 1024 nosync 2 $PRIMARY 0 $SECONDARY 0 1 handle_errors" \
        | dmsetup create smperf-mirror || fail "dmsetup create smperf-mirror (dm-mirror)"
    dmsetup mknodes smperf-mirror
    measure "$1" dm-mirror /dev/mapper/smperf-mirror ""
    dmsetup remove smperf-mirror || fail "dmsetup remove smperf-mirror"
    start_server
}

# restore_load ROUND [TARGET]: a default full restore (no rate limit) with
# PERF_LOAD_JOB started with it, without fio's ramp; host IOPS of the job,
# time until the state leaves `restoring`; printed as TARGET (restore-load)
restore_load() {
    to_state split
    sed 's/^ramp_time=.*/ramp_time=0/' "$SCRATCH/$PERF_LOAD_JOB.fio" >"$SCRATCH/load.fio"
    _t0=$(cut -d' ' -f1 /proc/uptime)
    DEV=$DEVICE RUNTIME=$PERF_RUNTIME fio --minimal "$SCRATCH/load.fio" >"$SCRATCH/load.out" 2>"$SCRATCH/load.err" &
    _fio=$!
    run sm restore
    while [ "$(state)" = restoring ]; do sleep 0.05; done
    _t1=$(cut -d' ' -f1 /proc/uptime)
    wait "$_fio" || { cat "$SCRATCH/load.err" >&2; fail "fio $PERF_LOAD_JOB during the restore failed"; }
    _iops=$(awk -F';' 'NF > 49 { printf "%d\n", $8 + $49; exit }' "$SCRATCH/load.out")
    { [ -n "$_iops" ] && [ "$_iops" -gt 0 ]; } || fail "fio $PERF_LOAD_JOB during the restore: no IOPS"
    echo "PERF round=$1 target=${2:-restore-load} job=$PERF_LOAD_JOB iops=$_iops restore_s=$(echo "$_t0 $_t1" | awk '{ printf "%.2f", $2 - $1 }') server_ticks=0 idle_ticks=0 wall=0"
    wait_idle 600
    expect_state established
}

# set_zero_copy auto|off: ublk.zero_copy in the config (read at `run`)
set_zero_copy() {
    sed -i -e '/^ublk:$/d' -e '/^  zero_copy:/d' "$CONFIG"
    printf 'ublk:\n  zero_copy: %s\n' "$1" >>"$CONFIG"
}

# to_state established|split: brings the volume there
to_state() {
    _s=$(state)
    case $1 in
        established)
            if [ "$_s" != established ]; then
                [ "$_s" = split ] || wait_idle 600
                [ "$(state)" = split ] && run sm establish
                wait_idle 600
            fi
            expect_state established ;;
        split)
            [ "$_s" = split ] && return 0
            to_state established
            run sm split
            expect_state split ;;
    esac
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

ip link set lo up || fail "ip link set lo up (for the server's /metrics)"
printf 'metrics:\n  listen: 127.0.0.1:%s\n' "$METRICS_PORT" >>"$CONFIG"
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
# rublk-zc: the loop target with zero copy, where the driver offers it
RUBLK_ZC_PID=
case " $PERF_TARGETS " in
    *" rublk-zc "*) start_rublk $((RUBLK_ID + 2)) --zero-copy; RUBLK_ZC_PID=$RUBLK_PID ;;
esac

# round R JOBS TARGETS: every target in turn, each running every job
round() {
    # a shuffled order each round (the profiled round keeps the given one)
    _order=$3
    [ -z "$PROFILING" ] && _order=$(echo "$3" | tr ' ' '\n' | grep . | shuf | tr '\n' ' ')
    step "round $1: $_order"
    for t in $_order; do
        case $t in
            raw) measure "$1" raw "$PRIMARY" "" "$2" ;;
            rublk) measure "$1" rublk "/dev/ublkb$RUBLK_ID" "$RUBLK_SYNC_PID" "$2" ;;
            rublk-async) measure "$1" rublk-async "/dev/ublkb$((RUBLK_ID + 1))" "$RUBLK_ASYNC_PID" "$2" ;;
            rublk-zc) measure "$1" rublk-zc "/dev/ublkb$((RUBLK_ID + 2))" "$RUBLK_ZC_PID" "$2" ;;
            raw2) measure_raw2 "$1" ;;
            dm-mirror) measure_dm_mirror "$1" ;;
            restore-load) restore_load "$1" ;;
            established)
                to_state established
                measure "$1" established "$DEVICE" "$SERVER_PID" "$2" ;;
            split)
                to_state split
                measure "$1" split "$DEVICE" "$SERVER_PID" "$2" ;;
            established-copy|split-copy|restore-load-copy)
                stop_server
                set_zero_copy off
                start_server
                if [ "$t" = restore-load-copy ]; then
                    restore_load "$1" "$t"
                else
                    to_state "${t%-copy}"
                    measure "$1" "$t" "$DEVICE" "$SERVER_PID" "$2"
                fi
                stop_server
                set_zero_copy auto
                start_server ;;
            restoring)
                # one fresh full restore per job: random writes restore the
                # tracks they hit (merges), so one restore does not outlast
                # a randwrite job (see docs/performance.md)
                for j in $2; do
                    to_state split
                    # the rate limit is read at `run`: restart with it
                    stop_server
                    set_restore_rate "$PERF_RATE"
                    start_server
                    run sm restore
                    expect_state restoring
                    measure "$1" restoring "$DEVICE" "$SERVER_PID" "$j"
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
}

r=1
while [ $r -le "$PERF_ROUNDS" ]; do
    round $r "$PERF_JOBS" "$PERF_TARGETS"
    r=$((r + 1))
done

if [ "$PERF_PROFILE" = 1 ]; then
    # the profiled round: every target with a server process
    PROFILING=1
    round profile "$PERF_PROFILE_JOBS" "$(echo " $PERF_TARGETS " | sed -e 's/ raw / /' -e 's/ raw2 / /' -e 's/ dm-mirror / /' -e 's/ restore-load / /')"
    PROFILING=
fi

step "done"
for p in $RUBLK_SYNC_PID $RUBLK_ASYNC_PID $RUBLK_ZC_PID; do kill -TERM "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
stop_server
echo "PERF-DONE"
