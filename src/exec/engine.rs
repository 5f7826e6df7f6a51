//! The copy engine: restore (secondary→primary), establish and resync
//! (primary→secondary), in concurrent batches ([`run_copies`]), plus the state changes that
//! start and end them. It is async over a [`Backend`] like the host path,
//! so the same code runs on an io_uring thread and in the simulation.

use crate::backend::buf::AlignedBuf;
use crate::backend::Backend;
use crate::core::{CopyJob, Dev, TransitionError, Volume};
use crate::edge::config::RestoreConfig;
use crate::exec::host::{admit, wait_commit, wait_on};
use crate::exec::load::HostLoad;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

pub use crate::edge::config::OnError;

/// How the copy engine runs. Built from `restore.*` in exactly one place,
/// [`EngineConfig::from_restore`].
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Tracks per batch (one `next_copies` pick, one round of submissions).
    pub batch: usize,
    /// Tracks being copied at once while the host is quiet.
    pub max_inflight: usize,
    /// Bytes per coalesced I/O: runs of adjacent tracks are copied together.
    pub max_io: u64,
    /// Copy bytes per second; 0 = unlimited.
    pub rate_limit: u64,
    pub on_error: OnError,
    /// Tracks being copied at once while host requests are running: copies
    /// queue in the same device queues as host I/O, so fewer of them keeps
    /// the host's tail latency close to idle while the copy still moves.
    pub busy_inflight: usize,
    /// Batches per metadata commit request (never one commit per track).
    pub commit_every: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig::from_restore(&RestoreConfig::default())
    }
}

impl EngineConfig {
    /// The one mapping from the user's `restore.*` keys.
    pub fn from_restore(r: &RestoreConfig) -> Self {
        let max_inflight = (r.max_inflight as usize).max(1);
        EngineConfig {
            batch: (r.batch as usize).clamp(1, max_inflight),
            max_inflight,
            max_io: 1 << 20,
            rate_limit: r.rate_limit,
            on_error: r.on_error,
            busy_inflight: (max_inflight / 8).max(1),
            commit_every: 8,
        }
    }

    /// [`Self::from_restore`] for a volume of `track_size` tracks whose
    /// coalesced copies may be up to `max_io` bytes (at least one track).
    pub fn for_volume(r: &RestoreConfig, track_size: u64, max_io: u64) -> Self {
        let mut cfg = EngineConfig::from_restore(r);
        cfg.max_io = max_io.max(track_size);
        if r.rate_limit > 0 {
            // The rate is charged per batch: keep a batch to about a tenth
            // of a second's worth, so a low limit is met smoothly rather
            // than in second-long bursts.
            let per_tenth = (r.rate_limit / 10 / track_size).max(1) as usize;
            cfg.batch = cfg.batch.min(per_tenth);
        }
        cfg
    }
}

/// A track the engine could not copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyError {
    pub track: u64,
    pub message: String,
    /// `on_error: skip` passed over this unreadable source track.
    pub skipped: bool,
    /// Writing the secondary failed: the volume went degraded.
    pub degraded: bool,
}

/// What one batch of [`run_copies`] did.
#[derive(Debug, Default, Clone)]
struct BatchResult {
    pub tracks: u64,
    pub bytes: u64,
    pub errors: Vec<CopyError>,
}

/// Copies up to `max` tracks; leaves commits to the caller.
async fn copy_tracks<B: Backend>(
    vol: &Volume,
    b: &B,
    max: usize,
    cfg: &EngineConfig,
) -> BatchResult {
    let ticket = admit(vol, b).await;
    let jobs = vol.next_copies(&ticket, max);
    let runs = coalesce(&jobs, cfg.max_io);
    let results = join_all(runs.iter().map(|run| copy_run(b, run))).await;
    let mut out = BatchResult::default();
    for (run, res) in runs.iter().zip(results) {
        for (job, res) in run.iter().zip(res) {
            // A skipped track counts as done for the table (it is no longer
            // pending) but not as copied.
            let done = match &res {
                Ok(()) => {
                    out.tracks += 1;
                    out.bytes += job.len;
                    true
                }
                Err(CopyFault::Read(e)) => {
                    // `on_error` is about unreadable sources only.
                    let skipped = cfg.on_error == OnError::Skip;
                    out.errors.push(CopyError {
                        track: job.track,
                        message: format!("reading the {}: {e}", dev_name(job.from)),
                        skipped,
                        degraded: false,
                    });
                    skipped
                }
                Err(CopyFault::Write(e)) => {
                    // A destination that cannot be written is never
                    // skipped: the primary (restoring) keeps the track
                    // pending and the copy pauses; the secondary
                    // (syncing, resyncing) is split off.
                    let degraded = job.to == Dev::Secondary;
                    if degraded {
                        vol.degrade();
                    }
                    out.errors.push(CopyError {
                        track: job.track,
                        message: format!("writing the {}: {e}", dev_name(job.to)),
                        skipped: false,
                        degraded,
                    });
                    false
                }
            };
            vol.finish_copy(*job, done);
        }
    }
    drop(ticket);
    out
}

