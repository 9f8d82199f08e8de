// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Benchmark support. `BPF_PROG_TEST_RUN` with `repeat > 1` does not restore the packet
//! between repetitions, so after one encapsulation every later repetition would measure
//! something else. This wrapper puts the original frame back (and the mark, and a varying
//! flow for many-flow runs) before tail-calling the program under test; its own cost is
//! measured the same way in front of a trivial program and subtracted.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, xdp_action},
    helpers::{
        bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_xdp_adjust_head, bpf_xdp_adjust_meta,
    },
    maps::LruHashMap,
    programs::XdpContext,
};
use marklb_common::{
    BENCH_FRAME_MAX, BENCH_STEP_CLOCK, BENCH_STEP_COMMON_LRU, BENCH_STEP_CONN, BENCH_STEP_DOORBELL,
    BENCH_STEP_EVENT_RING, BENCH_STEP_KERNEL_RING, BENCH_STEP_LIMITER, BENCH_STEP_LRU,
    BENCH_STEP_MAGLEV, BENCH_STEP_NOEXIST, BENCH_STEP_UPDATE, BENCH_STEP_VIP, BENCH_TARGET,
    ConnEntry, Counter, FlowKey, hash::flow_hash64,
};

use crate::{
    conn, events,
    hdr::TCP_ACK,
    maps::{BENCH_CONN_COMMON, BENCH_CONN_LRU, BENCH_FRAME, BENCH_NEXT, CONFIG},
    parse::{self, Verdict, ptr_at},
    pick::{Learn, new_entry, ring_pick, vip_lookup},
    pkt::Packet,
    stats::count,
    vip_addrs::is_vip_addr,
};

