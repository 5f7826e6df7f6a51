//! Buffers for direct I/O: 4096-aligned, from the heap, lent by a backend's
//! registered pool, or recycled by a [`BufCache`].

/// A buffer aligned to 4096 bytes, for O_DIRECT: from the heap, or lent by
/// a backend's registered pool (and given back to it on drop).
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    lender: Option<std::sync::Arc<dyn Lender>>,
}

/// Where a lent [`AlignedBuf`] goes back to when dropped.
pub trait Lender: Send + Sync {
    fn give_back(&self, ptr: std::ptr::NonNull<u8>, len: usize);
}

// SAFETY: AlignedBuf owns its allocation (or its lent region) exclusively,
// like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    pub const ALIGN: usize = 4096;

    fn layout(len: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(len.max(1), Self::ALIGN).expect("buffer layout")
    }

    pub fn new(len: usize) -> Self {
        // SAFETY: the layout has non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(Self::layout(len)) };
        let ptr = std::ptr::NonNull::new(raw)
            .unwrap_or_else(|| std::alloc::handle_alloc_error(Self::layout(len)));
        AlignedBuf {
            ptr,
            len,
            lender: None,
        }
    }

    /// A buffer over `len` bytes at `ptr` that `lender` owns.
    ///
    /// # Safety
    /// `ptr` must be 4096-aligned and valid for `len` bytes, used by nothing
    /// else until `lender.give_back(ptr, len)`.
    pub unsafe fn lent(
        ptr: std::ptr::NonNull<u8>,
        len: usize,
        lender: std::sync::Arc<dyn Lender>,
    ) -> Self {
        AlignedBuf {
            ptr,
            len,
            lender: Some(lender),
        }
    }
}

impl AlignedBuf {
    /// Gives up ownership of a heap buffer (from `new`) without freeing it.
    fn into_raw(self) -> std::ptr::NonNull<u8> {
        debug_assert!(self.lender.is_none());
        let me = std::mem::ManuallyDrop::new(self);
        me.ptr
    }

