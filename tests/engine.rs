//! run_copies over the simulation: it copies exactly the pending tracks,
//! byte for byte, and follows `on_error`.

mod common;

use common::{pattern, Harness};
use splitmirror::backend::uring::IoPriority;
use splitmirror::core::{Command, Dev, TableId, Volume, VolumeState};
use splitmirror::edge::config::RestorePriority;
use splitmirror::exec::engine::{EngineConfig, OnError, RunReport};
use splitmirror::exec::pace::{PaceConfig, Pacer, Window};
use std::time::Duration;

const TRACK: u64 = 4096;
const TRACKS: u64 = 64;
/// A full restore that ends split (no resync to run through).
const PROTECTED_FULL: Command = Command::Restore {
    incremental: false,
    protect: true,
};

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
    apply(&vol, PROTECTED_FULL);
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
    apply(&vol, PROTECTED_FULL);
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
        priority: RestorePriority::Balanced,
    };
    let c = EngineConfig::from_restore(&r);
    assert_eq!(
        (
            c.batch,
            c.max_inflight,
            c.rate_limit,
            c.on_error,
            c.priority
        ),
        (16, 128, 200 << 20, OnError::Skip, RestorePriority::Balanced)
    );
    // The pacer decides the depth under load; no fixed bound below it.
    assert_eq!(c.busy_inflight, c.max_inflight);
    assert_eq!(c.io_priority(), IoPriority::BestEffortLowest);
    let host = EngineConfig::default();
    assert_eq!(
        host.priority,
        RestorePriority::Host,
        "host first by default"
    );
    assert_eq!(host.io_priority(), IoPriority::Idle);
    assert_eq!(IoPriority::Idle.ioprio(), 3 << 13);
    assert_eq!(IoPriority::BestEffortLowest.ioprio(), (2 << 13) | 7);
    // The copy thread's CPU priority follows the same order, and setting
    // it reaches the calling thread only (Linux keeps nice per thread).
    assert_eq!((host.thread_nice(), c.thread_nice()), (10, 5));
    let restore = EngineConfig {
        priority: RestorePriority::Restore,
        ..host
    };
    assert_eq!(restore.thread_nice(), 0);
    let nice_of_this_thread = || {
        // SAFETY: plain syscalls on the calling thread's id.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
    };
    let before = nice_of_this_thread();
    let seen = std::thread::spawn(move || {
        splitmirror::backend::uring::set_thread_nice(host.thread_nice()).unwrap();
        nice_of_this_thread()
    })
    .join()
    .unwrap();
    assert_eq!(seen, 10);
    assert_eq!(nice_of_this_thread(), before, "other threads keep theirs");
}

// ---------------------------------------------------------------- the pacer

const IDLE_P99: Duration = Duration::from_micros(300);

/// A pacer of `priority` with 64 tracks in flight at most, 8 per I/O
/// (1 MiB I/Os of 128 KiB tracks), whose idle baseline is `IDLE_P99`.
fn pacer(priority: RestorePriority) -> Pacer {
    let mut p = Pacer::new(PaceConfig::for_priority(priority, 64, 8, 128 << 10));
    if priority != RestorePriority::Restore {
        // The first busy window asks for a probe; the probe sets the
        // baseline.
        p.observe(&busy(IDLE_P99 * 10));
        assert!(p.probing(), "no baseline yet: it probes first");
        assert_eq!(p.limits().ios, 0, "a probe copies nothing");
        p.observe(&Window {
            host_requests: 64,
            p99: Some(IDLE_P99),
            copying: false,
        });
        assert_eq!(p.baseline(), Some(IDLE_P99));
        assert!(!p.probing());
    }
    p
}

/// A window with copies in flight and host p99 `p99`.
fn busy(p99: Duration) -> Window {
    Window {
        host_requests: 64,
        p99: Some(p99),
        copying: true,
    }
}

/// Feeds `n` windows, answering each probe with an idle window.
fn feed(p: &mut Pacer, w: Window, n: usize) {
    for _ in 0..n {
        if p.probing() {
            p.observe(&Window {
                copying: false,
                p99: Some(IDLE_P99),
                ..w
            });
        }
        p.observe(&w);
    }
}

