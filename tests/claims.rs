//! One test (at least) per claim, by number: the rules as docs/design.md
//! states them ("The rules, by claim").
//! Each asserts the plan, the bits and the resulting bytes.

mod common;

use common::{pattern, Harness};
use splitmirror::core::{
    Command, Dev, DevSet, Payload, TableId, VolumeState, Wait, WriteOutcome, WriteStep,
};

const TRACK: u64 = 16 * 1024;
const TRACKS: u64 = 16;
const SIZE: u64 = TRACK * TRACKS;

const RESTORE_FULL: Command = Command::Restore {
    incremental: false,
    protect: false,
};
const RESTORE_INCR: Command = Command::Restore {
    incremental: true,
    protect: false,
};

/// An established volume holding `base` on both devices, split, then with
/// every byte overwritten by `after` through the host path.
fn split_and_overwrite(seed: u64) -> (Harness, Vec<u8>, Vec<u8>) {
    let mut h = Harness::new(seed, SIZE, TRACK, VolumeState::Established);
    let base = pattern(seed, SIZE as usize);
    h.preload(&base);
    h.command(Command::Split).unwrap();
    let after = pattern(seed + 1, SIZE as usize);
    h.write(0, &after).unwrap();
    (h, base, after)
}

/// Starts a restore with the copy engine held, so tests act mid-restore.
fn held_restore(h: &mut Harness, cmd: Command) {
    h.engine_paused.set(true);
    h.command(cmd).unwrap();
    assert_eq!(h.vol.state(), VolumeState::Restoring);
}

fn track_range(t: u64) -> std::ops::Range<usize> {
    (t * TRACK) as usize..((t + 1) * TRACK) as usize
}

#[test]
fn claim_1_restore_write_disables_secondary_copies_split_image_then_reenables() {
    let (mut h, base, _) = split_and_overwrite(1);
    let secondary_before = h.secondary();
    let written_before = h.disks.secondary_written.get();
    h.command(RESTORE_FULL).unwrap();
    // (A) the secondary is write-disabled: nothing reaches it while restoring,
    // and host I/O sees the split image at once.
    assert_eq!(h.read(0, SIZE), base);
    let vol = h.vol.clone();
    h.sched
        .run_until(common::STEP_LIMIT, || vol.state() != VolumeState::Restoring);
    assert_eq!(
        h.disks.secondary_written.get(),
        written_before,
        "secondary written during restore"
    );
    assert_eq!(h.secondary(), secondary_before);
    // (C) the tracks were copied secondary→primary.
    assert_eq!(h.primary(), base);
    // (E) after copy and updates, transfers to the secondary resume.
    h.settle();
    assert_eq!(h.vol.state(), VolumeState::Established);
    h.write(0, &[7u8; 4096]).unwrap();
    assert_eq!(&h.secondary()[..4096], &[7u8; 4096]);
}

#[test]
fn claim_1_host_updates_during_restore_land_on_primary_only() {
    let (mut h, base, _) = split_and_overwrite(2);
    held_restore(&mut h, RESTORE_FULL);
    let update = pattern(99, 4096);
    h.write(3 * TRACK + 512, &update).unwrap(); // (D)
    assert_eq!(h.secondary(), base, "secondary unchanged by the update");
    h.settle();
    let mut expect = base.clone();
    expect[(3 * TRACK + 512) as usize..(3 * TRACK + 512) as usize + 4096].copy_from_slice(&update);
    assert_eq!(h.primary(), expect);
    assert_eq!(
        h.secondary(),
        expect,
        "resync propagated the update after the restore"
    );
}

#[test]
fn claim_2_tracks_written_during_restore_are_recorded() {
    let (mut h, _, _) = split_and_overwrite(3);
    held_restore(&mut h, RESTORE_FULL);
    assert_eq!(
        h.vol.table(TableId::Changed).count(),
        0,
        "restore starts with no changes recorded"
    );
    h.write(5 * TRACK, &vec![1u8; TRACK as usize]).unwrap();
    h.write(9 * TRACK + 1024, &[2u8; 512]).unwrap();
    let changed: Vec<u64> = h.vol.table(TableId::Changed).iter_set().collect();
    assert_eq!(changed, vec![5, 9]);
    // Protected restore keeps them as "changed since split"; here the
    // unprotected one hands them to the resync.
    h.settle();
    assert_eq!(
        &h.secondary()[track_range(5)],
        &vec![1u8; TRACK as usize][..]
    );
}

