//! Loading the embedded object and holding its maps and programs.

use std::path::PathBuf;

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, PerCpuArray, ProgramArray},
    programs::{SchedClassifier, Xdp},
};
use marklb_common::{
    AddrSet, BenchFrame, CONN_SET_MASK_SYMBOL, ConnSet, DEFAULT_CONN_TABLE_SIZE, DEFAULT_NIC_FLOWS,
    DEFAULT_RING_CAPACITY, EVENT_DOORBELL_BYTES, EVENT_SLOTS_PER_CPU, FlowKey, LbConfig, MarkEntry,
    NicRule, RealDef, TrafficStats, VipKey, VipMeta, conn_sets, map_names as n, prog_names,
};

use super::{
    ConnTable, DatapathError, EventReader, Result, RingStore, map_err, pin_compat, prog_err,
};

/// The XDP object, built by build.rs from `ebpf/prog`.
pub(super) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/marklb-ebpf"));

/// Sizes chosen at load time, and where maps are pinned (None: not pinned).
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Slots of the shared Maglev ring storage (sum of all VIPs' table sizes, plus room
    /// for one ring being replaced).
    pub ring_capacity: u32,
    /// Established flows remembered, rounded up to 4-way sets of a power of two (beyond
    /// that, a set's least recently used flow gives way). A pinned table keeps its size.
    pub conn_table_size: u32,
    /// Flow rules of the emulated NIC.
    pub nic_flows: u32,
    /// bpffs directory where maps are pinned so a restarted agent adopts them.
    pub pin_dir: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            ring_capacity: DEFAULT_RING_CAPACITY,
            conn_table_size: DEFAULT_CONN_TABLE_SIZE,
            nic_flows: DEFAULT_NIC_FLOWS,
            pin_dir: None,
        }
    }
}

/// The programs in the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prog {
    Balancer,
    EmulatedNic,
    BenchRestore,
    BenchTrivial,
    BenchGrow,
    /// The new-flow path cut after the step given as the packet's mark.
    BenchStep,
}

impl Prog {
    pub const fn name(self) -> &'static str {
        match self {
            Prog::Balancer => prog_names::BALANCER,
            Prog::EmulatedNic => prog_names::EMULATED_NIC,
            Prog::BenchRestore => prog_names::BENCH_RESTORE,
            Prog::BenchTrivial => prog_names::BENCH_TRIVIAL,
            Prog::BenchGrow => prog_names::BENCH_GROW,
            Prog::BenchStep => prog_names::BENCH_STEP,
        }
    }
}

/// The TC programs in the object (`--mark-delivery skb-mark`): the same maps and paths as
/// the XDP ones, the mark read from `skb->mark`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcProg {
    /// The balancer at TC ingress.
    Balancer,
    /// The emulated NIC setting `skb->mark`, in front of the TC balancer.
    EmulatedNic,
    /// Benchmark floor: returns TC_ACT_UNSPEC.
    BenchTrivial,
}

impl TcProg {
    pub const fn name(self) -> &'static str {
        match self {
            TcProg::Balancer => prog_names::BALANCER_TC,
            TcProg::EmulatedNic => prog_names::EMULATED_NIC_TC,
            TcProg::BenchTrivial => prog_names::BENCH_TRIVIAL_TC,
        }
    }
}