/// Feeds enough calm windows for `steps` steps of growth.
fn grow(p: &mut Pacer, steps: usize) {
    let calm = p.config().calm_windows as usize;
    feed(p, busy(IDLE_P99), steps * calm);
}

/// The pacer's limits as (I/Os, tracks per I/O, pieces per track); a
/// probe that is due is answered first (it copies nothing meanwhile).
fn lim(p: &mut Pacer) -> (usize, usize, usize) {
    if p.probing() {
        p.observe(&Window {
            host_requests: 64,
            p99: Some(IDLE_P99),
            copying: false,
        });
    }
    let l = p.limits();
    (l.ios, l.io_tracks, l.split)
}

#[test]
fn pacer_shrinks_under_host_latency_down_to_the_floor_and_no_further() {
    let mut p = pacer(RestorePriority::Host);
    assert_eq!(
        lim(&mut p),
        (1, 1, 4),
        "a load met at the start: the floor at once, not full speed"
    );
    assert_eq!(p.limits().io_bytes(128 << 10), 32 << 10);
    grow(&mut p, 16);
    assert_eq!(lim(&mut p), (8, 8, 1), "grown to full speed");
    assert_eq!(p.limits().io_bytes(128 << 10), 1 << 20);
    // Host p99 at 2× idle (1.33× the target): every window halves, I/O
    // count first.
    p.observe(&busy(IDLE_P99 * 2));
    assert_eq!(lim(&mut p), (4, 8, 1));
    p.observe(&busy(IDLE_P99 * 2));
    p.observe(&busy(IDLE_P99 * 2));
    p.observe(&busy(IDLE_P99 * 2));
    assert_eq!(lim(&mut p), (1, 4, 1), "then smaller I/Os");
    p.observe(&busy(IDLE_P99 * 2));
    p.observe(&busy(IDLE_P99 * 2));
    p.observe(&busy(IDLE_P99 * 2));
    assert_eq!(lim(&mut p), (1, 1, 2), "then tracks split into pieces");
    // Far over the target: one halving per doubling, in one window.
    grow(&mut p, 15);
    assert_eq!(lim(&mut p), (8, 8, 1));
    p.observe(&busy(IDLE_P99 * 20));
    assert_eq!(
        lim(&mut p),
        (1, 4, 1),
        "20× idle is 13× the target: four halvings at once"
    );
    // Constant overload for a long time: it stays at the floor, never 0
    // outside a probe.
    for _ in 0..500 {
        p.observe(&busy(IDLE_P99 * 20));
        if !p.probing() {
            let l = p.limits();
            assert!(l.ios >= 1 && l.io_tracks >= 1, "{l:?}");
        } else {
            p.observe(&Window {
                host_requests: 64,
                p99: Some(IDLE_P99),
                copying: false,
            });
        }
    }
    assert_eq!(lim(&mut p), (1, 1, 4), "the host floor: 32 KiB pieces");
    assert_eq!(p.limits().tracks(), 1);
}

#[test]
fn pacer_splits_tracks_only_into_whole_pieces_of_32k_or_more() {
    let floor = |track: u64| {
        let mut p = Pacer::new(PaceConfig::for_priority(
            RestorePriority::Host,
            64,
            8,
            track,
        ));
        p.host_active();
        (p.limits().split, p.limits().io_bytes(track))
    };
    assert_eq!(floor(128 << 10), (4, 32 << 10));
    assert_eq!(floor(1 << 20), (32, 32 << 10));
    assert_eq!(floor(64 << 10), (2, 32 << 10));
    assert_eq!(floor(32 << 10), (1, 32 << 10), "already the smallest");
    assert_eq!(floor(16 << 10), (1, 16 << 10));
    assert_eq!(floor(96 << 10), (2, 48 << 10), "halves stay whole blocks");
}

