//! The metadata store on a real file: format, open, commit, the errors a
//! user sees, recovery from a torn header, and the committer thread.

use splitmirror::core::{DevSet, Geometry, TableId, Volume, VolumeState};
use splitmirror::error::Error;
use splitmirror::metadata::format::{Header, Layout};
use splitmirror::metadata::{Binding, Committer, DataFlush, FileMeta, MetaDevice, MetadataStore};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TRACK: u64 = 64 * 1024;
const SIZE: u64 = 100_000 * TRACK; // several chunks per table

fn binding() -> Binding {
    Binding {
        volume_size: SIZE,
        track_size: TRACK,
        primary_size: SIZE,
        secondary_size: SIZE + 4096,
        primary_id: "wwid:naa.5000c500a1b2c3d4".into(),
        secondary_id: "serial:S3Z9NB0K".into(),
        primary_path: "/dev/disk/by-id/p".into(),
        secondary_path: "/dev/disk/by-id/s".into(),
    }
}

fn fresh(assume_clean: bool) -> Volume {
    Volume::formatted(Geometry::new(SIZE, TRACK).unwrap(), assume_clean)
}

fn no_flush() -> DataFlush {
    Box::new(|_| Ok(()))
}

fn config_message(r: Result<impl Sized, Error>) -> String {
    match r {
        Err(Error::Config(m)) => m,
        Err(e) => panic!("expected a config error, got {e:?}"),
        Ok(_) => panic!("expected a config error"),
    }
}

#[test]
fn format_then_open_gives_the_formatted_volume() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.meta");
    MetadataStore::format(&path, &binding(), &fresh(false), false).unwrap();
    let (store, vol) = MetadataStore::open(&path, &binding()).unwrap();
    assert_eq!(vol.state(), VolumeState::Syncing);
    assert_eq!(vol.table(TableId::Stale).count(), vol.geometry().tracks());
    assert_eq!(vol.operation().unwrap().total, vol.geometry().tracks());
    assert_eq!(store.generation(), 1);
    assert!(!vol.needs_commit());
}

#[test]
fn commits_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.meta");
    let mut store = MetadataStore::format(&path, &binding(), &fresh(true), false).unwrap();
    drop(store);
    let (s, vol) = MetadataStore::open(&path, &binding()).unwrap();
    store = s;
    for round in 0..3u64 {
        vol.table(TableId::Changed).set(40_000 + round);
        vol.table(TableId::Intent).set(99_999 - round);
        let flushed = Arc::new(Mutex::new(Vec::new()));
        let f = flushed.clone();
        let mut flush: DataFlush = Box::new(move |d| {
            f.lock().unwrap().push(d);
            Ok(())
        });
        store.commit(&vol, &mut flush).unwrap();
        assert!(vol.is_durable(round + 2));
    }
    drop(store);
    let (_, again) = MetadataStore::open(&path, &binding()).unwrap();
    assert_eq!(again.table(TableId::Changed).count(), 3);
    // Leftover intent means mirror writes may have been in flight: resync.
    assert_eq!(again.state(), VolumeState::Syncing);
    assert_eq!(again.table(TableId::Stale).count(), 3);
    assert!(again.table(TableId::Stale).get(99_999));
}

#[test]
fn clearing_intent_flushes_both_devices_first() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.meta");
    let vol = fresh(true);
    let mut store = MetadataStore::format(&path, &binding(), &vol, false).unwrap();
    vol.table(TableId::Intent).set(7);
    store.commit(&vol, &mut no_flush()).unwrap();
    assert_eq!(vol.clear_idle_intents(), 1);
    let flushed = Arc::new(Mutex::new(DevSet::NONE));
    let f = flushed.clone();
    let mut flush: DataFlush = Box::new(move |d| {
        *f.lock().unwrap() = d;
        Ok(())
    });
    store.commit(&vol, &mut flush).unwrap();
    assert_eq!(*flushed.lock().unwrap(), DevSet::BOTH);
}

