//! A shared mapping of a `BPF_F_MMAPABLE` array map (the Maglev ring storage, the
//! connection table), unmapped when dropped.

use std::os::fd::{AsFd, AsRawFd};

use super::{DatapathError, Result};

pub(crate) struct Mapping {
    ptr: *mut u8,
    bytes: usize,
}

// Plain shared memory: its owners hand out access through &self / &mut self.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the first `len` bytes (rounded up to whole pages) of the map behind `fd`.
    pub(crate) fn new(fd: &impl AsFd, len: usize, writable: bool) -> Result<Self> {
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let bytes = len.div_ceil(page) * page;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                prot,
                libc::MAP_SHARED,
                fd.as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DatapathError::Mmap(std::io::Error::last_os_error()));
        }
        Ok(Self {
            ptr: ptr.cast(),
            bytes,
        })
    }

    /// The mapping's start, as an array of `T`.
    pub(crate) fn base<T>(&self) -> *mut T {
        self.ptr.cast()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        unsafe { libc::munmap(self.ptr.cast(), self.bytes) };
    }
}
