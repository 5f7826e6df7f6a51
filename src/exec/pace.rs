//! How much the copy engine copies at once while the host works.
//!
//! A copy shares the devices' queues with host I/O: every copy I/O queued
//! ahead of a host request adds its service time to that request's
//! latency. The [`Pacer`] watches the host's p99 latency, window by
//! window, against an idle baseline and sets how many copy I/Os may be in
//! flight and how large each may be (AIMD: halve on a window above the
//! target, once per doubling of the excess; grow by one step after some
//! windows in a row well below it; jump to full speed when the host is
//! away, and back to the last busy limits at the host's first request, so
//! a load that starts during a copy never meets it at full speed for the
//! windows a descent from there would take). It never goes below a floor,
//! so a copy under constant host load still ends.
//!
//! Below one track at a time it *splits* each track's copy into smaller
//! I/Os, one after the other (down to [`MIN_SPLIT_IO`]): a host request
//! queued behind the copy then waits for one small I/O, not a whole track
//! (on the bench disk, a 4 KiB write behind one 128 KiB copy I/O at a
//! time had 3.4× its idle p99; behind 32 KiB ones, 1.9×).
//!
//! The baseline is the host's p99 in a window with no copy in flight: the
//! pacer asks for one such *probe* window at the start and then every
//! `probe_every` windows (a few percent of the copy's time).
//!
//! Pure arithmetic over windows the engine measures: no clock, no I/O, so
//! the tests drive it with made-up windows.

use crate::edge::config::RestorePriority;
use std::time::Duration;

/// The smallest copy I/O the pacer splits a track into: behind 32 KiB
/// pieces a 4 KiB host write is already near its idle p99 (1.9× on the
/// bench disk), and smaller ones would cost the copy more I/Os per byte
/// for what little is left.
pub const MIN_SPLIT_IO: u64 = 32 << 10;

/// The pacer's bounds and targets, from `restore.priority`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PaceConfig {
    /// Copy I/Os in flight at most.
    pub max_ios: usize,
    /// Tracks per copy I/O at most.
    pub max_io_tracks: usize,
    /// Host p99 allowed, as a multiple of the idle baseline; `None`: never
    /// yield (full depth whatever the host does).
    pub target: Option<f64>,
    /// The floor: never fewer copy I/Os than this...
    pub floor_ios: usize,
    /// ...nor smaller ones (tracks)...
    pub floor_io_tracks: usize,
    /// ...nor tracks cut into more I/Os than this (1: never split).
    pub max_split: usize,
    /// Windows in a row well under the target before the copy grows by
    /// one step: a window's p99 is nearly its slowest request, so a copy
    /// that grows at every calm window spends much of its time one step
    /// over the target, and the host's p99 over a long run is set there.
    pub calm_windows: u32,
    /// Windows between two probes of the idle baseline.
    pub probe_every: u32,
}

impl PaceConfig {
    /// The bounds for `priority` when the engine may keep `max_inflight`
    /// tracks of `track_size` bytes in flight in I/Os of up to
    /// `max_io_tracks` tracks.
    pub fn for_priority(
        priority: RestorePriority,
        max_inflight: usize,
        max_io_tracks: usize,
        track_size: u64,
    ) -> Self {
        let max_io_tracks = max_io_tracks.clamp(1, max_inflight.max(1));
        let max_ios = (max_inflight / max_io_tracks).max(1);
        let (target, floor_ios, floor_io_tracks, max_split, calm_windows) = match priority {
            // p99 within 1.5× idle leaves room for the bucket width (≤ 25 %)
            // under a goal of 2×; one track at a time, in the smallest
            // split I/Os, is the floor.
            RestorePriority::Host => (Some(1.5), 1, 1, splits(track_size), 8),
            RestorePriority::Balanced => (Some(3.0), 1, max_io_tracks.div_ceil(2), 1, 1),
            RestorePriority::Restore => (None, max_ios, max_io_tracks, 1, 1),
        };
        PaceConfig {
            max_ios,
            max_io_tracks,
            target,
            floor_ios: floor_ios.min(max_ios),
            floor_io_tracks: floor_io_tracks.min(max_io_tracks),
            max_split,
            calm_windows,
            probe_every: 50,
        }
    }

    /// The floor's limits.
    fn floor(&self) -> Limits {
        Limits {
            ios: self.floor_ios,
            io_tracks: self.floor_io_tracks,
            split: self.max_split,
        }
    }

    fn full(&self) -> Limits {
        Limits {
            ios: self.max_ios,
            io_tracks: self.max_io_tracks,
            split: 1,
        }
    }
}

/// Into how many I/Os a track's copy may be split: halvings while the
/// pieces stay whole 4 KiB blocks of at least [`MIN_SPLIT_IO`].
fn splits(track_size: u64) -> usize {
    let mut n = 1u64;
    while (track_size / (n * 2)) >= MIN_SPLIT_IO && track_size.is_multiple_of(n * 2 * 4096) {
        n *= 2;
    }
    n as usize
}

/// What the engine saw during one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Window {
    /// Host requests started in the window.
    pub host_requests: u64,
    /// The host's p99 latency over the requests that ended in the window
    /// (`None`: none ended).
    pub p99: Option<Duration>,
    /// Whether any copy I/O was in flight during the window.
    pub copying: bool,
}

