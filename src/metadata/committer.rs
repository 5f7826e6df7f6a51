//! The committer thread: group commits on request, and every `interval`
//! an aging pass of write intent followed by a commit if it cleared
//! anything.

use super::device::MetaDevice;
use super::restore_log::RestoreLogWriter;
use super::store::MetadataStore;
use super::DataFlush;
use crate::core::{CommitSeq, DevSet, Volume, VolumeState};
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Default)]
struct Ctl {
    /// The highest commit a waiter asked for.
    want: CommitSeq,
    stop: bool,
    /// A new secondary to record in the superblock (id, size), and the
    /// outcome once the thread has written it.
    rebind: Option<(String, u64)>,
    rebound: Option<Result<(), String>>,
}

#[derive(Default)]
struct Shared {
    ctl: Mutex<Ctl>,
    wake: Condvar,
    /// Wakes the restore log's thread (a record is wanted, or a stop).
    log_wake: Condvar,
    /// Signalled when a rebind is done.
    rebound: Condvar,
    failed: Mutex<Option<String>>,
}

impl Shared {
    fn ctl(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn failed(&self) -> MutexGuard<'_, Option<String>> {
        self.failed.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The thread that commits on request (and every `interval` for lazy
/// intent clearing).
pub struct Committer {
    shared: Arc<Shared>,
    vol: Arc<Volume>,
    thread: JoinHandle<io::Result<()>>,
    log_thread: Option<JoinHandle<()>>,
}

#[derive(Clone)]
pub struct CommitHandle {
    shared: Arc<Shared>,
    vol: Arc<Volume>,
}

impl CommitHandle {
    /// Asks for a commit covering everything changed up to now. Waiters
    /// call this repeatedly; it wakes the thread only for a new need.
    pub fn request(&self) {
        let want = self.vol.next_commit();
        let mut ctl = self.shared.ctl();
        if want > ctl.want {
            ctl.want = want;
            self.shared.wake.notify_one();
        }
    }

    /// Asks for a restore log record (see `core::restore_log`), which the
    /// log's own thread writes: never behind a commit.
    pub fn request_log(&self) {
        let _ctl = self.shared.ctl();
        self.shared.log_wake.notify_one();
    }

    /// Records another disk as the secondary in the metadata's superblock
    /// (on the committer thread, which owns the store); returns when it is
    /// durable or has failed.
    pub fn rebind_secondary(&self, id: &str, size: u64) -> io::Result<()> {
        let mut ctl = self.shared.ctl();
        ctl.rebound = None;
        ctl.rebind = Some((id.to_string(), size));
        self.shared.wake.notify_one();
        loop {
            if let Some(r) = ctl.rebound.take() {
                return r.map_err(io::Error::other);
            }
            if ctl.stop {
                return Err(io::Error::other("the server is stopping"));
            }
            ctl = self
                .shared
                .rebound
                .wait(ctl)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The last commit error, while commits fail.
    pub fn failed(&self) -> Option<String> {
        self.shared.failed().clone()
    }
}

/// Why the thread woke up.
struct Wake {
    stop: bool,
    timed_out: bool,
}

impl Committer {
    pub fn start<D: MetaDevice + Send + 'static>(
        mut store: MetadataStore<D>,
        vol: Arc<Volume>,
        flush_data: DataFlush,
        interval: Duration,
    ) -> Committer {
        let shared = Arc::new(Shared::default());
        let log_thread = store.take_restore_log_writer().map(|w| {
            let (s, v) = (shared.clone(), vol.clone());
            std::thread::Builder::new()
                .name("sm-restore-log".into())
                .spawn(move || run_log(w, &v, &s))
                .expect("spawn the restore log thread")
        });
        let (s, v) = (shared.clone(), vol.clone());
        let thread = std::thread::Builder::new()
            .name("sm-commit".into())
            .spawn(move || run(store, &v, flush_data, interval, &s))
            .expect("spawn the committer thread");
        Committer {
            shared,
            vol,
            thread,
            log_thread,
        }
    }

    pub fn handle(&self) -> CommitHandle {
        CommitHandle {
            shared: self.shared.clone(),
            vol: self.vol.clone(),
        }
    }

    /// Stops the thread after a final commit; returns that commit's result.
    pub fn stop(self) -> io::Result<()> {
        self.shared.ctl().stop = true;
        self.shared.wake.notify_one();
        self.shared.log_wake.notify_one();
        self.shared.rebound.notify_all();
        if let Some(t) = self.log_thread {
            let _ = t.join();
        }
        self.thread
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the committer thread panicked")))
    }
}

fn run<D: MetaDevice>(
    mut store: MetadataStore<D>,
    vol: &Volume,
    mut flush_data: DataFlush,
    interval: Duration,
    shared: &Shared,
) -> io::Result<()> {
    let mut next_aging = Instant::now() + interval;
    loop {
        let wake = wait(shared, vol, next_aging);
        let rebind = shared.ctl().rebind.take();
        if let Some((id, size)) = rebind {
            let r = store
                .rebind_secondary(&id, size)
                .map_err(|e| format!("recording the new secondary in the metadata: {e}"));
            shared.ctl().rebound = Some(r);
            shared.rebound.notify_all();
        }
        if wake.timed_out {
            // Every interval, requests or not: write intent ages by passes,
            // not by a quiet second (which steady writes never give).
            vol.age_intents(INTENT_AGE_PASSES);
            next_aging = Instant::now() + interval;
        }
        if wake.stop {
            // Stopping: nothing is written any more, so the last commit
            // records no write intent that a later start (perhaps without
            // the secondary) would have to fold into "changed".
            vol.clear_idle_intents();
        }
        let requested = shared.ctl().want > vol.commits_done();
        let failing = shared.failed().is_some();
        let result = if wake.stop || requested || failing || vol.needs_commit() {
            let mut r = commit_once(&mut store, vol, &mut flush_data);
            if r.as_ref().is_err_and(is_secondary_dropped) {
                // The volume went degraded under this commit: commit the
                // new state now, without the secondary.
                r = commit_once(&mut store, vol, &mut flush_data);
            }
            record(shared, &r);
            if r.is_err() {
                // Writes waiting for this commit must fail, not sleep on.
                vol.commit_wakes().wake_all();
            }
            r
        } else {
            Ok(())
        };
        if wake.stop {
            return result;
        }
    }
}

/// The restore log's thread: one record whenever one is wanted. After a
/// failed write the log is off (the writer said so) and the thread ends.
fn run_log<D: MetaDevice>(mut writer: RestoreLogWriter<D>, vol: &Volume, shared: &Shared) {
    loop {
        {
            let mut ctl = shared.ctl();
            while !ctl.stop && !vol.restore_log_wanted() {
                ctl = shared.log_wake.wait(ctl).unwrap_or_else(|e| e.into_inner());
            }
            if ctl.stop {
                return;
            }
        }
        if writer.write(vol).is_err() {
            return;
        }
    }
}

fn commit_once<D: MetaDevice>(
    store: &mut MetadataStore<D>,
    vol: &Volume,
    flush_data: &mut DataFlush,
) -> io::Result<()> {
    store.commit_with(vol, |devs| flush_data_devices(vol, devs, &mut *flush_data))
}

/// Why a commit stopped without writing: the secondary failed its flush
/// and was split off, so what the commit took (tables and state from
/// before) must not be written. The next commit takes the degraded state.
#[derive(Debug)]
pub struct SecondaryDropped;

impl std::fmt::Display for SecondaryDropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the secondary failed its flush and was split off; commit again")
    }
}

impl std::error::Error for SecondaryDropped {}

/// Whether a commit failed only because the secondary was split off (it
/// is then retried at once, not reported).
pub fn is_secondary_dropped(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|i| i.is::<SecondaryDropped>())
}

/// A commit's data flush, one device at a time. The primary's failure
/// fails the commit (it is retried). The secondary's never does: the
/// secondary is split off (degraded, the tracks it may lack changed, out
/// of every later flush set) and the commit is abandoned with [`SecondaryDropped`]
/// so that the next one records the degraded state instead of tables whose
/// clears relied on the secondary's data. While restoring the secondary is
/// not written, nothing a commit records depends on its cache, and the
/// failure is only logged.
pub fn flush_data_devices(
    vol: &Volume,
    devs: DevSet,
    mut flush: impl FnMut(DevSet) -> io::Result<()>,
) -> io::Result<()> {
    if devs.primary {
        flush(DevSet::PRIMARY)?;
    }
    if devs.secondary {
        match flush(DevSet::SECONDARY) {
            Ok(()) => vol.secondary_flushed(),
            Err(e) => {
                let dropped = crate::exec::host::secondary_flush_failed(vol, &e);
                if dropped || vol.state() != VolumeState::Restoring {
                    return Err(io::Error::other(SecondaryDropped));
                }
                log::warn!("secondary flush failed while restoring ({e}); it is not written now");
            }
        }
    }
    Ok(())
}

/// Aging passes (one per commit interval) an intent region must go
/// without a write before its idle bits are cleared: 3 to 4 intervals.
pub const INTENT_AGE_PASSES: u8 = 3;

/// Sleeps until a new commit is wanted, a stop, or `deadline` (the next
/// aging pass). While commits fail, requests do not wake it: it retries
/// once per interval instead of spinning on a broken device.
fn wait(shared: &Shared, vol: &Volume, deadline: Instant) -> Wake {
    let mut ctl = shared.ctl();
    loop {
        let requested = ctl.want > vol.commits_done() && shared.failed().is_none();
        if ctl.stop || requested || ctl.rebind.is_some() {
            return Wake {
                stop: ctl.stop,
                timed_out: false,
            };
        }
        let now = Instant::now();
        if now >= deadline {
            return Wake {
                stop: false,
                timed_out: true,
            };
        }
        ctl = shared
            .wake
            .wait_timeout(ctl, deadline - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

fn record(shared: &Shared, r: &io::Result<()>) {
    let mut failed = shared.failed();
    match r {
        Ok(()) => {
            if failed.take().is_some() {
                log::info!("metadata commits succeed again");
            }
        }
        Err(e) => {
            let msg = format!("metadata commit failed: {e}");
            if failed.as_deref() != Some(msg.as_str()) {
                log::error!(
                    "{msg}; retrying every interval, writes that need a commit fail meanwhile"
                );
            }
            *failed = Some(msg);
        }
    }
}
