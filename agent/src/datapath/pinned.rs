//! Read-only access to a datapath through its pins, for `marklb-agent status`: no object
//! is loaded, nothing is created, pinned or written; works whether an agent runs or not.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd, AsRawFd},
    path::Path,
};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use marklb_common::{
    FlowKey, MarkEntry, NicRule, RealDef, TrafficStats, VipKey, VipMeta, map_names as n,
};

use super::maps::{counter_snapshot, stats_slot};
use super::{ConnTable, CounterSnapshot, DatapathError, Result, map_err};

/// The pinned maps `status` reads.
pub struct PinnedMaps {
    vips: HashMap<MapData, VipKey, VipMeta>,
    reals: Array<MapData, RealDef>,
    marks: Array<MapData, MarkEntry>,
    conn_table: ConnTable,
    _conn_map: MapData,
    nic_flows: HashMap<MapData, FlowKey, NicRule>,
    vip_stats: PerCpuArray<MapData, TrafficStats>,
    real_stats: PerCpuArray<MapData, TrafficStats>,
    counters: PerCpuArray<MapData, u64>,
    rings: MapData,
}

fn open(dir: &Path, name: &'static str) -> Result<MapData> {
    let path = dir.join(name);
    if !path.exists() {
        return Err(DatapathError::MissingMap(name));
    }
    MapData::from_pin(&path).map_err(map_err(name))
}

impl PinnedMaps {
    /// Opens the maps pinned in `dir` (`<bpffs>/marklb/<iface>/maps`).
    pub fn open(dir: &Path) -> Result<Self> {
        macro_rules! typed {
            ($variant:ident, $name:expr) => {
                Map::$variant(open(dir, $name)?)
                    .try_into()
                    .map_err(map_err($name))?
            };
        }
        let conn_map = open(dir, n::CONN_TABLE)?;
        let sets = conn_map
            .info()
            .map_err(map_err(n::CONN_TABLE))?
            .max_entries();
        let conn_table = ConnTable::map(conn_map.fd(), sets, false)?;
        Ok(Self {
            vips: typed!(HashMap, n::VIPS),
            reals: typed!(Array, n::REALS),
            marks: typed!(Array, n::MARKS),
            conn_table,
            _conn_map: conn_map,
            nic_flows: typed!(HashMap, n::NIC_FLOWS),
            vip_stats: typed!(PerCpuArray, n::VIP_STATS),
            real_stats: typed!(PerCpuArray, n::REAL_STATS),
            counters: typed!(PerCpuArray, n::COUNTERS),
            rings: open(dir, n::RINGS)?,
        })
    }

    pub fn vips(&self) -> Result<Vec<(VipKey, VipMeta)>> {
        self.vips
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(n::VIPS))
    }

    /// Every real slot in use (generation non-zero), by id.
    pub fn reals(&self) -> Result<BTreeMap<u32, RealDef>> {
        let mut out = BTreeMap::new();
        for id in 1..self.reals.len() {
            let def = self.reals.get(&id, 0).map_err(map_err(n::REALS))?;
            if def.generation != 0 {
                out.insert(id, def);
            }
        }
        Ok(out)
    }

    /// Every mark slot that points at a real (`real_id != 0`), by mark.
    pub fn marks(&self) -> Result<Vec<(u32, MarkEntry)>> {
        let mut out = Vec::new();
        for mark in 0..self.marks.len() {
            let e = self.marks.get(&mark, 0).map_err(map_err(n::MARKS))?;
            if e.real_id != 0 {
                out.push((mark, e));
            }
        }
        Ok(out)
    }

    pub fn marks_capacity(&self) -> u32 {
        self.marks.len()
    }

    pub fn conn_count(&self) -> usize {
        self.conn_table.len()
    }

    pub fn nic_flows(&self) -> Result<Vec<(FlowKey, NicRule)>> {
        self.nic_flows
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(n::NIC_FLOWS))
    }

    pub fn vip_stats(&self, vip_id: u32) -> Result<TrafficStats> {
        stats_slot(&self.vip_stats, n::VIP_STATS, vip_id)
    }

    pub fn real_stats(&self, real_id: u32) -> Result<TrafficStats> {
        stats_slot(&self.real_stats, n::REAL_STATS, real_id)
    }

    pub fn counters(&self) -> Result<CounterSnapshot> {
        counter_snapshot(&self.counters)
    }

    /// Slots of the shared ring storage.
    pub fn ring_capacity(&self) -> Result<u32> {
        let info = self.rings.info().map_err(map_err(n::RINGS))?;
        Ok(info.max_entries() * 2)
    }

    /// A VIP's Maglev ring (real ids), read through a read-only mapping of the storage.
    pub fn ring(&self, offset: u32, len: u32) -> Result<Vec<u32>> {
        let slots = self.ring_capacity()? as usize;
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let bytes = (slots * 4).div_ceil(page) * page;
        // SAFETY: a fresh shared read-only mapping of the whole (mmapable) array, unmapped
        // below; nothing else refers to it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ,
                libc::MAP_SHARED,
                self.rings.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DatapathError::Mmap(std::io::Error::last_os_error()));
        }
        let end = (offset as usize + len as usize).min(slots);
        let start = (offset as usize).min(end);
        // SAFETY: start..end lies inside the mapping of `slots` u32s.
        let ring = unsafe { std::slice::from_raw_parts(ptr.cast::<u32>().add(start), end - start) }
            .to_vec();
        unsafe { libc::munmap(ptr, bytes) };
        Ok(ring)
    }
}
