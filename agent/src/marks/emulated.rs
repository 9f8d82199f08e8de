//! The emulated NIC's rule table: the `NIC_FLOWS` map read by the `marklb_emulated_nic` XDP
//! program in front of the balancer. The backend owns its own handle on that map
//! ([`NicFlowTable`]), so it needs nothing else from the datapath.

use std::collections::HashMap;

use marklb_common::FlowKey;

use super::{HwBackend, HwBackendError};
use crate::datapath::{Datapath, DatapathError, NicFlowTable};

/// Emulated mlx5-like NIC: 16-bit marks, rules in a BPF hash map.
pub struct EmulatedNic {
    table: NicFlowTable,
}

impl EmulatedNic {
    /// A backend on the datapath's rule map.
    pub fn new(dp: &Datapath) -> Result<Self, HwBackendError> {
        Ok(Self {
            table: dp.nic_flow_table()?,
        })
    }
}

impl HwBackend for EmulatedNic {
    fn name(&self) -> &'static str {
        "emulated"
    }

    fn max_mark(&self) -> u32 {
        u16::MAX as u32
    }

    fn install(&mut self, flow: &FlowKey, mark: u32) -> Result<(), HwBackendError> {
        self.table.set(flow, mark).map_err(|e| match e {
            DatapathError::Map {
                source: aya::maps::MapError::SyscallError(s),
                ..
            } if s.io_error.raw_os_error() == Some(libc::E2BIG) => HwBackendError::Full,
            other => HwBackendError::Datapath(other),
        })
    }

    fn remove(&mut self, flow: &FlowKey) -> Result<(), HwBackendError> {
        Ok(self.table.remove(flow)?)
    }

    fn hits(&mut self) -> Result<HashMap<FlowKey, u64>, HwBackendError> {
        Ok(self
            .table
            .rules()?
            .into_iter()
            .map(|(k, r)| (k, r.hits))
            .collect())
    }

    fn rules(&mut self) -> Result<Vec<(FlowKey, u32)>, HwBackendError> {
        Ok(self
            .table
            .rules()?
            .into_iter()
            .map(|(k, r)| (k, r.mark))
            .collect())
    }
}