/// What [`run_copies`] did.
#[derive(Debug, Default, Clone)]
pub struct RunReport {
    pub tracks: u64,
    pub bytes: u64,
    pub errors: Vec<CopyError>,
    /// Copy operations that ran to their end (a restore then its resync
    /// counts two).
    pub completed: u32,
    /// Stopped by a read error under `on_error: pause`.
    pub paused: bool,
}

/// Runs the copy operation(s) until nothing is left to copy, `stop` is set,
/// or an error pauses them.
///
/// Keeps up to `max_inflight` tracks in flight as concurrent batches (hot
/// tracks first: `next_copies` orders them), but only `busy_inflight` while
/// `load` shows host requests, so host I/O does not queue behind a deep
/// copy backlog. Honours `rate_limit` with a token bucket, requests a
/// metadata commit every `commit_every` batches, and ends each operation
/// with [`complete_if_done`] (restore → resync → established runs through).
pub async fn run_copies<B: Backend>(
    vol: &Volume,
    b: &B,
    cfg: &EngineConfig,
    stop: &AtomicBool,
    load: &HostLoad,
) -> io::Result<RunReport> {
    type Batch<'a> = Pin<Box<dyn Future<Output = BatchResult> + 'a>>;
    let mut report = RunReport::default();
    let mut bucket = TokenBucket::new(cfg.rate_limit, cfg.max_io);
    let mut running: Vec<(usize, Batch<'_>)> = Vec::new();
    let mut inflight = 0usize;
    let mut since_commit = 0usize;
    let mut host_seen = load.started();
    // A batch found nothing to pick: start no more until the running ones
    // end, then look at what is left.
    let mut dry = false;
    loop {
        let halt =
            stop.load(Ordering::Relaxed) || report.paused || vol.state().copy_kind().is_none();
        let host_now = load.started();
        let busy = load.inflight() > 0 || host_now != host_seen;
        host_seen = host_now;
        let cap = if busy {
            cfg.busy_inflight.min(cfg.max_inflight)
        } else {
            cfg.max_inflight
        }
        .max(1);
        // A host request waits for a commit (whose flush writes back every
        // copy issued before it): issue nothing new until it is through.
        let cap = if vol.commit_waiters() > 0 { 0 } else { cap };
        // Under load, two half-size batches keep the devices busy while one
        // of them is between its read and its write.
        let size = if busy { (cap / 2).max(1) } else { cfg.batch };
        while !halt && !dry && inflight < cap && bucket.ready() {
            let n = size.min(cap - inflight).max(1);
            running.push((n, Box::pin(copy_tracks(vol, b, n, cfg))));
            inflight += n;
        }
        if running.is_empty() {
            if halt {
                break;
            }
            if dry {
                dry = false;
                if vol.copy_remaining() == 0 {
                    if complete_if_done(vol, b).await? {
                        report.completed += 1;
                        // The next operation (a restore's resync) starts
                        // after the requests the state change held have
                        // had their turn, and after a stop that came
                        // meanwhile.
                        b.pause().await;
                    }
                    since_commit = 0;
                    continue;
                }
            }
            if bucket.ready() {
                // The tracks left are held by host writes, or a host write
                // waits for a commit: both end soon.
                b.pause().await;
            } else {
                b.sleep(bucket.time_to_ready()).await;
            }
            continue;
        }
        let (n, r) = next_done(&mut running).await;
        inflight -= n;
        bucket.spend(r.bytes);
        if r.tracks == 0 && r.errors.is_empty() {
            dry = true;
        }
        if r.changed_tables() {
            since_commit += 1;
            if since_commit >= cfg.commit_every {
                b.request_commit();
                since_commit = 0;
            }
        }
        report.tracks += r.tracks;
        report.bytes += r.bytes;
        if r.errors.iter().any(|e| !e.skipped && !e.degraded) {
            report.paused = true;
        }
        report.errors.extend(r.errors);
    }
    if since_commit > 0 {
        b.request_commit();
    }
    Ok(report)
}

/// Waits for the first of `running` to finish and removes it.
async fn next_done<T, F: Future<Output = T> + ?Sized>(
    running: &mut Vec<(usize, Pin<Box<F>>)>,
) -> (usize, T) {
    std::future::poll_fn(|cx| {
        for i in 0..running.len() {
            if let Poll::Ready(v) = running[i].1.as_mut().poll(cx) {
                let (n, _) = running.swap_remove(i);
                // Others may have completed in the same round; their wakes
                // were consumed by this poll, so ask to be polled again.
                cx.waker().wake_by_ref();
                return Poll::Ready((n, v));
            }
        }
        Poll::Pending
    })
    .await
}

/// Bytes-per-second limiter. Tokens may go negative (a batch is charged
/// when it ends, by what it copied); no batch starts until they are back
/// above zero. The burst is a tenth of a second's worth, so a limit is
/// smooth at the scale a host notices.
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// `rate` bytes/s (0 = unlimited); the burst is at least `min_burst`.
    pub fn new(rate: u64, min_burst: u64) -> Self {
        let rate = rate as f64;
        let burst = (rate / 10.0).max(min_burst as f64);
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            at: Instant::now(),
        }
    }

    /// Whether the next piece of work may start now.
    pub fn ready(&mut self) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let now = Instant::now();
        let dt = now.duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.tokens > 0.0
    }

    /// About how long until `ready` (between 100 µs and 50 ms).
    pub fn time_to_ready(&self) -> Duration {
        let deficit = if self.rate == 0.0 { 0.0 } else { -self.tokens };
        Duration::from_secs_f64((deficit / self.rate.max(1.0)).clamp(100e-6, 0.05))
    }

    pub fn spend(&mut self, bytes: u64) {
        if self.rate != 0.0 {
            self.tokens -= bytes as f64;
        }
    }

    /// For blocking callers (verify): sleeps until `ready`; false if `stop`
    /// was set meanwhile.
    pub fn wait_blocking(&mut self, stop: &std::sync::atomic::AtomicBool) -> bool {
        while !self.ready() {
            if stop.load(Ordering::Relaxed) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        !stop.load(Ordering::Relaxed)
    }
}

