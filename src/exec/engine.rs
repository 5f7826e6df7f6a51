//! The copy engine: restore (secondary→primary), establish and resync
//! (primary→secondary), in concurrent batches ([`run_copies`]), plus the state changes that
//! start and end them. It is async over a [`Backend`] like the host path,
//! so the same code runs on an io_uring thread and in the simulation.

use crate::backend::buf::AlignedBuf;
use crate::backend::Backend;
use crate::core::{CopyJob, Dev, TransitionError, Volume};
use crate::edge::config::{RestoreConfig, RestorePriority};
use crate::exec::host::{admit, wait_commit, wait_on};
use crate::exec::load::{Histogram, HostLoad};
use crate::exec::pace::{Limits, PaceConfig, Pacer, Window};
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
    /// An upper bound on tracks being copied at once while host requests
    /// are running, on top of what the pacer allows (default: no bound
    /// beyond `max_inflight`; a bench knob).
    pub busy_inflight: usize,
    /// How the pacer weighs host latency against the copy's speed.
    pub priority: RestorePriority,
    /// Batches per metadata commit request (never one commit per track).
    pub commit_every: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig::from_restore(&RestoreConfig::default())
    }
}

impl EngineConfig {
    /// The I/O priority of copy I/O for `priority`: copies yield to host
    /// I/O in the device's scheduler too, where it honours priorities.
    pub fn io_priority(&self) -> crate::backend::uring::IoPriority {
        use crate::backend::uring::IoPriority;
        match self.priority {
            RestorePriority::Host => IoPriority::Idle,
            RestorePriority::Balanced => IoPriority::BestEffortLowest,
            RestorePriority::Restore => IoPriority::Default,
        }
    }

    /// The nice value of the copy engine's thread for `priority` (see
    /// [`crate::backend::uring::set_thread_nice`]): below the host path's
    /// threads unless the restore comes first. Not the lowest (19): the
    /// copy keeps a share of a busy CPU, so its floor still holds.
    pub fn thread_nice(&self) -> i32 {
        match self.priority {
            RestorePriority::Host => 10,
            RestorePriority::Balanced => 5,
            RestorePriority::Restore => 0,
        }
    }

    /// The one mapping from the user's `restore.*` keys.
    pub fn from_restore(r: &RestoreConfig) -> Self {
        let max_inflight = (r.max_inflight as usize).max(1);
        EngineConfig {
            batch: (r.batch as usize).clamp(1, max_inflight),
            max_inflight,
            max_io: 1 << 20,
            rate_limit: r.rate_limit,
            on_error: r.on_error,
            busy_inflight: max_inflight,
            priority: r.priority,
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

/// What one batch of [`run_copies`] did. Copied tracks are not finished
/// yet: they join a [`FlushGroup`], finished once their destination is
/// flushed.
struct BatchResult<'v> {
    /// Tracks the batch picked (0: nothing to pick now).
    picked: usize,
    group: FlushGroup<'v>,
    errors: Vec<CopyError>,
}

/// Copied tracks waiting for one flush of their destination, then
/// finished together ([`Volume::finish_flushed_copy`]). The copy engine
/// makes its own data durable, off the host's path: metadata commits
/// during a restore then flush nothing (a host merge's commit is one
/// metadata write), and no copy is recorded done before its data is
/// durable. The batches' admission tickets are held until then, so no
/// state change runs between a copy and its finish.
#[derive(Default)]
struct FlushGroup<'v> {
    copied: Vec<CopyJob>,
    /// `on_error: skip` tracks: nothing written, finished with the rest.
    skipped: Vec<CopyJob>,
    tickets: Vec<crate::core::Ticket<'v>>,
}

impl<'v> FlushGroup<'v> {
    fn tracks(&self) -> usize {
        self.copied.len() + self.skipped.len()
    }

    fn is_empty(&self) -> bool {
        self.tracks() == 0
    }

    fn join(&mut self, other: FlushGroup<'v>) {
        self.copied.extend(other.copied);
        self.skipped.extend(other.skipped);
        self.tickets.extend(other.tickets);
    }

