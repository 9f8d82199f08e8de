//! Condition types, reasons, and the one upsert helper every writer uses.
//!
//! Conditions follow the Kubernetes API conventions: a few long-lived types that flip between
//! `True` and `False` with a CamelCase `reason`, each carrying the `observedGeneration` it was
//! computed for, and a `lastTransitionTime` that moves only when the status flips (so "since
//! when is this broken" stays answerable). Phases such as Pending/Success/Error are reasons,
//! never types.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// LoadBalancer: every selected node serves the current generation.
pub const READY: &str = "Ready";
/// LoadBalancer: the spec was accepted and node states were written for every selected node.
pub const PROGRAMMED: &str = "Programmed";
/// LoadBalancer: flow marks are offloaded to the NIC on every ready node.
pub const OFFLOADED: &str = "Offloaded";
/// LoadBalancer: some, but not all, selected nodes serve it (True means degraded).
pub const DEGRADED: &str = "Degraded";
/// LoadBalancer: a VIP or node-wide setting of it is also claimed by another LoadBalancer on a
/// shared node, and the other one keeps it (True means in conflict; the message names it).
pub const CONFLICT: &str = "Conflict";

/// Node state: the datapath is attached and programmed with the current generation.
pub const NODE_READY: &str = READY;
/// Node state: the XDP (or TC) program is attached to the interface.
pub const DATAPATH_ATTACHED: &str = "DatapathAttached";
/// Node state: NIC flow-mark rules can be (and are being) installed.
pub const MARKS_PROGRAMMED: &str = "MarksProgrammed";
/// Node state: a VIP or node-wide setting of this state loses to another owner on this node
/// (True means in conflict; the message names the winner). Older `loadBalancerCreated` wins.
pub const NODE_CONFLICT: &str = CONFLICT;

/// Condition reasons (CamelCase, as the API conventions ask). Writers may add their own; these
/// are the ones the operator's roll-up and the tests agree on.
pub mod reason {
    // --- LoadBalancer ---
    /// Every selected node reported Ready for the current generation.
    pub const ALL_NODES_READY: &str = "AllNodesReady";
    /// Some selected node has no state yet, or has not observed the current generation.
    pub const PENDING: &str = "Pending";
    /// Some selected nodes reported Ready=False.
    pub const NODES_NOT_READY: &str = "NodesNotReady";
    /// The selector matches no node.
    pub const NO_NODES_SELECTED: &str = "NoNodesSelected";
    /// Selected nodes have no running agent pod (taints, resources, image): the message names
    /// them.
    pub const AGENT_NOT_SCHEDULED: &str = "AgentNotScheduled";
    /// A VIP's `backendService` names a Service that is missing or whose endpoints cannot be
    /// served (more than a VIP may have, or more than the Maglev table size).
    pub const BACKEND_SERVICE_UNRESOLVED: &str = "BackendServiceUnresolved";
    /// The operator could not write a node state (the message carries the API error).
    pub const APPLY_FAILED: &str = "ApplyFailed";
    /// The spec fails validation (the message lists the errors).
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// Node states were written for every selected node.
    pub const NODE_STATES_APPLIED: &str = "NodeStatesApplied";
    /// No VIP of this LoadBalancer collides with another one.
    pub const NO_CONFLICT: &str = "NoConflict";
    /// Flow marks are offloaded on every ready node.
    pub const MARKS_OFFLOADED: &str = "MarksOffloaded";
    /// Flow marks are off in the spec (`flowMarks.scope: Disabled`).
    pub const MARKS_DISABLED: &str = "MarksDisabled";
    /// Some ready nodes could not offload marks (no capable NIC, rules refused).
    pub const OFFLOAD_UNAVAILABLE: &str = "OffloadUnavailable";

