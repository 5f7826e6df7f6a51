//! Deterministic crash simulation: the real host path, copy engine and
//! metadata store over devices with volatile write caches. A seeded random
//! workload (writes, discards and write-zeroes, reads, flushes,
//! split/establish/restore) runs until the
//! power is cut at a random device write or flush, in the middle of a
//! commit as often as not; each unflushed 4 KiB unit is then kept or lost at
//! random. The volume is reopened from what survived, its operation run to
//! the end, and the content checked against a model.
//!
//! The model, per 4 KiB block: the value made durable by the last completed
//! flush (or FUA write, or state change, which flushes), plus every value
//! written since (acknowledged but unflushed writes may be lost; writes in
//! flight may or may not land). Any of those is acceptable after the crash;
//! anything else is a bug. A completed restore replaces the durable value by
//! the split image. Workload writes never overlap in flight, so the values
//! of a block are ordered.
//!
//! `SPLITMIRROR_CRASH_SEEDS=N` runs seeds 0..N (default 1000);
//! `SPLITMIRROR_CRASH_SEED=n` runs seed n alone;
//! `SPLITMIRROR_CRASH_VERBOSE=1` prints what each seed did (with
//! `-- --nocapture`).

mod common;

use common::{Harness, Options, Slot};
use splitmirror::backend::sim::{Power, SimDisks, SimMetaDevice};
use splitmirror::core::{Command, Geometry, TransitionError, Volume, VolumeState};
use splitmirror::edge::config::RestorePriority;
use splitmirror::exec::engine::EngineConfig;
use splitmirror::metadata::{Binding, MetadataStore};
use std::io;

const BLOCK: u64 = 4096;
const TRACK: u64 = 16 * 1024;
const TRACKS: u64 = 64;
const SIZE: u64 = TRACK * TRACKS;
const BLOCKS: u64 = SIZE / BLOCK;
const BLOCKS_PER_TRACK: u64 = TRACK / BLOCK;
/// Scheduler steps before the power is cut anyway.
const MAX_STEPS: u64 = 6_000;
/// The cut falls on one of this many device writes and flushes.
const MAX_CUT_OP: u64 = 700;
const RECOVERY_STEPS: u64 = 2_000_000;

fn binding() -> Binding {
    common::binding(SIZE, TRACK)
}

/// Values with this bit set were written by a discard or write-zeroes: the
/// block is zeros.
const ZEROS: u64 = 1 << 63;

/// The bytes of value `id` in block `block`: (id, block) repeated, so a
/// mismatch can be decoded from the first 16 bytes; zeros for a zeroing.
fn block_bytes(id: u64, block: u64) -> Vec<u8> {
    if id & ZEROS != 0 {
        return vec![0; BLOCK as usize];
    }
    let mut pair = [0u8; 16];
    pair[..8].copy_from_slice(&id.to_le_bytes());
    pair[8..].copy_from_slice(&block.to_le_bytes());
    pair.repeat(BLOCK as usize / 16)
}

fn decode(bytes: &[u8]) -> (u64, u64) {
    let id = u64::from_le_bytes(bytes[0..8].try_into().unwrap());
    let block = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    (id, block)
}

/// Blocks `first..` holding the values `ids`.
fn image(first: u64, ids: impl Iterator<Item = u64>) -> Vec<u8> {
    let mut v = Vec::new();
    for (i, id) in ids.enumerate() {
        v.extend_from_slice(&block_bytes(id, first + i as u64));
    }
    v
}

// ---- the model ---------------------------------------------------------

#[derive(Clone)]
struct Entry {
    id: u64,
    /// Event number of the acknowledgement.
    acked: Option<u64>,
}

#[derive(Clone)]
struct BlockModel {
    durable: u64,
    since: Vec<Entry>,
}

impl BlockModel {
    fn candidates(&self) -> Vec<u64> {
        let mut c = vec![self.durable];
        c.extend(self.since.iter().map(|e| e.id));
        c
    }

    /// A flush that started at event `start` completed: the newest value
    /// acknowledged before it is durable.
    fn flushed(&mut self, start: u64) {
        if let Some(i) = self
            .since
            .iter()
            .rposition(|e| e.acked.is_some_and(|a| a <= start))
        {
            self.durable = self.since[i].id;
            self.since.drain(..=i);
        }
    }
}

#[derive(Clone)]
struct Model {
    blocks: Vec<BlockModel>,
    /// The secondary's content since the last split.
    split_image: Option<Vec<u64>>,
    event: u64,
    /// Restores completed so far.
    restores: u64,
}

impl Model {
    fn new() -> Self {
        Model {
            blocks: vec![
                BlockModel {
                    durable: 0,
                    since: Vec::new()
                };
                BLOCKS as usize
            ],
            split_image: None,
            event: 0,
            restores: 0,
        }
    }

    fn tick(&mut self) -> u64 {
        self.event += 1;
        self.event
    }

    fn flushed(&mut self, start: u64) {
        self.blocks.iter_mut().for_each(|b| b.flushed(start));
    }

    /// A restore became durable at `at`: the split image is the content,
    /// with writes not acknowledged before `at` possibly on top.
    fn restored(&mut self, at: u64) {
        self.restores += 1;
        let image = self.split_image.clone().expect("restore after a split");
        for (b, id) in self.blocks.iter_mut().zip(image) {
            b.durable = id;
            b.since.retain(|e| e.acked.is_none_or(|a| a > at));
        }
    }
}

// ---- the run -----------------------------------------------------------

