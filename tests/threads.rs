//! The threads of a running server, without ublk: three host "queues", each
//! on its own thread and io_uring ring, the copy engine on its thread, the
//! committer thread with the real metadata store, and operator commands run
//! as the control socket runs them (a state change on a thread of its own)
//! while host I/O goes on. The simulation runs all of this on one thread;
//! here wake-ups cross threads for real (an eventfd kick, a thread unpark),
//! and requests meet a closing gate at any instant.
//!
//! Checked, over several split → restore → resync → established and
//! split → establish cycles:
//! - every command and every request ends: a lost wake-up would leave one
//!   asleep for good (a gate once stayed closed that way, and the VM's mount
//!   hung), so a watchdog fails the test when nothing moves for a while
//!   instead of letting it hang;
//! - no host request fails;
//! - at the end, established and idle, the two devices are byte-identical,
//!   though the queues wrote overlapping ranges at the same moments all
//!   along (mirrored writes to the same bytes are serialized).

mod common;

use splitmirror::backend::buf::AlignedBuf;
use splitmirror::backend::uring::{UringBackend, UringOptions};
use splitmirror::core::{Command, Dev, Geometry, Volume, VolumeState};
use splitmirror::exec::engine::{self, EngineConfig};
use splitmirror::exec::host;
use splitmirror::exec::load::HostLoad;
use splitmirror::metadata::{CommitHandle, Committer, DataFlush, MetadataStore};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SIZE: u64 = 8 << 20;
const TRACK: u64 = 64 << 10;
const BLOCK: u64 = 4096;
/// Nothing ended for this long: something sleeps that nobody will wake.
const STUCK: Duration = Duration::from_secs(30);

fn open_data(path: &Path) -> File {
    let f = File::create(path).unwrap();
    f.set_len(SIZE).unwrap();
    drop(f);
    let open = |flags| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(flags)
            .open(path)
    };
    // tmpfs has no O_DIRECT; the locking under test does not care.
    open(libc::O_DIRECT).or_else(|_| open(0)).unwrap()
}

fn backend(pfd: i32, sfd: i32, commit: &CommitHandle) -> UringBackend {
    let opts = UringOptions {
        buffer_size: TRACK as usize,
        ..Default::default()
    };
    UringBackend::new(pfd, sfd, opts)
        .expect("io_uring")
        .with_committer(commit)
}

/// What one thread does, on its own io_uring backend.
type Role = Box<dyn FnOnce(&Shared, &UringBackend) + Send>;

/// What the threads share.
struct Shared {
    vol: Arc<Volume>,
    load: HostLoad,
    stop_host: AtomicBool,
    stop_engine: AtomicBool,
    /// Requests, copies and commands ended: the watchdog watches it move.
    ended: AtomicU64,
    host_errors: AtomicU64,
}

/// One queue: 8 requests in flight, random reads and writes of 4 KiB to
/// 160 KiB anywhere on the volume (ranges overlap across queues and tags).
fn queue(s: &Shared, b: &UringBackend, seed: u64) {
    let tags = (0..8u64).map(|tag| async move {
        let mut rng = fastrand::Rng::with_seed(seed * 100 + tag);
        let mut buf = AlignedBuf::new(40 * BLOCK as usize);
        while !s.stop_host.load(SeqCst) {
            let len = rng.u64(1..=40) * BLOCK;
            let offset = rng.u64(0..=(SIZE - len) / BLOCK) * BLOCK;
            let part = &mut buf[..len as usize];
            let _busy = s.load.enter();
            let r = if rng.u8(0..10) < 7 {
                part.fill(rng.u8(..));
                host::write(&s.vol, b, offset, (&*part).into(), rng.u8(0..8) == 0).await
            } else {
                host::read(&s.vol, b, offset, part.into()).await
            };
            if let Err(e) = r {
                eprintln!("host request at {offset}+{len}: {e}");
                s.host_errors.fetch_add(1, SeqCst);
            }
            s.ended.fetch_add(1, SeqCst);
        }
    });
    b.block_on(engine::join_all(tags));
}

fn copy_engine(s: &Shared, b: &UringBackend) {
    let cfg = EngineConfig {
        batch: 4,
        max_inflight: 8,
        max_io: 2 * TRACK,
        ..Default::default()
    };
    b.block_on(async {
        while !s.stop_engine.load(SeqCst) {
            if s.vol.state().copy_kind().is_some() {
                engine::run_copies(&s.vol, b, &cfg, &s.stop_engine, &s.load)
                    .await
                    .expect("copy engine");
                s.ended.fetch_add(1, SeqCst);
            }
            splitmirror::backend::Backend::pause(b).await;
        }
    });
}

/// Runs `cmd` as the control socket does (refusals are fine: the state
/// may have moved on).
fn command(s: &Shared, b: &UringBackend, cmd: Command) {
    if s.vol.check(cmd).is_ok() {
        let r = b.block_on(engine::transition(&s.vol, b, |v| v.apply(cmd)));
        r.expect("state change I/O").ok();
    }
    s.ended.fetch_add(1, SeqCst);
}

