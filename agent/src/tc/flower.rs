//! The tc requests of the mellanox backend, encoded byte for byte as iproute2's `tc` sends
//! them (tests compare with captures of `tc`): the clsact qdisc, one flower rule per flow
//! (exact 5-tuple, `skip_sw`, action `skbedit mark`, which the kernel hands to drivers as
//! FLOW_ACTION_MARK and mlx5 turns into the flow tag), and its deletion.
//!
//! netlink-packet-route 0.34 has typed flower matches but no skbedit action; encoding the
//! whole request here keeps the attribute order and flags exactly those of `tc`, and
//! netlink-packet-route parses it back in the tests.

use std::net::IpAddr;

/// `RTM_*` message types.
pub const RTM_NEWQDISC: u16 = 36;
pub const RTM_NEWTFILTER: u16 = 44;
pub const RTM_DELTFILTER: u16 = 45;
pub const RTM_GETTFILTER: u16 = 46;

/// `NLM_F_*` flags.
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;

/// `TC_H_CLSACT` / ingress parent of clsact (`ffff:fff2`).
pub const TC_H_CLSACT: u32 = 0xffff_fff1;
pub const TC_H_INGRESS_PARENT: u32 = 0xffff_fff2;

/// Top-level `TCA_*` attributes.
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_CHAIN: u16 = 11;

/// `TCA_FLOWER_*` attributes.
const TCA_FLOWER_ACT: u16 = 3;
const TCA_FLOWER_KEY_ETH_TYPE: u16 = 8;
const TCA_FLOWER_KEY_IP_PROTO: u16 = 9;
const TCA_FLOWER_KEY_IPV4_SRC: u16 = 10;
const TCA_FLOWER_KEY_IPV6_SRC: u16 = 14;
const TCA_FLOWER_KEY_TCP_SRC: u16 = 18;
const TCA_FLOWER_KEY_UDP_SRC: u16 = 20;
const TCA_FLOWER_FLAGS: u16 = 22;
/// `TCA_CLS_FLAGS_SKIP_SW`: in hardware only; the software path is marklb's own.
pub const TCA_CLS_FLAGS_SKIP_SW: u32 = 2;

/// Action attributes (`TCA_ACT_*`, `TCA_SKBEDIT_*`).
const TCA_ACT_KIND: u16 = 1;
const TCA_ACT_OPTIONS: u16 = 2;
const TCA_ACT_COOKIE: u16 = 6;
const TCA_SKBEDIT_PARMS: u16 = 2;
const TCA_SKBEDIT_MARK: u16 = 5;
const NLA_F_NESTED: u16 = 0x8000;
/// `TC_ACT_PIPE`: the action's verdict `tc` gives skbedit by default.
const TC_ACT_PIPE: i32 = 3;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// The action cookie on every rule marklb installs (`cookie 6d61726b6c620001`: "marklb",
/// format 1). The kernel keeps it opaque and lists it in dumps: it is how a restarted agent
/// tells its own rules from anyone else's in the same priority, which it never touches.
pub const OWNER_COOKIE: [u8; 8] = *b"marklb\x00\x01";

/// Largest mark mlx5 offloads (`MLX5E_TC_FLOW_ID_MASK`); 0 means "no mark".
pub const MAX_FLOW_TAG: u32 = 0xffff;

/// Where a rule lives: one flower filter per (priority, handle) on the ingress of the
/// device. Filters of one priority must share a protocol, so IPv4 and IPv6 rules use two.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RuleId {
    pub ifindex: i32,
    pub chain: u32,
    pub prio: u16,
    pub handle: u32,
    pub v6: bool,
}

/// The exact 5-tuple a rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Match {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
}

/// A netlink request under construction.
pub struct Request {
    buf: Vec<u8>,
    /// Offsets of nests still open (their lengths are written when closed).
    open: Vec<usize>,
}

