//! Device and metadata faults in the simulation: each fault stays contained
//! and nothing acknowledged is lost.

mod common;

use common::{pattern, Harness};
use splitmirror::core::{Command, VolumeState};
use splitmirror::exec::engine::{EngineConfig, OnError};

const TRACK: u64 = 16 * 1024;
const TRACKS: u64 = 16;
const SIZE: u64 = TRACK * TRACKS;

fn established(seed: u64) -> (Harness, Vec<u8>) {
    let h = Harness::new(seed, SIZE, TRACK, VolumeState::Established);
    let base = pattern(seed, SIZE as usize);
    h.preload(&base);
    (h, base)
}

fn with_on_error(seed: u64, on_error: OnError) -> (Harness, Vec<u8>) {
    let cfg = EngineConfig {
        batch: 4,
        max_io: 2 * TRACK,
        on_error,
        ..Default::default()
    };
    let h = Harness::with_config(seed, SIZE, TRACK, VolumeState::Established, cfg);
    let base = pattern(seed, SIZE as usize);
    h.preload(&base);
    (h, base)
}

#[test]
fn secondary_failure_while_mirroring_degrades_and_establish_resyncs_only_changes() {
    let (mut h, _) = established(1);
    h.disks.fail_secondary_writes.set(true);
    h.write(3 * TRACK, &[9u8; 4096])
        .expect("host write goes on to the primary");
    assert_eq!(h.vol.state(), VolumeState::Degraded);
    assert!(
        h.vol.tables.changed.get(3),
        "the failed mirror write is tracked"
    );
    h.write(7 * TRACK + 512, &[8u8; 512])
        .expect("degraded writes succeed");
    assert!(h.vol.tables.changed.get(7));
    assert_eq!(&h.read(3 * TRACK, 4096)[..], &[9u8; 4096]);
    // Repaired secondary: establish copies only the changed tracks.
    h.disks.fail_secondary_writes.set(false);
    let log = h.disks.write_log.borrow().len();
    h.command(Command::Establish { full: false }).unwrap();
    h.settle();
    assert_eq!(h.vol.state(), VolumeState::Established);
    assert_eq!(h.secondary(), h.primary());
    let copied: Vec<u64> = h.disks.write_log.borrow()[log..]
        .iter()
        .filter(|(d, _, _)| *d == splitmirror::core::Dev::Secondary)
        .map(|(_, o, _)| o / TRACK)
        .collect();
    assert!(
        copied.iter().all(|t| *t == 3 || *t == 7),
        "copied {copied:?}"
    );
}

#[test]
fn restore_read_error_with_pause_fails_only_reads_of_that_track() {
    let (mut h, base) = with_on_error(2, OnError::Pause);
    h.command(Command::Split).unwrap();
    h.write(0, &pattern(99, SIZE as usize)).unwrap();
    h.disks
        .fail_secondary_reads
        .set(Some((5 * TRACK, 6 * TRACK)));
    h.command(Command::Restore {
        incremental: false,
        protect: false,
    })
    .unwrap();
    let vol = h.vol.clone();
    let paused = h.engine_paused.clone();
    h.sched.run_until(common::STEP_LIMIT, || {
        paused.get() || vol.copy_remaining() <= 1
    });
    let errs = h.engine_errors.borrow().clone();
    assert!(errs.iter().any(|e| e.track == 5 && !e.skipped), "{errs:?}");
    assert_eq!(
        h.vol.state(),
        VolumeState::Restoring,
        "the operation pauses"
    );
    assert!(
        h.vol.tables.pending.get(5),
        "the failing track stays pending"
    );
    // Reads of the failing range fail; everything else is served.
    let slot = h.start_read(5 * TRACK, 4096);
    h.sched
        .run_until(common::STEP_LIMIT, || slot.borrow().is_some());
    assert!(slot.borrow_mut().take().unwrap().is_err());
    assert_eq!(h.read(0, 5 * TRACK), base[..(5 * TRACK) as usize]);
    assert_eq!(
        h.read(6 * TRACK, SIZE - 6 * TRACK),
        base[(6 * TRACK) as usize..]
    );
    h.write(9 * TRACK + 100 * 512, &[1u8; 512])
        .expect("writes elsewhere succeed");
    // The secondary recovers: the restore finishes with the split image.
    h.disks.fail_secondary_reads.set(None);
    h.settle();
    let mut expect = base.clone();
    let at = (9 * TRACK + 100 * 512) as usize;
    expect[at..at + 512].fill(1);
    assert_eq!(h.read(0, SIZE), expect);
}

