#!/bin/sh
# timeout: 1200
# Scenario: discard and write-zeroes on /dev/ublkbN. The virtio disks under
# it take discard (qemu discard=unmap) and write-zeroes, so the device
# offers both. A discarded or zeroed range reads back as zeros, on the
# device and on both disks where they mirror, in every state:
#   - established: `blkdiscard` of whole tracks and of part of a track,
#     `blkdiscard -z` across a track boundary; both disks equal, `verify`;
#   - split: the same on the primary only, counted as changed; the
#     secondary keeps the split image;
#   - during an incremental restore: a discard of a whole pending track
#     (no copy) and of part of one (merged with the secondary's track); the
#     split image with those zeros is what the device shows at once and
#     after the restore, never the secondary's old bytes;
#   - ext4 mounted on the device: `fstrim` established, split and during a
#     restore; files kept intact, a deleted file's bytes gone from the
#     device and both disks, e2fsck clean, `verify` equal.
. "${VMLIB:?run me through tests/vm/run.sh}"

MIB=1048576
# util-linux's tools by path: busybox's shell runs its own applets first,
# and busybox's blkdiscard has no -z
BLKDISCARD=/usr/sbin/blkdiscard FSTRIM=/usr/sbin/fstrim
for t in "$BLKDISCARD" "$FSTRIM"; do [ -x "$t" ] || fail "$t missing from the VM (tests/vm/run.sh puts it there)"; done
# zero_file FILE OFFSET LEN: the same zeros in a reference image file
zero_file() {
    dd if=/dev/zero of="$1" bs=4096 seek=$(($2 / 4096)) count=$(($3 / 4096)) conv=notrunc 2>/dev/null \
        || fail "zeroing $1@$2+$3 failed"
}
# zeros DEV OFFSET LEN: fail unless the range of DEV reads as zeros
zeros() {
    _zs=$(dd if=/dev/zero bs=4096 count=$(($3 / 4096)) 2>/dev/null | sha256sum | cut -d' ' -f1)
    [ "$(sha_region "$1" "$2" "$3")" = "$_zs" ] || fail "$1 @$2+$3 does not read as zeros"
}
# first DEV: sha256 of the first $DATA_MIB MiB
first() { sha_dev "$1" "$DATA_MIB"; }
# with_rate RATE: restart the server with restore.rate_limit RATE (verify
# is throttled by it too: the restores run slowly, verify at full speed)
with_rate() {
    stop_server
    set_restore_rate "$1"
    start_server
}
verify_equal() {
    sm verify >"$SCRATCH/verify.out" 2>&1; _rc=$?
    [ "$_rc" = 0 ] || { cat "$SCRATCH/verify.out"; fail "verify failed (rc=$_rc)"; }
    info "verify: $(tail -n 1 "$SCRATCH/verify.out")"
}

step "64 MiB dm-linear maps of the disks as primary and secondary (every whole-device check reads less)"
# dm-linear passes discard and write-zeroes through, as the disks take them
for m in dp:"$PRIMARY" ds:"$SECONDARY"; do
    echo "0 131072 linear ${m#*:} 0" | dmsetup create "${m%%:*}" || fail "dmsetup create ${m%%:*}"
    dmsetup mknodes "${m%%:*}"
done
PRIMARY=/dev/mapper/dp SECONDARY=/dev/mapper/ds
set_config primary "$PRIMARY"
set_config secondary "$SECONDARY"

step "format --assume-clean; run"
run splitmirror format -c "$CONFIG" --assume-clean
set_restore_rate 0
# One track copied at a time: the rate limit then holds for a restore of a
# few dozen tracks too (a batch in flight is charged when it ends).
awk '{ print } /^restore:/ { print "  max_inflight: 1"; print "  batch: 1" }' "$CONFIG" >"$CONFIG.new" \
    && mv "$CONFIG.new" "$CONFIG"
grep -q '^  max_inflight: 1' "$CONFIG" || fail "restore.max_inflight not set in $CONFIG"
start_server
expect_state established
B=$(basename "$DEVICE")
for q in discard_max_bytes write_zeroes_max_bytes; do
    v=$(cat "/sys/block/$B/queue/$q")
    expect_num_gt "$v" 0 "$B queue/$q"
    info "$B $q = $v (vda under it: $(cat /sys/block/vda/queue/$q))"