    /// The device the copied tracks went to (one operation at a time).
    fn destination(&self) -> Option<Dev> {
        self.copied.first().map(|j| j.to)
    }

    /// Finishes the tracks after the flush: `flushed` is its result.
    fn finish(self, vol: &Volume, flushed: io::Result<()>, report: &mut RunReport) {
        for job in &self.skipped {
            vol.finish_flushed_copy(*job, true);
        }
        match flushed {
            Ok(()) => {
                for job in &self.copied {
                    vol.finish_flushed_copy(*job, true);
                    report.tracks += 1;
                    report.bytes += job.len;
                }
            }
            Err(e) => {
                // Not durable: the tracks stay to be copied again. A
                // secondary that cannot flush is split off as after any
                // failed secondary flush (its cache may have lost more
                // than these copies); the primary pauses the copy.
                let degraded = self.destination() == Some(Dev::Secondary);
                if degraded {
                    crate::exec::host::secondary_flush_failed(vol, &e);
                }
                for job in &self.copied {
                    vol.finish_copy(*job, false);
                }
                if let Some(job) = self.copied.first() {
                    report.errors.push(CopyError {
                        track: job.track,
                        message: format!("flushing the {}: {e}", dev_name(job.to)),
                        skipped: false,
                        degraded,
                    });
                    report.paused |= !degraded;
                }
            }
        }
        drop(self.tickets);
    }
}

/// Copies up to `max` tracks in I/Os of up to `io_bytes`; leaves the
/// finish (after a flush) and commits to the caller.
async fn copy_tracks<'v, B: Backend>(
    vol: &'v Volume,
    b: &B,
    max: usize,
    io_bytes: u64,
    cfg: &EngineConfig,
) -> BatchResult<'v> {
    let ticket = admit(vol, b).await;
    let jobs = vol.next_copies(&ticket, max);
    let runs = coalesce(&jobs, io_bytes);
    let results = join_all(runs.iter().map(|run| copy_run(b, run, io_bytes))).await;
    let mut out = BatchResult {
        picked: jobs.len(),
        group: FlushGroup::default(),
        errors: Vec::new(),
    };
    for (run, res) in runs.iter().zip(results) {
        for (job, res) in run.iter().zip(res) {
            match &res {
                Ok(()) => out.group.copied.push(*job),
                Err(CopyFault::Read(e)) => {
                    // `on_error` is about unreadable sources only. A skipped
                    // track counts as done for the table (it is no longer
                    // pending) but not as copied.
                    let skipped = cfg.on_error == OnError::Skip;
                    out.errors.push(CopyError {
                        track: job.track,
                        message: format!("reading the {}: {e}", dev_name(job.from)),
                        skipped,
                        degraded: false,
                    });
                    if skipped {
                        out.group.skipped.push(*job);
                    } else {
                        vol.finish_copy(*job, false);
                    }
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
                    vol.finish_copy(*job, false);
                }
            }
        }
    }
    if !out.group.is_empty() {
        out.group.tickets.push(ticket);
    }
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

/// Copied tracks wait at most about this long for their flush...
const GROUP_WAIT: Duration = Duration::from_millis(20);
/// ...or until this many full depths of them wait. Their tracks stay
/// locked until then: a host write to one waits. Measured with the
/// in-process bench (`restore_p99_ratio`): 4 depths or 50 ms held host
/// writes up to 20 ms (ratio 165); 1 depth or 20 ms gave 8.8.
const GROUP_DEPTHS: usize = 1;
/// How long the engine holds back new copies for host requests that wait
/// (for a commit, a merge or a track lock) before it starts one batch
/// anyway. Under a load that always has a request waiting (overlapping
/// writes wait for each other's track locks) the copy would otherwise
/// never move; this way it keeps at least one batch per hold-back.
const MAX_HOLD_BACK: Duration = Duration::from_millis(50);

/// A host-latency window closes after this many host requests...
const WINDOW_REQUESTS: u64 = 64;
/// ...or after this long, whichever comes first.
const WINDOW_MAX: Duration = Duration::from_millis(200);

