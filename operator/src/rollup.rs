//! Node-state statuses to the LoadBalancer's status (pure).
//!
//! Invariants:
//! - a LoadBalancer that selects no node is `Ready=False, NoNodesSelected`, never "Ready, 0 of
//!   0"; a selected node without an agent pod makes it `AgentNotScheduled` (named), never
//!   a silent Pending;
//! - a node counts as ready only when its state holds the spec the operator wants now, its
//!   agent observed that generation and reports `Ready=True`;
//! - conditions go through [`set_condition`] on the current ones, so `lastTransitionTime`
//!   moves only when a status flips, and an unchanged roll-up equals the current status (the
//!   caller then writes nothing).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use marklb_crds::conditions::{self, ConditionStatus, reason, set_condition};
use marklb_crds::{LoadBalancerNodeState, LoadBalancerStatus, MarkScope};

use crate::conflicts::Lost;

/// Names listed in a message before "and N more".
const LISTED: usize = 5;

/// Everything the roll-up looks at.
pub struct Inputs<'a> {
    /// `metadata.generation` of the LoadBalancer.
    pub generation: Option<i64>,
    /// Flow-mark scope of the spec.
    pub scope: MarkScope,
    /// Node states the operator wants now, by node.
    pub desired: &'a BTreeMap<String, LoadBalancerNodeState>,
    /// Node states that exist (the cache), by node.
    pub existing: &'a BTreeMap<String, &'a LoadBalancerNodeState>,
    /// Nodes with an agent pod, when agent pods are watched.
    pub agents: Option<&'a BTreeSet<String>>,
    /// What this LoadBalancer loses to older ones.
    pub lost: &'a [Lost],
    /// Why node states could not be written, if they could not.
    pub apply_error: Option<&'a str>,
    /// Description of the node selector for messages (`zone=a`, `every node`).
    pub selector: &'a str,
}

/// One node's state as the roll-up sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum NodeView {
    Ready {
        offloaded: bool,
        marks: u64,
        why_not: Option<String>,
    },
    NotReady {
        reason: String,
        message: String,
    },
    NoAgent,
    Pending(&'static str),
}

fn view(
    desired: &LoadBalancerNodeState,
    existing: Option<&LoadBalancerNodeState>,
    has_agent: bool,
) -> NodeView {
    let Some(state) = existing else {
        return if has_agent {
            NodeView::Pending("node state not written yet")
        } else {
            NodeView::NoAgent
        };
    };
    if state.spec != desired.spec {
        return NodeView::Pending("node state being updated");
    }
    let status = state.status.as_ref();
    let observed = status.and_then(|s| s.observed_generation);
    let ready =
        status.and_then(|s| conditions::find_condition(&s.conditions, conditions::NODE_READY));
    match (status, ready) {
        (Some(s), Some(c)) if observed.is_some() && observed == state.metadata.generation => {
            if c.status == "True" {
                NodeView::Ready {
                    offloaded: s.offloaded,
                    marks: u64::from(s.marks_in_use),
                    why_not: s.hw_backend_reason.clone().or_else(|| s.hw_backend.clone()),
                }
            } else {
                NodeView::NotReady {
                    reason: c.reason.clone(),
                    message: if c.message.is_empty() {
                        s.last_error.clone().unwrap_or_default()
                    } else {
                        c.message.clone()
                    },
                }
            }
        }
        _ if !has_agent => NodeView::NoAgent,
        (None, _) => NodeView::Pending("no status from the agent yet"),
        _ => NodeView::Pending("agent has not observed the current generation"),
    }
}