/// The new-flow path cut after a step (the step number comes as the packet's mark, which
/// the wrapper writes): parse, VIP lookup, Maglev read, connection-table write, clock
/// read, limiter, the event in this CPU's ring; [`BENCH_STEP_DOORBELL`] and
/// [`BENCH_STEP_KERNEL_RING`] are the two variants after it. Returns XDP_PASS, or
/// XDP_ABORTED if the path could not go as far as asked (the benchmark checks the action).
/// The mark's bits above the step choose how the write is done
/// (`marklb_common::BENCH_STEP_*`; none: as a SYN does it).
#[inline(always)]
pub fn step_program(ctx: &XdpContext) -> u32 {
    let mark = Packet::mark(ctx);
    let upto = mark & 0xff;
    let Verdict::Flow(p) = parse::parse(ctx, is_vip_addr) else {
        return xdp_action::XDP_ABORTED;
    };
    if upto < BENCH_STEP_VIP {
        return xdp_action::XDP_PASS;
    }
    let Some(vip) = vip_lookup(&p.flow) else {
        return xdp_action::XDP_ABORTED;
    };
    if upto < BENCH_STEP_MAGLEV {
        return xdp_action::XDP_PASS;
    }
    let hash = flow_hash64(&p.flow);
    let Ok(pick) = ring_pick(&p.flow, hash, vip, Learn::No) else {
        return xdp_action::XDP_ABORTED;
    };
    if upto >= BENCH_STEP_CONN {
        let entry = new_entry(pick.real_id, pick.real, vip);
        if mark & (BENCH_STEP_LRU | BENCH_STEP_COMMON_LRU) == 0 {
            conn::learn_syn(&p.flow, hash, &entry);
        } else {
            let table = if mark & BENCH_STEP_COMMON_LRU != 0 {
                &BENCH_CONN_COMMON
            } else {
                &BENCH_CONN_LRU
            };
            // Failures (a full LRU cannot fail; NOEXIST on a present key does) do not stop
            // the path, as in `pick::ring_pick`.
            if mark & BENCH_STEP_NOEXIST != 0 {
                let _ = table.insert(&p.flow, &entry, BPF_NOEXIST as u64);
            } else if mark & BENCH_STEP_UPDATE != 0 {
                let _ = table.insert(&p.flow, &entry, 0);
            } else {
                lru_learn_syn(table, &p.flow, &entry);
            }
        }
    }
    if upto < BENCH_STEP_CLOCK {
        return xdp_action::XDP_PASS;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    if upto < BENCH_STEP_LIMITER {
        return if now != 0 {
            xdp_action::XDP_PASS
        } else {
            xdp_action::XDP_ABORTED
        };
    }
    let Some(cfg) = CONFIG.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    if !events::allow(cfg, now) {
        return xdp_action::XDP_ABORTED;
    }
    if upto < BENCH_STEP_EVENT_RING {
        return xdp_action::XDP_PASS;
    }
    let written = if upto == BENCH_STEP_KERNEL_RING {
        events::emit_to_kernel_ring(&p.flow, &pick, now)
    } else {
        events::emit(&p.flow, hash, &pick, now)
    };
    // Counted as the datapath counts them: the benchmark checks that every repetition
    // wrote its event (a full ring's early return would measure something cheaper).
    if !written {
        count(Counter::EventLost);
        return xdp_action::XDP_ABORTED;
    }
    count(Counter::EventSent);
    if upto == BENCH_STEP_DOORBELL {
        events::ring_doorbell();
    }
    xdp_action::XDP_PASS
}

/// A SYN's write into a kernel LRU hash as the datapath did it before its sets: a live
/// entry with the same pick gets its packet count reset in place (the lookup marks it
/// recently used), anything else an update.
#[inline(always)]
fn lru_learn_syn(table: &LruHashMap<FlowKey, ConnEntry>, flow: &FlowKey, entry: &ConnEntry) {
    if let Some(c) = table.get_ptr_mut(flow) {
        let c = unsafe { &mut *c };
        if c.real_id == entry.real_id
            && c.real_gen == entry.real_gen
            && c.vip_id == entry.vip_id
            && c.vip_gen == entry.vip_gen
        {
            c.seen = entry.seen;
            return;
        }
    }
    let _ = table.insert(flow, entry, 0);
}

#[inline(always)]
pub fn restore(ctx: &XdpContext) -> u32 {
    // This CPU's frame: the benchmark floods the connection table from one CPU while it
    // measures on another, each restoring its own frame and counting its own repetitions.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let Some(frame) = BENCH_FRAME.get_ptr_mut(cpu) else {
        return xdp_action::XDP_ABORTED;
    };
    let frame = unsafe { &mut *frame };
    let len = frame.len as usize;
    if len > BENCH_FRAME_MAX || !len.is_multiple_of(8) {
        return xdp_action::XDP_ABORTED;
    }
    // The program under test may have grown the frame at the front (encapsulation).
    let cur = ctx.data_end() - ctx.data();
    if cur > len && unsafe { bpf_xdp_adjust_head(ctx.ctx, (cur - len) as i32) } != 0 {
        return xdp_action::XDP_ABORTED;
    }
    if ctx.data_end() - ctx.data() != len {
        return xdp_action::XDP_ABORTED;
    }
    let mut i = 0;
    while i < BENCH_FRAME_MAX / 8 {
        if i * 8 >= len {
            break;
        }
        let Some(dst) = ptr_at::<u64>(ctx, i * 8) else {
            return xdp_action::XDP_ABORTED;
        };
        unsafe {
            *dst = core::ptr::read_unaligned(frame.data.as_ptr().add(i * 8).cast::<u64>());
        }
        i += 1;
    }
    // In handshakes every flow goes twice: its SYN, then its ACK.
    let handshake = frame.handshake_tcp_off != 0;
    let flow_seq = if handshake { frame.seq >> 1 } else { frame.seq };
    if handshake && frame.seq & 1 == 1 {
        // The flags byte goes with the data offset before it: a 16-bit access, which the
        // verifier bounds where the compiler's check of a 1-byte one loses its range.
        let off = (frame.handshake_tcp_off as usize + 12) & 0x7f;
        let Some(word) = ptr_at::<u16>(ctx, off) else {
            return xdp_action::XDP_ABORTED;
        };
        unsafe { *word = ((u16::from_be(*word) & 0xff00) | TCP_ACK as u16).to_be() };
    }
    let n = if frame.flows > 1 {
        flow_seq % frame.flows
    } else {
        0
    };
    frame.seq = frame.seq.wrapping_add(1);
    if n != 0 {
        let Some(sport) = ptr_at::<u16>(ctx, (frame.sport_off as usize) & 0x7f) else {
            return xdp_action::XDP_ABORTED;
        };
        unsafe { *sport = (u16::from_be(*sport).wrapping_add(n as u16)).to_be() };
        if n >> 16 != 0 {
            let Some(saddr) = ptr_at::<u16>(ctx, (frame.saddr_off as usize) & 0x7f) else {
                return xdp_action::XDP_ABORTED;
            };
            unsafe { *saddr = (u16::from_be(*saddr).wrapping_add((n >> 16) as u16)).to_be() };
        }
    }
    // Metadata exactly as a NIC would leave it: 4 bytes with the mark, or none. (The
    // emulated NIC adds its own on every repetition; it must not pile up.)
    let want = if frame.mark != 0 { 4 } else { 0 };
    let have = ctx.data() - ctx.metadata();
    if have != want && unsafe { bpf_xdp_adjust_meta(ctx.ctx, have as i32 - want as i32) } != 0 {
        return xdp_action::XDP_ABORTED;
    }
    if frame.mark != 0 {
        let meta = ctx.metadata();
        if meta + 4 > ctx.data() {
            return xdp_action::XDP_ABORTED;
        }
        let mark = if frame.mark_span != 0 {
            frame.mark + n % frame.mark_span
        } else {
            frame.mark
        };
        unsafe { core::ptr::write_unaligned(meta as *mut u32, mark) };
    }
    unsafe { BENCH_NEXT.tail_call(ctx, BENCH_TARGET) };
    xdp_action::XDP_ABORTED
}