#[test]
fn claim_3_copy_and_host_write_never_race_on_a_track() {
    let (mut h, _, _) = split_and_overwrite(4);
    held_restore(&mut h, RESTORE_FULL);
    let vol = h.vol.clone();
    let ticket = vol.enter().unwrap();
    let jobs = vol.next_copies(&ticket, 1);
    assert_eq!(jobs.len(), 1);
    let t = jobs[0].track;
    // The track being copied is locked: a host write on it must wait...
    assert_eq!(
        vol.plan_write(&ticket, t * TRACK, TRACK).unwrap_err(),
        Wait::Track(t)
    );
    // ...while another track proceeds.
    let other = vol
        .plan_write(&ticket, ((t + 1) % TRACKS) * TRACK, 512)
        .unwrap();
    vol.finish_write(other, WriteOutcome::default());
    // And a copy cannot take a track a host write holds.
    let held = vol.plan_write(&ticket, 7 * TRACK, TRACK).unwrap();
    assert!(vol
        .next_copies(&ticket, TRACKS as usize)
        .iter()
        .all(|j| j.track != 7));
    vol.finish_write(held, WriteOutcome::default());
    vol.finish_copy(jobs[0], false);
    assert!(vol.plan_write(&ticket, t * TRACK, TRACK).is_ok());
}

#[test]
fn claim_4_pending_track_is_primary_invalid_secondary_valid() {
    let (mut h, base, _) = split_and_overwrite(5);
    held_restore(&mut h, RESTORE_FULL);
    let vol = h.vol.clone();
    assert!(vol.table(TableId::Pending).get(2));
    let ticket = vol.enter().unwrap();
    let segs = vol.plan_read(&ticket, 2 * TRACK, TRACK);
    assert_eq!(segs.len(), 1);
    assert_eq!(segs[0].dev, Dev::Secondary);
    drop(ticket);
    assert_eq!(h.read(2 * TRACK, TRACK), base[track_range(2)].to_vec());
    // Copy before write: once the copy has run, the write sees a restored
    // track and goes straight to primary.
    let ticket = vol.enter().unwrap();
    let job = vol
        .next_copies(&ticket, 16)
        .into_iter()
        .find(|j| j.track == 2)
        .unwrap();
    drop(ticket);
    h.disks.primary.borrow_mut()[track_range(2)].copy_from_slice(&base[track_range(2)]);
    vol.finish_copy(job, true);
    assert!(
        !vol.table(TableId::Pending).get(2),
        "after the copy the track is no longer pending"
    );
    let ticket = vol.enter().unwrap();
    let plan = vol.plan_write(&ticket, 2 * TRACK + 512, 512).unwrap();
    assert!(plan.restores().is_empty());
    assert!(matches!(
        plan.steps[..],
        [WriteStep::Direct {
            devs: DevSet::PRIMARY,
            ..
        }]
    ));
    vol.finish_write(plan, WriteOutcome::default());
}

/// Claim 7 on a track the copy restored whose cleared pending bit is not
/// durable yet: the write waits for a restore log record (one metadata
/// write), not for the commit (a flush of both devices), and a second
/// write on top keeps the region's write intent: after a power cut the
/// track is not pending again, so the data may stay and needs its
/// "changed" bit (the crash simulation lost it without this).
#[test]
fn claim_7_a_write_on_a_copied_track_waits_for_a_log_record_and_keeps_its_intent() {
    let (mut h, _, _) = split_and_overwrite(8);
    held_restore(&mut h, RESTORE_FULL);
    let vol = h.vol.clone();
    assert!(vol.restore_log_enabled());
    let ticket = vol.enter().unwrap();
    let jobs = vol.next_copies(&ticket, 16);
    let job = *jobs.iter().find(|j| j.track == 2).unwrap();
    vol.finish_copy(job, true);
    let first = vol.plan_write(&ticket, 2 * TRACK + 512, 512).unwrap();
    let logged = first.on_logged.expect("a log record, not a commit");
    assert!(!vol.is_durable(logged.settle));
    let intent = first
        .commit_before_issue
        .expect("a cold region: its intent is made durable first");
    let second = vol.plan_write(&ticket, 2 * TRACK + 4096, 512).unwrap();
    assert_eq!(second.on_logged, Some(logged), "the same record");
    assert_eq!(
        second.commit_before_issue,
        Some(intent),
        "the second write waits for the first one's intent too"
    );
    vol.finish_write(first, WriteOutcome::default());
    vol.finish_write(second, WriteOutcome::default());
    for j in jobs.into_iter().filter(|j| j.track != 2) {
        vol.finish_copy(j, false);
    }
}

