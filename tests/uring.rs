//! UringBackend against real files (O_DIRECT where the filesystem allows).

use splitmirror::backend::buf::AlignedBuf;
use splitmirror::backend::uring::{UringBackend, UringOptions};
use splitmirror::backend::Backend;
use splitmirror::core::Dev;
use splitmirror::exec::engine::join_all;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

const SIZE: u64 = 4 << 20;

fn open(dir: &tempfile::TempDir, name: &str) -> File {
    let path = dir.path().join(name);
    let create = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .clone()
    };
    let f = create()
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .or_else(|_| create().open(&path)) // tmpfs has no O_DIRECT
        .unwrap();
    f.set_len(SIZE).unwrap();
    f
}

fn setup() -> (tempfile::TempDir, File, File) {
    let dir = tempfile::tempdir_in(
        std::env::var("SPLITMIRROR_TEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_TARGET_TMPDIR").into()),
    )
    .unwrap();
    let p = open(&dir, "primary");
    let s = open(&dir, "secondary");
    (dir, p, s)
}

fn filled(len: usize, seed: u8) -> AlignedBuf {
    let mut b = AlignedBuf::new(len);
    b.iter_mut()
        .enumerate()
        .for_each(|(i, x)| *x = (i as u8).wrapping_mul(31).wrapping_add(seed));
    b
}

#[test]
fn write_flush_read_round_trip() {
    let (_d, p, s) = setup();
    let be = UringBackend::new(p.as_raw_fd(), s.as_raw_fd(), UringOptions::default()).unwrap();
    let data = filled(64 << 10, 3);
    be.block_on(async {
        be.write(Dev::Secondary, 8192, &data, false).await.unwrap();
        be.write(Dev::Primary, 0, &data, true).await.unwrap();
        be.flush(Dev::Secondary).await.unwrap();
        let mut back = AlignedBuf::new(64 << 10);
        be.read(Dev::Secondary, 8192, &mut back).await.unwrap();
        assert!(*back == *data);
        be.read(Dev::Primary, 0, &mut back).await.unwrap();
        assert!(*back == *data);
        // The files are separate devices.
        be.read(Dev::Primary, 8192 + (64 << 10), &mut back)
            .await
            .unwrap();
        assert!(back.iter().all(|&x| x == 0));
    });
}

#[test]
fn many_concurrent_ops_all_land() {
    let (_d, p, s) = setup();
    let opts = UringOptions {
        entries: 16,
        pool_buffers: 8,
        buffer_size: 16 << 10,
        ..Default::default()
    };
    let be = UringBackend::new(p.as_raw_fd(), s.as_raw_fd(), opts).unwrap();
    // More operations than SQ entries and pool slots: the ring must submit
    // when full, and the pool must fall back to heap buffers.
    let n = 200u64;
    be.block_on(join_all((0..n).map(|i| {
        let be = &be;
        async move {
            let mut buf = be.buffer(16 << 10);
            buf.iter_mut().for_each(|x| *x = i as u8);
            be.write(Dev::Primary, i * (16 << 10), &buf, false)
                .await
                .unwrap();
        }
    })));
    let results = be.block_on(join_all((0..n).map(|i| {
        let be = &be;
        async move {
            let mut buf = AlignedBuf::new(16 << 10);
            be.read(Dev::Primary, i * (16 << 10), &mut buf)
                .await
                .unwrap();
            buf.iter().all(|&x| x == i as u8)
        }
    })));
    assert!(results.into_iter().all(|ok| ok));
}

