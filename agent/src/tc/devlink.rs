//! The eswitch mode of a NIC, asked over devlink (generic netlink family "devlink",
//! `DEVLINK_CMD_ESWITCH_GET`), as `devlink dev eswitch show pci/0000:03:00.0` does.
//!
//! Why it matters: mlx5 offloads a tc rule on the uplink into the NIC steering tables in
//! legacy (NIC) mode, where the mark action (FLOW_ACTION_MARK) is supported; in switchdev
//! mode the uplink's rules go to the FDB, whose action table has no mark, and the driver
//! refuses every marklb rule.
//!
//! netlink-packet-generic gives the genl header and the controller (family id by name);
//! it has no devlink messages, so the few attributes used are here.

use std::fmt;

use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, NLM_F_ACK, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, Nla, NlaBuffer, NlasIterator, Parseable, ParseableParametrized,
};
use netlink_packet_generic::{
    GenlFamily, GenlHeader, GenlMessage,
    ctrl::{GenlCtrl, GenlCtrlCmd, nlas::GenlCtrlAttrs},
};

use super::{TcError, TcSocket};

/// `DEVLINK_CMD_ESWITCH_GET` (uapi `enum devlink_command`).
pub const DEVLINK_CMD_ESWITCH_GET: u8 = 29;
/// `DEVLINK_GENL_VERSION`.
const DEVLINK_GENL_VERSION: u8 = 1;
const DEVLINK_ATTR_BUS_NAME: u16 = 1;
const DEVLINK_ATTR_DEV_NAME: u16 = 2;
const DEVLINK_ATTR_ESWITCH_MODE: u16 = 25;
const DEVLINK_ATTR_ESWITCH_INLINE_MODE: u16 = 26;
/// `DEVLINK_ESWITCH_MODE_*`.
const MODE_LEGACY: u16 = 0;
const MODE_SWITCHDEV: u16 = 1;

/// The eswitch mode devlink reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EswitchMode {
    /// NIC mode: tc rules on the uplink go to the NIC tables; the mark action offloads.
    Legacy,
    /// The uplink is a representor; its tc rules go to the FDB, which has no mark action.
    Switchdev,
    /// A value this code does not know.
    Other(u16),
}

impl fmt::Display for EswitchMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EswitchMode::Legacy => f.write_str("legacy"),
            EswitchMode::Switchdev => f.write_str("switchdev"),
            EswitchMode::Other(v) => write!(f, "unknown ({v})"),
        }
    }
}

/// One devlink attribute.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DevlinkAttr {
    BusName(String),
    DevName(String),
    EswitchMode(u16),
    EswitchInlineMode(u8),
    Other(DefaultNla),
}

impl Nla for DevlinkAttr {
    fn value_len(&self) -> usize {
        match self {
            DevlinkAttr::BusName(s) | DevlinkAttr::DevName(s) => s.len() + 1,
            DevlinkAttr::EswitchMode(_) => 2,
            DevlinkAttr::EswitchInlineMode(_) => 1,
            DevlinkAttr::Other(n) => n.value_len(),
        }
    }
    fn kind(&self) -> u16 {
        match self {
            DevlinkAttr::BusName(_) => DEVLINK_ATTR_BUS_NAME,
            DevlinkAttr::DevName(_) => DEVLINK_ATTR_DEV_NAME,
            DevlinkAttr::EswitchMode(_) => DEVLINK_ATTR_ESWITCH_MODE,
            DevlinkAttr::EswitchInlineMode(_) => DEVLINK_ATTR_ESWITCH_INLINE_MODE,
            DevlinkAttr::Other(n) => n.kind(),
        }
    }
    fn emit_value(&self, buf: &mut [u8]) {
        match self {
            DevlinkAttr::BusName(s) | DevlinkAttr::DevName(s) => {
                buf[..s.len()].copy_from_slice(s.as_bytes());
                buf[s.len()] = 0;
            }
            DevlinkAttr::EswitchMode(v) => buf.copy_from_slice(&v.to_ne_bytes()),
            DevlinkAttr::EswitchInlineMode(v) => buf[0] = *v,
            DevlinkAttr::Other(n) => n.emit_value(buf),
        }
    }
}

fn c_string(b: &[u8]) -> String {
    String::from_utf8_lossy(b.split(|c| *c == 0).next().unwrap_or_default()).into_owned()
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for DevlinkAttr {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let v = buf.value();
        Ok(match buf.kind() {
            DEVLINK_ATTR_BUS_NAME => DevlinkAttr::BusName(c_string(v)),
            DEVLINK_ATTR_DEV_NAME => DevlinkAttr::DevName(c_string(v)),
            DEVLINK_ATTR_ESWITCH_MODE if v.len() >= 2 => {
                DevlinkAttr::EswitchMode(u16::from_ne_bytes([v[0], v[1]]))
            }
            DEVLINK_ATTR_ESWITCH_INLINE_MODE if !v.is_empty() => {
                DevlinkAttr::EswitchInlineMode(v[0])
            }
            _ => DevlinkAttr::Other(DefaultNla::parse(buf)?),
        })
    }
}

/// A devlink message: a command and its attributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Devlink {
    pub cmd: u8,
    pub attrs: Vec<DevlinkAttr>,
}

impl GenlFamily for Devlink {
    fn family_name() -> &'static str {
        "devlink"
    }
    fn command(&self) -> u8 {
        self.cmd
    }
    fn version(&self) -> u8 {
        DEVLINK_GENL_VERSION
    }
}

