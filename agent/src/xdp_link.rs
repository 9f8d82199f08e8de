//! The running agent's own handle on its XDP link.
//!
//! A bpf_link stays attached while anything refers to it: its pin in bpffs, or an open
//! descriptor. The pin is what lets a restarted agent adopt the datapath; the descriptor
//! held here is what keeps the datapath attached while this agent runs, whatever happens to
//! the pin (bpffs unmounted, files removed). With its own descriptor the agent can also pin
//! the link again, and detach it for good on `--remove-on-exit`.
//!
//! aya's `FdLink` neither lends its descriptor nor pins without being consumed, and opening a
//! link by id (`BPF_LINK_GET_FD_BY_ID`) needs CAP_SYS_ADMIN, which the agent's pod does not
//! have (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON only). So the descriptor is taken from the pin
//! (`BPF_OBJ_GET`: bpffs file permissions only) right after aya pinned the link, and the pin
//! and detach commands used here are issued directly.

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

use aya::programs::links::FdLink;

/// `enum bpf_cmd` values (include/uapi/linux/bpf.h).
const BPF_OBJ_PIN: libc::c_int = 6;
const BPF_OBJ_GET: libc::c_int = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_int = 15;
const BPF_LINK_DETACH: libc::c_int = 34;

/// `union bpf_attr` for `BPF_OBJ_PIN` and `BPF_OBJ_GET`. Every byte passed must be
/// initialised (the kernel refuses non-zero bytes after the fields a command uses), hence
/// the explicit tail instead of padding.
#[repr(C)]
#[derive(Default)]
struct ObjPinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _zero: u32,
}

/// `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The head of `struct bpf_link_info`, with room for the per-type union the kernel fills.
#[repr(C)]
#[derive(Default)]
struct LinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _rest: [u32; 13],
}

/// Kernel ids of the link pinned at `path` and of its program (0: detached). Reads only.
pub fn pinned_link_ids(path: &Path) -> io::Result<(u32, u32)> {
    link_ids(obj_get(path)?.as_fd())
}

/// Kernel ids of the link `fd` and of its program (0: detached).
pub fn link_ids(fd: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    let mut info = LinkInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<LinkInfo>() as u32,
        info: (&mut info as *mut LinkInfo) as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok((info.id, info.prog_id))
}

/// `union bpf_attr` for `BPF_LINK_DETACH`.
#[repr(C)]
#[derive(Default)]
struct LinkDetachAttr {
    link_fd: u32,
}

pub(crate) fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised `bpf_attr` prefix of the size passed; the kernel
    // reads (and zero-extends) at most that many bytes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            (attr as *mut T).cast::<libc::c_void>(),
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

pub(crate) fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Pins a BPF object (here: the link) at `path` on a bpffs.
pub(crate) fn pin_object(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = c_path(path)?;
    let mut attr = ObjPinAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// Opens the BPF object pinned at `path`.
pub(crate) fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = c_path(path)?;
    let mut attr = ObjPinAttr {
        pathname: c.as_ptr() as u64,
        ..Default::default()
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// Detaches the bpf_link pinned at `path` from its target now, whoever else holds it (a
/// running agent's descriptor included); the pin is left as it is.
pub fn detach_pinned(path: &Path) -> io::Result<()> {
    detach_link(obj_get(path)?.as_fd())
}

/// Detaches a bpf_link from its target now, whoever else holds it (pins and descriptors
/// then refer to a defunct link).
fn detach_link(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkDetachAttr {
        link_fd: fd.as_raw_fd() as u32,
    };
    bpf(BPF_LINK_DETACH, &mut attr).map(drop)
}

/// The agent's descriptor of its XDP link.
#[derive(Debug)]
pub struct KeptLink {
    fd: OwnedFd,
    /// Kernel id of the link.
    pub link_id: u32,
}

impl KeptLink {
    /// Pins the freshly attached `link` at `path` (the parent must exist on a bpffs) and keeps
    /// a descriptor of its own, opened from that pin. Should pinning fail, `link` is closed
    /// and the program detached: an agent that cannot pin could not be restarted without a
    /// gap, so it reports the error instead of running unpinned.
    pub fn pin_new(link: FdLink, path: &Path) -> io::Result<Self> {
        let link_id = link.info().map_err(io::Error::other)?.id();
        let pinned = link.pin(path).map_err(io::Error::other)?;
        let kept = Self::open_pinned(path, link_id);
        drop(pinned);
        kept
    }

    /// A descriptor of its own for the link pinned at `path` (an adopted link), whose
    /// kernel id is `link_id`.
    pub fn open_pinned(path: &Path, link_id: u32) -> io::Result<Self> {
        Ok(Self {
            fd: obj_get(path)?,
            link_id,
        })
    }

    /// Pins the link at `path` (the parent must exist on a bpffs).
    pub fn pin(&self, path: &Path) -> io::Result<()> {
        pin_object(self.fd.as_fd(), path)
    }

    /// Detaches the program from the interface for good.
    pub fn detach(self) -> io::Result<()> {
        detach_link(self.fd.as_fd())
    }
}
