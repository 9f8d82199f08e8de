//! A node state's status from what the engine did with it (pure).
//!
//! The operator's roll-up reads `observedGeneration` (it must equal the state's generation),
//! the `Ready` condition (True counts the node as serving; False with its reason and message
//! is shown on the LoadBalancer), `Conflict` (True: named on the LoadBalancer), `offloaded`,
//! `marksInUse`, `hwBackend`/`hwBackendReason`, `lastError`, and `vips == 0` as the
//! acknowledgement that a LoadBalancer being deleted is gone from this node. Conditions go
//! through [`set_condition`] on the status the API holds, so `lastTransitionTime` moves only
//! when a condition's status flips; `now` has whole seconds, as the API stores it, so a
//! status read back equals the one written (otherwise every comparison would ask for a write).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use marklb_crds::{
    LoadBalancerNodeStateStatus, MarkScope,
    conditions::{self, ConditionStatus, reason, set_condition},
    node_state::{mark_delivery, xdp_mode},
};

use crate::desired::OwnerVerdict;
use crate::node::{NodeReport, OwnerReport};

/// A state served by another interface than the agent's (reason of `Ready=False`).
pub const REASON_WRONG_INTERFACE: &str = "InterfaceNotServed";

/// What became of one node state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It cannot be served at all (invalid, another node's, a duplicate): the message.
    Rejected(String),
    /// The engine refused its current generation; what it served before (if anything) keeps
    /// serving.
    Failed(String),
    /// Merged with the others; the merge's verdict.
    Merged(OwnerVerdict),
}

/// The node-wide facts a status carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeFacts {
    pub report: NodeReport,
    /// Every mark of the node's capacity is in use.
    pub marks_exhausted: bool,
}

/// Whole seconds of now, as the API stores times.
pub fn now_seconds() -> Time {
    let s = Timestamp::now().as_second();
    Time(Timestamp::from_second(s).expect("now is a valid timestamp"))
}

/// `native`/`generic` (the engine's words) as the status spells XDP modes.
fn xdp_mode_of(mode: &str) -> String {
    match mode {
        "native" => xdp_mode::NATIVE.into(),
        "generic" => xdp_mode::GENERIC.into(),
        "offload" => xdp_mode::OFFLOAD.into(),
        other => other.into(),
    }
}

