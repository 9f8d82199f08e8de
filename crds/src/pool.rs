//! `LoadBalancerIPPool` (`marklb.io/v1alpha1`, cluster-scoped): addresses that Services of type
//! `LoadBalancer` served by marklb draw their external address from, which Services may draw
//! from it, and which nodes run the balancer for them.
//!
//! - `spec.addresses`: IPv4 and IPv6 CIDRs, ranges or single addresses ([`addresses`]).
//! - `spec.avoidBuggyIPs`: never hand out IPv4 addresses ending in `.0` or `.255`.
//! - `spec.autoAssign`: whether Services that name no pool and request no address draw from
//!   it (false: only Services that name it, or request one of its addresses).
//! - `spec.serviceAllocation`: namespaces (names and/or a label selector) and a Service label
//!   selector; a Service outside them never gets an address of this pool.
//! - `spec.nodeSelector`: the nodes that run the balancer (the agent) for this pool's
//!   Services; it becomes the `nodeSelector` of every LoadBalancer made for them.
//! - `spec.loadBalancer`: the datapath settings of those LoadBalancers (interface, next hop,
//!   encapsulation, MTU, flow marks, hashing), so they agree with hand-written LoadBalancers
//!   on the same nodes (one datapath per interface serves one setting of each).
//!
//! `status.allocations` is the ledger of handed-out addresses, one entry per (address,
//! Service). The operator rewrites it only with the `resourceVersion` it read (optimistic
//! concurrency), so two operators racing for one address cannot both win: the API server
//! refuses the second write and the loser re-reads. The Services' `status.loadBalancer.ingress`
//! shows the result to users.
//!
//! Validation, as for LoadBalancers, in three layers: Rust ([`LoadBalancerIPPoolSpec::validate`],
//! every rule, run by the operator, which reports a bad pool in its `Valid` condition and
//! allocates nothing from it), schema bounds and patterns (every apiserver, 1.20 included),
//! and CEL (address syntax and families, on servers with CEL). Order of range ends, overlaps
//! inside a pool and between pools are checked by the operator only.

pub mod addresses;
pub mod selector;

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::loadbalancer::{Encap, FlowMarks, Hashing, LoadBalancerSpec, Mtu, NextHop};
use crate::validate::FieldError;

pub use addresses::{AddressBlock, Family, parse_block};

/// Most entries in `spec.addresses`.
pub const MAX_ADDRESS_BLOCKS: usize = 64;
/// Most namespaces named in `spec.serviceAllocation.namespaces`.
pub const MAX_NAMESPACES: usize = 256;

/// Condition type of a pool: the spec is usable (`False`: nothing is allocated from it; the
/// message says why).
pub const VALID: &str = "Valid";

/// Reasons of the pool's [`VALID`] condition.
pub mod reason {
    /// Every rule holds and no address overlaps another pool.
    pub const VALID: &str = "Valid";
    /// The spec breaks a rule (the message lists the fields).
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// An address block overlaps an older pool's (the message names it): handing the same
    /// address out of two pools could give it to two Services.
    pub const OVERLAP: &str = "Overlap";
}

