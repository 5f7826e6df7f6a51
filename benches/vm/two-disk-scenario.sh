#!/bin/sh
# timeout: 300
# Device ceiling check (benches, not CI): how many 4k random writes per
# second the VM's emulated disks take when both are written at once, which
# is what a mirrored write needs. Runs fio (4k randwrite QD32, 5 s) on the
# primary alone, then on the primary and the secondary at the same time
# (two fio processes), three times.
#   bash tests/vm/run.sh benches/vm/two-disk-scenario.sh
#   grep TWO target/vm-logs/two-disk-scenario.log
# Prints "TWO one=N" (IOPS, one disk) and "TWO both=A+B" (IOPS per disk).
. "${VMLIB:?run me through tests/vm/run.sh}"
randwrite_job "$SCRATCH/rw.fio"
for _round in 1 2 3; do
    DEV=$PRIMARY RUNTIME=5 fio --minimal "$SCRATCH/rw.fio" >"$SCRATCH/one" || fail "fio on $PRIMARY"
    echo "TWO one=$(write_iops "$SCRATCH/one")"
    DEV=$PRIMARY RUNTIME=5 fio --minimal "$SCRATCH/rw.fio" >"$SCRATCH/a" &
    A=$!
    DEV=$SECONDARY RUNTIME=5 fio --minimal "$SCRATCH/rw.fio" >"$SCRATCH/b" || fail "fio on $SECONDARY"
    wait $A || fail "fio on $PRIMARY (concurrent)"
    echo "TWO both=$(write_iops "$SCRATCH/a")+$(write_iops "$SCRATCH/b")"
done
echo "two-disk ok"
