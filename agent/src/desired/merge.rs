//! Several LoadBalancers on one node: their parts merged into the one [`Desired`] a datapath
//! serves, with conflicts decided the same way on every node.
//!
//! Rules (pure, deterministic):
//! - owners are taken in priority order (the caller sorts: Kubernetes mode by
//!   `loadBalancerCreated`, then `namespace/name`; standalone mode by position in the
//!   manifests), so the older owner keeps what two owners claim;
//! - an owner is served whole or not at all: if one of its VIPs (address, port, protocol) is
//!   already served by an earlier owner, or one of its node-wide settings differs from theirs
//!   (`LoadBalancerSpec::node_setting_differences`, as the operator decides it), none of its
//!   VIPs is programmed and it is reported as a conflict naming the winner;
//! - an owner without VIPs claims no node-wide settings (a LoadBalancer being deleted empties
//!   its VIPs first and must not block another one);
//! - an owner asking for another interface than the one this agent serves is refused;
//! - the node-wide settings are those of the first owner served (or of the first owner at all
//!   when none has a VIP, else the defaults).

use std::collections::BTreeMap;

use super::{Desired, NodeSettings, Owner, OwnerDesired};
use crate::vip::VipId;

/// What became of one owner's part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnerVerdict {
    /// Every VIP of the owner is in the merged state.
    Serving { vips: Vec<VipId> },
    /// Left out: an earlier owner holds one of its VIPs or a node-wide setting.
    Conflict { winner: Owner, what: String },
    /// Left out: it cannot be served by this agent at all.
    Refused { reason: String },
}

impl OwnerVerdict {
    pub fn is_serving(&self) -> bool {
        matches!(self, OwnerVerdict::Serving { .. })
    }

    /// A sentence for logs and status messages (`None` when serving).
    pub fn problem(&self) -> Option<String> {
        match self {
            OwnerVerdict::Serving { .. } => None,
            OwnerVerdict::Conflict { winner, what } => {
                Some(format!("conflicts with {winner}, which holds {what}"))
            }
            OwnerVerdict::Refused { reason } => Some(reason.clone()),
        }
    }
}

/// The merged state and the verdict on every owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Merged {
    pub desired: Desired,
    pub owners: BTreeMap<Owner, OwnerVerdict>,
    /// Owners in the priority order they were merged in.
    pub order: Vec<Owner>,
}

/// Merges `parts` (in priority order, oldest first) for an agent serving `interface`.
/// Duplicate owners are the caller's error to prevent; a later duplicate is refused here.
pub fn merge(parts: &[OwnerDesired], interface: Option<&str>) -> Merged {
    let mut desired = Desired {
        settings: NodeSettings::default(),
        vips: BTreeMap::new(),
    };
    let mut owners = BTreeMap::new();
    let mut order = Vec::new();
    // The owner whose node-wide settings are served.
    let mut settings_from: Option<&OwnerDesired> = None;
    for part in parts {
        let o = &part.owner;
        if owners.contains_key(o) {
            continue;
        }
        order.push(o.clone());
        let verdict = judge(part, &desired, settings_from, interface);
        if verdict.is_serving() && !part.vips.is_empty() {
            if settings_from.is_none() {
                desired.settings = effective(&part.settings, interface);
                settings_from = Some(part);
            }
            desired.vips.extend(part.vips.clone());
        }
        owners.insert(o.clone(), verdict);
    }
    if settings_from.is_none()
        && let Some(first) = parts.first()
    {
        desired.settings = effective(&first.settings, interface);
    }
    Merged {
        desired,
        owners,
        order,
    }
}

/// An owner's settings with an unset interface read as the agent's own.
fn effective(s: &NodeSettings, interface: Option<&str>) -> NodeSettings {
    let mut s = s.clone();
    if s.interface.is_none() {
        s.interface = interface.map(str::to_string);
    }
    s
}

fn judge(
    part: &OwnerDesired,
    served: &Desired,
    settings_from: Option<&OwnerDesired>,
    interface: Option<&str>,
) -> OwnerVerdict {
    if let (Some(want), Some(have)) = (part.settings.interface.as_deref(), interface)
        && want != have
    {
        return OwnerVerdict::Refused {
            reason: format!(
                "spec.interface is {want} but this agent serves {have}; restart it to move"
            ),
        };
    }
    if part.vips.is_empty() {
        return OwnerVerdict::Serving { vips: Vec::new() };
    }
    if let Some((vip, plan)) = part
        .vips
        .keys()
        .find_map(|v| served.vips.get(v).map(|p| (v, p)))
    {
        return OwnerVerdict::Conflict {
            winner: plan.owner.clone(),
            what: format!("VIP {}", vip),
        };
    }
    if let Some(winner) = settings_from {
        let names = winner
            .spec_settings
            .node_setting_differences(&part.spec_settings);
        if !names.is_empty() {
            let mine = effective(&part.settings, interface);
            let detail = served
                .settings
                .first_difference(&mine)
                .unwrap_or_else(|| names.join(", "));
            return OwnerVerdict::Conflict {
                winner: winner.owner.clone(),
                what: format!("the node-wide setting {detail}"),
            };
        }
    }
    OwnerVerdict::Serving {
        vips: part.vips.keys().copied().collect(),
    }
}
