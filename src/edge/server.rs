//! `splitmirror run` and `format`: opens the devices and the metadata, and
//! wires the core to its executors (ublk queues, copy engine, committer,
//! control socket).
//!
//! Threads of a running server: the main thread creates the ublk device and
//! then waits for SIGINT/SIGTERM (blocked everywhere else, so it alone
//! receives them); one thread per ublk queue; the copy engine; the metadata
//! committer; the control listener.

use crate::backend::blocking::BlockingBackend;
use crate::backend::device::DataDev;
use crate::backend::device::Devices;
use crate::backend::uring::{UringBackend, UringOptions};
use crate::core::{Command, Geometry, Volume};
use crate::edge::config::Config;
use crate::edge::control::{self, ControlTarget, OperationStatus, Status, VerifyReport};
use crate::edge::metrics::{self, Metrics};
use crate::error::{Error, Result};
use crate::exec::engine::{self, EngineConfig, RunReport};
use crate::exec::load::HostLoad;
use crate::metadata::{identity, CommitHandle, Committer, FormatOptions, MetadataStore};
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
/// How long a copy paused by a read error (`on_error: pause`) waits before
/// it tries again.
pub const PAUSE_RETRY: Duration = Duration::from_secs(30);
/// The window over which copy speed is measured for `status`.
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// `splitmirror format`: writes fresh metadata for the configured devices.
/// Unless `--assume-clean` (nothing is copied) or `--force`, it refuses a
/// secondary that holds a filesystem, volume or partition table: the first
/// sync would overwrite it.
pub fn format(cfg: &Config, assume_clean: bool, opts: FormatOptions) -> Result<()> {
    let devs = Devices::open(cfg)?;
    let geometry = Geometry::new(devs.volume_size(), cfg.track_size)?;
    if !assume_clean && !opts.force {
        refuse_used_secondary(&devs.secondary)?;
    }
    let vol = Volume::formatted(geometry, assume_clean);
    MetadataStore::format_with(&cfg.metadata, &devs.binding(cfg.track_size), &vol, opts)?;
    Ok(())
}

/// How much of each end of the secondary `format` looks at.
const PROBE_BYTES: u64 = 1 << 20;

fn refuse_used_secondary(dev: &DataDev) -> Result<()> {
    let head = read_region(dev, 0, PROBE_BYTES.min(dev.size))?;
    let tail_at = dev.size.saturating_sub(PROBE_BYTES) / 4096 * 4096;
    let tail = read_region(dev, tail_at, dev.size - tail_at)?;
    let found = identity::signature(&head).or_else(|| identity::tail_signature(&tail));
    match found {
        None => Ok(()),
        Some(what) => Err(Error::config(format!(
            "secondary {} holds {what}: the first sync after `format` overwrites the whole \
             secondary with the primary; check the `secondary:` path, or pass --force to \
             overwrite it (or --assume-clean if the devices are already identical)",
            dev.path.display()
        ))),
    }
}

/// Reads `len` bytes at `offset` (a multiple of 4 KiB) with direct I/O;
/// a short file gives fewer.
fn read_region(dev: &DataDev, offset: u64, len: u64) -> Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut buf = crate::backend::buf::AlignedBuf::new(len.next_multiple_of(4096) as usize);
    let mut got = 0;
    while got < buf.len() {
        let n = dev
            .file
            .read_at(&mut buf[got..], offset + got as u64)
            .map_err(|e| {
                Error::runtime(format!("reading {} {}: {e}", dev.role, dev.path.display()))
            })?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(buf[..got.min(len as usize)].to_vec())
}

