//! Deterministic simulation: in-memory devices, a backend that yields at
//! random points, and a single-threaded scheduler that polls tasks in a
//! seeded random order. The host path and the copy engine run here exactly
//! as they run on a ublk queue, so the model and crash tests exercise the
//! real code with reproducible interleavings (a seed reproduces a run).

use crate::backend::hostbuf::Fixed;
use crate::backend::Backend;
use crate::core::{Dev, Volume};
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
    /// The errno a failing primary write returns (EIO unless a test sets
    /// e.g. ENOSPC).
    pub primary_write_errno: Cell<i32>,
    /// Fail reads of the primary in this byte range until a write covers
    /// them, as a disk remaps a bad sector on rewrite (read repair tests).
    pub fail_primary_reads: Cell<Option<(u64, u64)>>,
    /// Fail FLUSHes of the primary / the secondary; writes still succeed
    /// (their data stays in the volatile cache, if any).
    pub fail_primary_flushes: Cell<bool>,
    pub fail_secondary_flushes: Cell<bool>,
    /// Every completed write: (device, offset, length). Zeroing by
    /// `fallocate` is a write of zeros here too.
    pub write_log: RefCell<Vec<(Dev, u64, u64)>>,
    /// Every completed `fallocate` (discard, write-zeroes): (device,
    /// offset, length).
    pub zero_log: RefCell<Vec<(Dev, u64, u64)>>,
    /// `fallocate` fails with EOPNOTSUPP, as on a device or filesystem
    /// without it: zeroing falls back to writing zero buffers.
    pub fallocate_unsupported: Cell<bool>,
    /// Every completed flush, by device (engine, host and commit flushes).
    pub flush_log: RefCell<Vec<Dev>>,
    /// Crash tests: volatile write caches and the power they depend on.
    pub volatile: Option<Volatile>,
}

/// Volatile write caches for both data devices (index 0 primary, 1 secondary).
pub struct Volatile {
    pub power: Rc<Power>,
    caches: [WriteCache; 2],
}

impl SimDisks {
    pub fn new(size: usize) -> Rc<Self> {
        Rc::new(Self::healthy(vec![0; size], vec![0; size], None))
    }

    /// Devices with volatile write caches holding these durable images;
    /// every write and flush draws on `power`.
    pub fn volatile(primary: Vec<u8>, secondary: Vec<u8>, power: Rc<Power>) -> Rc<Self> {
        let volatile = Volatile {
            power,
            caches: [
                WriteCache::new(primary.clone()),
                WriteCache::new(secondary.clone()),
            ],
        };
        Rc::new(Self::healthy(primary, secondary, Some(volatile)))
    }

    /// Disks holding these images, with no fault injected.
    fn healthy(primary: Vec<u8>, secondary: Vec<u8>, volatile: Option<Volatile>) -> Self {
        SimDisks {
            primary: RefCell::new(primary),
            secondary: RefCell::new(secondary),
            secondary_written: Cell::new(0),
            fail_secondary_reads: Cell::new(None),
            fail_secondary_writes: Cell::new(false),
            fail_primary_writes: Cell::new(false),
            primary_write_errno: Cell::new(libc::EIO),
            fail_primary_reads: Cell::new(None),
            fail_primary_flushes: Cell::new(false),
            fail_secondary_flushes: Cell::new(false),
            write_log: RefCell::new(Vec::new()),
            zero_log: RefCell::new(Vec::new()),
            fallocate_unsupported: Cell::new(false),
            flush_log: RefCell::new(Vec::new()),
            volatile,
        }
    }

    /// Flushes `devs` at once (for a metadata commit's data flush).
    pub fn flush_now(&self, devs: crate::core::DevSet) -> io::Result<()> {
        for dev in devs.devs() {
            let failing = match dev {
                Dev::Primary => self.fail_primary_flushes.get(),
                Dev::Secondary => self.fail_secondary_flushes.get(),
            };
            if failing {
                return Err(io_error());
            }
            if let Some(v) = &self.volatile {
                v.power.tick()?;
                v.power.flushing();
                v.caches[dev.index()].flush();
            }
            self.flush_log.borrow_mut().push(dev);
        }
        Ok(())
    }