/// What the engine may have in flight now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Copy I/Os in flight; 0 while a probe window is due or running.
    pub ios: usize,
    /// Tracks per copy I/O.
    pub io_tracks: usize,
    /// I/Os each track's copy is cut into, one after the other (1: whole
    /// tracks; more only at one track per I/O).
    pub split: usize,
}

impl Limits {
    /// Tracks in flight.
    pub fn tracks(&self) -> usize {
        self.ios * self.io_tracks
    }

    /// Bytes per copy I/O, for tracks of `track_size` bytes.
    pub fn io_bytes(&self, track_size: u64) -> u64 {
        if self.split > 1 {
            track_size / self.split as u64
        } else {
            self.io_tracks as u64 * track_size
        }
    }
}

/// The AIMD controller (see the module's comment).
#[derive(Debug, Clone)]
pub struct Pacer {
    cfg: PaceConfig,
    now: Limits,
    baseline: Option<Duration>,
    since_probe: u32,
    probing: bool,
    /// While the host is away (full speed): the limits to resume at its
    /// next request. The floor before the host was ever seen: a restore
    /// started under load begins gently and grows from there.
    away: Option<Limits>,
    /// Calm windows in a row so far.
    calm: u32,
}

impl Pacer {
    /// Starts at full speed as if the host were away; its first request
    /// brings the limits down to the floor ([`Self::host_active`]).
    pub fn new(cfg: PaceConfig) -> Self {
        Pacer {
            cfg,
            now: cfg.full(),
            baseline: None,
            since_probe: 0,
            probing: false,
            away: cfg.target.map(|_| cfg.floor()),
            calm: 0,
        }
    }

    pub fn config(&self) -> &PaceConfig {
        &self.cfg
    }

    pub fn limits(&self) -> Limits {
        Limits {
            ios: if self.probing { 0 } else { self.now.ios },
            ..self.now
        }
    }

    /// Whether the engine should let its copies drain for a probe window.
    pub fn probing(&self) -> bool {
        self.probing
    }

    /// The host's idle p99, once probed.
    pub fn baseline(&self) -> Option<Duration> {
        self.baseline
    }

    /// The host has a request running or started one: if the pacer ran at
    /// full speed because the host was away, it drops to the limits it had
    /// under load at once, without waiting for a window to close (a window
    /// takes up to 64 requests; halving from full speed would take several).
    pub fn host_active(&mut self) {
        if let Some(busy) = self.away.take() {
            self.now = busy;
        }
    }

    /// Takes one window into account.
    pub fn observe(&mut self, w: &Window) {
        let Some(target) = self.cfg.target else {
            self.full_speed();
            return;
        };
        if w.host_requests == 0 {
            // The host is away: nothing to yield to.
            if self.away.is_none() {
                self.away = Some(self.now);
            }
            self.full_speed();
            self.probing = false;
            return;
        }
        self.host_active();
        let Some(p99) = w.p99 else { return };
        if !w.copying {
            // A window with no copy in flight: the host's own latency.
            self.baseline = Some(p99);
            self.probing = false;
            self.since_probe = 0;
            return;
        }
        let Some(baseline) = self.baseline else {
            // Busy host, no reference yet: measure one first.
            self.probing = true;
            return;
        };
        // A copying window faster than the baseline: the baseline was high.
        self.baseline = Some(baseline.min(p99));
        let ratio = p99.as_secs_f64() / baseline.as_secs_f64().max(1e-9);
        let calm = ratio < target * 0.75;
        self.calm = if calm { self.calm + 1 } else { 0 };
        if ratio > target {
            // Once per doubling over the target: a copy far too deep for
            // the host gets there in one window, not one halving a window.
            let halvings = (ratio / target).log2().ceil().clamp(1.0, 16.0) as u32;
            for _ in 0..halvings {
                self.decrease();
            }
        } else if calm && self.calm >= self.cfg.calm_windows {
            self.calm = 0;
            self.increase();
        }
        self.since_probe += 1;
        if self.since_probe >= self.cfg.probe_every {
            self.probing = true;
        }
    }

    fn full_speed(&mut self) {
        self.now = self.cfg.full();
    }

    /// Fewer I/Os first (queueing), then smaller ones (service time),
    /// then tracks split into smaller I/Os still.
    fn decrease(&mut self) {
        let (now, cfg) = (&mut self.now, &self.cfg);
        if now.ios > cfg.floor_ios {
            now.ios = (now.ios / 2).max(cfg.floor_ios);
        } else if now.io_tracks > cfg.floor_io_tracks {
            now.io_tracks = (now.io_tracks / 2).max(cfg.floor_io_tracks);
        } else if now.io_tracks == 1 {
            now.split = (now.split * 2).min(cfg.max_split);
        }
    }

    /// The reverse order, one step at a time.
    fn increase(&mut self) {
        let (now, cfg) = (&mut self.now, &self.cfg);
        if now.split > 1 {
            now.split /= 2;
        } else if now.io_tracks < cfg.max_io_tracks {
            now.io_tracks += 1;
        } else if now.ios < cfg.max_ios {
            now.ios += 1;
        }
    }
}