#[test]
fn pacer_grows_back_when_the_host_is_fast_or_away() {
    let mut p = pacer(RestorePriority::Host);
    feed(&mut p, busy(IDLE_P99 * 10), 20);
    assert_eq!(lim(&mut p), (1, 1, 4));
    // Host latency back near idle: one step per `calm_windows` calm
    // windows in a row (8 for `host`), whole tracks first, then I/O size,
    // then I/O count.
    assert_eq!(p.config().calm_windows, 8);
    feed(&mut p, busy(IDLE_P99), 7);
    assert_eq!(lim(&mut p), (1, 1, 4), "not yet");
    p.observe(&busy(IDLE_P99 * 13 / 10));
    feed(&mut p, busy(IDLE_P99), 7);
    assert_eq!(
        lim(&mut p),
        (1, 1, 4),
        "a window in the band starts the count again"
    );
    p.observe(&busy(IDLE_P99));
    assert_eq!(lim(&mut p), (1, 1, 2));
    grow(&mut p, 1);
    assert_eq!(lim(&mut p), (1, 1, 1));
    grow(&mut p, 1);
    assert_eq!(lim(&mut p), (1, 2, 1));
    grow(&mut p, 6);
    assert_eq!(lim(&mut p), (1, 8, 1));
    grow(&mut p, 1);
    assert_eq!(lim(&mut p), (2, 8, 1));
    // Between target × 0.75 and the target: it holds.
    let before = p.limits();
    feed(&mut p, busy(IDLE_P99 * 13 / 10), 10);
    assert_eq!(
        p.limits(),
        before,
        "inside the band it neither grows nor shrinks"
    );
    // The host goes away: full speed at once...
    feed(&mut p, busy(IDLE_P99 * 10), 20);
    p.observe(&Window::default());
    assert_eq!(lim(&mut p), (8, 8, 1));
    p.observe(&Window::default());
    assert_eq!(lim(&mut p), (8, 8, 1));
    // ...and its first request brings back the limits it had under load,
    // before any window closes.
    p.host_active();
    assert_eq!(lim(&mut p), (1, 1, 4));
    p.host_active();
    assert_eq!(p.limits().tracks(), 1, "only a return from away resets");
}

#[test]
fn pacer_follows_the_priority_setting() {
    // 2.5× idle: too much for host first, fine for balanced.
    let mut host = pacer(RestorePriority::Host);
    let mut balanced = pacer(RestorePriority::Balanced);
    grow(&mut host, 16);
    grow(&mut balanced, 16);
    assert_eq!(host.limits().tracks(), 64);
    assert_eq!(balanced.limits().tracks(), 64);
    feed(&mut host, busy(IDLE_P99 * 5 / 2), 3);
    feed(&mut balanced, busy(IDLE_P99 * 5 / 2), 3);
    assert!(host.limits().tracks() < 64);
    assert_eq!(balanced.limits().tracks(), 64);
    // Under heavy load balanced keeps a larger floor (half-size I/Os,
    // whole tracks).
    feed(&mut host, busy(IDLE_P99 * 20), 50);
    feed(&mut balanced, busy(IDLE_P99 * 20), 50);
    assert_eq!(lim(&mut host), (1, 1, 4));
    assert_eq!(lim(&mut balanced), (1, 4, 1));
    // Restore first: full depth whatever the host sees, and no probes.
    let mut restore = pacer(RestorePriority::Restore);
    feed(&mut restore, busy(IDLE_P99 * 100), 200);
    assert!(!restore.probing());
    assert_eq!(lim(&mut restore), (8, 8, 1));
}

#[test]
fn pacer_probes_its_baseline_again_now_and_then() {
    let mut p = pacer(RestorePriority::Host);
    let every = p.config().probe_every;
    for _ in 0..every - 1 {
        p.observe(&busy(IDLE_P99));
        assert!(!p.probing());
    }
    p.observe(&busy(IDLE_P99));
    assert!(p.probing(), "a probe after probe_every windows");
    // The device got slower meanwhile: the new baseline is what the probe
    // measures, and host p99 at 1.2× the new baseline is then fine.
    p.observe(&Window {
        host_requests: 64,
        p99: Some(IDLE_P99 * 3),
        copying: false,
    });
    assert_eq!(p.baseline(), Some(IDLE_P99 * 3));
    let before = p.limits().tracks();
    p.observe(&busy(IDLE_P99 * 36 / 10));
    assert!(p.limits().tracks() >= before);
}