impl Emitable for Devlink {
    fn buffer_len(&self) -> usize {
        self.attrs.as_slice().buffer_len()
    }
    fn emit(&self, buffer: &mut [u8]) {
        self.attrs.as_slice().emit(buffer)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for Devlink {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        let attrs = NlasIterator::new(buf)
            .map(|nla| nla.and_then(|nla| DevlinkAttr::parse(&nla)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            cmd: header.cmd,
            attrs,
        })
    }
}

fn encode<F>(seq: u32, family_id: u16, payload: F) -> Vec<u8>
where
    F: GenlFamily + Emitable + std::fmt::Debug,
{
    let mut genl = GenlMessage::from_payload(payload);
    genl.set_resolved_family_id(family_id);
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    header.sequence_number = seq;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(genl));
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}

/// `GENL_ID_CTRL`: the controller's fixed family id.
const GENL_ID_CTRL: u16 = 0x10;

/// The controller request for the devlink family's id (`CTRL_CMD_GETFAMILY`).
pub fn family_request(seq: u32) -> Vec<u8> {
    encode(
        seq,
        GENL_ID_CTRL,
        GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(Devlink::family_name().into())],
        },
    )
}

/// The family id in the controller's answer.
pub fn parse_family_reply(bytes: &[u8]) -> Result<u16, String> {
    let msg = NetlinkMessage::<GenlMessage<GenlCtrl>>::deserialize(bytes)
        .map_err(|e| format!("controller reply: {e}"))?;
    let NetlinkPayload::InnerMessage(genl) = msg.payload else {
        return Err("controller reply carries no family".into());
    };
    genl.payload
        .nlas
        .iter()
        .find_map(|a| match a {
            GenlCtrlAttrs::FamilyId(id) => Some(*id),
            _ => None,
        })
        .ok_or_else(|| "controller reply has no family id".into())
}

/// `devlink dev eswitch show BUS/DEV`: `DEVLINK_CMD_ESWITCH_GET` with the device's handle.
pub fn eswitch_get_request(seq: u32, family_id: u16, bus: &str, dev: &str) -> Vec<u8> {
    encode(
        seq,
        family_id,
        Devlink {
            cmd: DEVLINK_CMD_ESWITCH_GET,
            attrs: vec![
                DevlinkAttr::BusName(bus.into()),
                DevlinkAttr::DevName(dev.into()),
            ],
        },
    )
}

/// The mode in the kernel's answer to `DEVLINK_CMD_ESWITCH_GET`.
pub fn parse_eswitch_reply(bytes: &[u8]) -> Result<EswitchMode, String> {
    let msg = NetlinkMessage::<GenlMessage<Devlink>>::deserialize(bytes)
        .map_err(|e| format!("devlink reply: {e}"))?;
    let NetlinkPayload::InnerMessage(genl) = msg.payload else {
        return Err("devlink reply carries no attributes".into());
    };
    genl.payload
        .attrs
        .iter()
        .find_map(|a| match a {
            DevlinkAttr::EswitchMode(MODE_LEGACY) => Some(EswitchMode::Legacy),
            DevlinkAttr::EswitchMode(MODE_SWITCHDEV) => Some(EswitchMode::Switchdev),
            DevlinkAttr::EswitchMode(v) => Some(EswitchMode::Other(*v)),
            _ => None,
        })
        .ok_or_else(|| "devlink reply has no eswitch mode".into())
}

/// The devlink handle (bus, device) of a NIC from its ethtool bus address: PCI functions
/// are `pci/DOMAIN:BUS:DEV.FN`; mlx5 sub-functions live on the auxiliary bus.
pub fn handle_of(bus_info: &str) -> Option<(&'static str, String)> {
    let b = bus_info.as_bytes();
    let pci = b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && bus_info
            .chars()
            .enumerate()
            .all(|(i, c)| matches!(i, 4 | 7 | 10) || c.is_ascii_hexdigit());
    if pci {
        return Some(("pci", bus_info.to_owned()));
    }
    if bus_info.contains(".sf.") {
        return Some(("auxiliary", bus_info.to_owned()));
    }
    None
}

/// Asks the kernel for the eswitch mode of `bus/dev`.
pub fn eswitch_mode(bus: &str, dev: &str) -> Result<EswitchMode, String> {
    let mut sock =
        TcSocket::open_protocol(libc::NETLINK_GENERIC).map_err(|e| format!("genetlink: {e}"))?;
    let seq = sock.next_seq();
    let family = match sock.dump(seq, &family_request(seq)) {
        Ok(msgs) => msgs
            .first()
            .ok_or_else(|| "no answer from the genetlink controller".to_string())
            .and_then(|m| parse_family_reply(m))?,
        Err(TcError { errno, .. }) if errno == libc::ENOENT => {
            return Err("the kernel has no devlink netlink family".into());
        }
        Err(e) => return Err(format!("resolving the devlink family: {e}")),
    };
    let seq = sock.next_seq();
    let msgs = sock
        .dump(seq, &eswitch_get_request(seq, family, bus, dev))
        .map_err(|e| format!("devlink dev eswitch show {bus}/{dev}: {e}"))?;
    msgs.first()
        .ok_or_else(|| format!("devlink dev eswitch show {bus}/{dev}: no answer"))
        .and_then(|m| parse_eswitch_reply(m))
}
