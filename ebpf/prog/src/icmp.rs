// SPDX-License-Identifier: GPL-2.0 OR MIT
//! ICMP for VIPs: echo replies, "fragmentation needed" / "packet too big" forwarded to the
//! real that owns the quoted flow, and too-big errors for packets that would not fit after
//! encapsulation.

use marklb_common::{
    CFG_F_ICMP_ECHO, CFG_F_ICMP_TOO_BIG, Counter, FlowKey, IPPROTO_ICMP, IPPROTO_ICMPV6,
    IPPROTO_TCP, IPPROTO_UDP, LbConfig, RealDef, hash::flow_hash64,
};

use crate::{
    csum,
    encap::{self, Inner},
    hdr::*,
    parse::{Parsed, frame_len, ptr_at},
    pick::{Learn, established, ring_pick, vip_lookup},
    pkt::{Action, Packet},
    stats::{account, count, drop},
};

/// ICMP packet addressed to a VIP address.
#[inline(always)]
pub fn handle(ctx: &impl Packet, cfg: &LbConfig, p: &Parsed) -> Action {
    let l4 = ETH_HLEN + if p.v6 { IPV6_HLEN } else { IPV4_HLEN };
    let Some(icmp) = ptr_at::<IcmpHdr>(ctx, l4) else {
        return drop(Counter::DropMalformed);
    };
    let (kind, code) = unsafe { ((*icmp).kind, (*icmp).code) };
    let echo = cfg.flags & CFG_F_ICMP_ECHO != 0;
    if p.v6 {
        if kind == ICMPV6_ECHO_REQUEST && echo {
            return echo_reply(ctx, p);
        }
        if kind == ICMPV6_PKT_TOO_BIG {
            return forward_too_big(ctx, cfg, p, l4 + 8);
        }
    } else {
        if kind == ICMP_ECHO_REQUEST && echo {
            return echo_reply(ctx, p);
        }
        if kind == ICMP_DEST_UNREACH && code == ICMP_FRAG_NEEDED {
            return forward_too_big(ctx, cfg, p, l4 + 8);
        }
    }
    count(Counter::PassNotVip);
    Action::Pass
}

#[inline(always)]
fn swap_macs(ctx: &impl Packet) -> bool {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return false;
    };
    // An explicit copy: core::mem::swap on byte arrays can become an out-of-line memmove.
    #[allow(clippy::manual_swap)]
    unsafe {
        let src = (*eth).src;
        (*eth).src = (*eth).dst;
        (*eth).dst = src;
    }
    true
}

/// Largest ICMP echo payload checked for the all-zero case: more than any XDP frame holds.
const ZERO_SCAN_MAX: usize = 4096;

/// True if the bytes `from..to` of the frame are all zero (false beyond `ZERO_SCAN_MAX`).
#[inline(always)]
fn all_zero(ctx: &impl Packet, from: usize, to: usize) -> bool {
    let mut off = from;
    let mut i = 0;
    while i < ZERO_SCAN_MAX / 8 {
        if off + 8 > to {
            break;
        }
        match ptr_at::<u64>(ctx, off) {
            Some(w) if unsafe { core::ptr::read_unaligned(w) } == 0 => {}
            _ => return false,
        }
        off += 8;
        i += 1;
    }
    let mut j = 0;
    while j < 8 {
        if off >= to {
            return true;
        }
        match ptr_at::<u8>(ctx, off) {
            Some(b) if unsafe { *b } == 0 => {}
            _ => return false,
        }
        off += 1;
        j += 1;
    }
    off >= to
}

/// Turns an echo request into the reply in place and sends it back.
#[inline(always)]
fn echo_reply(ctx: &impl Packet, p: &Parsed) -> Action {
    let v6 = p.v6;
    if !swap_macs(ctx) {
        return drop(Counter::DropMalformed);
    }
    let l4;
    if v6 {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, ETH_HLEN) else {
            return drop(Counter::DropMalformed);
        };
        unsafe {
            core::mem::swap(&mut (*ip).saddr_be, &mut (*ip).daddr_be);
            (*ip).hop_limit = 64;
        }
        l4 = ETH_HLEN + IPV6_HLEN;
    } else {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN) else {
            return drop(Counter::DropMalformed);
        };
        unsafe {
            core::mem::swap(&mut (*ip).saddr_be, &mut (*ip).daddr_be);
            // TTL shares a checksummed word with the protocol.
            let ttl_word = ip.cast::<u8>().add(8).cast::<u16>();
            let old = core::ptr::read_unaligned(ttl_word);
            (*ip).ttl = 64;
            let new = core::ptr::read_unaligned(ttl_word);
            (*ip).check = csum::replace16((*ip).check, old, new);
        }
        l4 = ETH_HLEN + IPV4_HLEN;
    }
    let Some(icmp) = ptr_at::<IcmpHdr>(ctx, l4) else {
        return drop(Counter::DropMalformed);
    };
    unsafe {
        let word = icmp.cast::<u16>();
        let old = core::ptr::read_unaligned(word);
        (*icmp).kind = if v6 {
            ICMPV6_ECHO_REPLY
        } else {
            ICMP_ECHO_REPLY
        };
        let new = core::ptr::read_unaligned(word);
        // The ICMPv6 pseudo-header is unchanged: swapping addresses keeps their sum.
        let mut check = csum::replace16((*icmp).check, old, new);
        // An IPv4 reply with identifier 0, sequence 0 and only zero data is all zero: its
        // checksum is 0xffff, not the 0x0000 of the incremental update (a receiver sums
        // 0 + 0x0000 = 0 and drops it). IPv6 has a non-zero pseudo-header.
        if check == 0
            && !v6
            && (*icmp).rest == [0, 0]
            && all_zero(ctx, l4 + 8, ETH_HLEN + p.ip_len as usize)
        {
            check = 0xffff;
        }
        (*icmp).check = check;
    }
    count(Counter::IcmpEchoReply);
    Action::Tx
}

