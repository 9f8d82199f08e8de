//! Flow marks: the mark manager (allocation, aging, invalidation) and the NIC backends
//! that program "packets of this flow carry this mark" rules.

mod emulated;
mod manager;

pub use emulated::EmulatedNic;
pub use manager::{MarkManager, MarkStats};

use std::collections::HashMap;

use marklb_common::FlowKey;

use crate::datapath::{Datapath, DatapathError};

/// Why a NIC rule could not be programmed.
#[derive(Debug, thiserror::Error)]
pub enum NicError {
    #[error("datapath: {0}")]
    Datapath(#[from] DatapathError),
    #[error("NIC rule table full")]
    Full,
    #[error("{0}")]
    Device(String),
}

/// A NIC that tags packets of known flows with a mark (hardware flow rules).
///
/// The emulated NIC keeps its rules in a BPF map, so the calls take the datapath; a real
/// NIC backend programs the device and ignores it.
pub trait NicMarks: Send {
    /// Short name for logs and metrics (`emulated`, `none`, `mellanox`).
    fn name(&self) -> &'static str;
    /// Largest mark the NIC can deliver (mlx5: 16 bits).
    fn max_mark(&self) -> u32;
    /// Installs or replaces the rule for `flow`.
    fn install(&mut self, dp: &mut Datapath, flow: &FlowKey, mark: u32) -> Result<(), NicError>;
    /// Removes the rule for `flow` (absent is fine).
    fn remove(&mut self, dp: &mut Datapath, flow: &FlowKey) -> Result<(), NicError>;
    /// Packets each rule matched so far (for aging idle flows).
    fn hits(&mut self, dp: &Datapath) -> Result<HashMap<FlowKey, u64>, NicError>;
    /// The rules installed now (to adopt them after a restart).
    fn rules(&mut self, dp: &Datapath) -> Result<Vec<(FlowKey, u32)>, NicError>;
}

/// No NIC acceleration: marks are never installed, every packet takes the normal path.
pub struct NoNic;

impl NicMarks for NoNic {
    fn name(&self) -> &'static str {
        "none"
    }
    fn max_mark(&self) -> u32 {
        0
    }
    fn install(&mut self, _: &mut Datapath, _: &FlowKey, _: u32) -> Result<(), NicError> {
        Err(NicError::Device("no NIC backend".into()))
    }
    fn remove(&mut self, _: &mut Datapath, _: &FlowKey) -> Result<(), NicError> {
        Ok(())
    }
    fn hits(&mut self, _: &Datapath) -> Result<HashMap<FlowKey, u64>, NicError> {
        Ok(HashMap::new())
    }
    fn rules(&mut self, _: &Datapath) -> Result<Vec<(FlowKey, u32)>, NicError> {
        Ok(Vec::new())
    }
}