/// `splitmirror replace-secondary`: records the configured secondary (a new
/// disk) in place of the one the metadata names; every track is then
/// copied by the next `establish`. Offline: the metadata lock refuses it
/// while a server runs.
pub fn replace_secondary(cfg: &Config, yes: bool) -> Result<String> {
    let devs = Devices::open(cfg)?;
    let binding = devs.binding(cfg.track_size);
    if !yes {
        return Err(Error::config(format!(
            "replace-secondary records {} ({}) as the secondary and discards everything the \
             old secondary held (a split image included); every track is copied to the new \
             disk by the next `establish`; run it again with --yes to go ahead",
            devs.secondary.path.display(),
            devs.secondary.stable_id
        )));
    }
    let r = MetadataStore::replace_secondary(&cfg.metadata, &binding)?;
    Ok(format!(
        "replace-secondary: done; secondary is now {} ({}, {} bytes), was {} ({} bytes); the \
         volume is degraded (was {}) with every track to copy: start the server and run \
         `splitmirror establish`",
        devs.secondary.path.display(),
        devs.secondary.stable_id,
        devs.secondary.size,
        r.old_id,
        r.old_size,
        r.old_state
    ))
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
        load: Arc::new(HostLoad::default()),
        metrics: Arc::new(Metrics::default()),
        op_started: Mutex::new(Instant::now()),
    });
    log::info!(
        "volume {}: {} ({} tracks of {} bytes){}",
        cfg.name,
        vol.state(),
        vol.geometry().tracks(),
        vol.geometry().track_size(),
        vol.operation()
            .map(|op| format!(
                ", resuming {:?} with {} tracks to copy",
                op.kind,
                vol.copy_remaining()
            ))
            .unwrap_or_default()
    );
    let _metrics_server = match cfg.metrics.listen.as_str() {
        "" => None,
        addr => {
            let s = server.clone();
            Some(metrics::serve(
                addr,
                server.metrics.clone(),
                Arc::new(move || s.status()),
            )?)
        }
    };
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
            load: server.load.clone(),
            metrics: server.metrics.clone(),
        };
        let s = server.clone();
        let r = ublk::serve(params, ctx, &cfg.ublk_id_path(), move |ctrl, _origin| {
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
        .map(|_| ())
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
    /// Host requests in flight, shared with the ublk queues: the copy
    /// engine copies fewer tracks at once while the host is busy.
    load: Arc<HostLoad>,
    metrics: Arc<Metrics>,
    /// When the running operation started, for its end-of-operation log line.
    op_started: Mutex<Instant>,
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
        EngineConfig::for_volume(
            &self.cfg.restore,
            self.cfg.track_size,
            u64::from(self.cfg.ublk.max_io),
        )
    }

    /// The copy engine: copies while the state has something to copy (the
    /// running operation ends itself when nothing is left), and sleeps
    /// otherwise. Copies run on an io_uring of their own; a host without
    /// io_uring falls back to blocking I/O.
    fn engine_loop(&self) {
        let ecfg = self.engine_config();
        let opts = UringOptions {
            pool_buffers: ecfg.max_inflight,
            buffer_size: self.cfg.track_size as usize,
            ..Default::default()
        };
        let (c1, c2) = (self.commit.clone(), self.commit.clone());
        match UringBackend::new(self.devs.primary.fd(), self.devs.secondary.fd(), opts) {
            Ok(b) => {
                let b = b
                    .with_commit(move || c1.request())
                    .with_commit_failed(move || c2.failed().is_some());
                self.copy_until_stopped(&ecfg, |cfg| {
                    b.block_on(engine::run_copies(
                        &self.vol, &b, cfg, &self.stop, &self.load,
                    ))
                });
            }
            Err(e) => {
                log::warn!("io_uring unavailable for the copy engine ({e}); using blocking I/O");
                let b = self.backend();
                self.copy_until_stopped(&ecfg, |cfg| {
                    smol::block_on(engine::run_copies(
                        &self.vol, &b, cfg, &self.stop, &self.load,
                    ))
                });
            }
        }
    }

    fn copy_until_stopped(
        &self,
        ecfg: &EngineConfig,
        mut run: impl FnMut(&EngineConfig) -> std::io::Result<RunReport>,
    ) {
        while !self.stop.load(SeqCst) {
            if self.paused.load(SeqCst) {
                // on_error: pause. Try again now and then: a transient error
                // (a cable, a path failover) must not need an operator.
                self.sleep_while_paused(PAUSE_RETRY);
                self.paused.store(false, SeqCst);
                continue;
            }
            if self.vol.state().copy_kind().is_none() {
                thread::park_timeout(Duration::from_millis(200));
                continue;
            }
            let kind = self.vol.operation().map(|op| op.kind);
            match run(ecfg) {
                Ok(report) => self.after_copies(kind, &report),
                Err(e) => {
                    log::error!("copy engine: {e}");
                    thread::park_timeout(Duration::from_secs(1));
                }
            }
        }
    }

    /// Sleeps up to `limit` while the copy stays paused. Only a command
    /// (which clears `paused`) or a stop ends it early: the executor leaves
    /// stale unpark tokens behind, so one `park_timeout` may return at once,
    /// and a pause that ends at every wake retries a bad track thousands of
    /// times a second (the VM fault scenario caught that).
    fn sleep_while_paused(&self, limit: Duration) {
        let until = Instant::now() + limit;
        while self.paused.load(SeqCst) && !self.stop.load(SeqCst) {
            let now = Instant::now();
            if now >= until {
                return;
            }
            thread::park_timeout(until - now);
        }
    }

    /// Records what a `run_copies` call did: errors for `status`, metrics,
    /// and one log line per operation that ended.
    fn after_copies(&self, kind: Option<crate::core::OperationKind>, r: &RunReport) {
        self.metrics
            .copied(r.tracks, r.bytes, r.errors.len() as u64);
        if !r.errors.is_empty() {
            let mut errs = self.errors.lock().unwrap();
            for e in &r.errors {
                let what = if e.skipped {
                    "skipped"
                } else if e.degraded {
                    "volume degraded"
                } else {
                    "copy paused"
                };
                log::error!("copying track {}: {} ({what})", e.track, e.message);
                let line = format!("track {}: {} ({what})", e.track, e.message);
                // A paused copy retries the same track: one line for it.
                if !errs.contains(&line) {
                    errs.push(line);
                }
            }
        }
        if r.paused {
            self.paused.store(true, SeqCst);
        }
        if r.completed > 0 {
            let mut started = self.op_started.lock().unwrap();
            log::info!(
                "{} finished: {} tracks ({} bytes) copied in {:.1}s, {} errors; volume {}",
                kind.map_or("copy".into(), |k| format!("{k:?}").to_lowercase()),
                r.tracks,
                r.bytes,
                started.elapsed().as_secs_f64(),
                r.errors.len(),
                self.vol.state()
            );
            *started = Instant::now();
        }
    }
}

