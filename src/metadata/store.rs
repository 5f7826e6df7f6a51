//! The metadata store: format, open and the two-phase shadow-paged commit.
//!
//! # Commit ordering (the one place that says why)
//!
//! A commit is: take the header and the dirty chunks (under the volume's
//! snapshot lock) → flush the data devices → write the pages → flush the
//! metadata → write the header → flush the metadata → `clock.finish`.
//!
//! 1. *Data before metadata.* Every table bit a commit clears claims that
//!    data is somewhere: a copied track on its destination, a restored track
//!    on the primary, the mirror writes under a write-intent bit on both
//!    devices. The data devices are flushed first (`Volume::take_flush_set`
//!    says which), or a power cut could leave the bit durable and the data
//!    lost in a volatile cache (the dm-clone bug fixed in 2019). The chunks
//!    are taken *before* the flush so the flush covers every copy they
//!    record.
//! 2. *Pages before header.* Pages go to the copy the current header does
//!    not reference (shadow paging), so until the new header is durable the
//!    old one still describes a complete, untouched version. The metadata
//!    is flushed between the two so that the new header can never be
//!    durable while one of its pages is not.
//! 3. *Header last, alternating slots.* Generation `n` goes to slot `n % 2`:
//!    the header it replaces stays intact. A header write cut short by a
//!    crash leaves whole sectors of two generations (every sector intact,
//!    see [`Slot::Torn`]): that commit was never acknowledged, and open
//!    falls back to the older generation, whose pages the interrupted
//!    commit did not touch. A header with a sector that fails its checksum
//!    is damage, not a crash: if it may be the newest, open refuses, since
//!    the older header's pages may have been overwritten after the newer
//!    one became durable (the page crcs would catch most of that, but not
//!    the acknowledged changes the older version lacks).
//! 4. *Durable before acknowledged.* `clock.finish(seq)` runs only after
//!    the header flush; host writes waiting for that commit are acked then.
//!
//! A failed commit returns the error without finishing its sequence number
//! and marks what it took dirty again, so the next commit carries it. If
//! the failure came after the header write was issued, that header may or
//! may not have landed; the next commit first flushes and re-reads both
//! header slots, so it never overwrites the pages of a header that did.

use super::device::{FileMeta, MetaDevice};
use super::format::{
    decode_page, encode_page, page_crc, Bad, Header, Layout, RestoreRecord, Slot, Superblock,
    BLOCK, LOG_SLOT_BYTES,
};
use super::restore_log::RestoreLogWriter;
use super::{Binding, DataFlush};
use crate::backend::buf::AlignedBuf;
use crate::core::commit::CommitTake;
use crate::core::table::CHUNK_WORDS;
use crate::core::{DevSet, Geometry, TableId, Volume, VolumeState};
use crate::error::{Error, Result};
use std::io;
use std::path::Path;

pub struct MetadataStore<D: MetaDevice = FileMeta> {
    dev: D,
    sb: Superblock,
    /// The last header known durable.
    current: Header,
    /// A header write failed: whether it landed is unknown.
    uncertain: bool,
    /// The restore log, when in use (the metadata has its area, the boot
    /// is known, the device can be opened twice): the store clears it as a
    /// restore starts; its writer runs on a thread of its own.
    log: Option<LogArea<D>>,
}

struct LogArea<D> {
    /// Until the committer takes it.
    writer: Option<RestoreLogWriter<D>>,
}

/// What one commit carries: taken from the volume by
/// [`Volume::take_commit`], then written by [`MetadataStore::write_commit`].
pub type CommitBatch = CommitTake;

fn page_buf(words: &[u64]) -> AlignedBuf {
    let mut b = AlignedBuf::new(BLOCK as usize);
    encode_page(words, &mut b);
    b
}

fn random_uuid() -> [u8; 16] {
    use std::io::Read;
    let mut u = [0u8; 16];
    let urandom = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut u));
    if urandom.is_err() {
        u = fastrand::u128(..).to_le_bytes();
    }
    u
}

fn geometry_of(binding: &Binding) -> Result<Geometry> {
    Geometry::new(binding.volume_size, binding.track_size)
}

/// How `format` treats what is already on the metadata target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FormatOptions {
    /// Overwrite a valid volume, or a target holding other data.
    pub force: bool,
    /// With `force`: overwrite even a volume in the middle of a restore
    /// (the split image not yet all on the primary).
    pub discard_restore: bool,
}

/// What `replace-secondary` changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replaced {
    pub old_id: String,
    pub old_size: u64,
    pub old_state: VolumeState,
}