/// `agents` widened by the desired nodes still within `grace` of their node state's creation
/// (or whose node state is not in the cache yet: it was written just now), and how long until
/// the first of them runs out of grace (when to look again). A node without an agent pod counts
/// as `AgentNotScheduled` only after that: the DaemonSet controller creates the pod a moment
/// after the operator writes the node state, and a warning in that moment is noise.
pub fn agents_within_grace(
    agents: &BTreeSet<String>,
    desired: &BTreeMap<String, LoadBalancerNodeState>,
    existing: &BTreeMap<String, &LoadBalancerNodeState>,
    now: &Time,
    grace: Duration,
) -> (BTreeSet<String>, Option<Duration>) {
    let mut widened = agents.clone();
    let mut next_look: Option<Duration> = None;
    for node in desired.keys().filter(|n| !agents.contains(*n)) {
        let age = existing
            .get(node)
            .and_then(|s| s.metadata.creation_timestamp.as_ref())
            .map_or(Duration::ZERO, |created| {
                now.0.duration_since(created.0).unsigned_abs()
            });
        if let Some(left) = grace.checked_sub(age).filter(|l| !l.is_zero()) {
            widened.insert(node.clone());
            next_look = Some(next_look.map_or(left, |n| n.min(left)));
        }
    }
    (widened, next_look)
}

fn listed(names: &[String]) -> String {
    let mut out = names
        .iter()
        .take(LISTED)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > LISTED {
        out.push_str(&format!(" and {} more", names.len() - LISTED));
    }
    out
}