/// Every map the agent uses, plus the object for its programs.
pub struct Datapath {
    pub(crate) ebpf: Ebpf,
    pub(crate) config: Array<MapData, LbConfig>,
    pub(crate) vips: HashMap<MapData, VipKey, VipMeta>,
    pub(crate) vip_addrs: HashMap<MapData, [u32; 4], u32>,
    pub(crate) vip_addr_sets: Array<MapData, AddrSet>,
    pub(crate) vip_gens: Array<MapData, u32>,
    pub(crate) reals: Array<MapData, RealDef>,
    pub(crate) rings: RingStore,
    pub(crate) conn_table: ConnTable,
    pub(crate) marks: Array<MapData, MarkEntry>,
    pub(crate) vip_stats: PerCpuArray<MapData, TrafficStats>,
    pub(crate) real_stats: PerCpuArray<MapData, TrafficStats>,
    pub(crate) counters: PerCpuArray<MapData, u64>,
    pub(crate) nic_flows: HashMap<MapData, FlowKey, NicRule>,
    pub(crate) nic_next: ProgramArray<MapData>,
    pub(crate) bench_frame: Array<MapData, BenchFrame>,
    pub(crate) bench_next: ProgramArray<MapData>,
    pub(crate) events: Option<EventReader>,
    /// Keep the mapped maps alive for their mappings.
    _rings_map: MapData,
    _conn_map: MapData,
}

impl Datapath {
    /// Every map of the object, by name: pinned under the pin directory when there is one.
    pub const PINNED_MAPS: &'static [&'static str] = ALL_MAPS;
}

/// Entries of the benchmark's LRU tables outside the benchmark (they are never written
/// there; preallocated, so kept small).
const BENCH_CONN_LRU_IDLE: u32 = 256;

pub(super) const ALL_MAPS: &[&str] = &[
    n::CONFIG,
    n::VIPS,
    n::VIP_ADDRS,
    n::VIP_ADDR_SETS,
    n::VIP_GENS,
    n::REALS,
    n::RINGS,
    n::CONN_TABLE,
    n::MARKS,
    n::VIP_STATS,
    n::REAL_STATS,
    n::COUNTERS,
    n::EVENTS,
    n::EVENT_BUCKET,
    n::EVENT_SLOTS,
    n::EVENT_CURSORS,
    n::NIC_FLOWS,
    n::NIC_NEXT,
    n::BENCH_FRAME,
    n::BENCH_NEXT,
];

/// Every map `load_sized` gives a size (`map_max_entries`): a pin of one keeps its own size.
pub(super) const SIZED_AT_LOAD: &[&str] = &[
    n::RINGS,
    n::CONN_TABLE,
    n::BENCH_CONN_LRU,
    n::BENCH_CONN_COMMON,
    n::NIC_FLOWS,
    n::EVENTS,
];

/// Bytes of the doorbell ring (`EVENTS`) in the benchmark, where whole events go through it
/// for the comparison with the per-CPU rings (4 MiB, what the event ring buffer was).
const DOORBELL_BYTES_BENCH: u32 = 1 << 22;

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map> {
    ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))
}