impl MetadataStore<FileMeta> {
    /// Writes fresh metadata for `vol`. Refuses valid existing metadata
    /// unless `force`, and anything but zeros unless `force`.
    pub fn format(path: &Path, binding: &Binding, vol: &Volume, force: bool) -> Result<Self> {
        let opts = FormatOptions {
            force,
            discard_restore: false,
        };
        Self::format_with(path, binding, vol, opts)
    }

    /// [`MetadataStore::format`] with every option.
    pub fn format_with(
        path: &Path,
        binding: &Binding,
        vol: &Volume,
        opts: FormatOptions,
    ) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| cannot_open(path, e))?;
        }
        let dev = FileMeta::open(path, true).map_err(|e| cannot_open(path, e))?;
        Self::format_dev_with(dev, binding, vol, opts)
    }

    /// Loads the metadata and the volume it describes (tables, state, the
    /// running operation).
    pub fn open(path: &Path, binding: &Binding) -> Result<(Self, Volume)> {
        let dev = Self::open_existing(path)?;
        Self::open_dev(dev, binding)
    }

    /// Records a new secondary (`binding`'s) in place of the failed one and
    /// marks every track to be copied to it: the volume becomes `degraded`
    /// with every track changed, so the next `establish` copies them all.
    pub fn replace_secondary(path: &Path, binding: &Binding) -> Result<Replaced> {
        let dev = Self::open_existing(path)?;
        Self::replace_secondary_dev(dev, binding)
    }

    /// [`MetadataStore::open`] while the secondary is missing: the
    /// secondary recorded in the metadata is taken as found (the primary is
    /// still checked), so that the volume can run degraded without it.
    pub fn open_without_secondary(path: &Path, binding: &Binding) -> Result<(Self, Volume)> {
        let mut dev = Self::open_existing(path)?;
        let recorded = read_superblock(&mut dev)?.sb.binding;
        let mut binding = binding.clone();
        binding.secondary_id = recorded.secondary_id;
        binding.secondary_size = recorded.secondary_size;
        Self::open_dev(dev, &binding)
    }

    fn open_existing(path: &Path) -> Result<FileMeta> {
        if !path.exists() {
            return Err(Error::config(format!(
                "metadata {} does not exist; run `splitmirror format -c CFG` first",
                path.display()
            )));
        }
        FileMeta::open(path, false).map_err(|e| cannot_open(path, e))
    }
}

fn cannot_open(path: &Path, e: io::Error) -> Error {
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Error::runtime(format!(
            "metadata {} is in use by another splitmirror process; stop that server first",
            path.display()
        ));
    }
    Error::config(format!(
        "cannot open metadata {}: {e}; check the `metadata:` path in the config",
        path.display()
    ))
}

impl<D: MetaDevice> MetadataStore<D> {
    /// [`MetadataStore::format`] on any device.
    pub fn format_dev(dev: D, binding: &Binding, vol: &Volume, force: bool) -> Result<Self> {
        let opts = FormatOptions {
            force,
            discard_restore: false,
        };
        Self::format_dev_with(dev, binding, vol, opts)
    }

    /// [`MetadataStore::format_with`] on any device.
    pub fn format_dev_with(
        mut dev: D,
        binding: &Binding,
        vol: &Volume,
        opts: FormatOptions,
    ) -> Result<Self> {
        let geometry = geometry_of(binding)?;
        if geometry != vol.geometry() {
            return Err(Error::config(
                "internal: the volume to format does not match its binding",
            ));
        }
        let layout = Layout::new(geometry.tracks(), vol.tables_on_disk().len() as u32);
        check_format_target(&mut dev, &layout, opts)?;
        ensure_len(&mut dev, layout.total_bytes())?;
        let sb = Superblock {
            uuid: random_uuid(),
            binding: binding.clone(),
            layout,
        };
        let current = write_fresh(&mut dev, &sb, vol)?;
        vol.reset_commits(current.generation);
        let log = RestoreLogWriter::new(&dev, &sb).map(|w| {
            vol.enable_restore_log(RestoreRecord::capacity());
            LogArea { writer: Some(w) }
        });
        Ok(MetadataStore {
            dev,
            sb,
            current,
            uncertain: false,
            log,
        })
    }

    /// [`MetadataStore::open`] on any device. Nothing is written unless
    /// every check passed (then only a damaged superblock copy is
    /// rewritten from the good one).
    pub fn open_dev(mut dev: D, binding: &Binding) -> Result<(Self, Volume)> {
        let found = read_superblock(&mut dev)?;
        let sb = found.sb.clone();
        check_binding(&dev, &sb.binding, binding)?;
        let (header, vol) = load_volume(&mut dev, &sb, binding)?;
        vol.recover_intents();
        repair_superblock(&mut dev, &found)?;
        let log = open_restore_log(&mut dev, &sb, &vol)?.map(|w| LogArea { writer: Some(w) });
        let store = MetadataStore {
            dev,
            sb,
            current: header,
            uncertain: false,
            log,
        };
        Ok((store, vol))
    }

