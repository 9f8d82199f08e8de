//! Receive offloads that break forwarding of encapsulated traffic through an XDP balancer:
//! LRO merges segments before XDP sees them (and most drivers refuse XDP with it on), GRO
//! (in generic mode, or after XDP_PASS) builds super-packets the encapsulation must not
//! see. Read and changed with the classic SIOCETHTOOL ioctl, which needs no ethtool binary
//! (the agent's image has none).

use std::io;

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GFLAGS: u32 = 0x25;
const ETHTOOL_SFLAGS: u32 = 0x26;
const ETHTOOL_GGRO: u32 = 0x2b;
const ETHTOOL_SGRO: u32 = 0x2c;
const ETH_FLAG_LRO: u32 = 1 << 15;

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: *mut EthtoolValue,
    _pad: [u8; 16],
}

fn ethtool(iface: &str, cmd: u32, data: u32) -> io::Result<u32> {
    if iface.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    let mut value = EthtoolValue { cmd, data };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: &mut value,
        _pad: [0; 16],
    };
    req.name[..iface.len()].copy_from_slice(iface.as_bytes());
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(io::Error::last_os_error());
    }
    let rc = unsafe { libc::ioctl(sock, SIOCETHTOOL as _, &mut req) };
    let err = io::Error::last_os_error();
    unsafe { libc::close(sock) };
    if rc < 0 {
        return Err(err);
    }
    Ok(value.data)
}

/// Receive offloads of an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offloads {
    pub gro: bool,
    pub lro: bool,
}

pub fn read(iface: &str) -> io::Result<Offloads> {
    let gro = ethtool(iface, ETHTOOL_GGRO, 0)? != 0;
    let lro = ethtool(iface, ETHTOOL_GFLAGS, 0)? & ETH_FLAG_LRO != 0;
    Ok(Offloads { gro, lro })
}

/// Turns GRO and LRO off.
pub fn disable(iface: &str) -> io::Result<()> {
    ethtool(iface, ETHTOOL_SGRO, 0)?;
    let flags = ethtool(iface, ETHTOOL_GFLAGS, 0)?;
    if flags & ETH_FLAG_LRO != 0 {
        ethtool(iface, ETHTOOL_SFLAGS, flags & !ETH_FLAG_LRO)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_offloads_can_be_read() {
        // Every Linux host has lo; reading needs no privilege.
        let o = read("lo");
        assert!(o.is_ok(), "{o:?}");
        assert!(read("no-such-iface0").is_err());
    }
}
