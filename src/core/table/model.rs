use super::*;
use proptest::prelude::*;

const TRACKS: u64 = 3 * CHUNK_TRACKS + 100;

#[derive(Debug, Clone)]
enum Op {
    Set(u64),
    Clear(u64),
    Fill,
    ClearAll,
    Commit(usize),
    Read(u64),
    /// On a second table: set a bit, or fill it.
    OtherSet(u64),
    OtherFill,
    MergeFromOther,
    CopyFromOther,
}

fn op() -> impl Strategy<Value = Op> {
    // Tracks near chunk and word edges, where off-by-ones live.
    let track = prop_oneof![
        0..TRACKS,
        (0..4u64, 0..3u64).prop_map(|(c, d)| (c * CHUNK_TRACKS + d).min(TRACKS - 1)),
        (1..4u64).prop_map(|c| (c * CHUNK_TRACKS - 1).min(TRACKS - 1)),
    ];
    prop_oneof![
        4 => track.clone().prop_map(Op::Set),
        4 => track.clone().prop_map(Op::Clear),
        1 => Just(Op::Fill),
        1 => Just(Op::ClearAll),
        3 => (0..4usize).prop_map(Op::Commit),
        3 => track.clone().prop_map(Op::Read),
        2 => track.prop_map(Op::OtherSet),
        1 => Just(Op::OtherFill),
        1 => Just(Op::MergeFromOther),
        1 => Just(Op::CopyFromOther),
    ]
}

struct Model {
    bits: Vec<bool>,
    /// What the last commit of each track's chunk wrote.
    committed: Vec<bool>,
    /// The commit that wrote a track's current committed value.
    committed_by: Vec<u64>,
    seq: u64,
}

fn check(table: &TrackTable, m: &Model, t: u64) {
    let i = t as usize;
    assert_eq!(table.get(t), m.bits[i], "bit {t}");
    match table.durability(t) {
        Durability::Unsynced => {}
        Durability::TakenUnknown => panic!("bit {t}: every commit here says which it is"),
        Durability::Taken(tag) => {
            assert_eq!(
                m.committed[i], m.bits[i],
                "bit {t} synced but not committed"
            );
            let seq = taken_seq(tag, m.seq);
            assert!(
                seq >= m.committed_by[i],
                "bit {t}: taken by {seq} < {}",
                m.committed_by[i]
            );
        }
    }
    let next = (t..TRACKS).chain(0..t).find(|&u| m.bits[u as usize]);
    assert_eq!(table.next_set(t), next, "next_set({t})");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn lazy_chunks_behave_like_written_words(ops in proptest::collection::vec(op(), 1..60)) {
        let table = TrackTable::new(TRACKS);
        let other = TrackTable::new(TRACKS);
        let n = TRACKS as usize;
        let mut other_bits = vec![false; n];
        let mut m = Model { bits: vec![false; n], committed: vec![false; n], committed_by: vec![0; n], seq: 0 };
        let mut out = vec![0u64; CHUNK_WORDS];
        for op in ops {
            match op {
                Op::Set(t) => assert_eq!(table.set(t), !std::mem::replace(&mut m.bits[t as usize], true)),
                Op::Clear(t) => assert_eq!(table.clear(t), std::mem::replace(&mut m.bits[t as usize], false)),
                Op::Fill => {
                    assert_eq!(table.fill(), TRACKS);
                    m.bits.iter_mut().for_each(|b| *b = true);
                }
                Op::ClearAll => {
                    table.clear_all();
                    m.bits.iter_mut().for_each(|b| *b = false);
                }
                Op::Commit(c) => {
                    m.seq += 1;
                    let range = c as u64 * CHUNK_TRACKS..((c as u64 + 1) * CHUNK_TRACKS).min(TRACKS);
                    let differs = range.clone().any(|t| m.bits[t as usize] != m.committed[t as usize]);
                    let took = table.take_dirty_chunk_for(c, &mut out, m.seq);
                    assert!(took != Taken::Clean || !differs, "chunk {c} changed but not dirty");
                    if took == Taken::Ones {
                        out.iter_mut().for_each(|w| *w = !0);
                    }
                    if took != Taken::Clean {
                        for t in range {
                            let i = t as usize;
                            let w = ((t - c as u64 * CHUNK_TRACKS) / 64) as usize;
                            let bit = out[w] >> (t % 64) & 1 == 1;
                            assert_eq!(bit, m.bits[i], "page bit {t}");
                            if m.committed[i] != bit {
                                m.committed[i] = bit;
                                m.committed_by[i] = m.seq;
                            }
                        }
                    }
                }
                Op::Read(t) => check(&table, &m, t),
                Op::OtherSet(t) => {
                    other.set(t);
                    other_bits[t as usize] = true;
                }
                Op::OtherFill => {
                    other.fill();
                    other_bits.iter_mut().for_each(|b| *b = true);
                }
                Op::MergeFromOther => {
                    table.merge_from(&other);
                    m.bits.iter_mut().zip(&other_bits).for_each(|(b, o)| *b |= o);
                }
                Op::CopyFromOther => {
                    let ones = table.copy_from(&other);
                    m.bits.clone_from(&other_bits);
                    assert_eq!(ones, m.bits.iter().filter(|b| **b).count() as u64);
                }
            }
        }
        assert_eq!(table.count(), m.bits.iter().filter(|b| **b).count() as u64);
        assert_eq!(table.is_clear(), !m.bits.iter().any(|b| *b));
        for t in [0, 63, 64, CHUNK_TRACKS - 1, CHUNK_TRACKS, 2 * CHUNK_TRACKS + 5, TRACKS - 1] {
            check(&table, &m, t);
        }
    }
}