struct Write {
    id: u64,
    first: u64,
    blocks: u64,
    fua: bool,
    slot: Slot<io::Result<()>>,
}

struct Read {
    first: u64,
    /// Per block: the values it could hold when the read was issued, and
    /// those written to it while the read was in flight.
    before: Vec<Vec<u64>>,
    /// `Model::restores` when the read was issued: a restore that
    /// completes while the read waits (at the state change's gate) may
    /// roll its blocks back to the split image before it runs.
    restores: u64,
    slot: Slot<io::Result<Vec<u8>>>,
}

struct Flush {
    start: u64,
    slot: Slot<io::Result<()>>,
}

struct CommandRun {
    cmd: Command,
    start: u64,
    slot: Slot<io::Result<Result<(), TransitionError>>>,
}

struct Run {
    seed: u64,
    rng: fastrand::Rng,
    /// The volume, its devices, engine and committer.
    h: Harness,
    model: Model,
    busy: Vec<bool>,
    next_id: u64,
    writes: Vec<Write>,
    reads: Vec<Read>,
    flushes: Vec<Flush>,
    command: Option<CommandRun>,
    /// The workload step from which the secondary fails every flush.
    flush_fault_at: Option<u64>,
    /// How the server goes down.
    crash: Crash,
    /// The event at which the volume was first seen restoring (the
    /// restore's state change itself, not its command's start).
    restoring_since: Option<u64>,
    /// The track of the last random range.
    last_track: u64,
    /// A restore ended in `split` (protected) during the run: its end may
    /// not have been durable at the crash.
    protected_restore_ended: bool,
}

/// The copy engine's settings, drawn per seed: how many tracks it copies
/// at once and in which I/Os, and how it yields to the host, change which
/// host requests meet which copies (the pacer's reaction to a new load
/// once exposed a FUA write acknowledged too early).
/// `SPLITMIRROR_CRASH_TRACE=t`: the track whose writes, flushes and
/// state changes a failing seed prints (with `-- --nocapture`).
fn traced() -> Option<u64> {
    std::env::var("SPLITMIRROR_CRASH_TRACE")
        .ok()
        .and_then(|s| s.parse().ok())
}

fn trace_track(what: &str, vol: &Volume, t: u64) {
    use splitmirror::core::TableId;
    eprintln!(
        "trace: {what}; {} pending {} changed {} intent {}",
        vol.state(),
        vol.table(TableId::Pending).get(t),
        vol.table(TableId::Changed).get(t),
        vol.table(TableId::Intent).get(t),
    );
}

fn engine_config(rng: &mut fastrand::Rng) -> EngineConfig {
    let max_inflight = [1, 2, 3, 8][rng.usize(0..4)];
    EngineConfig {
        batch: rng.usize(1..=4).min(max_inflight),
        max_inflight,
        busy_inflight: max_inflight,
        max_io: rng.u64(1..=3) * TRACK,
        priority: [
            RestorePriority::Host,
            RestorePriority::Balanced,
            RestorePriority::Restore,
        ][rng.usize(0..3)],
        ..Default::default()
    }
}

/// The harness's engine and committer as the crash test runs them: the
/// committer also clears idle write intents at random.
fn options(rng: &mut fastrand::Rng) -> Options {
    Options {
        engine: Some(engine_config(rng)),
        clear_idle_intents: true,
        lazy_commits: true,
    }
}

impl Run {
    fn new(seed: u64, flush_fault: bool, crash: Crash) -> Run {
        let mut rng = fastrand::Rng::with_seed(seed ^ 0x5eed_c0de);
        let flush_fault_at = flush_fault.then(|| rng.u64(0..MAX_STEPS / 2));
        let assume_clean = rng.bool();
        let power = Power::new();
        let primary = image(0, (0..BLOCKS).map(|_| 0));
        let secondary = if assume_clean {
            primary.clone()
        } else {
            vec![0xee; SIZE as usize]
        };
        let disks = SimDisks::volatile(primary, secondary, power.clone());
        let vol = Volume::formatted(Geometry::new(SIZE, TRACK).unwrap(), assume_clean);
        let meta = SimMetaDevice::new(Vec::new(), power.clone());
        let store = MetadataStore::format_dev(meta.clone(), &binding(), &vol, false)
            .expect("format the sim metadata");
        power.arm(rng.u64(1..=MAX_CUT_OP));
        let opts = options(&mut rng);
        let h = Harness::start(seed, vol, disks, store, meta, power, opts);
        Run {
            seed,
            rng,
            h,
            model: Model::new(),
            busy: vec![false; BLOCKS as usize],
            next_id: 1,
            writes: Vec::new(),
            reads: Vec::new(),
            flushes: Vec::new(),
            command: None,
            flush_fault_at,
            crash,
            restoring_since: None,
            last_track: 0,
            protected_restore_ended: false,
        }
    }

    /// Runs the workload until the power is cut.
    fn until_crash(&mut self) -> Result<(), String> {
        for step in 0..MAX_STEPS {
            if self.flush_fault_at == Some(step) {
                self.h.disks.fail_secondary_flushes.set(true);
                // Cut soon after: the commits right after the fault are
                // the ones that could record the secondary's lost data.
                self.h.power.arm(self.rng.u64(1..=60));
            }
            self.maybe_spawn();
            self.h.sched.step();
            // Before `collect`: a step runs one task, so a write finished
            // in it came after a state change seen here.
            if self.h.vol.state() != VolumeState::Restoring {
                if self.restoring_since.is_some() && self.h.vol.state() == VolumeState::Split {
                    self.protected_restore_ended = true;
                }
                self.restoring_since = None;
            } else if self.restoring_since.is_none() {
                self.restoring_since = Some(self.model.tick());
            }
            self.collect()?;
            if self.h.power.is_off() {
                return Ok(());
            }
        }
        self.h.power.cut();
        Ok(())
    }

