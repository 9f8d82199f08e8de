//! Which nodes take a Service's traffic, and how much of it: the reals of its LoadBalancer.
//!
//! The balancer encapsulates each new flow to a node's InternalIP; the node's decapsulator
//! strips the outer header and kube-proxy forwards the inner packet (addressed to the
//! Service's ingress address) to a pod. So a node can be a real when:
//! - it has an InternalIP of the VIP's family, is Ready, and is not labelled
//!   `node.kubernetes.io/exclude-from-external-load-balancers`;
//! - it runs no balancer for the Service (an XDP program cannot send a packet to its own
//!   host: `XDP_TX` leaves by the wire, and the network does not hand it back);
//! - its decapsulator pod is Ready (when the operator watches them: traffic sent to a node
//!   that cannot decapsulate is lost);
//! - `externalTrafficPolicy: Cluster`: any such node, weight 1 (kube-proxy spreads over every
//!   pod from any node, so more weight on nodes with more pods would not help); a cordoned
//!   node gets weight 0 (drained: no new flows, established ones stay while kube-proxy still
//!   forwards them), unless every node is cordoned;
//! - `externalTrafficPolicy: Local`: only nodes with ready endpoints of the Service, weighted by
//!   their number (kube-proxy there sends only to local pods, so a node with three pods should
//!   take three times the flows of a node with one).
//!
//! Reals are sorted by address, so an unchanged cluster gives an unchanged spec.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use kube::api::DynamicObject;
use marklb_crds::Backend;
use marklb_crds::pool::Family;

use super::request::TrafficPolicy;

/// Label that keeps a node out of every external load balancer (Kubernetes' own).
pub const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";
/// The hostname label, which 1.20's v1beta1 EndpointSlices use to name an endpoint's node.
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

/// What the reals need to know of a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeFacts {
    pub name: String,
    pub hostname: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub ready: bool,
    pub unschedulable: bool,
    /// InternalIPs, in the Node's order.
    pub addresses: Vec<IpAddr>,
}

impl NodeFacts {
    /// Reads a Node.
    pub fn of(node: &Node) -> NodeFacts {
        let status = node.status.as_ref();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.status == "True");
        let addresses = status
            .and_then(|s| s.addresses.as_ref())
            .map(|a| {
                a.iter()
                    .filter(|a| a.type_ == "InternalIP")
                    .filter_map(|a| a.address.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        NodeFacts {
            name: node.name_any(),
            hostname: node.labels().get(HOSTNAME_LABEL).cloned(),
            labels: node.labels().clone(),
            ready,
            unschedulable: node
                .spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .unwrap_or(false),
            addresses,
        }
    }

    /// The node's InternalIP of `family`.
    pub fn address(&self, family: Family) -> Option<IpAddr> {
        self.addresses
            .iter()
            .copied()
            .find(|a| Family::of(*a) == family)
    }
}

/// Ready endpoints of one Service per node name, from its EndpointSlices in any served
/// version (`nodeName` in v1; in v1beta1, as 1.20 serves it, `topology` holds the node's
/// hostname label, mapped back to the node here). Endpoints whose node is unknown are
/// counted in `unplaced`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalEndpoints {
    pub per_node: BTreeMap<String, u32>,
    pub unplaced: u32,
}

/// Counts the ready endpoints of Service `namespace/name` per node.
pub fn local_endpoints<'a>(
    namespace: &str,
    name: &str,
    slices: impl IntoIterator<Item = &'a DynamicObject>,
    nodes: &[NodeFacts],
) -> LocalEndpoints {
    let by_hostname: BTreeMap<&str, &str> = nodes
        .iter()
        .filter_map(|n| n.hostname.as_deref().map(|h| (h, n.name.as_str())))
        .collect();
    let known: BTreeSet<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    let mut out = LocalEndpoints::default();
    for slice in slices {
        if crate::endpoints::service_of(slice)
            .is_none_or(|(ns, svc)| ns != namespace || svc != name)
        {
            continue;
        }
        let Some(endpoints) = slice.data.get("endpoints").and_then(|e| e.as_array()) else {
            continue;
        };
        for e in endpoints {
            // A missing `ready` is ready (the API's rule).
            let ready = e
                .pointer("/conditions/ready")
                .and_then(|r| r.as_bool())
                .unwrap_or(true);
            if !ready {
                continue;
            }
            let node = e
                .get("nodeName")
                .and_then(|n| n.as_str())
                .filter(|n| known.contains(n))
                .or_else(|| {
                    // The hostname label is usually the node's name; kubelet sets it.
                    e.pointer("/topology/kubernetes.io~1hostname")
                        .and_then(|h| h.as_str())
                        .and_then(|h| by_hostname.get(h).copied().or(known.get(h).copied()))
                });
            // One endpoint is one pod, whatever its number of addresses.
            let count = u32::from(
                e.get("addresses")
                    .and_then(|a| a.as_array())
                    .is_some_and(|a| !a.is_empty()),
            );
            match node {
                Some(n) => *out.per_node.entry(n.to_string()).or_default() += count,
                None => out.unplaced += count,
            }
        }
    }
    out
}

