// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Every map of the datapath. User space reaches them by these names
//! (`marklb_common::map_names`); capacities marked "default" are resized at load time.

use aya_ebpf::{
    Global,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use marklb_common::{
    ADDR_SETS, AddrSet, BenchFrame, ConnEntry, ConnSet, DEFAULT_CONN_TABLE_SIZE, DEFAULT_NIC_FLOWS,
    DEFAULT_RING_CAPACITY, EVENT_DOORBELL_BYTES, EVENT_SLOTS_PER_CPU, EventBucket, EventCursor,
    FlowKey, LbConfig, MAX_MARKS, MAX_REALS, MAX_VIP_ADDRS, MAX_VIPS, MarkEntry, NewFlowEvent,
    NicRule, RealDef, TrafficStats, VipKey, VipMeta, conn_sets, counters::NUM_COUNTERS,
};

/// `BPF_F_NO_COMMON_LRU`: each CPU evicts from its own LRU list (the benchmark's LRU
/// table, what the connection table was before its sets).
const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;
/// `BPF_F_MMAPABLE`: user space writes Maglev rings through mmap (65k entries per VIP
/// would take 65k syscalls otherwise) and reads the connection table the same way.
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Datapath-wide settings (one entry).
#[map]
pub static CONFIG: Array<LbConfig> = Array::with_max_entries(1, 0);

/// VIP (address, port, protocol) -> its ring and stats slot.
#[map]
pub static VIPS: HashMap<VipKey, VipMeta> = HashMap::with_max_entries(MAX_VIPS, 0);

/// Every address that carries a VIP, with the number of its VIPs: the authority behind
/// `VIP_ADDR_SETS`, read by the datapath only for a set that spilled.
#[map]
pub static VIP_ADDRS: HashMap<[u32; 4], u32> = HashMap::with_max_entries(MAX_VIP_ADDRS, 0);

/// The same addresses in sets of three (`marklb_common::addr_set`): lets packets for other
/// addresses pass after one array read.
#[map]
pub static VIP_ADDR_SETS: Array<AddrSet> = Array::with_max_entries(ADDR_SETS, 0);

/// vip_id -> generation of the VIP holding the slot (0: free).
#[map]
pub static VIP_GENS: Array<u32> = Array::with_max_entries(MAX_VIPS, 0);

/// real_id -> real server (index 0 unused).
#[map]
pub static REALS: Array<RealDef> = Array::with_max_entries(MAX_REALS, 0);

/// Maglev rings of all VIPs, back to back: slot `i` (a real id) is the low (even `i`) or
/// high (odd `i`) half of element `i / 2`. Array elements are 8-byte aligned in the
/// kernel, so two u32 slots per element keep the storage dense and mmap-able as plain u32s.
#[map]
pub static RINGS: Array<u64> = Array::with_max_entries(DEFAULT_RING_CAPACITY / 2, BPF_F_MMAPABLE);

/// Established connections: 4-way sets of flows (`marklb_common::conn`), one 256-byte set
/// an element (default capacity). Mmapable: the agent reads, counts and purges flows
/// through a mapping instead of a syscall per set.
#[map]
pub static CONN_TABLE: Array<ConnSet> =
    Array::with_max_entries(conn_sets(DEFAULT_CONN_TABLE_SIZE), BPF_F_MMAPABLE);

/// Sets of `CONN_TABLE` minus one. Set at load time to match the map the program gets (a
/// pinned one keeps its size), so that a flow's set is its hash masked by it.
#[unsafe(no_mangle)]
pub static CONN_SET_MASK: Global<u32> = Global::new(conn_sets(DEFAULT_CONN_TABLE_SIZE) - 1);

/// Benchmark only: the kernel LRU hash the connection table used to be, on per-CPU LRU
/// lists (`BPF_F_NO_COMMON_LRU`), which `bench --conn-table` measures against the sets.
/// Resized at load: the benchmark gives it the connection table's size, everything else a
/// token one.
#[map]
pub static BENCH_CONN_LRU: LruHashMap<FlowKey, ConnEntry> =
    LruHashMap::with_max_entries(DEFAULT_CONN_TABLE_SIZE, BPF_F_NO_COMMON_LRU);

/// Benchmark only: the same on one common LRU list (flags 0), resized like
/// `BENCH_CONN_LRU`.
#[map]
pub static BENCH_CONN_COMMON: LruHashMap<FlowKey, ConnEntry> =
    LruHashMap::with_max_entries(DEFAULT_CONN_TABLE_SIZE, 0);

/// Flow marks: mark -> real (the fast path's only lookup besides the real itself).
#[map]
pub static MARKS: Array<MarkEntry> = Array::with_max_entries(MAX_MARKS, 0);

/// Per-VIP packets and bytes, per CPU.
#[map]
pub static VIP_STATS: PerCpuArray<TrafficStats> = PerCpuArray::with_max_entries(MAX_VIPS, 0);

/// Per-real packets and bytes, per CPU.
#[map]
pub static REAL_STATS: PerCpuArray<TrafficStats> = PerCpuArray::with_max_entries(MAX_REALS, 0);

/// Per-path counters (`marklb_common::Counter`), per CPU.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_COUNTERS, 0);

/// New-flow events for the agent's mark manager: one ring of `EVENT_SLOTS_PER_CPU` per
/// possible CPU (`marklb_common::event`), mapped by the agent. Sized at load.
#[map]
pub static EVENT_SLOTS: Array<NewFlowEvent> =
    Array::with_max_entries(EVENT_SLOTS_PER_CPU, BPF_F_MMAPABLE);

/// Each CPU's positions in its ring of `EVENT_SLOTS`. Sized at load (possible CPUs).
#[map]
pub static EVENT_CURSORS: Array<EventCursor> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// The event consumer's doorbell: a record here (with a wake-up) tells the agent to drain
/// `EVENT_SLOTS` now rather than at its next poll. The benchmark loads it larger, to
/// measure whole events written here as they were before the per-CPU rings.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENT_DOORBELL_BYTES, 0);

/// Rate limiter state for new-flow events, per CPU.
#[map]
pub static EVENT_BUCKET: PerCpuArray<EventBucket> = PerCpuArray::with_max_entries(1, 0);

/// Emulated NIC: the "hardware" flow rules, 5-tuple -> mark and hits (default capacity).
#[map]
pub static NIC_FLOWS: HashMap<FlowKey, NicRule> = HashMap::with_max_entries(DEFAULT_NIC_FLOWS, 0);

/// Emulated NIC: where marked packets go next (the balancer).
#[map]
pub static NIC_NEXT: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Benchmark wrapper: the frame to restore before every repetition, one a CPU (indexed by
/// `bpf_get_smp_processor_id`; sized at load by the possible CPUs).
#[map]
pub static BENCH_FRAME: Array<BenchFrame> = Array::with_max_entries(1, 0);

/// Benchmark wrapper: the program under test.
#[map]
pub static BENCH_NEXT: ProgramArray = ProgramArray::with_max_entries(1, 0);