#[test]
fn pool_buffers_are_reused_and_fixed() {
    let (_d, p, s) = setup();
    let opts = UringOptions {
        pool_buffers: 4,
        buffer_size: 32 << 10,
        ..Default::default()
    };
    let be = UringBackend::new(p.as_raw_fd(), s.as_raw_fd(), opts).unwrap();
    assert!(
        be.uses_fixed_buffers(),
        "the pool was not registered with io_uring (RLIMIT_MEMLOCK too small? `ulimit -l`)"
    );
    let a = be.buffer(64 << 10); // two adjacent slots
    let b = be.buffer(64 << 10);
    let c = be.buffer(32 << 10); // pool exhausted: heap
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    drop((a, b, c));
    let mut a2 = be.buffer(64 << 10);
    assert!(
        a2.as_ptr() == pa || a2.as_ptr() == pb,
        "a freed run is handed out again"
    );
    a2.iter_mut().for_each(|x| *x = 0x5a);
    let before = be.fixed_ops();
    be.block_on(async {
        be.write(Dev::Secondary, 0, &a2, false).await.unwrap();
        let mut back = be.buffer(64 << 10);
        be.read(Dev::Secondary, 0, &mut back).await.unwrap();
        assert!(back.iter().all(|&x| x == 0x5a));
    });
    assert_eq!(
        be.fixed_ops() - before,
        2,
        "pool buffers go through the fixed opcodes"
    );
    let heap = AlignedBuf::new(4096);
    be.block_on(be.write(Dev::Secondary, 0, &heap, false))
        .unwrap();
    assert_eq!(be.fixed_ops() - before, 2, "a heap buffer does not");
}

#[test]
fn pause_sleeps_about_its_interval() {
    let (_d, p, s) = setup();
    let opts = UringOptions {
        pause: Duration::from_millis(20),
        ..Default::default()
    };
    let be = UringBackend::new(p.as_raw_fd(), s.as_raw_fd(), opts).unwrap();
    let t = Instant::now();
    be.block_on(join_all((0..10).map(|_| be.pause())));
    // A timeout never fires early: a lower bound is not a race.
    assert!(
        t.elapsed() >= Duration::from_millis(20),
        "{:?}",
        t.elapsed()
    );
    // Ten pauses wait together (one interval, not ten): all ten were in
    // the ring at once.
    assert_eq!(be.peak_inflight(), 10);
}

#[test]
fn commit_hooks_are_called() {
    let (_d, p, s) = setup();
    let hits = std::rc::Rc::new(std::cell::Cell::new(0));
    let h = hits.clone();
    let be = UringBackend::new(p.as_raw_fd(), s.as_raw_fd(), UringOptions::default())
        .unwrap()
        .with_commit(move || h.set(h.get() + 1))
        .with_commit_failed(|| true);
    be.request_commit();
    be.request_commit();
    assert_eq!(hits.get(), 2);
    assert!(be.commit_failed());
}

#[test]
fn read_errors_are_reported() {
    let (_d, p, s) = setup();
    let be = UringBackend::new(p.as_raw_fd(), s.as_raw_fd(), UringOptions::default()).unwrap();
    let mut buf = AlignedBuf::new(4096);
    let r = be.block_on(be.read(Dev::Primary, SIZE, &mut buf));
    assert!(r.is_err(), "a read past the end fails");
}

/// Blocks of a file actually allocated (st_blocks, 512-byte units).
fn allocated(f: &File) -> u64 {
    use std::os::unix::fs::MetadataExt;
    f.metadata().unwrap().blocks()
}

