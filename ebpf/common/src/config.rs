// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Datapath-wide settings written by user space (single-entry array `CONFIG`).

/// The datapath forwards nothing until user space sets this flag (after the rest of the
/// configuration is in place): an unconfigured program passes every packet.
pub const CFG_F_ENABLED: u32 = 1 << 0;
/// Answer packets that would exceed the MTU after encapsulation with ICMP "fragmentation
/// needed" / ICMPv6 "packet too big"; without the flag they are dropped and counted.
pub const CFG_F_ICMP_TOO_BIG: u32 = 1 << 1;
/// Answer ICMP / ICMPv6 echo requests sent to a VIP address.
pub const CFG_F_ICMP_ECHO: u32 = 1 << 2;
/// Emit new-flow events (flow marks are on).
pub const CFG_F_EVENTS: u32 = 1 << 3;
/// Ring the event consumer's doorbell, with a forced wake-up, on every event instead of at
/// most once per [`EVENT_WAKE_GAP_NS`] per CPU. Only the benchmark sets it, to measure the
/// difference.
pub const CFG_F_WAKE_EVERY_EVENT: u32 = 1 << 4;

/// Per CPU, an event wakes the consumer only if the last wake-up was this long ago; the
/// events in between are submitted with `BPF_RB_NO_WAKEUP` (a wake-up is an irq_work
/// self-IPI, which costs more than the whole rest of the event in a VM). The consumer
/// drains the ring on a timer as well ([`EVENT_POLL_NS`]), so no event waits longer.
pub const EVENT_WAKE_GAP_NS: u64 = 100_000;
/// The consumer's drain period besides wake-ups: the longest an event can wait.
pub const EVENT_POLL_NS: u64 = 1_000_000;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbConfig {
    /// `CFG_F_*` bits.
    pub flags: u32,
    /// Largest outer IP packet (bytes, without Ethernet) the egress link carries.
    pub mtu: u32,
    /// Destination MAC of every forwarded packet (the next hop toward the reals).
    pub next_hop_mac: [u8; 6],
    /// Packets a UDP flow must send through the normal path before it raises its new-flow
    /// event (0: `DEFAULT_UDP_EVENT_PACKETS`). TCP flows raise theirs on the first packet
    /// after the SYN (`TCP_EVENT_PACKETS`).
    pub udp_event_packets: u8,
    pub _pad0: u8,
    /// Outer IPv4 source prefix (/16, network byte order); the low 16 bits come from the
    /// flow so that reals' NICs spread flows across receive queues (as Katran does).
    pub encap_src_v4_be: u32,
    /// Outer IPv6 source prefix (/96, network byte order); the last word comes from the flow.
    pub encap_src_v6_be: [u32; 4],
    /// Minimum spacing of new-flow events per CPU, in ns (`1e9 / events per second`;
    /// 0 with `CFG_F_EVENTS`: unlimited).
    pub event_interval_ns: u32,
    /// Burst of events a CPU may emit at once.
    pub events_burst: u32,
}
const _: () = assert!(core::mem::size_of::<LbConfig>() == 44);

/// Per-CPU limiter state for new-flow events (a SYN flood must not starve user space).
/// It is GCRA: each event pushes the theoretical arrival time forward by one interval
/// (`event_interval_ns`); an event is allowed while that time stays within
/// `events_burst` intervals of now.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBucket {
    /// Theoretical arrival time of the next event (`bpf_ktime_get_ns` clock).
    pub tat_ns: u64,
    /// When this CPU last woke the event consumer (`bpf_ktime_get_ns` clock).
    pub last_wake_ns: u64,
}
const _: () = assert!(core::mem::size_of::<EventBucket>() == 16);

/// The frame the benchmark wrapper restores before every repetition.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BenchFrame {
    /// Bytes of `data` that form the frame.
    pub len: u32,
    /// Mark to place in XDP metadata (0: leave no metadata).
    pub mark: u32,
    /// Vary the flow on every repetition over this many flows (0 or 1: one flow).
    pub flows: u32,
    /// Byte offset of the 16-bit source port that varies (network byte order).
    pub sport_off: u32,
    /// Byte offset of the low 16 bits of the source address; flow `i` adds `i >> 16`
    /// there, so more than 65,536 flows stay distinct.
    pub saddr_off: u32,
    /// With many flows, flow `i` carries mark `mark + i % mark_span` (0: always `mark`):
    /// `flows` for per-flow marks, the number of reals for per-real marks.
    pub mark_span: u32,
    /// Repetition counter (wrapper-owned).
    pub seq: u32,
    /// Non-zero: byte offset of the TCP header, and the repetitions go in handshakes: the
    /// even ones send flow `seq / 2` as the frame has it (a SYN), the odd ones the same
    /// flow with its flags set to a bare ACK. 0: every repetition sends the frame's flags.
    pub handshake_tcp_off: u32,
    pub data: [u8; crate::consts::BENCH_FRAME_MAX],
    /// Unused: `BENCH_FRAME` holds one frame a CPU, and the wrapper writes `seq` on every
    /// repetition; at 192 bytes the bytes one CPU's wrapper touches (the header and a frame
    /// of at most 80 bytes) never share a cache line with another CPU's.
    pub _pad: [u8; 32],
}
const _: () = assert!(core::mem::size_of::<BenchFrame>() == 192);
