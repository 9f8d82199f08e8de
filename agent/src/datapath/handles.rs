//! Handles on single maps for owners that live apart from the [`Datapath`]: the emulated
//! NIC's rule table (owned by that hardware backend) and the statistics maps (read by
//! `/metrics` without the node engine's lock). Each handle holds its own duplicate of the
//! map's descriptor: the kernel map is the same, so writes and reads through a handle are
//! exactly those through the datapath, and the handle stays valid whatever the datapath's
//! owner does with its lock.

use std::os::fd::AsFd;

use aya::maps::{HashMap, IterableMap, Map, MapData, MapError, PerCpuArray};
use marklb_common::{FlowKey, NicRule, TrafficStats, map_names as n};

use super::maps::{counter_snapshot, stats_slot};
use super::{CounterSnapshot, Datapath, Result, map_err};

/// A second descriptor of the same kernel map.
fn duplicate(name: &'static str, data: &MapData) -> Result<MapData> {
    let fd = data.fd().as_fd().try_clone_to_owned()?;
    MapData::from_fd(fd).map_err(map_err(name))
}

/// The emulated NIC's flow rules (`NIC_FLOWS`): packets of a flow get its mark.
pub struct NicFlowTable(HashMap<MapData, FlowKey, NicRule>);

impl NicFlowTable {
    /// Installs or replaces the rule of `flow` (hits start at 0).
    pub fn set(&mut self, flow: &FlowKey, mark: u32) -> Result<()> {
        let rule = NicRule {
            mark,
            _pad: 0,
            hits: 0,
        };
        self.0.insert(flow, rule, 0).map_err(map_err(n::NIC_FLOWS))
    }

    /// Removes the rule of `flow`; absent is fine.
    pub fn remove(&mut self, flow: &FlowKey) -> Result<()> {
        match self.0.remove(flow) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(n::NIC_FLOWS)(e)),
        }
    }

    /// Every rule (mark and hits).
    pub fn rules(&self) -> Result<Vec<(FlowKey, NicRule)>> {
        self.0
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(n::NIC_FLOWS))
    }
}

/// Read-only access to the per-CPU statistics: per VIP, per real, per path.
pub struct StatsReader {
    vip_stats: PerCpuArray<MapData, TrafficStats>,
    real_stats: PerCpuArray<MapData, TrafficStats>,
    counters: PerCpuArray<MapData, u64>,
}

fn per_cpu<V: aya::Pod>(
    name: &'static str,
    map: &PerCpuArray<MapData, V>,
) -> Result<PerCpuArray<MapData, V>> {
    let data = duplicate(name, map.map())?;
    PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(map_err(name))
}

impl StatsReader {
    /// Sum over CPUs of a VIP's stats slot.
    pub fn vip_stats(&self, vip_id: u32) -> Result<TrafficStats> {
        stats_slot(&self.vip_stats, n::VIP_STATS, vip_id)
    }

    /// Sum over CPUs of a real's stats slot.
    pub fn real_stats(&self, real_id: u32) -> Result<TrafficStats> {
        stats_slot(&self.real_stats, n::REAL_STATS, real_id)
    }

    /// Sum over CPUs of every path counter.
    pub fn counters(&self) -> Result<CounterSnapshot> {
        counter_snapshot(&self.counters)
    }
}

impl Datapath {
    /// A handle on the emulated NIC's rule table, for the backend that owns it.
    pub fn nic_flow_table(&self) -> Result<NicFlowTable> {
        let data = duplicate(n::NIC_FLOWS, self.nic_flows.map())?;
        HashMap::try_from(Map::HashMap(data))
            .map(NicFlowTable)
            .map_err(map_err(n::NIC_FLOWS))
    }

    /// A reader of the statistics maps, usable while the datapath itself is busy elsewhere.
    pub fn stats_reader(&self) -> Result<StatsReader> {
        Ok(StatsReader {
            vip_stats: per_cpu(n::VIP_STATS, &self.vip_stats)?,
            real_stats: per_cpu(n::REAL_STATS, &self.real_stats)?,
            counters: per_cpu(n::COUNTERS, &self.counters)?,
        })
    }
}