    fn inflight(&self) -> usize {
        self.writes.len() + self.reads.len() + self.flushes.len()
    }

    fn maybe_spawn(&mut self) {
        if self.command.is_none() && self.rng.u32(0..400) == 0 {
            self.spawn_command();
        }
        if self.inflight() >= 4 || self.rng.u32(0..6) != 0 {
            return;
        }
        match self.rng.u32(0..20) {
            0..=10 => self.spawn_write(),
            11..=16 => self.spawn_read(),
            _ => self.spawn_flush(),
        }
    }

    /// A random range of blocks: often a whole track (claim 5), else 1..=6
    /// blocks anywhere (partial tracks, sometimes across two).
    fn random_range(&mut self) -> (u64, u64) {
        if self.rng.u32(0..4) == 0 {
            let t = self.rng.u64(0..TRACKS);
            self.last_track = t;
            return (t * BLOCKS_PER_TRACK, BLOCKS_PER_TRACK);
        }
        if self.rng.u32(0..3) == 0 {
            // Again in the track of the last range: a write on top of one
            // that just restored or changed its track.
            let first = self.last_track * BLOCKS_PER_TRACK + self.rng.u64(0..BLOCKS_PER_TRACK);
            let n = self.rng.u64(1..=2).min(BLOCKS - first);
            return (first, n);
        }
        let first = self.rng.u64(0..BLOCKS);
        let n = self.rng.u64(1..=6).min(BLOCKS - first);
        self.last_track = first / BLOCKS_PER_TRACK;
        (first, n)
    }

    fn spawn_write(&mut self) {
        let (first, n) = self.random_range();
        let range = first as usize..(first + n) as usize;
        if self.busy[range.clone()].iter().any(|&b| b) {
            return;
        }
        // One write in six is a discard or write-zeroes.
        let id = self.next_id | if self.rng.u32(0..6) == 0 { ZEROS } else { 0 };
        self.next_id += 1;
        for b in range {
            self.busy[b] = true;
            self.model.blocks[b].since.push(Entry { id, acked: None });
            // A read in flight may return this value even if a later write
            // and flush retire it before the read ends.
            for r in &mut self.reads {
                if let Some(seen) = (b as u64)
                    .checked_sub(r.first)
                    .and_then(|i| r.before.get_mut(i as usize))
                {
                    seen.push(id);
                }
            }
        }
        let fua = self.rng.u32(0..5) == 0;
        if let Some(t) = traced().filter(|t| (first..first + n).any(|b| b / BLOCKS_PER_TRACK == *t))
        {
            trace_track(
                &format!("write {id} blocks {first}+{n} fua {fua} issued"),
                &self.h.vol,
                t,
            );
        }
        let slot = if id & ZEROS != 0 {
            let unmap = self.rng.bool();
            self.h.spawn_zero(first * BLOCK, n * BLOCK, unmap, fua)
        } else {
            let data = image(first, (0..n).map(|_| id));
            self.h.spawn_write(first * BLOCK, data, fua)
        };
        self.writes.push(Write {
            id,
            first,
            blocks: n,
            fua,
            slot,
        });
    }

    fn spawn_read(&mut self) {
        let (first, n) = self.random_range();
        let before = (first..first + n)
            .map(|b| self.model.blocks[b as usize].candidates())
            .collect();
        let slot = self.h.start_read(first * BLOCK, n * BLOCK);
        self.reads.push(Read {
            first,
            before,
            restores: self.model.restores,
            slot,
        });
    }

    fn spawn_flush(&mut self) {
        let start = self.model.tick();
        let slot = self.h.start_flush();
        self.flushes.push(Flush { start, slot });
    }

    fn spawn_command(&mut self) {
        let cmd = match self.h.vol.state() {
            VolumeState::Established => Command::Split,
            VolumeState::Split if self.rng.bool() => Command::Establish {
                full: self.rng.bool(),
            },
            VolumeState::Split => Command::Restore {
                incremental: self.rng.bool(),
                protect: self.rng.bool(),
            },
            VolumeState::Degraded => Command::Establish {
                full: self.rng.bool(),
            },
            _ => return,
        };
        if self.h.vol.check(cmd).is_err() {
            return;
        }
        let start = self.model.tick();
        let slot = self.h.start_command(cmd);
        self.command = Some(CommandRun { cmd, start, slot });
    }

    /// Applies every request that finished in the last step to the model.
    fn collect(&mut self) -> Result<(), String> {
        let crashed = self.h.power.is_off();
        for w in take_done(&mut self.writes, |w| &w.slot) {
            self.write_done(w, crashed)?;
        }
        for r in take_done(&mut self.reads, |r| &r.slot) {
            self.read_done(r, crashed)?;
        }
        for f in take_done(&mut self.flushes, |f| &f.slot) {
            match f.slot.borrow_mut().take().unwrap() {
                Ok(()) => {
                    if let Some(t) = traced() {
                        trace_track(&format!("flush from {} done", f.start), &self.h.vol, t);
                    }
                    self.model.flushed(f.start)
                }
                Err(e) if !crashed => return Err(format!("flush failed without a crash: {e}")),
                Err(_) => {}
            }
        }
        if self
            .command
            .as_ref()
            .is_some_and(|c| c.slot.borrow().is_some())
        {
            let c = self.command.take().unwrap();
            self.command_done(c, crashed)?;
        }
        Ok(())
    }