    /// [`MetadataStore::replace_secondary`] on any device.
    pub fn replace_secondary_dev(mut dev: D, binding: &Binding) -> Result<Replaced> {
        let found = read_superblock(&mut dev)?;
        let mut sb = found.sb.clone();
        let mut keep = binding.clone();
        keep.secondary_id = sb.binding.secondary_id.clone();
        keep.secondary_size = sb.binding.secondary_size;
        check_binding(&dev, &sb.binding, &keep)?;
        let (header, old) = load_volume(&mut dev, &sb, binding)?;
        if old.state() == VolumeState::Restoring {
            return Err(Error::state(format!(
                "cannot replace the secondary while the volume is restoring: the old secondary \
                 holds the split image, which is not yet all on the primary ({} tracks to go); \
                 let the restore finish (`splitmirror wait`), then replace it",
                old.counts().pending
            )));
        }
        let replaced = Replaced {
            old_id: sb.binding.secondary_id.clone(),
            old_size: sb.binding.secondary_size,
            old_state: old.state(),
        };
        // The new disk's content is unknown: every track differs from it.
        let vol = Volume::new(old.geometry(), VolumeState::Degraded);
        vol.table(TableId::Changed).fill();
        for table in vol.tables_on_disk() {
            for c in 0..table.chunks() {
                table.mark_chunk_dirty(c);
            }
        }
        vol.reset_commits(header.generation);
        let mut store = MetadataStore {
            dev,
            sb: sb.clone(),
            current: header,
            uncertain: false,
            log: None,
        };
        // The data devices hold nothing this commit claims: no data flush.
        store.commit_with(&vol, |_| Ok(()))?;
        // Then the new identity. A crash in between leaves the old one
        // recorded: `run` refuses the new disk and the command is run again.
        sb.binding.secondary_id = binding.secondary_id.clone();
        sb.binding.secondary_size = binding.secondary_size;
        write_superblocks(&mut store.dev, &sb)?;
        Ok(replaced)
    }

    /// The devices the metadata is bound to (identities and sizes).
    pub fn recorded(&self) -> &Binding {
        &self.sb.binding
    }

    /// Records another disk as the secondary, while the volume runs. The
    /// caller has first committed every track as changed (see
    /// `Volume::secondary_replaced`), so a crash before or after this write
    /// loses nothing: the old identity makes the next `run` refuse the new
    /// disk, the new one makes it copy everything.
    pub fn rebind_secondary(&mut self, id: &str, size: u64) -> io::Result<()> {
        let mut sb = self.sb.clone();
        sb.binding.secondary_id = id.to_string();
        sb.binding.secondary_size = size;
        write_superblocks(&mut self.dev, &sb)?;
        self.sb = sb;
        Ok(())
    }

    /// The generation of the last durable header.
    pub fn generation(&self) -> u64 {
        self.current.generation
    }

    /// One group commit of everything that changed in `vol` since the last.
    pub fn commit(&mut self, vol: &Volume, flush_data: &mut DataFlush) -> io::Result<()> {
        self.commit_with(vol, flush_data)
    }

    /// [`MetadataStore::commit`] with any data flush.
    pub fn commit_with(
        &mut self,
        vol: &Volume,
        flush_data: impl FnMut(DevSet) -> io::Result<()>,
    ) -> io::Result<()> {
        let batch = self.begin_commit(vol);
        self.write_commit(vol, batch, flush_data)
    }

    /// First half of a commit: numbers it and takes what it will write
    /// (the core's [`Volume::take_commit`]). Nothing is written yet; the
    /// simulation runs other tasks here.
    pub fn begin_commit(&mut self, vol: &Volume) -> CommitBatch {
        vol.take_commit()
    }

    /// Second half: the I/O, in the order the module header explains.
    pub fn write_commit(
        &mut self,
        vol: &Volume,
        batch: CommitBatch,
        flush_data: impl FnMut(DevSet) -> io::Result<()>,
    ) -> io::Result<()> {
        match self.write_batch(&batch, flush_data) {
            Ok(()) => {
                vol.finish_commit(batch.seq);
                Ok(())
            }
            Err(e) => {
                vol.requeue_commit(&batch);
                Err(e)
            }
        }
    }

    fn write_batch(
        &mut self,
        batch: &CommitBatch,
        mut flush_data: impl FnMut(DevSet) -> io::Result<()>,
    ) -> io::Result<()> {
        if self.uncertain {
            self.reload_header()?;
        }
        if batch.flush != DevSet::NONE {
            flush_data(batch.flush)?;
        }
        let (next, pages) = self.write_pages(batch)?;
        let cleared = self.clear_log_for_restore(&next)?;
        // The pages must be durable before the header that points at them;
        // a commit that wrote none (a state change, a table all ones or
        // all clear) needs no flush here.
        if pages > 0 || cleared {
            self.dev.flush()?;
        }
        self.uncertain = true;
        // Durable when it returns (FUA where the device has it): no flush
        // of the whole metadata device after it.
        write_header_durable(&mut self.dev, &self.sb, &next)?;
        self.uncertain = false;
        self.current = next;
        Ok(())
    }

