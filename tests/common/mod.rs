//! The simulation harness shared by the claim, model, fault, engine and
//! crash tests: the real host path, the production copy scheduler
//! ([`engine::run_copies`]) and the real metadata store
//! ([`MetadataStore`] over a [`SimMetaDevice`], committing with the
//! committer thread's own data flush, [`committer::flush_data_devices`]),
//! over in-memory devices and a seeded scheduler that polls tasks in random
//! order. Every backend call may yield first, so copies, commits, host I/O
//! and (in the crash tests) a power cut interleave at random points; a
//! seed reproduces a run.
#![allow(dead_code)]

use splitmirror::backend::hostbuf::{HostBytes, HostBytesMut};
use splitmirror::backend::sim::{self, Power, Scheduler, SimBackend, SimDisks, SimMetaDevice};
use splitmirror::backend::Backend;
use splitmirror::core::{Command, Geometry, TransitionError, Volume, VolumeState};
use splitmirror::exec::engine::{self, EngineConfig};
use splitmirror::exec::host;
use splitmirror::exec::load::HostLoad;
use splitmirror::metadata::{committer, Binding, MetadataStore, RestoreLogWriter};
use std::cell::{Cell, RefCell};
use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};

pub const STEP_LIMIT: u64 = 2_000_000;

/// A task's result, once it finished.
pub type Slot<T> = Rc<RefCell<Option<T>>>;

/// The engine's stop flag: while set, `run_copies` stops after the
/// batches in flight (to hold a restore mid-way) and is not restarted. It
/// is set by the engine itself when `run_copies` pauses on an error, as the
/// server does.
#[derive(Default)]
pub struct Flag(AtomicBool);

impl Flag {
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    pub fn set(&self, v: bool) {
        self.0.store(v, Ordering::Relaxed)
    }
}

/// How the harness's background tasks behave.
#[derive(Clone, Copy)]
pub struct Options {
    /// The copy engine's configuration; `None` spawns no engine task (the
    /// test runs [`Harness::run_copies`] itself).
    pub engine: Option<EngineConfig>,
    /// The committer sometimes clears idle write intents first, as the
    /// committer thread does on its interval.
    pub clear_idle_intents: bool,
    /// The committer lets a random number of turns pass between looks, as
    /// the committer thread's interval does: what a commit settles (write
    /// intent, restore log entries) stays unsettled for a while, and host
    /// requests that must not depend on it run meanwhile.
    pub lazy_commits: bool,
}

pub struct Harness {
    pub vol: Rc<Volume>,
    pub b: Rc<SimBackend>,
    pub disks: Rc<SimDisks>,
    /// The metadata device (a clone shares its disk).
    pub meta: SimMetaDevice,
    /// The power of the devices: only volatile disks and the metadata
    /// device draw on it.
    pub power: Rc<Power>,
    pub sched: Scheduler<'static>,
    /// See [`Flag`].
    pub engine_paused: Rc<Flag>,
    pub engine_errors: Rc<RefCell<Vec<engine::CopyError>>>,
    /// A `run_copies` call is running (its report, and so its errors, are
    /// recorded when it returns).
    pub engine_running: Rc<Cell<bool>>,
    /// Host requests in flight, as the ublk queue counts them.
    pub load: Rc<HostLoad>,
    /// Host reads and writes so far: every other one has its bytes in a
    /// registered buffer, as on a zero-copy ublk queue.
    requests: u64,
}

/// A binding for a volume of `size` bytes on devices of that size.
pub fn binding(size: u64, track_size: u64) -> Binding {
    Binding {
        volume_size: size,
        track_size,
        primary_size: size,
        secondary_size: size,
        ..Binding::default()
    }
}

impl Harness {
    pub fn new(seed: u64, size: u64, track_size: u64, state: VolumeState) -> Self {
        Self::with_config(
            seed,
            size,
            track_size,
            state,
            EngineConfig {
                batch: 4,
                max_inflight: 8,
                busy_inflight: 2,
                max_io: 2 * track_size,
                ..Default::default()
            },
        )
    }

    /// A volume in `state` on zeroed devices that do not lose power, its
    /// metadata formatted on a fresh in-memory metadata device.
    pub fn with_config(
        seed: u64,
        size: u64,
        track_size: u64,
        state: VolumeState,
        cfg: EngineConfig,
    ) -> Self {
        let opts = Options {
            engine: Some(cfg),
            clear_idle_intents: false,
            lazy_commits: false,
        };
        Self::fresh(seed, size, track_size, state, opts)
    }