    fn write_done(&mut self, w: Write, crashed: bool) -> Result<(), String> {
        let result = w.slot.borrow_mut().take().unwrap();
        let at = self.model.tick();
        if let Some(t) =
            traced().filter(|t| (w.first..w.first + w.blocks).any(|b| b / BLOCKS_PER_TRACK == *t))
        {
            let what = format!(
                "write {} blocks {}+{} fua {} ok {} at {at}",
                w.id,
                w.first,
                w.blocks,
                w.fua,
                result.is_ok()
            );
            trace_track(&what, &self.h.vol, t);
        }
        for b in w.first..w.first + w.blocks {
            self.busy[b as usize] = false;
            let m = &mut self.model.blocks[b as usize];
            if result.is_ok() {
                let e = m.since.iter_mut().find(|e| e.id == w.id).unwrap();
                e.acked = Some(at);
                if w.fua {
                    m.flushed(at);
                }
            }
        }
        match result {
            Err(e) if !crashed => Err(format!("write {} failed without a crash: {e}", w.id)),
            _ => Ok(()),
        }
    }

    fn read_done(&mut self, r: Read, crashed: bool) -> Result<(), String> {
        let buf = match r.slot.borrow_mut().take().unwrap() {
            Ok(buf) => buf,
            Err(e) if !crashed => return Err(format!("read failed without a crash: {e}")),
            Err(_) => return Ok(()),
        };
        for (i, before) in r.before.iter().enumerate() {
            let b = r.first + i as u64;
            let got = &buf[i * BLOCK as usize..(i + 1) * BLOCK as usize];
            let mut ok = before.clone();
            ok.extend(self.model.blocks[b as usize].candidates());
            let restoring = self
                .command
                .as_ref()
                .is_some_and(|c| matches!(c.cmd, Command::Restore { .. }));
            if restoring || self.model.restores != r.restores {
                ok.extend(self.model.split_image.as_ref().map(|img| img[b as usize]));
            }
            if !ok.iter().any(|&id| block_bytes(id, b) == got) {
                return Err(format!(
                    "read of block {b} returned {:?}, expected one of {ok:?}",
                    decode(got)
                ));
            }
        }
        Ok(())
    }

    fn command_done(&mut self, c: CommandRun, crashed: bool) -> Result<(), String> {
        let result = c.slot.borrow_mut().take().unwrap();
        match result {
            Ok(Ok(())) => {}
            // The secondary failed its flush under the command.
            Ok(Err(_)) if self.h.vol.state() == VolumeState::Degraded => return Ok(()),
            Ok(Err(e)) => return Err(format!("{} refused: {e}", c.cmd.name())),
            Err(e) if !crashed => return Err(format!("{} failed: {e}", c.cmd.name())),
            Err(_) => {
                // Not known durable: settled after the reopen.
                self.command = Some(c);
                return Ok(());
            }
        }
        // Every state change flushes both devices and commits before it
        // returns.
        let at = self.model.tick();
        if let Some(t) = traced() {
            trace_track(&format!("{} done at {at}", c.cmd.name()), &self.h.vol, t);
        }
        self.model.flushed(at);
        match c.cmd {
            Command::Split => {
                self.model.split_image = Some(self.model.blocks.iter().map(|b| b.durable).collect())
            }
            Command::Restore { .. } => self.model.restored(at),
            Command::Establish { .. } => {}
        }
        Ok(())
    }

    /// Cuts over to what survived: reopens and finishes the operation (in
    /// half the seeds crashing once more on the way), then checks.
    fn recover(self) -> Result<(), String> {
        let mut rng = fastrand::Rng::with_seed(self.seed ^ 0xdead_beef);
        let crash = self.crash;
        let kill = crash == Crash::Kill;
        let mut images = Images::take(&self.h.disks, &self.h.meta, &mut rng, crash);
        let mut r = Resumed::open(&images, self.seed.wrapping_add(1), &self.h.power, crash)?;
        let mut model = self.model;
        let mut split_known = true;
        // The model if the reopened restore is an earlier one (see below).
        let mut older_restore: Option<Model> = None;
        // Tracks still to restore right after the reopen (before the
        // engine ran).
        let pending = r.vol.table(splitmirror::core::TableId::Pending).count();
        if let Some(t) = traced() {
            trace_track("reopened", &r.vol, t);
        }
        if let Some(c) = &self.command {
            match c.cmd {
                // The restore is durable iff the volume left `split`, and
                // has tracks to restore: a volume that comes back
                // restoring with none left is the restore before, whose
                // end (a protected restore ends split) was not durable
                // yet when the power went, with this one never started.
                // After a kill, writes acknowledged before the restore's
                // state change are legitimately overwritten by it, and
                // those after it must all survive: the model needs the
                // change's own moment, not the command's start.
                Command::Restore { .. } if r.vol.state() != VolumeState::Split && pending > 0 => {
                    // Unless it is the last protected restore, whose end
                    // was not durable, resumed with tracks still to copy.
                    if self.protected_restore_ended {
                        older_restore = Some(model.clone());
                    }
                    let at = if kill { self.restoring_since } else { None };
                    model.restored(at.unwrap_or(c.start))
                }
                Command::Split => split_known = false,
                _ => {}
            }
        }
        if kill {
            // Nothing completed is lost when only the process dies: every
            // acknowledged write must read back (or a later one in flight).
            let at = model.tick();
            model.flushed(at);
        }
        let mut ctx = format!("crashed {}, reopened {}", self.h.vol.state(), r.vol.state());
        if rng.bool() {
            r.h.power.arm(rng.u64(1..=100));
            r.settle();
            // Done before the cut: no cut while the final state change
            // waits for its commit.
            r.h.power.disarm();
            if r.h.power.is_off() {
                images = Images::take(&r.h.disks, &r.h.meta, &mut rng, crash);
                r = Resumed::open(&images, self.seed.wrapping_add(2), &r.h.power, crash)?;
                ctx += &format!(", crashed again, reopened {}", r.vol.state());
                if let Some(t) = traced() {
                    trace_track("reopened again", &r.vol, t);
                }
            }
        }
        r.settle();
        if r.vol.state().copy_kind().is_some() {
            return Err(format!("{ctx}: the operation did not finish"));
        }
        if r.vol.state() == VolumeState::Degraded {
            // The secondary is back (the reopened devices do not fail):
            // establish must make it whole from the tables alone.
            r.establish()?;
            ctx += ", established again";
        }
        let content = r.read_all()?;
        ctx += &format!(", ended {}", r.vol.state());
        if std::env::var("SPLITMIRROR_CRASH_VERBOSE").is_ok() {
            eprintln!("seed {}: {} writes, {ctx}", self.seed, self.next_id - 1);
        }
        let check = |model: &Model| {
            check_content(model, &content)?;
            check_devices(model, &r.h.vol, &r.h.disks, split_known)
        };
        check(&model)
            .or_else(|e| match &older_restore {
                Some(older) => check(older).map_err(|_| e),
                None => Err(e),
            })
            .map_err(|e| format!("{ctx}: {e}"))
    }
}

