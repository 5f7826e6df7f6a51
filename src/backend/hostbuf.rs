//! Where a host request's bytes are. Usually in this process's memory (the
//! ublk queue's per-tag buffer, which the kernel copies the request into
//! and out of). With ublk zero copy (`UBLK_F_AUTO_BUF_REG`) they stay in the
//! request's own pages: the kernel registers those pages in the queue's
//! io_uring as a fixed buffer, and only fixed-buffer I/O on that ring can
//! reach them. The host path passes these types to [`Backend::read_host`]
//! and [`Backend::write_host`] and never looks at the bytes itself.
//!
//! [`Backend::read_host`]: super::Backend::read_host
//! [`Backend::write_host`]: super::Backend::write_host

use std::ops::Range;

/// `len` bytes at byte `at` of registered buffer `index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fixed {
    pub index: u16,
    pub at: usize,
    pub len: usize,
}

impl Fixed {
    fn part(self, r: Range<usize>) -> Fixed {
        assert!(
            r.start <= r.end && r.end <= self.len,
            "{r:?} outside {self:?}"
        );
        Fixed {
            index: self.index,
            at: self.at + r.start,
            len: r.end - r.start,
        }
    }
}

/// A host write's bytes.
#[derive(Debug, Clone, Copy)]
pub enum HostBytes<'a> {
    Mem(&'a [u8]),
    Fixed(Fixed),
}

/// A host read's destination.
#[derive(Debug)]
pub enum HostBytesMut<'a> {
    Mem(&'a mut [u8]),
    Fixed(Fixed),
}

impl<'a> HostBytes<'a> {
    pub fn len(&self) -> usize {
        match self {
            HostBytes::Mem(m) => m.len(),
            HostBytes::Fixed(f) => f.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes `r` of these.
    pub fn part(&self, r: Range<usize>) -> HostBytes<'a> {
        match *self {
            HostBytes::Mem(m) => HostBytes::Mem(&m[r]),
            HostBytes::Fixed(f) => HostBytes::Fixed(f.part(r)),
        }
    }
}

impl HostBytesMut<'_> {
    pub fn len(&self) -> usize {
        match self {
            HostBytesMut::Mem(m) => m.len(),
            HostBytesMut::Fixed(f) => f.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes `r` of these, borrowed.
    pub fn part(&mut self, r: Range<usize>) -> HostBytesMut<'_> {
        match self {
            HostBytesMut::Mem(m) => HostBytesMut::Mem(&mut m[r]),
            HostBytesMut::Fixed(f) => HostBytesMut::Fixed(f.part(r)),
        }
    }

    /// Puts `data` into these bytes: a copy when they are in memory. A
    /// registered buffer is only reachable by I/O, so `None` then: the
    /// caller must read the bytes in from a device.
    pub fn fill_from(&mut self, data: &[u8]) -> Option<()> {
        match self {
            HostBytesMut::Mem(m) => {
                m.copy_from_slice(data);
                Some(())
            }
            HostBytesMut::Fixed(_) => None,
        }
    }
}

impl<'a> From<&'a [u8]> for HostBytes<'a> {
    fn from(m: &'a [u8]) -> Self {
        HostBytes::Mem(m)
    }
}

impl<'a> From<&'a Vec<u8>> for HostBytes<'a> {
    fn from(m: &'a Vec<u8>) -> Self {
        HostBytes::Mem(m)
    }
}

impl<'a> From<&'a mut [u8]> for HostBytesMut<'a> {
    fn from(m: &'a mut [u8]) -> Self {
        HostBytesMut::Mem(m)
    }
}

impl<'a> From<&'a mut Vec<u8>> for HostBytesMut<'a> {
    fn from(m: &'a mut Vec<u8>) -> Self {
        HostBytesMut::Mem(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_of_a_registered_buffer_keep_its_index_and_move_its_offset() {
        let f = HostBytes::Fixed(Fixed {
            index: 3,
            at: 4096,
            len: 8192,
        });
        let HostBytes::Fixed(p) = f.part(512..4608) else {
            panic!("a part of a fixed buffer is fixed")
        };
        assert_eq!(
            p,
            Fixed {
                index: 3,
                at: 4608,
                len: 4096
            }
        );
        let mut m = HostBytesMut::Fixed(p);
        assert_eq!(m.part(0..512).len(), 512);
        assert!(m.fill_from(&[0; 4096]).is_none(), "only I/O reaches it");
        let mut v = vec![1u8; 8];
        let mut mem = HostBytesMut::from(&mut v);
        mem.part(2..4).fill_from(&[7, 7]).unwrap();
        assert_eq!(v, [1, 1, 7, 7, 1, 1, 1, 1]);
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn a_part_beyond_a_registered_buffer_is_a_bug() {
        HostBytes::Fixed(Fixed {
            index: 0,
            at: 0,
            len: 4096,
        })
        .part(0..8192);
    }
}
