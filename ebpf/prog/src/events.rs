// SPDX-License-Identifier: GPL-2.0 OR MIT
//! New-flow notifications to the agent's mark manager, bounded per CPU. Which packet of a
//! flow raises one is the normal path's business (`lb`, `marklb_common::event_due`).

use aya_ebpf::{
    bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::bpf_ktime_get_ns,
};
use marklb_common::{
    CFG_F_EVENTS, CFG_F_WAKE_EVERY_EVENT, Counter, DEFAULT_UDP_EVENT_PACKETS, EVENT_WAKE_GAP_NS,
    FlowKey, LbConfig, NewFlowEvent,
};

use crate::{
    maps::{EVENT_BUCKET, EVENTS},
    stats::count,
};

/// Packets a UDP flow needs before its event (`LbConfig::udp_event_packets`, 0: the
/// default).
#[inline(always)]
pub fn udp_threshold(cfg: &LbConfig) -> u16 {
    if cfg.udp_event_packets == 0 {
        DEFAULT_UDP_EVENT_PACKETS as u16
    } else {
        cfg.udp_event_packets as u16
    }
}

/// GCRA limiter (see `EventBucket`): true if this CPU may emit one more event now.
#[inline(always)]
pub fn allow(cfg: &LbConfig, now: u64) -> bool {
    let Some(b) = EVENT_BUCKET.get_ptr_mut(0) else {
        return false;
    };
    let interval = cfg.event_interval_ns as u64;
    let burst = if cfg.events_burst == 0 {
        1
    } else {
        cfg.events_burst as u64
    };
    let tat = unsafe { (*b).tat_ns };
    let tat = if tat > now { tat } else { now };
    if tat - now > (burst - 1) * interval {
        return false;
    }
    unsafe { (*b).tat_ns = tat + interval };
    true
}

/// Submit flags: wake the consumer if this CPU has not for [`EVENT_WAKE_GAP_NS`]
/// (forced: events submitted without a wake-up may be waiting in front of this one, and the
/// ring's own rule wakes only for the first unread record), otherwise no wake-up.
#[inline(always)]
fn wake_flags(cfg: &LbConfig, now: u64) -> u64 {
    if cfg.flags & CFG_F_WAKE_EVERY_EVENT != 0 {
        return 0;
    }
    let Some(b) = EVENT_BUCKET.get_ptr_mut(0) else {
        return 0;
    };
    unsafe {
        if now.wrapping_sub((*b).last_wake_ns) >= EVENT_WAKE_GAP_NS {
            (*b).last_wake_ns = now;
            BPF_RB_FORCE_WAKEUP as u64
        } else {
            BPF_RB_NO_WAKEUP as u64
        }
    }
}

/// Tells user space that `flow` was assigned `real_id`, unless events are off, the CPU is
/// over its rate, or the ring is full (each counted).
#[inline(always)]
pub fn notify(cfg: &LbConfig, flow: &FlowKey, vip_id: u32, real_id: u32, real_gen: u32) {
    if cfg.flags & CFG_F_EVENTS == 0 {
        return;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    if !allow(cfg, now) {
        count(Counter::EventRateLimited);
        return;
    }
    if emit(flow, vip_id, real_id, real_gen, now, wake_flags(cfg, now)) {
        count(Counter::EventSent);
    } else {
        count(Counter::EventLost);
    }
}

/// Writes one event into the ring and submits it with `flags`; false: the ring is full.
#[inline(always)]
pub fn emit(
    flow: &FlowKey,
    vip_id: u32,
    real_id: u32,
    real_gen: u32,
    now: u64,
    flags: u64,
) -> bool {
    let Some(mut slot) = EVENTS.reserve::<NewFlowEvent>(0) else {
        return false;
    };
    // Field by field: a whole-struct write becomes an out-of-line byte-by-byte memmove on
    // BPF (hundreds of instructions for 64 bytes).
    let e = slot.as_mut_ptr();
    unsafe {
        let f = &mut (*e).flow;
        for i in 0..4 {
            f.src_be[i] = flow.src_be[i];
            f.dst_be[i] = flow.dst_be[i];
        }
        f.sport_be = flow.sport_be;
        f.dport_be = flow.dport_be;
        f.proto = flow.proto;
        f._pad = [0; 3];
        (*e).vip_id = vip_id;
        (*e).real_id = real_id;
        (*e).real_gen = real_gen;
        (*e)._pad = 0;
        (*e).ts_ns = now;
    }
    slot.submit(flags);
    true
}
