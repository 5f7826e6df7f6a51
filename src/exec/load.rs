//! Host-load accounting: how busy the host is, so that the copy engine can
//! yield to it.

/// How busy the host is, for the copy engine to yield to it. Whoever runs
/// host requests (a ublk queue, a bench) holds a [`HostLoad::enter`] guard
/// per request; the engine only reads the counters. Two relaxed atomics per
/// request: cheap enough for the fast path.
#[derive(Debug, Default)]
pub struct HostLoad {
    inflight: std::sync::atomic::AtomicU64,
    started: std::sync::atomic::AtomicU64,
}

pub struct HostLoadGuard<'a>(&'a HostLoad);

impl HostLoad {
    pub fn enter(&self) -> HostLoadGuard<'_> {
        use std::sync::atomic::Ordering::Relaxed;
        self.started.fetch_add(1, Relaxed);
        self.inflight.fetch_add(1, Relaxed);
        HostLoadGuard(self)
    }

    /// Host requests in flight now.
    pub fn inflight(&self) -> u64 {
        self.inflight.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Host requests started so far (compare two readings to see whether
    /// the host was active in between).
    pub fn started(&self) -> u64 {
        self.started.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for HostLoadGuard<'_> {
    fn drop(&mut self) {
        self.0
            .inflight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}
