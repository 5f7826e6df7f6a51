#!/bin/sh
# timeout: 400
# Queue-thread ceiling check (benches, not CI): 4k randwrite QD32 through
# splitmirror `established` with `ublk.queues: 1` (the default, what
# benches/vm-perf.sh compares with rublk -q 1) and with 2, alternating,
# twice. Prints "QUEUES q=N iops=I server_us_per_io=U".
#   bash tests/vm/run.sh benches/vm/queues-scenario.sh
#   grep QUEUES target/vm-logs/queues-scenario.log
. "${VMLIB:?run me through tests/vm/run.sh}"
randwrite_job "$SCRATCH/rw.fio"
run splitmirror format -c "$CONFIG" --assume-clean
cp "$CONFIG" "$SCRATCH/base.yaml"
for _round in 1 2; do
    for q in 1 2; do
        cp "$SCRATCH/base.yaml" "$CONFIG"
        printf 'ublk:\n  queues: %s\n' "$q" >>"$CONFIG"
        start_server
        # warm: every track's intent bit set and committed once
        DEV=$DEVICE RUNTIME=5 fio --minimal "$SCRATCH/rw.fio" >/dev/null || fail "fio warm-up"
        c0=$(proc_ticks "$SERVER_PID")
        o=$(DEV=$DEVICE RUNTIME=5 fio --minimal "$SCRATCH/rw.fio") || fail "fio q=$q"
        c1=$(proc_ticks "$SERVER_PID")
        n=$(printf '%s\n' "$o" | write_iops)
        echo "QUEUES q=$q iops=$n server_us_per_io=$(( (c1 - c0) * 10000 / (n * 7) ))"
        stop_server
    done
done
echo "queues ok"
