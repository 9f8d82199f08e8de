//! What one message of a filter dump says (RTM_NEWTFILTER with NLM_F_MULTI, parsed with
//! netlink-packet-route): where the filter sits, whether it is a rule marklb installed (the
//! owner cookie on its action), and if so its exact 5-tuple, mark and hardware state.

use std::net::IpAddr;

use netlink_packet_core::{NetlinkMessage, NetlinkPayload, Nla};
use netlink_packet_route::{
    RouteNetlinkMessage,
    tc::{
        TcAction, TcActionAttribute, TcActionOption, TcAttribute, TcFilterFlowerOption, TcOption,
        TcStats2,
    },
};

use super::flower::{IPPROTO_TCP, IPPROTO_UDP, Match, OWNER_COOKIE};

/// `TCA_SKBEDIT_MARK` inside the skbedit action's options.
const TCA_SKBEDIT_MARK: u16 = 5;
/// `TCA_CLS_FLAGS_IN_HW`: the driver accepted the rule.
pub const TCA_CLS_FLAGS_IN_HW: u32 = 1 << 2;
const ETH_P_IPV6: u16 = 0x86dd;

/// One filter of a dump.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DumpedFilter {
    pub chain: u32,
    pub prio: u16,
    pub handle: u32,
    /// The filter's protocol is IPv6 (`tcm_info`'s low 16 bits).
    pub v6: bool,
    pub kind: String,
    /// An action carries marklb's owner cookie: this rule is marklb's to keep or delete.
    pub owned: bool,
    /// The exact 5-tuple, if the rule matches one the way marklb's rules do.
    pub matched: Option<Match>,
    /// The skbedit action's mark, if it has one.
    pub mark: Option<u32>,
    /// Flower flags (`skip_sw`, `in_hw`...).
    pub flags: u32,
    /// Packets the action counted.
    pub packets: u64,
}

impl DumpedFilter {
    /// A filter whose attributes could not be read: where it sits, from the `tcmsg` header
    /// alone, and not ours (what cannot be read is never judged ours to delete), so its
    /// handle stays taken.
    pub fn unreadable(bytes: &[u8]) -> Option<Self> {
        let word = |at: usize| Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?));
        let (handle, info) = (word(24)?, word(32)?);
        Some(Self {
            chain: 0,
            prio: (info >> 16) as u16,
            handle,
            v6: u16::from_be((info & 0xffff) as u16) == ETH_P_IPV6,
            kind: String::new(),
            owned: false,
            matched: None,
            mark: None,
            flags: 0,
            packets: 0,
        })
    }
}

/// Why a dump message is not a filter.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("not a netlink route message: {0}")]
    Parse(String),
    #[error("not a filter message")]
    NotAFilter,
}

/// Reads one dump message. Filters of any kind parse (a foreign `u32` filter in the same
/// priority must be recognised as not ours, not refused).
pub fn parse_filter(bytes: &[u8]) -> Result<DumpedFilter, DumpError> {
    let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes)
        .map_err(|e| DumpError::Parse(e.to_string()))?;
    let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewTrafficFilter(tc)) = msg.payload
    else {
        return Err(DumpError::NotAFilter);
    };
    let proto = u16::from_be((tc.header.info & 0xffff) as u16);
    let mut f = DumpedFilter {
        chain: 0,
        prio: (tc.header.info >> 16) as u16,
        handle: tc.header.handle.into(),
        v6: proto == ETH_P_IPV6,
        kind: String::new(),
        owned: false,
        matched: None,
        mark: None,
        flags: 0,
        packets: 0,
    };
    let mut keys = Keys::default();
    for attr in &tc.attributes {
        match attr {
            TcAttribute::Kind(k) => f.kind = k.clone(),
            TcAttribute::Chain(c) => f.chain = *c,
            TcAttribute::Options(opts) => {
                for o in opts {
                    let TcOption::Flower(o) = o else { continue };
                    match o {
                        TcFilterFlowerOption::Flags(x) => f.flags = *x,
                        TcFilterFlowerOption::Actions(actions) => {
                            for a in actions {
                                read_action(a, &mut f);
                            }
                        }
                        o => keys.read(o),
                    }
                }
            }
            _ => {}
        }
    }
    f.matched = keys.exact_match();
    Ok(f)
}

fn read_action(a: &TcAction, f: &mut DumpedFilter) {
    for attr in &a.attributes {
        match attr {
            TcActionAttribute::Cookie(c) if c[..] == OWNER_COOKIE => f.owned = true,
            TcActionAttribute::Stats(stats) => {
                for s in stats {
                    if let TcStats2::Basic(b) = s {
                        f.packets = f.packets.max(b.packets as u64);
                    }
                }
            }
            TcActionAttribute::Options(opts) => {
                for o in opts {
                    if let TcActionOption::Other(nla) = o
                        && nla.kind() & 0x3fff == TCA_SKBEDIT_MARK
                        && nla.value_len() == 4
                    {
                        let mut v = [0u8; 4];
                        nla.emit_value(&mut v);
                        f.mark = Some(u32::from_ne_bytes(v));
                    }
                }
            }
            _ => {}
        }
    }
}

/// The flower keys of a rule, gathered to see whether they are an exact 5-tuple.
#[derive(Default)]
struct Keys {
    proto: Option<u8>,
    src: Option<IpAddr>,
    dst: Option<IpAddr>,
    src_full: bool,
    dst_full: bool,
    sport: Option<u16>,
    dport: Option<u16>,
    /// A port mask other than all ones (marklb sends none: exact).
    partial_port: bool,
}

impl Keys {
    fn read(&mut self, o: &TcFilterFlowerOption) {
        use TcFilterFlowerOption as F;
        match o {
            F::IpProto(p) => self.proto = Some(*p),
            F::Ipv4Src(a) => self.src = Some(IpAddr::V4(*a)),
            F::Ipv4Dst(a) => self.dst = Some(IpAddr::V4(*a)),
            F::Ipv6Src(a) => self.src = Some(IpAddr::V6(*a)),
            F::Ipv6Dst(a) => self.dst = Some(IpAddr::V6(*a)),
            F::Ipv4SrcMask(m) => self.src_full = m.octets() == [0xff; 4],
            F::Ipv4DstMask(m) => self.dst_full = m.octets() == [0xff; 4],
            F::Ipv6SrcMask(m) => self.src_full = m.octets() == [0xff; 16],
            F::Ipv6DstMask(m) => self.dst_full = m.octets() == [0xff; 16],
            F::TcpSrc(p) | F::UdpSrc(p) => self.sport = Some(*p),
            F::TcpDst(p) | F::UdpDst(p) => self.dport = Some(*p),
            // The kernel lists port masks when they were given; all ones is exact.
            F::TcpSrcMask(m) | F::TcpDstMask(m) | F::UdpSrcMask(m) | F::UdpDstMask(m) => {
                self.partial_port |= *m != 0xffff
            }
            _ => {}
        }
    }

    fn exact_match(&self) -> Option<Match> {
        let proto = self
            .proto
            .filter(|p| *p == IPPROTO_TCP || *p == IPPROTO_UDP)?;
        let (src, dst) = (self.src?, self.dst?);
        if src.is_ipv4() != dst.is_ipv4() || !self.src_full || !self.dst_full || self.partial_port {
            return None;
        }
        Some(Match {
            src,
            dst,
            proto,
            sport: self.sport?,
            dport: self.dport?,
        })
    }
}