#[test]
fn claim_5_full_track_write_skips_copy() {
    let (mut h, _, _) = split_and_overwrite(6);
    held_restore(&mut h, RESTORE_FULL);
    let vol = h.vol.clone();
    let ticket = vol.enter().unwrap();
    let plan = vol.plan_write(&ticket, 4 * TRACK, TRACK).unwrap();
    assert!(
        matches!(plan.steps[..], [WriteStep::Direct { devs: DevSet::PRIMARY, offset, len, .. }] if offset == 4 * TRACK && len == TRACK)
    );
    assert_eq!(plan.restores(), &[4]);
    vol.finish_write(plan, WriteOutcome::default());
    drop(ticket);
    assert!(!vol.table(TableId::Pending).get(4), "marked restored");
    assert!(
        vol.table(TableId::Changed).get(4),
        "recorded as differing from the secondary"
    );
    let data = pattern(66, TRACK as usize);
    h.write(5 * TRACK, &data).unwrap();
    let copies_before = h.primary_writes_to(5 * TRACK, TRACK);
    h.engine_paused.set(false);
    let vol2 = vol.clone();
    h.sched.run_until(common::STEP_LIMIT, || {
        vol2.state() != VolumeState::Restoring
    });
    assert_eq!(
        h.primary_writes_to(5 * TRACK, TRACK),
        copies_before,
        "no copy ever touched the track"
    );
    assert_eq!(&h.primary()[track_range(5)], &data[..]);
}

#[test]
fn claim_6_partial_write_merges_secondary_track() {
    let (mut h, base, _) = split_and_overwrite(7);
    held_restore(&mut h, RESTORE_FULL);
    let vol = h.vol.clone();
    let ticket = vol.enter().unwrap();
    let plan = vol.plan_write(&ticket, 6 * TRACK + 1024, 2048).unwrap();
    assert!(
        matches!(plan.steps[..], [WriteStep::Merge { track: 6, track_offset, track_len, .. }] if track_offset == 6 * TRACK && track_len == TRACK)
    );
    vol.finish_write(
        plan,
        WriteOutcome {
            primary_failed: true,
            ..Default::default()
        },
    );
    drop(ticket);
    let host = pattern(77, 2048);
    h.write(6 * TRACK + 1024, &host).unwrap();
    let mut expect = base[track_range(6)].to_vec();
    expect[1024..3072].copy_from_slice(&host);
    assert_eq!(
        &h.primary()[track_range(6)],
        &expect[..],
        "secondary track combined with host bytes on primary"
    );
    assert!(!vol.table(TableId::Pending).get(6));
    assert_eq!(h.read(6 * TRACK, TRACK), expect);
}

/// Zero copy: the host's bytes are in a registered buffer. Where the
/// backend can copy them into the track buffer (a ublk queue's memfd
/// buffers), the merged track is one write; where it cannot, the merge
/// writes the secondary's bytes around them and the host's bytes as
/// three pieces. Either way the track is whole.
#[test]
fn claim_6_partial_write_merges_secondary_track_with_zero_copy() {
    for (copies, want) in [
        (true, vec![(0, TRACK)]),
        (false, vec![(0, 1024), (1024, 2048), (3072, TRACK - 3072)]),
    ] {
        let (mut h, base, _) = split_and_overwrite(17);
        held_restore(&mut h, RESTORE_FULL);
        h.b.copies_fixed.set(copies);
        let host = pattern(78, 2048);
        h.disks.write_log.borrow_mut().clear();
        let slot = h.spawn_write_as(6 * TRACK + 1024, host.clone(), false, true);
        h.wait(&slot).unwrap();
        let mut expect = base[track_range(6)].to_vec();
        expect[1024..3072].copy_from_slice(&host);
        assert_eq!(&h.primary()[track_range(6)], &expect[..]);
        let mut pieces: Vec<_> = h
            .disks
            .write_log
            .borrow()
            .iter()
            .filter(|(dev, off, _)| {
                *dev == Dev::Primary && track_range(6).contains(&(*off as usize))
            })
            .map(|&(_, off, len)| (off - 6 * TRACK, len))
            .collect();
        pieces.sort();
        assert_eq!(pieces, want, "copy into the track buffer: {copies}");
        assert!(!h.vol.table(TableId::Pending).get(6));
        // Claim 4 with zero copy: a pending track reads from the secondary.
        let slot = h.start_read_as(7 * TRACK, TRACK, true);
        assert_eq!(h.wait(&slot).unwrap(), &base[track_range(7)]);
        let slot = h.start_read_as(6 * TRACK, TRACK, true);
        assert_eq!(h.wait(&slot).unwrap(), expect);
    }
}

