//! What a device can do for hardware flow marks, read with the classic SIOCETHTOOL ioctl in
//! the calling thread's network namespace (sysfs may show another namespace's devices): the
//! driver's name (`ETHTOOL_GDRVINFO`) and whether the `hw-tc-offload` feature is on
//! (`ETHTOOL_GSSET_INFO` + `ETHTOOL_GSTRINGS` find the feature's bit, `ETHTOOL_GFEATURES`
//! reads it).

use std::io;

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GDRVINFO: u32 = 0x03;
const ETHTOOL_GSTRINGS: u32 = 0x1b;
const ETHTOOL_GSSET_INFO: u32 = 0x37;
const ETHTOOL_GFEATURES: u32 = 0x3a;
const ETH_SS_FEATURES: u32 = 4;
const ETH_GSTRING_LEN: usize = 32;

/// The driver mlx5 NICs (ConnectX-4 and later) use.
pub const MLX5_DRIVER: &str = "mlx5_core";
/// The feature `ethtool -K DEV hw-tc-offload on` turns on.
pub const HW_TC_OFFLOAD: &str = "hw-tc-offload";

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: *mut u8,
    _pad: [u8; 16],
}

/// One SIOCETHTOOL call with `buf` (starting with the command) as its data.
fn ethtool(iface: &str, buf: &mut [u8]) -> io::Result<()> {
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
    unsafe { libc::close(sock) };
    if rc < 0 {
        return Err(err);
    }
    Ok(())
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(b[off..off + 4].try_into().expect("4"))
}

/// The driver behind `iface` (`struct ethtool_drvinfo.driver`).
pub fn driver(iface: &str) -> io::Result<String> {
    // cmd, driver[32], version[32], fw_version[32], bus_info[32], erom_version[32],
    // reserved2[12], five u32 counts: 196 bytes.
    let mut buf = vec![0u8; 196];
    buf[..4].copy_from_slice(&ETHTOOL_GDRVINFO.to_ne_bytes());
    ethtool(iface, &mut buf)?;
    let name = &buf[4..36];
    let name = name.split(|b| *b == 0).next().unwrap_or_default();
    Ok(String::from_utf8_lossy(name).into_owned())
}

/// Whether the feature `name` is active on `iface` (None: the kernel has no such feature).
pub fn feature_active(iface: &str, name: &str) -> io::Result<Option<bool>> {
    // struct ethtool_sset_info { cmd, reserved, u64 sset_mask, u32 data[] }.
    let mut info = vec![0u8; 16 + 4];
    info[..4].copy_from_slice(&ETHTOOL_GSSET_INFO.to_ne_bytes());
    info[8..16].copy_from_slice(&(1u64 << ETH_SS_FEATURES).to_ne_bytes());
    ethtool(iface, &mut info)?;
    let count = u32_at(&info, 16) as usize;
    // struct ethtool_gstrings { cmd, string_set, len, u8 data[] }.
    let mut strings = vec![0u8; 12 + count * ETH_GSTRING_LEN];
    strings[..4].copy_from_slice(&ETHTOOL_GSTRINGS.to_ne_bytes());
    strings[4..8].copy_from_slice(&ETH_SS_FEATURES.to_ne_bytes());
    strings[8..12].copy_from_slice(&(count as u32).to_ne_bytes());
    ethtool(iface, &mut strings)?;
    let Some(bit) = (0..count).find(|i| {
        let s = &strings[12 + i * ETH_GSTRING_LEN..12 + (i + 1) * ETH_GSTRING_LEN];
        s.split(|b| *b == 0).next() == Some(name.as_bytes())
    }) else {
        return Ok(None);
    };
    // struct ethtool_gfeatures { cmd, size, { available, requested, active,
    // never_changed }[size] }.
    let blocks = count.div_ceil(32);
    let mut feats = vec![0u8; 8 + blocks * 16];
    feats[..4].copy_from_slice(&ETHTOOL_GFEATURES.to_ne_bytes());
    feats[4..8].copy_from_slice(&(blocks as u32).to_ne_bytes());
    ethtool(iface, &mut feats)?;
    let active = u32_at(&feats, 8 + (bit / 32) * 16 + 8);
    Ok(Some(active & (1 << (bit % 32)) != 0))
}

/// What the device offers, and why it cannot carry mlx5 flow-tag rules if it cannot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capability {
    pub driver: String,
    /// `hw-tc-offload` active (None: unknown feature).
    pub hw_tc_offload: Option<bool>,
}

impl Capability {
    pub fn probe(iface: &str) -> io::Result<Self> {
        Ok(Self {
            driver: driver(iface)?,
            hw_tc_offload: feature_active(iface, HW_TC_OFFLOAD)?,
        })
    }

    /// `Ok` if tc flower rules with a mark action can be offloaded, else the reason.
    pub fn check(&self, iface: &str) -> Result<(), String> {
        if self.driver != MLX5_DRIVER {
            return Err(format!(
                "{iface} is driven by {:?}, not {MLX5_DRIVER} (a Mellanox/NVIDIA ConnectX NIC)",
                self.driver
            ));
        }
        match self.hw_tc_offload {
            Some(true) => Ok(()),
            Some(false) => Err(format!(
                "{HW_TC_OFFLOAD} is off on {iface} (ethtool -K {iface} {HW_TC_OFFLOAD} on)"
            )),
            None => Err(format!(
                "the kernel reports no {HW_TC_OFFLOAD} feature for {iface}"
            )),
        }
    }
}
