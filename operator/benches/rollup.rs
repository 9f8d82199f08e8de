//! The status roll-up of one LoadBalancer as a pure function, for 100, 1,000 and 10,000
//! node states (every node Ready and offloaded, the steady state). Prints the median of 51
//! runs and the time per node; the goal is 1,000 node states well under 10 ms.
//! Run: `cargo bench -p marklb-operator --bench rollup`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use marklb_crds::conditions::{self, ConditionStatus, reason, set_condition};
use marklb_crds::{LoadBalancer, LoadBalancerNodeState, LoadBalancerSpec, LoadBalancerStatus};
use marklb_operator::desired::node_state;
use marklb_operator::rollup::{Inputs, rollup};

fn states(lb: &LoadBalancer, n: usize) -> BTreeMap<String, LoadBalancerNodeState> {
    let now = Time(Timestamp::now());
    (0..n)
        .map(|i| {
            let node = format!("node-{i:05}");
            let mut state = node_state(lb, &node, &lb.spec);
            state.metadata.generation = Some(1);
            let mut status = marklb_crds::LoadBalancerNodeStateStatus {
                observed_generation: Some(1),
                offloaded: true,
                marks_in_use: 10,
                ..Default::default()
            };
            set_condition(
                &mut status.conditions,
                conditions::NODE_READY,
                ConditionStatus::True,
                reason::PROGRAMMED,
                "",
                Some(1),
                now.clone(),
            );
            state.status = Some(status);
            (node, state)
        })
        .collect()
}

fn main() {
    let spec: LoadBalancerSpec = serde_yaml::from_str(
        "vips: [{address: 10.0.0.1, port: 80, backends: [{address: 10.1.0.1}, {address: 10.1.0.2}, {address: 10.1.0.3}]}, {address: '2001:db8::1', port: 443, backends: [{address: '2001:db8::a'}]}]",
    )
    .unwrap();
    let mut lb = LoadBalancer::new("web", spec);
    lb.metadata.namespace = Some("prod".into());
    lb.metadata.generation = Some(1);
    println!("{:>8} {:>12} {:>12}", "nodes", "median", "per node");
    for n in [100, 1_000, 10_000] {
        let desired = states(&lb, n);
        let existing: BTreeMap<String, &LoadBalancerNodeState> =
            desired.iter().map(|(k, v)| (k.clone(), v)).collect();
        let inputs = Inputs {
            generation: Some(1),
            scope: lb.spec.flow_marks.scope,
            desired: &desired,
            existing: &existing,
            agents: None,
            lost: &[],
            apply_error: None,
            selector: "every node",
        };
        let mut current: Option<LoadBalancerStatus> = None;
        let mut times: Vec<Duration> = (0..51)
            .map(|_| {
                let started = Instant::now();
                let status = rollup(current.as_ref(), &inputs, Time(Timestamp::now()));
                let took = started.elapsed();
                assert_eq!(status.nodes_ready as usize, n);
                current = Some(status);
                took
            })
            .collect();
        times.sort();
        let median = times[times.len() / 2];
        println!(
            "{n:>8} {:>10.3}ms {:>10.0}ns",
            median.as_secs_f64() * 1e3,
            median.as_nanos() as f64 / n as f64
        );
    }
}
