//! Write intent that ages over several commit intervals: steady writes to
//! a working set need no metadata commit, and a write after its region was
//! aged out is not acknowledged before its intent bit is durable again.

use splitmirror::backend::sim;
use splitmirror::core::{CommitTake, Geometry, TableId, Volume, VolumeState, WriteOutcome};
use splitmirror::metadata::committer::INTENT_AGE_PASSES;

const TRACK: u64 = 64 << 10;
const TRACKS: u64 = 4096;
/// The intent table's index in a commit (the tables' on-disk order).
const INTENT: usize = 3;

fn volume() -> Volume {
    Volume::new(
        Geometry::new(TRACKS * TRACK, TRACK).unwrap(),
        VolumeState::Established,
    )
}

/// The committed intent table, as the commits carried it.
struct Image(Vec<u64>);

impl Image {
    fn new() -> Self {
        Image(vec![0; (TRACKS / 64) as usize])
    }

    /// Runs one commit and applies what it carried; returns its number.
    fn commit(&mut self, vol: &Volume) -> u64 {
        let take: CommitTake = vol.take_commit();
        for (table, chunk, words) in &take.chunks {
            if *table != INTENT {
                continue;
            }
            let at = chunk * splitmirror::core::CHUNK_WORDS;
            let n = self
                .0
                .len()
                .saturating_sub(at)
                .min(splitmirror::core::CHUNK_WORDS);
            match words {
                Some(w) => self.0[at..at + n].copy_from_slice(&w[..n]),
                None => self.0[at..at + n].fill(!0),
            }
        }
        sim::mem_commit_end(vol, take.seq);
        take.seq
    }

    fn has(&self, t: u64) -> bool {
        self.0[(t / 64) as usize] >> (t % 64) & 1 == 1
    }
}

/// One 4 KiB mirror write to track `t`, committing whatever it must wait
/// for; returns whether it needed a commit. Asserts that at its
/// acknowledgement the committed image holds its intent bit.
fn write(vol: &Volume, img: &mut Image, t: u64) -> bool {
    let ticket = vol.enter().unwrap();
    let plan = vol.plan_write(&ticket, t * TRACK, 4096).unwrap();
    let needed = plan.commit_before_issue;
    if let Some(seq) = needed {
        while !vol.is_durable(seq) {
            img.commit(vol);
        }
    }
    assert!(
        img.has(t),
        "track {t}: data issued (and acknowledged) before its intent bit was durable"
    );
    let done = vol.finish_write(plan, WriteOutcome::default());
    assert!(done.ok && done.ack_after.is_none());
    needed.is_some()
}

/// A working set of 200 tracks spread over the volume.
fn working_set() -> Vec<u64> {
    let mut rng = fastrand::Rng::with_seed(7);
    (0..200).map(|_| rng.u64(0..TRACKS)).collect()
}

#[test]
fn steady_writes_to_warm_tracks_need_no_commit() {
    let vol = volume();
    let mut img = Image::new();
    let set = working_set();
    for &t in &set {
        write(&vol, &mut img, t);
    }
    let warm = vol.commits_done();
    let mut rng = fastrand::Rng::with_seed(3);
    let mut waits = 0;
    // Many aging passes (one per commit interval in the server), with the
    // whole working set written between two passes, in random order.
    for _ in 0..20 {
        let mut order = set.clone();
        rng.shuffle(&mut order);
        for t in order {
            waits += write(&vol, &mut img, t) as u32;
        }
        assert_eq!(vol.age_intents(INTENT_AGE_PASSES), 0, "nothing is idle");
        assert!(!vol.needs_commit(), "an aging pass that clears nothing");
    }
    assert_eq!(waits, 0, "writes that waited for a commit");
    assert_eq!(vol.commits_done(), warm, "commits issued by steady writes");
}

#[test]
fn after_aging_a_write_waits_for_its_intent_bit_again() {
    let vol = volume();
    let mut img = Image::new();
    let set = working_set();
    for &t in &set {
        write(&vol, &mut img, t);
    }
    // A write in flight (its track held) through every pass keeps its bit.
    let held = set[0];
    let ticket = vol.enter().unwrap();
    let plan = vol.plan_write(&ticket, held * TRACK, 4096).unwrap();
    assert_eq!(plan.commit_before_issue, None);
    // Young regions are kept for INTENT_AGE_PASSES idle passes...
    for pass in 0..=INTENT_AGE_PASSES {
        assert_eq!(vol.age_intents(INTENT_AGE_PASSES), 0, "pass {pass}");
    }
    // ... then their idle tracks are cleared, and the clear committed.
    assert!(vol.age_intents(INTENT_AGE_PASSES) > 0);
    assert!(vol.table(TableId::Intent).get(held), "a track in flight");
    assert_eq!(vol.table(TableId::Intent).count(), 1, "only that track");
    img.commit(&vol);
    vol.finish_write(plan, WriteOutcome::default());
    drop(ticket);
    // Every write to a cleared track waits for a commit that carries its
    // bit again (`write` asserts the image at acknowledgement).
    let cleared: Vec<u64> = set.iter().copied().filter(|&t| t != held).collect();
    assert!(
        cleared.iter().all(|&t| !img.has(t)),
        "the clear was committed"
    );
    for &t in &cleared {
        let first_in_region = !vol.table(TableId::Intent).get(t);
        let waited = write(&vol, &mut img, t);
        assert_eq!(waited, first_in_region, "track {t}");
    }
}