    /// Writes each page into the copy the current header does not use;
    /// returns the header that will reference them and how many pages
    /// were written.
    fn write_pages(&mut self, batch: &CommitBatch) -> io::Result<(Header, usize)> {
        let mut written = 0;
        let layout = self.sb.layout;
        let mut next = Header {
            generation: self.current.generation + 1,
            state: batch.state,
            operation: batch.operation,
            selectors: self.current.selectors.clone(),
            ones: self.current.ones.clone(),
            zeros: self.current.zeros.clone(),
            crcs: self.current.crcs.clone(),
        };
        for (t, c, words) in &batch.chunks {
            let i = layout.page_index(*t, *c);
            let fill = PageFill::of(words.as_deref());
            next.ones[i] = fill == PageFill::Ones;
            next.zeros[i] = fill == PageFill::Clear;
            let Some(words) = words.as_deref().filter(|_| fill == PageFill::Mixed) else {
                next.crcs[i] = 0;
                continue;
            };
            // The copy the durable header does not read (with its "all
            // ones" or "all clear" flag set it reads neither, and either
            // copy is free).
            let slot = !self.current.selectors[i];
            let page = page_buf(words);
            self.dev.write_at(&page, layout.page_offset(i, slot))?;
            written += 1;
            next.selectors[i] = slot;
            next.crcs[i] = page_crc(&page);
        }
        Ok((next, written))
    }

    /// The restore log's writer, for a thread of its own (once; `None`
    /// without the log): host writes wait for its records, never for the
    /// commits this store makes meanwhile.
    pub fn take_restore_log_writer(&mut self) -> Option<RestoreLogWriter<D>> {
        self.log.as_mut()?.writer.take()
    }

    /// A restore starts with this header: the log's records (of an earlier
    /// restore) are destroyed durably before it, so that a record is never
    /// applied to another restore than its own.
    fn clear_log_for_restore(&mut self, next: &Header) -> io::Result<bool> {
        let starts =
            next.state == VolumeState::Restoring && self.current.state != VolumeState::Restoring;
        if !starts || self.log.is_none() {
            return Ok(false);
        }
        let zero = AlignedBuf::new(BLOCK as usize);
        for slot in 0..2 {
            self.dev.write_at(&zero, self.sb.layout.log_offset(slot))?;
        }
        Ok(true)
    }

    /// After a failed header write: flush, then trust what is on the device.
    fn reload_header(&mut self) -> io::Result<()> {
        self.dev.flush()?;
        self.current =
            newest_header(&mut self.dev, &self.sb).map_err(|e| io::Error::other(e.to_string()))?;
        self.uncertain = false;
        Ok(())
    }
}

/// What a committed page holds, as the header records it: only a mixed
/// page is written and read back; the other two are a flag in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PageFill {
    Ones,
    Clear,
    Mixed,
}

impl PageFill {
    /// `None` is a chunk the table took as "all ones" without its words.
    fn of(words: Option<&[u64]>) -> Self {
        match words {
            None => PageFill::Ones,
            Some(w) if w.iter().all(|&x| x == !0) => PageFill::Ones,
            Some(w) if w.iter().all(|&x| x == 0) => PageFill::Clear,
            Some(_) => PageFill::Mixed,
        }
    }
}

/// Reads the newest header and the pages it references into a volume.
fn load_volume<D: MetaDevice>(
    dev: &mut D,
    sb: &Superblock,
    binding: &Binding,
) -> Result<(Header, Volume)> {
    let layout = sb.layout;
    if dev.size()? < layout.total_bytes_without_log() {
        return Err(corrupt(dev, "it is truncated"));
    }
    let header = newest_header(dev, sb)?;
    let geometry = geometry_of(binding)?;
    if geometry.tracks() != layout.tracks {
        return Err(corrupt(dev, "its track count does not match its sizes"));
    }
    let vol = Volume::new(geometry, header.state);
    load_pages(dev, &layout, &header, &vol)?;
    vol.load_header(header.state, header.operation);
    vol.reset_commits(header.generation);
    Ok((header, vol))
}

