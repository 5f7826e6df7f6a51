//! run_copies over the simulation: it copies exactly the pending tracks,
//! byte for byte, and follows `on_error`.

mod common;

use common::{pattern, Harness};
use splitmirror::core::{Command, Dev, TableId, Volume, VolumeState};
use splitmirror::exec::engine::{EngineConfig, OnError, RunReport};

const TRACK: u64 = 4096;
const TRACKS: u64 = 64;

/// A split volume whose primary differs from the secondary everywhere, with
/// `changed` set on `changed` tracks, with the harness's committer and
/// store but no engine task.
fn split_volume(seed: u64, changed: &[u64]) -> Harness {
    let size = TRACK * TRACKS;
    let h = Harness::without_engine(seed, size, TRACK, VolumeState::Split);
    h.disks
        .secondary
        .borrow_mut()
        .copy_from_slice(&pattern(seed, size as usize));
    h.disks
        .primary
        .borrow_mut()
        .copy_from_slice(&pattern(seed + 1, size as usize));
    for &t in changed {
        h.vol.table(TableId::Changed).set(t);
    }
    h
}

fn apply(vol: &Volume, cmd: Command) {
    assert!(vol.close_gate());
    vol.apply(cmd).unwrap();
    vol.open_gate();
}

/// Runs run_copies until it returns.
fn run(h: &mut Harness, cfg: EngineConfig) -> RunReport {
    h.run_copies(cfg, false, false)
}

fn cfg(on_error: OnError) -> EngineConfig {
    EngineConfig {
        batch: 4,
        max_inflight: 8,
        max_io: 2 * TRACK,
        on_error,
        ..Default::default()
    }
}

#[test]
fn incremental_restore_copies_exactly_the_changed_tracks() {
    let changed = [0, 1, 2, 7, 30, 31, 63];
    let mut h = split_volume(7, &changed);
    let (vol, disks) = (h.vol.clone(), h.disks.clone());
    let before = disks.primary.borrow().clone();
    let secondary = disks.secondary.borrow().clone();
    apply(
        &vol,
        Command::Restore {
            incremental: true,
            protect: true,
        },
    );
    let r = run(&mut h, cfg(OnError::Pause));
    assert_eq!(r.tracks, changed.len() as u64);
    assert_eq!(r.bytes, changed.len() as u64 * TRACK);
    assert!(r.errors.is_empty() && !r.paused);
    assert_eq!(
        vol.state(),
        VolumeState::Split,
        "protected restore ends split"
    );
    let primary = disks.primary.borrow();
    for t in 0..TRACKS {
        let range = (t * TRACK) as usize..((t + 1) * TRACK) as usize;
        let want = if changed.contains(&t) {
            &secondary[range.clone()]
        } else {
            &before[range.clone()]
        };
        assert!(primary[range.clone()] == *want, "track {t}");
    }
    assert_eq!(disks.secondary_written.get(), 0);
    assert!(disks
        .write_log
        .borrow()
        .iter()
        .all(|(d, o, l)| *d == Dev::Primary
            && (o / TRACK..(o + l) / TRACK).all(|t| changed.contains(&t))));
}

#[test]
fn full_restore_runs_through_resync_to_established() {
    let mut h = split_volume(11, &[]);
    let (vol, disks) = (h.vol.clone(), h.disks.clone());
    apply(
        &vol,
        Command::Restore {
            incremental: false,
            protect: false,
        },
    );
    let r = run(&mut h, cfg(OnError::Pause));
    assert_eq!(r.tracks, TRACKS);
    assert_eq!(vol.state(), VolumeState::Established);
    assert!(r.completed >= 1);
    assert!(*disks.primary.borrow() == *disks.secondary.borrow());
}

#[test]
fn skip_lists_the_failing_track_and_copies_the_rest() {
    let mut h = split_volume(13, &[]);
    let (vol, disks) = (h.vol.clone(), h.disks.clone());
    disks
        .fail_secondary_reads
        .set(Some((5 * TRACK + 100, 5 * TRACK + 200)));
    let before = disks.primary.borrow().clone();
    apply(
        &vol,
        Command::Restore {
            incremental: false,
            protect: true,
        },
    );
    let r = run(&mut h, cfg(OnError::Skip));
    assert!(!r.paused);
    // Track 5 may have been coalesced with a neighbour; every error is
    // listed, and 5 is among them.
    assert!(
        r.errors.iter().any(|e| e.track == 5 && e.skipped),
        "{:?}",
        r.errors
    );
    assert_eq!(r.tracks + r.errors.len() as u64, TRACKS);
    let primary = disks.primary.borrow();
    let secondary = disks.secondary.borrow();
    for t in 0..TRACKS {
        let range = (t * TRACK) as usize..((t + 1) * TRACK) as usize;
        let failed = r.errors.iter().any(|e| e.track == t);
        let want = if failed {
            &before[range.clone()]
        } else {
            &secondary[range.clone()]
        };
        assert!(primary[range.clone()] == *want, "track {t}");
    }
    assert_eq!(vol.state(), VolumeState::Split);
}

#[test]
fn pause_stops_and_leaves_the_failing_track_pending() {
    let mut h = split_volume(17, &[]);
    let (vol, disks) = (h.vol.clone(), h.disks.clone());
    disks
        .fail_secondary_reads
        .set(Some((9 * TRACK, 9 * TRACK + 1)));
    apply(
        &vol,
        Command::Restore {
            incremental: false,
            protect: false,
        },
    );
    let r = run(&mut h, cfg(OnError::Pause));
    assert!(r.paused);
    assert!(r.errors.iter().any(|e| e.track == 9 && !e.skipped));
    assert!(vol.table(TableId::Pending).get(9));
    assert_eq!(vol.state(), VolumeState::Restoring);
}

#[test]
fn under_host_load_it_still_finishes() {
    let mut h = split_volume(19, &[]);
    let (vol, disks) = (h.vol.clone(), h.disks.clone());
    apply(
        &vol,
        Command::Restore {
            incremental: false,
            protect: true,
        },
    );
    let cfg = EngineConfig {
        busy_inflight: 1,
        ..cfg(OnError::Pause)
    };
    let r = h.run_copies(cfg, true, false);
    assert_eq!(r.tracks, TRACKS);
    assert_eq!(vol.state(), VolumeState::Split);
    assert!(*disks.primary.borrow() == *disks.secondary.borrow());
}

#[test]
fn stop_copies_nothing_more() {
    let mut h = split_volume(23, &[]);
    let vol = h.vol.clone();
    apply(
        &vol,
        Command::Restore {
            incremental: false,
            protect: false,
        },
    );
    let r = h.run_copies(cfg(OnError::Pause), false, true);
    assert_eq!(r.tracks, 0);
    assert_eq!(vol.table(TableId::Pending).count(), TRACKS);
    assert_eq!(vol.state(), VolumeState::Restoring);
}

#[test]
fn config_maps_in_one_place() {
    let r = splitmirror::edge::config::RestoreConfig {
        batch: 16,
        max_inflight: 128,
        rate_limit: 200 << 20,
        on_error: OnError::Skip,
    };
    let c = EngineConfig::from_restore(&r);
    assert_eq!(
        (c.batch, c.max_inflight, c.rate_limit, c.on_error),
        (16, 128, 200 << 20, OnError::Skip)
    );
    assert!(c.busy_inflight >= 1 && c.busy_inflight < c.max_inflight);
}