    // --- LoadBalancerNodeState ---
    /// The datapath is attached and every map is written for the current generation.
    pub const PROGRAMMED: &str = "Programmed";
    /// The program is attached to the interface.
    pub const ATTACHED: &str = "Attached";
    /// The interface named in the spec (or the default route's) does not exist.
    pub const INTERFACE_NOT_FOUND: &str = "InterfaceNotFound";
    /// Loading or attaching the program failed (the message carries the kernel's error).
    pub const ATTACH_FAILED: &str = "AttachFailed";
    /// Writing a BPF map failed (full, or the kernel refused an entry).
    pub const MAP_UPDATE_FAILED: &str = "MapUpdateFailed";
    /// Another LoadBalancer on this node already serves one of the VIPs (also the
    /// LoadBalancer's Conflict reason when that is why).
    pub const VIP_CONFLICT: &str = "VipConflict";
    /// Another LoadBalancer on this node already set a node-wide setting differently
    /// (interface, next hop, encapsulation prefixes, MTU policy...): one datapath per interface
    /// cannot serve both.
    pub const SETTING_CONFLICT: &str = "SettingConflict";
    /// The NIC accepted the mark rules.
    pub const NIC_RULES_INSTALLED: &str = "NicRulesInstalled";
    /// The interface's NIC cannot offload mark rules (the datapath still works unmarked).
    pub const NIC_UNSUPPORTED: &str = "NicUnsupported";
    /// Every mark of the capacity is in use; new flows go unmarked until marks age out.
    pub const MARKS_EXHAUSTED: &str = "MarksExhausted";
}

/// Status of a condition, as the API spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl ConditionStatus {
    /// `True`, `False` or `Unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionStatus::True => "True",
            ConditionStatus::False => "False",
            ConditionStatus::Unknown => "Unknown",
        }
    }
}

impl From<bool> for ConditionStatus {
    fn from(value: bool) -> Self {
        if value {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        }
    }
}

/// Longest message the apiserver accepts in a built-in condition (metav1.Condition's bound);
/// longer messages are cut so a status patch never fails because of one.
pub const MAX_MESSAGE_BYTES: usize = 32_768;

/// Inserts or updates the condition of type `type_`.
///
/// `lastTransitionTime` becomes `now` only when the condition is new or its status flips;
/// reason, message and observed generation are always updated. Returns whether anything
/// changed, so a caller can skip a status patch (and publish an Event only on transitions).
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: &str,
    observed_generation: Option<i64>,
    now: Time,
) -> bool {
    let message = truncate(message, MAX_MESSAGE_BYTES);
    let status = status.as_str();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            let before = c.clone();
            if c.status != status {
                c.status = status.to_string();
                c.last_transition_time = now;
            }
            c.reason = reason.to_string();
            c.message = message.to_string();
            c.observed_generation = observed_generation;
            *c != before
        }
        None => {
            conditions.push(Condition {
                type_: type_.to_string(),
                status: status.to_string(),
                reason: reason.to_string(),
                message: message.to_string(),
                observed_generation,
                last_transition_time: now,
            });
            true
        }
    }
}