#[test]
fn format_refuses_valid_metadata_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.meta");
    MetadataStore::format(&path, &binding(), &fresh(true), false).unwrap();
    let msg = config_message(MetadataStore::format(
        &path,
        &binding(),
        &fresh(true),
        false,
    ));
    assert!(
        msg.contains("already holds a valid splitmirror volume"),
        "{msg}"
    );
    assert!(msg.contains("--force"), "{msg}");
    MetadataStore::format(&path, &binding(), &fresh(false), true).unwrap();
    let (_, vol) = MetadataStore::open(&path, &binding()).unwrap();
    assert_eq!(vol.state(), VolumeState::Syncing);
}

#[test]
fn open_refuses_other_devices_foreign_and_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.meta");
    let msg = config_message(MetadataStore::open(&path, &binding()));
    assert!(
        msg.contains("does not exist") && msg.contains("format"),
        "{msg}"
    );
    MetadataStore::format(&path, &binding(), &fresh(true), false).unwrap();
    let mut other = binding();
    other.secondary_size += 4096;
    let msg = config_message(MetadataStore::open(&path, &other));
    assert!(msg.contains("secondary size"), "{msg}");
    assert!(!msg.contains('\n'));
    let foreign = dir.path().join("foreign");
    std::fs::write(&foreign, vec![0x5a; 64 * 1024]).unwrap();
    let msg = config_message(MetadataStore::open(&foreign, &binding()));
    assert!(msg.contains("does not hold a splitmirror volume"), "{msg}");
}

fn layout() -> Layout {
    Layout::new(Geometry::new(SIZE, TRACK).unwrap().tracks(), 4)
}

fn smash(path: &Path, offset: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&[0xff; 100], offset).unwrap();
}

#[test]
fn a_second_opener_is_refused_while_the_first_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.meta");
    let first = MetadataStore::format(&path, &binding(), &fresh(true), false).unwrap();
    match MetadataStore::open(&path, &binding()) {
        Err(Error::Runtime(m)) => assert!(m.contains("in use"), "{m}"),
        _ => panic!("a second opener must be refused"),
    }
    drop(first);
    MetadataStore::open(&path, &binding()).unwrap();
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, offset).unwrap();
    b
}

fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
}

/// Format, then commits 2 (changed 5) and 3 (changed 6). Returns slot 1 as
/// generation 1 left it, before commit 3 overwrote it.
fn three_generations(path: &Path) -> Vec<u8> {
    let vol = fresh(true);
    let mut store = MetadataStore::format(path, &binding(), &vol, false).unwrap();
    let hb = layout().header_bytes as usize;
    let gen1 = read_at(path, layout().header_offset(1), hb);
    vol.table(TableId::Changed).set(5);
    store.commit(&vol, &mut no_flush()).unwrap(); // generation 2, slot 0
    vol.table(TableId::Changed).set(6);
    store.commit(&vol, &mut no_flush()).unwrap(); // generation 3, slot 1
    gen1
}

#[test]
fn a_torn_header_falls_back_to_the_previous_commit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.meta");
    let gen1 = three_generations(&path);
    // A crash while generation 3 was written: its first sector landed, the
    // rest of the slot still holds generation 1.
    write_at(&path, layout().header_offset(1) + 512, &gen1[512..]);
    let (store, vol) = MetadataStore::open(&path, &binding()).unwrap();
    assert_eq!(store.generation(), 2);
    assert!(vol.table(TableId::Changed).get(5) && !vol.table(TableId::Changed).get(6));
    drop(store);
    smash(&path, layout().header_offset(Header::slot(2)) + 40);
    let msg = config_message(MetadataStore::open(&path, &binding()));
    assert!(msg.contains("both header slots"), "{msg}");
}

#[test]
fn a_damaged_newest_header_is_reported_not_replaced_by_the_older() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.meta");
    three_generations(&path);
    // A flipped bit in the durable generation 3 (bit rot, a stray write).
    smash(&path, layout().header_offset(Header::slot(3)) + 40);
    let msg = config_message(MetadataStore::open(&path, &binding()));
    assert!(
        msg.contains("header slot 1 is damaged") && msg.contains("generation 2"),
        "{msg}"
    );
    assert!(!msg.contains('\n'));
}

