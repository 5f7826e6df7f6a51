#!/bin/sh
# timeout: 1800
# VM benchmark scenario: what the host gets during a long full restore.
# Run it through benches/vm-restore-load.sh, which prepends the parameters
# (RL_*) and boots the VM with large sparse disks (8 GiB by default) so
# that a default, unthrottled full restore outlasts each fio job.
#
# For each round, each job (4k randread / randwrite at QD1 and QD32):
#   idle       fio on the split volume, no copy running
#   restoring  `restore` (defaults: no rate limit), then fio at once; the
#              restore's progress before and after the job gives its rate
#              under that load; the state at the job's end is printed
#              (the figure only counts if it is still `restoring`)
# plus, per round, the restore's own idle rate (a restore with no host
# I/O, sampled over the same time as a job).
# With the dm-clone target in the kernel (tests/vm/run.sh loads it when the
# kernel package has it), the same jobs run on the raw primary and on
# dm-clone hydrating the primary from the secondary with its defaults, for
# each region size in RL_CLONE_REGIONS (KiB: 4, its smallest, where a 4k
# write covers a whole region and needs no copy; 128, our track size, where
# it is a merge as here), plus dm-clone's own hydration rate with no host
# I/O.
#
# Lines: "RL kind=idle|restoring|raw|dmclone round=R job=J iops=N p50=U
# p99=U p999=U cpu=P [rate=B/s state_end=S depths=D,D,...]" (kind dmcloneNk:
# dm-clone with N KiB regions; latencies: fio
# completion latency percentiles, µs; cpu: the guest's CPUs busy during
# the job, percent; depths: the tracks the copy engine
# allowed itself in flight, `status`'s operation.copy_depth, sampled every
# second during the job) and "RL kind=restore-idle|dmcloneNk-idle round=R
# rate=B/s".
. "${VMLIB:?run me through benches/vm-restore-load.sh}"

: "${RL_ROUNDS:=1}" "${RL_RUNTIME:=3}" "${RL_PRIORITY:=}" "${RL_CLONE_REGIONS:=4 128}"
: "${RL_JOBS:=randread-qd1 randwrite-qd1 randread-qd32 randwrite-qd32}"

echo "RL-INFO kernel=$(uname -r) cpus=$(grep -c ^processor /proc/cpuinfo) disk=$(dev_size "$PRIMARY") rounds=$RL_ROUNDS runtime=$RL_RUNTIME priority=${RL_PRIORITY:-default}"
# the I/O scheduler decides whether the copy's I/O priority counts
echo "RL-INFO scheduler $PRIMARY: $(cat "/sys/block/${PRIMARY#/dev/}/queue/scheduler" 2>/dev/null || echo unknown), queues: $(find "/sys/block/${PRIMARY#/dev/}/mq/" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)"

# job_file NAME: a 4k fio job "randread-qd1" etc. on ${DEV}
job_file() {
    _rw=${1%-qd*}; _qd=${1##*-qd}
    cat >"$SCRATCH/$1.fio" <<X
[global]
filename=\${DEV}
ioengine=io_uring
direct=1
time_based=1
runtime=\${RUNTIME}
ramp_time=1
randrepeat=0
norandommap=1
[$1]
rw=$_rw
bs=4k
iodepth=$_qd
X
}
for j in $RL_JOBS; do
    case $j in randread-qd*|randwrite-qd*) job_file "$j" ;; *) fail "unknown job $j" ;; esac
done

# fio_line JOB DEV: runs the job, prints "iops=N p50=U p99=U p999=U cpu=P"
# (terse output: read IOPS field 8, write 49; the completion latency
# percentiles of the read section come before the write section's)
fio_line() {
    _c0=$(cpu_ticks)
    _out=$(DEV=$2 RUNTIME=$RL_RUNTIME fio --minimal "$SCRATCH/$1.fio" 2>"$SCRATCH/fio.err") \
        || { cat "$SCRATCH/fio.err" >&2; fail "fio $1 on $2 failed"; }
    _cpu=$(echo "$_c0 $(cpu_ticks)" | awk '{ t = $3 - $1; printf "%d", (t > 0 ? 100 * (t - ($4 - $2)) / t : 0) }')
    case $1 in randread*) _sec=1 ;; *) _sec=2 ;; esac
    printf '%s\n' "$_out" | awk -F';' -v sec="$_sec" 'NF > 49 {
        iops = (sec == 1) ? $8 : $49
        n50 = 0; n99 = 0; n999 = 0
        for (i = 1; i <= NF; i++) {
            if ($i ~ /^50\.000000%=/) { n50++; if (n50 == sec) { split($i, a, "="); p50 = a[2] } }
            if ($i ~ /^99\.000000%=/) { n99++; if (n99 == sec) { split($i, a, "="); p99 = a[2] } }
            if ($i ~ /^99\.900000%=/) { n999++; if (n999 == sec) { split($i, a, "="); p999 = a[2] } }
        }
        printf "iops=%d p50=%s p99=%s p999=%s", iops, p50, p99, p999; exit }'
    echo " cpu=$_cpu"
}

# cpu_ticks: "TOTAL IDLE" jiffies of all the guest's CPUs (idle + iowait
# as idle). Under TCG the guest's CPUs are emulated on the host's: a busy
# guest is the limit of every figure here, not the disks.
cpu_ticks() {
    awk '/^cpu / { print $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9, $5 + $6; exit }' /proc/stat
}