#[test]
fn claim_7_write_to_valid_primary_track_needs_no_copy() {
    let (mut h, _, _) = split_and_overwrite(8);
    // Incremental restore of only track 1: track 0 was never pending.
    h.command(Command::Establish { full: true }).unwrap();
    h.settle();
    h.command(Command::Split).unwrap();
    h.write(TRACK, &[9u8; 512]).unwrap();
    held_restore(&mut h, RESTORE_INCR);
    let vol = h.vol.clone();
    let ticket = vol.enter().unwrap();
    let plan = vol.plan_write(&ticket, 512, 512).unwrap();
    assert!(plan.restores().is_empty());
    assert!(matches!(
        plan.steps[..],
        [WriteStep::Direct {
            devs: DevSet::PRIMARY,
            ..
        }]
    ));
    vol.finish_write(plan, WriteOutcome::default());
    drop(ticket);
    let before = h.primary_writes_to(0, TRACK);
    h.write(1024, &[3u8; 512]).unwrap();
    assert_eq!(
        h.primary_writes_to(0, TRACK),
        before + 1,
        "one direct write, no copy"
    );
}

#[test]
fn claim_8_partial_write_before_copy_does_not_mark_restored_early() {
    let (mut h, _, _) = split_and_overwrite(9);
    held_restore(&mut h, RESTORE_FULL);
    let vol = h.vol.clone();
    let ticket = vol.enter().unwrap();
    let plan = vol.plan_write(&ticket, 10 * TRACK + 512, 512).unwrap();
    assert!(
        vol.table(TableId::Pending).get(10),
        "planned, not yet restored"
    );
    // The merge's secondary read fails: the track stays pending.
    vol.finish_write(
        plan,
        WriteOutcome {
            primary_failed: true,
            ..Default::default()
        },
    );
    assert!(vol.table(TableId::Pending).get(10));
    drop(ticket);
    h.disks
        .fail_secondary_reads
        .set(Some((10 * TRACK, 11 * TRACK)));
    assert!(h.write(10 * TRACK + 512, &[1u8; 512]).is_err());
    assert!(
        vol.table(TableId::Pending).get(10),
        "a failed merge never marks the track restored"
    );
}

#[test]
fn claim_9_merge_then_restored_and_copy_never_overwrites() {
    let (mut h, base, _) = split_and_overwrite(10);
    held_restore(&mut h, RESTORE_FULL);
    let host = pattern(1010, 1536);
    h.write(11 * TRACK + 4096, &host).unwrap();
    assert!(
        !h.vol.table(TableId::Pending).get(11),
        "restored after the combined transfer"
    );
    let writes = h.primary_writes_to(11 * TRACK, TRACK);
    h.settle();
    assert_eq!(
        h.primary_writes_to(11 * TRACK, TRACK),
        writes,
        "the engine never copied it again"
    );
    let mut expect = base[track_range(11)].to_vec();
    expect[4096..4096 + 1536].copy_from_slice(&host);
    assert_eq!(&h.primary()[track_range(11)], &expect[..]);
}

#[test]
fn claim_10_full_restore_identifies_every_track() {
    let (mut h, base, _) = split_and_overwrite(11);
    held_restore(&mut h, RESTORE_FULL);
    assert_eq!(h.vol.table(TableId::Pending).count(), TRACKS);
    assert_eq!(h.vol.operation().unwrap().total, TRACKS);
    h.settle();
    assert_eq!(h.primary(), base);
}

