//! A simulated volume for the claim and model tests: the real host path,
//! copy engine and core, over in-memory devices and a seeded scheduler.
#![allow(dead_code)]

use splitmirror::backend::sim::{self, Scheduler, SimBackend, SimDisks};
use splitmirror::backend::Backend;
use splitmirror::core::{Command, Geometry, TransitionError, Volume, VolumeState};
use splitmirror::exec::engine::{self, EngineConfig};
use splitmirror::exec::host;
use std::cell::{Cell, RefCell};
use std::rc::Rc;

pub const STEP_LIMIT: u64 = 2_000_000;

pub struct Harness {
    pub vol: Rc<Volume>,
    pub b: Rc<SimBackend>,
    pub disks: Rc<SimDisks>,
    pub sched: Scheduler<'static>,
    /// While true the copy engine does nothing (to hold a restore mid-way).
    pub engine_paused: Rc<Cell<bool>>,
    pub engine_errors: Rc<RefCell<Vec<engine::CopyError>>>,
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
                max_io: 2 * track_size,
                ..Default::default()
            },
        )
    }

    pub fn with_config(
        seed: u64,
        size: u64,
        track_size: u64,
        state: VolumeState,
        cfg: EngineConfig,
    ) -> Self {
        let rng = sim::rng(seed);
        let disks = SimDisks::new(size as usize);
        let b = Rc::new(SimBackend::new(disks.clone(), rng.clone(), 3));
        let vol = Rc::new(Volume::new(Geometry::new(size, track_size).unwrap(), state));
        let mut sched = Scheduler::new(rng);
        let engine_paused = Rc::new(Cell::new(false));
        let engine_errors = Rc::new(RefCell::new(Vec::new()));
        sched.spawn(committer(vol.clone(), b.clone()));
        sched.spawn(copier(
            vol.clone(),
            b.clone(),
            engine_paused.clone(),
            engine_errors.clone(),
            cfg,
        ));
        Harness {
            vol,
            b,
            disks,
            sched,
            engine_paused,
            engine_errors,
        }
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let slot = self.start_write(offset, data.to_vec());
        self.sched.run_until(STEP_LIMIT, || slot.borrow().is_some());
        let r = slot.borrow_mut().take().unwrap();
        r
    }

    pub fn start_write(
        &mut self,
        offset: u64,
        data: Vec<u8>,
    ) -> Rc<RefCell<Option<std::io::Result<()>>>> {
        let (vol, b) = (self.vol.clone(), self.b.clone());
        self.sched
            .spawn_with(async move { host::write(&vol, &*b, offset, &data, false).await })
    }

    pub fn start_read(
        &mut self,
        offset: u64,
        len: u64,
    ) -> Rc<RefCell<Option<std::io::Result<Vec<u8>>>>> {
        let (vol, b) = (self.vol.clone(), self.b.clone());
        self.sched.spawn_with(async move {
            let mut buf = vec![0u8; len as usize];
            host::read(&vol, &*b, offset, &mut buf).await.map(|()| buf)
        })
    }

    pub fn read(&mut self, offset: u64, len: u64) -> Vec<u8> {
        let slot = self.start_read(offset, len);
        self.sched.run_until(STEP_LIMIT, || slot.borrow().is_some());
        let r = slot.borrow_mut().take().unwrap();
        r.expect("read")
    }

    pub fn flush(&mut self) {
        let (vol, b) = (self.vol.clone(), self.b.clone());
        let slot = self
            .sched
            .spawn_with(async move { host::flush(&vol, &*b).await });
        self.sched.run_until(STEP_LIMIT, || slot.borrow().is_some());
        slot.borrow_mut().take().unwrap().expect("flush");
    }

    /// Runs an operator command as the control socket would.
    pub fn command(&mut self, cmd: Command) -> Result<(), TransitionError> {
        self.vol.check(cmd)?;
        let (vol, b) = (self.vol.clone(), self.b.clone());
        let slot = self
            .sched
            .spawn_with(async move { engine::transition(&vol, &*b, |v| v.apply(cmd)).await });
        self.sched.run_until(STEP_LIMIT, || slot.borrow().is_some());
        let r = slot.borrow_mut().take().unwrap();
        r.expect("transition I/O")
    }

    /// Runs until no copy operation is left.
    pub fn settle(&mut self) {
        self.engine_paused.set(false);
        let vol = self.vol.clone();
        self.sched
            .run_until(STEP_LIMIT, || vol.state().copy_kind().is_none());
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

async fn committer(vol: Rc<Volume>, b: Rc<SimBackend>) {
    loop {
        if (b.take_commit_request() || vol.needs_commit()) && !b.commits_fail.get() {
            let seq = sim::mem_commit_begin(&vol);
            sim::YieldNow(2).await;
            vol.clock.finish(seq);
        }
        b.pause().await;
    }
}

async fn copier(
    vol: Rc<Volume>,
    b: Rc<SimBackend>,
    paused: Rc<Cell<bool>>,
    errors: Rc<RefCell<Vec<engine::CopyError>>>,
    cfg: EngineConfig,
) {
    loop {
        if paused.get() || vol.state().copy_kind().is_none() {
            b.pause().await;
            continue;
        }
        let r = engine::copy_batch(&vol, &*b, &cfg).await;
        let failed = !r.errors.is_empty();
        errors.borrow_mut().extend(r.errors);
        if failed && cfg.on_error == engine::OnError::Pause {
            paused.set(true);
            continue;
        }
        engine::complete_if_done(&vol, &*b).await.expect("complete");
        b.pause().await;
    }
}

/// Deterministic bytes for a write: `len` bytes derived from `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| r.u8(..)).collect()
}
