//! Typed reads and writes of the datapath's maps.

use std::collections::BTreeMap;

use aya::maps::{MapData, PerCpuArray};
use marklb_common::{
    AddrSet, BenchFrame, ConnEntry, Counter, FlowKey, LbConfig, MarkEntry, NicRule, RealDef,
    TrafficStats, VipKey, VipMeta, addr_set, addr_set_of, map_names as n,
};

use super::{Datapath, DatapathError, EventReader, Result, map_err};

/// Sum over CPUs of every path counter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot(pub BTreeMap<&'static str, u64>);

impl CounterSnapshot {
    pub fn get(&self, c: Counter) -> u64 {
        self.0.get(c.label()).copied().unwrap_or(0)
    }

    /// Per-counter difference `self - earlier`.
    pub fn since(&self, earlier: &CounterSnapshot) -> CounterSnapshot {
        CounterSnapshot(
            self.0
                .iter()
                .map(|(k, v)| (*k, v.saturating_sub(earlier.0.get(k).copied().unwrap_or(0))))
                .collect(),
        )
    }
}

/// Sum over CPUs of slot `id` of a per-CPU stats map (VIP or real).
pub(crate) fn stats_slot(
    map: &PerCpuArray<MapData, TrafficStats>,
    name: &'static str,
    id: u32,
) -> Result<TrafficStats> {
    let per_cpu = map.get(&id, 0).map_err(map_err(name))?;
    Ok(per_cpu
        .iter()
        .fold(TrafficStats::default(), |a, v| TrafficStats {
            packets: a.packets + v.packets,
            bytes: a.bytes + v.bytes,
        }))
}

/// Sum over CPUs of every path counter.
pub(crate) fn counter_snapshot(map: &PerCpuArray<MapData, u64>) -> Result<CounterSnapshot> {
    counters_of(map, None)
}

/// Every path counter of `cpu`, or summed over CPUs.
fn counters_of(map: &PerCpuArray<MapData, u64>, cpu: Option<usize>) -> Result<CounterSnapshot> {
    let mut snap = BTreeMap::new();
    for &c in Counter::ALL {
        let per_cpu = map.get(&(c as u32), 0).map_err(map_err(n::COUNTERS))?;
        let value = match cpu {
            Some(cpu) => per_cpu.get(cpu).copied().unwrap_or(0),
            None => per_cpu.iter().sum(),
        };
        snap.insert(c.label(), value);
    }
    Ok(CounterSnapshot(snap))
}

impl Datapath {
    pub fn config(&self) -> Result<LbConfig> {
        self.config.get(&0, 0).map_err(map_err(n::CONFIG))
    }

    pub fn set_config(&mut self, cfg: &LbConfig) -> Result<()> {
        self.config.set(0, cfg, 0).map_err(map_err(n::CONFIG))
    }

    pub fn vip(&self, key: &VipKey) -> Option<VipMeta> {
        self.vips.get(key, 0).ok()
    }

