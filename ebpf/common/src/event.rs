// SPDX-License-Identifier: GPL-2.0 OR MIT
//! New-flow notifications: per-CPU rings in a plain mmapable array (`EVENT_SLOTS`, one
//! ring of [`EVENT_SLOTS_PER_CPU`] slots per CPU) with their positions in `EVENT_CURSORS`.
//!
//! Why not the kernel's ring buffer: its reserve and submit are two helper calls around a
//! spinlock shared by every CPU; a CPU's own ring is a few stores (the README's benchmark
//! compares the two). Each CPU's ring has one producer (XDP and TC programs do not nest on a CPU)
//! and one consumer (the agent), which polls it. A slot carries a check word over its
//! contents and its position, written last: a slot read before the datapath finished it,
//! or torn by two producers (a preemptible kernel, the test runner), reads as not an
//! event, so a wrong flow or real can never reach the mark manager. The kernel's ring
//! buffer (`EVENTS`) stays as the doorbell that wakes the consumer when it may be asleep.

use crate::flow::FlowKey;

/// Emitted when the normal path assigns a real to a new flow, so that user space can give
/// the flow (or the real) a mark and program the NIC.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NewFlowEvent {
    pub flow: FlowKey,
    pub vip_id: u32,
    pub real_id: u32,
    pub real_gen: u32,
    /// [`event_check`] of the rest and the slot's position; written last.
    pub check: u32,
    /// `bpf_ktime_get_ns()` when the packet was seen (CLOCK_MONOTONIC).
    pub ts_ns: u64,
}
const _: () = assert!(core::mem::size_of::<NewFlowEvent>() == 64);

/// Slots of a CPU's event ring (a power of two): 512 KiB a CPU, 40 ms of events at the
/// default limit of 200,000 a second per CPU, where the consumer drains every millisecond.
pub const EVENT_SLOTS_PER_CPU: u32 = 8192;

/// A CPU's positions in its ring (`EVENT_CURSORS[cpu]`), counted from 0 and never wrapped:
/// `head` (written by the datapath) is one past the last event published, `tail` (written
/// by the agent) one past the last consumed. Each side on its own cache line, and each
/// side keeps its own copy of the other's position, refreshed only when it seems to have
/// no room (the datapath) or nothing to read (the agent): an event then costs no miss on
/// the other side's line (the classic single-producer single-consumer ring).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventCursor {
    pub head: u64,
    /// The datapath's copy of `tail`, as of the last time the ring looked full.
    pub tail_seen: u64,
    pub _pad_head: [u64; 6],
    pub tail: u64,
    pub _pad_tail: [u64; 7],
}
const _: () = assert!(core::mem::size_of::<EventCursor>() == 128);

/// Byte offset of [`EventCursor::head`] and [`EventCursor::tail`] in a cursor.
pub const EVENT_CURSOR_HEAD: usize = core::mem::offset_of!(EventCursor, head);
pub const EVENT_CURSOR_TAIL: usize = core::mem::offset_of!(EventCursor, tail);

/// The check word of an event at position `pos` of its ring, whose flow's
/// `hash::flow_hash64` is `flow_hash`. The constant keeps a slot never written (all
/// zeros, check 0) from matching, but for one position in 2^32.
#[inline(always)]
pub const fn event_check(
    flow_hash: u64,
    vip_id: u32,
    real_id: u32,
    real_gen: u32,
    ts_ns: u64,
    pos: u64,
) -> u32 {
    let ids = (vip_id as u64 | ((real_id as u64) << 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let when = (ts_ns ^ pos.rotate_left(32) ^ real_gen as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    let x = flow_hash ^ ids ^ when.rotate_left(29) ^ 0x5bd1_e995_6d61_726b;
    (x ^ (x >> 32)) as u32
}

/// Index in `EVENT_SLOTS` of position `pos` of `cpu`'s ring.
#[inline(always)]
pub const fn event_slot(cpu: u32, pos: u64) -> u32 {
    cpu * EVENT_SLOTS_PER_CPU + (pos as u32 & (EVENT_SLOTS_PER_CPU - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_covers_every_field_and_the_position() {
        let base = event_check(7, 1, 2, 3, 4, 5);
        assert_ne!(base, event_check(8, 1, 2, 3, 4, 5));
        assert_ne!(base, event_check(7, 9, 2, 3, 4, 5));
        assert_ne!(base, event_check(7, 1, 9, 3, 4, 5));
        assert_ne!(base, event_check(7, 1, 2, 9, 4, 5));
        assert_ne!(base, event_check(7, 1, 2, 3, 9, 5));
        // The same slot one lap later.
        assert_ne!(
            base,
            event_check(7, 1, 2, 3, 4, 5 + EVENT_SLOTS_PER_CPU as u64)
        );
    }

    #[test]
    fn slots_of_a_cpu_wrap_within_its_ring() {
        assert_eq!(event_slot(0, 0), 0);
        assert_eq!(event_slot(1, 0), EVENT_SLOTS_PER_CPU);
        assert_eq!(
            event_slot(1, EVENT_SLOTS_PER_CPU as u64 + 3),
            EVENT_SLOTS_PER_CPU + 3
        );
    }
}
