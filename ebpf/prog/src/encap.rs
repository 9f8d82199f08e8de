// SPDX-License-Identifier: GPL-2.0 OR MIT
//! IP-in-IP encapsulation toward the chosen real (direct server return): IPv4-in-IPv4,
//! IPv6-in-IPv6 and IPv4-in-IPv6. The inner packet is left byte for byte as received.

use marklb_common::{
    Counter, IPPROTO_IPIP, IPPROTO_IPV6, LbConfig, REAL_F_IPV6, RealDef,
    hash::{encap_src_v4, encap_src_v6},
};

use crate::{
    csum,
    hdr::*,
    parse::ptr_at,
    pkt::{Action, Packet},
};

/// What encapsulation needs to know about the inner packet (read before the headroom
/// moves, since every packet pointer is invalid afterwards).
#[derive(Clone, Copy)]
pub struct Inner {
    pub v6: bool,
    /// Inner IP packet length (bytes).
    pub ip_len: u32,
    pub tos: u8,
    /// Client address and port: they choose the outer source.
    pub client_be: [u32; 4],
    pub sport_be: u16,
}

/// Bytes the outer header adds for this real.
#[inline(always)]
pub fn overhead(real: &RealDef) -> u32 {
    if real.flags & REAL_F_IPV6 != 0 {
        IPV6_HLEN as u32
    } else {
        IPV4_HLEN as u32
    }
}

/// Prepends the outer header, rewrites the MACs (source: our address the packet came to,
/// destination: the next hop) and returns `Action::Tx`, or the drop reason.
#[inline(always)]
pub fn encapsulate(
    ctx: &impl Packet,
    cfg: &LbConfig,
    real: &RealDef,
    inner: &Inner,
) -> Result<Action, Counter> {
    let outer_v6 = real.flags & REAL_F_IPV6 != 0;
    if inner.v6 && !outer_v6 {
        // IPv6-in-IPv4 is not offered; configuration validation refuses it.
        return Err(Counter::DropNoReal);
    }
    let grow = if outer_v6 { IPV6_HLEN } else { IPV4_HLEN };
    let Some(old_eth) = ctx.open_outer(grow, outer_v6) else {
        return Err(Counter::DropEncap);
    };
    // New Ethernet + the larger outer header; the original Ethernet header now starts at
    // `old_eth` (XDP: past the new one; TC: where it was) and its destination is our own
    // MAC: the new source. It is read before anything is written.
    let Some(words) = ptr_at::<[u16; (ETH_HLEN + IPV6_HLEN) / 2]>(ctx, 0) else {
        return Err(Counter::DropEncap);
    };
    unsafe {
        let w = words.cast::<u16>();
        let old = w.add(old_eth / 2);
        let ours = [*old, *old.add(1), *old.add(2)];
        let hop = cfg.next_hop_mac.as_ptr().cast::<u16>();
        *w = *hop;
        *w.add(1) = *hop.add(1);
        *w.add(2) = *hop.add(2);
        *w.add(3) = ours[0];
        *w.add(4) = ours[1];
        *w.add(5) = ours[2];
        *w.add(6) = if outer_v6 { ETH_P_IPV6 } else { ETH_P_IP }.to_be();
    }
    if outer_v6 {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, ETH_HLEN) else {
            return Err(Counter::DropEncap);
        };
        let vtc = (6u32 << 28) | ((inner.tos as u32) << 20);
        unsafe {
            *ip = Ipv6Hdr {
                vtc_flow_be: vtc.to_be(),
                payload_len_be: (inner.ip_len as u16).to_be(),
                nexthdr: if inner.v6 { IPPROTO_IPV6 } else { IPPROTO_IPIP },
                hop_limit: 64,
                saddr_be: encap_src_v6(&cfg.encap_src_v6_be, &inner.client_be, inner.sport_be),
                daddr_be: real.addr_be,
            };
        }
        ctx.outer_written(ip.cast::<u8>(), IPV6_HLEN as u32);
    } else {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN) else {
            return Err(Counter::DropEncap);
        };
        let tot_len = inner.ip_len + IPV4_HLEN as u32;
        let saddr_be = encap_src_v4(cfg.encap_src_v4_be, inner.client_be[0], inner.sport_be);
        let daddr_be = real.addr_be[0];
        let hdr = Ipv4Hdr {
            ver_ihl: 0x45,
            tos: inner.tos,
            tot_len_be: (tot_len as u16).to_be(),
            id_be: 0,
            frag_off_be: 0,
            ttl: 64,
            proto: IPPROTO_IPIP,
            check: csum::ipv4_header_check(inner.tos, tot_len, saddr_be, daddr_be),
            saddr_be,
            daddr_be,
        };
        unsafe { *ip = hdr };
    }
    Ok(Action::Tx)
}
