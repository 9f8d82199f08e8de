// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Bounds-checked packet access and the parse of a VIP packet into a flow.

use marklb_common::{Counter, FlowKey, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};

use crate::{hdr::*, pkt::Packet};

/// A pointer to a `T` at `off` bytes into the packet, if the packet is long enough.
#[inline(always)]
pub fn ptr_at<T>(ctx: &impl Packet, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// Frame length (bytes from the Ethernet header to the end).
#[inline(always)]
pub fn frame_len<P: Packet>(ctx: &P) -> u64 {
    ctx.len() as u64
}

/// What the normal path knows after parsing a packet for a VIP address.
#[derive(Clone, Copy)]
pub struct Parsed {
    pub flow: FlowKey,
    pub v6: bool,
    /// Inner IP packet length from its header (bytes, without Ethernet padding).
    pub ip_len: u32,
    /// IPv4 TOS / IPv6 traffic class, copied to the outer header.
    pub tos: u8,
    /// TCP flags (0 for UDP/ICMP).
    pub tcp_flags: u8,
}

/// How parsing ended when it did not produce a TCP/UDP flow.
pub enum Verdict {
    /// A TCP or UDP packet for a VIP address.
    Flow(Parsed),
    /// ICMP (v4 or v6) for a VIP address; the caller decides what to do.
    Icmp(Parsed),
    /// Not ours: pass untouched, counted under this reason.
    Pass(Counter),
    /// For a VIP address but malformed or unsupported: drop, counted under this reason.
    Drop(Counter),
}

/// Parses Ethernet + IPv4/IPv6 + L4 ports. `is_vip_addr` is consulted as soon as the
/// destination is known, so packets for other addresses cost one lookup and are passed
/// untouched even when malformed further in.
#[inline(always)]
pub fn parse<P: Packet>(ctx: &P, is_vip_addr: impl Fn(&[u32; 4]) -> bool) -> Verdict {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Verdict::Pass(Counter::PassMalformed);
    };
    let proto = u16::from_be(unsafe { (*eth).proto_be });
    let avail = ctx.len();
    let mut p = Parsed {
        flow: FlowKey::default(),
        v6: false,
        ip_len: 0,
        tos: 0,
        tcp_flags: 0,
    };
    let l4_off;
    if proto == ETH_P_IP {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN) else {
            return Verdict::Pass(Counter::PassMalformed);
        };
        let ip = unsafe { &*ip };
        if ip.ver_ihl >> 4 != 4 {
            return Verdict::Pass(Counter::PassMalformed);
        }
        let daddr = [ip.daddr_be, 0, 0, 0];
        if !is_vip_addr(&daddr) {
            return Verdict::Pass(Counter::PassNotVip);
        }
        // From here on the packet is addressed to a VIP: what we cannot handle is dropped.
        if ip.ver_ihl != 0x45 {
            return Verdict::Drop(Counter::DropIpOptions);
        }
        // More-fragments flag or a fragment offset: ports are not (all) there.
        if u16::from_be(ip.frag_off_be) & 0x3fff != 0 {
            return Verdict::Drop(Counter::DropFragment);
        }
        let tot = u16::from_be(ip.tot_len_be) as usize;
        if tot < IPV4_HLEN + 8 || ETH_HLEN + tot > avail {
            return Verdict::Drop(Counter::DropMalformed);
        }
        p.flow.src_be = [ip.saddr_be, 0, 0, 0];
        p.flow.dst_be = daddr;
        p.flow.proto = ip.proto;
        p.ip_len = tot as u32;
        p.tos = ip.tos;
        l4_off = ETH_HLEN + IPV4_HLEN;
    } else if proto == ETH_P_IPV6 {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, ETH_HLEN) else {
            return Verdict::Pass(Counter::PassMalformed);
        };
        let ip = unsafe { &*ip };
        let vtc = u32::from_be(ip.vtc_flow_be);
        if vtc >> 28 != 6 {
            return Verdict::Pass(Counter::PassMalformed);
        }
        if !is_vip_addr(&ip.daddr_be) {
            return Verdict::Pass(Counter::PassNotVip);
        }
        let tot = IPV6_HLEN + u16::from_be(ip.payload_len_be) as usize;
        if tot < IPV6_HLEN + 8 || ETH_HLEN + tot > avail {
            return Verdict::Drop(Counter::DropMalformed);
        }
        match ip.nexthdr {
            IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMPV6 => {}
            IPV6_NEXTHDR_FRAGMENT => return Verdict::Drop(Counter::DropFragment),
            _ => return Verdict::Drop(Counter::DropUnsupported),
        }
        p.v6 = true;
        p.flow.src_be = ip.saddr_be;
        p.flow.dst_be = ip.daddr_be;
        p.flow.proto = ip.nexthdr;
        p.ip_len = tot as u32;
        p.tos = (vtc >> 20) as u8;
        l4_off = ETH_HLEN + IPV6_HLEN;
    } else {
        return Verdict::Pass(Counter::PassNotIp);
    }

    match p.flow.proto {
        IPPROTO_TCP => {
            // A full minimal TCP header must be inside the IP packet.
            if p.ip_len < (l4_off - ETH_HLEN + 20) as u32 {
                return Verdict::Drop(Counter::DropMalformed);
            }
            let Some(flags) = ptr_at::<u8>(ctx, l4_off + TCP_FLAGS_OFF) else {
                return Verdict::Drop(Counter::DropMalformed);
            };
            p.tcp_flags = unsafe { *flags };
        }
        IPPROTO_UDP => {}
        IPPROTO_ICMP if !p.v6 => return Verdict::Icmp(p),
        IPPROTO_ICMPV6 if p.v6 => return Verdict::Icmp(p),
        _ => return Verdict::Pass(Counter::PassNotVip),
    }
    // ip_len >= header + 8 was checked above, so the ports are inside the packet.
    let Some(ports) = ptr_at::<L4Ports>(ctx, l4_off) else {
        return Verdict::Drop(Counter::DropMalformed);
    };
    let ports = unsafe { &*ports };
    p.flow.sport_be = ports.sport_be;
    p.flow.dport_be = ports.dport_be;
    Verdict::Flow(p)
}
