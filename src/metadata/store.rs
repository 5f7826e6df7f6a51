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
//!    the header it replaces stays intact, and a torn header fails its
//!    crc32c, so open falls back to the older generation.
//! 4. *Durable before acknowledged.* `clock.finish(seq)` runs only after
//!    the header flush; host writes waiting for that commit are acked then.
//!
//! A failed commit returns the error without finishing its sequence number
//! and marks what it took dirty again, so the next commit carries it. If
//! the failure came after the header write was issued, that header may or
//! may not have landed; the next commit first flushes and re-reads both
//! header slots, so it never overwrites the pages of a header that did.

use super::device::{FileMeta, MetaDevice};
use super::format::{decode_page, encode_page, Bad, Header, Layout, Superblock, BLOCK};
use super::{Binding, DataFlush};
use crate::backend::buf::AlignedBuf;
use crate::core::table::{Taken, CHUNK_WORDS};
use crate::core::{CommitSeq, DevSet, Geometry, Operation, Volume, VolumeState};
use crate::error::{Error, Result};
use std::io;
use std::path::Path;

/// Tables in the order a commit takes them: "pending" before "changed",
/// because a track restored by a host write gets "changed" set before
/// "pending" is cleared, and no commit may record it as neither.
const TAKE_ORDER: [usize; 4] = [1, 0, 2, 3];

pub struct MetadataStore<D: MetaDevice = FileMeta> {
    dev: D,
    sb: Superblock,
    /// The last header known durable.
    current: Header,
    /// A header write failed: whether it landed is unknown.
    uncertain: bool,
}

/// What one commit carries: taken from the volume by
/// [`MetadataStore::begin_commit`], written by [`MetadataStore::write_commit`].
pub struct CommitBatch {
    seq: CommitSeq,
    state: VolumeState,
    operation: Option<Operation>,
    /// (table, chunk, words); no words for a page with every bit set,
    /// which only the header records.
    pages: Vec<(usize, usize, Option<Vec<u64>>)>,
    flush: DevSet,
}

impl CommitBatch {
    pub fn seq(&self) -> CommitSeq {
        self.seq
    }
}

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

