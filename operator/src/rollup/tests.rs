use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use marklb_crds::conditions::find_condition;
use marklb_crds::{LoadBalancer, LoadBalancerNodeState};

use super::*;
use crate::conflicts::Lost;
use crate::desired::node_state;
use crate::fixtures::{Agent, READY, at, lb, reported};

struct Case {
    lb: LoadBalancer,
    desired: BTreeMap<String, LoadBalancerNodeState>,
    existing: BTreeMap<String, LoadBalancerNodeState>,
    agents: Option<BTreeSet<String>>,
    lost: Vec<Lost>,
}

impl Case {
    fn new(spec: &str, nodes: &[(&str, Agent)]) -> Case {
        let lb = lb("prod", "web", 100, spec);
        let mut desired = BTreeMap::new();
        let mut existing = BTreeMap::new();
        for (node, agent) in nodes {
            let state = node_state(&lb, node, &lb.spec);
            desired.insert(node.to_string(), state.clone());
            existing.insert(node.to_string(), reported(state, *agent));
        }
        Case {
            lb,
            desired,
            existing,
            agents: None,
            lost: Vec::new(),
        }
    }

    fn run(&self, current: Option<&LoadBalancerStatus>, now: i64) -> LoadBalancerStatus {
        let existing: BTreeMap<String, &LoadBalancerNodeState> =
            self.existing.iter().map(|(k, v)| (k.clone(), v)).collect();
        rollup(
            current,
            &Inputs {
                generation: self.lb.metadata.generation,
                scope: self.lb.spec.flow_marks.scope,
                desired: &self.desired,
                existing: &existing,
                agents: self.agents.as_ref(),
                lost: &self.lost,
                apply_error: None,
                selector: "zone=a",
            },
            at(now),
        )
    }
}

fn cond<'a>(status: &'a LoadBalancerStatus, type_: &str) -> (&'a str, &'a str, &'a str) {
    let c = find_condition(&status.conditions, type_).unwrap_or_else(|| panic!("no {type_}"));
    (c.status.as_str(), c.reason.as_str(), c.message.as_str())
}

const ONE_VIP: &str = "vips: [{address: 10.0.0.1, port: 80, backends: [{address: 10.1.0.1}]}]";

#[test]
fn all_nodes_ready_and_offloaded() {
    let case = Case::new(
        ONE_VIP,
        &[
            (
                "a",
                Agent::Ready {
                    offloaded: true,
                    marks: 3,
                },
            ),
            (
                "b",
                Agent::Ready {
                    offloaded: true,
                    marks: 4,
                },
            ),
        ],
    );
    let s = case.run(None, 1);
    assert_eq!(
        cond(&s, "Ready"),
        ("True", "AllNodesReady", "2/2 nodes serve the current spec")
    );
    assert_eq!(cond(&s, "Programmed").0, "True");
    assert_eq!(cond(&s, "Offloaded").0, "True");
    assert_eq!(cond(&s, "Degraded").0, "False");
    assert_eq!(
        cond(&s, "Conflict"),
        (
            "False",
            "NoConflict",
            "no other LoadBalancer claims its VIPs or settings on its nodes"
        )
    );
    assert_eq!(
        (
            s.nodes_desired,
            s.nodes_ready,
            s.nodes_offloaded,
            s.marks_in_use
        ),
        (2, 2, 2, 7)
    );
    assert_eq!(
        (s.nodes.as_deref(), s.offload.as_deref()),
        (Some("2/2"), Some("2/2"))
    );
    assert_eq!(s.observed_generation, Some(1));
}

#[test]
fn no_selected_node_is_never_ready_zero_of_zero() {
    let case = Case::new(ONE_VIP, &[]);
    let s = case.run(None, 1);
    assert_eq!(
        cond(&s, "Ready"),
        (
            "False",
            "NoNodesSelected",
            "the node selector (zone=a) matches no node"
        )
    );
    assert_eq!(cond(&s, "Programmed").1, "NoNodesSelected");
    assert_eq!(cond(&s, "Degraded").0, "False");
    assert_eq!(s.nodes.as_deref(), Some("0/0"));
}