#[test]
fn a_damaged_older_header_is_passed_over() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.meta");
    three_generations(&path);
    // Generation 2's padding sector: its first sector still says 2 < 3.
    smash(&path, layout().header_offset(Header::slot(2)) + 3 * 512 + 8);
    let (store, vol) = MetadataStore::open(&path, &binding()).unwrap();
    assert_eq!(store.generation(), 3);
    assert!(vol.table(TableId::Changed).get(5) && vol.table(TableId::Changed).get(6));
}

#[test]
fn a_page_that_fails_its_checksum_is_reported_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.meta");
    let vol = fresh(true);
    let mut store = MetadataStore::format(&path, &binding(), &vol, false).unwrap();
    vol.table(TableId::Changed).set(40_000); // chunk 1 of table 0: page 1
    store.commit(&vol, &mut no_flush()).unwrap(); // written to copy 1
    drop(store);
    let page = layout().page_offset(1, true);
    let mut b = read_at(&path, page, 4096);
    b[100] ^= 0x10;
    write_at(&path, page, &b);
    let msg = config_message(MetadataStore::open(&path, &binding()));
    assert!(
        msg.contains("page 1 (table changed, chunk 1, copy 1") && msg.contains("checksum"),
        "{msg}"
    );
}

#[test]
fn a_damaged_superblock_is_read_from_its_backup_and_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.meta");
    MetadataStore::format(&path, &binding(), &fresh(true), false).unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    assert_eq!(len, layout().total_bytes());
    let primary = read_at(&path, 0, 4096);
    assert_eq!(read_at(&path, len - 4096, 4096), primary, "the backup");
    smash(&path, 20);
    let (store, vol) = MetadataStore::open(&path, &binding()).unwrap();
    assert_eq!(vol.state(), VolumeState::Established);
    drop(store);
    assert_eq!(read_at(&path, 0, 4096), primary, "repaired at open");
    smash(&path, len - 4096 + 20);
    MetadataStore::open(&path, &binding()).unwrap();
    assert_eq!(read_at(&path, len - 4096, 4096), primary, "backup repaired");
    smash(&path, 20);
    smash(&path, len - 4096 + 20);
    let msg = config_message(MetadataStore::open(&path, &binding()));
    assert!(msg.contains("superblock and its backup"), "{msg}");
}

#[test]
fn format_allocates_every_block_of_the_metadata() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.meta");
    MetadataStore::format(&path, &binding(), &fresh(true), false).unwrap();
    let m = std::fs::metadata(&path).unwrap();
    assert_eq!(m.len(), layout().total_bytes());
    assert!(
        m.blocks() * 512 >= m.len(),
        "{} of {} bytes allocated: a later commit could meet ENOSPC",
        m.blocks() * 512,
        m.len()
    );
}

#[test]
fn open_refuses_swapped_and_replaced_devices() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.meta");
    MetadataStore::format(&path, &binding(), &fresh(true), false).unwrap();
    let before = std::fs::read(&path).unwrap();
    let mut swapped = binding();
    std::mem::swap(&mut swapped.primary_id, &mut swapped.secondary_id);
    let msg = config_message(MetadataStore::open(&path, &swapped));
    assert!(
        msg.starts_with("primary /dev/disk/by-id/p is not the device")
            && msg.contains("expected wwid:naa.5000c500a1b2c3d4, found serial:S3Z9NB0K")
            && msg.contains("swapped"),
        "{msg}"
    );
    let mut replaced = binding();
    replaced.secondary_id = "serial:NEWDISK".into();
    let msg = config_message(MetadataStore::open(&path, &replaced));
    assert!(
        msg.starts_with("secondary /dev/disk/by-id/s")
            && msg.contains("found serial:NEWDISK")
            && msg.contains("replace-secondary"),
        "{msg}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), before, "nothing written");
}

#[test]
fn format_refuses_a_target_holding_other_data_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.meta");
    let mut junk = vec![0u8; 1 << 20];
    junk[100_000] = 1; // inside the metadata area
    std::fs::write(&path, &junk).unwrap();
    let msg = config_message(MetadataStore::format(
        &path,
        &binding(),
        &fresh(true),
        false,
    ));
    assert!(
        msg.contains("not splitmirror metadata") && msg.contains("offset 100000"),
        "{msg}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), junk, "nothing written");
    // Zeros are fine, and so is anything with --force.
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    MetadataStore::format(&path, &binding(), &fresh(true), false).unwrap();
    std::fs::write(&path, &junk).unwrap();
    MetadataStore::format(&path, &binding(), &fresh(true), true).unwrap();
    MetadataStore::open(&path, &binding()).unwrap();
}