    /// A volume in `state` with a committer but no engine task: the test
    /// calls [`Harness::run_copies`].
    pub fn without_engine(seed: u64, size: u64, track_size: u64, state: VolumeState) -> Self {
        let opts = Options {
            engine: None,
            clear_idle_intents: false,
            lazy_commits: false,
        };
        Self::fresh(seed, size, track_size, state, opts)
    }

    fn fresh(seed: u64, size: u64, track_size: u64, state: VolumeState, opts: Options) -> Self {
        let vol = Volume::new(Geometry::new(size, track_size).unwrap(), state);
        let power = Power::new();
        let meta = SimMetaDevice::new(Vec::new(), power.clone());
        let store =
            MetadataStore::format_dev(meta.clone(), &binding(size, track_size), &vol, false)
                .expect("format the sim metadata");
        Self::start(
            seed,
            vol,
            SimDisks::new(size as usize),
            store,
            meta,
            power,
            opts,
        )
    }

    /// Runs `vol` with its store over `disks`: spawns the copy engine and
    /// the committer.
    pub fn start(
        seed: u64,
        vol: Volume,
        disks: Rc<SimDisks>,
        store: MetadataStore<SimMetaDevice>,
        meta: SimMetaDevice,
        power: Rc<Power>,
        opts: Options,
    ) -> Self {
        let rng = sim::rng(seed);
        let b = Rc::new(SimBackend::new(disks.clone(), rng.clone(), 3));
        let vol = Rc::new(vol);
        let mut sched = Scheduler::new(rng.clone());
        let engine_paused = Rc::new(Flag::default());
        let engine_errors = Rc::new(RefCell::new(Vec::new()));
        let load = Rc::new(HostLoad::default());
        let engine_running = Rc::new(Cell::new(false));
        let mut store = store;
        if let Some(w) = store.take_restore_log_writer() {
            sched.spawn(log_task(vol.clone(), b.clone(), w, rng.clone()));
        }
        sched.spawn(commit_task(vol.clone(), b.clone(), store, rng, opts));
        if let Some(cfg) = opts.engine {
            sched.spawn(engine_task(
                vol.clone(),
                b.clone(),
                cfg,
                engine_paused.clone(),
                engine_errors.clone(),
                engine_running.clone(),
                load.clone(),
            ));
        }
        Harness {
            vol,
            b,
            disks,
            meta,
            power,
            sched,
            engine_paused,
            engine_errors,
            engine_running,
            load,
            requests: 0,
        }
    }

    /// Whether the next host read or write uses a registered buffer; and
    /// every fourth request, merges of registered bytes are written around
    /// them (as by a queue without memfd buffers) until the next.
    fn zero_copy_next(&mut self) -> bool {
        self.requests += 1;
        if self.requests.is_multiple_of(4) {
            let copies = &self.b.copies_fixed;
            copies.set(!copies.get());
        }
        self.requests.is_multiple_of(2)
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let slot = self.start_write(offset, data.to_vec());
        self.wait(&slot)
    }

    pub fn start_write(&mut self, offset: u64, data: Vec<u8>) -> Slot<io::Result<()>> {
        self.spawn_write(offset, data, false)
    }

    /// A host write, counted in the host load as a ublk queue counts it.
    pub fn spawn_write(&mut self, offset: u64, data: Vec<u8>, fua: bool) -> Slot<io::Result<()>> {
        let zc = self.zero_copy_next();
        self.spawn_write_as(offset, data, fua, zc)
    }

    /// A host write whose bytes are in a registered buffer (`zc`), as on a
    /// zero-copy ublk queue, or in memory.
    pub fn spawn_write_as(
        &mut self,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
        zc: bool,
    ) -> Slot<io::Result<()>> {
        let (vol, b, load) = (self.vol.clone(), self.b.clone(), self.load.clone());
        self.sched.spawn_with(async move {
            let _busy = load.enter();
            if !zc {
                return host::write(&vol, &*b, offset, (&data).into(), fua).await;
            }
            let fixed = b.register(data);
            let res = host::write(&vol, &*b, offset, HostBytes::Fixed(fixed), fua).await;
            b.unregister(fixed);
            res
        })
    }