/// Where a Service's traffic may go, and why nodes were left out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reals {
    pub backends: Vec<Backend>,
    /// Why no node qualified (empty when some did).
    pub why_none: String,
}

/// What the reals of one Service depend on besides the nodes.
pub struct RealInputs<'a> {
    pub traffic: TrafficPolicy,
    /// Nodes that run the balancer for the Service.
    pub balancers: &'a BTreeSet<String>,
    /// Nodes whose decapsulator is Ready; `None`: not watched (every node counts).
    pub decap_ready: Option<&'a BTreeSet<String>>,
    /// Ready endpoints per node (used with `Local`).
    pub local: &'a LocalEndpoints,
}

/// The reals of a VIP of `family`.
pub fn reals(family: Family, nodes: &[NodeFacts], inputs: &RealInputs) -> Reals {
    let mut skipped: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut backends: Vec<(IpAddr, u32)> = Vec::new();
    for node in nodes {
        let weight = match inputs.traffic {
            TrafficPolicy::Cluster => u32::from(!node.unschedulable),
            TrafficPolicy::Local => match inputs.local.per_node.get(&node.name) {
                Some(n) if *n > 0 => *n,
                _ => {
                    *skipped.entry("without a ready endpoint").or_default() += 1;
                    continue;
                }
            },
        };
        let why = if !node.ready {
            Some("not Ready")
        } else if node.labels.contains_key(EXCLUDE_LABEL) {
            Some("excluded by label")
        } else if inputs.balancers.contains(&node.name) {
            Some("running the balancer")
        } else if inputs.decap_ready.is_some_and(|d| !d.contains(&node.name)) {
            Some("without a Ready decapsulator")
        } else if node.address(family).is_none() {
            Some(match family {
                Family::V4 => "without an IPv4 InternalIP",
                Family::V6 => "without an IPv6 InternalIP",
            })
        } else {
            None
        };
        if let Some(why) = why {
            *skipped.entry(why).or_default() += 1;
            continue;
        }
        backends.push((node.address(family).expect("checked above"), weight));
    }
    // Every node cordoned: weight 0 everywhere would serve nothing; cordoning is a request to
    // drain, not to drop the Service.
    if inputs.traffic == TrafficPolicy::Cluster && backends.iter().all(|(_, w)| *w == 0) {
        for b in &mut backends {
            b.1 = 1;
        }
    }
    backends.sort();
    let why_none = if backends.is_empty() {
        let mut parts: Vec<String> = skipped
            .iter()
            .map(|(why, n)| format!("{n} {why}"))
            .collect();
        if parts.is_empty() {
            parts.push("no nodes".into());
        }
        format!("no node can take {family} traffic: {}", parts.join(", "))
    } else {
        String::new()
    };
    Reals {
        backends: backends
            .into_iter()
            .map(|(a, weight)| Backend {
                address: a.to_string(),
                weight,
            })
            .collect(),
        why_none,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::fixtures::{NodeState, READY, node, slice_v1, slice_v1beta1};

    fn facts(nodes: &[Node]) -> Vec<NodeFacts> {
        nodes.iter().map(NodeFacts::of).collect()
    }

    fn weights(r: &Reals) -> Vec<(String, u32)> {
        r.backends
            .iter()
            .map(|b| (b.address.clone(), b.weight))
            .collect()
    }

    fn cluster() -> Vec<NodeFacts> {
        facts(&[
            node("n1", &[], &["10.0.0.1"], READY),
            node("n2", &[], &["10.0.0.2", "fd00::2"], READY),
            node("n3", &[], &["10.0.0.3"], READY),
            node(
                "n4",
                &[],
                &["10.0.0.4"],
                NodeState {
                    ready: false,
                    unschedulable: false,
                },
            ),
            node(
                "n5",
                &[],
                &["10.0.0.5"],
                NodeState {
                    ready: true,
                    unschedulable: true,
                },
            ),
            node("n6", &[(EXCLUDE_LABEL, "")], &["10.0.0.6"], READY),
        ])
    }

    #[test]
    fn cluster_policy_takes_every_eligible_node_and_drains_cordoned_ones() {
        let nodes = cluster();
        let balancers = BTreeSet::from(["n1".to_string()]);
        let none = LocalEndpoints::default();
        let inputs = RealInputs {
            traffic: TrafficPolicy::Cluster,
            balancers: &balancers,
            decap_ready: None,
            local: &none,
        };
        let r = reals(Family::V4, &nodes, &inputs);
        assert_eq!(
            weights(&r),
            [
                ("10.0.0.2".into(), 1),
                ("10.0.0.3".into(), 1),
                ("10.0.0.5".into(), 0)
            ]
        );
        assert_eq!(
            weights(&reals(Family::V6, &nodes, &inputs)),
            [("fd00::2".into(), 1)]
        );
        // Decapsulator not ready on n3: not a real.
        let decap = BTreeSet::from(["n2".to_string(), "n5".to_string()]);
        let inputs = RealInputs {
            decap_ready: Some(&decap),
            ..inputs
        };
        assert_eq!(
            weights(&reals(Family::V4, &nodes, &inputs)),
            [("10.0.0.2".into(), 1), ("10.0.0.5".into(), 0)]
        );
    }

    #[test]
    fn local_policy_weights_nodes_by_ready_endpoints_from_either_slice_version() {
        let nodes = cluster();
        let slices = [
            slice_v1beta1(
                "shop",
                "web",
                &[
                    ("10.1.0.1", "n2", true),
                    ("10.1.0.2", "n2", true),
                    ("10.1.0.3", "n3", false),
                ],
            ),
            slice_v1(
                "shop",
                "web",
                &[
                    ("10.1.0.4", "n3", true),
                    ("10.1.0.5", "n1", true),
                    ("10.1.0.6", "gone", true),
                ],
            ),
            slice_v1("shop", "other", &[("10.1.0.7", "n5", true)]),
        ];
        let local = local_endpoints("shop", "web", &slices, &nodes);
        assert_eq!(
            local.per_node,
            BTreeMap::from([("n1".into(), 1), ("n2".into(), 2), ("n3".into(), 1)])
        );
        assert_eq!(local.unplaced, 1);
        let balancers = BTreeSet::from(["n1".to_string()]);
        let inputs = RealInputs {
            traffic: TrafficPolicy::Local,
            balancers: &balancers,
            decap_ready: None,
            local: &local,
        };
        assert_eq!(
            weights(&reals(Family::V4, &nodes, &inputs)),
            [("10.0.0.2".into(), 2), ("10.0.0.3".into(), 1)]
        );
    }

    #[test]
    fn no_real_says_why() {
        let nodes = cluster();
        let balancers = BTreeSet::new();
        let none = LocalEndpoints::default();
        let inputs = RealInputs {
            traffic: TrafficPolicy::Local,
            balancers: &balancers,
            decap_ready: None,
            local: &none,
        };
        let r = reals(Family::V4, &nodes, &inputs);
        assert!(r.backends.is_empty());
        assert_eq!(
            r.why_none,
            "no node can take IPv4 traffic: 6 without a ready endpoint"
        );
        let only_cordoned = facts(&[node(
            "n5",
            &[],
            &["10.0.0.5"],
            NodeState {
                ready: true,
                unschedulable: true,
            },
        )]);
        let inputs = RealInputs {
            traffic: TrafficPolicy::Cluster,
            ..inputs
        };
        assert_eq!(
            weights(&reals(Family::V4, &only_cordoned, &inputs)),
            [("10.0.0.5".into(), 1)]
        );
        let n2 = BTreeSet::from(["n2".to_string()]);
        let r = reals(
            Family::V6,
            &nodes,
            &RealInputs {
                balancers: &n2,
                ..inputs
            },
        );
        assert_eq!(
            r.why_none,
            "no node can take IPv6 traffic: 1 excluded by label, 1 not Ready, 1 running the balancer, 3 without an IPv6 InternalIP"
        );
    }
}
