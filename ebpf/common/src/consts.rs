// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Capacities and map names. Capacities marked "default" can be changed at load time
//! (`EbpfLoader::set_max_entries`); the others are fixed by the datapath's layout.

/// VIP entries (address, port, protocol) and the size of the per-VIP stats array.
pub const MAX_VIPS: u32 = 4096;
/// Distinct VIP addresses (a VIP address may carry several ports and protocols).
pub const MAX_VIP_ADDRS: u32 = 4096;
/// Real servers; index 0 is never used so that `real_id == 0` means "none".
pub const MAX_REALS: u32 = 4096;
/// Flow marks; mlx5 delivers 16-bit marks, and mark 0 means "unknown flow".
pub const MAX_MARKS: u32 = 1 << 16;
/// Default size (slots, one u32 real id each; even) of the shared Maglev ring storage.
pub const DEFAULT_RING_CAPACITY: u32 = 1 << 22;
/// Default connection-table size (established flows).
pub const DEFAULT_CONN_TABLE_SIZE: u32 = 1 << 18;
/// Default size of the emulated NIC's flow table (the "hardware" rules).
pub const DEFAULT_NIC_FLOWS: u32 = 1 << 16;
/// New-flow event ring buffer size in bytes (power of two, page multiple).
pub const EVENT_RING_BYTES: u32 = 1 << 22;
/// Largest frame the benchmark wrapper restores (bytes).
pub const BENCH_FRAME_MAX: usize = 128;

/// Variants of the benchmark's new-flow step program (`marklb_bench_step`), in the mark
/// above the step number (bits 0-7): write the connection table on one common LRU list
/// (`BENCH_CONN_COMMON`, flags 0) instead of `CONN_TABLE`'s per-CPU lists ...
pub const BENCH_STEP_COMMON_LRU: u32 = 1 << 8;
/// ... always update (the write before SYNs refreshed a live entry in place) ...
pub const BENCH_STEP_UPDATE: u32 = 1 << 9;
/// ... update with `BPF_NOEXIST` ...
pub const BENCH_STEP_NOEXIST: u32 = 1 << 10;
/// ... or write the prototype set-associative table (`BENCH_CONN_SETS`) instead, whose
/// number of sets (a power of two) is `1 << ((mark >> BENCH_STEP_SETS_SHIFT) & 31)`.
pub const BENCH_STEP_SETS: u32 = 1 << 11;
pub const BENCH_STEP_SETS_SHIFT: u32 = 16;

/// Slot of the balancer in the emulated NIC's program array.
pub const NIC_NEXT_BALANCER: u32 = 0;
/// Slot of the program under test in the benchmark wrapper's program array.
pub const BENCH_TARGET: u32 = 0;

pub mod map_names {
    pub const CONFIG: &str = "CONFIG";
    pub const VIPS: &str = "VIPS";
    pub const VIP_ADDRS: &str = "VIP_ADDRS";
    pub const VIP_GENS: &str = "VIP_GENS";
    pub const REALS: &str = "REALS";
    pub const RINGS: &str = "RINGS";
    pub const CONN_TABLE: &str = "CONN_TABLE";
    pub const MARKS: &str = "MARKS";
    pub const VIP_STATS: &str = "VIP_STATS";
    pub const REAL_STATS: &str = "REAL_STATS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const EVENTS: &str = "EVENTS";
    pub const EVENT_BUCKET: &str = "EVENT_BUCKET";
    pub const NIC_FLOWS: &str = "NIC_FLOWS";
    pub const NIC_NEXT: &str = "NIC_NEXT";
    pub const BENCH_FRAME: &str = "BENCH_FRAME";
    pub const BENCH_NEXT: &str = "BENCH_NEXT";
    pub const BENCH_CONN_COMMON: &str = "BENCH_CONN_COMMON";
    pub const BENCH_CONN_SETS: &str = "BENCH_CONN_SETS";
}

pub mod prog_names {
    /// The balancer: mark fast path, then the normal Katran-class path.
    pub const BALANCER: &str = "marklb_balancer";
    /// Emulated NIC: sets the mark in XDP metadata for known flows, then tail-calls the balancer.
    pub const EMULATED_NIC: &str = "marklb_emulated_nic";
    /// The balancer at TC ingress (tcx): the mark comes in `skb->mark` (mlx5's flow tag).
    pub const BALANCER_TC: &str = "marklb_balancer_tc";
    /// Emulated NIC for `skb-mark` delivery: sets `skb->mark` for known flows, in front of
    /// the TC balancer (tcx order).
    pub const EMULATED_NIC_TC: &str = "marklb_emulated_nic_tc";
    /// Benchmark wrapper: restores the frame before every repetition, then tail-calls.
    pub const BENCH_RESTORE: &str = "marklb_bench_restore";
    /// Benchmark calibration: grows the frame by 20 bytes and returns XDP_TX.
    pub const BENCH_GROW: &str = "marklb_bench_grow";
    pub const BENCH_STEP: &str = "marklb_bench_step";
    /// Benchmark floor of the TC programs: returns TC_ACT_UNSPEC and nothing else.
    pub const BENCH_TRIVIAL_TC: &str = "marklb_bench_trivial_tc";
    /// Benchmark floor: returns XDP_PASS and nothing else.
    pub const BENCH_TRIVIAL: &str = "marklb_bench_trivial";
}

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_ICMPV6: u8 = 58;