    /// A host discard (`unmap`) or write-zeroes, counted in the host load.
    pub fn spawn_zero(
        &mut self,
        offset: u64,
        len: u64,
        unmap: bool,
        fua: bool,
    ) -> Slot<io::Result<()>> {
        let (vol, b, load) = (self.vol.clone(), self.b.clone(), self.load.clone());
        self.sched.spawn_with(async move {
            let _busy = load.enter();
            host::zero(&vol, &*b, offset, len, unmap, fua).await
        })
    }

    /// A discard of `offset..offset+len`, run to its end.
    pub fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let slot = self.spawn_zero(offset, len, true, false);
        self.wait(&slot)
    }

    /// A write-zeroes (keeping the range allocated), run to its end.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let slot = self.spawn_zero(offset, len, false, false);
        self.wait(&slot)
    }

    pub fn start_read(&mut self, offset: u64, len: u64) -> Slot<io::Result<Vec<u8>>> {
        let zc = self.zero_copy_next();
        self.start_read_as(offset, len, zc)
    }

    /// A host read into a registered buffer (`zc`) or into memory.
    pub fn start_read_as(&mut self, offset: u64, len: u64, zc: bool) -> Slot<io::Result<Vec<u8>>> {
        let (vol, b, load) = (self.vol.clone(), self.b.clone(), self.load.clone());
        self.sched.spawn_with(async move {
            let _busy = load.enter();
            let mut buf = vec![0u8; len as usize];
            if !zc {
                return host::read(&vol, &*b, offset, (&mut buf).into())
                    .await
                    .map(|()| buf);
            }
            let fixed = b.register(buf);
            let res = host::read(&vol, &*b, offset, HostBytesMut::Fixed(fixed)).await;
            let buf = b.unregister(fixed);
            res.map(|()| buf)
        })
    }

    pub fn read(&mut self, offset: u64, len: u64) -> Vec<u8> {
        let slot = self.start_read(offset, len);
        self.wait(&slot).expect("read")
    }

    pub fn start_flush(&mut self) -> Slot<io::Result<()>> {
        let (vol, b, load) = (self.vol.clone(), self.b.clone(), self.load.clone());
        self.sched.spawn_with(async move {
            let _busy = load.enter();
            host::flush(&vol, &*b).await
        })
    }

    pub fn flush(&mut self) {
        let slot = self.start_flush();
        self.wait(&slot).expect("flush");
    }

    /// An operator command as the control socket runs it (without the
    /// control socket's `check` first).
    pub fn start_command(&mut self, cmd: Command) -> Slot<io::Result<Result<(), TransitionError>>> {
        let (vol, b) = (self.vol.clone(), self.b.clone());
        self.sched
            .spawn_with(async move { engine::transition(&vol, &*b, |v| v.apply(cmd)).await })
    }

    /// Runs an operator command as the control socket would.
    pub fn command(&mut self, cmd: Command) -> Result<(), TransitionError> {
        self.vol.check(cmd)?;
        let slot = self.start_command(cmd);
        self.wait(&slot).expect("transition I/O")
    }

    /// Steps until `slot` holds a result and takes it.
    pub fn wait<T>(&mut self, slot: &Slot<T>) -> T {
        self.sched.run_until(STEP_LIMIT, || slot.borrow().is_some());
        let r = slot.borrow_mut().take().unwrap();
        r
    }

    /// One call of the production scheduler [`engine::run_copies`], run to
    /// its return. `busy`: a host request stays in flight throughout (the
    /// engine runs at its shallow depth); `stopped`: the stop flag is set
    /// from the start.
    pub fn run_copies(
        &mut self,
        cfg: EngineConfig,
        busy: bool,
        stopped: bool,
    ) -> engine::RunReport {
        let (vol, b, load) = (self.vol.clone(), self.b.clone(), self.load.clone());
        let slot = self.sched.spawn_with(async move {
            let stop = AtomicBool::new(stopped);
            let _host = busy.then(|| load.enter());
            engine::run_copies(&vol, &*b, &cfg, &stop, &load).await
        });
        self.wait(&slot).expect("run_copies I/O")
    }

    /// Runs until no copy operation is left and the engine has returned
    /// (its errors recorded).
    pub fn settle(&mut self) {
        self.engine_paused.set(false);
        let (vol, running) = (self.vol.clone(), self.engine_running.clone());
        self.sched.run_until(STEP_LIMIT, || {
            vol.state().copy_kind().is_none() && !running.get()
        });
    }

    /// Whether no `run_copies` call is running.
    pub fn engine_idle(&self) -> bool {
        !self.engine_running.get()
    }

    pub fn steps(&mut self, n: u64) {
        for _ in 0..n {
            self.sched.step();
        }
    }

    pub fn primary(&self) -> Vec<u8> {
        self.disks.primary.borrow().clone()
    }

    pub fn secondary(&self) -> Vec<u8> {
        self.disks.secondary.borrow().clone()
    }

    /// Fills both devices with the same bytes (a volume established with data).
    pub fn preload(&self, data: &[u8]) {
        self.disks.primary.borrow_mut().copy_from_slice(data);
        self.disks.secondary.borrow_mut().copy_from_slice(data);
    }

    pub fn primary_writes_to(&self, offset: u64, len: u64) -> usize {
        self.disks
            .write_log
            .borrow()
            .iter()
            .filter(|(d, o, l)| {
                *d == splitmirror::core::Dev::Primary && *o < offset + len && o + l > offset
            })
            .count()
    }
}