/// Waits (polling: this is the operator's `wait`) until `done` holds.
fn wait_until(s: &Shared, what: &str, done: impl Fn() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < 4 * STUCK,
            "{what}: still {} after {:?}",
            s.vol.state().name(),
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn operator(s: &Shared, b: &UringBackend, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let idle_established =
        || s.vol.state() == VolumeState::Established && s.vol.state().copy_kind().is_none();
    for cycle in 0..6 {
        command(s, b, Command::Split);
        std::thread::sleep(Duration::from_millis(rng.u64(5..40)));
        let cmd = if cycle % 2 == 0 {
            Command::Restore {
                incremental: rng.bool(),
                protect: false,
            }
        } else {
            Command::Establish { full: rng.bool() }
        };
        command(s, b, cmd);
        // Sometimes a split in the middle of the copy (refused while
        // restoring, taken while syncing), then back to established.
        if rng.bool() {
            std::thread::sleep(Duration::from_millis(rng.u64(0..20)));
            command(s, b, Command::Split);
            command(s, b, Command::Establish { full: false });
        }
        wait_until(s, "back to established", idle_established);
        // State changes that change nothing: the gate closes on running
        // requests many more times than the commands alone would close it.
        for _ in 0..50 {
            b.block_on(engine::transition(&s.vol, b, |_| Ok::<(), _>(())))
                .expect("state change I/O")
                .ok();
            s.ended.fetch_add(1, SeqCst);
        }
    }
}

#[test]
fn commands_host_io_copies_and_commits_on_their_own_threads_all_end_and_mirror() {
    let dir = tempfile::tempdir().unwrap();
    let primary = open_data(&dir.path().join("primary"));
    let secondary = open_data(&dir.path().join("secondary"));
    let (pfd, sfd) = (primary.as_raw_fd(), secondary.as_raw_fd());
    let vol = Volume::formatted(Geometry::new(SIZE, TRACK).unwrap(), true);
    let meta = dir.path().join("meta");
    MetadataStore::format(&meta, &common::binding(SIZE, TRACK), &vol, true).unwrap();
    let (store, vol) = MetadataStore::open(&meta, &common::binding(SIZE, TRACK)).unwrap();
    let vol = Arc::new(vol);
    let flush: DataFlush = Box::new(move |set| {
        for d in set.devs() {
            let fd = if d == Dev::Primary { pfd } else { sfd };
            nix::unistd::fdatasync(fd).map_err(std::io::Error::from)?;
        }
        Ok(())
    });
    let committer = Committer::start(store, vol.clone(), flush, Duration::from_millis(20));
    let s = Arc::new(Shared {
        vol,
        load: HostLoad::default(),
        stop_host: AtomicBool::new(false),
        stop_engine: AtomicBool::new(false),
        ended: AtomicU64::new(0),
        host_errors: AtomicU64::new(0),
    });
    let spawn = |name: &str, f: Role| {
        let (s, commit) = (s.clone(), committer.handle());
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || f(&s, &backend(pfd, sfd, &commit)))
            .unwrap()
    };
    let queues: Vec<_> = (0..3u64)
        .map(|q| spawn("queue", Box::new(move |s, b| queue(s, b, q + 1))))
        .collect();
    let engine = spawn("engine", Box::new(copy_engine));
    let operator = spawn("operator", Box::new(|s, b| operator(s, b, 7)));

    // The watchdog: something must end every STUCK.
    let (mut seen, mut since) = (s.ended.load(SeqCst), Instant::now());
    while !operator.is_finished() {
        std::thread::sleep(Duration::from_millis(50));
        let now = s.ended.load(SeqCst);
        if now != seen {
            (seen, since) = (now, Instant::now());
        }
        assert!(
            since.elapsed() < STUCK,
            "nothing ended for {STUCK:?}: state {}, gate closed {}, admitted requests drained {}, \
             commit waiters {}: a wait nobody wakes",
            s.vol.state().name(),
            s.vol.gate_closed(),
            s.vol.is_drained(),
            s.vol.commit_waiters()
        );
    }
    operator.join().expect("operator thread");
    s.stop_host.store(true, SeqCst);
    queues
        .into_iter()
        .for_each(|q| q.join().expect("queue thread"));
    s.stop_engine.store(true, SeqCst);
    engine.join().expect("engine thread");
    committer.stop().expect("last commit");

    assert_eq!(s.host_errors.load(SeqCst), 0, "host requests failed");
    assert_eq!(s.vol.state(), VolumeState::Established);
    assert!(s.ended.load(SeqCst) > 1000, "the queues hardly ran");
    let (p, q) = (
        std::fs::read(dir.path().join("primary")).unwrap(),
        std::fs::read(dir.path().join("secondary")).unwrap(),
    );
    let differ = (0..p.len() as u64)
        .step_by(BLOCK as usize)
        .find(|&o| p[o as usize..(o + BLOCK) as usize] != q[o as usize..(o + BLOCK) as usize]);
    assert_eq!(differ, None, "primary and secondary differ at this offset");
}
