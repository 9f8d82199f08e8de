//! `LoadBalancerNodeState` (`marklb.io/v1alpha1`): one per (LoadBalancer, selected node).
//!
//! The per-node object splits the writers (bpfman and MetalLB use the same pattern): the
//! operator writes the spec (what this node must program, already resolved for it), and only
//! the agent of that node writes the status (what it did). With one object per node no two
//! agents ever write the same object, which is what keeps status updates cheap at 1,000 nodes.
//! The operator names it `<lb>-<node>`, labels it with [`NODE_LABEL`](crate::labels::NODE_LABEL)
//! and [`LOADBALANCER_LABEL`](crate::labels::LOADBALANCER_LABEL), and owns it through an owner
//! reference to the LoadBalancer.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
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

    /// The LoadBalancer spec resolved for this node (backends filled in, selector applied).
    pub lb: LoadBalancerSpec,
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

    /// Conditions of types Ready, DatapathAttached and MarksProgrammed.
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