done

DATA_MIB=16
step "established: write ${DATA_MIB} MiB of data, then discard and zero parts of it"
gen_file "$SCRATCH/E" "$DATA_MIB" 1
write_at "$DEVICE" 0 "$SCRATCH/E"
# whole tracks (1 MiB at 1 MiB), part of a track (8 KiB at 2 MiB + 4 KiB),
# write-zeroes across a track boundary (64 KiB at 3 MiB + 96 KiB)
run "$BLKDISCARD" -o $((1 * MIB)) -l $((1 * MIB)) "$DEVICE"
run "$BLKDISCARD" -o $((2 * MIB + 4096)) -l 8192 "$DEVICE"
run "$BLKDISCARD" -z -o $((3 * MIB + 98304)) -l 65536 "$DEVICE"
zero_file "$SCRATCH/E" $((1 * MIB)) $((1 * MIB))
zero_file "$SCRATCH/E" $((2 * MIB + 4096)) 8192
zero_file "$SCRATCH/E" $((3 * MIB + 98304)) 65536
SHA_E=$(sha_file "$SCRATCH/E")
for d in "$DEVICE" "$PRIMARY" "$SECONDARY"; do
    [ "$(first "$d")" = "$SHA_E" ] || { _find_bad "$d" "$SCRATCH/E"; fail "$d: not the data with the discarded ranges zeroed"; }
    zeros "$d" $((1 * MIB)) $((1 * MIB))
done
info "device, primary and secondary: the data with the three ranges zeroed"
expect_state established
verify_equal

step "split: discard a whole track and part of another, on the primary only"
run sm split
cp "$SCRATCH/E" "$SCRATCH/S"
run "$BLKDISCARD" -o $((5 * MIB)) -l $((2 * TRACK)) "$DEVICE"
run "$BLKDISCARD" -z -o $((6 * MIB + 4096)) -l 4096 "$DEVICE"
zero_file "$SCRATCH/S" $((5 * MIB)) $((2 * TRACK))
zero_file "$SCRATCH/S" $((6 * MIB + 4096)) 4096
[ "$(first "$DEVICE")" = "$(sha_file "$SCRATCH/S")" ] || fail "device after the split discards is wrong"
[ "$(first "$SECONDARY")" = "$SHA_E" ] || fail "the secondary lost its split image"
c=$(json_get changed_since_split)
[ "$c" = 3 ] || fail "changed_since_split is $c, expected 3 (two whole tracks, one partial)"
verify_equal

step "split: overwrite tracks 64..79 (8..10 MiB) so an incremental restore has pending tracks"
gen_file "$SCRATCH/W" 2 2
write_at "$DEVICE" $((8 * MIB)) "$SCRATCH/W"
# The split image with the discards made during the restore below: track
# 78 whole, and 8 KiB of track 76 (the copy goes upwards: they are among
# the last tracks it reaches, still pending when discarded).
cp "$SCRATCH/E" "$SCRATCH/R"
zero_file "$SCRATCH/R" $((78 * TRACK)) "$TRACK"
zero_file "$SCRATCH/R" $((76 * TRACK + 16384)) 8192
SHA_R=$(sha_file "$SCRATCH/R")

step "restore --incremental (19 tracks at 256 KiB/s); discard pending tracks while it runs"
with_rate 256KiB
run sm restore --incremental
expect_state restoring
pend=$(json_get restore_pending)
expect_num_gt "$pend" 10 "restore_pending right after restore"
run "$BLKDISCARD" -o $((78 * TRACK)) -l "$TRACK" "$DEVICE"
run "$BLKDISCARD" -o $((76 * TRACK + 16384)) -l 8192 "$DEVICE"
j=$(status_json)
[ "$(json_get state "$j")" = restoring ] || fail "restore ended before the discards were checked: $j"
info "status after the discards: $j"
[ "$(sha_region "$SECONDARY" $((78 * TRACK)) "$TRACK")" = "$(sha_file_region "$SCRATCH/E" $((78 * TRACK)) "$TRACK")" ] \
    || fail "the secondary was written during the restore (track 78)"