/// An address pool for Services of type LoadBalancer.
// Several `printcolumn(...)` entries repeat `type_ = ...`, which clippy mistakes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "marklb.io",
    version = "v1alpha1",
    kind = "LoadBalancerIPPool",
    plural = "loadbalancerippools",
    shortname = "mlbpool",
    status = "LoadBalancerIPPoolStatus",
    derive = "PartialEq",
    doc = "Addresses that Services of type LoadBalancer served by marklb draw from, who may draw, and which nodes balance them.",
    printcolumn(
        name = "Addresses",
        type_ = "string",
        description = "Address blocks of the pool",
        json_path = ".spec.addresses"
    ),
    printcolumn(
        name = "In Use",
        type_ = "integer",
        description = "Addresses handed out (an address shared by several Services counts once)",
        json_path = ".status.inUse"
    ),
    printcolumn(
        name = "Available",
        type_ = "string",
        description = "Addresses left, by family",
        json_path = ".status.available"
    ),
    printcolumn(
        name = "Valid",
        type_ = "string",
        description = "Whether the pool is usable",
        json_path = ".status.conditions[?(@.type==\"Valid\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancerIPPoolSpec {
    /// Address blocks: CIDRs without host bits (`192.0.2.0/28`, `2001:db8::/120`), inclusive
    /// ranges of one family (`198.51.100.10-198.51.100.20`) or single addresses. Blocks of one
    /// pool must not overlap, nor overlap another pool's.
    #[schemars(
        length(min = 1, max = 64),
        inner(
            length(min = 1, max = 100),
            regex(pattern = r"^[0-9A-Fa-f.:]+(/[0-9]{1,3}|-[0-9A-Fa-f.:]+)?$")
        )
    )]
    #[x_kube(
        merge_strategy = ListMerge::Set,
        validation = Rule::new(
            "self.all(a, isCIDR(a) ? cidr(a).masked() == cidr(a) : (a.contains('-') ? (size(a.split('-')) == 2 && isIP(a.split('-')[0]) && isIP(a.split('-')[1]) && ip(a.split('-')[0]).family() == ip(a.split('-')[1]).family()) : isIP(a)))"
        ).message("each address must be a CIDR without host bits (192.0.2.0/28), a range of one IP family (192.0.2.10-192.0.2.20) or an IP address")
    )]
    pub addresses: Vec<String>,

    /// Never hand out IPv4 addresses ending in `.0` or `.255` (some clients and routers
    /// mistake them for network or broadcast addresses).
    #[serde(default, rename = "avoidBuggyIPs")]
    pub avoid_buggy_ips: bool,

    /// Whether Services that neither name a pool nor request an address draw from this one.
    /// False: only Services that name it (annotation `marklb.io/address-pool`) or request one
    /// of its addresses get one.
    #[serde(default = "default_true")]
    pub auto_assign: bool,

    /// Which Services may draw from the pool. Absent: every Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_allocation: Option<ServiceAllocation>,

    /// Nodes that run the balancer for this pool's Services (label selector, all must
    /// match). Absent: every node the agent can run on. Balancer nodes are never reals of the
    /// Services they balance (an XDP program cannot send a packet to its own host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,

    /// Datapath settings of the LoadBalancers made for this pool's Services. LoadBalancers that
    /// share a node must agree on them (one datapath per interface), so set them like the
    /// hand-written LoadBalancers on the same nodes. Absent: the defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<PoolLoadBalancer>,
}

/// Which Services may draw from a pool: all conditions given must hold.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceAllocation {
    /// Namespaces by name. Empty or absent: any namespace (subject to `namespaceSelector`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 256),
        inner(
            length(min = 1, max = 63),
            regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
        )
    )]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub namespaces: Vec<String>,

    /// Namespaces by label. Absent: any namespace (subject to `namespaces`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,

    /// Services by label. Absent: any Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_selector: Option<LabelSelector>,
}

/// The datapath settings of a pool's LoadBalancers (the node-wide part of a LoadBalancer spec).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolLoadBalancer {
    /// Consistent hashing of new flows onto the nodes.
    #[serde(default)]
    pub hashing: Hashing,

    /// NIC flow-mark acceleration.
    #[serde(default)]
    pub flow_marks: FlowMarks,

    /// MTU of the path to the nodes.
    #[serde(default)]
    pub mtu: Mtu,

    /// Answer ICMP echo requests sent to a Service's address from the datapath.
    #[serde(default = "default_true")]
    pub icmp_echo: bool,

    /// Where encapsulated packets are sent (absent: the interface's default gateway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_hop: Option<NextHop>,

    /// Outer source addresses of encapsulated packets.
    #[serde(default)]
    pub encap: Encap,

    /// Interface to attach to on the balancer nodes (absent: the default route's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 15), regex(pattern = r"^[^/:\s]+$"))]
    #[x_kube(validation = Rule::new("self != '.' && self != '..'").message("must be a network interface name"))]
    pub interface: Option<String>,
}

impl Default for PoolLoadBalancer {
    fn default() -> Self {
        let spec = LoadBalancerSpec::default();
        Self {
            hashing: spec.hashing,
            flow_marks: spec.flow_marks,
            mtu: spec.mtu,
            icmp_echo: spec.icmp_echo,
            next_hop: spec.next_hop,
            encap: spec.encap,
            interface: spec.interface,
        }
    }
}

impl PoolLoadBalancer {
    /// A LoadBalancer spec with these settings, no VIPs, and `node_selector`.
    pub fn spec(&self, node_selector: Option<BTreeMap<String, String>>) -> LoadBalancerSpec {
        LoadBalancerSpec {
            vips: Vec::new(),
            hashing: self.hashing.clone(),
            flow_marks: self.flow_marks.clone(),
            mtu: self.mtu.clone(),
            icmp_echo: self.icmp_echo,
            next_hop: self.next_hop.clone(),
            encap: self.encap.clone(),
            node_selector,
            interface: self.interface.clone(),
        }
    }
}