impl Request {
    /// `nlmsghdr` + `tcmsg`.
    fn new(
        kind: u16,
        flags: u16,
        seq: u32,
        ifindex: i32,
        handle: u32,
        parent: u32,
        info: u32,
    ) -> Self {
        let mut buf = Vec::with_capacity(192);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set in finish()
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
        buf.extend_from_slice(&[0, 0, 0, 0]); // family AF_UNSPEC, padding
        buf.extend_from_slice(&ifindex.to_ne_bytes());
        buf.extend_from_slice(&handle.to_ne_bytes());
        buf.extend_from_slice(&parent.to_ne_bytes());
        buf.extend_from_slice(&info.to_ne_bytes());
        Self {
            buf,
            open: Vec::new(),
        }
    }

    fn attr(&mut self, kind: u16, payload: &[u8]) -> &mut Self {
        let len = 4 + payload.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
        self
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn begin(&mut self, kind: u16) -> &mut Self {
        self.open.push(self.buf.len());
        self.buf.extend_from_slice(&[0, 0]);
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self
    }

    fn end(&mut self) -> &mut Self {
        let at = self.open.pop().expect("an open nest");
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// The request's bytes, length set.
    pub fn finish(mut self) -> Vec<u8> {
        assert!(self.open.is_empty(), "unclosed nest");
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// `tcm_info` of a filter: priority in the upper 16 bits, protocol (network order) below.
fn filter_info(prio: u16, v6: bool) -> u32 {
    let proto = if v6 { ETH_P_IPV6 } else { ETH_P_IP };
    ((prio as u32) << 16) | proto.to_be() as u32
}

fn eth_type(v6: bool) -> [u8; 2] {
    if v6 { ETH_P_IPV6 } else { ETH_P_IP }.to_be_bytes()
}

/// `tc qdisc add dev DEV clsact`.
pub fn qdisc_clsact(seq: u32, ifindex: i32) -> Vec<u8> {
    let mut r = Request::new(
        RTM_NEWQDISC,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL | NLM_F_CREATE,
        seq,
        ifindex,
        0xffff_0000,
        TC_H_CLSACT,
        0,
    );
    r.attr(TCA_KIND, b"clsact\0");
    r.finish()
}

/// Why a rule cannot be encoded.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("mark {0} does not fit the 16-bit mlx5 flow tag (1..=65535)")]
    Mark(u32),
    #[error("protocol {0} is not TCP or UDP")]
    Proto(u8),
    #[error("source and destination families differ")]
    Family,
}

/// `tc filter add dev DEV ingress protocol ip|ipv6 prio P handle H chain C flower skip_sw
/// ip_proto tcp|udp src_ip S dst_ip D src_port SP dst_port DP action skbedit mark M
/// cookie 6d61726b6c620001`.
pub fn add_rule(seq: u32, id: &RuleId, m: &Match, mark: u32) -> Result<Vec<u8>, RuleError> {
    if mark == 0 || mark > MAX_FLOW_TAG {
        return Err(RuleError::Mark(mark));
    }
    let port_attr = match m.proto {
        IPPROTO_TCP => TCA_FLOWER_KEY_TCP_SRC,
        IPPROTO_UDP => TCA_FLOWER_KEY_UDP_SRC,
        p => return Err(RuleError::Proto(p)),
    };
    let mut r = Request::new(
        RTM_NEWTFILTER,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL | NLM_F_CREATE,
        seq,
        id.ifindex,
        id.handle,
        TC_H_INGRESS_PARENT,
        filter_info(id.prio, id.v6),
    );
    r.attr(TCA_CHAIN, &id.chain.to_ne_bytes())
        .attr(TCA_KIND, b"flower\0")
        .begin(TCA_OPTIONS)
        .attr(TCA_FLOWER_KEY_IP_PROTO, &[m.proto]);
    // Source, its mask, destination, its mask: all exact.
    match (m.src, m.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) if !id.v6 => {
            r.attr(TCA_FLOWER_KEY_IPV4_SRC, &s.octets())
                .attr(TCA_FLOWER_KEY_IPV4_SRC + 1, &[0xff; 4])
                .attr(TCA_FLOWER_KEY_IPV4_SRC + 2, &d.octets())
                .attr(TCA_FLOWER_KEY_IPV4_SRC + 3, &[0xff; 4]);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) if id.v6 => {
            r.attr(TCA_FLOWER_KEY_IPV6_SRC, &s.octets())
                .attr(TCA_FLOWER_KEY_IPV6_SRC + 1, &[0xff; 16])
                .attr(TCA_FLOWER_KEY_IPV6_SRC + 2, &d.octets())
                .attr(TCA_FLOWER_KEY_IPV6_SRC + 3, &[0xff; 16]);
        }
        _ => return Err(RuleError::Family),
    }
    r.attr(port_attr, &m.sport.to_be_bytes())
        .attr(port_attr + 1, &m.dport.to_be_bytes());
    // One action, order 1: skbedit setting the mark alone (mlx5 offloads nothing else).
    let mut parms = Vec::with_capacity(20);
    for v in [0i32, 0, TC_ACT_PIPE, 0, 0] {
        parms.extend_from_slice(&v.to_ne_bytes());
    }
    r.begin(TCA_FLOWER_ACT)
        .begin(1)
        .attr(TCA_ACT_KIND, b"skbedit\0")
        .begin(TCA_ACT_OPTIONS | NLA_F_NESTED)
        .attr(TCA_SKBEDIT_PARMS, &parms)
        .attr(TCA_SKBEDIT_MARK, &mark.to_ne_bytes())
        .end()
        .attr(TCA_ACT_COOKIE, &OWNER_COOKIE)
        .end()
        .end();
    r.attr(TCA_FLOWER_FLAGS, &TCA_CLS_FLAGS_SKIP_SW.to_ne_bytes())
        .attr(TCA_FLOWER_KEY_ETH_TYPE, &eth_type(id.v6))
        .end();
    Ok(r.finish())
}

/// `tc filter del dev DEV ingress protocol ip|ipv6 prio P handle H chain C flower`.
pub fn delete_rule(seq: u32, id: &RuleId) -> Vec<u8> {
    let mut r = Request::new(
        RTM_DELTFILTER,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        id.ifindex,
        id.handle,
        TC_H_INGRESS_PARENT,
        filter_info(id.prio, id.v6),
    );
    r.attr(TCA_CHAIN, &id.chain.to_ne_bytes())
        .attr(TCA_KIND, b"flower\0")
        .begin(TCA_OPTIONS)
        .attr(TCA_FLOWER_FLAGS, &0u32.to_ne_bytes())
        .attr(TCA_FLOWER_KEY_ETH_TYPE, &eth_type(id.v6))
        .end();
    r.finish()
}

/// `tc filter del dev DEV ingress protocol ip|ipv6 prio P chain C flower`: every rule of
/// the priority (handle 0).
pub fn delete_priority(seq: u32, ifindex: i32, chain: u32, prio: u16, v6: bool) -> Vec<u8> {
    delete_rule(
        seq,
        &RuleId {
            ifindex,
            chain,
            prio,
            handle: 0,
            v6,
        },
    )
}

/// `tc filter show dev DEV ingress` (a dump, with each rule's action statistics).
pub fn dump_rules(seq: u32, ifindex: i32) -> Vec<u8> {
    Request::new(
        RTM_GETTFILTER,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        ifindex,
        0,
        TC_H_INGRESS_PARENT,
        0,
    )
    .finish()
}

/// `tc filter show dev DEV ingress protocol ip|ipv6 prio P chain C`: the dump of one
/// priority of one chain (the kernel filters on `tcm_info` and `TCA_CHAIN`), so a restarted
/// agent reads only the priorities it owns.
pub fn dump_priority(seq: u32, ifindex: i32, chain: u32, prio: u16, v6: bool) -> Vec<u8> {
    let mut r = Request::new(
        RTM_GETTFILTER,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        ifindex,
        0,
        TC_H_INGRESS_PARENT,
        filter_info(prio, v6),
    );
    r.attr(TCA_CHAIN, &chain.to_ne_bytes());
    r.finish()
}