    /// What survives a power cut: (primary, secondary).
    pub fn crash_images(&self, rng: &mut fastrand::Rng) -> (Vec<u8>, Vec<u8>) {
        let v = self.volatile.as_ref().expect("volatile disks");
        (v.caches[0].crash_image(rng), v.caches[1].crash_image(rng))
    }

    /// What survives when the devices share one cache and lose it (see
    /// [`WriteCache::one_cache_image`]): (primary, secondary).
    pub fn one_cache_images(&self) -> (Vec<u8>, Vec<u8>) {
        let v = self.volatile.as_ref().expect("volatile disks");
        let upto = v.power.flushed_upto();
        (
            v.caches[0].one_cache_image(upto),
            v.caches[1].one_cache_image(upto),
        )
    }

    /// A write covering the whole failing read range of the primary heals
    /// it (the disk remapped the bad sectors).
    fn remap_primary(&self, offset: u64, len: u64) {
        if let Some((start, end)) = self.fail_primary_reads.get() {
            if offset <= start && offset + len >= end {
                self.fail_primary_reads.set(None);
            }
        }
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
    /// Metadata commits fail while set (fault tests).
    pub commits_fail: Cell<bool>,
    /// Host buffers registered as a zero-copy ublk queue's ring holds its
    /// requests' pages: only `read_host` and `write_host` reach them, so
    /// the host path's zero-copy branches run in the simulation too.
    registered: RefCell<Vec<Option<Vec<u8>>>>,
    /// Whether [`Backend::copy_fixed`] can copy registered bytes into a
    /// track buffer (as a zero-copy ublk queue's memfd buffers can); when
    /// not, merges write around the host's bytes. Set by default.
    pub copies_fixed: Cell<bool>,
}

impl SimBackend {
    pub fn new(disks: Rc<SimDisks>, rng: SimRng, max_yields: u32) -> Self {
        SimBackend {
            disks,
            rng,
            max_yields,
            commit_wanted: Cell::new(false),
            commits_fail: Cell::new(false),
            registered: RefCell::new(Vec::new()),
            copies_fixed: Cell::new(true),
        }
    }

    /// Registers a host request's bytes (see `registered`).
    pub fn register(&self, data: Vec<u8>) -> Fixed {
        let mut r = self.registered.borrow_mut();
        let len = data.len();
        let index = match r.iter().position(Option::is_none) {
            Some(i) => {
                r[i] = Some(data);
                i
            }
            None => {
                r.push(Some(data));
                r.len() - 1
            }
        };
        Fixed {
            index: u16::try_from(index).expect("registered buffers"),
            at: 0,
            len,
        }
    }

    /// Gives back what [`SimBackend::register`] took, as it is now.
    pub fn unregister(&self, f: Fixed) -> Vec<u8> {
        self.registered.borrow_mut()[usize::from(f.index)]
            .take()
            .expect("a registered buffer")
    }

    fn with_registered<T>(&self, f: Fixed, op: impl FnOnce(&mut [u8]) -> T) -> T {
        let mut r = self.registered.borrow_mut();
        let buf = r[usize::from(f.index)]
            .as_mut()
            .expect("a registered buffer");
        op(&mut buf[f.at..f.at + f.len])
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
        let failing = match dev {
            Dev::Primary => self.disks.fail_primary_reads.get(),
            Dev::Secondary => self.disks.fail_secondary_reads.get(),
        };
        if let Some((start, end)) = failing {
            if offset < end && offset + buf.len() as u64 > start {
                return Err(io_error());
            }
        }
        let d = self.disks.dev(dev).borrow();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }

    async fn write(&self, dev: Dev, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
        self.jitter().await;
        self.put(dev, offset, buf, fua)
    }