/// Makes the restore log ready on an opened volume: metadata made before
/// the log gets its area (a file grows, and its backup superblock moves to
/// the new end; a block device too small for it runs without the log).
/// A volume in the middle of a restore then gets back the tracks that
/// writes of this boot restored (see `core::restore_log`). Returns the
/// log's writer when the log is in use.
fn open_restore_log<D: MetaDevice>(
    dev: &mut D,
    sb: &Superblock,
    vol: &Volume,
) -> Result<Option<RestoreLogWriter<D>>> {
    let layout = sb.layout;
    if dev.size()? < layout.total_bytes() {
        if dev.grow(layout.total_bytes()).is_err() {
            log::info!(
                "metadata {} has no room for the restore log ({} bytes more): restoring \
                 writes wait for metadata commits",
                dev.describe(),
                layout.total_bytes() - dev.size()?
            );
            return Ok(None);
        }
        let zero = AlignedBuf::new(LOG_SLOT_BYTES as usize);
        for slot in 0..2 {
            dev.write_at(&zero, layout.log_offset(slot))?;
        }
        write_superblocks(dev, sb)?;
    }
    let Some(writer) = RestoreLogWriter::new(dev, sb) else {
        return Ok(None);
    };
    vol.enable_restore_log(RestoreRecord::capacity());
    if vol.state() == VolumeState::Restoring {
        let tracks = writer.read_own(dev)?;
        let n = vol.replay_restore_log(&tracks);
        if n > 0 {
            log::info!(
                "restore log: {n} tracks restored by host writes acknowledged before the restart \
                 (same boot: the devices' caches still hold them)"
            );
        }
    }
    Ok(Some(writer))
}

/// What `format` finds on its target decides whether it may go on: zeros
/// (or nothing) always; a splitmirror volume or other data only with
/// `--force`; a volume in the middle of a restore only with
/// `--discard-restore` as well.
fn check_format_target<D: MetaDevice>(
    dev: &mut D,
    layout: &Layout,
    opts: FormatOptions,
) -> Result<()> {
    let restoring = match read_superblock(dev) {
        Ok(found) => {
            if !opts.force {
                return Err(Error::config(format!(
                    "metadata {} already holds a valid splitmirror volume; pass --force to overwrite",
                    dev.describe()
                )));
            }
            // A header that cannot be read cannot tell: --force goes on.
            newest_header(dev, &found.sb).is_ok_and(|h| h.state == VolumeState::Restoring)
        }
        Err(_) if dev.size()? >= BLOCK && starts_with_magic(dev)? => {
            if !opts.force {
                return Err(Error::config(format!(
                    "metadata {} holds splitmirror metadata of another format version, or \
                     damaged; pass --force to overwrite it",
                    dev.describe()
                )));
            }
            legacy_restoring(dev)?
        }
        Err(_) => {
            // The metadata area and at least the first MiB (where a
            // filesystem or partition table would show), and the last block.
            let end = layout.total_bytes().max(1 << 20);
            if let Some(at) = first_nonzero(dev, end)?.filter(|_| !opts.force) {
                return Err(Error::config(format!(
                    "metadata {} holds data that is not splitmirror metadata (a non-zero byte \
                     at offset {at}); check the `metadata:` path, or pass --force to overwrite it",
                    dev.describe()
                )));
            }
            false
        }
    };
    if restoring && !opts.discard_restore {
        return Err(Error::config(format!(
            "metadata {} shows a restore in progress: the split image is not yet all on \
             the primary, and formatting loses the record of which tracks still come from \
             the secondary; let it finish (`splitmirror run`, then `splitmirror wait`), or \
             pass --force --discard-restore to give it up",
            dev.describe()
        )));
    }
    Ok(())
}

fn starts_with_magic<D: MetaDevice>(dev: &mut D) -> io::Result<bool> {
    let mut b = AlignedBuf::new(BLOCK as usize);
    dev.read_at(&mut b, 0)?;
    Ok(b[..8] == super::format::SUPER_MAGIC)
}

/// Whether metadata of format version 1 or 2 (an older splitmirror) shows
/// a restore in progress. Those versions share the superblock's first 96
/// bytes and its crc with this one; a header slot was one crc32c-sealed
/// run of `H` bytes with the generation at 24 and the state at 32.
fn legacy_restoring<D: MetaDevice>(dev: &mut D) -> Result<bool> {
    let mut sb = AlignedBuf::new(BLOCK as usize);
    dev.read_at(&mut sb, 0)?;
    let crc = u32::from_le_bytes(sb[4092..4096].try_into().unwrap());
    let version = u32::from_le_bytes(sb[8..12].try_into().unwrap());
    if crc32c::crc32c(&sb[..4092]) != crc || !(1..=2).contains(&version) {
        return Ok(false);
    }
    let h = u64::from_le_bytes(sb[80..88].try_into().unwrap());
    if h == 0 || h % BLOCK != 0 || h > 64 << 20 || dev.size()? < BLOCK + 2 * h {
        return Ok(false);
    }
    let mut newest: Option<(u64, u8)> = None;
    let mut b = AlignedBuf::new(h as usize);
    for slot in 0..2 {
        dev.read_at(&mut b, BLOCK + slot * h)?;
        let end = h as usize - 4;
        let sealed = crc32c::crc32c(&b[..end]) == u32::from_le_bytes(b[end..].try_into().unwrap());
        if b[..8] != super::format::HEADER_MAGIC || b[8..24] != sb[16..32] || !sealed {
            continue;
        }
        let generation = u64::from_le_bytes(b[24..32].try_into().unwrap());
        if newest.is_none_or(|(g, _)| g < generation) {
            newest = Some((generation, b[32]));
        }
    }
    Ok(newest.is_some_and(|(_, state)| state == VolumeState::Restoring.code()))
}