#[test]
fn a_node_without_agent_pod_is_named_not_pending() {
    let mut case = Case::new(
        ONE_VIP,
        &[("a", READY), ("b", Agent::Silent), ("c", Agent::Silent)],
    );
    case.agents = Some(BTreeSet::from(["a".to_string(), "c".to_string()]));
    let s = case.run(None, 1);
    assert_eq!(
        cond(&s, "Ready"),
        (
            "False",
            "AgentNotScheduled",
            "1/3 nodes ready; no agent pod on b (taints, resources or image?)"
        )
    );
    assert_eq!(
        cond(&s, "Degraded"),
        (
            "True",
            "AgentNotScheduled",
            "1/3 nodes ready; no agent pod on b (taints, resources or image?)"
        )
    );
    // With every agent present, the silent ones are pending, with the reason.
    case.agents = Some(BTreeSet::from([
        "a".to_string(),
        "b".to_string(),
        "c".to_string(),
    ]));
    let s = case.run(None, 1);
    assert_eq!(
        cond(&s, "Ready"),
        (
            "False",
            "Pending",
            "1/3 nodes ready; waiting for b (no status from the agent yet), c (no status from the agent yet)"
        )
    );
}

const GRACE: Duration = Duration::from_secs(15);

#[test]
fn a_node_selected_moments_ago_waits_for_its_agent_pod_before_it_is_named() {
    let mut case = Case::new(ONE_VIP, &[("a", READY), ("b", Agent::Silent)]);
    case.existing
        .get_mut("b")
        .unwrap()
        .metadata
        .creation_timestamp = Some(at(100));
    // "c" was written in this reconcile: not in the cache yet.
    let c = node_state(&case.lb, "c", &case.lb.spec);
    case.desired.insert("c".into(), c);
    let agents = BTreeSet::from(["a".to_string()]);
    let existing: BTreeMap<String, &LoadBalancerNodeState> =
        case.existing.iter().map(|(k, v)| (k.clone(), v)).collect();

    // 5 s after b's state was created: b and c still within the grace, b first to run out.
    let (widened, next) = agents_within_grace(&agents, &case.desired, &existing, &at(105), GRACE);
    assert_eq!(
        widened,
        BTreeSet::from(["a".into(), "b".into(), "c".into()])
    );
    assert_eq!(next, Some(GRACE - Duration::from_secs(5)));
    case.agents = Some(widened);
    let s = case.run(None, 105);
    assert_eq!(cond(&s, "Ready").1, "Pending", "{:?}", cond(&s, "Ready"));

    // Past the grace, b without a pod is named; c (not in the cache) still waits.
    let late = 100 + GRACE.as_secs() as i64;
    let (widened, next) = agents_within_grace(&agents, &case.desired, &existing, &at(late), GRACE);
    assert_eq!(widened, BTreeSet::from(["a".into(), "c".into()]));
    assert_eq!(next, Some(GRACE));
    case.desired.remove("c");
    case.agents = Some(widened);
    let s = case.run(None, late);
    assert_eq!(
        cond(&s, "Ready"),
        (
            "False",
            "AgentNotScheduled",
            "1/2 nodes ready; no agent pod on b (taints, resources or image?)"
        )
    );

    // Nodes with pods need no second look.
    let all = BTreeSet::from(["a".to_string(), "b".to_string()]);
    assert_eq!(
        agents_within_grace(&all, &case.desired, &existing, &at(105), GRACE),
        (all.clone(), None)
    );
}

#[test]
fn lagging_failed_and_outdated_states_are_not_ready() {
    let mut case = Case::new(
        ONE_VIP,
        &[
            ("a", Agent::Lagging),
            ("b", Agent::Failed("InterfaceNotFound")),
            ("c", READY),
        ],
    );
    let s = case.run(None, 1);
    assert_eq!(
        cond(&s, "Ready"),
        (
            "False",
            "NodesNotReady",
            "1/3 nodes ready; b: InterfaceNotFound (InterfaceNotFound on this node)"
        )
    );
    // A ready state whose spec is not the one wanted now counts as pending.
    case.desired.get_mut("c").unwrap().spec.lb.vips[0].port = 81;
    case.existing.remove("b");
    case.existing
        .get_mut("a")
        .unwrap()
        .status
        .as_mut()
        .unwrap()
        .observed_generation = Some(2);
    let s = case.run(None, 1);
    assert_eq!(s.nodes_ready, 1);
    assert_eq!(cond(&s, "Ready").1, "Pending");
    assert!(
        cond(&s, "Ready")
            .2
            .contains("b (node state not written yet), c (node state being updated)"),
        "{:?}",
        cond(&s, "Ready")
    );
}

