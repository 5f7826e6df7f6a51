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
use crate::edge::config::{Config, SecondaryMissing};
use crate::edge::control::{self, ControlTarget, OperationStatus, Status, VerifyReport};
use crate::edge::events::{self, Event};
use crate::edge::live::{self, Live};
use crate::edge::metrics::{self, Metrics};
use crate::edge::splittime::{self, Frozen};
use crate::error::{Error, Result};
use crate::exec::engine::{self, EngineConfig, RunReport};
use crate::exec::load::HostLoad;
use crate::metadata::{identity, CommitHandle, Committer, FormatOptions, MetadataStore};
use crate::ublk::{self, DeviceParams, QueueCtx};
use nix::sys::signal::{SigSet, Signal};
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
/// `allow_missing_secondary` (or the config's `secondary_missing:
/// degraded`) starts a volume whose secondary is absent or unopenable
/// `degraded`, instead of refusing it.
pub fn run(cfg: &Config, allow_missing_secondary: bool) -> Result<()> {
    // Before any thread exists, so that every thread inherits the mask and
    // the main thread alone takes the signals, when it is ready to.
    let signals = shutdown_signals();
    signals
        .thread_block()
        .map_err(|e| Error::runtime(format!("cannot block signals: {e}")))?;

    let allow_missing =
        allow_missing_secondary || cfg.secondary_missing == SecondaryMissing::Degraded;
    let (devs, missing) = open_devices(cfg, allow_missing)?;
    let devs = Arc::new(devs);
    let binding = devs.binding(cfg.track_size);
    let (store, vol) = match &missing {
        None => MetadataStore::open(&cfg.metadata, &binding)?,
        Some(_) => MetadataStore::open_without_secondary(&cfg.metadata, &binding)?,
    };
    let recorded = store.recorded().clone();
    let mut was = None;
    if let Some(why) = &missing {
        let state = vol.secondary_missing().map_err(|state| {
            Error::config(format!(
                "{why}; the volume is {state}: the secondary holds the part of the split \
                 image not yet restored, so it cannot run without it; bring the secondary back"
            ))
        })?;
        log::warn!(
            "{why}; starting degraded (was {state}): host I/O goes to the primary alone and \
             every write is tracked; bring the secondary back, then `splitmirror \
             attach-secondary`"
        );
        was = Some(state);
    }
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
        zero_copy: std::sync::atomic::AtomicBool::new(false),
        errors: Mutex::new(Vec::new()),
        paused: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        commands: Mutex::new(()),
        rate: Mutex::new(RateMeter::default()),
        engine: Mutex::new(None),
        load: Arc::new(HostLoad::default()),
        metrics: Arc::new(Metrics::default()),
        op_started: Mutex::new(Instant::now()),
        live: Mutex::new(Live::of(cfg)),
        halt: AtomicBool::new(false),
        split_file: splittime::path(cfg),
        secondary: Mutex::new(SecondarySlot {
            recorded_id: recorded.secondary_id.clone(),
            missing: missing.clone(),
        }),
        block_size: devs.logical_block(),
    });
    if vol.state() == crate::core::VolumeState::Established {
        splittime::clear(&server.split_file);
    }
    if let (Some(why), Some(from)) = (&missing, was) {
        if from != crate::core::VolumeState::Degraded {
            if let Err(e) =
                splittime::record(&server.split_file, Frozen::Degraded, splittime::now())
            {
                log::warn!("cannot record the time of degrading: {e}");
            }
        }
        let extra = vec![("PREVIOUS_STATE", from.name().to_string())];
        server.event("degraded", format!("{why}; started degraded"), extra);
    }
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
    // Shared with the signal wait, which ends them itself on a planned
    // restart (the process exits from there, leaving the device).
    let engine = Arc::new(Mutex::new(Some(engine)));
    let committer = Arc::new(Mutex::new(Some(committer)));
    let watcher = {
        let s = server.clone();
        thread::Builder::new()
            .name("watch".into())
            .spawn(move || s.watch_loop())
            .map_err(|e| Error::runtime(format!("cannot start the state watcher: {e}")))?
    };

    let served = control::serve(&cfg.socket_path(), server.clone()).and_then(|ctl| {
        let params = DeviceParams {
            id: cfg.ublk.id,
            queues: cfg.ublk.queues as u16,
            depth: cfg.ublk.depth as u16,
            max_io: cfg.ublk.max_io,
            zero_copy: cfg.ublk.zero_copy == crate::edge::config::ZeroCopy::Auto,
            size: devs.volume_size(),
            logical_block: devs.logical_block(),
            zeroing: devs.zeroing(),
            track_size: vol.geometry().track_size(),
        };
        let ctx = QueueCtx {
            vol: vol.clone(),
            fds: devs.fds(),
            commit: commit.clone(),
            load: server.load.clone(),
            metrics: server.metrics.clone(),
        };
        let s = server.clone();
        let (eng, com) = (engine.clone(), committer.clone());
        let r = ublk::serve(params, ctx, &cfg.ublk_id_path(), move |ctrl, _origin| {
            let path = ctrl.get_bdev_path();
            *s.device.lock().unwrap() = Some(path.clone());
            s.zero_copy.store(
                ublk::zero_copy_on(ctrl),
                std::sync::atomic::Ordering::Relaxed,
            );
            link_device(&s.cfg.name, &path);
            announce(&path);
            let mut sig = wait_for_signal(&signals);
            while sig == Signal::SIGHUP {
                s.reload();
                sig = wait_for_signal(&signals);
            }
            let keep_busy = sig != Signal::SIGUSR1 && keep_device_in_use() && device_in_use(&path);
            if keep_busy {
                log::info!(
                    "{path} is in use (mounted?) and {KEEP_DEVICE_IN_USE} is set: keeping it \
                     for the next run, as for SIGUSR1"
                );
            }
            if sig == Signal::SIGUSR1 || keep_busy {
                if ctrl.dev_info().flags & u64::from(libublk::sys::UBLK_F_USER_RECOVERY) != 0 {
                    planned_restart(&s, &eng, &com, &path);
                }
                log::warn!(
                    "SIGUSR1: {path} was created without user recovery, so it cannot be kept \
                     for the next run; stopping as for SIGTERM"
                );
            }
            log::info!("shutting down: stopping {path}");
            unlink_device(&s.cfg.name, &path);
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
    let committed = wind_down(&server, &engine, &committer);
    let _ = watcher.join();
    served?;
    committed
}

/// Opens the data devices; a missing secondary is allowed (and its reason
/// returned) with `allow_missing`, and otherwise refused with a pointer to
/// the flag.
fn open_devices(cfg: &Config, allow_missing: bool) -> Result<(Devices, Option<String>)> {
    let (devs, missing) = Devices::open_allow_missing(cfg)?;
    match missing {
        Some(why) if !allow_missing => Err(Error::config(format!(
            "{why}; to start the volume degraded without it, pass `run \
             --allow-missing-secondary` (or set `secondary_missing: degraded`)"
        ))),
        m => Ok((devs, m)),
    }
}

/// Stops the copy engine, then makes the final metadata commit. Once only:
/// a second call finds both gone and returns Ok.
fn wind_down(
    server: &Server,
    engine: &Mutex<Option<thread::JoinHandle<()>>>,
    committer: &Mutex<Option<Committer>>,
) -> Result<()> {
    server.stop.store(true, SeqCst);
    server.halt.store(true, SeqCst);
    if let Some(engine) = engine.lock().unwrap().take() {
        engine.thread().unpark();
        let _ = engine.join();
    }
    match committer.lock().unwrap().take() {
        Some(c) => c
            .stop()
            .map_err(|e| Error::runtime(format!("final metadata commit failed: {e}"))),
        None => Ok(()),
    }
}

/// Set (to anything but empty or 0) in the unit's environment: a SIGTERM
/// while the device is in use is a planned restart too, so that
/// `systemctl restart` keeps a mounted filesystem. (systemd tells a service
/// nothing about whether a stop is followed by a start.)
const KEEP_DEVICE_IN_USE: &str = "SPLITMIRROR_KEEP_DEVICE_IN_USE";

fn keep_device_in_use() -> bool {
    std::env::var(KEEP_DEVICE_IN_USE).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Whether something holds the block device exclusively: a mounted
/// filesystem, device-mapper, md, or an O_EXCL opener. The kernel answers
/// EBUSY to an exclusive open then; the server itself holds no such open.
fn device_in_use(path: &str) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(path)
    {
        Ok(_) => false,
        Err(e) => e.raw_os_error() == Some(libc::EBUSY),
    }
}

/// The exit status of a planned restart (EX_TEMPFAIL): the unit's
/// `RestartForceExitStatus=` starts the server again at once.
pub const EXIT_RESTART: i32 = 75;

/// SIGUSR1: exit for a restart and leave the device in the kernel, so the
/// next `run` (the same binary or a new one) takes it over and the
/// filesystem on it stays mounted. This is the crash path, entered on
/// purpose after the copy engine has stopped and the metadata is
/// committed: host requests in flight are not acknowledged and the kernel
/// sends them again to the next server; until then host I/O waits.
fn planned_restart(
    server: &Server,
    engine: &Mutex<Option<thread::JoinHandle<()>>>,
    committer: &Mutex<Option<Committer>>,
    path: &str,
) -> ! {
    log::info!("planned restart: {path} stays, host I/O waits for the next `run`");
    let code = match wind_down(server, engine, committer) {
        Ok(()) => EXIT_RESTART,
        Err(e) => {
            // Still exit without deleting the device: the next run recovers
            // from the last good commit exactly as after a crash.
            log::error!("{e}");
            1
        }
    };
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    log::info!("exiting with status {code}; start the server again to take over {path}");
    std::process::exit(code)
}

/// SIGINT/SIGTERM stop the server; SIGHUP re-reads the config.
fn shutdown_signals() -> nix::sys::signal::SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    set.add(Signal::SIGUSR1);
    set
}

/// The next signal of `set`; an error counts as a stop request, since
/// looping on a failing `sigwait` would never end.
fn wait_for_signal(set: &SigSet) -> Signal {
    match set.wait() {
        Ok(sig) => {
            log::info!("received {sig}");
            sig
        }
        Err(e) => {
            log::error!("waiting for signals: {e}");
            Signal::SIGTERM
        }
    }
}

/// `/dev/splitmirror/NAME` → `/dev/ublkbN`, kept by the server itself: the
/// kernel gives a ublk device nothing a udev rule could tell volumes apart
/// by (no serial, no name), and the server is the one that knows both.
fn link_device(name: &str, device: &str) {
    let link = crate::edge::fleet::device_link(name);
    let result = (|| {
        std::fs::create_dir_all(crate::edge::fleet::DEVICE_LINK_DIR)?;
        let tmp = link.with_extension("new");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(device, &tmp)?;
        std::fs::rename(&tmp, &link)
    })();
    match result {
        Ok(()) => log::info!("{} -> {device}", link.display()),
        Err(e) => log::warn!("cannot create {}: {e}", link.display()),
    }
}

/// Removes the link if it still points at our device.
fn unlink_device(name: &str, device: &str) {
    let link = crate::edge::fleet::device_link(name);
    if std::fs::read_link(&link).is_ok_and(|t| t == Path::new(device)) {
        let _ = std::fs::remove_file(&link);
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
    /// The device runs with ublk zero copy (set once it is started).
    zero_copy: std::sync::atomic::AtomicBool,
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
    /// The settings `set` and SIGHUP change while the server runs.
    live: Mutex<Live>,
    /// Ends the running `run_copies` call (a stop, or new engine settings);
    /// the engine loop starts the next one with the settings in `live`.
    halt: AtomicBool,
    /// Where the time the secondary was frozen is kept.
    split_file: std::path::PathBuf,
    /// Which disk the volume's secondary is, and whether it is open.
    secondary: Mutex<SecondarySlot>,
    /// The ublk device's logical block size: a secondary attached later
    /// must take direct I/O of that size.
    block_size: u32,
}

/// The secondary as the running server knows it.
struct SecondarySlot {
    /// The identity the metadata records.
    recorded_id: String,
    /// Why it is not open, while it is not.
    missing: Option<String>,
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
            &self.live.lock().unwrap().restore,
            self.cfg.track_size,
            u64::from(self.cfg.ublk.max_io),
        )
    }

    fn program(&self) -> Option<std::path::PathBuf> {
        events::program(&self.live.lock().unwrap().events.program)
    }

    /// Runs the events program, if one is configured.
    fn event(&self, name: &'static str, message: String, extra: Vec<(&'static str, String)>) {
        let Some(program) = self.program() else {
            return;
        };
        let ev = Event {
            name,
            volume: self.cfg.name.clone(),
            state: self.vol.state().name().to_string(),
            device: self.device.lock().unwrap().clone(),
            message,
            extra,
        };
        events::notify(&program, &ev);
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
        match UringBackend::new(self.devs.primary.fd(), self.devs.secondary.fd(), opts) {
            Ok(b) => {
                let b = b.with_committer(&self.commit);
                self.copy_until_stopped(|cfg| {
                    b.set_io_priority(cfg.io_priority());
                    set_engine_nice(cfg);
                    b.block_on(engine::run_copies(
                        &self.vol, &b, cfg, &self.halt, &self.load,
                    ))
                });
            }
            Err(e) => {
                log::warn!("io_uring unavailable for the copy engine ({e}); using blocking I/O");
                let b = self.backend();
                self.copy_until_stopped(|cfg| {
                    set_engine_nice(cfg);
                    smol::block_on(engine::run_copies(
                        &self.vol, &b, cfg, &self.halt, &self.load,
                    ))
                });
            }
        }
    }

    /// Each `run` call takes the engine settings current at its start; `set`
    /// and SIGHUP end a call early (through `halt`) to apply new ones.
    fn copy_until_stopped(&self, mut run: impl FnMut(&EngineConfig) -> std::io::Result<RunReport>) {
        while !self.stop.load(SeqCst) {
            self.halt.store(false, SeqCst);
            // A stop sets `stop` before `halt`: one that came between the
            // loop's check and the reset above is seen here, not lost.
            if self.stop.load(SeqCst) {
                break;
            }
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
            let ecfg = self.engine_config();
            match run(&ecfg) {
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
                // A paused copy retries the same track: one line (and one
                // event) for it.
                if !errs.contains(&line) {
                    self.event(
                        "device-error",
                        line.clone(),
                        vec![
                            ("TRACK", e.track.to_string()),
                            ("ERROR", e.message.clone()),
                            ("SKIPPED", e.skipped.to_string()),
                        ],
                    );
                    errs.push(line);
                }
            }
        }
        if r.paused {
            self.paused.store(true, SeqCst);
        }
        if r.completed > 0 {
            let mut started = self.op_started.lock().unwrap();
            let what = kind.map_or("copy".into(), |k| format!("{k:?}").to_lowercase());
            let secs = started.elapsed().as_secs_f64();
            let line = format!(
                "{what} finished: {} tracks ({} bytes) copied in {secs:.1}s, {} errors; volume {}",
                r.tracks,
                r.bytes,
                r.errors.len(),
                self.vol.state()
            );
            log::info!("{line}");
            self.event(
                "operation-end",
                line,
                vec![
                    ("OPERATION", what),
                    ("TRACKS", r.tracks.to_string()),
                    ("BYTES", r.bytes.to_string()),
                    ("ERRORS", r.errors.len().to_string()),
                    ("SECONDS", format!("{secs:.1}")),
                ],
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
                kind: op.kind,
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
                priority: self.live.lock().unwrap().restore.priority.name().into(),
                copy_depth: self.load.copy_depth(),
            }
        });
        let mut errors = self.errors.lock().unwrap().clone();
        let slot = self.secondary.lock().unwrap();
        if let Some(why) = &slot.missing {
            errors.push(format!(
                "secondary missing: {why}; host I/O goes on to the primary and changes are \
                 tracked: bring it back, then `splitmirror attach-secondary`"
            ));
        } else if vol.state() == crate::core::VolumeState::Degraded {
            errors.push(
                "secondary failed while mirroring and was split off; host I/O goes on to the \
                 primary and changes are tracked: repair the secondary, then `establish` (or \
                 `attach-secondary` to reopen its path)"
                    .into(),
            );
        }
        if let Some(e) = self.commit.failed() {
            errors.push(format!("metadata commit failing: {e}"));
        }
        let split_time = splittime::read(&self.split_file, vol.state());
        Status {
            schema_version: control::STATUS_SCHEMA_VERSION,
            split_time,
            split_age_secs: split_time.map(|t| splittime::now().saturating_sub(t)),
            name: self.cfg.name.clone(),
            device: self.device.lock().unwrap().clone(),
            primary: self.cfg.primary.display().to_string(),
            secondary: self.cfg.secondary.display().to_string(),
            primary_id: self.devs.primary.stable_id.clone(),
            secondary_id: slot.recorded_id.clone(),
            secondary_missing: slot.missing.is_some(),
            state: vol.state(),
            track_size: g.track_size(),
            tracks: g.tracks(),
            changed_since_split: t.changed,
            restore_pending: t.pending,
            secondary_stale: t.stale,
            operation,
            errors,
            read_repairs: vol.read_repairs(),
            zero_copy: self.zero_copy.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    fn command(&self, cmd: Command) -> Result<()> {
        let _g = self.commands.lock().unwrap();
        if let (Command::Establish { .. }, Some(why)) =
            (cmd, &self.secondary.lock().unwrap().missing)
        {
            return Err(Error::state(format!(
                "establish needs the secondary, which is missing ({why}); bring it back, then \
                 `splitmirror attach-secondary` (it reopens the secondary and establishes)"
            )));
        }
        self.command_locked(cmd)
    }

    fn verify(&self) -> Result<VerifyReport> {
        if let Some(why) = &self.secondary.lock().unwrap().missing {
            return Err(Error::state(format!(
                "verify needs the secondary, which is missing ({why}); attach it first"
            )));
        }
        let rate = self.live.lock().unwrap().restore.rate_limit;
        crate::exec::verify::compare(&self.vol, &self.backend(), rate, &self.stop)
    }

    fn set(&self, settings: &[String]) -> Result<Vec<String>> {
        let mut live = self.live.lock().unwrap();
        let (next, lines) = live::apply(&live, settings, self.cfg.restore.max_inflight)?;
        *live = next;
        drop(live);
        log::info!("set {}", lines.join(" "));
        self.restart_copies();
        Ok(lines)
    }

    fn attach_secondary(&self, replace: bool) -> Result<String> {
        let _g = self.commands.lock().unwrap();
        let line = self.attach_locked(replace)?;
        log::info!("{line}");
        Ok(line)
    }
}

impl Server {
    /// Runs an operator command; the caller holds `commands`.
    fn command_locked(&self, cmd: Command) -> Result<()> {
        // Refuse before draining host I/O for nothing.
        self.vol.check(cmd)?;
        if cmd == Command::Split {
            // Before the split is committed: see splittime.rs.
            splittime::record(&self.split_file, Frozen::Split, splittime::now()).map_err(|e| {
                Error::runtime(format!(
                    "split: cannot record the split time in {}: {e}",
                    self.split_file.display()
                ))
            })?;
        }
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

    /// `attach-secondary`: lets go of the old secondary file (it may be
    /// dead, and our own O_EXCL open of it would refuse the reopening),
    /// opens the configured path again, checks who it is, and establishes:
    /// incrementally for the volume's own disk, fully for another one with
    /// `replace`. The caller holds `commands`.
    fn attach_locked(&self, replace: bool) -> Result<String> {
        let state = self.vol.state();
        if state != crate::core::VolumeState::Degraded {
            return Err(Error::state(format!(
                "attach-secondary is not valid in state {state}: the secondary is attached; it \
                 applies to a degraded volume"
            )));
        }
        // From here on nothing is sent to the secondary until the establish.
        self.vol
            .secondary_missing()
            .map_err(|s| Error::state(format!("attach-secondary is not valid in state {s}")))?;
        self.devs.release_secondary()?;
        self.secondary.lock().unwrap().missing =
            Some("released; attach-secondary is opening it again".into());
        let path = self.cfg.secondary.clone();
        let recorded = self.secondary.lock().unwrap().recorded_id.clone();
        let (new, same) = match self.open_secondary(&recorded, replace) {
            Ok(found) => found,
            Err(e) => {
                self.secondary.lock().unwrap().missing = Some(e.to_string());
                return Err(with_hint(
                    e,
                    "; the volume stays degraded, without its secondary: run \
                     `splitmirror attach-secondary` again once that is fixed",
                ));
            }
        };
        if !same {
            if let Err(e) = self.record_new_secondary(&new) {
                self.secondary.lock().unwrap().missing = Some(e.to_string());
                return Err(e);
            }
        }
        self.devs
            .swap_secondary(new.file)
            .map_err(|e| Error::runtime(format!("cannot put {} in place: {e}", path.display())))?;
        self.secondary.lock().unwrap().missing = None;
        self.command_locked(Command::Establish { full: !same })?;
        let copies = self.vol.operation().map_or(0, |op| op.total);
        Ok(if same {
            format!(
                "attach-secondary: {} is the volume's secondary ({}); establishing, {copies} \
                 changed tracks to copy",
                path.display(),
                new.stable_id
            )
        } else {
            format!(
                "attach-secondary: {} ({}) replaces the secondary ({recorded}); establishing, \
                 all {copies} tracks to copy",
                path.display(),
                new.stable_id
            )
        })
    }

    /// Opens the configured secondary and checks it; returns it and whether
    /// it is the disk the metadata records (another one only with `replace`).
    fn open_secondary(&self, recorded: &str, replace: bool) -> Result<(DataDev, bool)> {
        let new = DataDev::open("secondary", &self.cfg.secondary)?;
        self.devs.check_secondary(&new, self.block_size)?;
        let same = crate::metadata::format::fit_identity(&new.stable_id) == recorded;
        if !same && !replace {
            return Err(Error::config(format!(
                "secondary {} is not the volume's secondary: expected {recorded}, found {}; \
                 pass --replace to make it the secondary (every track is then copied to it; \
                 whatever it holds is overwritten), or fix the config's `secondary:` path",
                new.path.display(),
                new.stable_id
            )));
        }
        Ok((new, same))
    }

    /// Another disk becomes the secondary: every track is committed as
    /// changed first, then the metadata records the disk, so a crash in
    /// between leaves either the old disk recorded (the next `run` refuses
    /// the new one, nothing lost) or the new one with everything to copy.
    fn record_new_secondary(&self, new: &DataDev) -> Result<()> {
        let b = self.backend();
        let marked = smol::block_on(engine::transition(&self.vol, &b, |v| {
            Ok::<_, crate::core::TransitionError>(v.secondary_replaced())
        }))
        .map_err(|e| Error::runtime(format!("attach-secondary failed: {e}")))??;
        if !marked {
            return Err(Error::state(
                "attach-secondary: the volume is no longer degraded; try again",
            ));
        }
        self.commit
            .rebind_secondary(&new.stable_id, new.size)
            .map_err(|e| Error::runtime(format!("attach-secondary: {e}")))?;
        self.secondary.lock().unwrap().recorded_id =
            crate::metadata::format::fit_identity(&new.stable_id);
        Ok(())
    }
}

/// The same error with more words after it.
fn with_hint(e: Error, hint: &str) -> Error {
    match e {
        Error::Config(m) => Error::Config(m + hint),
        Error::State(m) => Error::State(m + hint),
        Error::Runtime(m) => Error::Runtime(m + hint),
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

impl Server {
    /// The running copy ends its current batches and starts again with the
    /// settings in `live`.
    fn restart_copies(&self) {
        self.halt.store(true, SeqCst);
        self.wake_engine();
    }

    /// SIGHUP: reads the config file again, applies what may change live,
    /// and names what needs a restart.
    fn reload(&self) {
        let Some(path) = &self.cfg.source else {
            log::warn!("SIGHUP: the config did not come from a file; nothing to read again");
            return;
        };
        let reread = match Config::load(path) {
            Ok(c) => c,
            Err(e) => {
                log::error!("SIGHUP: {e}; keeping the running settings");
                return;
            }
        };
        let (next, fixed) = live::reload(&self.cfg, &reread);
        let mut live = self.live.lock().unwrap();
        let changed = *live != next;
        *live = next;
        drop(live);
        if !fixed.is_empty() {
            log::warn!(
                "SIGHUP: changed in {} but not applied (they need a restart): {}",
                path.display(),
                fixed.join(", ")
            );
        }
        if changed {
            log::info!(
                "SIGHUP: applied the restore.* and events.* settings of {}",
                path.display()
            );
            self.restart_copies();
        } else {
            log::info!("SIGHUP: no live setting changed in {}", path.display());
        }
    }

    /// Watches the state: an event per change, the split-time file, and
    /// systemd's STATUS= line kept current.
    fn watch_loop(&self) {
        let mut last = self.vol.state();
        let mut shown = String::new();
        let mut next_status = Instant::now();
        while !self.stop.load(SeqCst) {
            let now = self.vol.state();
            if now != last {
                self.state_changed(last, now);
                last = now;
                next_status = Instant::now();
            }
            if Instant::now() >= next_status {
                let line = self.status_line();
                if line != shown {
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Status(&line)]);
                    shown = line;
                }
                next_status = Instant::now() + STATUS_INTERVAL;
            }
            thread::sleep(WATCH_INTERVAL);
        }
    }

    fn state_changed(&self, from: crate::core::VolumeState, to: crate::core::VolumeState) {
        use crate::core::VolumeState::*;
        log::info!("volume {}: {from} -> {to}", self.cfg.name);
        match to {
            Degraded => {
                if let Err(e) =
                    splittime::record(&self.split_file, Frozen::Degraded, splittime::now())
                {
                    log::warn!("cannot record the time of degrading: {e}");
                }
            }
            Established => splittime::clear(&self.split_file),
            _ => {}
        }
        let extra = vec![("PREVIOUS_STATE", from.name().to_string())];
        self.event("state-change", format!("{from} -> {to}"), extra.clone());
        if to == Degraded {
            self.event(
                "degraded",
                "the secondary failed while mirroring and was split off; repair it, then `establish`"
                    .into(),
                extra,
            );
        }
    }

    /// `restoring 45.2%, 410.0 MiB/s, eta 11s` / `established` / `degraded: …`.
    fn status_line(&self) -> String {
        let st = self.status();
        let mut line = match &st.operation {
            Some(op) => crate::edge::cli::progress_line(op).replacen(':', "", 1),
            None => st.state.name().to_string(),
        };
        if st.operation.is_some() {
            line = format!("{}: {line}", st.state);
        }
        if let Some(e) = st.errors.last() {
            line.push_str(&format!("; {} error(s), last: {e}", st.errors.len()));
        }
        line
    }
}

/// How often the watcher looks at the state.
const WATCH_INTERVAL: Duration = Duration::from_millis(100);
/// How often systemd's STATUS= is refreshed during a copy.
const STATUS_INTERVAL: Duration = Duration::from_secs(2);

/// The copy engine's thread takes the CPU priority of `cfg.priority`.
fn set_engine_nice(cfg: &EngineConfig) {
    if let Err(e) = crate::backend::uring::set_thread_nice(cfg.thread_nice()) {
        log::debug!("copy engine: nice {}: {e}", cfg.thread_nice());
    }
}
