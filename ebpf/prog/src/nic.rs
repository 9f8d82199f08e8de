// SPDX-License-Identifier: GPL-2.0 OR MIT
//! The emulated NIC: what a ConnectX does in hardware with a flow rule and a mark action,
//! done in a small XDP program in front of the balancer, so the whole mark loop runs on
//! veth, in tests and in the demo.

use aya_ebpf::{
    bindings::{TC_ACT_UNSPEC, xdp_action},
    helpers::bpf_xdp_adjust_meta,
    programs::{TcContext, XdpContext},
};
use marklb_common::{Counter, NIC_NEXT_BALANCER};

use crate::{
    maps::{NIC_FLOWS, NIC_NEXT},
    parse::{self, Verdict},
    pkt::{Packet, linear_headers},
    stats::count,
};

/// The mark of the rule matching the packet's 5-tuple (counting the hit), or None.
#[inline(always)]
fn rule_mark(ctx: &impl Packet) -> Option<u32> {
    let Verdict::Flow(p) = parse::parse(ctx, |_| true) else {
        return None;
    };
    let rule = NIC_FLOWS.get_ptr_mut(&p.flow)?;
    unsafe {
        (*rule).hits += 1;
        Some((*rule).mark)
    }
}

/// Looks the packet's 5-tuple up in the flow rules; on a hit, writes the rule's mark into
/// 4 bytes of metadata in front of the packet.
#[inline(always)]
fn apply_rules(ctx: &XdpContext) {
    let Some(mark) = rule_mark(ctx) else {
        count(Counter::NicUnmarked);
        return;
    };
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -4) } != 0 {
        count(Counter::NicUnmarked);
        return;
    }
    let meta = ctx.metadata();
    if meta + 4 > ctx.data() {
        count(Counter::NicUnmarked);
        return;
    }
    unsafe { *(meta as *mut u32) = mark };
    count(Counter::NicMarked);
}

#[inline(always)]
pub fn emulate(ctx: &XdpContext) -> u32 {
    apply_rules(ctx);
    unsafe { NIC_NEXT.tail_call(ctx, NIC_NEXT_BALANCER) };
    count(Counter::NicTailCallFailed);
    xdp_action::XDP_PASS
}

/// The emulated NIC for `skb-mark` delivery: what mlx5 does with a flower rule's mark
/// action (the flow tag becomes `skb->mark`), as a tcx program in front of the balancer.
/// It always hands the packet on (`TC_ACT_UNSPEC`: the next tcx program, the balancer).
#[inline(always)]
pub fn emulate_skb_mark(ctx: &TcContext) -> i32 {
    let mark = if linear_headers(ctx) {
        rule_mark(ctx)
    } else {
        None
    };
    match mark {
        Some(mark) => {
            ctx.set_mark(mark);
            count(Counter::NicMarked);
        }
        None => count(Counter::NicUnmarked),
    }
    TC_ACT_UNSPEC
}