/// A router told a VIP that a packet was too big. The quoted packet is the VIP's reply
/// (VIP -> client), so the flow it belongs to is the quoted one reversed: send the error to
/// the real that serves that flow, so the real's TCP stack learns the path MTU.
#[inline(always)]
fn forward_too_big(ctx: &impl Packet, cfg: &LbConfig, p: &Parsed, quoted: usize) -> Action {
    let mut flow = FlowKey {
        proto: 0,
        ..FlowKey::default()
    };
    // The quoted header and ports must lie inside the ICMP packet (its IP length), not in
    // Ethernet padding or garbage behind it: a flow read from there is made up.
    let end = ETH_HLEN + p.ip_len as usize;
    let ports_off;
    if p.v6 {
        if quoted + IPV6_HLEN > end {
            return drop(Counter::DropMalformed);
        }
        let Some(q) = ptr_at::<Ipv6Hdr>(ctx, quoted) else {
            return drop(Counter::DropMalformed);
        };
        let q = unsafe { &*q };
        flow.src_be = q.daddr_be;
        flow.dst_be = q.saddr_be;
        flow.proto = q.nexthdr;
        ports_off = quoted + IPV6_HLEN;
    } else {
        if quoted + IPV4_HLEN > end {
            return drop(Counter::DropMalformed);
        }
        let Some(q) = ptr_at::<Ipv4Hdr>(ctx, quoted) else {
            return drop(Counter::DropMalformed);
        };
        let q = unsafe { &*q };
        if q.ver_ihl != 0x45 {
            return drop(Counter::DropUnsupported);
        }
        flow.src_be = [q.daddr_be, 0, 0, 0];
        flow.dst_be = [q.saddr_be, 0, 0, 0];
        flow.proto = q.proto;
        ports_off = quoted + IPV4_HLEN;
    }
    if flow.proto != IPPROTO_TCP && flow.proto != IPPROTO_UDP {
        return drop(Counter::DropUnsupported);
    }
    if ports_off + 4 > end {
        return drop(Counter::DropMalformed);
    }
    let Some(ports) = ptr_at::<L4Ports>(ctx, ports_off) else {
        return drop(Counter::DropMalformed);
    };
    unsafe {
        flow.sport_be = (*ports).dport_be;
        flow.dport_be = (*ports).sport_be;
    }
    let hash = flow_hash64(&flow);
    let pick = match established(&flow, hash) {
        Some(pick) => pick,
        None => {
            let Some(vip) = vip_lookup(&flow) else {
                count(Counter::PassNotVip);
                return Action::Pass;
            };
            match ring_pick(&flow, hash, vip, Learn::No) {
                Ok(pick) => pick,
                Err(c) => return drop(c),
            }
        }
    };
    if p.ip_len + encap::overhead(pick.real) > cfg.mtu {
        return drop(Counter::DropMtu);
    }
    let bytes = frame_len(ctx);
    let inner = Inner {
        v6: p.v6,
        ip_len: p.ip_len,
        tos: p.tos,
        client_be: flow.src_be,
        sport_be: flow.sport_be,
    };
    match encap::encapsulate(ctx, cfg, pick.real, &inner) {
        Ok(action) => {
            account(pick.vip_id, pick.real_id, bytes);
            count(Counter::IcmpTooBigForwarded);
            action
        }
        Err(c) => drop(c),
    }
}

/// Bytes of the offending packet quoted in our too-big errors: its IP header and the first
/// 8 bytes of its payload (the ports), as RFC 792 asks; fixed so the checksum is unrolled.
const QUOTE_V4: usize = IPV4_HLEN + 8;
const QUOTE_V6: usize = IPV6_HLEN + 8;

