//! Deterministic simulation: in-memory devices, a backend that yields at
//! random points, and a single-threaded scheduler that polls tasks in a
//! seeded random order. The host path and the copy engine run here exactly
//! as they run on a ublk queue, so the model and crash tests exercise the
//! real code with reproducible interleavings (a seed reproduces a run).

use crate::core::{Dev, Volume};
use crate::hostpath::Backend;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

/// Seeded randomness shared by the backend and the scheduler.
pub type SimRng = Rc<RefCell<fastrand::Rng>>;

pub fn rng(seed: u64) -> SimRng {
    Rc::new(RefCell::new(fastrand::Rng::with_seed(seed)))
}

/// Two in-memory data devices, with I/O error injection.
pub struct SimDisks {
    pub primary: RefCell<Vec<u8>>,
    pub secondary: RefCell<Vec<u8>>,
    /// Bytes written to the secondary: tests assert it stays 0 while restoring.
    pub secondary_written: Cell<u64>,
    /// Fail reads of the secondary in this byte range (fault tests).
    pub fail_secondary_reads: Cell<Option<(u64, u64)>>,
    pub fail_secondary_writes: Cell<bool>,
    pub fail_primary_writes: Cell<bool>,
    /// Every completed write: (device, offset, length).
    pub write_log: RefCell<Vec<(Dev, u64, u64)>>,
}

impl SimDisks {
    pub fn new(size: usize) -> Rc<Self> {
        Rc::new(SimDisks {
            primary: RefCell::new(vec![0; size]),
            secondary: RefCell::new(vec![0; size]),
            secondary_written: Cell::new(0),
            fail_secondary_reads: Cell::new(None),
            fail_secondary_writes: Cell::new(false),
            fail_primary_writes: Cell::new(false),
            write_log: RefCell::new(Vec::new()),
        })
    }

    pub fn dev(&self, dev: Dev) -> &RefCell<Vec<u8>> {
        match dev {
            Dev::Primary => &self.primary,
            Dev::Secondary => &self.secondary,
        }
    }
}

/// A backend over [`SimDisks`] whose every operation may yield a few times
/// first, so that other tasks run in between.
pub struct SimBackend {
    pub disks: Rc<SimDisks>,
    rng: SimRng,
    max_yields: u32,
    commit_wanted: Cell<bool>,
}

impl SimBackend {
    pub fn new(disks: Rc<SimDisks>, rng: SimRng, max_yields: u32) -> Self {
        SimBackend {
            disks,
            rng,
            max_yields,
            commit_wanted: Cell::new(false),
        }
    }

    async fn jitter(&self) {
        let n = self.rng.borrow_mut().u32(0..=self.max_yields);
        YieldNow(n).await
    }

    pub fn take_commit_request(&self) -> bool {
        self.commit_wanted.replace(false)
    }
}

fn io_error() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

impl Backend for SimBackend {
    async fn read(&self, dev: Dev, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.jitter().await;
        if dev == Dev::Secondary {
            if let Some((start, end)) = self.disks.fail_secondary_reads.get() {
                if offset < end && offset + buf.len() as u64 > start {
                    return Err(io_error());
                }
            }
        }
        let d = self.disks.dev(dev).borrow();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }

    async fn write(&self, dev: Dev, offset: u64, buf: &[u8], _fua: bool) -> io::Result<()> {
        self.jitter().await;
        let failing = match dev {
            Dev::Primary => self.disks.fail_primary_writes.get(),
            Dev::Secondary => self.disks.fail_secondary_writes.get(),
        };
        if failing {
            return Err(io_error());
        }
        if dev == Dev::Secondary {
            let w = &self.disks.secondary_written;
            w.set(w.get() + buf.len() as u64);
        }
        self.disks
            .write_log
            .borrow_mut()
            .push((dev, offset, buf.len() as u64));
        let mut d = self.disks.dev(dev).borrow_mut();
        d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    async fn flush(&self, _dev: Dev) -> io::Result<()> {
        self.jitter().await;
        Ok(())
    }

    async fn pause(&self) {
        YieldNow(1).await
    }

    fn request_commit(&self) {
        self.commit_wanted.set(true);
    }
}

/// A future that returns `Pending` `n` times before it is ready.
pub struct YieldNow(pub u32);

impl Future for YieldNow {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 == 0 {
            return Poll::Ready(());
        }
        self.0 -= 1;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// An in-memory metadata commit, split in two halves so that other tasks
/// run while it is "in flight" (the crash tests use the real store over
/// simulated devices instead).
pub fn mem_commit_begin(vol: &Volume) -> crate::core::CommitSeq {
    let seq = vol.clock.begin();
    vol.take_header_dirty();
    let mut buf = vec![0u64; crate::core::table::CHUNK_WORDS];
    for table in vol.tables.all() {
        for c in 0..table.chunks() {
            table.take_dirty_chunk(c, &mut buf);
        }
    }
    seq
}

type Task<'a> = Pin<Box<dyn Future<Output = ()> + 'a>>;

/// Polls tasks one at a time in a seeded random order.
pub struct Scheduler<'a> {
    tasks: Vec<(u64, Task<'a>)>,
    next_id: u64,
    rng: SimRng,
}

impl<'a> Scheduler<'a> {
    pub fn new(rng: SimRng) -> Self {
        Scheduler {
            tasks: Vec::new(),
            next_id: 0,
            rng,
        }
    }

    pub fn spawn(&mut self, f: impl Future<Output = ()> + 'a) -> u64 {
        self.next_id += 1;
        self.tasks.push((self.next_id, Box::pin(f)));
        self.next_id
    }

    /// Spawns a task whose result lands in the returned slot.
    pub fn spawn_with<T: 'a>(&mut self, f: impl Future<Output = T> + 'a) -> Rc<RefCell<Option<T>>> {
        let slot = Rc::new(RefCell::new(None));
        let s = slot.clone();
        self.spawn(async move {
            let v = f.await;
            *s.borrow_mut() = Some(v);
        });
        slot
    }

    pub fn is_running(&self, id: u64) -> bool {
        self.tasks.iter().any(|(i, _)| *i == id)
    }

    /// Polls one randomly chosen task; returns false when none is left.
    pub fn step(&mut self) -> bool {
        if self.tasks.is_empty() {
            return false;
        }
        let i = self.rng.borrow_mut().usize(0..self.tasks.len());
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if self.tasks[i].1.as_mut().poll(&mut cx).is_ready() {
            drop(self.tasks.swap_remove(i));
        }
        true
    }

    /// Steps until `done()` holds; panics after `limit` steps (a livelock).
    pub fn run_until(&mut self, limit: u64, mut done: impl FnMut() -> bool) {
        for _ in 0..limit {
            if done() {
                return;
            }
            self.step();
        }
        assert!(done(), "simulation did not settle within {limit} steps");
    }
}
