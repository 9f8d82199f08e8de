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

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbConfig {
    /// `CFG_F_*` bits.
    pub flags: u32,
    /// Largest outer IP packet (bytes, without Ethernet) the egress link carries.
    pub mtu: u32,
    /// Destination MAC of every forwarded packet (the next hop toward the reals).
    pub next_hop_mac: [u8; 6],
    pub _pad0: [u8; 2],
    /// Outer IPv4 source prefix (/16, network byte order); the low 16 bits come from the
    /// flow so that reals' NICs spread flows across receive queues (as Katran does).
    pub encap_src_v4_be: u32,
    /// Outer IPv6 source prefix (/96, network byte order); the last word comes from the flow.
    pub encap_src_v6_be: [u32; 4],
    /// New-flow events allowed per second per CPU (0: no events, e.g. marks are off).
    pub events_per_sec: u32,
    /// Burst of events a CPU may emit at once.
    pub events_burst: u32,
}
const _: () = assert!(core::mem::size_of::<LbConfig>() == 48);

/// Per-CPU token bucket that bounds new-flow events (a SYN flood must not starve user space).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBucket {
    /// Tokens available, in events.
    pub tokens: u64,
    /// Last refill time (`bpf_ktime_get_ns`).
    pub last_ns: u64,
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
    /// Whether the mark follows the flow (`mark + i`), for per-flow marks with many flows.
    pub mark_per_flow: u32,
    /// Repetition counter (wrapper-owned).
    pub seq: u32,
    pub data: [u8; crate::consts::BENCH_FRAME_MAX],
}
const _: () = assert!(core::mem::size_of::<BenchFrame>() == 24 + crate::consts::BENCH_FRAME_MAX);
