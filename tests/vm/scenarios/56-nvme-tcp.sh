#!/bin/sh
# timeout: 900
# A remote secondary over NVMe/TCP. The kernel's NVMe target (nvmet,
# nvmet-tcp, set up through configfs) exports the second virtio disk on
# 127.0.0.1:4420; the kernel's initiator (nvme-tcp, driven through
# /dev/nvme-fabrics: no nvme-cli) connects to it, and the namespace it
# brings, /dev/nvmeXnY, is the volume's secondary, named by a stable link
# as udev's /dev/disk/by-id would. Checked:
#   - establish, split, an incremental restore through the remote disk;
#   - the link dropped (the port's subsystem link removed on the target)
#     in the middle of an establish copy, and in the middle of mirrored
#     writes (fio with verify): `degraded`, no host I/O error; the link
#     back, `attach-secondary` copies what status recorded as changed;
#     verify finds the two sides equal;
#   - the link dropped while idle, then writes: only the written tracks
#     are copied when it is back;
#   - the controller gone at start (`secondary_missing: degraded`): the
#     volume starts degraded, the initiator reconnects, attach-secondary
#     copies only the tracks written meanwhile;
#   - another disk at the secondary's path: refused without --replace,
#     copied whole with it, and recorded (the next run accepts it);
#   - mirrored 4k random-write IOPS with the NVMe/TCP secondary and with
#     the local disk as secondary (printed for docs/operations.md);
#   - the lost-primary procedure of docs/operations.md: the secondary
#     becomes the primary, `format --force`, the device shows its data at
#     once and the new secondary is synced from it.
. "${VMLIB:?run me through tests/vm/run.sh}"

NVMET=/sys/kernel/config/nvmet
NQN=nqn.2026-11.io.splitmirror:vm-secondary
PORT=$NVMET/ports/1
# A fixed namespace UUID: the initiator's wwid, so the remote disk keeps
# its identity across reconnects (nvmet makes up a random one otherwise).
NS_UUID=6a1f0e52-8d4b-4c55-9a5e-3f2c1d0b7e91
LINK=/dev/disk/by-id/nvme-uuid.$NS_UUID
MIB=1048576

# cfs FILE VALUE: write a configfs attribute
cfs() { printf '%s\n' "$2" >"$1" || fail "cannot write '$2' to $1"; }

# connect: the initiator connects; REMOTE is the namespace's block device,
# LINK points at it (what udev's by-id rule would make)
connect() {
    cfs /dev/nvme-fabrics "transport=tcp,traddr=127.0.0.1,trsvcid=4420,nqn=$NQN,ctrl_loss_tmo=-1,reconnect_delay=1,fast_io_fail_tmo=2"
    _i=0
    REMOTE=
    while [ -z "$REMOTE" ]; do
        # (nvmeXcYnZ: a multipath member, hidden; the head is nvmeXnZ)
        for _b in /sys/block/nvme*n*; do
            case $(basename "$_b") in *c*) continue ;; esac
            [ -e "$_b/device/subsysnqn" ] || continue
            [ "$(cat "$_b/device/subsysnqn")" = "$NQN" ] && REMOTE=/dev/$(basename "$_b")
        done
        _i=$((_i + 1))
        [ $_i -le 100 ] || fail "no namespace of $NQN appeared within 10 s"
        [ -n "$REMOTE" ] || sleep 0.1
    done
    _i=0
    while [ ! -b "$REMOTE" ]; do
        _i=$((_i + 1)); [ $_i -le 50 ] || fail "$REMOTE has no device node"; sleep 0.1
    done
    CTRL=
    for _c in /sys/class/nvme/nvme*; do
        [ "$(cat "$_c/subsysnqn" 2>/dev/null)" = "$NQN" ] && CTRL=$_c
    done
    [ -n "$CTRL" ] || fail "no controller of $NQN in /sys/class/nvme"
    mkdir -p /dev/disk/by-id
    ln -sfn "$REMOTE" "$LINK"
    info "connected: $REMOTE ($(cat "/sys/block/$(basename "$REMOTE")/wwid")), $LINK -> $REMOTE"
}

ctrl_state() { cat "$CTRL/state"; }