/// How a crash test's server goes down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Crash {
    /// The power is cut: each device keeps or loses each unflushed write
    /// on its own, and the restart is a new boot.
    PowerCut,
    /// The process dies (`kill -9`): every completed write survives (the
    /// devices' caches, the page cache), in the same boot.
    Kill,
    /// The devices lose their caches in the same boot, all three behind
    /// one cache that a flush of any of them empties: what the VM's
    /// power-cut test replays (one dm-log-writes target under the three),
    /// cut just before a flush. The restore log's records then apply
    /// though the caches are gone, so a record must never be durable
    /// without the data it speaks for.
    OneCache,
}

/// What survives the crash.
struct Images {
    primary: Vec<u8>,
    secondary: Vec<u8>,
    meta: Vec<u8>,
}

impl Images {
    fn take(
        disks: &SimDisks,
        meta: &SimMetaDevice,
        rng: &mut fastrand::Rng,
        crash: Crash,
    ) -> Images {
        let ((primary, secondary), meta) = match crash {
            Crash::Kill => (
                (
                    disks.primary.borrow().clone(),
                    disks.secondary.borrow().clone(),
                ),
                meta.current_image(),
            ),
            Crash::PowerCut => (disks.crash_images(rng), meta.crash_image(rng)),
            Crash::OneCache => (disks.one_cache_images(), meta.one_cache_image()),
        };
        Images {
            primary,
            secondary,
            meta,
        }
    }
}

/// A volume reopened from crash images, with its engine and committer.
struct Resumed {
    h: Harness,
    vol: std::rc::Rc<Volume>,
}

impl Resumed {
    /// Reopens after a crash: a new boot after a power cut, the same boot
    /// as `before` otherwise.
    fn open(images: &Images, seed: u64, before: &Power, crash: Crash) -> Result<Resumed, String> {
        let power = match crash {
            Crash::PowerCut => Power::new(),
            Crash::Kill | Crash::OneCache => before.same_boot(),
        };
        let meta = SimMetaDevice::new(images.meta.clone(), power.clone());
        let (store, vol) = MetadataStore::open_dev(meta.clone(), &binding())
            .map_err(|e| format!("reopen failed: {e}"))?;
        let disks = SimDisks::volatile(
            images.primary.clone(),
            images.secondary.clone(),
            power.clone(),
        );
        let opts = options(&mut fastrand::Rng::with_seed(seed));
        let h = Harness::start(seed, vol, disks, store, meta, power, opts);
        Ok(Resumed {
            vol: h.vol.clone(),
            h,
        })
    }

    /// `establish` on the healed secondary, run to the end.
    fn establish(&mut self) -> Result<(), String> {
        let slot = self.h.start_command(Command::Establish { full: false });
        self.h
            .sched
            .run_until(RECOVERY_STEPS, || slot.borrow().is_some());
        let r = slot.borrow_mut().take().unwrap();
        r.map_err(|e| format!("establish: {e}"))?
            .map_err(|e| format!("establish: {e}"))?;
        self.settle();
        Ok(())
    }

    /// Runs until no copy is left or the power is cut.
    fn settle(&mut self) {
        for _ in 0..RECOVERY_STEPS {
            if self.vol.state().copy_kind().is_none() || self.h.power.is_off() {
                return;
            }
            self.h.sched.step();
        }
    }

    fn read_all(&mut self) -> Result<Vec<u8>, String> {
        let slot = self.h.start_read(0, SIZE);
        self.h
            .sched
            .run_until(RECOVERY_STEPS, || slot.borrow().is_some());
        let r = slot.borrow_mut().take().unwrap();
        r.map_err(|e| format!("final read failed: {e}"))
    }
}