/// The offset of the first non-zero byte among the first `len` bytes and
/// the last block (where the backup superblock goes), if any.
fn first_nonzero<D: MetaDevice>(dev: &mut D, len: u64) -> Result<Option<u64>> {
    const STEP: u64 = 1 << 20;
    let size = dev.size()?;
    let end = len.min(size) / BLOCK * BLOCK;
    let mut b = AlignedBuf::new(STEP as usize);
    let mut at = 0;
    while at < end {
        let n = STEP.min(end - at) as usize;
        dev.read_at(&mut b[..n], at)?;
        if let Some(i) = b[..n].iter().position(|&x| x != 0) {
            return Ok(Some(at + i as u64));
        }
        at += n as u64;
    }
    if size >= BLOCK && size / BLOCK * BLOCK - BLOCK >= end {
        let last = size / BLOCK * BLOCK - BLOCK;
        dev.read_at(&mut b[..BLOCK as usize], last)?;
        if let Some(i) = b[..BLOCK as usize].iter().position(|&x| x != 0) {
            return Ok(Some(last + i as u64));
        }
    }
    Ok(None)
}

fn ensure_len<D: MetaDevice>(dev: &mut D, need: u64) -> Result<()> {
    let have = dev.size()?;
    if have >= need {
        return Ok(());
    }
    dev.grow(need).map_err(|e| {
        Error::config(format!(
            "metadata {} is {have} bytes but needs {need} ({e}); use a larger device or a file",
            dev.describe()
        ))
    })
}

/// Where the backup superblock lives: the last block of the file or
/// device, found without knowing the layout.
fn backup_offset<D: MetaDevice>(dev: &mut D) -> io::Result<Option<u64>> {
    let size = dev.size()?;
    Ok((size >= 2 * BLOCK).then(|| size / BLOCK * BLOCK - BLOCK))
}

/// Format's writes. Both superblocks are destroyed first and written last,
/// so an interrupted format leaves no valid-looking volume. Every byte of
/// the metadata area is written (zeros where nothing else goes), so a
/// sparse file gets its blocks now and no later commit meets ENOSPC.
fn write_fresh<D: MetaDevice>(dev: &mut D, sb: &Superblock, vol: &Volume) -> Result<Header> {
    let layout = sb.layout;
    let zero = AlignedBuf::new(1 << 20);
    dev.write_at(&zero[..BLOCK as usize], 0)?;
    if let Some(at) = backup_offset(dev)? {
        dev.write_at(&zero[..BLOCK as usize], at)?;
    }
    dev.flush()?;
    let mut at = BLOCK;
    while at < layout.total_bytes() {
        let n = (zero.len() as u64).min(layout.total_bytes() - at) as usize;
        dev.write_at(&zero[..n], at)?;
        at += n as u64;
    }
    let mut words = vec![0u64; CHUNK_WORDS];
    let mut header = Header {
        generation: 1,
        state: vol.state(),
        operation: vol.operation(),
        selectors: vec![false; layout.pages()],
        ones: vec![false; layout.pages()],
        zeros: vec![false; layout.pages()],
        crcs: vec![0u32; layout.pages()],
    };
    for (t, table) in vol.tables_on_disk().iter().enumerate() {
        for c in 0..table.chunks() {
            if !table.take_dirty_chunk(c, &mut words) {
                table.snapshot_chunk(c, &mut words, true);
            }
            let i = layout.page_index(t, c);
            match PageFill::of(Some(&words)) {
                PageFill::Ones => header.ones[i] = true,
                PageFill::Clear => header.zeros[i] = true,
                PageFill::Mixed => {
                    let page = page_buf(&words);
                    header.crcs[i] = page_crc(&page);
                    dev.write_at(&page, layout.page_offset(i, false))?;
                }
            }
        }
    }
    vol.take_header_dirty();
    dev.flush()?;
    write_header(dev, sb, &header)?;
    dev.flush()?;
    write_superblocks(dev, sb)?;
    Ok(header)
}