/// The status of a state of generation `generation`, with flow-mark scope `scope`, given
/// its outcome, its owner's share of the node (`owner`: absent when nothing of it is
/// programmed), the node, and the status the API holds now (`current`).
pub fn status_for(
    current: Option<&LoadBalancerNodeStateStatus>,
    generation: Option<i64>,
    scope: MarkScope,
    outcome: &Outcome,
    owner: Option<&OwnerReport>,
    node: &NodeFacts,
    now: Time,
) -> LoadBalancerNodeStateStatus {
    let r = &node.report;
    let mut status = LoadBalancerNodeStateStatus {
        observed_generation: generation,
        interface: Some(r.interface.clone()),
        xdp_mode: r.xdp_mode.as_deref().map(xdp_mode_of),
        program_id: r.program_id,
        vips: owner.map_or(0, |o| o.vips),
        reals: owner.map_or(0, |o| o.reals),
        marks_in_use: owner.map_or(0, |o| o.marks_in_use),
        hw_backend: Some(r.hw_backend.clone()),
        hw_backend_reason: Some(r.hw_backend_reason.clone()),
        mark_delivery: Some(mark_delivery::XDP_METADATA.into()),
        offloaded: false,
        last_error: None,
        conditions: current.map(|c| c.conditions.clone()).unwrap_or_default(),
    };
    let serving = matches!(outcome, Outcome::Merged(v) if v.is_serving());
    status.offloaded = serving && r.offloaded && scope != MarkScope::Disabled;
    let attached = r.program_id.is_some();

    let (ready, ready_reason, ready_message) = match outcome {
        Outcome::Rejected(e) => {
            status.last_error = Some(e.clone());
            (false, reason::INVALID_SPEC, e.clone())
        }
        Outcome::Failed(e) => {
            status.last_error = Some(e.clone());
            (false, reason::MAP_UPDATE_FAILED, e.clone())
        }
        Outcome::Merged(OwnerVerdict::Refused { reason }) => {
            status.last_error = Some(reason.clone());
            (false, REASON_WRONG_INTERFACE, reason.clone())
        }
        Outcome::Merged(v @ OwnerVerdict::Conflict { what, .. }) => {
            let message = v.problem().unwrap_or_default();
            let why = if what.starts_with("VIP ") {
                reason::VIP_CONFLICT
            } else {
                reason::SETTING_CONFLICT
            };
            (false, why, message)
        }
        Outcome::Merged(OwnerVerdict::Serving { .. }) if !attached => (
            false,
            reason::ATTACH_FAILED,
            r.last_error
                .clone()
                .unwrap_or_else(|| format!("the datapath is not attached to {}", r.interface)),
        ),
        Outcome::Merged(OwnerVerdict::Serving { .. }) => (
            true,
            reason::PROGRAMMED,
            format!(
                "{} VIPs and {} reals programmed on {}",
                status.vips, status.reals, r.interface
            ),
        ),
    };
    let mut set = |type_: &str, ok: bool, why: &str, message: &str| {
        set_condition(
            &mut status.conditions,
            type_,
            ConditionStatus::from(ok),
            why,
            message,
            generation,
            now.clone(),
        );
    };
    set(conditions::NODE_READY, ready, ready_reason, &ready_message);

    match &r.program_id {
        Some(id) => set(
            conditions::DATAPATH_ATTACHED,
            true,
            reason::ATTACHED,
            &format!(
                "XDP program {id} on {} ({})",
                r.interface,
                r.xdp_mode.as_deref().unwrap_or("?")
            ),
        ),
        None => set(
            conditions::DATAPATH_ATTACHED,
            false,
            reason::ATTACH_FAILED,
            r.last_error.as_deref().unwrap_or("not attached yet"),
        ),
    }

    if scope == MarkScope::Disabled {
        set(
            conditions::MARKS_PROGRAMMED,
            false,
            reason::MARKS_DISABLED,
            "flowMarks.scope is Disabled",
        );
    } else if !r.offloaded {
        set(
            conditions::MARKS_PROGRAMMED,
            false,
            reason::NIC_UNSUPPORTED,
            &r.hw_backend_reason,
        );
    } else if node.marks_exhausted {
        set(
            conditions::MARKS_PROGRAMMED,
            false,
            reason::MARKS_EXHAUSTED,
            "every mark is in use; new flows go unmarked until marks age out",
        );
    } else {
        set(
            conditions::MARKS_PROGRAMMED,
            true,
            reason::NIC_RULES_INSTALLED,
            &r.hw_backend_reason,
        );
    }

    match outcome {
        Outcome::Merged(v @ OwnerVerdict::Conflict { .. }) => set(
            conditions::NODE_CONFLICT,
            true,
            ready_reason,
            &v.problem().unwrap_or_default(),
        ),
        _ => set(
            conditions::NODE_CONFLICT,
            false,
            reason::NO_CONFLICT,
            "no other LoadBalancer on this node claims its VIPs or settings",
        ),
    }
    status
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::desired::Owner;
    use marklb_crds::conditions::find_condition;

    fn at(s: i64) -> Time {
        Time(Timestamp::from_second(s).unwrap())
    }

    pub(crate) fn facts() -> NodeFacts {
        NodeFacts {
            report: NodeReport {
                interface: "eth0".into(),
                xdp_mode: Some("native".into()),
                program_id: Some(812),
                hw_backend: "emulated".into(),
                hw_backend_reason: "--hw-backend emulated: the emulated NIC".into(),
                mark_delivery: "xdp-metadata".into(),
                offloaded: true,
                applied: true,
                last_error: None,
                pin_problem: None,
                vips: 3,
                reals: 4,
                marks_in_use: 9,
                owners: Vec::new(),
            },
            marks_exhausted: false,
        }
    }

    fn owner(vips: u32, reals: u32, marks: u32) -> OwnerReport {
        OwnerReport {
            owner: "shop/web".into(),
            serving: true,
            conflict_with: None,
            problem: None,
            vips,
            reals,
            marks_in_use: marks,
        }
    }

    fn serving() -> Outcome {
        Outcome::Merged(OwnerVerdict::Serving { vips: Vec::new() })
    }

    fn cond<'a>(s: &'a LoadBalancerNodeStateStatus, t: &str) -> (&'a str, &'a str) {
        let c = find_condition(&s.conditions, t).unwrap();
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn a_served_state_is_ready_with_its_own_counts() {
        let s = status_for(
            None,
            Some(3),
            MarkScope::PerFlow,
            &serving(),
            Some(&owner(2, 3, 5)),
            &facts(),
            at(100),
        );
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!((s.vips, s.reals, s.marks_in_use), (2, 3, 5));
        assert_eq!(s.xdp_mode.as_deref(), Some("Native"));
        assert_eq!(s.program_id, Some(812));
        assert_eq!(s.hw_backend.as_deref(), Some("emulated"));
        assert_eq!(s.mark_delivery.as_deref(), Some("xdp-metadata"));
        assert!(s.offloaded);
        assert_eq!(s.last_error, None);
        assert_eq!(cond(&s, "Ready"), ("True", "Programmed"));
        assert_eq!(cond(&s, "DatapathAttached"), ("True", "Attached"));
        assert_eq!(cond(&s, "MarksProgrammed"), ("True", "NicRulesInstalled"));
        assert_eq!(cond(&s, "Conflict"), ("False", "NoConflict"));
        assert!(
            s.conditions
                .iter()
                .all(|c| c.observed_generation == Some(3) && c.last_transition_time == at(100))
        );
    }

    #[test]
    fn recomputing_an_unchanged_state_changes_nothing_not_even_times() {
        let first = status_for(
            None,
            Some(1),
            MarkScope::PerFlow,
            &serving(),
            Some(&owner(1, 2, 0)),
            &facts(),
            at(100),
        );
        let again = status_for(
            Some(&first),
            Some(1),
            MarkScope::PerFlow,
            &serving(),
            Some(&owner(1, 2, 0)),
            &facts(),
            at(500),
        );
        assert_eq!(again, first);
    }

    #[test]
    fn transition_time_moves_only_on_a_flip() {
        let ready = status_for(
            None,
            Some(1),
            MarkScope::PerFlow,
            &serving(),
            Some(&owner(1, 2, 0)),
            &facts(),
            at(100),
        );
        // A new generation, still served: same transition time, new generation.
        let next = status_for(
            Some(&ready),
            Some(2),
            MarkScope::PerFlow,
            &serving(),
            Some(&owner(2, 2, 0)),
            &facts(),
            at(200),
        );
        let c = find_condition(&next.conditions, "Ready").unwrap();
        assert_eq!(
            (c.last_transition_time.clone(), c.observed_generation),
            (at(100), Some(2))
        );
        // It loses a conflict: Ready flips, Conflict flips.
        let lost = Outcome::Merged(OwnerVerdict::Conflict {
            winner: Owner::new("shop", "old"),
            what: "VIP 10.0.0.1:80/TCP".into(),
        });
        let s = status_for(
            Some(&next),
            Some(3),
            MarkScope::PerFlow,
            &lost,
            None,
            &facts(),
            at(300),
        );
        assert_eq!(cond(&s, "Ready"), ("False", "VipConflict"));
        assert_eq!(cond(&s, "Conflict"), ("True", "VipConflict"));
        let c = find_condition(&s.conditions, "Conflict").unwrap();
        assert_eq!(
            c.message,
            "conflicts with shop/old, which holds VIP 10.0.0.1:80/TCP"
        );
        assert_eq!(c.last_transition_time, at(300));
        assert_eq!((s.vips, s.offloaded), (0, false));
    }

    #[test]
    fn rejected_and_failed_states_say_why() {
        let bad = status_for(
            None,
            Some(4),
            MarkScope::PerFlow,
            &Outcome::Rejected("spec.lb.vips[0].address: not an IP".into()),
            None,
            &facts(),
            at(1),
        );
        assert_eq!(cond(&bad, "Ready"), ("False", "InvalidSpec"));
        assert_eq!(
            bad.observed_generation,
            Some(4),
            "the roll-up needs the generation"
        );
        assert_eq!(
            bad.last_error.as_deref(),
            Some("spec.lb.vips[0].address: not an IP")
        );
        let failed = status_for(
            None,
            Some(2),
            MarkScope::PerFlow,
            &Outcome::Failed("ring storage full".into()),
            Some(&owner(1, 1, 0)),
            &facts(),
            at(1),
        );
        assert_eq!(cond(&failed, "Ready"), ("False", "MapUpdateFailed"));
        assert_eq!(failed.vips, 1, "what it served before still counts");
        let setting = Outcome::Merged(OwnerVerdict::Conflict {
            winner: Owner::new("shop", "old"),
            what: "the node-wide setting mtu 1500/Icmp (asked: 9000/Icmp)".into(),
        });
        let s = status_for(
            None,
            Some(1),
            MarkScope::PerFlow,
            &setting,
            None,
            &facts(),
            at(1),
        );
        assert_eq!(cond(&s, "Conflict"), ("True", "SettingConflict"));
    }

    #[test]
    fn marks_conditions_follow_the_backend_and_the_scope() {
        let mut none = facts();
        none.report.offloaded = false;
        none.report.hw_backend = "none".into();
        let s = status_for(
            None,
            Some(1),
            MarkScope::PerFlow,
            &serving(),
            None,
            &none,
            at(1),
        );
        assert_eq!(cond(&s, "MarksProgrammed"), ("False", "NicUnsupported"));
        assert!(!s.offloaded);
        let s = status_for(
            None,
            Some(1),
            MarkScope::Disabled,
            &serving(),
            None,
            &facts(),
            at(1),
        );
        assert_eq!(cond(&s, "MarksProgrammed"), ("False", "MarksDisabled"));
        assert!(!s.offloaded);
        let mut full = facts();
        full.marks_exhausted = true;
        let s = status_for(
            None,
            Some(1),
            MarkScope::PerFlow,
            &serving(),
            None,
            &full,
            at(1),
        );
        assert_eq!(cond(&s, "MarksProgrammed"), ("False", "MarksExhausted"));
    }

    #[test]
    fn a_detached_datapath_is_not_ready() {
        let mut f = facts();
        f.report.program_id = None;
        f.report.xdp_mode = None;
        let s = status_for(
            None,
            Some(1),
            MarkScope::PerFlow,
            &serving(),
            None,
            &f,
            at(1),
        );
        assert_eq!(cond(&s, "Ready"), ("False", "AttachFailed"));
        assert_eq!(cond(&s, "DatapathAttached"), ("False", "AttachFailed"));
    }
}