/// Measures the host's requests window by window for the [`Pacer`].
struct WindowMeter {
    at: Instant,
    started: u64,
    hist: Histogram,
    copying: bool,
}

impl WindowMeter {
    fn new(load: &HostLoad, copying: bool) -> Self {
        WindowMeter {
            at: Instant::now(),
            started: load.started(),
            hist: load.histogram(),
            copying,
        }
    }

    /// Host requests started since the window opened.
    fn requests(&self, load: &HostLoad) -> u64 {
        load.started().wrapping_sub(self.started)
    }

    /// The window, if it is complete; a new one opens then.
    fn close_if_due(&mut self, load: &HostLoad, copying_now: bool) -> Option<Window> {
        self.copying |= copying_now;
        let requests = self.requests(load);
        if requests < WINDOW_REQUESTS && self.at.elapsed() < WINDOW_MAX {
            return None;
        }
        let hist = load.histogram();
        let w = Window {
            host_requests: requests,
            p99: hist.since(&self.hist).quantile(0.99),
            copying: self.copying,
        };
        *self = WindowMeter {
            at: Instant::now(),
            started: self.started.wrapping_add(requests),
            hist,
            copying: copying_now,
        };
        Some(w)
    }
}

/// What runs concurrently in [`run_copies`]: batches and flushes.
enum Done<'v> {
    Batch(BatchResult<'v>),
    Flushed(FlushGroup<'v>, io::Result<()>),
}

/// Runs the copy operation(s) until nothing is left to copy, `stop` is set,
/// or an error pauses them.
///
/// Keeps tracks in flight as concurrent batches (hot tracks first:
/// `next_copies` orders them), as many and in I/Os as large as the
/// [`Pacer`] allows from the host's latency (`restore.priority`), none
/// while a host merge runs or a host request waits for a commit or a
/// track. Copied tracks are flushed on their destination in groups
/// (`GROUP_DEPTHS` full depths, or after `GROUP_WAIT`), then finished.
/// Honours `rate_limit` with a token bucket, requests a metadata commit
/// every `commit_every` groups, and ends each operation with
/// [`complete_if_done`] (restore → resync → established runs through).
pub async fn run_copies<B: Backend>(
    vol: &Volume,
    b: &B,
    cfg: &EngineConfig,
    stop: &AtomicBool,
    load: &HostLoad,
) -> io::Result<RunReport> {
    type Task<'a> = Pin<Box<dyn Future<Output = Done<'a>> + 'a>>;
    let mut report = RunReport::default();
    let mut bucket = TokenBucket::new(cfg.rate_limit, cfg.max_io);
    // (tracks, task): tracks in flight of a batch; 0 for the flush
    let mut running: Vec<(usize, Task<'_>)> = Vec::new();
    let mut inflight = 0usize;
    let mut flushing = false;
    let mut group = FlushGroup::default();
    // When the oldest track of `group` was copied.
    let mut group_since: Option<Instant> = None;
    let mut since_commit = 0usize;
    let track = vol.geometry().track_size();
    let mut pacer = Pacer::new(PaceConfig::for_priority(
        cfg.priority,
        cfg.max_inflight,
        (cfg.max_io / track.max(1)) as usize,
        track,
    ));
    let mut meter = WindowMeter::new(load, false);
    // A batch found nothing to pick: start no more until the running ones
    // end, then look at what is left.
    let mut dry = false;
    let mut hold_back = HoldBack::default();
    loop {
        let halt =
            stop.load(Ordering::Relaxed) || report.paused || vol.state().copy_kind().is_none();
        let copying = inflight > 0 || flushing;
        if let Some(w) = meter.close_if_due(load, copying) {
            pacer.observe(&w);
        }
        if pacer.probing() && !copying && meter.copying {
            // The copies drained: the probe window starts clean.
            meter = WindowMeter::new(load, false);
        }
        let host_busy = load.inflight() > 0 || meter.requests(load) > 0;
        if host_busy {
            pacer.host_active();
        }
        let lim = pacer.limits();
        load.set_copy_depth(lim.tracks() as u64);
        let cap = copy_cap(cfg, &lim, host_busy, hold_back.decide(vol));
        let io_bytes = lim.io_bytes(track);
        let size = cfg.batch.min(cap).max(1);
        while !halt && !dry && inflight < cap && bucket.ready() {
            let n = size.min(cap - inflight).max(1);
            hold_back.started();
            running.push((
                n,
                Box::pin(async move { Done::Batch(copy_tracks(vol, b, n, io_bytes, cfg).await) }),
            ));
            inflight += n;
        }
        // Flush what was copied once `GROUP_DEPTHS` depths' worth waits, or
        // the oldest has waited `GROUP_WAIT` (its track stays locked until
        // then), or no batch runs (the engine holds back for a host
        // request that waits: it may wait for these very tracks), or
        // nothing more will be copied for now. Not after every batch: at
        // the pacer's floor that would be a flush of the primary per
        // track.
        let group_due = group.tracks() >= GROUP_DEPTHS * cfg.max_inflight
            || inflight == 0
            || halt
            || dry
            || group_since.is_some_and(|t| t.elapsed() >= GROUP_WAIT);
        if !flushing && !group.is_empty() && group_due {
            group_since = None;
            let g = std::mem::take(&mut group);
            match g.destination() {
                Some(dev) => {
                    flushing = true;
                    running.push((
                        0,
                        Box::pin(async move {
                            let r = b.flush(dev).await;
                            Done::Flushed(g, r)
                        }),
                    ));
                }
                // Only skipped tracks: nothing to flush.
                None => {
                    g.finish(vol, Ok(()), &mut report);
                    since_commit += 1;
                }
            }
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
                // The tracks left are held by host writes, a host request
                // waits for a commit or merges, or the pacer probes: all
                // end soon.
                b.pause().await;
            } else {
                b.sleep(bucket.time_to_ready()).await;
            }
            continue;
        }
        let (n, done) = next_done(&mut running).await;
        match done {
            Done::Batch(r) => {
                inflight -= n;
                bucket.spend(r.group.copied.iter().map(|j| j.len).sum());
                if r.picked == 0 {
                    dry = true;
                }
                if r.errors.iter().any(|e| !e.skipped && !e.degraded) {
                    report.paused = true;
                }
                report.errors.extend(r.errors);
                if !r.group.is_empty() && group_since.is_none() {
                    group_since = Some(Instant::now());
                }
                group.join(r.group);
            }
            Done::Flushed(g, res) => {
                flushing = false;
                g.finish(vol, res, &mut report);
                since_commit += 1;
            }
        }
        if since_commit >= cfg.commit_every {
            b.request_commit();
            since_commit = 0;
        }
    }
    load.set_copy_depth(0);
    if since_commit > 0 {
        b.request_commit();
    }
    Ok(report)
}

/// Whether host requests are waiting now, and for how long the engine
/// has held back its copies for them.
#[derive(Default)]
struct HoldBack {
    /// Since when host requests have waited with no copy started.
    since: Option<Instant>,
}

/// What [`HoldBack::decide`] allows.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Yield {
    /// No host request waits: the pacer decides.
    No,
    /// Host requests wait: no new copy.
    Hold,
    /// They have waited `MAX_HOLD_BACK` with no copy started: one batch.
    Overdue,
}