#[test]
fn offload_summaries() {
    let case = Case::new(
        ONE_VIP,
        &[
            (
                "a",
                Agent::Ready {
                    offloaded: true,
                    marks: 1,
                },
            ),
            (
                "b",
                Agent::Ready {
                    offloaded: false,
                    marks: 0,
                },
            ),
        ],
    );
    let s = case.run(None, 1);
    assert_eq!(
        cond(&s, "Offloaded"),
        (
            "False",
            "OffloadUnavailable",
            "flow marks offloaded on 1/2 ready nodes; not on b (no capable NIC)"
        )
    );
    assert_eq!(s.offload.as_deref(), Some("1/2"));
    let disabled = Case::new(
        &format!("{ONE_VIP}\nflowMarks: {{scope: Disabled}}"),
        &[(
            "a",
            Agent::Ready {
                offloaded: false,
                marks: 0,
            },
        )],
    );
    let s = disabled.run(None, 1);
    assert_eq!(cond(&s, "Offloaded").1, "MarksDisabled");
    assert_eq!(s.offload.as_deref(), Some("Disabled"));
}

#[test]
fn conflicts_from_the_operator_and_from_agents() {
    let mut case = Case::new(ONE_VIP, &[("a", Agent::Conflict("prod/old")), ("b", READY)]);
    let s = case.run(None, 1);
    assert_eq!(
        cond(&s, "Conflict"),
        (
            "True",
            "VipConflict",
            "node a: VIP 10.0.0.1:80/TCP is served by prod/old"
        )
    );
    assert_eq!(cond(&s, "Degraded").0, "True");
    case.lost = vec![Lost {
        winner: "prod/old".into(),
        vip: false,
        what: "settings mtu".into(),
        nodes: vec!["b".into()],
    }];
    case.existing
        .insert("a".into(), reported(case.desired["a"].clone(), READY));
    let s = case.run(None, 1);
    assert_eq!(
        cond(&s, "Conflict"),
        (
            "True",
            "SettingConflict",
            "settings mtu is kept by older prod/old on node b"
        )
    );
}

#[test]
fn transition_times_move_only_on_flips_and_a_repeat_changes_nothing() {
    let mut case = Case::new(ONE_VIP, &[("a", Agent::Silent)]);
    let first = case.run(None, 10);
    assert_eq!(
        find_condition(&first.conditions, "Ready")
            .unwrap()
            .last_transition_time,
        at(10)
    );
    // Same inputs later: identical status, so the caller writes nothing.
    assert_eq!(case.run(Some(&first), 20), first);
    // The agent becomes ready: Ready flips at 30, Programmed (unchanged status) keeps 10.
    case.existing
        .insert("a".into(), reported(case.desired["a"].clone(), READY));
    let second = case.run(Some(&first), 30);
    assert_eq!(
        find_condition(&second.conditions, "Ready")
            .unwrap()
            .last_transition_time,
        at(30)
    );
    assert_eq!(
        find_condition(&second.conditions, "Programmed")
            .unwrap()
            .last_transition_time,
        at(10)
    );
    assert_eq!(case.run(Some(&second), 40), second);
}

#[test]
fn long_lists_are_cut_in_messages() {
    let nodes: Vec<(String, Agent)> = (0..12)
        .map(|i| (format!("n{i:02}"), Agent::Silent))
        .collect();
    let refs: Vec<(&str, Agent)> = nodes.iter().map(|(n, a)| (n.as_str(), *a)).collect();
    let mut case = Case::new(ONE_VIP, &refs);
    case.agents = Some(BTreeSet::new());
    let s = case.run(None, 1);
    assert_eq!(
        cond(&s, "Ready").2,
        "0/12 nodes ready; no agent pod on n00, n01, n02, n03, n04 and 7 more (taints, resources or image?)"
    );
}