#[test]
fn restore_read_error_with_skip_lists_the_track_and_finishes() {
    let (mut h, base) = with_on_error(3, OnError::Skip);
    h.command(Command::Split).unwrap();
    let after = pattern(98, SIZE as usize);
    h.write(0, &after).unwrap();
    h.disks
        .fail_secondary_reads
        .set(Some((4 * TRACK, 5 * TRACK)));
    h.command(Command::Restore {
        incremental: false,
        protect: true,
    })
    .unwrap();
    h.settle();
    let errs = h.engine_errors.borrow().clone();
    assert!(errs.iter().any(|e| e.track == 4 && e.skipped), "{errs:?}");
    assert_eq!(h.vol.state(), VolumeState::Split);
    let p = h.primary();
    for t in 0..TRACKS {
        let r = (t * TRACK) as usize..((t + 1) * TRACK) as usize;
        if t != 4 {
            assert!(p[r.clone()] == base[r], "track {t} restored");
        }
    }
}

#[test]
fn primary_write_error_fails_that_request_only() {
    let (mut h, base) = established(4);
    h.disks.fail_primary_writes.set(true);
    assert!(h.write(2 * TRACK, &[5u8; 4096]).is_err());
    h.disks.fail_primary_writes.set(false);
    assert_eq!(h.vol.state(), VolumeState::Established, "state intact");
    h.write(3 * TRACK, &[6u8; 4096]).unwrap();
    assert_eq!(&h.read(3 * TRACK, 4096)[..], &[6u8; 4096]);
    assert_eq!(
        h.read(4 * TRACK, TRACK),
        base[(4 * TRACK) as usize..(5 * TRACK) as usize]
    );
}

#[test]
fn metadata_commit_failure_refuses_to_ack_writes_that_need_it() {
    let (mut h, _) = established(5);
    h.command(Command::Split).unwrap();
    h.b.commits_fail.set(true);
    // First write to a track in split needs its changed bit durable first.
    assert!(h.write(2 * TRACK, &[1u8; 4096]).is_err());
    assert!(
        h.primary()[(2 * TRACK) as usize..][..4096] != [1u8; 4096],
        "the data was not issued before its bit was durable"
    );
    h.b.commits_fail.set(false);
    h.write(2 * TRACK, &[1u8; 4096]).unwrap();
    // Once the bit is durable, writes to that track need no commit at all.
    h.b.commits_fail.set(true);
    h.write(2 * TRACK + 4096, &[2u8; 4096])
        .expect("bit already durable");
}

/// Two commands racing (two operators, or a script run twice): the gate
/// serializes them, exactly one `split` wins, the other is refused with
/// the state error (exit 3), and nothing is half-applied.
#[test]
fn concurrent_commands_one_wins_the_other_is_refused() {
    use splitmirror::exec::engine;
    for seed in 0..50 {
        let (mut h, _) = established(100 + seed);
        let mut slots = Vec::new();
        for _ in 0..2 {
            let (vol, b) = (h.vol.clone(), h.b.clone());
            slots.push(h.sched.spawn_with(async move {
                engine::transition(&vol, &*b, |v| v.apply(Command::Split)).await
            }));
        }
        h.sched.run_until(common::STEP_LIMIT, || {
            slots.iter().all(|s| s.borrow().is_some())
        });
        let results: Vec<bool> = slots
            .iter()
            .map(|s| s.borrow_mut().take().unwrap().expect("I/O").is_ok())
            .collect();
        assert_eq!(
            results.iter().filter(|ok| **ok).count(),
            1,
            "seed {seed}: {results:?}"
        );
        assert_eq!(h.vol.state(), VolumeState::Split);
    }
}

/// `restore` sent while an `establish` is still copying: refused (exit 3),
/// the establish goes on to the end undisturbed.
#[test]
fn restore_during_establish_is_refused_and_establish_completes() {
    let (mut h, _) = established(7);
    h.command(Command::Split).unwrap();
    h.write(0, &pattern(70, SIZE as usize)).unwrap();
    h.engine_paused.set(true);
    h.command(Command::Establish { full: true }).unwrap();
    assert_eq!(h.vol.state(), VolumeState::Syncing);
    let refused = h.command(Command::Restore {
        incremental: false,
        protect: false,
    });
    assert!(refused.is_err(), "restore accepted while syncing");
    assert_eq!(h.vol.state(), VolumeState::Syncing);
    h.settle();
    assert_eq!(h.vol.state(), VolumeState::Established);
    assert!(h.secondary() == h.primary());
}