impl HoldBack {
    fn decide(&mut self, vol: &Volume) -> Yield {
        if vol.commit_waiters() == 0 && vol.host_ahead() == 0 {
            self.since = None;
            return Yield::No;
        }
        match self.since {
            None => {
                self.since = Some(Instant::now());
                Yield::Hold
            }
            Some(t) if t.elapsed() >= MAX_HOLD_BACK => Yield::Overdue,
            Some(_) => Yield::Hold,
        }
    }

    /// A batch started: the next hold-back counts from now.
    fn started(&mut self) {
        if self.since.is_some() {
            self.since = Some(Instant::now());
        }
    }
}

/// Tracks the engine may have in flight now: what the pacer allows
/// (bounded by `busy_inflight` while the host is busy), and none while a
/// host merge runs or a host request waits for a commit or a track (they
/// go first: the merge's two I/Os would otherwise queue behind new
/// copies, and the copy holds its tracks until its group's flush), except
/// one track once they have waited [`MAX_HOLD_BACK`].
fn copy_cap(cfg: &EngineConfig, lim: &Limits, host_busy: bool, waits: Yield) -> usize {
    let cap = lim.tracks().min(cfg.max_inflight);
    match waits {
        Yield::Hold => 0,
        Yield::Overdue => cap.min(1),
        Yield::No if host_busy => cap.min(cfg.busy_inflight.max(1)),
        Yield::No => cap,
    }
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

/// Copies a run of adjacent tracks in one I/O (a track in pieces of
/// `io_bytes`, when the pacer splits tracks); if that fails, track by
/// track, so that one bad track does not fail (or skip) its neighbours.
async fn copy_run<B: Backend>(b: &B, run: &[CopyJob], io_bytes: u64) -> Vec<Result<(), CopyFault>> {
    match copy_span(b, run, io_bytes).await {
        Ok(()) => return run.iter().map(|_| Ok(())).collect(),
        Err(e) if run.len() == 1 => return vec![Err(e)],
        Err(_) => {}
    }
    let mut out = Vec::with_capacity(run.len());
    for job in run {
        out.push(copy_span(b, std::slice::from_ref(job), io_bytes).await);
    }
    out
}

/// Copies `run` in I/Os of at most `io_bytes`, each piece read then
/// written before the next is read: the copy never has more than one
/// piece's I/O queued on a device.
async fn copy_span<B: Backend>(b: &B, run: &[CopyJob], io_bytes: u64) -> Result<(), CopyFault> {
    let first = run[0];
    let len = run.iter().map(|j| j.len).sum::<u64>() as usize;
    let mut buf: AlignedBuf = b.buffer(len);
    let piece = (io_bytes as usize).clamp(4096, len.max(4096));
    for at in (0..len).step_by(piece) {
        let bytes = at..(at + piece).min(len);
        let offset = first.offset + at as u64;
        b.read(first.from, offset, &mut buf[bytes.clone()])
            .await
            .map_err(CopyFault::Read)?;
        b.write(first.to, offset, &buf[bytes], false)
            .await
            .map_err(CopyFault::Write)?;
    }
    Ok(())
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
        match s {
            Ok(()) => vol.secondary_flushed(),
            Err(e) => {
                crate::exec::host::secondary_flush_failed(vol, &e);
            }
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

#[cfg(test)]
mod hold_back_tests {
    use super::{copy_cap, EngineConfig, HoldBack, Yield, MAX_HOLD_BACK};
    use crate::core::{Geometry, Volume};
    use crate::exec::pace::{PaceConfig, Pacer};

    /// Host requests that keep waiting hold the copy back only for a while:
    /// after `MAX_HOLD_BACK` one batch starts, and the next one waits again.
    #[test]
    fn waiting_host_requests_hold_copies_back_for_a_bounded_time() {
        let vol = Volume::formatted(Geometry::new(1 << 20, 64 << 10).unwrap(), true);
        let mut h = HoldBack::default();
        assert_eq!(h.decide(&vol), Yield::No);
        let waiting = vol.ahead_guard();
        assert_eq!(h.decide(&vol), Yield::Hold);
        std::thread::sleep(MAX_HOLD_BACK);
        assert_eq!(h.decide(&vol), Yield::Overdue);
        h.started();
        assert_eq!(h.decide(&vol), Yield::Hold);
        drop(waiting);
        assert_eq!(h.decide(&vol), Yield::No);

        let cfg = EngineConfig::default();
        let track = 64 << 10;
        let lim = Pacer::new(PaceConfig::for_priority(
            cfg.priority,
            cfg.max_inflight,
            (cfg.max_io / track) as usize,
            track,
        ))
        .limits();
        assert_eq!(copy_cap(&cfg, &lim, true, Yield::Hold), 0);
        assert_eq!(copy_cap(&cfg, &lim, true, Yield::Overdue), 1);
        assert!(copy_cap(&cfg, &lim, false, Yield::No) >= 1);
    }
}
