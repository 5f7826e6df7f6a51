//! The host write path allocates nothing per request: planning and
//! finishing a write (the core's part of every host write) is counted with
//! a counting global allocator.

use splitmirror::core::{Geometry, TableId, Volume, VolumeState, WriteOutcome};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator, only counting.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, SeqCst);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, SeqCst);
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

const TRACK: u64 = 128 << 10;

/// Allocations made by `n` warm 4 KiB..256 KiB writes in `state`.
fn allocs_per_write(state: VolumeState) -> f64 {
    let vol = Volume::new(Geometry::new(1 << 30, TRACK).unwrap(), state);
    let mut rng = fastrand::Rng::with_seed(5);
    let mut run = |n: u32| {
        for _ in 0..n {
            let len = 4096 << rng.u32(0..7);
            let off = rng.u64(0..(1 << 30) / len as u64) * len as u64;
            let t = vol.enter().unwrap();
            let plan = vol.plan_write(&t, off, len as u64).unwrap();
            assert_eq!(plan.commit_before_issue, None, "warm tracks");
            vol.finish_write(plan, WriteOutcome::default());
        }
    };
    // Warm: every track's bit set and durable (as after a while of
    // writes), so no write of the counted run needs a commit.
    vol.table(TableId::Changed).fill();
    vol.table(TableId::Intent).fill();
    splitmirror::backend::sim::mem_commit_end(&vol, vol.take_commit().seq);
    run(1000);
    let before = ALLOCS.load(SeqCst);
    run(1000);
    (ALLOCS.load(SeqCst) - before) as f64 / 1000.0
}

#[test]
fn planning_a_write_allocates_nothing() {
    for state in [VolumeState::Established, VolumeState::Split] {
        let per_write = allocs_per_write(state);
        assert!(
            per_write < 0.01,
            "{state}: {per_write} allocations per write"
        );
    }
}
