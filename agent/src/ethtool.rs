//! The classic SIOCETHTOOL ioctl, in the calling thread's network namespace: no ethtool binary
//! needed (the agent's image has none). Used for receive offloads and for what a NIC can do
//! for hardware flow marks.

use std::io;

const SIOCETHTOOL: libc::c_ulong = 0x8946;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: *mut u8,
    _pad: [u8; 16],
}

/// One SIOCETHTOOL call on `iface` with `buf` (starting with the command, as large as the
/// command's structure) as its data; the kernel's answer is written into `buf`.
pub(crate) fn call(iface: &str, buf: &mut [u8]) -> io::Result<()> {
    if iface.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: buf.as_mut_ptr(),
        _pad: [0; 16],
    };
    req.name[..iface.len()].copy_from_slice(iface.as_bytes());
    // SAFETY: a plain datagram socket for the ioctl, closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `req` points at `buf`, which is as large as the command's structure.
    let rc = unsafe { libc::ioctl(sock, SIOCETHTOOL as _, &mut req) };
    let err = io::Error::last_os_error();
    // SAFETY: `sock` is ours and closed once.
    unsafe { libc::close(sock) };
    if rc < 0 {
        return Err(err);
    }
    Ok(())
}

/// A command whose structure is `struct ethtool_value` (`cmd`, `data`): returns `data`.
pub(crate) fn value(iface: &str, cmd: u32, data: u32) -> io::Result<u32> {
    let mut buf = [0u8; 8];
    buf[..4].copy_from_slice(&cmd.to_ne_bytes());
    buf[4..].copy_from_slice(&data.to_ne_bytes());
    call(iface, &mut buf)?;
    Ok(u32::from_ne_bytes(buf[4..].try_into().expect("4 bytes")))
}