/// What the operator observed and handed out; written only by the operator.
// Not `deny_unknown_fields`: an older operator must be able to read a newer status.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerIPPoolStatus {
    /// `metadata.generation` of the spec the `Valid` condition describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Addresses handed out, one entry per (address, Service), in the order they were handed
    /// out (an earlier entry wins a later conflict).
    #[serde(default)]
    pub allocations: Vec<PoolAllocation>,

    /// Distinct addresses handed out.
    #[serde(default)]
    pub in_use: u32,

    /// Addresses left, by family, e.g. `IPv4 13, IPv6 256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available: Option<String>,

    /// Condition `Valid`.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// One address handed to one Service.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PoolAllocation {
    /// The address, canonical.
    pub address: String,
    /// Namespace of the Service.
    pub namespace: String,
    /// Name of the Service.
    pub service: String,
    /// UID of the Service (a re-created Service of the same name is another Service).
    pub uid: String,
    /// Sharing key of the Service, when it allows sharing the address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sharing_key: Option<String>,
    /// The Service's ports on this address, `TCP/80`, `UDP/53`.
    #[serde(default)]
    pub ports: Vec<String>,
}

/// Every problem found in a pool spec (never empty when returned as an error), one per line
/// when displayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PoolErrors(pub Vec<FieldError>);

impl fmt::Display for PoolErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl LoadBalancerIPPoolSpec {
    /// The parsed address blocks, in spec order; `None` for an entry that does not parse.
    pub fn blocks(&self) -> Vec<Option<AddressBlock>> {
        self.addresses.iter().map(|a| parse_block(a).ok()).collect()
    }

    /// The datapath settings (the defaults when absent).
    pub fn load_balancer(&self) -> PoolLoadBalancer {
        self.load_balancer.clone().unwrap_or_default()
    }

    /// Checks every rule; the error lists all problems, each prefixed with its path.
    pub fn validate(&self) -> Result<(), PoolErrors> {
        let mut errors = Vec::new();
        let mut push = |path: String, message: String| errors.push(FieldError { path, message });
        if self.addresses.is_empty() {
            push(
                "spec.addresses".into(),
                "must list at least one address block".into(),
            );
        }
        if self.addresses.len() > MAX_ADDRESS_BLOCKS {
            push(
                "spec.addresses".into(),
                format!(
                    "at most {MAX_ADDRESS_BLOCKS} blocks, not {}",
                    self.addresses.len()
                ),
            );
        }
        let mut parsed: Vec<(usize, AddressBlock)> = Vec::new();
        for (i, text) in self.addresses.iter().enumerate() {
            match parse_block(text) {
                Ok(block) => {
                    if let Some((j, other)) = parsed.iter().find(|(_, b)| b.overlaps(&block)) {
                        push(
                            format!("spec.addresses[{i}]"),
                            format!("{text:?} overlaps spec.addresses[{j}] ({other})"),
                        );
                    }
                    parsed.push((i, block));
                }
                Err(e) => push(format!("spec.addresses[{i}]"), e),
            }
        }
        if let Some(alloc) = &self.service_allocation {
            if alloc.namespaces.len() > MAX_NAMESPACES {
                push(
                    "spec.serviceAllocation.namespaces".into(),
                    format!("at most {MAX_NAMESPACES} namespaces"),
                );
            }
            for (i, ns) in alloc.namespaces.iter().enumerate() {
                if !is_dns_label(ns) {
                    push(
                        format!("spec.serviceAllocation.namespaces[{i}]"),
                        format!("{ns:?} is not a namespace name (a DNS label)"),
                    );
                }
            }
            for (field, sel) in [
                ("namespaceSelector", &alloc.namespace_selector),
                ("serviceSelector", &alloc.service_selector),
            ] {
                for (path, message) in sel.as_ref().map(selector::check).unwrap_or_default() {
                    push(format!("spec.serviceAllocation.{field}.{path}"), message);
                }
            }
        }
        let template = self.load_balancer().spec(self.node_selector.clone());
        if let Err(lb) = template.validate_at("spec.loadBalancer") {
            for e in lb.into_errors() {
                push(e.path, e.message);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(PoolErrors(errors))
        }
    }

    /// Whether a Service in a namespace with `namespace_labels`, carrying `service_labels`, may
    /// draw from the pool (its `serviceAllocation`).
    pub fn admits(
        &self,
        namespace: &str,
        namespace_labels: &BTreeMap<String, String>,
        service_labels: &BTreeMap<String, String>,
    ) -> bool {
        let Some(alloc) = &self.service_allocation else {
            return true;
        };
        (alloc.namespaces.is_empty() || alloc.namespaces.iter().any(|n| n == namespace))
            && selector::matches(alloc.namespace_selector.as_ref(), namespace_labels)
            && selector::matches(alloc.service_selector.as_ref(), service_labels)
    }
}

fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

fn default_true() -> bool {
    true
}

#[cfg(test)]
mod tests;