#[test]
fn fill_is_lazy_and_a_commit_of_it_leaves_the_words_alone() {
    let table = TrackTable::new(TRACKS);
    table.set(7);
    assert_eq!(table.pages(), 1);
    assert_eq!(table.fill(), TRACKS);
    assert_eq!(table.pages(), 0, "fill gives the pages back");
    let mut out = vec![0u64; CHUNK_WORDS];
    assert_eq!(table.take_dirty_chunk_for(1, &mut out, 5), Taken::Ones);
    assert_eq!(table.durability(CHUNK_TRACKS + 3), Durability::Taken(5));
    assert!(table.is_unsynced(3), "chunk 0 not committed yet");
    // The first change gives the chunk a page, keeping what it stood for.
    assert!(table.clear(CHUNK_TRACKS + 3));
    assert_eq!(table.pages(), 1);
    assert!(table.get(CHUNK_TRACKS + 4) && !table.is_unsynced(CHUNK_TRACKS + 200));
    assert_eq!(table.durability(CHUNK_TRACKS + 200), Durability::Taken(5));
    assert!(table.is_unsynced(CHUNK_TRACKS + 3));
    assert_eq!(table.count(), TRACKS - 1);
}

#[test]
fn a_chunk_keeps_a_page_only_while_its_bits_are_mixed() {
    let table = TrackTable::new(TRACKS);
    let mut out = vec![0u64; CHUNK_WORDS];
    for t in (0..CHUNK_TRACKS).step_by(997) {
        table.set(CHUNK_TRACKS + t);
    }
    assert_eq!(table.pages(), 1);
    assert_eq!(table.take_dirty_chunk_for(1, &mut out, 1), Taken::Words);
    assert_eq!(table.pages(), 1, "mixed: the page stays");
    for t in (0..CHUNK_TRACKS).step_by(997) {
        table.clear(CHUNK_TRACKS + t);
    }
    assert_eq!(table.take_dirty_chunk_for(1, &mut out, 2), Taken::Words);
    assert!(out.iter().all(|w| *w == 0));
    assert_eq!(
        table.pages(),
        0,
        "all clear again: the commit gives it back"
    );
    assert_eq!(
        table.durability(CHUNK_TRACKS + 997),
        Durability::Taken(2),
        "the commit that carried the clears"
    );
    // Loading clear and full pages allocates nothing either.
    let other = TrackTable::new(TRACKS);
    other.load_chunk(0, &[0; CHUNK_WORDS]);
    other.load_chunk(1, &[!0; CHUNK_WORDS]);
    other.load_chunk(3, &[!0; CHUNK_WORDS]);
    assert_eq!(other.pages(), 0);
    assert_eq!(other.count(), CHUNK_TRACKS + 100);
    other.load_chunk(2, &[1; CHUNK_WORDS]);
    assert_eq!(other.pages(), 1);
    // Copying and merging keep to the same rule.
    table.copy_from(&other);
    assert_eq!(table.pages(), 1);
    assert_eq!(table.count(), other.count());
    table.clear_all();
    assert_eq!(table.pages(), 0);
}
