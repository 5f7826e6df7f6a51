#!/bin/sh
# timeout: 900
# Faults on the data path that the `error` target cannot make (it never
# fails a FLUSH), injected with dm-flakey tables swapped live under the
# primary and the secondary:
#  1. read repair: the primary fails reads of one MiB (flakey error_reads);
#     the host reads the right bytes (from the secondary) and status counts
#     the repairs (`read_repairs`);
#  2. a primary write error while mirroring (flakey error_writes on one
#     MiB of the primary): the host gets EIO, the tracks are copied
#     primary→secondary (syncing → established), so the secondary does not
#     keep the failed write;
#  3. the secondary fails writes AND flushes (flakey error_writes fails an
#     empty FLUSH bio too): (a) idle, a host fsync succeeds and the volume
#     is degraded with the tracks its cache may hold changed (not all);
#     (b) while fio writes with fsync: degraded, fio sees no error, metadata commits go on; each time
#     the secondary is repaired and establish resyncs;
#  4. ENOSPC: a primary file on a full ext4 reaches the host as ENOSPC.
. "${VMLIB:?run me through tests/vm/run.sh}"

MIB=1048576
step "primary = dm 'pri' over $PRIMARY, secondary = dm 'sec' over $SECONDARY"
dm_linear pri "$PRIMARY"
dm_linear sec "$SECONDARY"
PS=$(blockdev --getsz "$PRIMARY")
SS=$(blockdev --getsz "$SECONDARY")
set_config primary /dev/mapper/pri
set_config secondary /dev/mapper/sec
run splitmirror format -c "$CONFIG" --assume-clean
start_server
expect_state established

# pri_fault START_MIB FEATURE: one MiB of the primary through dm-flakey
# (always down: up interval 0, down interval 1) with FEATURE, the rest linear
pri_fault() {
    _a=$(($1 * 2048)); _b=$(($1 * 2048 + 2048))
    dm_swap pri "0 $_a linear $PRIMARY 0
$_a 2048 flakey $PRIMARY $_a 0 1 1 $2
$_b $((PS - _b)) linear $PRIMARY $_b"
}

step "1. read repair: primary reads of MiB 64 fail; the host still reads its data"
gen_file "$SCRATCH/R" 1 7
write_at "$DEVICE" $((64 * MIB)) "$SCRATCH/R"
pri_fault 64 error_reads
if dd if=/dev/mapper/pri of=/dev/null bs=4096 skip=$((64 * 256)) count=1 iflag=direct 2>/dev/null; then
    fail "the flakey table does not fail reads"
fi
[ "$(sha_region "$DEVICE" $((64 * MIB)) "$MIB")" = "$(sha_file "$SCRATCH/R")" ] \
    || fail "MiB 64 does not read back while the primary fails reads there"
r=$(json_get read_repairs)
expect_num_gt "$r" 0 "read_repairs"
info "read_repairs: $r"
dm_swap pri "0 $PS linear $PRIMARY 0"
[ "$(sha_region "$PRIMARY" $((64 * MIB)) "$MIB")" = "$(sha_file "$SCRATCH/R")" ] \
    || fail "the primary does not hold MiB 64 after the repair"
expect_state established

step "2. primary write error while mirroring: EIO to the host, the secondary follows the primary"
gen_file "$SCRATCH/W" 1 8
OLD=$(sha_region "$DEVICE" $((80 * MIB)) "$MIB")
pri_fault 80 error_writes
if dd if="$SCRATCH/W" of="$DEVICE" bs=1M seek=80 count=1 oflag=direct conv=notrunc 2>"$SCRATCH/dd.err"; then
    fail "a write to a primary that fails writes succeeded"
fi
cat "$SCRATCH/dd.err"
grep -q "Input/output error" "$SCRATCH/dd.err" || fail "expected EIO for the failed primary write"
wait_state established 120
dm_swap pri "0 $PS linear $PRIMARY 0"
P80=$(sha_region "$PRIMARY" $((80 * MIB)) "$MIB")
[ "$(sha_region "$SECONDARY" $((80 * MIB)) "$MIB")" = "$P80" ] \
    || fail "the secondary differs from the primary after a failed mirrored write"
[ "$P80" = "$OLD" ] || info "the primary holds torn data at MiB 80 (allowed: the write failed)"
[ "$P80" != "$(sha_file "$SCRATCH/W")" ] || fail "the failed write is on the primary"

step "3a. idle: the secondary fails writes and flushes; a host flush (fsync) succeeds"
TRACKS=$(json_get tracks)
dm_swap sec "0 $SS flakey $SECONDARY 0 0 1 1 error_writes"
if dd if=/dev/zero of=/dev/mapper/sec bs=4096 seek=1 count=1 oflag=direct,sync conv=notrunc 2>/dev/null; then
    fail "the flakey table does not fail writes"