fn apply(vol: &Volume, cmd: splitmirror::core::Command) {
    assert!(vol.close_gate() && vol.is_drained());
    vol.apply(cmd).unwrap();
    vol.open_gate();
}

const RESTORE: splitmirror::core::Command = splitmirror::core::Command::Restore {
    incremental: false,
    protect: false,
};

/// Metadata left in the middle of a full restore.
fn restoring(path: &Path) {
    MetadataStore::format(path, &binding(), &fresh(true), false).unwrap();
    let (mut store, vol) = MetadataStore::open(path, &binding()).unwrap();
    apply(&vol, splitmirror::core::Command::Split);
    apply(&vol, RESTORE);
    store.commit(&vol, &mut no_flush()).unwrap();
}

#[test]
fn format_force_refuses_to_discard_a_restore_unless_told() {
    use splitmirror::metadata::FormatOptions;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.meta");
    restoring(&path);
    let before = std::fs::read(&path).unwrap();
    let msg = config_message(MetadataStore::format(&path, &binding(), &fresh(true), true));
    assert!(
        msg.contains("restore in progress") && msg.contains("--discard-restore"),
        "{msg}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), before, "nothing written");
    let opts = FormatOptions {
        force: true,
        discard_restore: true,
    };
    MetadataStore::format_with(&path, &binding(), &fresh(true), opts).unwrap();
    let (_, vol) = MetadataStore::open(&path, &binding()).unwrap();
    assert_eq!(vol.state(), VolumeState::Established);
}

fn new_secondary() -> Binding {
    let mut b = binding();
    b.secondary_id = "serial:NEWDISK".into();
    b.secondary_size = SIZE + (1 << 20);
    b
}

#[test]
fn replace_secondary_records_the_new_disk_and_copies_every_track() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.meta");
    MetadataStore::format(&path, &binding(), &fresh(true), false).unwrap();
    {
        // Split, a few changes: an incremental establish would copy 2 tracks.
        let (mut store, vol) = MetadataStore::open(&path, &binding()).unwrap();
        apply(&vol, splitmirror::core::Command::Split);
        vol.table(TableId::Changed).set(3);
        vol.table(TableId::Changed).set(99_000);
        store.commit(&vol, &mut no_flush()).unwrap();
    }
    let r = MetadataStore::replace_secondary(&path, &new_secondary()).unwrap();
    assert_eq!(r.old_id, "serial:S3Z9NB0K");
    assert_eq!(r.old_state, VolumeState::Split);
    let msg = config_message(MetadataStore::open(&path, &binding()));
    assert!(msg.contains("expected serial:NEWDISK"), "{msg}");
    let (_, vol) = MetadataStore::open(&path, &new_secondary()).unwrap();
    assert_eq!(vol.state(), VolumeState::Degraded);
    let tracks = vol.geometry().tracks();
    apply(&vol, splitmirror::core::Command::Establish { full: false });
    assert_eq!(
        vol.table(TableId::Stale).count(),
        tracks,
        "every track is copied"
    );
    assert_eq!(vol.operation().unwrap().total, tracks);
}

#[test]
fn replace_secondary_refuses_a_restoring_volume_and_another_primary() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.meta");
    restoring(&path);
    let before = std::fs::read(&path).unwrap();
    match MetadataStore::replace_secondary(&path, &new_secondary()) {
        Err(Error::State(m)) => assert!(m.contains("restoring"), "{m}"),
        other => panic!("want a state error, got {:?}", other.err()),
    }
    let mut other = new_secondary();
    other.primary_id = "wwid:someone-else".into();
    let msg = config_message(MetadataStore::replace_secondary(&path, &other));
    assert!(msg.starts_with("primary "), "{msg}");
    assert_eq!(std::fs::read(&path).unwrap(), before, "nothing written");
}

/// A file whose writes fail on demand: every write numbered `fail_at` or
/// later fails; with `land`, it reaches the file before failing (an error
/// reported after the data was written).
struct Flaky {
    inner: FileMeta,
    ctl: Arc<FlakyCtl>,
}

