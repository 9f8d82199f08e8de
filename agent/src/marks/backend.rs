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
    /// From here to `end_batch`, `install` may queue its rule and answer `Ok` before the
    /// device did (a NIC that takes several rules per request); the map entry of the mark
    /// is written already, so a rule that lands late only delays the fast path.
    fn begin_batch(&mut self) {}
    /// Sends what was queued; returns the flows whose rule the device refused (their marks
    /// must be released: those flows stay on the software path).
    fn end_batch(&mut self) -> Vec<(FlowKey, HwBackendError)> {
        Vec::new()
    }
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
    /// Mellanox/NVIDIA ConnectX (mlx5): tc flower rules with a mark action, offloaded
    /// (`skip_sw`); needs `--mark-delivery skb-mark`. Falls back to `none`, with the reason
    /// in the status, where the device cannot do it.
    Mellanox,
    /// `mellanox` where the device supports it, else `none` (with the reason).
    Auto,
}

/// How marks reach the datapath (`--mark-delivery`), and so which balancer program runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MarkDelivery {
    /// XDP balancer; the mark in 4 bytes of XDP metadata (a driver that puts it there, the
    /// emulated NIC's XDP program).
    XdpMetadata,
    /// TC ingress (tcx) balancer; the mark in `skb->mark`, low 16 bits (upstream mlx5's
    /// flow tag, the emulated NIC's TC program).
    SkbMark,
}

impl MarkDelivery {
    /// The name the CLI, the CRD status and the metrics use.
    pub fn name(self) -> &'static str {
        match self {
            MarkDelivery::XdpMetadata => "xdp-metadata",
            MarkDelivery::SkbMark => "skb-mark",
        }
    }
}

/// What goes on the interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// One XDP program: the balancer, or the emulated NIC that tail-calls it.
    Xdp(Prog),
    /// The TC balancer on a tcx link, behind the emulated NIC's TC program when `nic`.
    Tc { nic: bool },
}

/// A backend chosen for an interface, with what the datapath must attach in front of it.
pub struct SelectedBackend {
    pub backend: Box<dyn HwBackend>,
    /// Why this backend (status `hwBackendReason`), e.g. why `auto` fell back.
    pub reason: String,
    /// What to attach to the interface (the emulated NIC sits in front of the balancer;
    /// with a real NIC or none the balancer is attached itself).
    pub entry: Entry,
}

/// Builds the backend `kind` names for `iface`, preparing the datapath for it.
pub fn select(
    kind: HwBackendKind,
    delivery: MarkDelivery,
    dp: &mut Datapath,
    iface: &str,
) -> Result<SelectedBackend, HwBackendError> {
    let xdp = delivery == MarkDelivery::XdpMetadata;
    match kind {
        HwBackendKind::Emulated => {
            let nic = EmulatedNic::new(dp)?;
            let (reason, entry) = if xdp {
                dp.chain_nic_to_balancer()?;
                (
                    "--hw-backend emulated: the emulated NIC (XDP) marks known flows in XDP metadata",
                    Entry::Xdp(Prog::EmulatedNic),
                )
            } else {
                (
                    "--hw-backend emulated: the emulated NIC (tcx, in front of the TC balancer) marks known flows in skb->mark",
                    Entry::Tc { nic: true },
                )
            };
            Ok(SelectedBackend {
                backend: Box::new(nic),
                reason: reason.into(),
                entry,
            })
        }
        HwBackendKind::Mellanox | HwBackendKind::Auto => {
            Ok(select_mellanox(kind, delivery, dp, iface))
        }
        HwBackendKind::None => Ok(SelectedBackend {
            backend: Box::new(NoHwBackend),
            reason: "--hw-backend none: no flow marks, every packet takes the normal path".into(),
            entry: if xdp {
                Entry::Xdp(Prog::Balancer)
            } else {
                Entry::Tc { nic: false }
            },
        }),
    }
}

/// The mellanox backend when the device and the mark delivery allow it; otherwise no marks
/// (every packet on the software paths), saying why.
fn select_mellanox(
    kind: HwBackendKind,
    delivery: MarkDelivery,
    dp: &Datapath,
    iface: &str,
) -> SelectedBackend {
    let asked = if kind == HwBackendKind::Auto {
        "auto"
    } else {
        "mellanox"
    };
    let software = |why: String| {
        tracing::warn!(iface, reason = %why, "hardware flow marks unavailable; software paths only");
        SelectedBackend {
            backend: Box::new(NoHwBackend),
            reason: format!(
                "--hw-backend {asked}: no hardware flow marks, software paths only: {why}"
            ),
            entry: match delivery {
                MarkDelivery::XdpMetadata => Entry::Xdp(Prog::Balancer),
                MarkDelivery::SkbMark => Entry::Tc { nic: false },
            },
        }
    };
    if delivery != MarkDelivery::SkbMark {
        // Both reasons when both hold: the device first, then the delivery.
        let device = super::nic_probe::Capability::probe(iface)
            .map_err(|e| format!("probing {iface}: {e}"))
            .and_then(|c| c.check(iface))
            .err();
        let delivery = "upstream mlx5 delivers the flow tag in skb->mark, not in XDP metadata: use --mark-delivery skb-mark";
        return software(match device {
            Some(d) => format!("{d}; {delivery}"),
            None => delivery.into(),
        });
    }
    let live = |mark| super::mellanox::mark_is_live(dp, mark);
    match super::mellanox::Mellanox::open(iface, &live) {
        Ok((nic, cap)) => SelectedBackend {
            backend: Box::new(nic),
            reason: format!(
                "--hw-backend {asked}: mellanox, tc flower rules (skip_sw, skbedit mark -> mlx5 flow tag) on {iface} ({}), marks read from skb->mark",
                cap.summary()
            ),
            entry: Entry::Tc { nic: false },
        },
        Err(why) => software(why),
    }
}
