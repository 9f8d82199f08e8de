// SPDX-License-Identifier: GPL-2.0 OR MIT
//! marklb decapsulator for the reals (`marklb-decap`): strips the outer header the balancer
//! added (IPv4-in-IPv4, IPv6-in-IPv6, IPv4-in-IPv6) from packets addressed to a local
//! address and passes the inner packet to the stack, where the kernel has no tunnel
//! devices (or where they are not wanted). Katran ships the same idea as `decap_kern.c`.
//!
//! Two entry points with one decision (`classify`): XDP (`marklb_decap`, native or
//! generic) and TC ingress (`marklb_decap_tc`, tcx or cls_bpf) for interfaces where XDP
//! cannot be used.
#![no_std]
#![no_main]

#[path = "../csum.rs"]
#[allow(dead_code)]
mod csum;
#[path = "../hdr.rs"]
#[allow(dead_code)]
mod hdr;

mod classify;

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_DECAP_L3_IPV6, BPF_F_ADJ_ROOM_FIXED_GSO,
        TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, xdp_action,
    },
    helpers::bpf_xdp_adjust_head,
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use marklb_common::{
    DecapCounter,
    decap::{DECAP_F_DROP_FOREIGN, MAX_DECAP_ADDRS, NUM_DECAP_COUNTERS},
};

use crate::{
    classify::{MAX_HEADERS, Verdict, classify, ptr_at},
    hdr::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, EthHdr},
};

/// Local addresses (network-order words; IPv4 in word 0) -> `DECAP_ADDR_V4`/`_V6` bits.
#[map]
static DECAP_ADDRS: HashMap<[u32; 4], u32> = HashMap::with_max_entries(MAX_DECAP_ADDRS, 0);

/// Per-path counters (`DecapCounter`), per CPU.
#[map]
static DECAP_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_DECAP_COUNTERS, 0);

/// `DECAP_F_*` flags (one entry).
#[map]
static DECAP_CONFIG: Array<u32> = Array::with_max_entries(1, 0);

#[inline(always)]
fn count(c: DecapCounter) {
    if let Some(p) = DECAP_COUNTERS.get_ptr_mut(c as u32) {
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn is_local(addr: &[u32; 4], family: u32) -> bool {
    match unsafe { DECAP_ADDRS.get(addr) } {
        Some(bits) => *bits & family != 0,
        None => false,
    }
}

#[inline(always)]
fn drop_foreign() -> bool {
    DECAP_CONFIG
        .get(0)
        .is_some_and(|f| *f & DECAP_F_DROP_FOREIGN != 0)
}

#[inline(always)]
fn inner_ethertype(inner_v6: bool) -> u16 {
    if inner_v6 { ETH_P_IPV6 } else { ETH_P_IP }.to_be()
}

/// XDP: decapsulated packets and everything not ours go on to the stack (`XDP_PASS`).
#[xdp]
pub fn marklb_decap(ctx: XdpContext) -> u32 {
    let len = ctx.data_end() - ctx.data();
    match classify(&ctx, len, is_local, drop_foreign()) {
        Verdict::Pass(c) => {
            count(c);
            xdp_action::XDP_PASS
        }
        Verdict::Drop(c) => {
            count(c);
            xdp_action::XDP_DROP
        }
        Verdict::Decap {
            outer_len,
            inner_v6,
            counter,
        } => match xdp_decap(&ctx, outer_len, inner_v6) {
            Ok(()) => {
                count(counter);
                xdp_action::XDP_PASS
            }
            Err(c) => {
                count(c);
                xdp_action::XDP_DROP
            }
        },
    }
}

/// Moves the start of the frame past the outer header and writes the Ethernet header
/// (same MACs, the inner packet's ethertype) in front of the inner packet.
#[inline(always)]
fn xdp_decap(ctx: &XdpContext, outer_len: usize, inner_v6: bool) -> Result<(), DecapCounter> {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Err(DecapCounter::DropAdjustFailed);
    };
    let old = unsafe { *eth };
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
        return Err(DecapCounter::DropAdjustFailed);
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Err(DecapCounter::DropAdjustFailed);
    };
    unsafe {
        *eth = EthHdr {
            dst: old.dst,
            src: old.src,
            proto_be: inner_ethertype(inner_v6),
        };
    }
    Ok(())
}

/// TC ingress: `TC_ACT_UNSPEC` (tcx: next program / cls_bpf: default action, i.e. on to
/// the stack) for decapsulated packets and everything not ours, `TC_ACT_SHOT` for drops.
#[classifier]
pub fn marklb_decap_tc(ctx: TcContext) -> i32 {
    // Direct access reaches only the linear part: make the headers linear first.
    let len = ctx.len() as usize;
    let want = if len < MAX_HEADERS { len } else { MAX_HEADERS };
    if ctx.data_end() - ctx.data() < want && ctx.pull_data(want as u32).is_err() {
        count(DecapCounter::PassNotEncapsulated);
        return TC_ACT_UNSPEC;
    }
    match classify(&ctx, len, is_local, drop_foreign()) {
        Verdict::Pass(c) => {
            count(c);
            TC_ACT_UNSPEC
        }
        Verdict::Drop(c) => {
            count(c);
            TC_ACT_SHOT
        }
        Verdict::Decap {
            outer_len,
            inner_v6,
            counter,
        } => match tc_decap(&ctx, outer_len, inner_v6) {
            Ok(()) => {
                count(counter);
                TC_ACT_UNSPEC
            }
            Err(c) => {
                count(c);
                TC_ACT_SHOT
            }
        },
    }
}

/// Removes the outer header between the MAC and the inner network header; the decap flag
/// makes the kernel set `skb->protocol` to the inner family, and the MAC header keeps its
/// addresses. `FIXED_GSO`: segments keep their size (the payload does not change).
#[inline(always)]
fn tc_decap(ctx: &TcContext, outer_len: usize, inner_v6: bool) -> Result<(), DecapCounter> {
    let family = if inner_v6 {
        BPF_F_ADJ_ROOM_DECAP_L3_IPV6
    } else {
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4
    };
    let flags = (family | BPF_F_ADJ_ROOM_FIXED_GSO) as u64;
    if ctx
        .adjust_room(-(outer_len as i32), BPF_ADJ_ROOM_MAC, flags)
        .is_err()
    {
        return Err(DecapCounter::DropAdjustFailed);
    }
    let proto = inner_ethertype(inner_v6);
    if ctx.skb.store(ETH_HLEN - 2, &proto, 0).is_err() {
        return Err(DecapCounter::DropAdjustFailed);
    }
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