fn take_done<T, U>(v: &mut Vec<T>, slot: impl Fn(&T) -> &Slot<U>) -> Vec<T> {
    let (done, pending): (Vec<T>, Vec<T>) = v.drain(..).partition(|x| slot(x).borrow().is_some());
    *v = pending;
    done
}

/// Every block holds one of its acceptable values.
fn check_content(model: &Model, content: &[u8]) -> Result<(), String> {
    for (b, m) in model.blocks.iter().enumerate() {
        let got = &content[b * BLOCK as usize..(b + 1) * BLOCK as usize];
        let ok = m.candidates();
        if !ok.iter().any(|&id| block_bytes(id, b as u64) == got) {
            return Err(format!(
                "block {b} (track {}) holds {:?}, expected one of {ok:?} (durable {})",
                b as u64 / BLOCKS_PER_TRACK,
                decode(got),
                m.durable
            ));
        }
    }
    Ok(())
}

/// Mirrors agree once established; a split secondary holds the split image.
fn check_devices(
    model: &Model,
    vol: &Volume,
    disks: &SimDisks,
    split_known: bool,
) -> Result<(), String> {
    let (p, s) = (disks.primary.borrow(), disks.secondary.borrow());
    match vol.state() {
        VolumeState::Established => {
            if let Some(b) = (0..BLOCKS as usize).find(|&b| block(&p, b) != block(&s, b)) {
                return Err(format!(
                    "established but block {b} differs: primary {:?}, secondary {:?}",
                    decode(block(&p, b)),
                    decode(block(&s, b))
                ));
            }
        }
        VolumeState::Split if split_known => {
            if let Some(img) = &model.split_image {
                if let Some(b) =
                    (0..BLOCKS as usize).find(|&b| block(&s, b) != block_bytes(img[b], b as u64))
                {
                    return Err(format!(
                        "split secondary block {b} holds {:?}, the split image has {}",
                        decode(block(&s, b)),
                        img[b]
                    ));
                }
            }
        }
        _ => {}
    }
    Ok(())
}

fn block(d: &[u8], b: usize) -> &[u8] {
    &d[b * BLOCK as usize..(b + 1) * BLOCK as usize]
}

fn run_seed(seed: u64, flush_fault: bool, crash: Crash) -> Result<(), String> {
    let t0 = std::time::Instant::now();
    let mut run = Run::new(seed, flush_fault, crash);
    run.until_crash()?;
    let t1 = t0.elapsed();
    let r = run.recover();
    if std::env::var("SPLITMIRROR_CRASH_VERBOSE").is_ok() {
        eprintln!("seed {seed}: workload {t1:?}, total {:?}", t0.elapsed());
    }
    r
}

fn seeds() -> std::ops::Range<u64> {
    if let Ok(s) = std::env::var("SPLITMIRROR_CRASH_SEED") {
        let n: u64 = s.parse().expect("SPLITMIRROR_CRASH_SEED is a number");
        return n..n + 1;
    }
    let n = std::env::var("SPLITMIRROR_CRASH_SEEDS")
        .ok()
        .map(|s| s.parse().expect("SPLITMIRROR_CRASH_SEEDS is a number"))
        .unwrap_or(1000);
    0..n
}

#[test]
fn crash_anywhere_loses_no_flushed_write() {
    run_seeds(false, Crash::PowerCut);
}

/// The process dies (`kill -9`) at a random device write or flush instead:
/// the devices' caches survive, and the restart is in the same boot. No
/// acknowledged write may be lost, flushed or not: in particular a write
/// that restored a track during a restore, acknowledged after a restore
/// log record alone, must not be copied over from the secondary.
#[test]
fn kill_9_anywhere_loses_no_acknowledged_write() {
    run_seeds(false, Crash::Kill);
}

/// The devices lose their caches without a reboot, behind one shared
/// cache (see [`Crash::OneCache`]): no flushed write is lost, and the
/// mirrors agree once established, though the restore log's records of
/// this boot apply at the restart.
#[test]
fn one_shared_cache_lost_in_the_same_boot_loses_no_flushed_write() {
    run_seeds(false, Crash::OneCache);
}

/// The same with a secondary that fails every FLUSH from a random point
/// on (its writes still land in its volatile cache, to be kept or lost at
/// the crash): the host never sees the failure, nothing acknowledged is
/// lost, and after the crash the tables alone bring the secondary back
/// (an `establish` on the healed secondary makes the devices equal).
#[test]
fn crash_with_a_secondary_failing_flushes_loses_no_flushed_write() {
    run_seeds(true, Crash::PowerCut);
}

fn run_seeds(flush_fault: bool, crash: Crash) {
    let mut failures = Vec::new();
    for seed in seeds() {
        let result = std::panic::catch_unwind(|| run_seed(seed, flush_fault, crash))
            .unwrap_or_else(|p| Err(format!("panicked: {p:?}")));
        if let Err(e) = result {
            eprintln!("seed {seed}: {e}");
            failures.push(seed);
        }
    }
    assert!(
        failures.is_empty(),
        "{} seeds failed (rerun one with SPLITMIRROR_CRASH_SEED=n): {:?}",
        failures.len(),
        &failures[..failures.len().min(20)]
    );
}

/// What a restart of [`small_split`]'s volume finds.
struct Restarts {
    meta: SimMetaDevice,
    power: std::rc::Rc<Power>,
    binding: Binding,
    secondary: Vec<u8>,
}

impl Restarts {
    /// The volume a restart finds in metadata image `image`, in `power`'s boot.
    fn reopen(&self, image: Vec<u8>, power: std::rc::Rc<Power>) -> Volume {
        let m = SimMetaDevice::new(image, power);
        MetadataStore::open_dev(m, &self.binding).expect("reopen").1
    }

