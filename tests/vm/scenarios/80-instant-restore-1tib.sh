#!/bin/sh
# timeout: 900
# Instant at any size, end to end: volumes of 1 GiB and 1 TiB on sparse
# files (ext4 on the spare disk), served through /dev/ublkbN by the real
# server with real metadata. For each: a marker block at mid-volume,
# mirrored; split; the primary's copy overwritten; `restore` (full); the
# very next read of the marker through the device must show the split
# image. Prints "INSTANT size=S restore_to_read_ms=T" (guest clock, TCG:
# compare the two sizes, not the absolute figure). Then one 1 TiB restore
# is stopped and resumed by a restart with the tables intact.
. "${VMLIB:?run me through tests/vm/run.sh}"

step "ext4 on $SPARE for the sparse files"
# 4 KiB blocks: mke2fs picks 1 KiB for a disk this small, and ext4's file
# size limit is then 16 GiB
mkfs.ext4 -q -F -b 4096 "$SPARE" || fail "mkfs.ext4 $SPARE"
mkdir -p /mnt/big
mount "$SPARE" /mnt/big || fail "mount $SPARE"

# ms since boot (10 ms resolution)
now_ms() { awk '{ printf "%d\n", $1 * 1000 }' /proc/uptime; }
block_of() { dd if=/dev/zero bs=4096 count=1 2>/dev/null | tr '\0' "$2" >"$1"; }
block_of "$SCRATCH/mark" 'S'   # the split image's block
block_of "$SCRATCH/later" 'L'  # written after the split

BASE=$CONFIG
# busybox truncate takes no T suffix: sizes in bytes
for size in 1G 1T; do
    case $size in 1G) bytes=1073741824 ;; 1T) bytes=1099511627776 ;; esac
    step "volume of $size on sparse files"
    P=/mnt/big/p-$size S=/mnt/big/s-$size M=/mnt/big/m-$size
    truncate -s "$bytes" "$P" "$S" || fail "truncate $size"
    CONFIG=$SCRATCH/big-$size.yaml
    sed -e "s|^primary:.*|primary: $P|" -e "s|^secondary:.*|secondary: $S|" \
        -e "s|^metadata:.*|metadata: $M|" "$BASE" >"$CONFIG"
    # the copy writes real blocks into the sparse primary: keep it slow
    printf 'restore:\n  rate_limit: 1MiB\n' >>"$CONFIG"
    run splitmirror format -c "$CONFIG" --assume-clean
    start_server
    expect_state established
    SZ=$(dev_size "$DEVICE")
    MID=$((SZ / 2))
    info "device $DEVICE: $SZ bytes, $(json_get tracks) tracks; marker at $MID"

    write_at "$DEVICE" "$MID" "$SCRATCH/mark"
    run sm split
    write_at "$DEVICE" "$MID" "$SCRATCH/later"
    [ "$(sha_region "$DEVICE" "$MID" 4096)" = "$(sha_file "$SCRATCH/later")" ] || fail "the post-split write does not read back"

    t0=$(now_ms)
    sm restore >/dev/null || fail "restore on $size"
    dd if="$DEVICE" of="$SCRATCH/got" bs=4096 skip=$((MID / 4096)) count=1 iflag=direct 2>/dev/null \
        || fail "read after restore on $size"
    t1=$(now_ms)
    cmp -s "$SCRATCH/got" "$SCRATCH/mark" || fail "$size: the first read after restore is not the split image"
    echo "INSTANT size=$size restore_to_read_ms=$((t1 - t0))"
    j=$(status_json)
    [ "$(json_get state "$j")" = restoring ] || fail "$size: not restoring: $j"
    pending=$(json_get restore_pending "$j")
    expect_num_gt "$pending" $(($(json_get tracks "$j") - 100)) "$size: tracks still pending"

    if [ "$size" = 1T ]; then
        step "stop mid-restore and run again: it resumes, the image is unchanged"
        stop_server
        start_server
        expect_state restoring
        [ "$(sha_region "$DEVICE" "$MID" 4096)" = "$(sha_file "$SCRATCH/mark")" ] \
            || fail "after the restart the marker is not the split image"
        p2=$(json_get restore_pending)
        expect_num_gt "$p2" $((pending - 2000)) "pending after the restart"
    fi
    stop_server
    rm -f "$P" "$S" "$M"
done
CONFIG=$BASE
umount /mnt/big
echo "instant-restore ok"
