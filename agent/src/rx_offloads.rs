//! Receive offloads that break forwarding of encapsulated traffic through an XDP balancer:
//! LRO merges segments before XDP sees them (and most drivers refuse XDP with it on), GRO
//! (in generic mode, or after XDP_PASS) builds super-packets the encapsulation must not
//! see. Read and changed with the classic SIOCETHTOOL ioctl, which needs no ethtool binary
//! (the agent's image has none).

use std::io;

use crate::ethtool::value as ethtool;

const ETHTOOL_GFLAGS: u32 = 0x25;
const ETHTOOL_SFLAGS: u32 = 0x26;
const ETHTOOL_GGRO: u32 = 0x2b;
const ETHTOOL_SGRO: u32 = 0x2c;
const ETH_FLAG_LRO: u32 = 1 << 15;

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
