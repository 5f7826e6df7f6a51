//! `splitmirror run` and `format`: opens the devices and the metadata, and
//! wires the core to its executors (ublk queues, copy engine, committer,
//! control socket).
//!
//! Threads of a running server: the main thread creates the ublk device and
//! then waits for SIGINT/SIGTERM (blocked everywhere else, so it alone
//! receives them); one thread per ublk queue; the copy engine; the metadata
//! committer; the control listener.

use crate::blocking::{BlockingBackend, TokenBucket};
use crate::config::Config;
use crate::control::{self, ControlTarget, OperationStatus, Status, VerifyReport};
use crate::core::{Command, Geometry, Volume};
use crate::device::Devices;
use crate::engine::{self, EngineConfig};
use crate::error::{Error, Result};
use crate::metadata::{CommitHandle, Committer, MetadataStore};
use crate::ublk::{self, DeviceParams, QueueCtx};
use std::collections::VecDeque;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const UBLK_CONTROL: &str = "/dev/ublk-control";
/// How often the committer commits unasked (lazy write-intent clearing).
const COMMIT_INTERVAL: Duration = Duration::from_secs(1);
/// The window over which copy speed is measured for `status`.
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// `splitmirror format`: writes fresh metadata for the configured devices.
pub fn format(cfg: &Config, assume_clean: bool, force: bool) -> Result<()> {
    let devs = Devices::open(cfg)?;
    let geometry = Geometry::new(devs.volume_size(), cfg.track_size)?;
    let vol = Volume::formatted(geometry, assume_clean);
    MetadataStore::format(&cfg.metadata, &devs.binding(cfg.track_size), &vol, force)?;
    Ok(())
}

/// `splitmirror run`: serves the device until SIGINT/SIGTERM.
pub fn run(cfg: &Config) -> Result<()> {
    // Before any thread exists, so that every thread inherits the mask and
    // the main thread alone takes the signals, when it is ready to.
    let signals = shutdown_signals();
    signals
        .thread_block()
        .map_err(|e| Error::runtime(format!("cannot block signals: {e}")))?;

    let devs = Arc::new(Devices::open(cfg)?);
    let (store, vol) = MetadataStore::open(&cfg.metadata, &devs.binding(cfg.track_size))?;
    // Checked after the devices and the metadata, so that a config or
    // metadata problem is reported as such even on a host without the driver.
    if !Path::new(UBLK_CONTROL).exists() {
        return Err(Error::runtime(format!(
            "{UBLK_CONTROL} not found: load the ublk driver with `modprobe ublk_drv`"
        )));
    }
    let vol = Arc::new(vol);
    let flush_devs = devs.clone();
    let committer = Committer::start(
        store,
        vol.clone(),
        Box::new(move |set| flush_devs.sync(set)),
        COMMIT_INTERVAL,
    );
    let commit = committer.handle();
    commit.request();

    let server = Arc::new(Server {
        cfg: cfg.clone(),
        vol: vol.clone(),
        devs: devs.clone(),
        commit: commit.clone(),
        device: Mutex::new(None),
        errors: Mutex::new(Vec::new()),
        paused: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        commands: Mutex::new(()),
        rate: Mutex::new(RateMeter::default()),
        engine: Mutex::new(None),
    });
    let engine = {
        let s = server.clone();
        thread::Builder::new()
            .name("copy-engine".into())
            .spawn(move || s.engine_loop())
            .map_err(|e| Error::runtime(format!("cannot start the copy engine: {e}")))?
    };
    *server.engine.lock().unwrap() = Some(engine.thread().clone());

    let served = control::serve(&cfg.socket_path(), server.clone()).and_then(|ctl| {
        let params = DeviceParams {
            id: cfg.ublk.id,
            queues: cfg.ublk.queues as u16,
            depth: cfg.ublk.depth as u16,
            max_io: cfg.ublk.max_io,
            size: devs.volume_size(),
            logical_block: devs.logical_block(),
        };
        let ctx = QueueCtx {
            vol: vol.clone(),
            fds: [devs.primary.fd(), devs.secondary.fd()],
            commit: commit.clone(),
        };
        let s = server.clone();
        let r = ublk::serve(params, ctx, move |ctrl| {
            let path = ctrl.get_bdev_path();
            *s.device.lock().unwrap() = Some(path.clone());
            announce(&path);
            wait_for_signal(&signals);
            log::info!("shutting down: stopping {path}");
            // Stopping drains the host requests in flight; the queues then
            // wind down and `serve` returns.
            if let Err(e) = ctrl.kill_dev() {
                log::error!("stopping {path}: {e}");
            }
        })
        .map_err(Error::runtime);
        ctl.stop();
        r
    });

    // Whatever happened above: stop copying, then the final commit.
    server.stop.store(true, SeqCst);
    engine.thread().unpark();
    let _ = engine.join();
    let committed = committer
        .stop()
        .map_err(|e| Error::runtime(format!("final metadata commit failed: {e}")));
    served?;
    committed
}