    /// The volume a restart finds after `kill -9` now (same boot, every
    /// completed write kept).
    fn killed(&self) -> Volume {
        self.reopen(self.meta.current_image(), self.power.same_boot())
    }

    /// The volume a restart finds after a power cut now (a new boot, each
    /// unflushed metadata write kept or lost).
    fn power_cut(&self, rng: &mut fastrand::Rng) -> Volume {
        self.reopen(self.meta.crash_image(rng), Power::new())
    }
}

const SMALL_TRACK: u64 = 4096;
const SMALL_SIZE: u64 = 16 * SMALL_TRACK;

/// The restore log tests' volume: 16 tracks of 4 KiB, split, the
/// secondary holding a pattern and the primary 0xEE, on devices with
/// volatile caches and the real metadata store.
fn small_split(seed: u64, engine: Option<EngineConfig>) -> (Harness, Restarts) {
    let secondary: Vec<u8> = (0..SMALL_SIZE).map(|i| (i % 251) as u8).collect();
    let power = Power::new();
    let disks = SimDisks::volatile(
        vec![0xEE; SMALL_SIZE as usize],
        secondary.clone(),
        power.clone(),
    );
    let vol = Volume::new(
        Geometry::new(SMALL_SIZE, SMALL_TRACK).unwrap(),
        VolumeState::Split,
    );
    let meta = SimMetaDevice::new(Vec::new(), power.clone());
    let binding = common::binding(SMALL_SIZE, SMALL_TRACK);
    let store = MetadataStore::format_dev(meta.clone(), &binding, &vol, false)
        .expect("format the sim metadata");
    let opts = Options {
        engine,
        clear_idle_intents: false,
        lazy_commits: false,
    };
    let h = Harness::start(seed, vol, disks, store, meta.clone(), power.clone(), opts);
    let restarts = Restarts {
        meta,
        power,
        binding,
        secondary,
    };
    (h, restarts)
}

/// A merge (a partial write to a pending track during a restore) is cheap
/// and still crash-safe (`core::restore_log`). Its acknowledgement waits
/// for one restore log record, written without any flush: no flush of the
/// primary, none of the metadata. Then:
///
/// - the process dies (`kill -9`: the caches survive, same boot): the
///   restart finds the track restored from the log, with the host's bytes;
/// - the power is cut before a host flush (a new boot): the log is ignored,
///   the track is pending again and holds the secondary's data once the
///   restore resumes, as if the unflushed write had been lost;
/// - a FUA write on top of it is durable when acknowledged, restored bit
///   and all;
/// - after a host flush, every power cut keeps the merged track, restored.
#[test]
fn an_acknowledged_merge_needs_no_flush_and_survives_kill_9_and_a_flush() {
    const TRACK: u64 = SMALL_TRACK;
    let (mut h, s) = small_split(5, None);
    let disks = h.disks.clone();
    h.command(Command::Restore {
        incremental: false,
        protect: false,
    })
    .expect("restore");
    assert_eq!(h.vol.state(), VolumeState::Restoring);
    // No commit gets in: the write must be acknowledged by the log alone.
    h.b.commits_fail.set(true);
    let flushes_before = disks.flush_log.borrow().len();
    // 512 bytes into track 3: a merge.
    let at = 3 * TRACK + 1024;
    let host = vec![0x5Au8; 512];
    h.write(at, &host).expect("the merge is acknowledged");
    assert!(
        !h.vol.table(splitmirror::core::TableId::Pending).get(3),
        "track 3 is restored"
    );
    assert!(
        disks.flush_log.borrow()[flushes_before..].is_empty(),
        "no device flush for a merge: {:?}",
        &disks.flush_log.borrow()[flushes_before..]
    );
    let track = (3 * TRACK) as usize..(4 * TRACK) as usize;
    let mut want = s.secondary[track.clone()].to_vec();
    want[1024..1024 + 512].copy_from_slice(&host);

    // kill -9: everything written survives, in the same boot.
    let killed = s.killed();
    assert_eq!(killed.state(), VolumeState::Restoring);
    assert!(
        !killed.table(splitmirror::core::TableId::Pending).get(3),
        "after kill -9 the log says track 3 is restored"
    );
    assert!(killed.table(splitmirror::core::TableId::Changed).get(3));
    assert_eq!(&disks.primary.borrow()[track.clone()], &want[..]);

    // A power cut before any flush: a new boot ignores the log.
    let mut rng = fastrand::Rng::with_seed(17);
    for _ in 0..16 {
        let cut = s.power_cut(&mut rng);
        assert!(
            cut.table(splitmirror::core::TableId::Pending).get(3),
            "after a power cut the unflushed merge's track is pending again"
        );
    }

    // A FUA write on top of the logged track is durable when acknowledged:
    // it waits for the commit that settles the track, or a power cut would
    // make the track pending again and the resumed restore would copy the
    // secondary over the FUA write.
    let fua = vec![0xA5u8; 512];
    let slot = h.spawn_write(3 * TRACK + 2048, fua.clone(), true);
    assert!(
        h.wait(&slot).is_err(),
        "a FUA write was acknowledged while no commit could settle the track under it"
    );
    h.b.commits_fail.set(false);
    let slot = h.spawn_write(3 * TRACK + 2048, fua.clone(), true);
    h.wait(&slot).expect("the FUA write is acknowledged");
    want[2048..2048 + 512].copy_from_slice(&fua);
    for cut in 0..16 {
        let v = s.power_cut(&mut rng);
        assert!(
            !v.table(splitmirror::core::TableId::Pending).get(3),
            "crash image {cut}: the track under an acknowledged FUA write is pending again"
        );
    }

    // A host flush makes it durable: it waits for the settling commit.
    h.flush();
    for cut in 0..64 {
        let (p, _) = disks.crash_images(&mut rng);
        assert!(
            p[track.clone()] == want[..],
            "crash image {cut}: the flushed merge is lost"
        );
        let v = s.power_cut(&mut rng);
        assert!(!v.table(splitmirror::core::TableId::Pending).get(3));
    }
}

