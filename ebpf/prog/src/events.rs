// SPDX-License-Identifier: GPL-2.0 OR MIT
//! New-flow notifications to the agent's mark manager, bounded per CPU, through each CPU's
//! ring (`marklb_common::event`). Which packet of a
//! flow raises one is the normal path's business (`lb`, `marklb_common::event_due`).

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns},
};
use marklb_common::{
    CFG_F_EVENTS, CFG_F_WAKE_EVERY_EVENT, Counter, DEFAULT_UDP_EVENT_PACKETS, EVENT_SLOTS_PER_CPU,
    EVENT_WAKE_GAP_NS, FlowKey, LbConfig, NewFlowEvent, event_check, event_slot,
};

use crate::{
    maps::{EVENT_BUCKET, EVENT_CURSORS, EVENT_SLOTS, EVENTS},
    pick::Pick,
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

/// Whether this event should ring the consumer's doorbell: this CPU has not for
/// [`EVENT_WAKE_GAP_NS`] (a wake-up is an irq_work self-IPI, which costs more than the
/// whole rest of the event in a VM; the consumer polls anyway), or the benchmark asks for
/// one every time.
#[inline(always)]
fn doorbell_due(cfg: &LbConfig, now: u64) -> bool {
    if cfg.flags & CFG_F_WAKE_EVERY_EVENT != 0 {
        return true;
    }
    let Some(b) = EVENT_BUCKET.get_ptr_mut(0) else {
        return false;
    };
    unsafe {
        if now.wrapping_sub((*b).last_wake_ns) >= EVENT_WAKE_GAP_NS {
            (*b).last_wake_ns = now;
            true
        } else {
            false
        }
    }
}

/// Wakes the event consumer: a record in the doorbell ring, with a forced wake-up (the
/// ring's own rule wakes only for the first unread record). A full doorbell ring already
/// has the consumer's attention.
#[inline(always)]
pub fn ring_doorbell() {
    let cpu = unsafe { bpf_get_smp_processor_id() } as u64;
    let _ = EVENTS.output::<u64>(&cpu, BPF_RB_FORCE_WAKEUP as u64);
}

/// Tells user space that `flow` (whose `flow_hash64` is `hash`) was assigned `real_id`,
/// unless events are off, the CPU is over its rate, or its ring is full (each counted).
#[inline(always)]
pub fn notify(cfg: &LbConfig, flow: &FlowKey, hash: u64, pick: &Pick) {
    if cfg.flags & CFG_F_EVENTS == 0 {
        return;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    if !allow(cfg, now) {
        count(Counter::EventRateLimited);
        return;
    }
    if emit(flow, hash, pick, now) {
        count(Counter::EventSent);
        if doorbell_due(cfg, now) {
            ring_doorbell();
        }
    } else {
        count(Counter::EventLost);
    }
}

/// Writes one event into this CPU's ring (`marklb_common::event`); false: the ring is full.
#[inline(always)]
pub fn emit(flow: &FlowKey, hash: u64, pick: &Pick, now: u64) -> bool {
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let Some(cursor) = EVENT_CURSORS.get_ptr_mut(cpu) else {
        return false;
    };
    // Volatile: the agent reads `head` and writes `tail` through its mapping. The agent's
    // line (`tail`) is read only when the copy says the ring is full.
    let head = unsafe { read_volatile(&(*cursor).head) };
    if head.wrapping_sub(unsafe { (*cursor).tail_seen }) >= EVENT_SLOTS_PER_CPU as u64 {
        let tail = unsafe { read_volatile(&(*cursor).tail) };
        unsafe { (*cursor).tail_seen = tail };
        if head.wrapping_sub(tail) >= EVENT_SLOTS_PER_CPU as u64 {
            return false;
        }
    }
    let Some(e) = EVENT_SLOTS.get_ptr_mut(event_slot(cpu, head)) else {
        return false;
    };
    unsafe {
        write_event(e, flow, pick, now);
        // The check last, then the head: a slot is an event only once both are there.
        let check = event_check(
            hash,
            pick.vip_id,
            pick.real_id,
            pick.real.generation,
            now,
            head,
        );
        write_volatile(&mut (*e).check, check);
        write_volatile(&mut (*cursor).head, head + 1);
    }
    true
}

/// The event as the kernel ring buffer carried it before the per-CPU rings (reserve, write,
/// submit without a wake-up), for the benchmark's comparison; false: the ring is full.
#[inline(always)]
pub fn emit_to_kernel_ring(flow: &FlowKey, pick: &Pick, now: u64) -> bool {
    let Some(mut slot) = EVENTS.reserve::<NewFlowEvent>(0) else {
        return false;
    };
    let e = slot.as_mut_ptr();
    unsafe {
        write_event(e, flow, pick, now);
        (*e).check = 0;
    }
    slot.submit(BPF_RB_NO_WAKEUP as u64);
    true
}

/// Writes every field of the event at `e` but its check word. Field by field: a
/// whole-struct write becomes an out-of-line byte-by-byte memmove on BPF (hundreds of
/// instructions for 64 bytes).
///
/// # Safety
/// `e` points to a writable event (a map value or a reserved ring buffer record).
#[inline(always)]
unsafe fn write_event(e: *mut NewFlowEvent, flow: &FlowKey, pick: &Pick, now: u64) {
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
        (*e).vip_id = pick.vip_id;
        (*e).real_id = pick.real_id;
        (*e).real_gen = pick.real.generation;
        (*e).ts_ns = now;
    }
}