/// The backup first, then the primary copy, each flushed: a crash leaves
/// at least one complete copy (or, in `format`, none).
fn write_superblocks<D: MetaDevice>(dev: &mut D, sb: &Superblock) -> io::Result<()> {
    let mut b = AlignedBuf::new(BLOCK as usize);
    sb.encode(&mut b);
    if let Some(at) = backup_offset(dev)? {
        dev.write_at(&b, at)?;
        dev.flush()?;
    }
    dev.write_at(&b, 0)?;
    dev.flush()
}

fn write_header<D: MetaDevice>(dev: &mut D, sb: &Superblock, h: &Header) -> io::Result<()> {
    let (b, at) = encode_header(sb, h);
    dev.write_at(&b, at)
}

fn write_header_durable<D: MetaDevice>(dev: &mut D, sb: &Superblock, h: &Header) -> io::Result<()> {
    let (b, at) = encode_header(sb, h);
    dev.write_at_durable(&b, at)
}

/// The header's bytes and where its generation's slot is.
fn encode_header(sb: &Superblock, h: &Header) -> (AlignedBuf, u64) {
    let mut b = AlignedBuf::new(sb.layout.header_bytes as usize);
    h.encode(&sb.uuid, &mut b);
    (b, sb.layout.header_offset(Header::slot(h.generation)))
}

/// A superblock read from the device, and which copies were good.
struct FoundSuper {
    sb: Superblock,
    primary_ok: bool,
    backup_ok: bool,
}

fn decode_at<D: MetaDevice>(dev: &mut D, at: u64) -> io::Result<Result<Superblock, Bad>> {
    let mut b = AlignedBuf::new(BLOCK as usize);
    dev.read_at(&mut b, at)?;
    Ok(Superblock::decode(&b))
}

/// The superblock at offset 0, or its backup in the last block when the
/// first is damaged (both are written together and never differ).
fn read_superblock<D: MetaDevice>(dev: &mut D) -> Result<FoundSuper> {
    if dev.size()? < BLOCK {
        return Err(not_ours(dev));
    }
    let primary = decode_at(dev, 0)?;
    let backup = match backup_offset(dev)? {
        Some(at) => decode_at(dev, at)?,
        None => Err(Bad::Magic),
    };
    match (primary, backup) {
        (Ok(sb), b) => {
            let backup_ok = b.as_ref().is_ok_and(|b| *b == sb);
            Ok(FoundSuper {
                sb,
                primary_ok: true,
                backup_ok,
            })
        }
        (Err(Bad::Version(v)), _) => Err(Error::config(format!(
            "metadata {} has format version {v}, this splitmirror reads version {}; use a matching splitmirror, or `splitmirror format --force` (the next run then copies every track)",
            dev.describe(),
            super::format::VERSION
        ))),
        (Err(_), Ok(sb)) => {
            log::warn!(
                "metadata {}: the superblock is damaged; using its backup in the last block",
                dev.describe()
            );
            Ok(FoundSuper {
                sb,
                primary_ok: false,
                backup_ok: true,
            })
        }
        (Err(Bad::Magic), Err(_)) => Err(not_ours(dev)),
        (Err(_), Err(_)) => Err(corrupt(dev, "its superblock and its backup are damaged")),
    }
}

/// After a successful open: rewrites a damaged superblock copy from the
/// good one.
fn repair_superblock<D: MetaDevice>(dev: &mut D, found: &FoundSuper) -> Result<()> {
    if found.primary_ok && found.backup_ok {
        return Ok(());
    }
    log::warn!(
        "metadata {}: rewriting the damaged superblock copy",
        dev.describe()
    );
    write_superblocks(dev, &found.sb)?;
    Ok(())
}

fn not_ours<D: MetaDevice>(dev: &D) -> Error {
    Error::config(format!(
        "metadata {} does not hold a splitmirror volume; check the `metadata:` path or run `splitmirror format -c CFG`",
        dev.describe()
    ))
}

fn corrupt<D: MetaDevice>(dev: &D, what: &str) -> Error {
    Error::config(format!(
        "metadata {} is corrupt: {what}; `splitmirror format --force` rebuilds it (the next run copies every track)",
        dev.describe()
    ))
}