/// The LoadBalancer status for `inputs`, starting from `current` (whose conditions keep
/// their transition times where the status does not flip). `now` stamps flips only.
pub fn rollup(
    current: Option<&LoadBalancerStatus>,
    inputs: &Inputs<'_>,
    now: Time,
) -> LoadBalancerStatus {
    let mut status = current.cloned().unwrap_or_default();
    let generation = inputs.generation;
    let desired = inputs.desired.len() as u32;

    let mut ready_nodes = 0u32;
    let mut offloaded = 0u32;
    let mut marks = 0u64;
    let mut no_agent = Vec::new();
    let mut failed = Vec::new();
    let mut pending = Vec::new();
    let mut not_offloaded = Vec::new();
    let mut node_conflicts = Vec::new();
    for (node, want) in inputs.desired {
        let existing = inputs.existing.get(node).copied();
        let has_agent = inputs.agents.is_none_or(|a| a.contains(node));
        if let Some(c) = existing
            .and_then(|s| s.status.as_ref())
            .and_then(|s| conditions::find_condition(&s.conditions, conditions::NODE_CONFLICT))
            .filter(|c| c.status == "True")
        {
            node_conflicts.push((node.clone(), c.reason.clone(), c.message.clone()));
        }
        match view(want, existing, has_agent) {
            NodeView::Ready {
                offloaded: o,
                marks: m,
                why_not,
            } => {
                ready_nodes += 1;
                marks += m;
                if o {
                    offloaded += 1;
                } else {
                    not_offloaded.push(match why_not {
                        Some(why) => format!("{node} ({why})"),
                        None => node.clone(),
                    });
                }
            }
            NodeView::NotReady { reason, message } => failed.push(format!(
                "{node}: {reason}{}",
                if message.is_empty() {
                    String::new()
                } else {
                    format!(" ({message})")
                }
            )),
            NodeView::NoAgent => no_agent.push(node.clone()),
            NodeView::Pending(why) => pending.push(format!("{node} ({why})")),
        }
    }

    status.observed_generation = generation;
    status.nodes_desired = desired;
    status.nodes_ready = ready_nodes;
    status.nodes_offloaded = offloaded;
    status.marks_in_use = marks;
    status.nodes = Some(format!("{ready_nodes}/{desired}"));
    status.offload = Some(if inputs.scope == MarkScope::Disabled {
        "Disabled".to_string()
    } else {
        format!("{offloaded}/{ready_nodes}")
    });

    let mut set = |type_: &str, ok: bool, reason: &str, message: String| {
        set_condition(
            &mut status.conditions,
            type_,
            ConditionStatus::from(ok),
            reason,
            &message,
            generation,
            now.clone(),
        );
    };

    // Ready
    let (ready, ready_reason, ready_message) = if desired == 0 {
        (
            false,
            reason::NO_NODES_SELECTED,
            format!("the node selector ({}) matches no node", inputs.selector),
        )
    } else if let Some(e) = inputs.apply_error {
        (
            false,
            reason::APPLY_FAILED,
            format!("node states could not be written: {e}"),
        )
    } else if ready_nodes == desired {
        (
            true,
            reason::ALL_NODES_READY,
            format!("{ready_nodes}/{desired} nodes serve the current spec"),
        )
    } else if !no_agent.is_empty() {
        (
            false,
            reason::AGENT_NOT_SCHEDULED,
            format!(
                "{ready_nodes}/{desired} nodes ready; no agent pod on {} (taints, resources or image?)",
                listed(&no_agent)
            ),
        )
    } else if !failed.is_empty() {
        (
            false,
            reason::NODES_NOT_READY,
            format!("{ready_nodes}/{desired} nodes ready; {}", listed(&failed)),
        )
    } else {
        (
            false,
            reason::PENDING,
            format!(
                "{ready_nodes}/{desired} nodes ready; waiting for {}",
                listed(&pending)
            ),
        )
    };
    set(
        conditions::READY,
        ready,
        ready_reason,
        ready_message.clone(),
    );

    // Programmed: the operator's own part (node states written for every selected node).
    if desired == 0 {
        set(
            conditions::PROGRAMMED,
            false,
            reason::NO_NODES_SELECTED,
            ready_message.clone(),
        );
    } else if let Some(e) = inputs.apply_error {
        set(
            conditions::PROGRAMMED,
            false,
            reason::APPLY_FAILED,
            e.to_string(),
        );
    } else {
        set(
            conditions::PROGRAMMED,
            true,
            reason::NODE_STATES_APPLIED,
            format!("node states written for {desired} selected nodes"),
        );
    }

    // Offloaded
    if inputs.scope == MarkScope::Disabled {
        set(
            conditions::OFFLOADED,
            false,
            reason::MARKS_DISABLED,
            "flowMarks.scope is Disabled".into(),
        );
    } else if ready_nodes == 0 {
        set(
            conditions::OFFLOADED,
            false,
            ready_reason,
            "no node is ready".into(),
        );
    } else if offloaded == ready_nodes {
        set(
            conditions::OFFLOADED,
            true,
            reason::MARKS_OFFLOADED,
            format!("flow marks offloaded on {offloaded}/{ready_nodes} ready nodes"),
        );
    } else {
        set(
            conditions::OFFLOADED,
            false,
            reason::OFFLOAD_UNAVAILABLE,
            format!(
                "flow marks offloaded on {offloaded}/{ready_nodes} ready nodes; not on {}",
                listed(&not_offloaded)
            ),
        );
    }

    // Conflict: the operator's own judgement, and what agents report.
    let mut lost: Vec<String> = inputs.lost.iter().map(Lost::message).collect();
    lost.extend(
        node_conflicts
            .iter()
            .map(|(node, _, m)| format!("node {node}: {m}")),
    );
    let conflict_reason = if inputs.lost.iter().any(|l| l.vip)
        || node_conflicts
            .iter()
            .any(|(_, r, _)| r == reason::VIP_CONFLICT)
    {
        reason::VIP_CONFLICT
    } else {
        reason::SETTING_CONFLICT
    };
    if lost.is_empty() {
        set(
            conditions::CONFLICT,
            false,
            reason::NO_CONFLICT,
            "no other LoadBalancer claims its VIPs or settings on its nodes".into(),
        );
    } else {
        set(conditions::CONFLICT, true, conflict_reason, lost.join("; "));
    }

    // Degraded: serving, but not everywhere or not everything.
    let partial = ready_nodes > 0 && ready_nodes < desired;
    if partial {
        set(conditions::DEGRADED, true, ready_reason, ready_message);
    } else if !lost.is_empty() {
        set(
            conditions::DEGRADED,
            true,
            conflict_reason,
            "part of the spec is kept by another LoadBalancer (see Conflict)".into(),
        );
    } else if ready {
        set(
            conditions::DEGRADED,
            false,
            reason::ALL_NODES_READY,
            format!("{ready_nodes}/{desired} nodes serve the current spec"),
        );
    } else {
        set(
            conditions::DEGRADED,
            false,
            ready_reason,
            "not serving anywhere yet (see Ready)".into(),
        );
    }
    status
}

#[cfg(test)]
mod tests;