#[test]
fn claim_11_incremental_restore_copies_only_changed_tracks() {
    let mut h = Harness::new(12, SIZE, TRACK, VolumeState::Established);
    let base = pattern(12, SIZE as usize);
    h.preload(&base);
    h.command(Command::Split).unwrap();
    h.write(2 * TRACK + 512, &[1u8; 1024]).unwrap();
    h.write(13 * TRACK, &vec![2u8; TRACK as usize]).unwrap();
    let changed: Vec<u64> = h.vol.table(TableId::Changed).iter_set().collect();
    assert_eq!(changed, vec![2, 13]);
    held_restore(&mut h, RESTORE_INCR);
    let pending: Vec<u64> = h.vol.table(TableId::Pending).iter_set().collect();
    assert_eq!(
        pending,
        vec![2, 13],
        "exactly the tracks changed since split"
    );
    let log_len = h.disks.write_log.borrow().len();
    h.settle();
    let copied: Vec<u64> = h.disks.write_log.borrow()[log_len..]
        .iter()
        .filter(|(d, _, _)| *d == Dev::Primary)
        .flat_map(|(_, o, l)| (o / TRACK)..((o + l).div_ceil(TRACK)))
        .collect();
    assert!(
        copied.iter().all(|t| *t == 2 || *t == 13),
        "copied {copied:?}"
    );
    assert_eq!(h.primary(), base);
    assert_eq!(h.secondary(), base);
}

// ---- Discard and write-zeroes: the same rules, with zeros as the data ----

/// The bytes of a discarded track.
fn zeros(len: u64) -> Vec<u8> {
    vec![0; len as usize]
}

#[test]
fn claim_5_discard_of_a_whole_pending_track_restores_it_without_a_copy() {
    let (mut h, base, _) = split_and_overwrite(20);
    held_restore(&mut h, RESTORE_FULL);
    let vol = h.vol.clone();
    let ticket = vol.enter().unwrap();
    let plan = vol.plan_zero(&ticket, 4 * TRACK, TRACK, true).unwrap();
    assert_eq!(plan.payload, Payload::Zeros { unmap: true });
    assert!(
        matches!(plan.steps[..], [WriteStep::Direct { devs: DevSet::PRIMARY, offset, len, .. }] if offset == 4 * TRACK && len == TRACK)
    );
    assert_eq!(plan.restores(), &[4]);
    vol.finish_write(plan, WriteOutcome::default());
    drop(ticket);
    // Through the host path: track 5 discarded whole, track 8 zeroed whole.
    h.discard(5 * TRACK, TRACK).unwrap();
    h.write_zeroes(8 * TRACK, TRACK).unwrap();
    for t in [5, 8] {
        assert!(!vol.table(TableId::Pending).get(t), "track {t} restored");
        assert!(vol.table(TableId::Changed).get(t), "track {t} changed");
        assert_eq!(h.read(t * TRACK, TRACK), zeros(TRACK), "track {t}");
    }
    let zeroed: Vec<_> = h.disks.zero_log.borrow().clone();
    assert!(zeroed.contains(&(Dev::Primary, 5 * TRACK, TRACK)));
    assert!(zeroed.iter().all(|z| z.0 == Dev::Primary), "{zeroed:?}");
    let writes_before = h.primary_writes_to(5 * TRACK, TRACK);
    h.engine_paused.set(false);
    let vol2 = vol.clone();
    h.sched.run_until(common::STEP_LIMIT, || {
        vol2.state() != VolumeState::Restoring
    });
    assert_eq!(
        h.primary_writes_to(5 * TRACK, TRACK),
        writes_before,
        "no copy ever touched the discarded track"
    );
    assert_eq!(&h.primary()[track_range(5)], &zeros(TRACK)[..]);
    assert_eq!(
        &h.secondary()[track_range(5)],
        &base[track_range(5)],
        "the secondary keeps the split image while restoring"
    );
    h.settle();
    assert_eq!(
        &h.secondary()[track_range(5)],
        &zeros(TRACK)[..],
        "the resync copies the discard to the secondary"
    );
}

