// SPDX-License-Identifier: GPL-2.0 OR MIT
//! The flow-mark fast path: the NIC tagged the packet with a mark for a known flow, so the
//! mark alone says where it goes. No 5-tuple parse, no hash, no ring, no connection table:
//! only the Ethernet type, the IP header's length fields, and the client address and port
//! that choose the outer source (so the output equals what the normal path would send).

use marklb_common::{Counter, IPPROTO_TCP, IPPROTO_UDP, LbConfig, MAX_MARKS};

use crate::{
    encap::{self, Inner},
    hdr::*,
    maps::{MARKS, REALS},
    parse::{frame_len, ptr_at},
    pkt::{Action, Packet},
    stats::{account, count},
};

/// Smallest transport header the normal path accepts for a protocol (the ports and, for
/// TCP, the flags must be inside the IP packet); None: not TCP/UDP.
#[inline(always)]
fn l4_min(proto: u8) -> Option<u32> {
    match proto {
        IPPROTO_TCP => Some(20),
        IPPROTO_UDP => Some(8),
        _ => None,
    }
}

/// Inner packet facts the fast path needs, or None to let the normal path decide
/// (options, fragments, extension headers, truncation, anything unusual). Only fields of
/// the IP header are looked at; a mark vouches for the 5-tuple, not for the packet being
/// well formed, so the fast path accepts no packet the normal path would refuse.
#[inline(always)]
fn minimal_parse(ctx: &impl Packet) -> Option<Inner> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    let proto = unsafe { (*eth).proto_be };
    let avail = ctx.len() as u32;
    if proto == ETH_P_IP.to_be() {
        let ip = unsafe { &*ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN)? };
        let ports = unsafe { &*ptr_at::<L4Ports>(ctx, ETH_HLEN + IPV4_HLEN)? };
        let ip_len = u16::from_be(ip.tot_len_be) as u32;
        if ip.ver_ihl != 0x45
            || u16::from_be(ip.frag_off_be) & 0x3fff != 0
            || ip_len < IPV4_HLEN as u32 + l4_min(ip.proto)?
            || ip_len + ETH_HLEN as u32 > avail
        {
            return None;
        }
        Some(Inner {
            v6: false,
            ip_len,
            tos: ip.tos,
            client_be: [ip.saddr_be, 0, 0, 0],
            sport_be: ports.sport_be,
        })
    } else if proto == ETH_P_IPV6.to_be() {
        let ip = unsafe { &*ptr_at::<Ipv6Hdr>(ctx, ETH_HLEN)? };
        let ports = unsafe { &*ptr_at::<L4Ports>(ctx, ETH_HLEN + IPV6_HLEN)? };
        let vtc = u32::from_be(ip.vtc_flow_be);
        let ip_len = IPV6_HLEN as u32 + u16::from_be(ip.payload_len_be) as u32;
        if vtc >> 28 != 6
            || ip_len < IPV6_HLEN as u32 + l4_min(ip.nexthdr)?
            || ip_len + ETH_HLEN as u32 > avail
        {
            return None;
        }
        Some(Inner {
            v6: true,
            ip_len,
            tos: (vtc >> 20) as u8,
            client_be: ip.saddr_be,
            sport_be: ports.sport_be,
        })
    } else {
        None
    }
}

/// Forwards a marked packet, or returns None when the mark is absent, unknown, stale, or the
/// packet needs the normal path (which then handles it as if unmarked).
#[inline(always)]
pub fn fast_path(ctx: &impl Packet, cfg: &LbConfig) -> Option<Action> {
    let mark = ctx.mark();
    if mark == 0 {
        return None;
    }
    let entry = if mark < MAX_MARKS {
        MARKS.get(mark)
    } else {
        None
    };
    let Some(entry) = entry.filter(|e| e.real_id != 0) else {
        count(Counter::MarkMiss);
        return None;
    };
    let real = match REALS.get(entry.real_id) {
        Some(r) if r.generation != 0 && r.generation == entry.real_gen => r,
        _ => {
            count(Counter::MarkStale);
            return None;
        }
    };
    let inner = minimal_parse(ctx)?;
    if inner.ip_len + encap::overhead(real) > cfg.mtu && !ctx.is_gso() {
        return None; // the normal path answers with ICMP too big
    }
    let bytes = frame_len(ctx);
    match encap::encapsulate(ctx, cfg, real, &inner) {
        Ok(action) => {
            account(entry.vip_id, entry.real_id, bytes);
            count(Counter::MarkHit);
            Some(action)
        }
        Err(c) => {
            count(c);
            Some(Action::Drop)
        }
    }
}