struct FlakyCtl {
    writes: AtomicU32,
    fail_at: AtomicU32,
    land: AtomicBool,
}

impl FlakyCtl {
    fn fail_from_now(&self, skip: u32, land: bool) {
        self.land.store(land, SeqCst);
        self.fail_at.store(self.writes.load(SeqCst) + skip, SeqCst);
    }
    fn heal(&self) {
        self.fail_at.store(u32::MAX, SeqCst);
    }
}

impl MetaDevice for Flaky {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let n = self.ctl.writes.fetch_add(1, SeqCst);
        if n < self.ctl.fail_at.load(SeqCst) {
            return self.inner.write_at(buf, offset);
        }
        if self.ctl.land.load(SeqCst) {
            self.inner.write_at(buf, offset)?;
        }
        Err(io::Error::from_raw_os_error(libc::EIO))
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
    fn size(&mut self) -> io::Result<u64> {
        self.inner.size()
    }
    fn grow(&mut self, bytes: u64) -> io::Result<()> {
        self.inner.grow(bytes)
    }
    fn describe(&self) -> String {
        "flaky".into()
    }
}

fn flaky(path: &Path) -> (Flaky, Arc<FlakyCtl>) {
    let ctl = Arc::new(FlakyCtl {
        writes: AtomicU32::new(0),
        fail_at: AtomicU32::new(u32::MAX),
        land: AtomicBool::new(false),
    });
    let dev = Flaky {
        inner: FileMeta::open(path, true).unwrap(),
        ctl: ctl.clone(),
    };
    (dev, ctl)
}

#[test]
fn a_failed_commit_is_retried_whole_by_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.meta");
    let vol = fresh(true);
    let (dev, ctl) = flaky(&path);
    let mut store = MetadataStore::format_dev(dev, &binding(), &vol, false).unwrap();
    vol.table(TableId::Changed).set(70_000);
    let seq = vol.next_commit();
    ctl.fail_from_now(0, false);
    assert!(store.commit(&vol, &mut no_flush()).is_err());
    assert!(!vol.is_durable(seq));
    assert!(
        vol.needs_commit(),
        "the failed commit's chunks are dirty again"
    );
    ctl.heal();
    store.commit(&vol, &mut no_flush()).unwrap();
    assert!(vol.is_durable(seq));
    drop(store);
    let (_, again) = MetadataStore::open(&path, &binding()).unwrap();
    assert!(again.table(TableId::Changed).get(70_000));
}

#[test]
fn a_failed_header_write_is_resolved_before_the_next_commit() {
    for land in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol.meta");
        let vol = fresh(true);
        let (dev, ctl) = flaky(&path);
        let mut store = MetadataStore::format_dev(dev, &binding(), &vol, false).unwrap();
        vol.table(TableId::Changed).set(1);
        store.commit(&vol, &mut no_flush()).unwrap();
        // One dirty page: its write succeeds, the header write fails.
        vol.table(TableId::Changed).set(2);
        ctl.fail_from_now(1, land);
        assert!(store.commit(&vol, &mut no_flush()).is_err());
        ctl.heal();
        vol.table(TableId::Changed).set(3);
        store.commit(&vol, &mut no_flush()).unwrap();
        let expect = if land { 4 } else { 3 };
        assert_eq!(store.generation(), expect, "land={land}");
        drop(store);
        let (again_store, again) = MetadataStore::open(&path, &binding()).unwrap();
        assert_eq!(again_store.generation(), expect);
        assert_eq!(again.table(TableId::Changed).count(), 3, "land={land}");
    }
}

#[test]
fn the_committer_commits_on_request_and_at_stop() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.meta");
    let vol = Arc::new(fresh(true));
    let store = MetadataStore::format(&path, &binding(), &vol, false).unwrap();
    let c = Committer::start(store, vol.clone(), no_flush(), Duration::from_secs(3600));
    let h = c.handle();
    vol.table(TableId::Changed).set(11);
    let seq = vol.next_commit();
    h.request();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !vol.is_durable(seq) {
        assert!(Instant::now() < deadline, "no commit after a request");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(h.failed(), None);
    vol.table(TableId::Changed).set(12);
    c.stop().unwrap();
    let (_, again) = MetadataStore::open(&path, &binding()).unwrap();
    assert!(again.table(TableId::Changed).get(11) && again.table(TableId::Changed).get(12));
}