#[test]
fn claim_6_partial_discard_merges_the_secondary_track() {
    let (mut h, base, _) = split_and_overwrite(21);
    held_restore(&mut h, RESTORE_FULL);
    let vol = h.vol.clone();
    let ticket = vol.enter().unwrap();
    let plan = vol
        .plan_zero(&ticket, 6 * TRACK + 1024, 2048, true)
        .unwrap();
    assert!(
        matches!(plan.steps[..], [WriteStep::Merge { track: 6, track_offset, track_len, .. }] if track_offset == 6 * TRACK && track_len == TRACK)
    );
    vol.finish_write(
        plan,
        WriteOutcome {
            primary_failed: true,
            ..Default::default()
        },
    );
    drop(ticket);
    // A discard over the end of track 6 and the start of track 7, both
    // partial: each is merged.
    let (from, len) = (6 * TRACK + 4096, TRACK);
    h.discard(from, len).unwrap();
    let mut expect = base[6 * TRACK as usize..8 * TRACK as usize].to_vec();
    expect[4096..4096 + TRACK as usize].fill(0);
    assert_eq!(
        &h.primary()[6 * TRACK as usize..8 * TRACK as usize],
        &expect[..],
        "secondary tracks with the range zeroed on primary"
    );
    assert!(!vol.table(TableId::Pending).get(6));
    assert!(!vol.table(TableId::Pending).get(7));
    assert!(vol.table(TableId::Changed).get(6) && vol.table(TableId::Changed).get(7));
    assert_eq!(h.read(6 * TRACK, 2 * TRACK), expect);
    assert_eq!(h.secondary(), base, "the secondary is never written");
}

#[test]
fn claim_9_discarded_range_never_reappears_from_the_secondary() {
    let (mut h, base, _) = split_and_overwrite(22);
    held_restore(&mut h, RESTORE_FULL);
    let vol = h.vol.clone();
    // A copy of track 3 is in flight (locked) when the discard arrives.
    let ticket = vol.enter().unwrap();
    let (mut mine, others): (Vec<_>, Vec<_>) = vol
        .next_copies(&ticket, TRACKS as usize)
        .into_iter()
        .partition(|j| j.track == 3);
    others.into_iter().for_each(|j| vol.finish_copy(j, false));
    let job = mine.pop().unwrap();
    drop(ticket);
    let discard = h.spawn_zero(3 * TRACK + 512, 1024, true, false);
    h.steps(500);
    assert!(discard.borrow().is_none(), "the discard waits for the copy");
    // The copy lands (the split image), then the discard goes on.
    h.disks.primary.borrow_mut()[track_range(3)].copy_from_slice(&base[track_range(3)]);
    vol.finish_copy(job, true);
    h.wait(&discard).unwrap();
    let mut expect = base[track_range(3)].to_vec();
    expect[512..1536].fill(0);
    assert_eq!(h.read(3 * TRACK, TRACK), expect);
    // A whole-track discard during the restore, then the restore's end,
    // the resync and a later full restore: nothing brings the data back.
    h.discard(12 * TRACK, TRACK).unwrap();
    h.settle();
    assert_eq!(h.vol.state(), VolumeState::Established);
    assert_eq!(&h.primary()[track_range(3)], &expect[..]);
    assert_eq!(&h.primary()[track_range(12)], &zeros(TRACK)[..]);
    assert_eq!(&h.secondary()[track_range(12)], &zeros(TRACK)[..]);
    h.command(Command::Split).unwrap();
    held_restore(&mut h, RESTORE_FULL);
    assert_eq!(h.read(12 * TRACK, TRACK), zeros(TRACK), "the split image");
    h.settle();
    assert_eq!(&h.primary()[track_range(12)], &zeros(TRACK)[..]);
}

#[test]
fn claim_2_discard_during_a_protected_restore_is_recorded_and_the_secondary_kept() {
    let (mut h, base, _) = split_and_overwrite(23);
    held_restore(
        &mut h,
        Command::Restore {
            incremental: false,
            protect: true,
        },
    );
    h.discard(2 * TRACK, TRACK).unwrap();
    h.write_zeroes(9 * TRACK + 1024, 512).unwrap();
    let changed: Vec<u64> = h.vol.table(TableId::Changed).iter_set().collect();
    assert_eq!(changed, vec![2, 9]);
    h.settle();
    assert_eq!(h.vol.state(), VolumeState::Split);
    assert_eq!(h.secondary(), base, "protected: the secondary is untouched");
    let changed: Vec<u64> = h.vol.table(TableId::Changed).iter_set().collect();
    assert_eq!(changed, vec![2, 9], "the zeroed tracks differ from it");
    assert_eq!(&h.primary()[track_range(2)], &zeros(TRACK)[..]);
}