/// Refuses metadata made for other devices: identities first (a swapped,
/// renamed or replaced disk), then sizes.
fn check_binding<D: MetaDevice>(dev: &D, found: &Binding, want: &Binding) -> Result<()> {
    let roles = [
        (
            "primary",
            &found.primary_id,
            &want.primary_id,
            &want.primary_path,
        ),
        (
            "secondary",
            &found.secondary_id,
            &want.secondary_id,
            &want.secondary_path,
        ),
    ];
    for (role, recorded, given, path) in roles {
        if super::format::fit_identity(given) == **recorded {
            continue;
        }
        let other = if role == "primary" {
            &found.secondary_id
        } else {
            &found.primary_id
        };
        let hint = if super::format::fit_identity(given) == **other {
            "that is the volume's other device: are primary and secondary swapped in the config?"
                .to_string()
        } else if role == "secondary" {
            "if the secondary was replaced, record the new disk with `splitmirror \
             replace-secondary -c CFG` (then `establish` copies every track)"
                .to_string()
        } else {
            "fix the config's `primary:` path (a renumbered disk? name it by /dev/disk/by-id)"
                .to_string()
        };
        return Err(Error::config(format!(
            "{role} {path} is not the device metadata {} was formatted with: expected \
             {recorded}, found {given}; {hint}",
            dev.describe()
        )));
    }
    let fields = [
        ("volume size", found.volume_size, want.volume_size),
        ("track_size", found.track_size, want.track_size),
        ("primary size", found.primary_size, want.primary_size),
        ("secondary size", found.secondary_size, want.secondary_size),
    ];
    match fields.iter().find(|(_, f, w)| f != w) {
        None => Ok(()),
        Some((name, f, w)) => Err(Error::config(format!(
            "metadata {} was formatted for {name} {f}, the config gives {w}; fix the config's devices or re-run `splitmirror format --force`",
            dev.describe()
        ))),
    }
}

/// The header to trust. The newest valid one, unless the other slot is
/// damaged and may be newer: then there is no safe choice (see the module
/// header) and this is an error. A torn slot (an interrupted, never
/// acknowledged commit) and a damaged slot known to be older are passed
/// over.
fn newest_header<D: MetaDevice>(dev: &mut D, sb: &Superblock) -> Result<Header> {
    let layout = sb.layout;
    let mut b = AlignedBuf::new(layout.header_bytes as usize);
    let mut slots = Vec::with_capacity(2);
    for slot in 0..2 {
        dev.read_at(&mut b, layout.header_offset(slot))?;
        slots.push(match Header::decode(&b, &sb.uuid, layout.pages()) {
            Slot::Valid(h) if Header::slot(h.generation) != slot => Slot::Damaged {
                sector: 0,
                generation: Some(h.generation),
            },
            s => s,
        });
    }
    let best = (0..2)
        .filter_map(|i| match &slots[i] {
            Slot::Valid(h) => Some((i, h.clone())),
            _ => None,
        })
        .max_by_key(|(_, h)| h.generation);
    let Some((at, best)) = best else {
        return Err(corrupt(dev, "both header slots are damaged"));
    };
    let other = 1 - at;
    match &slots[other] {
        Slot::Damaged {
            sector,
            generation: g,
        } if g.is_none_or(|g| g > best.generation) => Err(corrupt(
            dev,
            &format!(
                "header slot {other} is damaged (sector {sector} fails its checksum) and may hold \
                 a newer version than generation {} in slot {at}; the older version is not used, \
                 because pages it references may have been overwritten since",
                best.generation
            ),
        )),
        Slot::Damaged { .. } => {
            log::warn!(
                "metadata {}: header slot {other} (an older version) is damaged; the next commit rewrites it",
                dev.describe()
            );
            Ok(best)
        }
        Slot::Torn => {
            log::info!(
                "metadata {}: header slot {other} holds a commit cut short by a crash (never acknowledged); using generation {}",
                dev.describe(),
                best.generation
            );
            Ok(best)
        }
        Slot::Valid(_) | Slot::Empty => Ok(best),
    }
}

const TABLE_NAMES: [&str; 4] = ["changed", "pending", "stale", "intent"];

fn load_pages<D: MetaDevice>(
    dev: &mut D,
    layout: &Layout,
    header: &Header,
    vol: &Volume,
) -> Result<()> {
    let mut b = AlignedBuf::new(BLOCK as usize);
    let mut words = vec![0u64; CHUNK_WORDS];
    for (t, table) in vol.tables_on_disk().iter().enumerate() {
        for c in 0..table.chunks() {
            let i = layout.page_index(t, c);
            if header.ones[i] {
                table.load_chunk_ones(c);
                continue;
            }
            if header.zeros[i] {
                continue; // a new table is all clear: nothing to read or touch
            }
            let at = layout.page_offset(i, header.selectors[i]);
            dev.read_at(&mut b, at)?;
            if page_crc(&b) != header.crcs[i] {
                return Err(corrupt(
                    dev,
                    &format!(
                        "page {i} (table {}, chunk {c}, copy {} at offset {at}) fails its checksum",
                        TABLE_NAMES.get(t).unwrap_or(&"?"),
                        header.selectors[i] as u8
                    ),
                ));
            }
            decode_page(&b, &mut words);
            table.load_chunk(c, &words);
        }
    }
    Ok(())
}
