// SPDX-License-Identifier: GPL-2.0 OR MIT
//! marklb XDP datapath: entry points only; each concern lives in its own module.
#![no_std]
#![no_main]
// Map keys and values are passed by reference on purpose: by value, a 40-byte key can be
// copied again (even through an out-of-line memcpy) before the helper call.
#![allow(clippy::needless_borrows_for_generic_args)]

mod bench;
mod conn;
mod csum;
mod encap;
mod events;
mod hdr;
mod icmp;
mod lb;
mod maps;
mod mark;
mod nic;
mod parse;
mod pick;
mod pkt;
mod stats;
mod vip_addrs;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    helpers::bpf_redirect,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use marklb_common::{CFG_F_ENABLED, Counter};

use crate::{
    maps::CONFIG,
    pkt::{Action, Packet, linear_headers},
    stats::count,
};

/// Both balancers: mark fast path first, then the normal path.
#[inline(always)]
fn balance(ctx: &impl Packet) -> Action {
    let Some(cfg) = CONFIG.get(0).filter(|c| c.flags & CFG_F_ENABLED != 0) else {
        count(Counter::PassDisabled);
        return Action::Pass;
    };
    if let Some(action) = mark::fast_path(ctx, cfg) {
        return action;
    }
    lb::process(ctx, cfg)
}

/// The balancer at XDP, the mark in metadata (`--mark-delivery xdp-metadata`).
#[xdp]
pub fn marklb_balancer(ctx: XdpContext) -> u32 {
    match balance(&ctx) {
        Action::Pass => xdp_action::XDP_PASS,
        Action::Drop => xdp_action::XDP_DROP,
        Action::Tx => xdp_action::XDP_TX,
    }
}

/// The balancer at TC ingress (tcx), the mark in `skb->mark` (`--mark-delivery skb-mark`,
/// as mlx5 delivers a flower rule's flow tag). Not ours: `TC_ACT_UNSPEC`, so the next tcx
/// program (a decapsulator on the same interface) still sees it, then the stack.
/// Forwarded: out of the same device, as XDP_TX.
#[classifier]
pub fn marklb_balancer_tc(ctx: TcContext) -> i32 {
    if !linear_headers(&ctx) {
        count(Counter::PassMalformed);
        return TC_ACT_UNSPEC;
    }
    match balance(&ctx) {
        Action::Pass => {
            pkt::clear_flow_tag(&ctx);
            TC_ACT_UNSPEC
        }
        Action::Drop => TC_ACT_SHOT,
        Action::Tx => unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) as i32 },
    }
}

/// Emulated NIC for `skb-mark` delivery: a tcx program in front of the TC balancer.
#[classifier]
pub fn marklb_emulated_nic_tc(ctx: TcContext) -> i32 {
    nic::emulate_skb_mark(&ctx)
}

/// Emulated NIC in front of the balancer (see `nic`).
#[xdp]
pub fn marklb_emulated_nic(ctx: XdpContext) -> u32 {
    nic::emulate(&ctx)
}

/// Benchmark wrapper (see `bench`).
#[xdp]
pub fn marklb_bench_restore(ctx: XdpContext) -> u32 {
    bench::restore(&ctx)
}

/// Benchmark calibration: opens room for an outer IPv4 header as the forwarding paths do
/// (`Packet::open_outer`) and sends the frame, so the wrapper's cost of putting it back
/// (shrink, and the metadata of a marked frame) can be measured.
#[xdp]
pub fn marklb_bench_grow(ctx: XdpContext) -> u32 {
    if ctx.open_outer(20, false).is_none() {
        return xdp_action::XDP_ABORTED;
    }
    xdp_action::XDP_TX
}

/// Benchmark: the new-flow path cut after one step (see `bench::step_program`).
#[xdp]
pub fn marklb_bench_step(ctx: XdpContext) -> u32 {
    bench::step_program(&ctx)
}

/// Benchmark floor of the TC programs: the cheapest possible TC program.
#[classifier]
pub fn marklb_bench_trivial_tc(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

/// Benchmark floor: the cheapest possible XDP program.
#[xdp]
pub fn marklb_bench_trivial(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
