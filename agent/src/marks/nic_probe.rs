//! What a device can do for hardware flow marks, read with the classic SIOCETHTOOL ioctl in
//! the calling thread's network namespace (sysfs may show another namespace's devices): the
//! driver's name (`ETHTOOL_GDRVINFO`) and whether the `hw-tc-offload` feature is on
//! (`ETHTOOL_GSSET_INFO` + `ETHTOOL_GSTRINGS` find the feature's bit, `ETHTOOL_GFEATURES`
//! reads it); and over devlink the eswitch mode of the device behind it (mlx5 offloads the
//! mark action only in legacy/NIC mode).

use std::{fmt, io};

use crate::{
    ethtool::call as ethtool,
    tc::devlink::{self, EswitchMode},
};

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

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(b[off..off + 4].try_into().expect("4"))
}

/// The driver behind `iface` and its bus address (`struct ethtool_drvinfo`: `driver`,
/// `bus_info`, e.g. "0000:03:00.0"; empty for virtual devices).
pub fn driver_and_bus(iface: &str) -> io::Result<(String, String)> {
    // cmd, driver[32], version[32], fw_version[32], bus_info[32], erom_version[32],
    // reserved2[12], five u32 counts: 196 bytes.
    let mut buf = vec![0u8; 196];
    buf[..4].copy_from_slice(&ETHTOOL_GDRVINFO.to_ne_bytes());
    ethtool(iface, &mut buf)?;
    let text = |b: &[u8]| {
        let b = b.split(|c| *c == 0).next().unwrap_or_default();
        String::from_utf8_lossy(b).into_owned()
    };
    Ok((text(&buf[4..36]), text(&buf[100..132])))
}

/// The driver behind `iface` (`struct ethtool_drvinfo.driver`).
pub fn driver(iface: &str) -> io::Result<String> {
    Ok(driver_and_bus(iface)?.0)
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

/// The device's eswitch as devlink reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Eswitch {
    /// devlink answered (`pci/0000:03:00.0`, the mode).
    Mode { handle: String, mode: EswitchMode },
    /// No answer, and why (no bus device, no devlink family, the device refused).
    Unsupported(String),
}

impl fmt::Display for Eswitch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Eswitch::Mode { handle, mode } => write!(f, "eswitch {mode} ({handle})"),
            Eswitch::Unsupported(why) => write!(f, "eswitch unsupported: {why}"),
        }
    }
}

impl Eswitch {
    /// Asks devlink about the device at `bus_info` (ethtool's bus address of `iface`).
    pub fn probe(iface: &str, bus_info: &str) -> Self {
        let Some((bus, dev)) = devlink::handle_of(bus_info) else {
            return Eswitch::Unsupported(if bus_info.is_empty() {
                format!(
                    "{iface} has no bus device (ethtool reports no bus address), so no devlink instance"
                )
            } else {
                format!("{iface}'s bus address {bus_info:?} names no devlink instance")
            });
        };
        match devlink::eswitch_mode(bus, &dev) {
            Ok(mode) => Eswitch::Mode {
                handle: format!("{bus}/{dev}"),
                mode,
            },
            Err(why) => Eswitch::Unsupported(why),
        }
    }
}

/// What the device offers, and why it cannot carry mlx5 flow-tag rules if it cannot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capability {
    pub driver: String,
    /// `hw-tc-offload` active (None: unknown feature).
    pub hw_tc_offload: Option<bool>,
    pub eswitch: Eswitch,
}

impl Capability {
    pub fn probe(iface: &str) -> io::Result<Self> {
        let (driver, bus_info) = driver_and_bus(iface)?;
        Ok(Self {
            driver,
            hw_tc_offload: feature_active(iface, HW_TC_OFFLOAD)?,
            eswitch: Eswitch::probe(iface, &bus_info),
        })
    }

    /// One line for logs and the status: driver, offload feature, eswitch mode.
    pub fn summary(&self) -> String {
        let offload = match self.hw_tc_offload {
            Some(true) => "on",
            Some(false) => "off",
            None => "absent",
        };
        format!(
            "driver {}, {HW_TC_OFFLOAD} {offload}, {}",
            self.driver, self.eswitch
        )
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
            Some(true) => {}
            Some(false) => {
                return Err(format!(
                    "{HW_TC_OFFLOAD} is off on {iface} (ethtool -K {iface} {HW_TC_OFFLOAD} on)"
                ));
            }
            None => {
                return Err(format!(
                    "the kernel reports no {HW_TC_OFFLOAD} feature for {iface}"
                ));
            }
        }
        match &self.eswitch {
            Eswitch::Mode {
                mode: EswitchMode::Legacy,
                ..
            } => Ok(()),
            Eswitch::Mode { handle, mode } => Err(format!(
                "{iface}'s eswitch is in {mode} mode: mlx5 offloads the mark action only in \
                 legacy (NIC) mode, switchdev sends the uplink's rules to the FDB, which has \
                 no mark (devlink dev eswitch set {handle} mode legacy)"
            )),
            // An mlx5 PF without devlink answers (old kernel, no permission) is in legacy
            // mode unless someone set switchdev: go ahead; a refused rule says the rest.
            Eswitch::Unsupported(why) => {
                tracing::warn!(iface, reason = %why, "eswitch mode unknown; assuming legacy");
                Ok(())
            }
        }
    }
}