    pub fn vips(&self) -> Result<Vec<(VipKey, VipMeta)>> {
        self.vips
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(n::VIPS))
    }

    /// Inserts or atomically replaces a VIP entry (hash map updates swap the whole value).
    pub fn set_vip(&mut self, key: &VipKey, meta: &VipMeta) -> Result<()> {
        self.vips.insert(key, meta, 0).map_err(map_err(n::VIPS))
    }

    pub fn remove_vip(&mut self, key: &VipKey) -> Result<()> {
        self.vips.remove(key).map_err(map_err(n::VIPS))
    }

    /// Number of VIP entries on an address, as the datapath sees it.
    pub fn vip_addr_refs(&self, addr_be: &[u32; 4]) -> u32 {
        self.vip_addrs.get(addr_be, 0).unwrap_or(0)
    }

    /// Sets an address's VIP count (0: not a VIP address), then its address set.
    pub fn set_vip_addr_refs(&mut self, addr_be: &[u32; 4], refs: u32) -> Result<()> {
        if refs == 0 {
            match self.vip_addrs.remove(addr_be) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(n::VIP_ADDRS)(e)),
            }
        } else {
            self.vip_addrs
                .insert(addr_be, refs, 0)
                .map_err(map_err(n::VIP_ADDRS))?;
        }
        self.sync_vip_addr_set(addr_be)
    }

    /// The address set of `addr_be`, as the datapath reads it.
    pub fn vip_addr_set(&self, addr_be: &[u32; 4]) -> Result<AddrSet> {
        self.vip_addr_sets
            .get(&addr_set_of(addr_be), 0)
            .map_err(map_err(n::VIP_ADDR_SETS))
    }

    /// Brings the set of `addr_be` in line with `VIP_ADDRS` (`marklb_common::addr_set`),
    /// whose change of that address was just written: the set's own addresses and this one
    /// are checked against it, or, for a set that spilled (which addresses spilled, only the
    /// hash map knows), every address in it.
    fn sync_vip_addr_set(&mut self, addr_be: &[u32; 4]) -> Result<()> {
        let idx = addr_set_of(addr_be);
        let current = self
            .vip_addr_sets
            .get(&idx, 0)
            .map_err(map_err(n::VIP_ADDR_SETS))?;
        let desired: Vec<[u32; 4]> = if current.spill != 0 {
            self.vip_addr_list()?
                .into_iter()
                .filter(|a| addr_set_of(a) == idx)
                .collect()
        } else {
            current
                .addrs
                .iter()
                .chain([addr_be])
                .filter(|a| self.vip_addrs.get(*a, 0).is_ok())
                .copied()
                .collect()
        };
        self.write_vip_addr_set(idx, &current, &desired)
    }

    /// Rewrites every address set from `VIP_ADDRS` (at load: the sets may be new, or from
    /// another run).
    pub(super) fn rebuild_vip_addr_sets(&mut self) -> Result<()> {
        let mut by_set: BTreeMap<u32, Vec<[u32; 4]>> = BTreeMap::new();
        for a in self.vip_addr_list()? {
            by_set.entry(addr_set_of(&a)).or_default().push(a);
        }
        for idx in 0..self.vip_addr_sets.len() {
            let current = self
                .vip_addr_sets
                .get(&idx, 0)
                .map_err(map_err(n::VIP_ADDR_SETS))?;
            let desired = by_set.get(&idx).map_or(&[][..], Vec::as_slice);
            self.write_vip_addr_set(idx, &current, desired)?;
        }
        Ok(())
    }

    fn vip_addr_list(&self) -> Result<Vec<[u32; 4]>> {
        self.vip_addrs
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err(n::VIP_ADDRS))
    }

    /// One whole-set update, and only if the set changes: addresses that stay keep their
    /// ways, so a concurrent reader can only misread the ways that change.
    fn write_vip_addr_set(
        &mut self,
        idx: u32,
        current: &AddrSet,
        desired: &[[u32; 4]],
    ) -> Result<()> {
        let next = addr_set::plan(current, desired);
        if next == *current {
            return Ok(());
        }
        self.vip_addr_sets
            .set(idx, next, 0)
            .map_err(map_err(n::VIP_ADDR_SETS))
    }

    /// Generation of a VIP slot (0: free).
    pub fn vip_gen(&self, vip_id: u32) -> Result<u32> {
        self.vip_gens.get(&vip_id, 0).map_err(map_err(n::VIP_GENS))
    }

    pub fn set_vip_gen(&mut self, vip_id: u32, generation: u32) -> Result<()> {
        self.vip_gens
            .set(vip_id, generation, 0)
            .map_err(map_err(n::VIP_GENS))
    }

    pub fn real(&self, id: u32) -> Result<RealDef> {
        self.reals.get(&id, 0).map_err(map_err(n::REALS))
    }

    pub fn set_real(&mut self, id: u32, real: &RealDef) -> Result<()> {
        self.reals.set(id, real, 0).map_err(map_err(n::REALS))
    }

    pub fn reals_capacity(&self) -> u32 {
        self.reals.len()
    }

    pub fn write_ring(&mut self, offset: u32, ring: &[u32]) -> Result<()> {
        self.rings.write(offset, ring)
    }

    pub fn read_ring(&self, offset: u32, len: u32) -> Vec<u32> {
        self.rings.read(offset, len)
    }

    pub fn ring_capacity(&self) -> u32 {
        self.rings.capacity()
    }

    pub fn conn(&self, flow: &FlowKey) -> Option<ConnEntry> {
        self.conn_table.get(flow)
    }

    /// Deletes the connection-table entries `matches` selects; returns how many. Used when a
    /// real leaves one VIP but stays in others (its slot, and so its generation, stay).
    pub fn purge_conns(&mut self, matches: impl Fn(&FlowKey, &ConnEntry) -> bool) -> Result<usize> {
        Ok(self.conn_table.remove_where(matches))
    }

    pub fn conn_count(&self) -> usize {
        self.conn_table.len()
    }

    pub fn mark(&self, mark: u32) -> Result<MarkEntry> {
        self.marks.get(&mark, 0).map_err(map_err(n::MARKS))
    }

    pub fn set_mark(&mut self, mark: u32, entry: &MarkEntry) -> Result<()> {
        self.marks.set(mark, entry, 0).map_err(map_err(n::MARKS))
    }

    /// Invalidates a mark: packets carrying it take the normal path from now on.
    pub fn clear_mark(&mut self, mark: u32) -> Result<()> {
        self.set_mark(mark, &MarkEntry::default())
    }

    pub fn marks_capacity(&self) -> u32 {
        self.marks.len()
    }

    /// Programs an emulated-NIC flow rule: packets of `flow` get `mark` in metadata.
    pub fn set_nic_flow(&mut self, flow: &FlowKey, mark: u32) -> Result<()> {
        let rule = NicRule {
            mark,
            _pad: 0,
            hits: 0,
        };
        self.nic_flows
            .insert(flow, rule, 0)
            .map_err(map_err(n::NIC_FLOWS))
    }

    pub fn remove_nic_flow(&mut self, flow: &FlowKey) -> Result<()> {
        match self.nic_flows.remove(flow) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(n::NIC_FLOWS)(e)),
        }
    }

    /// The emulated NIC's rule for a flow (mark and hits).
    pub fn nic_flow(&self, flow: &FlowKey) -> Option<NicRule> {
        self.nic_flows.get(flow, 0).ok()
    }

    /// Every emulated NIC rule.
    pub fn nic_flows(&self) -> Result<Vec<(FlowKey, NicRule)>> {
        self.nic_flows
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(n::NIC_FLOWS))
    }

    pub fn nic_flow_count(&self) -> usize {
        self.nic_flows.keys().count()
    }

    pub fn counters(&self) -> Result<CounterSnapshot> {
        counter_snapshot(&self.counters)
    }

    /// The path counters of one CPU: what the packets run there took, whatever other CPUs
    /// did meanwhile.
    pub fn counters_on(&self, cpu: usize) -> Result<CounterSnapshot> {
        counters_of(&self.counters, Some(cpu))
    }

    pub fn vip_stats(&self, vip_id: u32) -> Result<TrafficStats> {
        stats_slot(&self.vip_stats, n::VIP_STATS, vip_id)
    }

    pub fn real_stats(&self, real_id: u32) -> Result<TrafficStats> {
        stats_slot(&self.real_stats, n::REAL_STATS, real_id)
    }

    /// Zeroes a stats slot before it is given to a new VIP or real.
    pub fn reset_stats(&mut self, vip_id: Option<u32>, real_id: Option<u32>) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DatapathError::Io(e))?;
        let zero = || aya::maps::PerCpuValues::try_from(vec![TrafficStats::default(); cpus]);
        if let Some(id) = vip_id {
            let z = zero().map_err(DatapathError::Io)?;
            self.vip_stats
                .set(id, z, 0)
                .map_err(map_err(n::VIP_STATS))?;
        }
        if let Some(id) = real_id {
            let z = zero().map_err(DatapathError::Io)?;
            self.real_stats
                .set(id, z, 0)
                .map_err(map_err(n::REAL_STATS))?;
        }
        Ok(())
    }

    /// Gives every CPU's benchmark wrapper `frame`.
    pub fn set_bench_frame(&mut self, frame: &BenchFrame) -> Result<()> {
        for cpu in 0..self.bench_frame.len() {
            self.bench_frame
                .set(cpu, frame, 0)
                .map_err(map_err(n::BENCH_FRAME))?;
        }
        Ok(())
    }

    /// Gives the benchmark wrapper on `cpu` alone `frame` (another CPU may be running its
    /// own meanwhile).
    pub fn set_bench_frame_on(&mut self, cpu: usize, frame: &BenchFrame) -> Result<()> {
        self.bench_frame
            .set(cpu as u32, frame, 0)
            .map_err(map_err(n::BENCH_FRAME))
    }

    /// Hands out the new-flow event reader (once).
    pub fn take_events(&mut self) -> Option<EventReader> {
        self.events.take()
    }
}
