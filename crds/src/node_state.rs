//! `LoadBalancerNodeState` (`marklb.io/v1alpha1`): one per (LoadBalancer, selected node).
//!
//! The per-node object splits the writers (bpfman and MetalLB use the same pattern): the
//! operator writes the spec (what this node must program, already resolved for it), and only
//! the agent of that node writes the status (what it did). With one object per node no two
//! agents ever write the same object, which is what keeps status updates cheap at 1,000 nodes.
//! The operator names it `<lb>-<node>`, labels it with [`NODE_LABEL`](crate::labels::NODE_LABEL)
//! and [`LOADBALANCER_LABEL`](crate::labels::LOADBALANCER_LABEL), and owns it through an owner
//! reference to the LoadBalancer.

use std::cmp::Ordering;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema, ResourceExt};
use serde::{Deserialize, Serialize};

use crate::loadbalancer::LoadBalancerSpec;

/// What one node must program for one LoadBalancer.
// Several `printcolumn(...)` entries repeat `type_ = ...`, which clippy mistakes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "marklb.io",
    version = "v1alpha1",
    kind = "LoadBalancerNodeState",
    plural = "loadbalancernodestates",
    shortname = "mlbns",
    namespaced,
    status = "LoadBalancerNodeStateStatus",
    derive = "PartialEq",
    doc = "The part of a LoadBalancer one node programs (spec, by the operator) and what that node did (status, by its agent).",
    printcolumn(
        name = "Node",
        type_ = "string",
        description = "Node that programs this state",
        json_path = ".spec.nodeName"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        description = "Whether the node's datapath serves the current spec",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        description = "Reason of the Ready condition",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "XDP Mode",
        type_ = "string",
        description = "How the program is attached (Native, Generic, Tc)",
        json_path = ".status.xdpMode"
    ),
    printcolumn(
        name = "Marks",
        type_ = "integer",
        description = "Flow marks in use for this state's VIPs",
        json_path = ".status.marksInUse"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancerNodeStateSpec {
    /// Name of the node whose agent programs this state.
    #[schemars(length(min = 1, max = 253))]
    pub node_name: String,

    /// Name of the LoadBalancer (same namespace) this state was derived from.
    #[schemars(length(min = 1, max = 253))]
    pub load_balancer: String,

    /// Interface to attach to on this node, when the operator resolved one (from the
    /// LoadBalancer's `interface`); absent: the agent uses the default route's interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 15), regex(pattern = r"^[^/:\s]+$"))]
    #[x_kube(validation = Rule::new("self != '.' && self != '..'").message("must be a network interface name"))]
    pub interface: Option<String>,

    /// The LoadBalancer spec resolved for this node: backends filled in (never a
    /// `backendService`), selector applied.
    pub lb: LoadBalancerSpec,

    /// `metadata.creationTimestamp` of the LoadBalancer (RFC 3339), so that every agent orders
    /// the owners of one node alike when two claim the same VIP or node-wide setting: the
    /// older LoadBalancer wins, then the smaller `namespace/name` (see [`OwnerRank`]). Absent
    /// (a state written by hand): ranks after every dated one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer_created: Option<Time>,
}

/// What the node's agent did with this state; written only by that agent.
// Field manager `labels::AGENT_FIELD_MANAGER`. Not `deny_unknown_fields`: an older operator
// must be able to read a newer agent's status.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerNodeStateStatus {
    /// `metadata.generation` of the spec the datapath currently serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Interface the datapath is attached to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,

    /// How the program is attached: Native, Generic, Offload (XDP modes) or Tc.
    // Values in `xdp_mode`; a string rather than an enum so an older operator can read a newer
    // agent's status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xdp_mode: Option<String>,

    /// Kernel id of the attached program (`bpftool prog show id N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program_id: Option<u32>,

    /// VIPs of this state programmed into the datapath.
    #[serde(default)]
    pub vips: u32,

    /// Backends ("reals") of this state programmed into the datapath.
    #[serde(default)]
    pub reals: u32,

    /// Flow marks in use for this state's VIPs.
    #[serde(default)]
    pub marks_in_use: u32,

    /// Hardware backend of the node's flow marks: `emulated`, `mellanox` or `none` (values in
    /// [`hw_backend`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hw_backend: Option<String>,

    /// Why this backend, e.g. why `--hw-backend auto` fell back to `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hw_backend_reason: Option<String>,

    /// How marks reach the datapath: `xdp-metadata` or `skb-mark` (values in
    /// [`mark_delivery`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mark_delivery: Option<String>,

    /// Whether the marks really go to a NIC (or the emulated NIC): false with backend `none`,
    /// with marks disabled, or when the NIC refuses rules.
    #[serde(default)]
    pub offloaded: bool,

    /// The last error the agent met with this state (absent when the last apply succeeded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,

    /// Conditions of types Ready, DatapathAttached, MarksProgrammed and Conflict (True when a
    /// VIP or node-wide setting of this state loses to another owner on the node; the
    /// message names the winner).
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// Values of [`LoadBalancerNodeStateStatus::xdp_mode`].
pub mod xdp_mode {
    /// XDP in the driver (`XDP_FLAGS_DRV_MODE`): the fast path.
    pub const NATIVE: &str = "Native";
    /// Generic (skb) XDP (`XDP_FLAGS_SKB_MODE`): works everywhere, slow.
    pub const GENERIC: &str = "Generic";
    /// Offloaded to the NIC (`XDP_FLAGS_HW_MODE`).
    pub const OFFLOAD: &str = "Offload";
    /// The TC variant of the datapath, which reads the NIC's mark from `skb->mark` (mlx5 flow
    /// tags reach TC, not XDP metadata, upstream).
    pub const TC: &str = "Tc";
}

/// Values of [`LoadBalancerNodeStateStatus::hw_backend`] (the agent's `--hw-backend` outcome).
pub mod hw_backend {
    /// The emulated NIC: an XDP program in front of the balancer plays the NIC's flow table.
    pub const EMULATED: &str = "emulated";
    /// A Mellanox/NVIDIA ConnectX NIC, rules through tc flower offload.
    pub const MELLANOX: &str = "mellanox";
    /// No NIC backend: flows take the normal path, unmarked.
    pub const NONE: &str = "none";
}

/// Values of [`LoadBalancerNodeStateStatus::mark_delivery`].
pub mod mark_delivery {
    /// The mark arrives in XDP metadata in front of the packet (emulated NIC, patched driver).
    pub const XDP_METADATA: &str = "xdp-metadata";
    /// The mark arrives as `skb->mark` (upstream mlx5 flow tags), read by the TC datapath.
    pub const SKB_MARK: &str = "skb-mark";
}

/// The rank of one owner (LoadBalancer) of a node's states when two claim the same VIP or
/// node-wide setting: the lower rank wins. Older `loadBalancerCreated` first; a state without
/// it after every dated one; then `namespace/name` (so equal timestamps, which have a
/// resolution of one second, still give one order). The operator and every agent rank with
/// this one type, so they always agree on the winner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerRank {
    /// Creation time of the LoadBalancer, if known.
    pub created: Option<Time>,
    /// Namespace of the LoadBalancer.
    pub namespace: String,
    /// Name of the LoadBalancer.
    pub name: String,
}

