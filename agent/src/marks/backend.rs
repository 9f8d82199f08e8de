//! The hardware-backend seam: the trait every NIC backend implements, the command-line choice
//! and the selection that builds one.
//!
//! Invariants the mark manager relies on:
//! - `install` is called only after the mark's map entry is written, `remove` before it is
//!   cleared: a backend never needs to know about the mark map;
//! - `remove` of an absent rule is not an error (invalidation and aging may race a restart);
//! - `rules` and `hits` report what the device holds now, so a restarted agent can adopt it.

use std::collections::HashMap;

use marklb_common::FlowKey;

use super::EmulatedNic;
use crate::datapath::{Datapath, DatapathError, Prog};

/// Why a NIC rule could not be programmed.
#[derive(Debug, thiserror::Error)]
pub enum HwBackendError {
    #[error("datapath: {0}")]
    Datapath(#[from] DatapathError),
    #[error("NIC rule table full")]
    Full,
    #[error("{0}")]
    Device(String),
}

/// A NIC that tags packets of known flows with a mark (hardware flow rules).
pub trait HwBackend: Send {
    /// Short name for logs, metrics and status (`emulated`, `none`, `mellanox`).
    fn name(&self) -> &'static str;
    /// Largest mark the NIC can deliver (mlx5: 16 bits); 0: no marks at all.
    fn max_mark(&self) -> u32;
    /// Whether installed rules really mark packets (status `offloaded`).
    fn offloaded(&self) -> bool {
        self.max_mark() > 0
    }
    /// Installs or replaces the rule for `flow`.
    fn install(&mut self, flow: &FlowKey, mark: u32) -> Result<(), HwBackendError>;
    /// Removes the rule for `flow` (absent is fine).
    fn remove(&mut self, flow: &FlowKey) -> Result<(), HwBackendError>;
    /// Packets each rule matched so far (for aging idle flows).
    fn hits(&mut self) -> Result<HashMap<FlowKey, u64>, HwBackendError>;
    /// The rules installed now (to adopt them after a restart).
    fn rules(&mut self) -> Result<Vec<(FlowKey, u32)>, HwBackendError>;
}

/// No NIC acceleration: marks are never installed, every packet takes the normal path.
pub struct NoHwBackend;

impl HwBackend for NoHwBackend {
    fn name(&self) -> &'static str {
        "none"
    }
    fn max_mark(&self) -> u32 {
        0
    }
    fn install(&mut self, _: &FlowKey, _: u32) -> Result<(), HwBackendError> {
        Err(HwBackendError::Device("no hardware backend".into()))
    }
    fn remove(&mut self, _: &FlowKey) -> Result<(), HwBackendError> {
        Ok(())
    }
    fn hits(&mut self) -> Result<HashMap<FlowKey, u64>, HwBackendError> {
        Ok(HashMap::new())
    }
    fn rules(&mut self) -> Result<Vec<(FlowKey, u32)>, HwBackendError> {
        Ok(Vec::new())
    }
}

/// The hardware backend asked for on the command line (`--hw-backend`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HwBackendKind {
    /// The emulated NIC: an XDP program in front of the balancer marks known flows.
    Emulated,
    /// No NIC acceleration: every packet takes the normal path.
    None,
    /// The interface's NIC if a backend for it exists (the operator's default); this build
    /// has no hardware backend yet, so it is `none`, and the status says why.
    Auto,
}

/// A backend chosen for an interface, with what the datapath must attach in front of it.
pub struct SelectedBackend {
    pub backend: Box<dyn HwBackend>,
    /// Why this backend (status `hwBackendReason`), e.g. why `auto` fell back.
    pub reason: String,
    /// The XDP program to attach to the interface (the emulated NIC sits in front of the
    /// balancer; with a real NIC or none the balancer is attached itself).
    pub entry: Prog,
}

/// Builds the backend `kind` names for `iface`, preparing the datapath for it.
pub fn select(
    kind: HwBackendKind,
    dp: &mut Datapath,
    iface: &str,
) -> Result<SelectedBackend, HwBackendError> {
    match kind {
        HwBackendKind::Emulated => {
            let nic = EmulatedNic::new(dp)?;
            dp.chain_nic_to_balancer()?;
            Ok(SelectedBackend {
                backend: Box::new(nic),
                reason: "--hw-backend emulated: the emulated NIC (XDP) marks known flows".into(),
                entry: Prog::EmulatedNic,
            })
        }
        HwBackendKind::None => Ok(SelectedBackend {
            backend: Box::new(NoHwBackend),
            reason: "--hw-backend none: no flow marks, every packet takes the normal path".into(),
            entry: Prog::Balancer,
        }),
        HwBackendKind::Auto => Ok(SelectedBackend {
            backend: Box::new(NoHwBackend),
            reason: format!(
                "--hw-backend auto: no flow-mark NIC backend for {iface} in this build; every \
                 packet takes the normal path"
            ),
            entry: Prog::Balancer,
        }),
    }
}
