// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Decides what happens to one frame: decapsulate (and how), pass untouched, or drop.
//! Shared by the XDP and TC entry points through [`Packet`], so both variants make the
//! same decision on the same bytes.
//!
//! Order of checks: whatever cannot be an encapsulated packet for us is passed untouched
//! after the cheapest possible tests (ethertype, version, protocol, then one map lookup);
//! only packets that are encapsulated *and* addressed to a local address are validated
//! further, and every inconsistency there drops the packet: the outer header is the only
//! thing vouching for the inner one, so a packet we cannot fully account for is never
//! handed to the stack as if it had arrived on a tunnel.

use marklb_common::{DecapCounter as C, IPPROTO_IPIP, IPPROTO_IPV6};

use crate::{csum, hdr::*};

/// Bytes the classifier may read: Ethernet, an IPv6 outer header and an IPv6 inner header
/// (also covers IPv4 outer + inner and an IPv6 fragment header).
pub const MAX_HEADERS: usize = ETH_HLEN + IPV6_HLEN + IPV6_HLEN;

/// Direct packet access for either program type.
pub trait Packet {
    /// Address of the first byte (the Ethernet header).
    fn start(&self) -> usize;
    /// One past the last byte directly accessible.
    fn end(&self) -> usize;
}

impl Packet for aya_ebpf::programs::XdpContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
}

impl Packet for aya_ebpf::programs::TcContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
}

/// A pointer to a `T` at `off` bytes into the packet, if that many bytes are there.
#[inline(always)]
pub fn ptr_at<T>(p: &impl Packet, off: usize) -> Option<*mut T> {
    let start = p.start();
    if start + off + core::mem::size_of::<T>() > p.end() {
        return None;
    }
    Some((start + off) as *mut T)
}

/// What to do with a frame.
pub enum Verdict {
    /// Remove `outer_len` bytes after the Ethernet header; the inner packet is IPv6 when
    /// `inner_v6`. Counted under `counter` once done.
    Decap {
        outer_len: usize,
        inner_v6: bool,
        counter: C,
    },
    /// Leave the frame alone.
    Pass(C),
    /// Drop the frame.
    Drop(C),
}

/// Classifies the frame. `len` is the whole frame length (for XDP the accessible bytes;
/// for TC `skb->len`, with at least the headers made linear); `is_local(addr, family_bit)`
/// says whether an outer destination is one of ours; `drop_foreign` drops encapsulated
/// packets for other destinations instead of passing them.
#[inline(always)]
pub fn classify(
    p: &impl Packet,
    len: usize,
    is_local: impl Fn(&[u32; 4], u32) -> bool,
    drop_foreign: bool,
) -> Verdict {
    let Some(eth) = ptr_at::<EthHdr>(p, 0) else {
        return Verdict::Pass(C::PassNotIp);
    };
    let proto = u16::from_be(unsafe { (*eth).proto_be });
    if proto == ETH_P_IP {
        outer_v4(p, len, is_local, drop_foreign)
    } else if proto == ETH_P_IPV6 {
        outer_v6(p, len, is_local, drop_foreign)
    } else {
        Verdict::Pass(C::PassNotIp)
    }
}

#[inline(always)]
fn foreign(drop_foreign: bool) -> Verdict {
    if drop_foreign {
        Verdict::Drop(C::DropNotForUs)
    } else {
        Verdict::Pass(C::PassNotForUs)
    }
}

/// An inner IPv4 header that claims exactly `len` bytes (the outer's payload).
#[inline(always)]
fn inner_v4_ok(ip: *const Ipv4Hdr, len: usize) -> bool {
    let ip = unsafe { &*ip };
    let ihl = (ip.ver_ihl & 0x0f) as usize * 4;
    ip.ver_ihl >> 4 == 4
        && ihl >= IPV4_HLEN
        && ihl <= len
        && u16::from_be(ip.tot_len_be) as usize == len
}

