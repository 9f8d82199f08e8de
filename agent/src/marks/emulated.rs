//! The emulated NIC's rule table: the `NIC_FLOWS` map read by the `marklb_emulated_nic`
//! XDP program in front of the balancer.

use std::collections::HashMap;

use marklb_common::FlowKey;

use super::{NicError, NicMarks};
use crate::datapath::Datapath;

/// Emulated mlx5-like NIC: 16-bit marks, rules in a BPF hash map.
pub struct EmulatedNic;

impl NicMarks for EmulatedNic {
    fn name(&self) -> &'static str {
        "emulated"
    }

    fn max_mark(&self) -> u32 {
        u16::MAX as u32
    }

    fn install(&mut self, dp: &mut Datapath, flow: &FlowKey, mark: u32) -> Result<(), NicError> {
        dp.set_nic_flow(flow, mark).map_err(|e| match e {
            crate::datapath::DatapathError::Map {
                source: aya::maps::MapError::SyscallError(s),
                ..
            } if s.io_error.raw_os_error() == Some(libc::E2BIG) => NicError::Full,
            other => NicError::Datapath(other),
        })
    }

    fn remove(&mut self, dp: &mut Datapath, flow: &FlowKey) -> Result<(), NicError> {
        Ok(dp.remove_nic_flow(flow)?)
    }

    fn hits(&mut self, dp: &Datapath) -> Result<HashMap<FlowKey, u64>, NicError> {
        Ok(dp
            .nic_flows()?
            .into_iter()
            .map(|(k, r)| (k, r.hits))
            .collect())
    }

    fn rules(&mut self, dp: &Datapath) -> Result<Vec<(FlowKey, u32)>, NicError> {
        Ok(dp
            .nic_flows()?
            .into_iter()
            .map(|(k, r)| (k, r.mark))
            .collect())
    }
}
