//! Builders for the unit tests: LoadBalancers, Nodes, node states with agent statuses.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use marklb_crds::conditions::{self, ConditionStatus, set_condition};
use marklb_crds::{
    LoadBalancer, LoadBalancerNodeState, LoadBalancerNodeStateStatus, LoadBalancerSpec,
};

/// A time `second`s after the epoch.
pub fn at(second: i64) -> Time {
    Time(Timestamp::from_second(second).unwrap())
}

/// A LoadBalancer `namespace/name` created at `created`, generation 1, with `spec_yaml`.
pub fn lb(namespace: &str, name: &str, created: i64, spec_yaml: &str) -> LoadBalancer {
    let spec: LoadBalancerSpec = serde_yaml::from_str(spec_yaml).unwrap();
    let mut lb = LoadBalancer::new(name, spec);
    lb.metadata.namespace = Some(namespace.into());
    lb.metadata.uid = Some(format!("uid-{namespace}-{name}"));
    lb.metadata.generation = Some(1);
    lb.metadata.creation_timestamp = Some(at(created));
    lb
}

/// A Node with `labels`.
pub fn node(name: &str, labels: &[(&str, &str)]) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// What a simulated agent reports for a node state.
#[derive(Clone, Copy, Debug)]
pub enum Agent {
    /// Nothing written yet.
    Silent,
    /// Ready for the state's generation, marks offloaded or not, `marks` in use.
    Ready { offloaded: bool, marks: u32 },
    /// Observed an older generation.
    Lagging,
    /// Ready=False with this reason.
    Failed(&'static str),
    /// Ready, but a VIP lost to `winner`.
    Conflict(&'static str),
}

/// `state` (generation 2) with the status `agent` would write.
pub fn reported(mut state: LoadBalancerNodeState, agent: Agent) -> LoadBalancerNodeState {
    state.metadata.generation = Some(2);
    let mut status = LoadBalancerNodeStateStatus::default();
    let ready =
        |status: &mut LoadBalancerNodeStateStatus, ok: bool, reason: &str, message: &str| {
            set_condition(
                &mut status.conditions,
                conditions::NODE_READY,
                ConditionStatus::from(ok),
                reason,
                message,
                Some(2),
                at(50),
            );
        };
    match agent {
        Agent::Silent => return state,
        Agent::Ready { offloaded, marks } => {
            status.observed_generation = Some(2);
            status.offloaded = offloaded;
            status.marks_in_use = marks;
            status.hw_backend = Some(if offloaded { "emulated" } else { "none" }.into());
            status.hw_backend_reason = Some(
                if offloaded {
                    "--hw-backend emulated"
                } else {
                    "no capable NIC"
                }
                .into(),
            );
            ready(&mut status, true, conditions::reason::PROGRAMMED, "");
        }
        Agent::Lagging => {
            status.observed_generation = Some(1);
            ready(&mut status, true, conditions::reason::PROGRAMMED, "");
        }
        Agent::Failed(reason) => {
            status.observed_generation = Some(2);
            status.last_error = Some(format!("{reason} on this node"));
            ready(
                &mut status,
                false,
                reason,
                &format!("{reason} on this node"),
            );
        }
        Agent::Conflict(winner) => {
            status.observed_generation = Some(2);
            ready(&mut status, true, conditions::reason::PROGRAMMED, "");
            set_condition(
                &mut status.conditions,
                conditions::NODE_CONFLICT,
                ConditionStatus::True,
                conditions::reason::VIP_CONFLICT,
                &format!("VIP 10.0.0.1:80/TCP is served by {winner}"),
                Some(2),
                at(50),
            );
        }
    }
    state.status = Some(status);
    state
}