# link_down / link_up: the target stops / starts exporting the subsystem on
# its port; the initiator's controller keeps reconnecting (ctrl_loss_tmo=-1)
# and fails I/O after fast_io_fail_tmo=2 s meanwhile
link_down() { rm "$PORT/subsystems/$NQN" || fail "cannot remove the port link"; info "link down"; }
link_up() {
    ln -s "$NVMET/subsystems/$NQN" "$PORT/subsystems/$NQN" || fail "cannot link the subsystem to the port"
    _i=0
    while [ "$(ctrl_state)" != live ]; do
        _i=$((_i + 1)); [ $_i -le 150 ] || fail "controller not live within 30 s of the link coming back ($(ctrl_state))"
        sleep 0.2
    done
    info "link up: controller $(ctrl_state)"
}

# attach_and_check [--replace] ...: attach-secondary must copy exactly the
# tracks status recorded as changed (with --replace: every track); waits,
# then checks established and nothing left
attach_and_check() {
    _c=$(json_get changed_since_split)
    [ "${1:-}" = --replace ] && _c=$ALL_TRACKS
    _out=$(sm attach-secondary "$@") || fail "attach-secondary failed (rc=$?): $_out"
    info "$_out"
    # "…; establishing, N changed tracks to copy" / "…, all N tracks to copy"
    _total=$(printf '%s\n' "$_out" | sed -n 's/.*establishing, \(all \)\{0,1\}\([0-9][0-9]*\) .*/\2/p')
    [ "$_total" = "$_c" ] || fail "attach-secondary copies '$_total' tracks, status had $_c changed"
    COPIED=$_total
    wait_idle 600
    _j=$(status_json)
    [ "$(json_get state "$_j")" = established ] || fail "not established after attach + wait: $_j"
    if [ "$(json_get changed_since_split "$_j")" != 0 ] || [ "$(json_get secondary_stale "$_j")" != 0 ]; then
        fail "tracks left after the resync: $_j"
    fi
    [ "$(json_get secondary_missing "$_j")" = false ] || fail "secondary still missing: $_j"
}

verify_equal() {
    _o=$(sm verify --json) || fail "verify found differences (rc=$?): $_o"
    info "verify: $_o"
}

# iops_now: mirrored 4k QD32 random writes for 10 s on the volume
iops_now() {
    randwrite_job "$SCRATCH/rw.fio"
    # norandommap: a block may be written again while a write to it is in
    # flight. Overlapping mirrored writes are serialized, so both devices
    # apply them in one order and the `verify` after this job is clean (it
    # once found a track that differed, before that lock).
    DEV=$DEVICE RUNTIME=10 fio --minimal "$SCRATCH/rw.fio" >"$SCRATCH/rw.out" 2>&1 \
        || { cat "$SCRATCH/rw.out"; fail "fio randwrite failed"; }
    _iops=$(write_iops "$SCRATCH/rw.out")
    case $_iops in ''|*[!0-9]*) cat "$SCRATCH/rw.out"; fail "no IOPS figure from fio" ;; esac
    echo "$_iops"
}

ALL_TRACKS=$(($(dev_size "$PRIMARY") / TRACK))

step "NVMe/TCP target on 127.0.0.1:4420 exporting $SECONDARY; the initiator connects"
for m in nvmet nvmet_tcp nvme_tcp nvme_fabrics; do
    [ -d "/sys/module/$m" ] || fail "module $m is not loaded (tests/vm/run.sh loads nvmet, nvmet-tcp and nvme-tcp from the kernel package)"
done
ip link set lo up || fail "ip link set lo up"
[ -d "$NVMET" ] || mount -t configfs none /sys/kernel/config || fail "cannot mount configfs"
[ -d "$NVMET" ] || fail "$NVMET missing with configfs mounted"
mkdir "$NVMET/subsystems/$NQN" || fail "cannot create the subsystem"
cfs "$NVMET/subsystems/$NQN/attr_allow_any_host" 1
mkdir "$NVMET/subsystems/$NQN/namespaces/1" || fail "cannot create the namespace"
cfs "$NVMET/subsystems/$NQN/namespaces/1/device_path" "$SECONDARY"
cfs "$NVMET/subsystems/$NQN/namespaces/1/device_uuid" "$NS_UUID"
cfs "$NVMET/subsystems/$NQN/namespaces/1/enable" 1
mkdir "$PORT" || fail "cannot create the port"
cfs "$PORT/addr_adrfam" ipv4
cfs "$PORT/addr_trtype" tcp
cfs "$PORT/addr_traddr" 127.0.0.1
cfs "$PORT/addr_trsvcid" 4420
ln -s "$NVMET/subsystems/$NQN" "$PORT/subsystems/$NQN" || fail "cannot link the subsystem to the port"
connect
[ "$(dev_size "$REMOTE")" = "$(dev_size "$SECONDARY")" ] || fail "$REMOTE is not the size of $SECONDARY"

