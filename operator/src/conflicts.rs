//! Which LoadBalancer keeps what on a shared node (pure).
//!
//! Two LoadBalancers conflict on a node both select when they claim the same VIP (address,
//! port, protocol: [`Vip::key`](marklb_crds::Vip::key)) or differ in a node-wide setting one
//! datapath cannot serve twice
//! ([`node_setting_differences`](marklb_crds::LoadBalancerSpec::node_setting_differences)).
//! The older one keeps it ([`OwnerRank`]: creation time, then `namespace/name`), the same rule
//! and functions the agents apply, so the operator's `Conflict` condition and the agents'
//! per-node conditions name the same winner. The operator still writes the loser's node
//! states: the agent refuses the conflicting part there and reports it, and the loser takes
//! over by itself when the winner goes.

use std::collections::{BTreeMap, BTreeSet};

use marklb_crds::LoadBalancerSpec;
use marklb_crds::node_state::OwnerRank;

/// One LoadBalancer's claim: who, what, where.
#[derive(Clone, Copy, Debug)]
pub struct Claim<'a> {
    pub rank: &'a OwnerRank,
    pub spec: &'a LoadBalancerSpec,
    pub nodes: &'a BTreeSet<String>,
}

/// Something a LoadBalancer loses to an older one.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Lost {
    /// `namespace/name` of the winner.
    pub winner: String,
    /// True for VIPs, false for node-wide settings.
    pub vip: bool,
    /// What is lost: `VIP 10.0.0.1:80/TCP`, or `settings interface, mtu`.
    pub what: String,
    /// Shared nodes where it is lost (sorted).
    pub nodes: Vec<String>,
}

impl Lost {
    /// One line for a condition message.
    pub fn message(&self) -> String {
        let n = self.nodes.len();
        let first = self.nodes.first().map(String::as_str).unwrap_or("");
        let where_ = if n == 1 {
            format!("node {first}")
        } else {
            format!("{n} nodes ({first}, ...)")
        };
        format!("{} is kept by older {} on {where_}", self.what, self.winner)
    }
}

/// What `claims[me]` loses to older claims on the nodes they share, sorted.
pub fn lost_by(claims: &[Claim<'_>], me: usize) -> Vec<Lost> {
    let mine = &claims[me];
    let my_vips: BTreeMap<_, String> = mine
        .spec
        .vips
        .iter()
        .map(|v| (v.key(), v.endpoint()))
        .collect();
    let mut lost = Vec::new();
    for (i, other) in claims.iter().enumerate() {
        if i == me || other.rank >= mine.rank {
            continue;
        }
        let shared: Vec<String> = mine.nodes.intersection(other.nodes).cloned().collect();
        if shared.is_empty() {
            continue;
        }
        let winner = other.rank.owner();
        for vip in &other.spec.vips {
            if let Some(endpoint) = my_vips.get(&vip.key()) {
                lost.push(Lost {
                    winner: winner.clone(),
                    vip: true,
                    what: format!("VIP {endpoint}"),
                    nodes: shared.clone(),
                });
            }
        }
        let settings = mine.spec.node_setting_differences(other.spec);
        if !settings.is_empty() {
            lost.push(Lost {
                winner: winner.clone(),
                vip: false,
                what: format!("settings {}", settings.join(", ")),
                nodes: shared,
            });
        }
    }
    lost.sort();
    lost.dedup();
    lost
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::at;

    fn rank(created: i64, name: &str) -> OwnerRank {
        OwnerRank {
            created: Some(at(created)),
            namespace: "prod".into(),
            name: name.into(),
        }
    }

    fn spec(yaml: &str) -> LoadBalancerSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn nodes(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn the_older_keeps_a_shared_vip_on_shared_nodes_only() {
        let (old, new, far) = (rank(100, "old"), rank(200, "new"), rank(300, "far"));
        let (s_old, s_new) = (
            spec("vips: [{address: 10.0.0.1, port: 80}, {address: 10.0.0.2, port: 80}]"),
            spec("vips: [{address: 10.0.0.1, port: 80}, {address: 10.0.0.1, port: 443}]"),
        );
        let (n_old, n_new, n_far) = (nodes(&["a", "b"]), nodes(&["b", "c"]), nodes(&["z"]));
        let claims = [
            Claim {
                rank: &new,
                spec: &s_new,
                nodes: &n_new,
            },
            Claim {
                rank: &old,
                spec: &s_old,
                nodes: &n_old,
            },
            Claim {
                rank: &far,
                spec: &s_new,
                nodes: &n_far,
            },
        ];
        let lost = lost_by(&claims, 0);
        assert_eq!(
            lost,
            [Lost {
                winner: "prod/old".into(),
                vip: true,
                what: "VIP 10.0.0.1:80/TCP".into(),
                nodes: vec!["b".into()],
            }]
        );
        assert_eq!(
            lost[0].message(),
            "VIP 10.0.0.1:80/TCP is kept by older prod/old on node b"
        );
        // The winner loses nothing; a LoadBalancer on other nodes neither.
        assert_eq!(lost_by(&claims, 1), []);
        assert_eq!(lost_by(&claims, 2), []);
    }

    #[test]
    fn node_wide_settings_conflict_and_equal_times_fall_back_to_the_name() {
        let (a, b) = (rank(100, "a"), rank(100, "b"));
        let (s_a, s_b) = (
            spec("mtu: {size: 9000}\ninterface: eth1"),
            spec("interface: eth1\nvips: [{address: 10.0.0.9}]"),
        );
        let shared = nodes(&["n1", "n2", "n3"]);
        let claims = [
            Claim {
                rank: &a,
                spec: &s_a,
                nodes: &shared,
            },
            Claim {
                rank: &b,
                spec: &s_b,
                nodes: &shared,
            },
        ];
        let lost = lost_by(&claims, 1);
        assert_eq!(lost.len(), 1);
        assert_eq!(lost[0].what, "settings mtu");
        assert!(!lost[0].vip);
        assert_eq!(
            lost[0].message(),
            "settings mtu is kept by older prod/a on 3 nodes (n1, ...)"
        );
        assert_eq!(lost_by(&claims, 0), []);
    }
}
