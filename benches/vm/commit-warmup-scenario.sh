#!/bin/sh
# timeout: 400
# Commit warm-up check (benches, not CI): 4k randwrite QD32 for 5 s, twice
# in a row, in `established` and then in `split`. The first ("cold") job
# starts with the write-intent bits cleared (committer idle > 1 s) or the
# changed-since-split bits empty, so its writes wait for metadata commits
# until every track has been touched; the second ("warm") does not.
#   bash tests/vm/run.sh benches/vm/commit-warmup-scenario.sh
#   grep WARM target/vm-logs/commit-warmup-scenario.log
# Prints "WARM NAME iops=N ticks=T" (T: server CPU, 1/100 s, over the job).
. "${VMLIB:?run me through tests/vm/run.sh}"
randwrite_job "$SCRATCH/rw.fio"
job() {
    c0=$(proc_ticks "$SERVER_PID")
    o=$(DEV=$DEVICE RUNTIME=5 fio --minimal "$SCRATCH/rw.fio") || fail fio
    c1=$(proc_ticks "$SERVER_PID")
    echo "WARM $1 iops=$(printf '%s\n' "$o" | write_iops) ticks=$((c1 - c0))"
}
run splitmirror format -c "$CONFIG" --assume-clean
start_server
for i in 1 2; do
  sleep 3
  job established-cold-$i
  job established-warm-$i
  run sm split
  job split-cold-$i
  job split-warm-$i
  run sm establish; wait_idle 300
done
stop_server
