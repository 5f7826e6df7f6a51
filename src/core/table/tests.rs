use super::*;

#[test]
fn changes_are_unsynced_until_a_commit_takes_them() {
    let t = TrackTable::new(100_000);
    assert!(t.set(40_000));
    assert!(t.is_unsynced(40_000));
    let mut buf = vec![0u64; CHUNK_WORDS];
    assert!(!t.take_dirty_chunk(0, &mut buf));
    assert!(t.take_dirty_chunk(1, &mut buf));
    assert!(!t.is_unsynced(40_000));
    assert_eq!(
        buf[(40_000 - CHUNK_TRACKS as usize) / 64],
        1 << (40_000 % 64)
    );
    assert!(!t.set(40_000), "setting a set bit changes nothing");
    assert!(!t.has_dirty_chunks());
}

#[test]
fn fill_and_merge_are_wordwise_and_dirty() {
    let a = TrackTable::new(130);
    let b = TrackTable::new(130);
    b.set(129);
    a.merge_from(&b);
    assert!(a.get(129) && a.is_unsynced(129));
    a.fill();
    assert_eq!(a.count(), 130);
    a.clear_all();
    assert!(a.is_clear() && a.has_dirty_chunks());
    let mut buf = vec![0u64; CHUNK_WORDS];
    assert!(a.take_dirty_chunk(0, &mut buf));
    a.clear_all();
    assert!(
        !a.has_dirty_chunks(),
        "clearing a clear table dirties nothing"
    );
}
