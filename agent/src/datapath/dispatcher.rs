//! Keeping a program in the kernel's XDP dispatcher between test runs.
//!
//! `BPF_PROG_TEST_RUN` of an XDP program puts it into the kernel's XDP dispatcher (the
//! direct-call trampoline every XDP program runs through) for the call and takes it out
//! after. Each change of the dispatcher waits for an RCU grace period
//! (`bpf_dispatcher_change_prog`, `synchronize_rcu`): milliseconds a call on this VM, and
//! most of the benchmark's wall time. A program the dispatcher already holds is only
//! counted again. So the benchmark attaches its wrapper, in generic mode, to the loopback
//! device of a network namespace of its own for as long as it runs: then a call costs its
//! syscall only, which is what lets it time batches of 64 packets between a flood's, and
//! nothing is attached where traffic flows. Dropping the hold detaches the program and
//! lets the namespace go.

use std::{
    ffi::CStr,
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
};

use aya_obj::generated::{XDP_FLAGS_SKB_MODE, bpf_attach_type, bpf_cmd};

use super::{Datapath, DatapathError, Prog, Result};

/// A program held in the XDP dispatcher (see the module comment).
pub struct DispatcherHold {
    link: OwnedFd,
    _netns: OwnedFd,
}

impl DispatcherHold {
    /// Kernel ids of the hold's XDP link and of the program it holds.
    pub fn link_ids(&self) -> io::Result<(u32, u32)> {
        crate::xdp_link::link_ids(self.link.as_fd())
    }
}

/// `union bpf_attr` for `BPF_LINK_CREATE` (the members an XDP link reads, then zeroes).
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    _zero: [u64; 4],
}

impl Datapath {
    /// Holds `prog` in the XDP dispatcher until the returned hold is dropped.
    pub fn hold_in_xdp_dispatcher(&mut self, prog: Prog) -> Result<DispatcherHold> {
        let fd = self.program_fd(prog)?;
        // A thread of its own: unsharing the network namespace moves the calling thread.
        std::thread::spawn(move || attach_in_own_netns(&fd))
            .join()
            .map_err(|_| DatapathError::Io(io::Error::other("the attaching thread panicked")))?
            .map_err(DatapathError::Io)
    }
}

/// Moves this thread into a new network namespace and attaches `prog` to its loopback
/// device in generic mode; the namespace lives on through the descriptor returned.
fn attach_in_own_netns(prog: &OwnedFd) -> io::Result<DispatcherHold> {
    // SAFETY: plain syscalls on this thread; every result is checked.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNET) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let netns = std::fs::File::open("/proc/thread-self/ns/net")?.into();
    let lo: &CStr = c"lo";
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(lo.as_ptr()) };
    if ifindex == 0 {
        return Err(io::Error::last_os_error());
    }
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: bpf_attach_type::BPF_XDP as u32,
        flags: XDP_FLAGS_SKB_MODE,
        ..Default::default()
    };
    let fd = crate::xdp_link::bpf(bpf_cmd::BPF_LINK_CREATE as libc::c_int, &mut attr)?;
    // SAFETY: BPF_LINK_CREATE returned a new descriptor that nothing else owns.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    Ok(DispatcherHold {
        link,
        _netns: netns,
    })
}