/// A clean stop records no write intent: nothing is written any more and
/// both devices were flushed, so a later start (perhaps without the
/// secondary, which folds intent into "changed") has nothing to resync.
#[test]
fn the_committer_clears_write_intent_at_its_last_commit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.meta");
    let vol = Arc::new(fresh(true));
    let store = MetadataStore::format(&path, &binding(), &vol, false).unwrap();
    let c = Committer::start(store, vol.clone(), no_flush(), Duration::from_secs(3600));
    vol.table(TableId::Intent).set(5);
    vol.table(TableId::Intent).set(70);
    c.stop().unwrap();
    let (_, again) = MetadataStore::open(&path, &binding()).unwrap();
    // Opening turns recorded intent into tracks to resync (stale).
    assert_eq!(
        again.table(TableId::Stale).count(),
        0,
        "intent left at stop"
    );
    assert_eq!(
        again.table(TableId::Intent).count(),
        0,
        "intent left at stop"
    );
}

#[test]
fn the_committer_reports_failures_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.meta");
    let vol = Arc::new(fresh(true));
    let (dev, ctl) = flaky(&path);
    let store = MetadataStore::format_dev(dev, &binding(), &vol, false).unwrap();
    let c = Committer::start(store, vol.clone(), no_flush(), Duration::from_millis(5));
    let h = c.handle();
    ctl.fail_from_now(0, false);
    vol.table(TableId::Changed).set(3);
    h.request();
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.failed().is_none() {
        assert!(Instant::now() < deadline, "failure not reported");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(h.failed().unwrap().contains("metadata commit failed"));
    ctl.heal();
    while h.failed().is_some() {
        assert!(
            Instant::now() < deadline,
            "no retry after the device recovered"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    c.stop().unwrap();
    let (_, again) = MetadataStore::open(&path, &binding()).unwrap();
    assert!(again.table(TableId::Changed).get(3));
}

#[test]
fn a_full_restore_is_committed_as_header_flags_not_pages() {
    use splitmirror::core::Command;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.meta");
    MetadataStore::format(&path, &binding(), &fresh(true), false).unwrap();
    let (dev, ctl) = flaky(&path);
    let (mut store, vol) = MetadataStore::open_dev(dev, &binding()).unwrap();
    let tracks = vol.geometry().tracks();
    let apply = |cmd| {
        assert!(vol.close_gate() && vol.is_drained());
        vol.apply(cmd).unwrap();
        vol.open_gate();
    };
    apply(Command::Split);
    store.commit(&vol, &mut no_flush()).unwrap();
    let before = ctl.writes.load(SeqCst);
    apply(Command::Restore {
        incremental: false,
        protect: false,
    });
    store.commit(&vol, &mut no_flush()).unwrap();
    assert_eq!(
        ctl.writes.load(SeqCst) - before,
        1,
        "only the header: every pending page is an \"all ones\" flag"
    );
    // Restoring one track writes that track's page out for real.
    assert!(vol.table(TableId::Pending).clear(70_000));
    store.commit(&vol, &mut no_flush()).unwrap();
    drop(store);
    let (_, again) = MetadataStore::open(&path, &binding()).unwrap();
    assert_eq!(again.state(), VolumeState::Restoring);
    assert_eq!(again.table(TableId::Pending).count(), tracks - 1);
    assert!(!again.table(TableId::Pending).get(70_000));
    assert!(
        again.table(TableId::Pending).get(69_999) && again.table(TableId::Pending).get(tracks - 1)
    );
}

/// Metadata as a splitmirror of format version 2 wrote it: the same first
/// 96 superblock bytes, and one crc32c-sealed 4 KiB header per slot.
fn version2_image(state: VolumeState) -> Vec<u8> {
    fn seal(b: &mut [u8]) {
        let end = b.len() - 4;
        let crc = crc32c::crc32c(&b[..end]);
        b[end..].copy_from_slice(&crc.to_le_bytes());
    }
    let mut img = vec![0u8; 64 << 10];
    img[0..8].copy_from_slice(b"SPLITMIR");
    img[8..12].copy_from_slice(&2u32.to_le_bytes());
    img[16..32].copy_from_slice(&[9; 16]);
    img[80..88].copy_from_slice(&4096u64.to_le_bytes());
    seal(&mut img[..4096]);
    let slot1 = &mut img[8192..12288];
    slot1[0..8].copy_from_slice(b"SMHEADER");
    slot1[8..24].copy_from_slice(&[9; 16]);
    slot1[24..32].copy_from_slice(&1u64.to_le_bytes());
    slot1[32] = state.code();
    seal(slot1);
    img
}

#[test]
fn format_over_an_older_version_wants_force_and_keeps_its_restore() {
    use splitmirror::metadata::FormatOptions;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.meta");
    std::fs::write(&path, version2_image(VolumeState::Restoring)).unwrap();
    let msg = config_message(MetadataStore::format(
        &path,
        &binding(),
        &fresh(true),
        false,
    ));
    assert!(msg.contains("another format version"), "{msg}");
    let msg = config_message(MetadataStore::format(&path, &binding(), &fresh(true), true));
    assert!(msg.contains("restore in progress"), "{msg}");
    let opts = FormatOptions {
        force: true,
        discard_restore: true,
    };
    MetadataStore::format_with(&path, &binding(), &fresh(true), opts).unwrap();
    std::fs::write(&path, version2_image(VolumeState::Split)).unwrap();
    MetadataStore::format(&path, &binding(), &fresh(true), true).unwrap();
    MetadataStore::open(&path, &binding()).unwrap();
}

/// The metadata device, counting which offsets are read, and logging the
/// writes ("write"), flushes ("flush") and durable writes ("durable").
struct CountingMeta {
    inner: FileMeta,
    reads: Arc<Mutex<Vec<u64>>>,
    ops: Arc<Mutex<Vec<&'static str>>>,
}

impl MetaDevice for CountingMeta {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.reads.lock().unwrap().push(offset);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.ops.lock().unwrap().push("write");
        self.inner.write_at(buf, offset)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.ops.lock().unwrap().push("flush");
        self.inner.flush()
    }
    fn write_at_durable(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.ops.lock().unwrap().push("durable");
        self.inner.write_at_durable(buf, offset)
    }
    fn size(&mut self) -> io::Result<u64> {
        self.inner.size()
    }
    fn grow(&mut self, bytes: u64) -> io::Result<()> {
        self.inner.grow(bytes)
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// Opening a large volume reads the pages that hold something and no
/// other: pages all clear (or all ones) are flags in the header.
#[test]
fn opening_reads_only_the_pages_that_hold_something() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.meta");
    drop(MetadataStore::format(&path, &binding(), &fresh(true), false).unwrap());
    let open_counting = || {
        let reads = Arc::new(Mutex::new(Vec::new()));
        let dev = CountingMeta {
            inner: FileMeta::open(&path, false).unwrap(),
            reads: reads.clone(),
            ops: Arc::default(),
        };
        let (store, vol) = MetadataStore::open_dev(dev, &binding()).unwrap();
        let layout = Layout::new(vol.geometry().tracks(), 4);
        let pages_end = layout.pages_offset() + 2 * layout.pages() as u64 * 4096;
        let pages_read = reads
            .lock()
            .unwrap()
            .iter()
            .filter(|&&at| at >= layout.pages_offset() && at < pages_end)
            .count();
        (store, vol, pages_read)
    };
    let (mut store, vol, pages_read) = open_counting();
    assert_eq!(
        pages_read, 0,
        "an established volume's tables are all clear"
    );
    vol.table(TableId::Changed).set(40_000);
    vol.table(TableId::Changed).set(40_001);
    store.commit_with(&vol, |_| Ok(())).unwrap();
    drop((store, vol));
    let (_store, vol, pages_read) = open_counting();
    assert_eq!(pages_read, 1, "one page of one table holds something");
    assert_eq!(vol.table(TableId::Changed).count(), 2);
    assert!(vol.table(TableId::Changed).get(40_000) && vol.table(TableId::Changed).get(40_001));
}

/// A volume whose secondary is missing opens on the primary alone (the
/// primary is still checked); another disk recorded while the volume runs
/// is the one the next open expects, the old one is then refused.
#[test]
fn open_without_the_secondary_and_record_another_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.meta");
    MetadataStore::format(&path, &binding(), &fresh(true), false).unwrap();
    let mut gone = binding();
    gone.secondary_id = String::new();
    gone.secondary_size = gone.primary_size;
    let msg = config_message(MetadataStore::open(&path, &gone));
    assert!(msg.starts_with("secondary"), "{msg}");
    let mut swapped = gone.clone();
    swapped.primary_id = binding().secondary_id;
    let msg = config_message(MetadataStore::open_without_secondary(&path, &swapped));
    assert!(
        msg.starts_with("primary"),
        "the primary is still checked: {msg}"
    );
    {
        let (mut store, _vol) = MetadataStore::open_without_secondary(&path, &gone).unwrap();
        assert_eq!(store.recorded().secondary_id, binding().secondary_id);
        store
            .rebind_secondary("serial:NEWDISK", binding().secondary_size)
            .unwrap();
    }
    let msg = config_message(MetadataStore::open(&path, &binding()));
    assert!(msg.contains("expected serial:NEWDISK"), "{msg}");
    let mut new = binding();
    new.secondary_id = "serial:NEWDISK".into();
    assert!(MetadataStore::open(&path, &new).is_ok());
}

/// A commit flushes the metadata device once, between its pages and its
/// header, and writes the header durable (FUA where the device has it):
/// no flush of the whole device after it. A commit that writes no page (a
/// state change; a table all ones or all clear is a flag in the header) is
/// the header's durable write alone. Both read back after a reopen, through
/// the real `pwritev2(RWF_DSYNC)` path.
#[test]
fn a_commit_flushes_once_before_its_header_and_writes_the_header_durable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.meta");
    drop(MetadataStore::format(&path, &binding(), &fresh(true), false).unwrap());
    let ops = Arc::new(Mutex::new(Vec::new()));
    let dev = CountingMeta {
        inner: FileMeta::open(&path, false).unwrap(),
        reads: Arc::default(),
        ops: ops.clone(),
    };
    let (mut store, vol) = MetadataStore::open_dev(dev, &binding()).unwrap();
    let mut commit = |what: &str| {
        ops.lock().unwrap().clear();
        store.commit_with(&vol, |_| Ok(())).unwrap();
        let got = ops.lock().unwrap().clone();
        eprintln!("{what}: {got:?}");
        got
    };
    vol.table(TableId::Changed).set(7);
    assert_eq!(commit("one page"), ["write", "flush", "durable"]);
    vol.table(TableId::Stale).fill();
    assert_eq!(commit("a table all ones"), ["durable"]);
    drop((store, vol));
    let (_store, vol) = MetadataStore::open(&path, &binding()).unwrap();
    assert!(vol.table(TableId::Changed).get(7));
    assert_eq!(vol.table(TableId::Changed).count(), 1);
    assert_eq!(vol.table(TableId::Stale).count(), vol.geometry().tracks());
}

/// Metadata formatted before the restore log existed ends where the log
/// now begins, with its backup superblock there. `run` grows the file,
/// moves the backup to the new end, and uses the log; nothing committed
/// is lost, and the moved backup still stands in for a damaged superblock.
#[test]
fn metadata_made_before_the_restore_log_gets_its_area_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.meta");
    let vol = fresh(true);
    let mut store = MetadataStore::format(&path, &binding(), &vol, false).unwrap();
    vol.table(TableId::Changed).set(5);
    store.commit(&vol, &mut no_flush()).unwrap();
    drop(store);
    let l = layout();
    let backup = read_at(&path, l.backup_offset(), 4096);
    let old_len = l.total_bytes_without_log();
    write_at(&path, old_len - 4096, &backup);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(old_len)
        .unwrap();

    let (_, vol) = MetadataStore::open(&path, &binding()).unwrap();
    assert!(vol.table(TableId::Changed).get(5));
    assert!(vol.restore_log_enabled(), "the grown file has the log");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), l.total_bytes());
    drop(vol);
    smash(&path, 0);
    let (_, vol) = MetadataStore::open(&path, &binding()).unwrap();
    assert!(
        vol.table(TableId::Changed).get(5),
        "opened from the moved backup"
    );
}