/// The condition of type `type_`, if present.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of type `type_` is present with status `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find_condition(conditions, type_).is_some_and(|c| c.status == "True")
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(second: i64) -> Time {
        Time(Timestamp::from_second(second).unwrap())
    }

    #[test]
    fn inserts_a_new_condition() {
        let mut conds = Vec::new();
        let changed = set_condition(
            &mut conds,
            READY,
            ConditionStatus::False,
            reason::PENDING,
            "waiting for node-a",
            Some(3),
            at(100),
        );
        assert!(changed);
        assert_eq!(conds.len(), 1);
        let c = &conds[0];
        assert_eq!(
            (c.type_.as_str(), c.status.as_str(), c.reason.as_str()),
            ("Ready", "False", "Pending")
        );
        assert_eq!(c.message, "waiting for node-a");
        assert_eq!(c.observed_generation, Some(3));
        assert_eq!(c.last_transition_time, at(100));
    }

    #[test]
    fn same_status_keeps_transition_time_but_updates_the_rest() {
        let mut conds = Vec::new();
        set_condition(
            &mut conds,
            READY,
            false.into(),
            reason::PENDING,
            "a",
            Some(1),
            at(100),
        );
        let changed = set_condition(
            &mut conds,
            READY,
            false.into(),
            reason::NODES_NOT_READY,
            "node-b failed",
            Some(2),
            at(200),
        );
        assert!(changed);
        let c = &conds[0];
        assert_eq!(c.last_transition_time, at(100));
        assert_eq!(c.reason, "NodesNotReady");
        assert_eq!(c.message, "node-b failed");
        assert_eq!(c.observed_generation, Some(2));
    }

    #[test]
    fn status_flip_moves_transition_time() {
        let mut conds = Vec::new();
        set_condition(
            &mut conds,
            READY,
            false.into(),
            reason::PENDING,
            "",
            Some(1),
            at(100),
        );
        set_condition(
            &mut conds,
            READY,
            true.into(),
            reason::ALL_NODES_READY,
            "",
            Some(1),
            at(300),
        );
        assert_eq!(conds[0].status, "True");
        assert_eq!(conds[0].last_transition_time, at(300));
        set_condition(
            &mut conds,
            READY,
            ConditionStatus::Unknown,
            reason::PENDING,
            "",
            None,
            at(400),
        );
        assert_eq!(conds[0].status, "Unknown");
        assert_eq!(conds[0].last_transition_time, at(400));
    }

    #[test]
    fn identical_update_reports_no_change() {
        let mut conds = Vec::new();
        set_condition(
            &mut conds,
            DEGRADED,
            false.into(),
            reason::ALL_NODES_READY,
            "ok",
            Some(5),
            at(1),
        );
        let before = conds.clone();
        let changed = set_condition(
            &mut conds,
            DEGRADED,
            false.into(),
            reason::ALL_NODES_READY,
            "ok",
            Some(5),
            at(9),
        );
        assert!(!changed);
        assert_eq!(conds, before);
    }

    #[test]
    fn types_are_independent_and_keep_their_order() {
        let mut conds = Vec::new();
        set_condition(
            &mut conds,
            READY,
            true.into(),
            reason::ALL_NODES_READY,
            "",
            None,
            at(1),
        );
        set_condition(
            &mut conds,
            DATAPATH_ATTACHED,
            true.into(),
            reason::ATTACHED,
            "",
            None,
            at(2),
        );
        set_condition(
            &mut conds,
            MARKS_PROGRAMMED,
            false.into(),
            reason::NIC_UNSUPPORTED,
            "",
            None,
            at(3),
        );
        set_condition(
            &mut conds,
            DATAPATH_ATTACHED,
            false.into(),
            reason::ATTACH_FAILED,
            "",
            None,
            at(4),
        );
        let types: Vec<_> = conds.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Ready", "DatapathAttached", "MarksProgrammed"]);
        assert!(is_true(&conds, READY));
        assert!(!is_true(&conds, DATAPATH_ATTACHED));
        assert!(!is_true(&conds, CONFLICT));
        assert_eq!(
            find_condition(&conds, DATAPATH_ATTACHED)
                .unwrap()
                .last_transition_time,
            at(4)
        );
        assert_eq!(
            find_condition(&conds, READY).unwrap().last_transition_time,
            at(1)
        );
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let mut conds = Vec::new();
        let long = "é".repeat(MAX_MESSAGE_BYTES); // 2 bytes each
        set_condition(
            &mut conds,
            READY,
            false.into(),
            reason::PENDING,
            &long,
            None,
            at(1),
        );
        let m = &conds[0].message;
        assert!(m.len() <= MAX_MESSAGE_BYTES);
        assert!(m.len() >= MAX_MESSAGE_BYTES - 1);
        assert!(m.chars().all(|c| c == 'é'));
    }
}