    async fn read_fixed(&self, dev: Dev, offset: u64, f: Fixed) -> io::Result<()> {
        let mut data = vec![0; f.len];
        self.read(dev, offset, &mut data).await?;
        self.with_registered(f, |r| r.copy_from_slice(&data));
        Ok(())
    }

    async fn copy_fixed(
        &self,
        f: Fixed,
        buf: &mut crate::backend::buf::AlignedBuf,
        at: usize,
    ) -> io::Result<bool> {
        if !self.copies_fixed.get() {
            return Ok(false);
        }
        self.jitter().await;
        self.with_registered(f, |r| buf[at..at + f.len].copy_from_slice(r));
        Ok(true)
    }

    async fn write_fixed(&self, dev: Dev, offset: u64, f: Fixed, fua: bool) -> io::Result<()> {
        self.jitter().await;
        let data = self.with_registered(f, |r| r.to_vec());
        self.put(dev, offset, &data, fua)
    }

    /// Both zeroing modes make the range zeros, with the faults and the
    /// volatile cache of a write (a real device's write-zeroes or discard
    /// sits in its cache until a flush too).
    async fn fallocate(&self, dev: Dev, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        self.jitter().await;
        if self.disks.fallocate_unsupported.get() {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        if mode != crate::backend::zero::PUNCH_HOLE && mode != crate::backend::zero::ZERO_RANGE {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.put(dev, offset, &vec![0; len as usize], false)?;
        self.disks.zero_log.borrow_mut().push((dev, offset, len));
        Ok(())
    }

    async fn flush(&self, dev: Dev) -> io::Result<()> {
        self.jitter().await;
        self.disks.flush_now(match dev {
            Dev::Primary => crate::core::DevSet::PRIMARY,
            Dev::Secondary => crate::core::DevSet::SECONDARY,
        })
    }

    async fn pause(&self) {
        YieldNow(1).await
    }

    fn request_commit(&self) {
        self.commit_wanted.set(true);
    }

    /// The harness's log task looks at the volume each turn.
    fn request_log(&self) {}

    fn commit_failed(&self) -> bool {
        self.commits_fail.get()
    }
}

impl SimBackend {
    /// A write's effect on the disks: fault injection, the volatile cache,
    /// the logs, the bytes.
    fn put(&self, dev: Dev, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
        let failing = match dev {
            Dev::Primary => self.disks.fail_primary_writes.get(),
            Dev::Secondary => self.disks.fail_secondary_writes.get(),
        };
        if failing {
            return Err(match dev {
                Dev::Primary => io::Error::from_raw_os_error(self.disks.primary_write_errno.get()),
                Dev::Secondary => io_error(),
            });
        }
        if dev == Dev::Primary {
            self.disks.remap_primary(offset, buf.len() as u64);
        }
        if let Some(v) = &self.disks.volatile {
            v.power.tick()?;
            v.caches[dev.index()].record(offset, buf, fua, v.power.next_write());
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
    vol.take_commit().seq
}

/// The second half of an in-memory commit: `seq` is durable.
pub fn mem_commit_end(vol: &Volume, seq: crate::core::CommitSeq) {
    vol.finish_commit(seq)
}

type Task<'a> = Pin<Box<dyn Future<Output = ()> + 'a>>;

/// Polls tasks one at a time in a seeded random order.
pub struct Scheduler<'a> {
    tasks: Vec<(u64, Task<'a>)>,
    next_id: u64,
    rng: SimRng,
    /// Tasks are polled in random order, never on wake-up.
    waker: std::task::Waker,
}

struct NoopWake;

impl std::task::Wake for NoopWake {
    fn wake(self: std::sync::Arc<Self>) {}
}

impl<'a> Scheduler<'a> {
    pub fn new(rng: SimRng) -> Self {
        Scheduler {
            tasks: Vec::new(),
            next_id: 0,
            rng,
            waker: std::task::Waker::from(std::sync::Arc::new(NoopWake)),
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

    /// Polls one randomly chosen task; returns false when none is left.
    pub fn step(&mut self) -> bool {
        if self.tasks.is_empty() {
            return false;
        }
        let i = self.rng.borrow_mut().usize(0..self.tasks.len());
        let mut cx = Context::from_waker(&self.waker);
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

/// The power supply of a crash test: counts device writes and flushes and
/// cuts at a chosen one; from then on every write and flush fails.
/// Each power-up is a new boot, with its own boot id (see
/// `core::restore_log`).
#[derive(Debug)]
pub struct Power {
    ops: Cell<u64>,
    cut_at: Cell<u64>,
    off: Cell<bool>,
    boot: u64,
    /// Device writes so far, in completion order: each cached write is
    /// tagged with its number.
    writes: Cell<u64>,
    /// Writes numbered up to this were completed before a flush of any
    /// device began: what survives when all the devices share one cache
    /// ([`WriteCache::one_cache_image`]).
    flushed_upto: Cell<u64>,
}

thread_local! {
    static BOOTS: Cell<u64> = const { Cell::new(0) };
}

impl Default for Power {
    fn default() -> Self {
        Power {
            ops: Cell::new(0),
            cut_at: Cell::new(u64::MAX),
            off: Cell::new(false),
            writes: Cell::new(0),
            flushed_upto: Cell::new(0),
            boot: BOOTS.with(|b| {
                b.set(b.get() + 1);
                b.get()
            }),
        }
    }
}

impl Power {
    /// A power-up: a new boot.
    pub fn new() -> Rc<Self> {
        Rc::new(Power::default())
    }

    /// The same boot, for a server restarted after its process died
    /// (`kill -9`): the devices' caches were not lost.
    pub fn same_boot(&self) -> Rc<Self> {
        Rc::new(Power {
            boot: self.boot,
            ..Power::default()
        })
    }

    /// The boot id the metadata's restore log records.
    pub fn boot_id(&self) -> [u8; 16] {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.boot.to_le_bytes());
        id[8..].copy_from_slice(b"sim-boot");
        id
    }

    /// Cuts the power at the `n`th write or flush from now (n >= 1).
    pub fn arm(&self, n: u64) {
        self.cut_at.set(self.ops.get() + n);
    }

    /// Keeps the power on after all.
    pub fn disarm(&self) {
        self.cut_at.set(u64::MAX);
    }

    pub fn cut(&self) {
        self.off.set(true);
    }

    /// Numbers a device write that completed.
    fn next_write(&self) -> u64 {
        self.writes.set(self.writes.get() + 1);
        self.writes.get()
    }

    /// A flush of any device began: in the one-cache view every write
    /// completed so far is durable.
    fn flushing(&self) {
        self.flushed_upto.set(self.writes.get());
    }

    /// See [`WriteCache::one_cache_image`].
    pub fn flushed_upto(&self) -> u64 {
        self.flushed_upto.get()
    }

    pub fn is_off(&self) -> bool {
        self.off.get()
    }

    /// One write or flush; fails if the power is (now) off.
    pub fn tick(&self) -> io::Result<()> {
        if !self.off.get() {
            self.ops.set(self.ops.get() + 1);
            if self.ops.get() >= self.cut_at.get() {
                self.off.set(true);
            }
        }
        if self.off.get() {
            Err(io_error())
        } else {
            Ok(())
        }
    }
}

/// A device's volatile write cache: completed writes are durable only once
/// flushed (or written with FUA). Kept in 4 KiB units, the unit a power cut
/// keeps or loses.
pub struct WriteCache {
    durable: RefCell<Vec<u8>>,
    /// (offset, bytes, write number) of each unflushed unit.
    unflushed: RefCell<Vec<(u64, Vec<u8>, u64)>>,
}

const UNIT: u64 = 4096;

impl WriteCache {
    pub fn new(durable: Vec<u8>) -> Self {
        WriteCache {
            durable: RefCell::new(durable),
            unflushed: RefCell::new(Vec::new()),
        }
    }

    /// `n`: the write's number ([`Power`]).
    pub fn record(&self, offset: u64, data: &[u8], fua: bool, n: u64) {
        if fua {
            // Written through. The cache keeps earlier unflushed writes of
            // the same units, now with these bytes on top: a later flush
            // still makes the rest of such a unit durable.
            let end = offset + data.len() as u64;
            for (o, d, _) in self.unflushed.borrow_mut().iter_mut() {
                let (from, to) = (offset.max(*o), end.min(*o + d.len() as u64));
                if from < to {
                    d[(from - *o) as usize..(to - *o) as usize]
                        .copy_from_slice(&data[(from - offset) as usize..(to - offset) as usize]);
                }
            }
            apply(&mut self.durable.borrow_mut(), offset, data);
            return;
        }
        let mut pos = offset;
        let mut unflushed = self.unflushed.borrow_mut();
        for unit in data_units(offset, data) {
            unflushed.push((pos, unit.to_vec(), n));
            pos += unit.len() as u64;
        }
    }

    pub fn flush(&self) {
        let mut durable = self.durable.borrow_mut();
        for (o, d, _) in self.unflushed.borrow_mut().drain(..) {
            apply(&mut durable, o, &d);
        }
    }

    /// Grows the device (metadata files grow at format).
    pub fn grow(&self, len: usize) {
        self.durable.borrow_mut().resize(len, 0);
    }

    /// The durable image plus each unflushed unit kept or lost at random,
    /// applied in random order.
    pub fn crash_image(&self, rng: &mut fastrand::Rng) -> Vec<u8> {
        let mut img = self.durable.borrow().clone();
        let mut units = self.unflushed.borrow().clone();
        rng.shuffle(&mut units);
        for (o, d, _) in units {
            if rng.bool() {
                apply(&mut img, o, &d);
            }
        }
        img
    }

    /// The durable image plus the unflushed writes numbered up to `upto`,
    /// in order: what survives when every device sits behind one cache
    /// that a flush of any of them empties (one disk carved into
    /// partitions; the VM's power-cut test logs all three devices through
    /// one dm-log-writes target this way), cut just before the next flush.
    pub fn one_cache_image(&self, upto: u64) -> Vec<u8> {
        let mut img = self.durable.borrow().clone();
        for (o, d, n) in self.unflushed.borrow().iter() {
            if *n <= upto {
                apply(&mut img, *o, d);
            }
        }
        img
    }
}

/// Splits a write at 4 KiB boundaries.
fn data_units(offset: u64, data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = data;
    let mut pos = offset;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let n = ((UNIT - pos % UNIT) as usize).min(rest.len());
        let (unit, tail) = rest.split_at(n);
        rest = tail;
        pos += n as u64;
        Some(unit)
    })
}

fn apply(img: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let end = offset as usize + data.len();
    if img.len() < end {
        img.resize(end, 0);
    }
    img[offset as usize..end].copy_from_slice(data);
}

/// A metadata device in memory with a volatile cache, on the crash test's
/// power. Clones share the disk, so the test keeps one to cut the power
/// and take the surviving image.
#[derive(Clone)]
pub struct SimMetaDevice {
    disk: Rc<SimMetaDisk>,
    /// The restore log's handle ([`MetaDevice::log_handle`]): its writes
    /// stay in a page cache until the main handle flushes the device or
    /// writes over them, as a buffered handle's do.
    ///
    /// [`MetaDevice::log_handle`]: crate::metadata::MetaDevice::log_handle
    buffered: bool,
}

struct SimMetaDisk {
    /// What a read sees: the device with the page cache on top.
    current: RefCell<Vec<u8>>,
    cache: WriteCache,
    /// Buffered writes not yet written back to the device: a killed
    /// process leaves them behind (`current` has them), a power cut loses
    /// them.
    page_cache: RefCell<Vec<(u64, Vec<u8>)>>,
    power: Rc<Power>,
}

impl SimMetaDisk {
    /// Writes back the page cache's writes that overlap `range` (all of
    /// them for `None`), as the kernel does before a direct write of a
    /// range and on fdatasync.
    fn write_back(&self, range: Option<(u64, u64)>) {
        let mut pages = self.page_cache.borrow_mut();
        let overlaps =
            |o: u64, len: usize| range.is_none_or(|(at, end)| o < end && at < o + len as u64);
        for (o, d) in pages.iter().filter(|(o, d)| overlaps(*o, d.len())) {
            self.cache.record(*o, d, false, self.power.next_write());
        }
        pages.retain(|(o, d)| !overlaps(*o, d.len()));
    }

    /// The device's own cache flush (a FLUSH that has drawn on the power).
    fn flush_cache(&self) {
        self.power.flushing();
        self.cache.flush();
    }
}

impl SimMetaDevice {
    /// A device whose durable content is `image`.
    pub fn new(image: Vec<u8>, power: Rc<Power>) -> Self {
        SimMetaDevice {
            disk: Rc::new(SimMetaDisk {
                current: RefCell::new(image.clone()),
                cache: WriteCache::new(image),
                page_cache: RefCell::new(Vec::new()),
                power,
            }),
            buffered: false,
        }
    }

    pub fn crash_image(&self, rng: &mut fastrand::Rng) -> Vec<u8> {
        self.disk.cache.crash_image(rng)
    }

    /// See [`WriteCache::one_cache_image`].
    pub fn one_cache_image(&self) -> Vec<u8> {
        self.disk
            .cache
            .one_cache_image(self.disk.power.flushed_upto())
    }

    /// Everything written, cached or not: what a restart after `kill -9`
    /// reads.
    pub fn current_image(&self) -> Vec<u8> {
        self.disk.current.borrow().clone()
    }
}

impl crate::metadata::MetaDevice for SimMetaDevice {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let cur = self.disk.current.borrow();
        let end = offset as usize + buf.len();
        if end > cur.len() {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        buf.copy_from_slice(&cur[offset as usize..end]);
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.disk.power.tick()?;
        apply(&mut self.disk.current.borrow_mut(), offset, buf);
        if self.buffered {
            let mut pages = self.disk.page_cache.borrow_mut();
            pages.retain(|(o, d)| !(*o == offset && d.len() == buf.len()));
            pages.push((offset, buf.to_vec()));
            return Ok(());
        }
        let n = buf.len() as u64;
        self.disk.write_back(Some((offset, offset + n)));
        self.disk
            .cache
            .record(offset, buf, false, self.disk.power.next_write());
        Ok(())
    }

    /// fdatasync: the page cache is written back first.
    fn flush(&mut self) -> io::Result<()> {
        self.disk.power.tick()?;
        self.disk.write_back(None);
        self.disk.flush_cache();
        Ok(())
    }

    /// A synchronous direct write writes back only its own range of the
    /// page cache before the device flush that makes it durable.
    fn write_at_durable(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_at(buf, offset)?;
        self.disk.power.tick()?;
        self.disk.flush_cache();
        Ok(())
    }

    fn size(&mut self) -> io::Result<u64> {
        Ok(self.disk.current.borrow().len() as u64)
    }

    fn grow(&mut self, bytes: u64) -> io::Result<()> {
        self.disk.current.borrow_mut().resize(bytes as usize, 0);
        self.disk.cache.grow(bytes as usize);
        Ok(())
    }

    fn describe(&self) -> String {
        "sim-meta".into()
    }

    fn boot_id(&self) -> Option<[u8; 16]> {
        Some(self.disk.power.boot_id())
    }

    fn log_handle(&self) -> io::Result<Self> {
        Ok(SimMetaDevice {
            disk: self.disk.clone(),
            buffered: true,
        })
    }
}