impl MetadataStore<FileMeta> {
    /// Writes fresh metadata for `vol`. Refuses valid existing metadata
    /// unless `force`.
    pub fn format(path: &Path, binding: &Binding, vol: &Volume, force: bool) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| cannot_open(path, e))?;
        }
        let dev = FileMeta::open(path, true).map_err(|e| cannot_open(path, e))?;
        Self::format_dev(dev, binding, vol, force)
    }

    /// Loads the metadata and the volume it describes (tables, state, the
    /// running operation).
    pub fn open(path: &Path, binding: &Binding) -> Result<(Self, Volume)> {
        if !path.exists() {
            return Err(Error::config(format!(
                "metadata {} does not exist; run `splitmirror format -c CFG` first",
                path.display()
            )));
        }
        let dev = FileMeta::open(path, false).map_err(|e| cannot_open(path, e))?;
        Self::open_dev(dev, binding)
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
    pub fn format_dev(mut dev: D, binding: &Binding, vol: &Volume, force: bool) -> Result<Self> {
        let geometry = geometry_of(binding)?;
        if geometry != vol.geometry() {
            return Err(Error::config(
                "internal: the volume to format does not match its binding",
            ));
        }
        if !force && holds_volume(&mut dev) {
            return Err(Error::config(format!(
                "metadata {} already holds a valid splitmirror volume; pass --force to overwrite",
                dev.describe()
            )));
        }
        let layout = Layout::new(geometry.tracks(), vol.tables.all().len() as u32);
        ensure_len(&mut dev, layout.total_bytes())?;
        let sb = Superblock {
            uuid: random_uuid(),
            binding: binding.clone(),
            layout,
        };
        let current = write_fresh(&mut dev, &sb, vol)?;
        vol.clock.reset(current.generation);
        Ok(MetadataStore {
            dev,
            sb,
            current,
            uncertain: false,
        })
    }

    /// [`MetadataStore::open`] on any device.
    pub fn open_dev(mut dev: D, binding: &Binding) -> Result<(Self, Volume)> {
        let sb = read_superblock(&mut dev)?;
        check_binding(&dev, &sb.binding, binding)?;
        let layout = sb.layout;
        if dev.size()? < layout.total_bytes() {
            return Err(corrupt(&dev, "it is truncated"));
        }
        let header = newest_header(&mut dev, &sb)?
            .ok_or_else(|| corrupt(&dev, "both header slots are damaged"))?;
        let geometry = geometry_of(binding)?;
        if geometry.tracks() != layout.tracks {
            return Err(corrupt(&dev, "its track count does not match its sizes"));
        }
        let vol = Volume::new(geometry, header.state);
        load_pages(&mut dev, &layout, &header, &vol)?;
        vol.load_header(header.state, header.operation);
        vol.clock.reset(header.generation);
        vol.recover_intents();
        let store = MetadataStore {
            dev,
            sb,
            current: header,
            uncertain: false,
        };
        Ok((store, vol))
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

    /// First half of a commit: numbers it and takes what it will write.
    /// Nothing is written yet; the simulation runs other tasks here.
    pub fn begin_commit(&mut self, vol: &Volume) -> CommitBatch {
        let snapshot = vol.lock_snapshot();
        let seq = vol.clock.begin();
        vol.take_header_dirty();
        let (state, operation) = (vol.state(), vol.operation());
        let tables = vol.tables.all();
        let mut pages = Vec::new();
        let mut words = vec![0u64; CHUNK_WORDS];
        for t in TAKE_ORDER {
            for c in 0..tables[t].chunks() {
                match tables[t].take_dirty_chunk_for(c, &mut words, seq) {
                    Taken::Clean => {}
                    Taken::Ones => pages.push((t, c, None)),
                    Taken::Words => pages.push((t, c, Some(words.clone()))),
                }
            }
        }
        drop(snapshot);
        // After the take (see `Volume::take_flush_set`).
        let flush = vol.take_flush_set().union(vol.commit_flush_set());
        CommitBatch {
            seq,
            state,
            operation,
            pages,
            flush,
        }
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
                vol.clock.finish(batch.seq);
                Ok(())
            }
            Err(e) => {
                requeue(vol, &batch);
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
        let next = self.write_pages(batch)?;
        self.dev.flush()?;
        self.uncertain = true;
        write_header(&mut self.dev, &self.sb, &next)?;
        self.dev.flush()?;
        self.uncertain = false;
        self.current = next;
        Ok(())
    }

    /// Writes each page into the copy the current header does not use;
    /// returns the header that will reference them.
    fn write_pages(&mut self, batch: &CommitBatch) -> io::Result<Header> {
        let layout = self.sb.layout;
        let mut next = Header {
            generation: self.current.generation + 1,
            state: batch.state,
            operation: batch.operation,
            selectors: self.current.selectors.clone(),
            ones: self.current.ones.clone(),
        };
        for (t, c, words) in &batch.pages {
            let i = layout.page_index(*t, *c);
            next.ones[i] = words.is_none();
            let Some(words) = words else { continue };
            // The copy the durable header does not read (with its "all
            // ones" flag set it reads neither, and either copy is free).
            let slot = !self.current.selectors[i];
            self.dev
                .write_at(&page_buf(words), layout.page_offset(i, slot))?;
            next.selectors[i] = slot;
        }
        Ok(next)
    }

    /// After a failed header write: flush, then trust what is on the device.
    fn reload_header(&mut self) -> io::Result<()> {
        self.dev.flush()?;
        let found = newest_header(&mut self.dev, &self.sb).map_err(io::Error::other)?;
        self.current = found.ok_or_else(|| io::Error::other("both metadata headers damaged"))?;
        self.uncertain = false;
        Ok(())
    }
}

/// A failed commit: what it took must be written by the next one.
fn requeue(vol: &Volume, batch: &CommitBatch) {
    let tables = vol.tables.all();
    for (t, c, _) in &batch.pages {
        tables[*t].mark_chunk_dirty(*c);
    }
    vol.mark_header_dirty();
    vol.need_flush(batch.flush);
}

fn holds_volume<D: MetaDevice>(dev: &mut D) -> bool {
    let mut b = AlignedBuf::new(BLOCK as usize);
    dev.size().is_ok_and(|l| l >= BLOCK)
        && dev.read_at(&mut b, 0).is_ok()
        && Superblock::decode(&b).is_ok()
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

/// Format's writes. The old superblock is destroyed first and the new one
/// written last, so an interrupted format leaves no valid-looking volume.
fn write_fresh<D: MetaDevice>(dev: &mut D, sb: &Superblock, vol: &Volume) -> Result<Header> {
    let layout = sb.layout;
    let zero = AlignedBuf::new(layout.header_bytes as usize);
    dev.write_at(&zero[..BLOCK as usize], 0)?;
    dev.flush()?;
    let mut words = vec![0u64; CHUNK_WORDS];
    for (t, table) in vol.tables.all().iter().enumerate() {
        for c in 0..table.chunks() {
            if !table.take_dirty_chunk(c, &mut words) {
                table.snapshot_chunk(c, &mut words, true);
            }
            let i = layout.page_index(t, c);
            dev.write_at(&page_buf(&words), layout.page_offset(i, false))?;
        }
    }
    vol.take_header_dirty();
    let header = Header {
        generation: 1,
        state: vol.state(),
        operation: vol.operation(),
        selectors: vec![false; layout.pages()],
        ones: vec![false; layout.pages()],
    };
    dev.write_at(&zero, layout.header_offset(Header::slot(0)))?;
    dev.flush()?;
    write_header(dev, sb, &header)?;
    dev.flush()?;
    let mut b = AlignedBuf::new(BLOCK as usize);
    sb.encode(&mut b);
    dev.write_at(&b, 0)?;
    dev.flush()?;
    Ok(header)
}

fn write_header<D: MetaDevice>(dev: &mut D, sb: &Superblock, h: &Header) -> io::Result<()> {
    let mut b = AlignedBuf::new(sb.layout.header_bytes as usize);
    h.encode(&sb.uuid, &mut b);
    dev.write_at(&b, sb.layout.header_offset(Header::slot(h.generation)))
}

fn read_superblock<D: MetaDevice>(dev: &mut D) -> Result<Superblock> {
    let mut b = AlignedBuf::new(BLOCK as usize);
    if dev.size()? < BLOCK {
        return Err(not_ours(dev));
    }
    dev.read_at(&mut b, 0)?;
    match Superblock::decode(&b) {
        Ok(sb) => Ok(sb),
        Err(Bad::Magic) => Err(not_ours(dev)),
        Err(Bad::Version(v)) => Err(Error::config(format!(
            "metadata {} has format version {v}, this splitmirror reads version {}; use a matching splitmirror, or `splitmirror format --force` (the next run then copies every track)",
            dev.describe(),
            super::format::VERSION
        ))),
        Err(_) => Err(corrupt(dev, "its superblock is damaged")),
    }
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

fn check_binding<D: MetaDevice>(dev: &D, found: &Binding, want: &Binding) -> Result<()> {
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

/// The valid header with the highest generation, if any.
fn newest_header<D: MetaDevice>(dev: &mut D, sb: &Superblock) -> Result<Option<Header>> {
    let layout = sb.layout;
    let mut best: Option<Header> = None;
    let mut b = AlignedBuf::new(layout.header_bytes as usize);
    for slot in 0..2 {
        dev.read_at(&mut b, layout.header_offset(slot))?;
        if let Ok(h) = Header::decode(&b, &sb.uuid, layout.pages()) {
            if Header::slot(h.generation) == slot
                && best.as_ref().is_none_or(|x| x.generation < h.generation)
            {
                best = Some(h);
            }
        }
    }
    Ok(best)
}

fn load_pages<D: MetaDevice>(
    dev: &mut D,
    layout: &Layout,
    header: &Header,
    vol: &Volume,
) -> Result<()> {
    let mut b = AlignedBuf::new(BLOCK as usize);
    let mut words = vec![0u64; CHUNK_WORDS];
    for (t, table) in vol.tables.all().iter().enumerate() {
        for c in 0..table.chunks() {
            let i = layout.page_index(t, c);
            if header.ones[i] {
                table.load_chunk_ones(c);
                continue;
            }
            dev.read_at(&mut b, layout.page_offset(i, header.selectors[i]))?;
            decode_page(&b, &mut words);
            table.load_chunk(c, &words);
        }
    }
    Ok(())
}
