// SPDX-License-Identifier: GPL-2.0 OR MIT
//! The emulated NIC: what a ConnectX does in hardware with a flow rule and a mark action,
//! done in a small XDP program in front of the balancer, so the whole mark loop runs on
//! veth, in tests and in the demo.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_meta, programs::XdpContext};
use marklb_common::{Counter, NIC_NEXT_BALANCER};

use crate::{
    maps::{NIC_FLOWS, NIC_NEXT},
    parse::{self, Verdict},
    stats::count,
};

/// Looks the packet's 5-tuple up in the flow rules; on a hit, writes the rule's mark into
/// 4 bytes of metadata in front of the packet.
#[inline(always)]
fn apply_rules(ctx: &XdpContext) {
    let Verdict::Flow(p) = parse::parse(ctx, |_| true) else {
        count(Counter::NicUnmarked);
        return;
    };
    let Some(rule) = NIC_FLOWS.get_ptr_mut(&p.flow) else {
        count(Counter::NicUnmarked);
        return;
    };
    let mark = unsafe {
        (*rule).hits += 1;
        (*rule).mark
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
