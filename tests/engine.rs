//! run_copies over the simulation: it copies exactly the pending tracks,
//! byte for byte, and follows `on_error`.

use splitmirror::backend::sim::{self, Scheduler, SimBackend, SimDisks};
use splitmirror::backend::Backend;
use splitmirror::core::{Command, Dev, Geometry, Volume, VolumeState};
use splitmirror::exec::engine::{self, EngineConfig, OnError, RunReport};
use splitmirror::exec::load::HostLoad;
use std::rc::Rc;
use std::sync::atomic::AtomicBool;

const TRACK: u64 = 4096;
const TRACKS: u64 = 64;

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| r.u8(..)).collect()
}

/// A split volume whose primary differs from the secondary everywhere, with
/// `changed` set on `changed` tracks.
fn split_volume(
    seed: u64,
    changed: &[u64],
) -> (Rc<Volume>, Rc<SimDisks>, Rc<SimBackend>, sim::SimRng) {
    let size = TRACK * TRACKS;
    let disks = SimDisks::new(size as usize);
    disks
        .secondary
        .borrow_mut()
        .copy_from_slice(&pattern(seed, size as usize));
    disks
        .primary
        .borrow_mut()
        .copy_from_slice(&pattern(seed + 1, size as usize));
    let rng = sim::rng(seed);
    let b = Rc::new(SimBackend::new(disks.clone(), rng.clone(), 3));
    let vol = Rc::new(Volume::new(
        Geometry::new(size, TRACK).unwrap(),
        VolumeState::Split,
    ));
    for &t in changed {
        vol.tables.changed.set(t);
    }
    (vol, disks, b, rng)
}

fn apply(vol: &Volume, cmd: Command) {
    assert!(vol.close_gate());
    vol.apply(cmd).unwrap();
    vol.open_gate();
}

/// Runs run_copies with an in-memory committer until it returns.
fn run(vol: &Rc<Volume>, b: &Rc<SimBackend>, rng: sim::SimRng, cfg: EngineConfig) -> RunReport {
    run_with(vol, b, rng, cfg, false, false)
}

/// `busy`: a host request stays in flight throughout (the engine runs at
/// its shallow depth); `stopped`: the stop flag is set from the start.
fn run_with(
    vol: &Rc<Volume>,
    b: &Rc<SimBackend>,
    rng: sim::SimRng,
    cfg: EngineConfig,
    busy: bool,
    stopped: bool,
) -> RunReport {
    let mut sched = Scheduler::new(rng);
    let (v, bb) = (vol.clone(), b.clone());
    sched.spawn(async move {
        loop {
            if bb.take_commit_request() || v.needs_commit() {
                let seq = sim::mem_commit_begin(&v);
                sim::YieldNow(2).await;
                v.clock.finish(seq);
            }
            bb.pause().await;
        }
    });
    let (v, bb) = (vol.clone(), b.clone());
    let slot = sched.spawn_with(async move {
        let stop = AtomicBool::new(stopped);
        let load = HostLoad::default();
        let _host = busy.then(|| load.enter());
        engine::run_copies(&v, &*bb, &cfg, &stop, &load).await
    });
    sched.run_until(1_000_000, || slot.borrow().is_some());
    let r = slot.borrow_mut().take().unwrap();
    r.expect("run_copies I/O")
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
    let (vol, disks, b, rng) = split_volume(7, &changed);
    let before = disks.primary.borrow().clone();
    let secondary = disks.secondary.borrow().clone();
    apply(
        &vol,
        Command::Restore {
            incremental: true,
            protect: true,
        },
    );
    let r = run(&vol, &b, rng, cfg(OnError::Pause));
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
    let (vol, disks, b, rng) = split_volume(11, &[]);
    apply(
        &vol,
        Command::Restore {
            incremental: false,
            protect: false,
        },
    );
    let r = run(&vol, &b, rng, cfg(OnError::Pause));
    assert_eq!(r.tracks, TRACKS);
    assert_eq!(vol.state(), VolumeState::Established);
    assert!(r.completed >= 1);
    assert!(*disks.primary.borrow() == *disks.secondary.borrow());
}

#[test]
fn skip_lists_the_failing_track_and_copies_the_rest() {
    let (vol, disks, b, rng) = split_volume(13, &[]);
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
    let r = run(&vol, &b, rng, cfg(OnError::Skip));
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
    let (vol, disks, b, rng) = split_volume(17, &[]);
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
    let r = run(&vol, &b, rng, cfg(OnError::Pause));
    assert!(r.paused);
    assert!(r.errors.iter().any(|e| e.track == 9 && !e.skipped));
    assert!(vol.tables.pending.get(9));
    assert_eq!(vol.state(), VolumeState::Restoring);
}

#[test]
fn under_host_load_it_still_finishes() {
    let (vol, disks, b, rng) = split_volume(19, &[]);
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
    let r = run_with(&vol, &b, rng, cfg, true, false);
    assert_eq!(r.tracks, TRACKS);
    assert_eq!(vol.state(), VolumeState::Split);
    assert!(*disks.primary.borrow() == *disks.secondary.borrow());
}

#[test]
fn stop_copies_nothing_more() {
    let (vol, _disks, b, rng) = split_volume(23, &[]);
    apply(
        &vol,
        Command::Restore {
            incremental: false,
            protect: false,
        },
    );
    let r = run_with(&vol, &b, rng, cfg(OnError::Pause), false, true);
    assert_eq!(r.tracks, 0);
    assert_eq!(vol.tables.pending.count(), TRACKS);
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