#[test]
fn zero_punches_a_hole_or_zeroes_a_range_and_reads_back_zeros() {
    let (_d, p, s) = setup();
    let be = UringBackend::new(p.as_raw_fd(), s.as_raw_fd(), UringOptions::default()).unwrap();
    let data = filled(1 << 20, 5);
    be.block_on(async {
        be.write(Dev::Primary, 0, &data, false).await.unwrap();
        be.write(Dev::Secondary, 0, &data, false).await.unwrap();
        be.flush(Dev::Primary).await.unwrap();
    });
    let before = allocated(&p);
    be.block_on(async {
        // A discard (may unmap) of 256 KiB on the primary, a write-zeroes
        // (kept allocated) of 64 KiB at an odd 4 KiB offset on the secondary.
        be.zero(Dev::Primary, 128 << 10, 256 << 10, true, false)
            .await
            .unwrap();
        be.zero(Dev::Secondary, 12 << 10, 64 << 10, false, true)
            .await
            .unwrap();
    });
    let mut got = AlignedBuf::new(1 << 20);
    be.block_on(be.read(Dev::Primary, 0, &mut got)).unwrap();
    let mut want = data.to_vec();
    want[128 << 10..384 << 10].fill(0);
    assert!(
        got[..] == want[..],
        "primary: the discarded range reads zeros"
    );
    assert!(
        allocated(&p) < before,
        "the discard deallocated the range ({} -> {} blocks)",
        before,
        allocated(&p)
    );
    be.block_on(be.read(Dev::Secondary, 0, &mut got)).unwrap();
    let mut want = data.to_vec();
    want[12 << 10..76 << 10].fill(0);
    assert!(
        got[..] == want[..],
        "secondary: the zeroed range reads zeros"
    );
}

/// Host writes waiting for busy tracks on one ring are woken, not polled,
/// and their wake-ups never keep the ring from being entered. The tasks
/// run as on a ublk queue: an executor runs every woken task until none
/// is left (`try_tick`), and only then does the thread go back to its ring
/// for completions. Crossing multi-track writes and merges on a few
/// pending tracks must all finish, and one round of `try_tick`s must end
/// (waiters that woke each other on every retry would spin in it forever
/// while the I/O they wait for sits in the ring).
#[test]
fn waiting_writes_on_one_ring_are_woken_and_finish() {
    use splitmirror::core::{Command, Geometry, Volume, VolumeState};
    use splitmirror::exec::host;
    use std::rc::Rc;
    const TRACK: u64 = 64 << 10;
    let (_d, p, s) = setup();
    let be =
        Rc::new(UringBackend::new(p.as_raw_fd(), s.as_raw_fd(), UringOptions::default()).unwrap());
    let vol = Rc::new(Volume::new(
        Geometry::new(SIZE, TRACK).unwrap(),
        VolumeState::Split,
    ));
    // Restoring with every track pending: partial writes are merges.
    vol.apply(Command::Restore {
        incremental: false,
        protect: false,
    })
    .unwrap();
    let data = Rc::new(filled(3 * TRACK as usize, 9));
    let ex = smol::LocalExecutor::new();
    let tasks: Vec<_> = (0..24u64)
        .map(|i| {
            let (vol, be, data) = (vol.clone(), be.clone(), data.clone());
            // Spans of one to three tracks over tracks 0..6, crossing.
            let first = i % 4;
            let len = ((1 + i % 3) * TRACK - 4096) as usize;
            let off = first * TRACK + 512 * (i % 7);
            ex.spawn(
                async move { host::write(&vol, &*be, off, (&data[..len]).into(), false).await },
            )
        })
        .collect();
    let mut longest_round = 0u64;
    be.block_on(std::future::poll_fn(|cx| {
        let mut ticks = 0u64;
        while ex.try_tick() {
            ticks += 1;
            assert!(ticks < 100_000, "waiters wake each other without end");
        }
        longest_round = longest_round.max(ticks);
        // The commits the writes wait for, done by hand (no committer
        // thread here): the clock's wake-up reaches the waiters.
        if vol.needs_commit() || vol.commit_waiters() > 0 {
            splitmirror::backend::sim::mem_commit_end(&vol, vol.take_commit().seq);
        }
        if tasks.iter().all(|t| t.is_finished()) {
            return std::task::Poll::Ready(());
        }
        // Back to the ring (block_on reaps completions), then again.
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }));
    for t in tasks {
        assert!(smol::block_on(t).is_ok());
    }
    assert!(
        vol.progress_wakes().woken() > 0,
        "waits were woken by releases"
    );
}