impl BatchResult {
    /// Whether the batch changed the tables (a commit has work to do).
    fn changed_tables(&self) -> bool {
        self.tracks > 0 || self.errors.iter().any(|e| e.skipped)
    }
}

/// Groups jobs on adjacent tracks into runs of at most `max_io` bytes.
fn coalesce(jobs: &[CopyJob], max_io: u64) -> Vec<Vec<CopyJob>> {
    let mut runs: Vec<Vec<CopyJob>> = Vec::new();
    for job in jobs {
        match runs.last_mut() {
            Some(run)
                if run.last().is_some_and(|l| l.track + 1 == job.track)
                    && run.iter().map(|j| j.len).sum::<u64>() + job.len <= max_io =>
            {
                run.push(*job)
            }
            _ => runs.push(vec![*job]),
        }
    }
    runs
}

/// Why a track could not be copied.
#[derive(Debug)]
enum CopyFault {
    /// The source could not be read.
    Read(io::Error),
    /// The destination could not be written.
    Write(io::Error),
}

fn dev_name(d: Dev) -> &'static str {
    match d {
        Dev::Primary => "primary",
        Dev::Secondary => "secondary",
    }
}

/// Copies a run of adjacent tracks in one I/O; if that fails, track by
/// track, so that one bad track does not fail (or skip) its neighbours.
async fn copy_run<B: Backend>(b: &B, run: &[CopyJob]) -> Vec<Result<(), CopyFault>> {
    match copy_span(b, run).await {
        Ok(()) => return run.iter().map(|_| Ok(())).collect(),
        Err(e) if run.len() == 1 => return vec![Err(e)],
        Err(_) => {}
    }
    let mut out = Vec::with_capacity(run.len());
    for job in run {
        out.push(copy_span(b, std::slice::from_ref(job)).await);
    }
    out
}

async fn copy_span<B: Backend>(b: &B, run: &[CopyJob]) -> Result<(), CopyFault> {
    let first = run[0];
    let len: u64 = run.iter().map(|j| j.len).sum();
    let mut buf: AlignedBuf = b.buffer(len as usize);
    b.read(first.from, first.offset, &mut buf)
        .await
        .map_err(CopyFault::Read)?;
    b.write(first.to, first.offset, &buf, false)
        .await
        .map_err(CopyFault::Write)
}