/// The packet would exceed the MTU once encapsulated: answer with ICMP "fragmentation
/// needed" / ICMPv6 "packet too big" (or drop, as configured).
#[inline(always)]
pub fn too_big(ctx: &impl Packet, cfg: &LbConfig, p: &Parsed, real: &RealDef) -> Action {
    if cfg.flags & CFG_F_ICMP_TOO_BIG == 0 {
        return drop(Counter::DropMtu);
    }
    // The largest inner packet that still fits.
    let mtu = cfg.mtu.saturating_sub(encap::overhead(real));
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return drop(Counter::DropMalformed);
    };
    let (peer_mac, our_mac) = unsafe { ((*eth).src, (*eth).dst) };
    let ok = if p.v6 {
        too_big_v6(ctx, &p.flow, peer_mac, our_mac, mtu)
    } else {
        too_big_v4(ctx, &p.flow, peer_mac, our_mac, mtu)
    };
    if !ok {
        return drop(Counter::DropMtu);
    }
    count(Counter::IcmpTooBigSent);
    Action::Tx
}

#[inline(always)]
fn too_big_v4(ctx: &impl Packet, flow: &FlowKey, peer: [u8; 6], ours: [u8; 6], mtu: u32) -> bool {
    const ICMP_OFF: usize = ETH_HLEN + IPV4_HLEN;
    const TOTAL: usize = ICMP_OFF + 8 + QUOTE_V4;
    // Quoted bytes start where the original IP header already is once 28 bytes are added.
    if !ctx.reshape(IPV4_HLEN + 8, TOTAL) {
        return false;
    }
    let (Some(eth), Some(ip), Some(icmp)) = (
        ptr_at::<EthHdr>(ctx, 0),
        ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN),
        ptr_at::<[u16; (8 + QUOTE_V4) / 2]>(ctx, ICMP_OFF),
    ) else {
        return false;
    };
    let mut hdr = Ipv4Hdr {
        ver_ihl: 0x45,
        tos: 0,
        tot_len_be: ((IPV4_HLEN + 8 + QUOTE_V4) as u16).to_be(),
        id_be: 0,
        frag_off_be: 0,
        ttl: 64,
        proto: IPPROTO_ICMP,
        check: 0,
        saddr_be: flow.dst_be[0],
        daddr_be: flow.src_be[0],
    };
    hdr.check =
        !csum::fold(unsafe { csum::sum_words::<10>(&hdr as *const Ipv4Hdr as *const u16, 0) });
    unsafe {
        *eth = EthHdr {
            dst: peer,
            src: ours,
            proto_be: ETH_P_IP.to_be(),
        };
        *ip = hdr;
        let h = icmp.cast::<IcmpHdr>();
        *h = IcmpHdr {
            kind: ICMP_DEST_UNREACH,
            code: ICMP_FRAG_NEEDED,
            check: 0,
            rest: [0, (mtu as u16).to_be()],
        };
        (*h).check = !csum::fold(csum::sum_words::<{ (8 + QUOTE_V4) / 2 }>(icmp.cast(), 0));
    }
    true
}

#[inline(always)]
fn too_big_v6(ctx: &impl Packet, flow: &FlowKey, peer: [u8; 6], ours: [u8; 6], mtu: u32) -> bool {
    const ICMP_OFF: usize = ETH_HLEN + IPV6_HLEN;
    const TOTAL: usize = ICMP_OFF + 8 + QUOTE_V6;
    const ICMP_LEN: usize = 8 + QUOTE_V6;
    if !ctx.reshape(IPV6_HLEN + 8, TOTAL) {
        return false;
    }
    let (Some(eth), Some(ip), Some(icmp)) = (
        ptr_at::<EthHdr>(ctx, 0),
        ptr_at::<Ipv6Hdr>(ctx, ETH_HLEN),
        ptr_at::<[u16; ICMP_LEN / 2]>(ctx, ICMP_OFF),
    ) else {
        return false;
    };
    let hdr = Ipv6Hdr {
        vtc_flow_be: (6u32 << 28).to_be(),
        payload_len_be: (ICMP_LEN as u16).to_be(),
        nexthdr: IPPROTO_ICMPV6,
        hop_limit: 64,
        saddr_be: flow.dst_be,
        daddr_be: flow.src_be,
    };
    // Pseudo-header: addresses, upper-layer length, next header.
    let mut sum = csum::sum_addr(&hdr.saddr_be, 0);
    sum = csum::sum_addr(&hdr.daddr_be, sum);
    sum += (ICMP_LEN as u16).to_be() as u64 + (IPPROTO_ICMPV6 as u16).to_be() as u64;
    unsafe {
        *eth = EthHdr {
            dst: peer,
            src: ours,
            proto_be: ETH_P_IPV6.to_be(),
        };
        *ip = hdr;
        let h = icmp.cast::<IcmpHdr>();
        let mtu_be = mtu.to_be();
        *h = IcmpHdr {
            kind: ICMPV6_PKT_TOO_BIG,
            code: 0,
            check: 0,
            rest: [mtu_be as u16, (mtu_be >> 16) as u16],
        };
        (*h).check = !csum::fold(csum::sum_words::<{ ICMP_LEN / 2 }>(icmp.cast(), sum));
    }
    true
}