    /// Frees a buffer from `new`/`into_raw`.
    ///
    /// # Safety
    /// `ptr` must come from `AlignedBuf::new(len)` and be unused.
    unsafe fn dealloc(ptr: std::ptr::NonNull<u8>, len: usize) {
        std::alloc::dealloc(ptr.as_ptr(), Self::layout(len))
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        match self.lender.take() {
            Some(l) => l.give_back(self.ptr, self.len),
            // SAFETY: allocated in `new` with the same layout.
            None => unsafe { Self::dealloc(self.ptr, self.len) },
        }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes for the buffer's lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

/// Recycles track-sized buffers for a backend without a registered pool
/// (a ublk queue's merges). A fresh 128 KiB heap buffer is an mmap, page
/// faults and an munmap with its TLB shootdown; in the VM profile of
/// host writes during a restore that was a quarter of the queue thread's
/// CPU.
pub struct BufCache {
    len: usize,
    keep: usize,
    free: std::sync::Mutex<Vec<FreeBuf>>,
}

/// A buffer in the cache: owned by it alone.
struct FreeBuf(std::ptr::NonNull<u8>);

// SAFETY: a cached buffer is plain memory that nobody else references.
unsafe impl Send for FreeBuf {}

impl BufCache {
    /// Caches up to `keep` buffers of `len` bytes.
    pub fn new(len: usize, keep: usize) -> std::sync::Arc<Self> {
        std::sync::Arc::new(BufCache {
            len,
            keep,
            free: std::sync::Mutex::new(Vec::new()),
        })
    }

    fn free(&self) -> std::sync::MutexGuard<'_, Vec<FreeBuf>> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A buffer of `len` bytes: a cached one if `len` is the cache's size.
    pub fn get(self: &std::sync::Arc<Self>, len: usize) -> AlignedBuf {
        if len != self.len {
            return AlignedBuf::new(len);
        }
        let ptr = match self.free().pop() {
            Some(FreeBuf(p)) => p,
            None => AlignedBuf::new(len).into_raw(),
        };
        // SAFETY: `ptr` is an aligned allocation of `len` bytes (from
        // `AlignedBuf::new`) that only the cache held.
        unsafe { AlignedBuf::lent(ptr, len, self.clone()) }
    }
}

impl Lender for BufCache {
    fn give_back(&self, ptr: std::ptr::NonNull<u8>, len: usize) {
        let mut free = self.free();
        if free.len() < self.keep {
            free.push(FreeBuf(ptr));
        } else {
            drop(free);
            // SAFETY: allocated by `AlignedBuf::new` with this length.
            unsafe { AlignedBuf::dealloc(ptr, len) }
        }
    }
}

impl Drop for BufCache {
    fn drop(&mut self) {
        for FreeBuf(p) in self.free().drain(..) {
            // SAFETY: as in `give_back`.
            unsafe { AlignedBuf::dealloc(p, self.len) }
        }
    }
}

/// Track buffers that are also ranges of one memfd, mapped shared: with
/// zero copy a merge cannot copy the host's bytes (pages registered in the
/// queue's ring, reachable only by fixed-buffer I/O) into a heap buffer,
/// but a fixed-buffer write to the memfd puts them into these pages. The
/// merged track then goes to the device as one write, as without zero
/// copy, instead of three.
pub struct FileBufs {
    fd: std::os::fd::OwnedFd,
    base: std::ptr::NonNull<u8>,
    len: usize,
    slots: usize,
    free: std::sync::Mutex<Vec<usize>>,
}

// SAFETY: the mapping lives as long as the FileBufs; each slot is lent to
// one AlignedBuf at a time (the free list), like BufCache's buffers.
unsafe impl Send for FileBufs {}
unsafe impl Sync for FileBufs {}

impl FileBufs {
    /// `slots` buffers of `len` bytes (a multiple of the page size).
    pub fn new(len: usize, slots: usize) -> std::io::Result<std::sync::Arc<Self>> {
        use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
        use std::os::fd::AsRawFd;
        assert!(len.is_multiple_of(AlignedBuf::ALIGN) && slots > 0);
        let fd = memfd_create(c"splitmirror-merge", MemFdCreateFlag::MFD_CLOEXEC)?;
        let size = len * slots;
        nix::unistd::ftruncate(&fd, size as libc::off_t)?;
        // SAFETY: a fresh shared mapping of the whole memfd; unmapped on drop.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let base = std::ptr::NonNull::new(raw.cast()).expect("mmap returned null");
        Ok(std::sync::Arc::new(FileBufs {
            fd,
            base,
            len,
            slots,
            free: std::sync::Mutex::new((0..slots).rev().collect()),
        }))
    }

    fn free(&self) -> std::sync::MutexGuard<'_, Vec<usize>> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A free buffer of the slot size, if `len` is that and one is free.
    pub fn get(self: &std::sync::Arc<Self>, len: usize) -> Option<AlignedBuf> {
        if len != self.len {
            return None;
        }
        let slot = self.free().pop()?;
        // SAFETY: slot < slots, so the range is inside the mapping,
        // page-aligned, and lent to nobody else until given back.
        unsafe {
            let ptr = std::ptr::NonNull::new_unchecked(self.base.as_ptr().add(slot * self.len));
            Some(AlignedBuf::lent(ptr, self.len, self.clone()))
        }
    }

    /// The memfd offset of `buf[at]`, if `buf` is one of these buffers.
    pub fn file_offset(&self, buf: &AlignedBuf, at: usize) -> Option<u64> {
        let start = self.base.as_ptr() as usize;
        let p = buf.as_ptr() as usize;
        let size = self.len * self.slots;
        (p >= start && p < start + size && at <= buf.len()).then(|| (p - start + at) as u64)
    }

    /// The memfd, for I/O into the buffers.
    pub fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.fd.as_raw_fd()
    }
}

impl Lender for FileBufs {
    fn give_back(&self, ptr: std::ptr::NonNull<u8>, _len: usize) {
        let slot = (ptr.as_ptr() as usize - self.base.as_ptr() as usize) / self.len;
        self.free().push(slot);
    }
}

impl Drop for FileBufs {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; no buffer outlives its lender.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len * self.slots) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_buffers_are_ranges_of_their_memfd() {
        use std::os::unix::fs::FileExt;
        let bufs = FileBufs::new(8192, 2).unwrap();
        let mut a = bufs.get(8192).unwrap();
        let b = bufs.get(8192).unwrap();
        assert!(bufs.get(8192).is_none(), "two slots");
        assert!(bufs.get(4096).is_none(), "one size");
        assert_eq!(a.as_ptr() as usize % AlignedBuf::ALIGN, 0);
        let at = bufs.file_offset(&a, 100).unwrap();
        assert_ne!(bufs.file_offset(&b, 100), Some(at));
        assert_eq!(bufs.file_offset(&AlignedBuf::new(8192), 0), None);
        // What goes into the memfd at that offset is in the buffer.
        let file = std::fs::File::from(bufs.fd.try_clone().unwrap());
        file.write_all_at(b"host", at).unwrap();
        assert_eq!(&a[100..104], b"host");
        a[0] = 7;
        let mut one = [0u8];
        file.read_exact_at(&mut one, at - 100).unwrap();
        assert_eq!(one[0], 7);
        drop(a);
        assert!(bufs.get(8192).is_some(), "given back");
    }

    #[test]
    fn the_buffer_cache_reuses_track_buffers_and_keeps_only_so_many() {
        let cache = BufCache::new(8192, 1);
        let a = cache.get(8192);
        let first = a.as_ptr();
        assert_eq!(first as usize % AlignedBuf::ALIGN, 0);
        drop(a);
        let b = cache.get(8192);
        assert_eq!(b.as_ptr(), first, "the freed buffer comes back");
        let c = cache.get(8192);
        assert_ne!(c.as_ptr(), first);
        drop(b);
        drop(c); // beyond `keep`: freed
        assert_eq!(cache.free().len(), 1);
        let other = cache.get(4096);
        assert_eq!(other.len(), 4096, "other sizes come from the heap");
    }
}