[ "$(first "$DEVICE")" = "$SHA_R" ] || { _find_bad "$DEVICE" "$SCRATCH/R"; fail "device during the restore: not the split image with the discards"; }
info "device shows the split image with the two discards at once"
wait_idle 300
expect_state established
for d in "$DEVICE" "$PRIMARY" "$SECONDARY"; do
    [ "$(first "$d")" = "$SHA_R" ] || { _find_bad "$d" "$SCRATCH/R"; fail "$d after the restore: the discarded ranges came back or data is wrong"; }
done
zeros "$DEVICE" $((78 * TRACK)) "$TRACK"
zeros "$DEVICE" $((76 * TRACK + 16384)) 8192
info "after the restore and its resync: both disks hold the split image with the discards"
with_rate 0
verify_equal

step "ext4 on the device (mkfs discards it whole), files, fstrim established"
MNT=/mnt/d
mkdir -p "$MNT"
run mkfs.ext4 -q -F "$DEVICE"
run mount -o nodiscard "$DEVICE" "$MNT"
i=1
while [ $i -le 8 ]; do gen_file "$MNT/keep$i" 2 $((10 + i)); i=$((i + 1)); done
# the marker file: its bytes must be gone from every disk after fstrim
yes SPLITMIRROR-DISCARD-MARKER | head -c $((4 * MIB)) >"$MNT/gone"
sync
( cd "$MNT" && sha256sum keep* ) >"$SCRATCH/keep.sha"
# marker_count DEV: lines of DEV holding the marker (each run of NULs made
# one line end: the zeros of a mostly empty disk are neither one 60 MiB
# line nor millions of empty ones)
marker_count() {
    dd if="$1" bs=1M iflag=direct 2>/dev/null | tr -s '\0' '\n' | grep -a -c SPLITMIRROR-DISCARD-MARKER
}
n=$(marker_count "$DEVICE")
expect_num_gt "$n" 0 "marker lines on the device before the delete"
rm "$MNT/gone"; sync
run "$FSTRIM" -v "$MNT"
for d in "$DEVICE" "$PRIMARY" "$SECONDARY"; do
    n=$(marker_count "$d")
    [ "$n" = 0 ] || fail "$d still holds the deleted file's bytes after fstrim ($n lines)"
done
info "the deleted file's bytes are gone from the device and both disks"
( cd "$MNT" && sha256sum -c "$SCRATCH/keep.sha" >/dev/null ) || fail "files changed by fstrim"
run umount "$MNT"
run e2fsck -fn "$DEVICE"
verify_equal

step "split; delete files and fstrim: the primary only"
run sm split
run mount -o nodiscard "$DEVICE" "$MNT"
rm "$MNT/keep1" "$MNT/keep2"; sync
run "$FSTRIM" -v "$MNT"
run umount "$MNT"
run e2fsck -fn "$DEVICE"
c=$(json_get changed_since_split)
expect_num_gt "$c" 0 "changed_since_split after fstrim"
verify_equal

step "restore --incremental with ext4 mounted during it: fstrim on the split image"
with_rate 512KiB
run sm restore --incremental
expect_state restoring
run mount -o nodiscard "$DEVICE" "$MNT"
( cd "$MNT" && sha256sum -c "$SCRATCH/keep.sha" >/dev/null ) || fail "the split image's files are wrong during the restore"
rm "$MNT/keep3"; sync
run "$FSTRIM" -v "$MNT"
info "state after fstrim: $(state)"
run umount "$MNT"
wait_idle 300
expect_state established
with_rate 0
run e2fsck -fn "$DEVICE"
run mount -o ro "$DEVICE" "$MNT"
grep -v keep3 "$SCRATCH/keep.sha" >"$SCRATCH/keep2.sha"
( cd "$MNT" && sha256sum -c "$SCRATCH/keep2.sha" >/dev/null ) || fail "files wrong after the restore"
[ ! -e "$MNT/keep3" ] || fail "keep3, deleted during the restore, is back"
run umount "$MNT"
verify_equal
stop_server
cmp_devs "$PRIMARY" "$SECONDARY"
echo "discard ok"
