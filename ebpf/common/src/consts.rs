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
/// Default connection-table size (established flows; rounded up to 4-way sets of a power
/// of two, `conn::conn_sets`): 131,072 sets, 32 MiB, about what the kernel LRU hash of
/// 262,144 flows it replaced took (104-112 bytes an element). A set overflows before the
/// table is full (more than 4 live flows hashed to it: its least recently used one gives
/// way, `conn_evicted`), so twice the slots keep 262,144 flows with few such evictions.
pub const DEFAULT_CONN_TABLE_SIZE: u32 = 1 << 19;
/// Default size of the emulated NIC's flow table (the "hardware" rules).
pub const DEFAULT_NIC_FLOWS: u32 = 1 << 16;
/// Size in bytes of the kernel ring buffer that only rings the event consumer's doorbell
/// (the events are in `EVENT_SLOTS`): one page, 256 doorbells.
pub const EVENT_DOORBELL_BYTES: u32 = 4096;
/// Largest frame the benchmark wrapper restores (bytes).
pub const BENCH_FRAME_MAX: usize = 128;

/// The program global holding `CONN_TABLE`'s number of sets minus one (set at load).
pub const CONN_SET_MASK_SYMBOL: &str = "CONN_SET_MASK";

/// Cuts of the benchmark's new-flow step program (`marklb_bench_step`), the packet's mark
/// (bits 0-7): cut `n` does steps 1..=n, so the difference between two consecutive cuts is
/// one step's cost. The datapath's program and the benchmark read these same numbers.
pub const BENCH_STEP_PARSE: u32 = 1;
pub const BENCH_STEP_VIP: u32 = 2;
pub const BENCH_STEP_MAGLEV: u32 = 3;
pub const BENCH_STEP_CONN: u32 = 4;
pub const BENCH_STEP_CLOCK: u32 = 5;
pub const BENCH_STEP_LIMITER: u32 = 6;
pub const BENCH_STEP_EVENT_RING: u32 = 7;
/// Not cumulative: the per-CPU ring's event, then the doorbell with its wake-up ...
pub const BENCH_STEP_DOORBELL: u32 = 8;
/// ... or instead of the per-CPU ring, the kernel ring buffer as events went before it.
pub const BENCH_STEP_KERNEL_RING: u32 = 9;

/// Variants of the benchmark's new-flow step program (`marklb_bench_step`), in the mark
/// above the step number (bits 0-7); none: the connection table's sets written as a SYN
/// does it. The kernel LRU hash instead, on per-CPU lists (`BENCH_CONN_LRU`) ...
pub const BENCH_STEP_LRU: u32 = 1 << 11;
/// ... or on one common list (`BENCH_CONN_COMMON`, flags 0); either written as a SYN did
/// it (look up, refresh a live entry with the same pick in place, else update) ...
pub const BENCH_STEP_COMMON_LRU: u32 = 1 << 8;
/// ... or always updated ...
pub const BENCH_STEP_UPDATE: u32 = 1 << 9;
/// ... or updated with `BPF_NOEXIST`.
pub const BENCH_STEP_NOEXIST: u32 = 1 << 10;

/// Slot of the balancer in the emulated NIC's program array.
pub const NIC_NEXT_BALANCER: u32 = 0;
/// Slot of the program under test in the benchmark wrapper's program array.
pub const BENCH_TARGET: u32 = 0;

pub mod map_names {
    pub const CONFIG: &str = "CONFIG";
    pub const VIPS: &str = "VIPS";
    pub const VIP_ADDRS: &str = "VIP_ADDRS";
    pub const VIP_ADDR_SETS: &str = "VIP_ADDR_SETS";
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
    pub const EVENT_SLOTS: &str = "EVENT_SLOTS";
    pub const EVENT_CURSORS: &str = "EVENT_CURSORS";
    pub const NIC_FLOWS: &str = "NIC_FLOWS";
    pub const NIC_NEXT: &str = "NIC_NEXT";
    pub const BENCH_FRAME: &str = "BENCH_FRAME";
    pub const BENCH_NEXT: &str = "BENCH_NEXT";
    pub const BENCH_CONN_COMMON: &str = "BENCH_CONN_COMMON";
    pub const BENCH_CONN_LRU: &str = "BENCH_CONN_LRU";
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