fi
dd if=/dev/null of="$DEVICE" count=0 conv=notrunc,fsync || fail "a host flush failed while only the secondary fails"
wait_state degraded 60
j=$(status_json); info "status: $j"
# the tracks its cache may have held are changed (under write intent, or
# cleared since its last good flush), not the whole volume; the establish
# below copies them and the devices must then be equal
_c=$(json_get changed_since_split "$j")
case $_c in ''|*[!0-9]*) fail "no changed_since_split in: $j" ;; esac
[ "$_c" -lt "$TRACKS" ] || fail "every track changed after a failed secondary flush: $j"
info "$_c of $TRACKS tracks changed after the failed flush"
case $j in *"metadata commit failing"*) fail "metadata commits fail after the secondary failed its flush: $j" ;; esac
gen_file "$SCRATCH/C" 1 4
write_at "$DEVICE" $((220 * MIB)) "$SCRATCH/C"
[ "$(sha_region "$DEVICE" $((220 * MIB)) "$MIB")" = "$(sha_file "$SCRATCH/C")" ] || fail "C does not read back"
dm_swap sec "0 $SS linear $SECONDARY 0"
run sm establish
wait_idle 300
expect_state established
cmp_devs "$PRIMARY" "$SECONDARY"

ENGINE=io_uring
fio --enghelp 2>/dev/null | grep -qw io_uring || ENGINE=libaio
FIO_ARGS="--name=flush --filename=$DEVICE --offset=0 --size=48M --rw=randwrite
 --bsrange=4k-64k --iodepth=8 --ioengine=$ENGINE --direct=1 --fsync=4
 --verify=crc32c --verify_fatal=1 --verify_backlog=64 --randseed=9 --group_reporting"

step "3b. fio randwrite+fsync+verify; after 2 s the secondary fails every write and flush"
# shellcheck disable=SC2086  # FIO_ARGS is a word list on purpose
fio $FIO_ARGS --rate=4m >"$SCRATCH/fio.txt" 2>&1 &
FIO=$!
sleep 2
_alive "$FIO" || { cat "$SCRATCH/fio.txt"; fail "fio ended before the fault was injected"; }
dm_swap sec "0 $SS flakey $SECONDARY 0 0 1 1 error_writes"
if dd if=/dev/zero of=/dev/mapper/sec bs=4096 seek=1 count=1 oflag=direct,sync conv=notrunc 2>/dev/null; then
    fail "the flakey table does not fail writes"
fi
wait_state degraded 60
wait $FIO; rc=$?
grep -E 'IOPS|err=' "$SCRATCH/fio.txt"
[ $rc -eq 0 ] || { cat "$SCRATCH/fio.txt"; fail "fio exited $rc after the secondary failed"; }
grep -q 'err= 0' "$SCRATCH/fio.txt" || { cat "$SCRATCH/fio.txt"; fail "fio reported I/O errors"; }

step "commits go on without the secondary: new writes are acknowledged, no commit error"
gen_file "$SCRATCH/B" 8 2
write_at "$DEVICE" $((200 * MIB)) "$SCRATCH/B"
sync
j=$(status_json); info "status: $j"
[ "$(json_get state "$j")" = degraded ] || fail "not degraded: $j"
case $j in *"metadata commit failing"*) fail "metadata commits fail after the secondary failed: $j" ;; esac
[ "$(sha_region "$DEVICE" $((200 * MIB)) $((8 * MIB)))" = "$(sha_file "$SCRATCH/B")" ] || fail "B does not read back"

step "the secondary comes back; establish resyncs"
dm_swap sec "0 $SS linear $SECONDARY 0"
run sm establish
wait_idle 300
expect_state established
# shellcheck disable=SC2086
fio $FIO_ARGS --verify_only >"$SCRATCH/fio-v.txt" 2>&1 || { cat "$SCRATCH/fio-v.txt"; fail "fio --verify_only failed"; }
D=$(sha_dev "$DEVICE")
stop_server
[ "$(sha_dev "$PRIMARY")" = "$D" ] || fail "primary != device content before stop"
cmp_devs "$PRIMARY" "$SECONDARY"

step "4. ENOSPC: a 128 MiB sparse primary file on a 24 MiB ext4"
SPS=$(blockdev --getsz "$SPARE")
[ "$SPS" -ge $((24 * 2048)) ] || fail "spare disk too small"
echo "0 $((24 * 2048)) linear $SPARE 0" | dmsetup create small || fail "dmsetup create small"
dmsetup mknodes small
mkfs.ext4 -q -F /dev/mapper/small || fail "mkfs.ext4"
mkdir -p /mnt/small
mount -t ext4 /dev/mapper/small /mnt/small || fail "mount"
truncate -s 128M /mnt/small/primary
set_config primary /mnt/small/primary
set_config metadata "$SCRATCH/enospc.meta"
run splitmirror format -c "$CONFIG" --assume-clean
start_server
run sm split
gen_file "$SCRATCH/F" 32 3
if dd if="$SCRATCH/F" of="$DEVICE" bs=1M oflag=direct conv=notrunc 2>"$SCRATCH/dd.err"; then
    fail "32 MiB fit on a 24 MiB filesystem"
fi
cat "$SCRATCH/dd.err"
grep -q "No space left on device" "$SCRATCH/dd.err" || fail "the host did not see ENOSPC"
stop_server
umount /mnt/small
run dmsetup remove small
run dmsetup remove pri
run dmsetup remove sec
echo "flush faults ok"