step "the volume: $PRIMARY + $LINK over NVMe/TCP; format --assume-clean; run"
set_config secondary "$LINK"
cat "$CONFIG"
run splitmirror format -c "$CONFIG" --assume-clean
start_server
expect_state established
[ "$(json_get secondary_id)" = "wwid:uuid.$NS_UUID" ] || fail "secondary_id is not the namespace's wwid: $(status_json)"

step "mirrored 4k random writes, NVMe/TCP secondary (10 s)"
REMOTE_IOPS=$(iops_now) || exit 1
info "IOPS with the NVMe/TCP loopback secondary: $REMOTE_IOPS"

step "write A (16 MiB at 64 MiB): mirrored to the remote disk"
gen_file "$SCRATCH/A" 16 1
write_at "$DEVICE" $((64 * MIB)) "$SCRATCH/A"
[ "$(sha_region "$REMOTE" $((64 * MIB)) $((16 * MIB)))" = "$(sha_file "$SCRATCH/A")" ] || fail "A is not on the remote disk"

step "split, overwrite A with B, incremental restore through NVMe/TCP"
run sm split
gen_file "$SCRATCH/B" 16 2
write_at "$DEVICE" $((64 * MIB)) "$SCRATCH/B"
run sm restore --incremental
wait_idle 300
expect_state established
[ "$(sha_region "$DEVICE" $((64 * MIB)) $((16 * MIB)))" = "$(sha_file "$SCRATCH/A")" ] || fail "A is not back after the restore"
verify_equal

step "the link drops in the middle of an establish copy"
run sm split
fill_dev "$DEVICE" 128 64 3
run sm set restore.rate_limit=4MiB
run sm establish
sleep 3
expect_state syncing
link_down
wait_state degraded 60
run sm set restore.rate_limit=0
gen_file "$SCRATCH/C" 4 4
write_at "$DEVICE" $((32 * MIB)) "$SCRATCH/C"
[ "$(sha_region "$DEVICE" $((32 * MIB)) $((4 * MIB)))" = "$(sha_file "$SCRATCH/C")" ] || fail "C does not read back while degraded"
j=$(status_json); info "status: $j"
! json_empty_array errors "$j" || fail "no error shown while degraded: $j"
link_up
attach_and_check
info "re-attach after a drop during a copy: $COPIED of $ALL_TRACKS tracks copied"
verify_equal

step "the link drops in the middle of mirrored writes (fio with verify)"
ENGINE=io_uring
fio --enghelp 2>/dev/null | grep -qw io_uring || ENGINE=libaio
FIO_ARGS="--name=drop --filename=$DEVICE --offset=0 --size=64M --rw=randwrite
 --bsrange=4k-64k --iodepth=8 --ioengine=$ENGINE --direct=1
 --verify=crc32c --verify_fatal=1 --verify_backlog=64 --randseed=6 --group_reporting"
# shellcheck disable=SC2086  # FIO_ARGS is a word list on purpose
fio $FIO_ARGS --rate=4m >"$SCRATCH/fio.txt" 2>&1 &
FIO=$!
sleep 3
_alive "$FIO" || { cat "$SCRATCH/fio.txt"; fail "fio ended before the link dropped"; }
link_down
wait_state degraded 60
wait $FIO; rc=$?
grep -E 'IOPS|err=' "$SCRATCH/fio.txt"
[ $rc -eq 0 ] || { cat "$SCRATCH/fio.txt"; fail "fio exited $rc after the link dropped"; }
grep -q 'err= 0' "$SCRATCH/fio.txt" || { cat "$SCRATCH/fio.txt"; fail "fio reported I/O errors"; }
link_up
attach_and_check
info "re-attach after a drop under writes: $COPIED of $ALL_TRACKS tracks copied"
# shellcheck disable=SC2086
fio $FIO_ARGS --verify_only >"$SCRATCH/fio-v.txt" 2>&1 || { cat "$SCRATCH/fio-v.txt"; fail "fio --verify_only failed"; }
verify_equal