fn shutdown_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set
}

fn wait_for_signal(set: &nix::sys::signal::SigSet) {
    match set.wait() {
        Ok(sig) => log::info!("received {sig}"),
        Err(e) => log::error!("waiting for signals: {e}"),
    }
}

/// The device is usable: tell the user (stdout, the contract's one line)
/// and systemd.
fn announce(path: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "device: {path}");
    let _ = out.flush();
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        log::debug!("sd_notify: {e}");
    }
}

/// The running server, as the control socket and the copy engine see it.
struct Server {
    cfg: Config,
    vol: Arc<Volume>,
    devs: Arc<Devices>,
    commit: CommitHandle,
    device: Mutex<Option<String>>,
    /// Copy errors of the running operation, for `status`.
    errors: Mutex<Vec<String>>,
    /// A copy read failed with `on_error: pause`: copying waits for the
    /// next command (or a restart) instead of failing again and again.
    paused: AtomicBool,
    stop: AtomicBool,
    /// Serializes state changes: operator commands and the engine's
    /// end-of-copy transitions.
    commands: Mutex<()>,
    rate: Mutex<RateMeter>,
    engine: Mutex<Option<thread::Thread>>,
}

impl Server {
    fn backend(&self) -> BlockingBackend {
        BlockingBackend::new(self.devs.clone(), self.commit.clone())
    }

    fn wake_engine(&self) {
        if let Some(t) = &*self.engine.lock().unwrap() {
            t.unpark();
        }
    }

    fn engine_config(&self) -> EngineConfig {
        let r = &self.cfg.restore;
        let mut batch = r.batch as usize;
        if r.rate_limit > 0 {
            // About a tenth of a second's worth per batch, so that a low
            // rate limit is met smoothly rather than in bursts.
            let per_tenth = (r.rate_limit / 10 / self.cfg.track_size).max(1);
            batch = batch.min(per_tenth as usize);
        }
        EngineConfig {
            batch,
            max_io: u64::from(self.cfg.ublk.max_io).max(self.cfg.track_size),
            ..EngineConfig::from_restore(r)
        }
    }

    /// The copy engine: copies while the state has something to copy, ends
    /// the operation when nothing is left, and sleeps otherwise.
    fn engine_loop(&self) {
        let b = self.backend();
        let ecfg = self.engine_config();
        let mut bucket = TokenBucket::new(self.cfg.restore.rate_limit);
        let vol = &*self.vol;
        while !self.stop.load(SeqCst) {
            if self.paused.load(SeqCst) {
                thread::park_timeout(Duration::from_secs(1));
                continue;
            }
            if vol.copy_remaining() > 0 {
                if !bucket.wait(&self.stop) {
                    break;
                }
                let started = Instant::now();
                let r = smol::block_on(engine::copy_batch(vol, &b, &ecfg));
                bucket.spend(r.bytes);
                self.rate.lock().unwrap().record(started, r.bytes);
                if !r.errors.is_empty() {
                    let mut errs = self.errors.lock().unwrap();
                    for e in &r.errors {
                        let what = if e.skipped { "skipped" } else { "copy paused" };
                        log::error!("copying track {}: {} ({what})", e.track, e.message);
                        errs.push(format!("track {}: {} ({what})", e.track, e.message));
                    }
                    if r.errors.iter().any(|e| !e.skipped) {
                        self.paused.store(true, SeqCst);
                    }
                } else if r.tracks == 0 {
                    // Every remaining track is held by host writes for now.
                    thread::sleep(Duration::from_millis(1));
                }
            } else if vol.state().copy_kind().is_some() {
                let _g = self.commands.lock().unwrap();
                if let Err(e) = smol::block_on(engine::complete_if_done(vol, &b)) {
                    log::error!("ending the copy operation: {e}");
                    thread::park_timeout(Duration::from_secs(1));
                }
            } else {
                thread::park_timeout(Duration::from_millis(200));
            }
        }
    }
}