/// Runs a state change: closes the gate, waits for admitted requests to
/// finish, applies `change`, makes it durable (both devices flushed first),
/// and opens the gate again.
///
/// A state change is in force only once its flush and commit succeeded:
/// until then host I/O stays held (the gate stays closed) and both are
/// retried, with a log line, rather than resuming I/O in a state the
/// metadata does not record. A secondary whose flush fails is split off
/// instead (degraded); only the primary and the metadata are waited for.
/// The `io::Result` is always `Ok`; it is kept for callers that report it.
pub async fn transition<B: Backend, R>(
    vol: &Volume,
    b: &B,
    change: impl FnOnce(&Volume) -> Result<R, TransitionError>,
) -> io::Result<Result<R, TransitionError>> {
    while !vol.close_gate() {
        wait_on(b, vol.progress_wakes(), || !vol.gate_closed()).await;
    }
    // The last admitted request to end wakes us (see `Ticket`'s drop).
    while !vol.is_drained() {
        wait_on(b, vol.progress_wakes(), || vol.is_drained()).await;
    }
    let result = change(vol);
    make_durable(vol, b).await;
    vol.open_gate();
    Ok(result)
}

/// Delay between attempts to make a state change durable.
const DURABLE_RETRY: Duration = Duration::from_millis(500);

/// Flushes both devices and commits, until the primary's flush and the
/// commit succeed (see [`transition`]).
async fn make_durable<B: Backend>(vol: &Volume, b: &B) {
    let mut failures = 0u64;
    loop {
        // Both at once: this is on the path of `restore`'s instant return.
        let (p, s) = smol::future::zip(b.flush(Dev::Primary), b.flush(Dev::Secondary)).await;
        if let Err(e) = s {
            crate::exec::host::secondary_flush_failed(vol, &e);
        }
        let r = match p {
            Ok(()) => wait_commit(vol, b, vol.next_commit()).await,
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => {
                if failures > 0 {
                    log::info!(
                        "state change to {} is durable after {failures} failed attempts; host I/O resumes",
                        vol.state()
                    );
                }
                return;
            }
            Err(e) => {
                if failures == 0 {
                    log::error!(
                        "state change to {} is not durable ({e}); host I/O is held while it is retried every {} ms",
                        vol.state(),
                        DURABLE_RETRY.as_millis()
                    );
                }
                failures += 1;
                b.sleep(DURABLE_RETRY).await;
            }
        }
    }
}

/// Ends the running copy operation if nothing is left to copy.
pub async fn complete_if_done<B: Backend>(vol: &Volume, b: &B) -> io::Result<bool> {
    if vol.copy_remaining() > 0 {
        return Ok(false);
    }
    let r = transition(vol, b, |v| Ok(v.complete_if_done())).await?;
    Ok(r.unwrap_or(false))
}

/// Polls a set of futures to completion, results in order.
pub async fn join_all<F: Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    JoinAll {
        futs: futs.map(|f| Box::pin(f)).collect(),
        out: Vec::new(),
    }
    .await
}

struct JoinAll<F: Future> {
    futs: Vec<Pin<Box<F>>>,
    out: Vec<Option<F::Output>>,
}

impl<F: Future> Future for JoinAll<F> {
    type Output = Vec<F::Output>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // SAFETY: we never move the pinned futures out of their boxes.
        let this = unsafe { self.get_unchecked_mut() };
        if this.out.is_empty() {
            this.out = (0..this.futs.len()).map(|_| None).collect();
        }
        let mut pending = false;
        for (f, slot) in this.futs.iter_mut().zip(this.out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => *slot = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(this.out.drain(..).map(|o| o.expect("completed")).collect())
        }
    }
}

#[cfg(test)]
mod bucket_tests {
    use super::TokenBucket;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn token_bucket_limits_and_stops() {
        let stop = AtomicBool::new(false);
        let mut unlimited = TokenBucket::new(0, 4096);
        unlimited.spend(1 << 30);
        assert!(unlimited.ready());
        // 1 MiB/s, burst 100 KiB: spending a second's worth empties it.
        let mut b = TokenBucket::new(1 << 20, 4096);
        assert!(b.ready());
        b.spend(1 << 20);
        assert!(!b.ready(), "a debt of ~0.9 s is not paid at once");
        let hint = b.time_to_ready();
        assert_eq!(
            hint,
            std::time::Duration::from_millis(50),
            "long debts: capped"
        );
        let mut small = TokenBucket::new(1 << 20, 4096);
        small.spend((1 << 20) / 10 + 1024); // the burst and ~1 ms more
        let hint = small.time_to_ready();
        assert!(
            hint >= std::time::Duration::from_micros(500)
                && hint <= std::time::Duration::from_millis(2),
            "{hint:?}"
        );
        assert_eq!(
            unlimited.time_to_ready(),
            std::time::Duration::from_micros(100)
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(!b.wait_blocking(&stop), "stop ends the wait");
    }
}