impl ControlTarget for Server {
    fn status(&self) -> Status {
        let vol = &*self.vol;
        let g = vol.geometry();
        let t = vol.counts();
        let operation = vol.operation().map(|op| {
            let remaining = vol.copy_remaining();
            let done = op.total.saturating_sub(remaining);
            let bps = self.rate.lock().unwrap().sample(done * g.track_size());
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
                paused: self.paused.load(SeqCst),
            }
        });
        let mut errors = self.errors.lock().unwrap().clone();
        if vol.state() == crate::core::VolumeState::Degraded {
            errors.push(
                "secondary failed while mirroring and was split off; host I/O goes on to the \
                 primary and changes are tracked: repair the secondary, then `establish`"
                    .into(),
            );
        }
        if let Some(e) = self.commit.failed() {
            errors.push(format!("metadata commit failing: {e}"));
        }
        Status {
            name: self.cfg.name.clone(),
            device: self.device.lock().unwrap().clone(),
            primary: self.cfg.primary.display().to_string(),
            secondary: self.cfg.secondary.display().to_string(),
            primary_id: self.devs.primary.stable_id.clone(),
            secondary_id: self.devs.secondary.stable_id.clone(),
            state: vol.state().name().to_string(),
            track_size: g.track_size(),
            tracks: g.tracks(),
            changed_since_split: t.changed,
            restore_pending: t.pending,
            secondary_stale: t.stale,
            operation,
            errors,
            read_repairs: vol.read_repairs(),
        }
    }

    fn command(&self, cmd: Command) -> Result<()> {
        let _g = self.commands.lock().unwrap();
        // Refuse before draining host I/O for nothing.
        self.vol.check(cmd)?;
        let b = self.backend();
        smol::block_on(engine::transition(&self.vol, &b, |v| v.apply(cmd)))
            .map_err(|e| Error::runtime(format!("{} failed: {e}", cmd.name())))??;
        let op = self.vol.operation();
        log::info!(
            "{} done: volume {}{}",
            cmd.name(),
            self.vol.state(),
            op.map(|o| format!(", {} tracks to copy", o.total))
                .unwrap_or_default()
        );
        *self.op_started.lock().unwrap() = Instant::now();
        // A new operation starts with a clean slate.
        self.errors.lock().unwrap().clear();
        *self.rate.lock().unwrap() = RateMeter::default();
        self.paused.store(false, SeqCst);
        self.wake_engine();
        Ok(())
    }

    fn verify(&self) -> Result<VerifyReport> {
        crate::exec::verify::compare(
            &self.vol,
            &self.backend(),
            self.cfg.restore.rate_limit,
            &self.stop,
        )
    }
}

/// Copy speed over the last [`RATE_WINDOW`], from samples of the running
/// operation's progress taken whenever `status` is asked (by `wait`, a
/// metrics scrape, an operator).
#[derive(Default)]
struct RateMeter {
    /// (when, bytes done by the operation then)
    samples: VecDeque<(Instant, u64)>,
}

impl RateMeter {
    fn sample(&mut self, done_bytes: u64) -> u64 {
        let now = Instant::now();
        if self.samples.back().is_some_and(|(_, b)| *b > done_bytes) {
            self.samples.clear(); // a new operation started
        }
        self.samples.push_back((now, done_bytes));
        while self.samples.len() > 2
            && self
                .samples
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            self.samples.pop_front();
        }
        let (t0, b0) = self.samples[0];
        let secs = now.duration_since(t0).as_secs_f64();
        if secs < 0.05 {
            return 0;
        }
        ((done_bytes - b0) as f64 / secs) as u64
    }
}