/// The sizes of the maps with an element a possible CPU (`bpf_get_smp_processor_id` ranges
/// over them): the event rings (`EVENT_SLOTS_PER_CPU` slots each) and their cursors, and
/// the benchmark wrapper's frames.
pub(super) fn per_cpu_sizes() -> std::io::Result<[(&'static str, u32); 3]> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)? as u32;
    Ok([
        (n::EVENT_SLOTS, cpus * EVENT_SLOTS_PER_CPU),
        (n::EVENT_CURSORS, cpus),
        (n::BENCH_FRAME, cpus),
    ])
}

/// A plain array map's data (for mapping it).
fn array_data(ebpf: &mut Ebpf, name: &'static str) -> Result<MapData> {
    match take(ebpf, name)? {
        Map::Array(data) => Ok(data),
        other => Err(DatapathError::NotAnArray {
            name,
            kind: map_kind(&other),
        }),
    }
}

/// The kind of `map` as aya names it ("HashMap", "PerCpuArray", ...): its variant, without
/// the map's data (an error names what a map is instead of calling it missing).
pub fn map_kind(map: &Map) -> String {
    let debug = format!("{map:?}");
    debug.split('(').next().unwrap_or(&debug).to_string()
}

macro_rules! typed {
    ($ebpf:expr, $name:expr) => {
        take($ebpf, $name)?.try_into().map_err(map_err($name))?
    };
}

impl Datapath {
    /// Loads the object: creates (or, with `pin_dir`, adopts pinned) maps. Programs are
    /// verified on first use ([`Datapath::program`]).
    pub fn load(opts: &LoadOptions) -> Result<Self> {
        Self::load_sized(opts, BENCH_CONN_LRU_IDLE, EVENT_DOORBELL_BYTES)
    }

    /// [`Datapath::load`] for the benchmark: its LRU connection tables (`BENCH_CONN_LRU`,
    /// `BENCH_CONN_COMMON`) get the connection table's size, to compare with it, and the
    /// kernel ring buffer room for the step that sends every event through it as before
    /// the per-CPU rings (a page fills within the consumer's sleep).
    pub fn load_for_bench(opts: &LoadOptions) -> Result<Self> {
        Self::load_sized(opts, opts.conn_table_size, DOORBELL_BYTES_BENCH)
    }

    fn load_sized(opts: &LoadOptions, bench_conn_lru: u32, doorbell_bytes: u32) -> Result<Self> {
        if let Some(dir) = &opts.pin_dir {
            pin_compat::replace_incompatible(dir)?;
        }
        let [(_, event_slots), (_, cpus), (_, bench_frames)] =
            per_cpu_sizes().map_err(DatapathError::Io)?;
        // After the check: a pinned table of another layout is gone by now.
        let conn_sets = conn_table_sets(opts);
        let conn_set_mask = conn_sets - 1;
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(n::RINGS, opts.ring_capacity.div_ceil(2))
            .map_max_entries(n::CONN_TABLE, conn_sets)
            .override_global(CONN_SET_MASK_SYMBOL, &conn_set_mask, true)
            .map_max_entries(n::BENCH_CONN_LRU, bench_conn_lru)
            .map_max_entries(n::BENCH_CONN_COMMON, bench_conn_lru)
            .map_max_entries(n::NIC_FLOWS, opts.nic_flows)
            .map_max_entries(n::EVENTS, doorbell_bytes)
            .map_max_entries(n::EVENT_SLOTS, event_slots)
            .map_max_entries(n::EVENT_CURSORS, cpus)
            .map_max_entries(n::BENCH_FRAME, bench_frames);
        let pins: Vec<(&'static str, PathBuf)> = match &opts.pin_dir {
            Some(dir) => ALL_MAPS.iter().map(|m| (*m, dir.join(m))).collect(),
            None => Vec::new(),
        };
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT)?;

        let rings_map = array_data(&mut ebpf, n::RINGS)?;
        let ring_entries = rings_map.info().map_err(map_err(n::RINGS))?.max_entries();
        // Two u32 ring slots per 8-byte array element.
        let rings = RingStore::map(rings_map.fd(), ring_entries * 2)?;
        let conn_map = array_data(&mut ebpf, n::CONN_TABLE)?;
        let sets = conn_map
            .info()
            .map_err(map_err(n::CONN_TABLE))?
            .max_entries();
        if sets != conn_sets {
            return Err(DatapathError::Capacity(format!(
                "the connection table has {sets} sets, the program was given {conn_sets}"
            )));
        }
        let conn_table = ConnTable::map(conn_map.fd(), sets, true)?;
        let events = EventReader::new(
            array_data(&mut ebpf, n::EVENT_SLOTS)?,
            array_data(&mut ebpf, n::EVENT_CURSORS)?,
            cpus,
            typed!(&mut ebpf, n::EVENTS),
        )?;

        let mut dp = Self {
            config: typed!(&mut ebpf, n::CONFIG),
            vips: typed!(&mut ebpf, n::VIPS),
            vip_addrs: typed!(&mut ebpf, n::VIP_ADDRS),
            vip_addr_sets: typed!(&mut ebpf, n::VIP_ADDR_SETS),
            vip_gens: typed!(&mut ebpf, n::VIP_GENS),
            reals: typed!(&mut ebpf, n::REALS),
            conn_table,
            marks: typed!(&mut ebpf, n::MARKS),
            vip_stats: typed!(&mut ebpf, n::VIP_STATS),
            real_stats: typed!(&mut ebpf, n::REAL_STATS),
            counters: typed!(&mut ebpf, n::COUNTERS),
            nic_flows: typed!(&mut ebpf, n::NIC_FLOWS),
            nic_next: typed!(&mut ebpf, n::NIC_NEXT),
            bench_frame: typed!(&mut ebpf, n::BENCH_FRAME),
            bench_next: typed!(&mut ebpf, n::BENCH_NEXT),
            events: Some(events),
            rings,
            _rings_map: rings_map,
            _conn_map: conn_map,
            ebpf,
        };
        // Adopted or new, the sets must say what the pinned authority says before any
        // program reads them (a tree before the sets left none).
        dp.rebuild_vip_addr_sets()?;
        Ok(dp)
    }

    /// The connection table.
    pub fn conn_table(&self) -> &ConnTable {
        &self.conn_table
    }

    pub fn conn_table_mut(&mut self) -> &mut ConnTable {
        &mut self.conn_table
    }

    /// A descriptor of its own on `prog` (loaded first if need be), for a user that
    /// outlives a borrow of the datapath: another thread, a link.
    pub(crate) fn program_fd(&mut self, prog: Prog) -> Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd;
        self.program(prog)?
            .fd()
            .map_err(prog_err(prog.name()))?
            .as_fd()
            .try_clone_to_owned()
            .map_err(DatapathError::Io)
    }

    /// The program, loaded into the kernel (verified) on first use.
    pub fn program(&mut self, prog: Prog) -> Result<&mut Xdp> {
        let name = prog.name();
        let xdp: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram(name))?
            .try_into()
            .map_err(prog_err(name))?;
        if xdp.fd().is_err() {
            xdp.load().map_err(prog_err(name))?;
        }
        Ok(xdp)
    }

    /// The TC program, loaded into the kernel (verified) on first use.
    pub fn tc_program(&mut self, prog: TcProg) -> Result<&mut SchedClassifier> {
        let name = prog.name();
        let tc: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram(name))?
            .try_into()
            .map_err(prog_err(name))?;
        if tc.fd().is_err() {
            tc.load().map_err(prog_err(name))?;
        }
        Ok(tc)
    }

    /// Puts the balancer behind the emulated NIC (the NIC tail-calls it).
    pub fn chain_nic_to_balancer(&mut self) -> Result<()> {
        let fd = self
            .program(Prog::Balancer)?
            .fd()
            .map_err(prog_err(Prog::Balancer.name()))?
            .try_clone();
        let fd = fd.map_err(DatapathError::Io)?;
        self.nic_next
            .set(marklb_common::NIC_NEXT_BALANCER, &fd, 0)
            .map_err(map_err(n::NIC_NEXT))
    }

    /// Makes `prog` the target of the benchmark wrapper.
    pub fn set_bench_target(&mut self, prog: Prog) -> Result<()> {
        let fd = self
            .program(prog)?
            .fd()
            .map_err(prog_err(prog.name()))?
            .try_clone();
        let fd = fd.map_err(DatapathError::Io)?;
        self.bench_next
            .set(marklb_common::BENCH_TARGET, &fd, 0)
            .map_err(map_err(n::BENCH_NEXT))
    }
}

/// Sets of the connection table the program will use: a pinned table's own (so a restarted
/// agent keeps its flows even when `conn_table_size` changed), else `conn_table_size`'s.
/// The program masks flow hashes with this number minus one, so it must be the map's.
fn conn_table_sets(opts: &LoadOptions) -> u32 {
    let pinned = opts
        .pin_dir
        .as_ref()
        .map(|dir| dir.join(n::CONN_TABLE))
        .filter(|p| p.exists())
        .and_then(|p| MapData::from_pin(p).ok())
        .and_then(|m| m.info().ok())
        .filter(|i| {
            i.value_size() as usize == size_of::<ConnSet>() && i.max_entries().is_power_of_two()
        });
    match pinned {
        Some(info) => info.max_entries(),
        None => conn_sets(opts.conn_table_size),
    }
}
