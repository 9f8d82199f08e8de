//! Direct writes into the Maglev ring storage through mmap (the array is created with
//! `BPF_F_MMAPABLE`): a 65,537-entry ring is one memcpy instead of 65,537 syscalls.

use std::os::fd::AsFd;

use super::{DatapathError, Result, mapping::Mapping};

/// A shared, writable mapping of the `RINGS` array.
pub struct RingStore {
    /// Written through &mut self only.
    map: Mapping,
    len: usize,
}

impl RingStore {
    pub(crate) fn map(fd: &impl AsFd, entries: u32) -> Result<Self> {
        let map = Mapping::new(fd, entries as usize * 4, true)?;
        Ok(Self {
            map,
            len: entries as usize,
        })
    }

    pub fn capacity(&self) -> u32 {
        self.len as u32
    }

    /// Writes `ring` at `offset`. The region must not be live (not referenced by a VIP).
    pub fn write(&mut self, offset: u32, ring: &[u32]) -> Result<()> {
        let end = offset as usize + ring.len();
        if end > self.len {
            return Err(DatapathError::Capacity(format!(
                "ring region {offset}..{end} exceeds the ring storage ({} entries)",
                self.len
            )));
        }
        let dst = unsafe {
            std::slice::from_raw_parts_mut(self.map.base::<u32>().add(offset as usize), ring.len())
        };
        dst.copy_from_slice(ring);
        // Make the ring visible before the VIP entry that points at it (the map update
        // that follows is a syscall, itself a full barrier; this keeps the order explicit).
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    pub fn read(&self, offset: u32, len: u32) -> Vec<u32> {
        let end = (offset as usize + len as usize).min(self.len);
        let start = (offset as usize).min(end);
        unsafe { std::slice::from_raw_parts(self.map.base::<u32>().add(start), end - start) }
            .to_vec()
    }
}
