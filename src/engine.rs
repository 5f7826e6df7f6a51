//! The copy engine: restore (secondary→primary), establish and resync
//! (primary→secondary), one batch at a time, plus the state changes that
//! start and end them. It is async over a [`Backend`] like the host path,
//! so the same code runs on an io_uring thread and in the simulation.

use crate::core::{CopyJob, TransitionError, Volume};
use crate::hostpath::{admit, wait_commit, AlignedBuf, Backend};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

/// What a copy read error does (`restore.on_error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Stop copying; the failing track stays pending and reads of it fail.
    #[default]
    Pause,
    /// Leave the track as it is on the destination and list it.
    Skip,
}

#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Tracks per batch.
    pub batch: usize,
    /// Bytes per coalesced I/O: runs of adjacent tracks are copied together.
    pub max_io: u64,
    pub on_error: OnError,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            batch: 32,
            max_io: 1 << 20,
            on_error: OnError::Pause,
        }
    }
}

/// A track the engine could not copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyError {
    pub track: u64,
    pub message: String,
    pub skipped: bool,
}

#[derive(Debug, Default, Clone)]
pub struct BatchResult {
    pub tracks: u64,
    pub bytes: u64,
    pub errors: Vec<CopyError>,
}

/// Copies one batch of tracks (the host's waiting tracks first). The
/// destination is not flushed here: the commit that records the copy
/// flushes it first (see the metadata store), once per group of batches.
pub async fn copy_batch<B: Backend>(vol: &Volume, b: &B, cfg: &EngineConfig) -> BatchResult {
    let ticket = admit(vol, b).await;
    let jobs = vol.next_copies(&ticket, cfg.batch);
    let runs = coalesce(&jobs, cfg.max_io);
    let results = join_all(runs.iter().map(|run| copy_run(b, run))).await;
    let mut out = BatchResult::default();
    for (run, res) in runs.iter().zip(results) {
        for (job, res) in run.iter().zip(res) {
            let ok = match &res {
                Ok(()) => true,
                Err(e) => {
                    let skipped = cfg.on_error == OnError::Skip;
                    out.errors.push(CopyError {
                        track: job.track,
                        message: e.to_string(),
                        skipped,
                    });
                    skipped
                }
            };
            if ok {
                out.tracks += 1;
                out.bytes += job.len;
            }
            vol.finish_copy(*job, ok);
        }
    }
    if out.tracks > 0 {
        b.request_commit();
    }
    drop(ticket);
    out
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

/// Copies a run of adjacent tracks in one I/O; if that fails, track by
/// track, so that one bad track does not fail (or skip) its neighbours.
async fn copy_run<B: Backend>(b: &B, run: &[CopyJob]) -> Vec<io::Result<()>> {
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

async fn copy_span<B: Backend>(b: &B, run: &[CopyJob]) -> io::Result<()> {
    let first = run[0];
    let len: u64 = run.iter().map(|j| j.len).sum();
    let mut buf: AlignedBuf = b.buffer(len as usize);
    b.read(first.from, first.offset, &mut buf).await?;
    b.write(first.to, first.offset, &buf, false).await
}

/// Runs a state change: closes the gate, waits for admitted requests to
/// finish, applies `change`, makes it durable (both devices flushed first),
/// and opens the gate again.
pub async fn transition<B: Backend, R>(
    vol: &Volume,
    b: &B,
    change: impl FnOnce(&Volume) -> Result<R, TransitionError>,
) -> io::Result<Result<R, TransitionError>> {
    while !vol.close_gate() {
        b.pause().await;
    }
    while !vol.is_drained() {
        b.pause().await;
    }
    let result = change(vol);
    let flushed = async {
        for dev in crate::core::DevSet::BOTH.devs() {
            b.flush(dev).await?;
        }
        wait_commit(vol, b, vol.clock.next()).await
    }
    .await;
    vol.open_gate();
    flushed.map(|()| result)
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