impl ControlTarget for Server {
    fn status(&self) -> Status {
        let vol = &*self.vol;
        let g = vol.geometry();
        let t = &vol.tables;
        let operation = vol.operation().map(|op| {
            let remaining = vol.copy_remaining();
            let done = op.total.saturating_sub(remaining);
            let bps = self.rate.lock().unwrap().bytes_per_sec();
            let left_bytes = remaining * g.track_size();
            OperationStatus {
                kind: format!("{:?}", op.kind).to_lowercase(),
                incremental: op.incremental,
                protect: op.protect,
                total: op.total,
                done,
                percent: if op.total == 0 {
                    100.0
                } else {
                    (done as f64 * 1000.0 / op.total as f64).round() / 10.0
                },
                bytes_per_sec: bps,
                eta_secs: (bps > 0).then(|| (left_bytes as f64 / bps as f64 * 10.0).round() / 10.0),
            }
        });
        let mut errors = self.errors.lock().unwrap().clone();
        if let Some(e) = self.commit.failed() {
            errors.push(format!("metadata commit failing: {e}"));
        }
        Status {
            name: self.cfg.name.clone(),
            device: self.device.lock().unwrap().clone(),
            state: vol.state().name().to_string(),
            track_size: g.track_size(),
            tracks: g.tracks(),
            changed_since_split: t.changed.count(),
            restore_pending: t.pending.count(),
            secondary_stale: t.stale.count(),
            operation,
            errors,
        }
    }

    fn command(&self, cmd: Command) -> Result<()> {
        let _g = self.commands.lock().unwrap();
        // Refuse before draining host I/O for nothing.
        self.vol.check(cmd)?;
        let b = self.backend();
        smol::block_on(engine::transition(&self.vol, &b, |v| v.apply(cmd)))
            .map_err(|e| Error::runtime(format!("{} failed: {e}", cmd.name())))??;
        log::info!("{} done: volume {}", cmd.name(), self.vol.state());
        // A new operation starts with a clean slate.
        self.errors.lock().unwrap().clear();
        *self.rate.lock().unwrap() = RateMeter::default();
        self.paused.store(false, SeqCst);
        self.wake_engine();
        Ok(())
    }

    fn verify(&self) -> Result<VerifyReport> {
        use crate::core::VerifyLock;
        use crate::hostpath::{AlignedBuf, Backend};
        let vol = &*self.vol;
        let g = vol.geometry();
        let b = self.backend();
        let mut p = AlignedBuf::new(g.track_size() as usize);
        let mut s = AlignedBuf::new(g.track_size() as usize);
        let mut bucket = TokenBucket::new(self.cfg.restore.rate_limit);
        let mut report = VerifyReport {
            compared: 0,
            mismatches: Vec::new(),
        };
        for t in 0..g.tracks() {
            let (offset, len) = g.track_extent(t);
            let len = len as usize;
            loop {
                if self.stop.load(SeqCst) {
                    return Err(Error::runtime("verify interrupted: the server is stopping"));
                }
                // Admitted, so that no state change happens mid-compare.
                let Ok(ticket) = vol.enter() else {
                    thread::sleep(Duration::from_millis(1));
                    continue;
                };
                match vol.lock_identical(&ticket, t) {
                    VerifyLock::NotIdentical => break,
                    VerifyLock::Busy => {
                        drop(ticket);
                        thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                    VerifyLock::Locked => {}
                }
                let r = smol::block_on(async {
                    b.read(crate::core::Dev::Primary, offset, &mut p[..len])
                        .await?;
                    b.read(crate::core::Dev::Secondary, offset, &mut s[..len])
                        .await
                });
                vol.unlock_identical(t);
                drop(ticket);
                r.map_err(|e| Error::runtime(format!("verify: reading track {t}: {e}")))?;
                report.compared += 1;
                if p[..len] != s[..len] {
                    report.mismatches.push(t);
                }
                bucket.spend(2 * len as u64);
                if !bucket.wait(&self.stop) {
                    return Err(Error::runtime("verify interrupted: the server is stopping"));
                }
                break;
            }
        }
        Ok(report)
    }
}

/// Copy speed over the last [`RATE_WINDOW`].
#[derive(Default)]
struct RateMeter {
    /// (batch start, bytes copied by the batch)
    batches: VecDeque<(Instant, u64)>,
}

impl RateMeter {
    fn record(&mut self, started: Instant, bytes: u64) {
        self.batches.push_back((started, bytes));
        self.prune(Instant::now());
    }

    fn prune(&mut self, now: Instant) {
        while self
            .batches
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            self.batches.pop_front();
        }
    }

    fn bytes_per_sec(&mut self) -> u64 {
        let now = Instant::now();
        self.prune(now);
        let Some((first, _)) = self.batches.front() else {
            return 0;
        };
        let secs = now.duration_since(*first).as_secs_f64().max(0.001);
        let bytes: u64 = self.batches.iter().map(|(_, b)| b).sum();
        (bytes as f64 / secs) as u64
    }
}