impl OwnerRank {
    /// `namespace/name`, as messages name an owner.
    pub fn owner(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl Ord for OwnerRank {
    fn cmp(&self, other: &Self) -> Ordering {
        let by_time = match (&self.created, &other.created) {
            (Some(a), Some(b)) => a.0.cmp(&b.0),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        };
        by_time
            .then_with(|| self.namespace.cmp(&other.namespace))
            .then_with(|| self.name.cmp(&other.name))
    }
}

impl PartialOrd for OwnerRank {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl LoadBalancerNodeState {
    /// The rank of the LoadBalancer this state belongs to (namespace of the state, which is
    /// the LoadBalancer's, and `spec.loadBalancer`).
    pub fn owner_rank(&self) -> OwnerRank {
        OwnerRank {
            created: self.spec.load_balancer_created.clone(),
            namespace: self.namespace().unwrap_or_default(),
            name: self.spec.load_balancer.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn rank(created: Option<i64>, namespace: &str, name: &str) -> OwnerRank {
        OwnerRank {
            created: created.map(|s| Time(Timestamp::from_second(s).unwrap())),
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    #[test]
    fn older_wins_then_namespace_then_name_and_undated_last() {
        let mut ranks = [
            rank(None, "a", "a"),
            rank(Some(200), "a", "a"),
            rank(Some(100), "z", "z"),
            rank(Some(100), "b", "web"),
            rank(Some(100), "b", "api"),
        ];
        ranks.sort();
        let order: Vec<String> = ranks.iter().map(OwnerRank::owner).collect();
        assert_eq!(order, ["b/api", "b/web", "z/z", "a/a", "a/a"]);
        assert_eq!(
            ranks[3].created,
            Some(Time(Timestamp::from_second(200).unwrap()))
        );
        assert_eq!(ranks[4].created, None);
    }

    #[test]
    fn a_state_ranks_by_its_loadbalancer() {
        let mut state = LoadBalancerNodeState::new(
            "web-node-a",
            LoadBalancerNodeStateSpec {
                node_name: "node-a".into(),
                load_balancer: "web".into(),
                interface: None,
                lb: LoadBalancerSpec::default(),
                load_balancer_created: Some(Time(Timestamp::from_second(7).unwrap())),
            },
        );
        state.metadata.namespace = Some("prod".into());
        assert_eq!(state.owner_rank(), rank(Some(7), "prod", "web"));
    }

    #[test]
    fn status_reads_without_the_new_fields_and_round_trips_with_them() {
        // An agent older than these fields writes none of them.
        let old: LoadBalancerNodeStateStatus =
            serde_json::from_str(r#"{"observedGeneration": 3, "vips": 1}"#).unwrap();
        assert_eq!((old.offloaded, old.hw_backend.as_deref()), (false, None));
        let new = LoadBalancerNodeStateStatus {
            hw_backend: Some(hw_backend::EMULATED.into()),
            hw_backend_reason: Some("--hw-backend emulated".into()),
            mark_delivery: Some(mark_delivery::XDP_METADATA.into()),
            offloaded: true,
            last_error: None,
            ..old
        };
        let json = serde_json::to_value(&new).unwrap();
        assert_eq!(json["hwBackend"], "emulated");
        assert_eq!(json["markDelivery"], "xdp-metadata");
        assert_eq!(json["offloaded"], true);
        assert!(json.get("lastError").is_none());
        let back: LoadBalancerNodeStateStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back, new);
    }
}
