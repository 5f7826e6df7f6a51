//! Host-load accounting: how busy the host is and how long its requests
//! take, so that the copy engine can yield to it.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Latency buckets: four per power of two of nanoseconds (a bucket is at
/// most 19 % wide), from 1 µs (2^10 ns) to about 1 s (2^30 ns).
const SUB: u32 = 4;
const LOW_OCTAVE: u32 = 10;
const OCTAVES: u32 = 20;
pub const BUCKETS: usize = (OCTAVES * SUB) as usize;

/// How busy the host is, for the copy engine to yield to it. Whoever runs
/// host requests (a ublk queue, a bench) holds a [`HostLoad::enter`] guard
/// per request; the guard of a read or a write also records the request's
/// latency in a histogram when it ends ([`HostLoad::enter_untimed`] for
/// flushes, whose latency says nothing about queueing). The engine only
/// reads the counters. A few relaxed atomics per request: cheap enough for
/// the fast path.
#[derive(Debug)]
pub struct HostLoad {
    inflight: AtomicU64,
    started: AtomicU64,
    latency: [AtomicU64; BUCKETS],
    /// Tracks the copy engine allows itself in flight now (for `status`).
    copy_depth: AtomicU64,
}

impl Default for HostLoad {
    fn default() -> Self {
        HostLoad {
            inflight: AtomicU64::new(0),
            started: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            copy_depth: AtomicU64::new(0),
        }
    }
}

pub struct HostLoadGuard<'a> {
    load: &'a HostLoad,
    started: Option<Instant>,
}

impl HostLoad {
    /// A host read or write starts; its latency is recorded when the guard
    /// is dropped.
    pub fn enter(&self) -> HostLoadGuard<'_> {
        self.count();
        HostLoadGuard {
            load: self,
            started: Some(Instant::now()),
        }
    }

    /// A host request whose latency is not recorded (a flush).
    pub fn enter_untimed(&self) -> HostLoadGuard<'_> {
        self.count();
        HostLoadGuard {
            load: self,
            started: None,
        }
    }

    fn count(&self) {
        self.started.fetch_add(1, Relaxed);
        self.inflight.fetch_add(1, Relaxed);
    }

    /// Host requests in flight now.
    pub fn inflight(&self) -> u64 {
        self.inflight.load(Relaxed)
    }

    /// Host requests started so far (compare two readings to see whether
    /// the host was active in between).
    pub fn started(&self) -> u64 {
        self.started.load(Relaxed)
    }

    /// Records one host request's latency.
    pub fn record(&self, d: Duration) {
        self.latency[bucket(d)].fetch_add(1, Relaxed);
    }

    /// The copy engine publishes how many tracks it allows in flight.
    pub fn set_copy_depth(&self, tracks: u64) {
        self.copy_depth.store(tracks, Relaxed);
    }

    /// Tracks the copy engine allows in flight now (0: none running, or
    /// holding back for the host).
    pub fn copy_depth(&self) -> u64 {
        self.copy_depth.load(Relaxed)
    }

    /// The latency histogram so far (subtract two readings for a window).
    pub fn histogram(&self) -> Histogram {
        Histogram(std::array::from_fn(|i| self.latency[i].load(Relaxed)))
    }
}

impl Drop for HostLoadGuard<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.started {
            self.load.record(t.elapsed());
        }
        self.load.inflight.fetch_sub(1, Relaxed);
    }
}

/// Counts of host request latencies per bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Histogram(pub [u64; BUCKETS]);

impl Default for Histogram {
    fn default() -> Self {
        Histogram([0; BUCKETS])
    }
}

impl Histogram {
    /// The requests recorded since `earlier`.
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        Histogram(std::array::from_fn(|i| {
            self.0[i].saturating_sub(earlier.0[i])
        }))
    }

    pub fn count(&self) -> u64 {
        self.0.iter().sum()
    }

    /// The `q` quantile (0..=1), as the upper edge of its bucket; `None`
    /// when empty.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = ((n as f64 * q).ceil() as u64).clamp(1, n);
        let mut seen = 0;
        for (i, c) in self.0.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(upper_edge(i));
            }
        }
        Some(upper_edge(BUCKETS - 1))
    }
}

/// The bucket of a latency.
pub fn bucket(d: Duration) -> usize {
    let ns = d.as_nanos().clamp(1 << LOW_OCTAVE, u128::from(u64::MAX)) as u64;
    let octave = 63 - ns.leading_zeros();
    // The two bits below the leading one pick the quarter of the octave.
    let sub = ((ns >> (octave - 2)) & 0b11) as u32;
    let i = (octave - LOW_OCTAVE) * SUB + sub;
    (i as usize).min(BUCKETS - 1)
}

/// The largest latency of bucket `i`.
pub fn upper_edge(i: usize) -> Duration {
    let octave = i as u32 / SUB + LOW_OCTAVE;
    let sub = u64::from(i as u32 % SUB);
    let base = 1u64 << octave;
    Duration::from_nanos(base + (base / 4) * (sub + 1) - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_narrow() {
        assert_eq!(
            bucket(Duration::from_nanos(1)),
            0,
            "below 1 µs: the first bucket"
        );
        for us in [2u64, 3, 150, 300, 310, 765, 4000, 100_000] {
            let d = Duration::from_micros(us);
            let edge = upper_edge(bucket(d));
            assert!(edge >= d, "{us} µs: edge {edge:?}");
            assert!(
                edge.as_nanos() as f64 <= d.as_nanos() as f64 * 1.25 + 1.0,
                "{us} µs: edge {edge:?} too wide"
            );
        }
        assert!(bucket(Duration::from_micros(300)) < bucket(Duration::from_micros(400)));
        assert_eq!(bucket(Duration::from_secs(100)), BUCKETS - 1);
    }

    #[test]
    fn quantiles_of_a_window() {
        let load = HostLoad::default();
        let before = load.histogram();
        for _ in 0..98 {
            load.record(Duration::from_micros(300));
        }
        load.record(Duration::from_millis(4));
        load.record(Duration::from_millis(8));
        let w = load.histogram().since(&before);
        assert_eq!(w.count(), 100);
        let p50 = w.quantile(0.5).unwrap();
        assert!(p50 >= Duration::from_micros(300) && p50 < Duration::from_micros(400));
        let p99 = w.quantile(0.99).unwrap();
        assert!(p99 >= Duration::from_millis(4) && p99 < Duration::from_millis(5));
        assert_eq!(Histogram::default().quantile(0.99), None);
        let g = load.enter_untimed();
        drop(g);
        assert_eq!(
            load.histogram().count(),
            100,
            "an untimed request is not recorded"
        );
        drop(load.enter());
        assert_eq!(load.histogram().count(), 101);
        assert_eq!(load.inflight(), 0);
        assert_eq!(load.started(), 2);
    }
}