/// Two host writes to one pending track during a restore: the first
/// merges and restores it (logged), the second goes on top of it once the
/// track is free, with no commit of its own. The second must not be
/// acknowledged before the record that carries the track is written: after
/// a `kill -9` right then, the restart would find the track pending and
/// copy the secondary over an acknowledged write. Checked over many
/// schedules (the log's writer runs when the scheduler picks it).
#[test]
fn a_write_on_top_of_a_merge_waits_for_the_merges_log_record() {
    const TRACK: u64 = SMALL_TRACK;
    for seed in 0..64 {
        let (mut h, s) = small_split(seed, None);
        h.command(Command::Restore {
            incremental: false,
            protect: false,
        })
        .expect("restore");
        // No commit settles the track: only the log can carry it.
        h.b.commits_fail.set(true);
        let first = h.spawn_write(3 * TRACK + 1024, vec![0x11; 512], false);
        let second = h.spawn_write(3 * TRACK + 2048, vec![0x22; 512], false);
        h.wait(&second).expect("the write on top is acknowledged");
        let v = s.killed();
        assert!(
            !v.table(splitmirror::core::TableId::Pending).get(3),
            "seed {seed}: a kill right after the second write's acknowledgement finds \
             its track pending"
        );
        h.wait(&first).expect("the merge is acknowledged");
    }
}

/// A restore log record is a fact about its own restore only: the commit
/// that starts the next restore destroys it first. Track 3 is merged (and
/// logged) in one restore; in the next one it is pending again, and a
/// restart after `kill -9` (same boot, every record written still there
/// but for that clearing) must find it pending, not restored by the old
/// record, or the resumed restore would never give it the split image.
#[test]
fn a_restore_log_record_never_reaches_a_later_restore() {
    const TRACK: u64 = SMALL_TRACK;
    let (mut h, s) = small_split(9, Some(EngineConfig::default()));
    let restore = Command::Restore {
        incremental: false,
        protect: true,
    };
    h.engine_paused.set(true);
    h.command(restore).expect("first restore");
    // No commit settles it first: the record carries track 3.
    h.b.commits_fail.set(true);
    h.write(3 * TRACK + 1024, &[0x5A; 512])
        .expect("a logged merge");
    h.b.commits_fail.set(false);
    h.engine_paused.set(false);
    h.settle();
    assert_eq!(
        h.vol.state(),
        VolumeState::Split,
        "the protected restore ended"
    );
    h.engine_paused.set(true);
    h.command(restore).expect("second restore");
    assert!(h.vol.table(splitmirror::core::TableId::Pending).get(3));
    let v = s.killed();
    assert_eq!(v.state(), VolumeState::Restoring);
    assert!(
        v.table(splitmirror::core::TableId::Pending).get(3),
        "the first restore's record was applied to the second"
    );
}

/// Split writes mark "changed" exactly in memory, under their region's
/// write intent made durable first. A second track of a warm region is
/// written without any commit; a power cut before "changed" was committed
/// loses nothing: the reopened volume folds the region's intent into
/// "changed", so an incremental establish or restore still covers the
/// track. Without a crash "changed" stays exact.
#[test]
fn a_split_write_to_a_warm_region_needs_no_commit_and_a_crash_still_covers_it() {
    const TRACK: u64 = 4096;
    const SIZE: u64 = 256 * TRACK;
    let power = Power::new();
    let disks = SimDisks::volatile(
        vec![0; SIZE as usize],
        vec![0; SIZE as usize],
        power.clone(),
    );
    let vol = Volume::new(Geometry::new(SIZE, TRACK).unwrap(), VolumeState::Split);
    let meta = SimMetaDevice::new(Vec::new(), power.clone());
    let binding = common::binding(SIZE, TRACK);
    let store = MetadataStore::format_dev(meta.clone(), &binding, &vol, false).unwrap();
    let opts = Options {
        engine: None,
        clear_idle_intents: false,
        lazy_commits: false,
    };
    let mut h = Harness::start(3, vol, disks, store, meta.clone(), power, opts);
    h.write(TRACK, &[1; 4096])
        .expect("the region's first write");
    h.b.commits_fail.set(true);
    h.write(2 * TRACK, &[2; 4096])
        .expect("a warm region: acknowledged without a commit");
    let changed = h.vol.table(splitmirror::core::TableId::Changed);
    assert_eq!(changed.count(), 2, "exact in memory");
    let mut rng = fastrand::Rng::with_seed(5);
    for _ in 0..16 {
        let m = SimMetaDevice::new(meta.crash_image(&mut rng), Power::new());
        let (_, v) = MetadataStore::open_dev(m, &binding).expect("reopen");
        let changed = v.table(splitmirror::core::TableId::Changed);
        assert!(
            changed.get(1) && changed.get(2),
            "the crash loses a changed track"
        );
        assert!(changed.count() <= 64, "at most the written region");
    }
}
