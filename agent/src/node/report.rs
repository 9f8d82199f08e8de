//! What a node programmed, per owner (LoadBalancer): the standalone agent serves it on
//! `/status`, the Kubernetes mode writes it into each node state's status.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::NodeHandle;
use crate::desired::{Owner, OwnerVerdict};

/// One owner's share of the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnerReport {
    /// `namespace/name` (standalone manifests without namespace: `name`).
    pub owner: String,
    /// Every VIP of the owner is programmed.
    pub serving: bool,
    /// The owner that holds what this one asked for, when it lost a conflict.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conflict_with: Option<String>,
    /// Why it is not served, when it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    pub vips: u32,
    pub reals: u32,
    pub marks_in_use: u32,
}

/// The node as a whole, and per owner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeReport {
    pub interface: String,
    /// `native`, `generic` (XDP), when attached.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xdp_mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub program_id: Option<u32>,
    pub hw_backend: String,
    pub hw_backend_reason: String,
    /// How marks reach the datapath (`xdp-metadata`).
    pub mark_delivery: String,
    /// Marks really reach packets (a NIC or the emulated NIC).
    pub offloaded: bool,
    /// A desired state is applied.
    pub applied: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pin_problem: Option<String>,
    pub vips: u32,
    pub reals: u32,
    pub marks_in_use: u32,
    /// In merge (priority) order is not kept here: sorted by owner.
    pub owners: Vec<OwnerReport>,
}

/// Builds the report (takes the engine's lock only to count marks per VIP).
pub(super) fn report(node: &NodeHandle) -> NodeReport {
    let view = node.published().view();
    let marks_by_vip = node.lock().marks.in_use_by_vip();
    let mut vips: BTreeMap<&Owner, u32> = BTreeMap::new();
    let mut reals: BTreeMap<&Owner, BTreeSet<std::net::IpAddr>> = BTreeMap::new();
    let mut marks: BTreeMap<&Owner, u32> = BTreeMap::new();
    for v in &view.vips {
        *vips.entry(&v.owner).or_default() += 1;
        reals
            .entry(&v.owner)
            .or_default()
            .extend(v.reals.iter().copied());
        *marks.entry(&v.owner).or_default() += marks_by_vip.get(&v.stats_id).copied().unwrap_or(0);
    }
    let owners = view
        .owners
        .iter()
        .map(|(o, verdict)| OwnerReport {
            owner: o.to_string(),
            serving: verdict.is_serving(),
            conflict_with: match verdict {
                OwnerVerdict::Conflict { winner, .. } => Some(winner.to_string()),
                _ => None,
            },
            problem: verdict.problem(),
            vips: vips.get(o).copied().unwrap_or(0),
            reals: reals.get(o).map_or(0, |r| r.len() as u32),
            marks_in_use: marks.get(o).copied().unwrap_or(0),
        })
        .collect();
    NodeReport {
        interface: view.interface.clone(),
        xdp_mode: view.attached.as_ref().map(|a| a.mode.clone()),
        program_id: view.attached.as_ref().map(|a| a.prog_id),
        hw_backend: view.hw_backend.to_string(),
        hw_backend_reason: view.hw_backend_reason.clone(),
        mark_delivery: view.mark_delivery.to_string(),
        offloaded: view.offloaded,
        applied: view.applied,
        last_error: view.last_error.clone(),
        pin_problem: view.pin_problem.clone(),
        vips: view.vips.len() as u32,
        reals: view.reals.len() as u32,
        marks_in_use: marks_by_vip.values().sum(),
        owners,
    }
}