/// The metadata committer: the real store, committing on request and
/// whenever something changed, with the committer thread's data flush, and
/// other tasks running between taking a commit and writing it. A failed
/// commit is retried, as the thread retries; once the power is cut the
/// task ends.
async fn commit_task(
    vol: Rc<Volume>,
    b: Rc<SimBackend>,
    mut store: MetadataStore<SimMetaDevice>,
    rng: sim::SimRng,
    opts: Options,
) {
    loop {
        if opts.clear_idle_intents && rng.borrow_mut().u32(0..16) == 0 {
            // Both ways intent is cleared: all idle tracks at once, and
            // the committer's aging by passes.
            let age = rng.borrow_mut().u8(0..4);
            if age == 3 {
                vol.clear_idle_intents();
            } else {
                vol.age_intents(age);
            }
        }
        if (b.take_commit_request() || vol.needs_commit()) && !b.commits_fail.get() {
            let batch = store.begin_commit(&vol);
            let n = rng.borrow_mut().u32(0..4);
            sim::YieldNow(n).await;
            let disks = b.disks.clone();
            let r = store.write_commit(&vol, batch, |d| {
                committer::flush_data_devices(&vol, d, |x| disks.flush_now(x))
            });
            if r.is_err() && disks.volatile.as_ref().is_some_and(|v| v.power.is_off()) {
                return;
            }
        }
        b.pause().await;
        if opts.lazy_commits {
            let n = rng.borrow_mut().u32(0..24);
            sim::YieldNow(n).await;
        }
    }
}

/// The restore log's writer, as the committer's log thread runs it: a
/// record whenever one is wanted, with other tasks (commits among them)
/// running between taking it and writing it. Ends once a write fails (the
/// log is then off, or the power is cut).
async fn log_task(
    vol: Rc<Volume>,
    b: Rc<SimBackend>,
    mut writer: RestoreLogWriter<SimMetaDevice>,
    rng: sim::SimRng,
) {
    loop {
        if vol.restore_log_wanted() {
            let n = rng.borrow_mut().u32(0..3);
            sim::YieldNow(n).await;
            if writer.write(&vol).is_err() {
                return;
            }
        }
        b.pause().await;
    }
}

/// The copy engine: the production scheduler [`engine::run_copies`],
/// started whenever a copy operation runs and the engine is not paused,
/// as the server's engine thread starts it.
async fn engine_task(
    vol: Rc<Volume>,
    b: Rc<SimBackend>,
    cfg: EngineConfig,
    paused: Rc<Flag>,
    errors: Rc<RefCell<Vec<engine::CopyError>>>,
    running: Rc<Cell<bool>>,
    load: Rc<HostLoad>,
) {
    loop {
        if paused.get() || vol.state().copy_kind().is_none() {
            b.pause().await;
            continue;
        }
        running.set(true);
        let report = engine::run_copies(&vol, &*b, &cfg, &paused.0, &load)
            .await
            .expect("run_copies I/O");
        running.set(false);
        errors.borrow_mut().extend(report.errors);
        if report.paused {
            paused.set(true);
        }
        b.pause().await;
    }
}

/// A harness in `state` whose two devices both hold `pattern(seed, size)`,
/// and that pattern.
pub fn preloaded(seed: u64, size: u64, track: u64, state: VolumeState) -> (Harness, Vec<u8>) {
    let h = Harness::new(seed, size, track, state);
    let base = pattern(seed, size as usize);
    h.preload(&base);
    (h, base)
}

/// Deterministic bytes for a write: `len` bytes derived from `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| r.u8(..)).collect()
}
