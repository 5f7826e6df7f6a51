//! Discard and write-zeroes in the states outside a restore (the restore's
//! rules for them are claim tests in tests/claims.rs): both mean "the range
//! reads back as zeros", mirrored, tracked or degraded exactly as a write.

mod common;

use common::Harness;
use splitmirror::core::{Command, Dev, TableId, VolumeState};

const TRACK: u64 = 16 * 1024;
const TRACKS: u64 = 16;
const SIZE: u64 = TRACK * TRACKS;

fn established(seed: u64) -> (Harness, Vec<u8>) {
    common::preloaded(seed, SIZE, TRACK, VolumeState::Established)
}

/// `base` with `offset..offset+len` zeroed.
fn zeroed(base: &[u8], offset: u64, len: u64) -> Vec<u8> {
    let mut v = base.to_vec();
    v[offset as usize..(offset + len) as usize].fill(0);
    v
}

#[test]
fn established_discard_zeroes_both_devices_without_writing_them() {
    let (mut h, base) = established(1);
    // Across three tracks: a partial, a whole, a partial one.
    let (off, len) = (TRACK + 4096, 2 * TRACK);
    h.discard(off, len).unwrap();
    let want = zeroed(&base, off, len);
    assert_eq!(h.primary(), want);
    assert_eq!(h.secondary(), want, "the mirror stays identical");
    assert_eq!(h.read(0, SIZE), want);
    let log = h.disks.zero_log.borrow().clone();
    assert_eq!(
        log.iter().filter(|z| z.0 == Dev::Primary).count(),
        1,
        "{log:?}"
    );
    assert!(log.contains(&(Dev::Secondary, off, len)), "{log:?}");
    assert_eq!(h.vol.table(TableId::Changed).count(), 0);
}

#[test]
fn split_discard_goes_to_the_primary_only_and_marks_its_tracks_changed() {
    let (mut h, base) = established(2);
    h.command(Command::Split).unwrap();
    h.write_zeroes(3 * TRACK + 512, TRACK).unwrap();
    assert_eq!(h.primary(), zeroed(&base, 3 * TRACK + 512, TRACK));
    assert_eq!(h.secondary(), base, "the split image is kept");
    let changed: Vec<u64> = h.vol.table(TableId::Changed).iter_set().collect();
    assert_eq!(changed, vec![3, 4]);
    // An incremental restore brings the split image back.
    h.command(Command::Restore {
        incremental: true,
        protect: false,
    })
    .unwrap();
    h.settle();
    assert_eq!(h.primary(), base);
    assert_eq!(h.secondary(), base);
}

#[test]
fn a_secondary_failing_a_mirrored_discard_degrades_and_the_host_succeeds() {
    let (mut h, base) = established(3);
    h.disks.fail_secondary_writes.set(true);
    h.discard(5 * TRACK, TRACK).unwrap();
    assert_eq!(h.vol.state(), VolumeState::Degraded);
    assert!(
        h.vol.table(TableId::Changed).get(5),
        "tracked for establish"
    );
    assert_eq!(h.primary(), zeroed(&base, 5 * TRACK, TRACK));
    h.disks.fail_secondary_writes.set(false);
    h.command(Command::Establish { full: false }).unwrap();
    h.settle();
    assert_eq!(h.secondary(), zeroed(&base, 5 * TRACK, TRACK));
}

#[test]
fn without_fallocate_zeroing_writes_zero_buffers() {
    let (mut h, base) = established(4);
    h.disks.fallocate_unsupported.set(true);
    let writes = h.disks.write_log.borrow().len();
    h.discard(7 * TRACK, 3 * TRACK + 512).unwrap();
    h.write_zeroes(12 * TRACK, 1024).unwrap();
    let want = zeroed(&zeroed(&base, 7 * TRACK, 3 * TRACK + 512), 12 * TRACK, 1024);
    assert_eq!(h.primary(), want);
    assert_eq!(h.secondary(), want);
    assert!(h.disks.zero_log.borrow().is_empty());
    assert!(h.disks.write_log.borrow().len() >= writes + 4);
}

#[test]
fn a_primary_failing_a_discard_fails_the_request() {
    let (mut h, _) = established(5);
    h.command(Command::Split).unwrap();
    h.disks.fail_primary_writes.set(true);
    h.disks.primary_write_errno.set(libc::ENOSPC);
    let e = h.discard(0, TRACK).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
    assert!(h.vol.table(TableId::Changed).get(0));
}