step "the link drops while idle, then 8 MiB are written: only those 64 tracks are copied back"
sleep 3   # write intent of the last writes cleared and flushed
link_down
gen_file "$SCRATCH/D" 8 5
write_at "$DEVICE" $((200 * MIB)) "$SCRATCH/D"
expect_state degraded
[ "$(json_get changed_since_split)" = 64 ] || fail "want 64 changed tracks after the drop: $(status_json)"
link_up
attach_and_check
[ "$COPIED" = 64 ] || fail "attach-secondary copied $COPIED tracks, want 64"
[ "$(sha_region "$REMOTE" $((200 * MIB)) $((8 * MIB)))" = "$(sha_file "$SCRATCH/D")" ] || fail "D is not on the remote disk"
verify_equal

step "stop; the controller is deleted: the secondary is gone at the next start"
stop_server
cfs "$CTRL/delete_controller" 1
rm -f "$LINK"
_i=0
while [ -b "$REMOTE" ]; do _i=$((_i + 1)); [ $_i -le 50 ] || fail "$REMOTE still there"; sleep 0.1; done
expect_rc 2 timeout 60 splitmirror run -c "$CONFIG"
printf 'secondary_missing: degraded\n' >>"$CONFIG"
start_server
j=$(status_json); info "status: $j"
[ "$(json_get state "$j")" = degraded ] || fail "not degraded with the secondary missing: $j"
[ "$(json_get secondary_missing "$j")" = true ] || fail "secondary_missing not true: $j"
[ "$(json_get changed_since_split "$j")" = 0 ] || fail "changes before any write: $j"
expect_rc 3 sm establish
expect_rc 3 sm verify
gen_file "$SCRATCH/E" 4 6
write_at "$DEVICE" $((8 * MIB)) "$SCRATCH/E"
[ "$(json_get changed_since_split)" = 32 ] || fail "want 32 changed tracks: $(status_json)"
expect_rc 2 sm attach-secondary
[ "$(json_get secondary_missing)" = true ] || fail "a failed attach must leave the secondary missing"
expect_state degraded

step "the initiator connects again: attach-secondary copies the 32 tracks written meanwhile"
connect
attach_and_check
[ "$COPIED" = 32 ] || fail "attach-secondary copied $COPIED tracks, want 32"
verify_equal

step "another disk at the secondary's path ($SPARE): refused, then --replace copies all"
link_down
write_at "$DEVICE" $((8 * MIB)) "$SCRATCH/A" 0 $((4 * MIB))
wait_state degraded 60
ln -sfn "$SPARE" "$LINK"
expect_rc 2 sm attach-secondary
attach_and_check --replace
[ "$COPIED" = "$ALL_TRACKS" ] || fail "--replace copied $COPIED tracks, want all $ALL_TRACKS"
verify_equal
stop_server
start_server
expect_state established
[ "$(json_get secondary_id)" != "wwid:uuid.$NS_UUID" ] || fail "the new secondary was not recorded: $(status_json)"
same_devs "$PRIMARY" "$SPARE" "$(($(dev_size "$PRIMARY") / MIB))"

step "mirrored 4k random writes, local virtio secondary (10 s)"
LOCAL_IOPS=$(iops_now) || exit 1
info "IOPS with the NVMe/TCP loopback secondary: $REMOTE_IOPS; with the local virtio secondary: $LOCAL_IOPS"
stop_server
echo "RESULT nvme-tcp-randwrite-iops remote=$REMOTE_IOPS local=$LOCAL_IOPS"

step "the primary is lost (docs/operations.md): its secondary $SPARE becomes the primary, $PRIMARY the new secondary"
IMAGE=$(sha_dev "$SPARE")
set_config primary "$SPARE"
set_config secondary "$PRIMARY"
run splitmirror format -c "$CONFIG" --force
start_server
[ "$(sha_dev "$DEVICE")" = "$IMAGE" ] || fail "the volume does not show the old secondary's data"
wait_idle 600
expect_state established
verify_equal
stop_server
same_devs "$SPARE" "$PRIMARY" "$(($(dev_size "$SPARE") / MIB))"