# done_bytes: bytes the running operation has copied (0 without one)
done_bytes() {
    _d=$(json_get "done")
    case $_d in ''|null) echo 0 ;; *) echo $((_d * TRACK)) ;; esac
}
now() { cut -d' ' -f1 /proc/uptime; }

step "format --assume-clean, start with default restore settings"
run splitmirror format -c "$CONFIG" --assume-clean
set_restore_rate 0
if [ -n "$RL_PRIORITY" ]; then
    awk -v p="$RL_PRIORITY" '{ print } /^restore:/ { print "  priority: " p }' "$CONFIG" >"$CONFIG.new" \
        && mv "$CONFIG.new" "$CONFIG"
fi
start_server
expect_state established

# to_split: from established (after a finished restore) to split
to_split() {
    wait_idle 900
    expect_state established
    run sm split
    expect_state split
}

# The disks are sparse files on the host: the first write to each block
# allocates it there, so the first full restore runs slower than any later
# one. One unmeasured full restore first makes every measured one alike.
step "warm-up: one full restore allocates the host's sparse image files"
run sm split
run sm restore
wait_idle 1800

r=1
while [ $r -le "$RL_ROUNDS" ]; do
    step "round $r: idle (split)"
    to_split
    for j in $RL_JOBS; do
        echo "RL kind=idle round=$r job=$j $(fio_line "$j" "$DEVICE")"
    done
    step "round $r: the restore's idle rate"
    run sm restore
    _d0=$(done_bytes); _t0=$(now)
    sleep $((RL_RUNTIME + 1))
    _d1=$(done_bytes); _t1=$(now); _s=$(state)
    [ "$_s" = restoring ] || fail "an idle restore ended within $((RL_RUNTIME + 1)) s: use larger disks (SPLITMIRROR_VM_DISK_MIB)"
    echo "RL kind=restore-idle round=$r rate=$(echo "$_d0 $_d1 $_t0 $_t1" | awk '{ printf "%d", ($2 - $1) / ($4 - $3) }') depth=$(json_get copy_depth)"
    for j in $RL_JOBS; do
        step "round $r: $j during a full restore"
        to_split
        run sm restore
        _d0=$(done_bytes); _t0=$(now)
        # the copy engine's depth, sampled every second while fio runs
        : >"$SCRATCH/depths"
        ( while [ ! -e "$SCRATCH/fio.done" ]; do
              json_get copy_depth >>"$SCRATCH/depths" 2>/dev/null
              sleep 1
          done ) &
        _sampler=$!
        rm -f "$SCRATCH/fio.done"
        _l=$(fio_line "$j" "$DEVICE")
        _d1=$(done_bytes); _t1=$(now); _s=$(state)
        : >"$SCRATCH/fio.done"
        wait "$_sampler"
        rm -f "$SCRATCH/fio.done"
        _depths=$(tr '\n' ',' <"$SCRATCH/depths" | sed 's/,$//')
        echo "RL kind=restoring round=$r job=$j $_l rate=$(echo "$_d0 $_d1 $_t0 $_t1" | awk '{ printf "%d", ($2 - $1) / ($4 - $3) }') state_end=$_s depths=${_depths:-none}"
    done
    r=$((r + 1))
done
wait_idle 900
stop_server

if modprobe dm-clone 2>/dev/null || dmsetup targets 2>/dev/null | grep -q '^clone'; then
    step "dm-clone over the same disks"
    _sz=$(blockdev --getsz "$PRIMARY")
    # clone_start SECTORS / clone_hydrated / clone_stop: a fresh hydration
    # each time (zeroed metadata makes dm-clone start over)
    clone_start() {
        dd if=/dev/zero of="$SPARE" bs=1M count=16 oflag=direct 2>/dev/null || fail "zeroing $SPARE"
        echo "0 $_sz clone $SPARE $PRIMARY $SECONDARY $1" | dmsetup create rlclone || fail "dmsetup create clone"
        dmsetup mknodes rlclone
    }
    clone_hydrated() { dmsetup status rlclone | awk '{ split($7, a, "/"); print a[1] }'; }
    clone_stop() { dmsetup remove rlclone || fail "dmsetup remove rlclone"; }
    clone_rate() { echo "$1 $2 $3 $4 $5" | awk '{ printf "%d", ($2 - $1) * $5 * 1024 / ($4 - $3) }'; }
    for j in $RL_JOBS; do echo "RL kind=raw round=1 job=$j $(fio_line "$j" "$PRIMARY")"; done
    for _kib in $RL_CLONE_REGIONS; do
        _sec=$((_kib * 2))
        clone_start "$_sec"
        _h0=$(clone_hydrated); _t0=$(now)
        sleep $((RL_RUNTIME + 1))
        _h1=$(clone_hydrated); _t1=$(now)
        clone_stop
        echo "RL kind=dmclone${_kib}k-idle round=1 rate=$(clone_rate "$_h0" "$_h1" "$_t0" "$_t1" "$_kib")"
        for j in $RL_JOBS; do
            clone_start "$_sec"
            _h0=$(clone_hydrated); _t0=$(now)
            _l=$(fio_line "$j" /dev/mapper/rlclone)
            _h1=$(clone_hydrated); _t1=$(now)
            clone_stop
            echo "RL kind=dmclone${_kib}k round=1 job=$j $_l rate=$(clone_rate "$_h0" "$_h1" "$_t0" "$_t1" "$_kib") state_end=hydrating"
        done
    done
else
    echo "RL-INFO dm-clone: no clone target in this kernel's module set; no dm-clone figures"
fi
echo "RL-DONE"