#[inline(always)]
fn outer_v4(
    p: &impl Packet,
    len: usize,
    is_local: impl Fn(&[u32; 4], u32) -> bool,
    drop_foreign: bool,
) -> Verdict {
    let Some(ipp) = ptr_at::<Ipv4Hdr>(p, ETH_HLEN) else {
        return Verdict::Pass(C::PassNotEncapsulated);
    };
    let ip = unsafe { &*ipp };
    if ip.ver_ihl >> 4 != 4 || ip.proto != IPPROTO_IPIP {
        return Verdict::Pass(C::PassNotEncapsulated);
    }
    if !is_local(&[ip.daddr_be, 0, 0, 0], marklb_common::decap::DECAP_ADDR_V4) {
        return foreign(drop_foreign);
    }
    // Encapsulated for us: from here on, anything we cannot account for is dropped.
    if ip.ver_ihl != 0x45 {
        return Verdict::Drop(if ip.ver_ihl & 0x0f < 5 {
            C::DropMalformed
        } else {
            C::DropIpOptions
        });
    }
    if u16::from_be(ip.frag_off_be) & 0x3fff != 0 {
        return Verdict::Drop(C::DropFragment);
    }
    if csum::fold(unsafe { csum::sum_words::<{ IPV4_HLEN / 2 }>(ipp.cast::<u16>(), 0) }) != 0xffff {
        return Verdict::Drop(C::DropBadChecksum);
    }
    let tot = u16::from_be(ip.tot_len_be) as usize;
    if tot < 2 * IPV4_HLEN || ETH_HLEN + tot > len {
        return Verdict::Drop(C::DropMalformed);
    }
    let Some(inner) = ptr_at::<Ipv4Hdr>(p, ETH_HLEN + IPV4_HLEN) else {
        return Verdict::Drop(C::DropMalformed);
    };
    if !inner_v4_ok(inner, tot - IPV4_HLEN) {
        return Verdict::Drop(C::DropMalformed);
    }
    Verdict::Decap {
        outer_len: IPV4_HLEN,
        inner_v6: false,
        counter: C::DecapIpip,
    }
}

#[inline(always)]
fn outer_v6(
    p: &impl Packet,
    len: usize,
    is_local: impl Fn(&[u32; 4], u32) -> bool,
    drop_foreign: bool,
) -> Verdict {
    let Some(ip) = ptr_at::<Ipv6Hdr>(p, ETH_HLEN) else {
        return Verdict::Pass(C::PassNotEncapsulated);
    };
    let ip = unsafe { &*ip };
    if u32::from_be(ip.vtc_flow_be) >> 28 != 6 {
        return Verdict::Pass(C::PassNotEncapsulated);
    }
    let nh = ip.nexthdr;
    if nh == IPV6_NEXTHDR_FRAGMENT {
        // Only a fragment of a tunnelled packet concerns us; other fragments go to the stack.
        let Some(frag_nh) = ptr_at::<u8>(p, ETH_HLEN + IPV6_HLEN) else {
            return Verdict::Pass(C::PassNotEncapsulated);
        };
        let frag_nh = unsafe { *frag_nh };
        if frag_nh != IPPROTO_IPIP && frag_nh != IPPROTO_IPV6 {
            return Verdict::Pass(C::PassNotEncapsulated);
        }
        if !is_local(&ip.daddr_be, marklb_common::decap::DECAP_ADDR_V6) {
            return foreign(drop_foreign);
        }
        return Verdict::Drop(C::DropFragment);
    }
    if nh != IPPROTO_IPV6 && nh != IPPROTO_IPIP {
        return Verdict::Pass(C::PassNotEncapsulated);
    }
    if !is_local(&ip.daddr_be, marklb_common::decap::DECAP_ADDR_V6) {
        return foreign(drop_foreign);
    }
    let payload = u16::from_be(ip.payload_len_be) as usize;
    if ETH_HLEN + IPV6_HLEN + payload > len {
        return Verdict::Drop(C::DropMalformed);
    }
    if nh == IPPROTO_IPV6 {
        if payload < IPV6_HLEN {
            return Verdict::Drop(C::DropMalformed);
        }
        let Some(inner) = ptr_at::<Ipv6Hdr>(p, ETH_HLEN + IPV6_HLEN) else {
            return Verdict::Drop(C::DropMalformed);
        };
        let inner = unsafe { &*inner };
        if u32::from_be(inner.vtc_flow_be) >> 28 != 6
            || IPV6_HLEN + u16::from_be(inner.payload_len_be) as usize != payload
        {
            return Verdict::Drop(C::DropMalformed);
        }
        Verdict::Decap {
            outer_len: IPV6_HLEN,
            inner_v6: true,
            counter: C::DecapIp6ip6,
        }
    } else {
        if payload < IPV4_HLEN {
            return Verdict::Drop(C::DropMalformed);
        }
        let Some(inner) = ptr_at::<Ipv4Hdr>(p, ETH_HLEN + IPV6_HLEN) else {
            return Verdict::Drop(C::DropMalformed);
        };
        if !inner_v4_ok(inner, payload) {
            return Verdict::Drop(C::DropMalformed);
        }
        Verdict::Decap {
            outer_len: IPV6_HLEN,
            inner_v6: false,
            counter: C::DecapIp4ip6,
        }
    }
}