#[test]
fn under_host_load_each_priority_still_finishes() {
    for priority in [
        RestorePriority::Host,
        RestorePriority::Balanced,
        RestorePriority::Restore,
    ] {
        let mut h = split_volume(29, &[]);
        let (vol, disks) = (h.vol.clone(), h.disks.clone());
        apply(&vol, PROTECTED_FULL);
        let cfg = EngineConfig {
            priority,
            ..cfg(OnError::Pause)
        };
        let r = h.run_copies(cfg, true, false);
        assert_eq!(r.tracks, TRACKS, "{priority:?}");
        assert_eq!(vol.state(), VolumeState::Split);
        assert!(*disks.primary.borrow() == *disks.secondary.borrow());
    }
}

#[test]
fn at_the_host_floor_a_track_is_copied_in_32k_pieces() {
    const BIG: u64 = 128 << 10;
    for (busy, piece) in [(true, 32 << 10), (false, 2 * BIG)] {
        let size = BIG * 8;
        let mut h = Harness::without_engine(37, size, BIG, VolumeState::Split);
        let (vol, disks) = (h.vol.clone(), h.disks.clone());
        disks
            .secondary
            .borrow_mut()
            .copy_from_slice(&pattern(37, size as usize));
        apply(&vol, PROTECTED_FULL);
        let cfg = EngineConfig {
            batch: 4,
            max_inflight: 8,
            max_io: 2 * BIG,
            priority: RestorePriority::Host,
            ..Default::default()
        };
        let r = h.run_copies(cfg, busy, false);
        assert_eq!(r.tracks, 8);
        assert!(*disks.primary.borrow() == *disks.secondary.borrow());
        let writes = disks.write_log.borrow();
        assert!(
            writes
                .iter()
                .filter(|(d, ..)| *d == Dev::Primary)
                .all(|&(_, _, len)| len == piece),
            "busy {busy}: every copy write is {piece} bytes: {writes:?}"
        );
    }
}

#[test]
fn a_host_write_waiting_for_a_copied_track_holds_new_copies_back() {
    let mut h = split_volume(41, &[]);
    let vol = h.vol.clone();
    apply(&vol, PROTECTED_FULL);
    // The copy holds track 3 (copied, waiting for its group's flush).
    let ticket = vol.enter().unwrap();
    let job = *vol
        .next_copies(&ticket, 8)
        .iter()
        .find(|j| j.track == 3)
        .unwrap();
    drop(ticket);
    assert_eq!(vol.host_ahead(), 0);
    let write = h.spawn_write(3 * TRACK, vec![7; 512], false);
    h.steps(200);
    assert!(write.borrow().is_none(), "the track is the copy's");
    assert_eq!(
        vol.host_ahead(),
        1,
        "the waiting write tells the engine to start no new copies"
    );
    vol.finish_copy(job, true);
    let r = h.wait(&write);
    assert!(r.is_ok());
    assert_eq!(vol.host_ahead(), 0);
}

#[test]
fn copies_are_recorded_only_after_their_destination_flushed() {
    // Establish: every track stale, copied primary → secondary, whose
    // FLUSH fails. No copy may be recorded done (its data may be lost in
    // the secondary's cache); the secondary is split off instead.
    let mut h = Harness::without_engine(31, TRACK * TRACKS, TRACK, VolumeState::Syncing);
    let vol = h.vol.clone();
    vol.table(TableId::Stale).fill();
    h.disks.fail_secondary_flushes.set(true);
    let r = run(&mut h, cfg(OnError::Pause));
    assert_eq!(r.tracks, 0, "nothing recorded copied: {r:?}");
    assert!(
        r.errors
            .iter()
            .any(|e| e.degraded && e.message.contains("flushing the secondary")),
        "{:?}",
        r.errors
    );
    assert_eq!(vol.state(), VolumeState::Degraded);
    // Copied data flushed, then recorded: with healthy disks every track
    // is flushed before it is finished.
    let mut h = split_volume(37, &[]);
    let (vol, disks) = (h.vol.clone(), h.disks.clone());
    apply(&vol, PROTECTED_FULL);
    let r = run(&mut h, cfg(OnError::Pause));
    assert_eq!(r.tracks, TRACKS);
    assert!(
        disks.flush_log.borrow().contains(&Dev::Primary),
        "the engine flushed the restored primary"
    );
}
