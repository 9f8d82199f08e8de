//! `LoadBalancer` (`marklb.io/v1alpha1`): what a user writes, and what a node agent programs.
//!
//! The same spec is three things at once, which is why it is strict and fully defaulted:
//! the CR users apply, the `lb` field of every `LoadBalancerNodeState` the operator derives from
//! it, and the standalone config file of `marklb-agent run --config lb.yaml`. Every field has a
//! serde default (so a three-line manifest is complete) and unknown fields are errors (so a typo
//! such as `adress` never silently drops a backend).
//!
//! Validation lives in three layers that check the same rules where they can:
//! - [`LoadBalancerSpec::validate`](crate::validate) in Rust, for the agent without an apiserver
//!   and for the operator before it fans a spec out to nodes;
//! - the OpenAPI schema bounds (`maxItems`, `minimum`, `pattern`, `enum`, list-map keys), which
//!   every apiserver enforces, including 1.20;
//! - CEL `x-kubernetes-validations` (rules below), for what a schema cannot express (IP syntax,
//!   address families, weight sums, uniqueness of names), on apiservers that know CEL.
//!
//! Only the Maglev table size being prime has no apiserver-side rule (CEL has no loop to test
//! it); the Rust validation catches it and the operator reports it as a condition.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::limits::{
    DEFAULT_ENCAP_PREFIX_V4, DEFAULT_ENCAP_PREFIX_V6, DEFAULT_MAGLEV_TABLE_SIZE,
    DEFAULT_UDP_PACKETS_BEFORE_MARK, MAX_MARK_CAPACITY,
};
use crate::parse::{IpPrefix, parse_ip, parse_mac, parse_prefix};

/// Desired state of a load balancer: its VIPs and their backends, and how every selected node's
/// XDP datapath serves them. Every field has a default.
// Several `printcolumn(...)` entries repeat `type_ = ...`, which clippy mistakes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "marklb.io",
    version = "v1alpha1",
    kind = "LoadBalancer",
    plural = "loadbalancers",
    shortname = "mlb",
    namespaced,
    status = "LoadBalancerStatus",
    derive = "PartialEq",
    doc = "An XDP L4 load balancer: VIPs, their backends, and how nodes program them.",
    printcolumn(
        name = "VIPs",
        type_ = "string",
        description = "VIP addresses (kubectl shows the first)",
        json_path = ".spec.vips[*].address"
    ),
    printcolumn(
        name = "Nodes",
        type_ = "string",
        description = "Selected nodes whose datapath serves the current spec, of those selected (ready/desired)",
        json_path = ".status.nodes"
    ),
    printcolumn(
        name = "Offload",
        type_ = "string",
        description = "Ready nodes whose flow marks reach a NIC (offloaded/ready), or Disabled",
        json_path = ".status.offload"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        description = "Whether every selected node programmed the datapath",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(
    validation = Rule::new(
        "!has(self.vips) || self.vips.all(v, !has(v.name) || self.vips.exists_one(w, has(w.name) && w.name == v.name))"
    ).message("VIP names must be unique").field_path(".vips"),
    validation = Rule::new(
        "!has(self.vips) || !has(self.hashing) || !has(self.hashing.maglevTableSize) || self.vips.all(v, !has(v.backends) || size(v.backends) < self.hashing.maglevTableSize)"
    ).message("maglevTableSize must exceed the number of backends of every VIP").field_path(".hashing.maglevTableSize"),
)]
pub struct LoadBalancerSpec {
    /// Virtual IPs served by this load balancer. A VIP is identified by address, port and
    /// protocol; the same address may appear with several ports, and with port 0 (all ports)
    /// next to specific ports.
    #[serde(default)]
    #[schemars(length(max = 256))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["address".into(), "port".into(), "protocol".into()]))]
    pub vips: Vec<Vip>,

    /// Consistent hashing of new flows onto backends.
    #[serde(default)]
    pub hashing: Hashing,

    /// NIC flow-mark acceleration.
    #[serde(default)]
    pub flow_marks: FlowMarks,

    /// MTU of the path to the backends and what to do with packets that no longer fit once
    /// encapsulated.
    #[serde(default)]
    pub mtu: Mtu,

    /// Answer ICMP/ICMPv6 echo requests sent to a VIP address from the datapath.
    #[serde(default = "default_true")]
    pub icmp_echo: bool,

    /// Where encapsulated packets are sent. When absent (or empty) the agent resolves the
    /// default gateway of the interface through netlink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_hop: Option<NextHop>,

    /// Outer source addresses of encapsulated packets.
    #[serde(default)]
    pub encap: Encap,

    /// Nodes that serve this load balancer (label selector, all must match). Absent: every
    /// node the operator's DaemonSet can run on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,

    /// Network interface to attach to on every node. Absent: the interface of the node's
    /// default route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 15), regex(pattern = r"^[^/:\s]+$"))]
    #[x_kube(validation = Rule::new("self != '.' && self != '..'").message("must be a network interface name"))]
    pub interface: Option<String>,
}

impl Default for LoadBalancerSpec {
    fn default() -> Self {
        Self {
            vips: Vec::new(),
            hashing: Hashing::default(),
            flow_marks: FlowMarks::default(),
            mtu: Mtu::default(),
            icmp_echo: true,
            next_hop: None,
            encap: Encap::default(),
            node_selector: None,
            interface: None,
        }
    }
}

impl LoadBalancerSpec {
    /// The node-wide settings in which `self` and `other` differ, by field name (`interface`,
    /// `nextHop`, `encap`, `mtu`, `flowMarks`, `icmpEcho`). One interface carries one datapath
    /// with one configuration, so two LoadBalancers on one node must agree on all of them; a
    /// non-empty answer is a conflict, which the older LoadBalancer wins (the operator and the
    /// agent both decide it with this function).
    pub fn node_setting_differences(&self, other: &LoadBalancerSpec) -> Vec<&'static str> {
        let mut differ = Vec::new();
        if self.interface != other.interface {
            differ.push("interface");
        }
        if self.next_hop.as_ref().filter(|n| **n != NextHop::default())
            != other
                .next_hop
                .as_ref()
                .filter(|n| **n != NextHop::default())
        {
            differ.push("nextHop");
        }
        if self.encap != other.encap {
            differ.push("encap");
        }
        if self.mtu != other.mtu {
            differ.push("mtu");
        }
        if self.flow_marks != other.flow_marks {
            differ.push("flowMarks");
        }
        if self.icmp_echo != other.icmp_echo {
            differ.push("icmpEcho");
        }
        differ
    }

    /// Whether some VIP takes its backends from a Service (`backendService`).
    pub fn uses_backend_service(&self) -> bool {
        self.vips.iter().any(|v| v.backend_service.is_some())
    }
}

/// One virtual IP: address, port and protocol, and the backends ("reals") behind it.
// The family rules test for ':' rather than calling ip(): for addresses that pass `isIP` it is
// the same test (only IPv6 text has colons) at a third of the apiserver's estimated CEL cost,
// which is what keeps these per-backend loops under the per-rule budget (10M) at
// 256 VIPs x 1024 backends. Invalid addresses are reported by the address rules.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(
    validation = Rule::new(
        "!has(self.backends) || size(self.backends) == 0 || self.backends.exists(b, !has(b.weight) || b.weight > 0)"
    ).message("total backend weight must be greater than 0 (a VIP without backends is allowed and drops)").field_path(".backends"),
    validation = Rule::new(
        "!self.address.contains(':') || !has(self.backends) || self.backends.all(b, b.address.contains(':'))"
    ).message("an IPv6 VIP needs IPv6 backends").field_path(".backends"),
    validation = Rule::new(
        "!has(self.backends) || size(self.backends.filter(b, b.address.contains(':'))) in [0, size(self.backends)]"
    ).message("backends of one VIP must all be IPv4 or all IPv6").field_path(".backends"),
    validation = Rule::new(
        "!has(self.backendService) || !has(self.backends) || size(self.backends) == 0"
    ).message("backendService and backends are exclusive: list backends, or name a Service whose endpoints become the backends").field_path(".backendService"),
)]
pub struct Vip {
    /// Optional name, unique within the load balancer; used in metrics and status messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: Option<String>,

    /// VIP address, IPv4 or IPv6, in canonical form (`10.0.0.1`, `2001:db8::1`): VIPs are
    /// unique by address, port and protocol, compared as text.
    #[schemars(length(max = 45))]
    #[x_kube(
        validation = Rule::new("isIP(self)").message("must be an IPv4 or IPv6 address (IPv4-mapped IPv6 is not allowed)"),
        validation = Rule::new("!isIP(self) || ip.isCanonical(self)").message("must be written in canonical form (lower case, zeros compressed as in RFC 5952), as VIPs are compared as text")
    )]
    pub address: String,

    /// Destination port; 0 (or omitted) serves every port of the address and protocol.
    #[serde(default)]
    pub port: u16,

    /// Transport protocol.
    #[serde(default)]
    pub protocol: Protocol,

    /// Backends ("reals") that receive the VIP's flows, encapsulated (IPIP/IP6IP6; an IPv4 VIP
    /// may use IPv6 reals). Empty: the VIP is served but its packets are dropped (or, with
    /// `backendService`, the operator fills them in on each node).
    #[serde(default)]
    #[schemars(length(max = 1024))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["address".into()]))]
    pub backends: Vec<Backend>,

    /// A Service in the LoadBalancer's namespace whose ready endpoints (from its
    /// EndpointSlices, addresses of the VIP's family) become the backends, weight 1 each, kept
    /// current by the operator. Exclusive with a non-empty `backends`. Only the operator reads
    /// it: the node states it writes carry the resolved `backends` instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_service: Option<ServiceRef>,
}

/// A reference to a Service in the same namespace.
#[derive(
    KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceRef {
    /// Name of the Service (a DNS-1035 label, as Service names are).
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
}

impl Vip {
    /// The parsed address; `None` only for a spec that fails [`LoadBalancerSpec::validate`].
    pub fn ip(&self) -> Option<IpAddr> {
        parse_ip(&self.address).ok()
    }

    /// What identifies a VIP on a node (two owners of the same key conflict): the address
    /// (parsed; the text of an invalid one), port and protocol.
    pub fn key(&self) -> (Result<IpAddr, String>, u16, Protocol) {
        (
            self.ip().ok_or_else(|| self.address.clone()),
            self.port,
            self.protocol,
        )
    }

    /// A short human name: the `name` if set, else `address:port/protocol`.
    pub fn label(&self) -> String {
        match &self.name {
            Some(name) => name.clone(),
            None => self.endpoint(),
        }
    }

    /// `10.0.0.1:80/TCP`, `[2001:db8::1]:53/UDP`; port 0 prints as `*`.
    pub fn endpoint(&self) -> String {
        let port = match self.port {
            0 => "*".to_string(),
            p => p.to_string(),
        };
        if self.address.contains(':') {
            format!("[{}]:{port}/{}", self.address, self.protocol)
        } else {
            format!("{}:{port}/{}", self.address, self.protocol)
        }
    }
}

/// One backend ("real") of a VIP.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backend {
    /// Backend address, IPv4 or IPv6.
    // Unlike VIP addresses, not required to be canonical: `ip.isCanonical` on up to
    // 256 x 1024 backends would exceed the apiserver's per-rule CEL cost budget. Duplicates are
    // still found by the Rust validation, which compares parsed addresses.
    #[schemars(length(max = 45))]
    #[x_kube(validation = Rule::new("isIP(self)").message("must be an IPv4 or IPv6 address (IPv4-mapped IPv6 is not allowed)"))]
    pub address: String,

    /// Relative share of new flows. 0 drains the backend: it gets no new flows, while flows it
    /// already serves stay until they end (they are found in the LRU or by their mark).
    #[serde(default = "default_weight")]
    pub weight: u32,
}

impl Backend {
    /// The parsed address; `None` only for a spec that fails [`LoadBalancerSpec::validate`].
    pub fn ip(&self) -> Option<IpAddr> {
        parse_ip(&self.address).ok()
    }
}

/// Transport protocol of a VIP.
#[derive(
    Serialize,
    Deserialize,
    schemars::JsonSchema,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
)]
pub enum Protocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

impl Protocol {
    /// The IP protocol number (`IPPROTO_TCP`, `IPPROTO_UDP`), as the datapath keys VIPs.
    pub fn ip_proto(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }

    /// `TCP` or `UDP`, as written in the spec.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Consistent hashing settings.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Hashing {
    /// Entries of each VIP's Maglev lookup table. Must be a prime (Maglev's permutation needs
    /// it), greater than the VIP's number of backends, between 7 and 1000003. Larger tables
    /// spread load more evenly and disrupt fewer flows when backends change.
    #[schemars(range(min = 7, max = 1_000_003))]
    pub maglev_table_size: u32,
}

impl Default for Hashing {
    fn default() -> Self {
        Self {
            maglev_table_size: DEFAULT_MAGLEV_TABLE_SIZE,
        }
    }
}

/// NIC flow-mark acceleration settings.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct FlowMarks {
    /// What one mark identifies: PerFlow, PerReal, or Disabled (no marks).
    pub scope: MarkScope,

    /// Most marks in use at once on a node (marks are 16-bit on mlx5, and 0 means no mark).
    #[schemars(range(min = 1, max = 65_535))]
    pub capacity: u32,

    /// A mark unused for this long is released and its NIC rule removed.
    #[schemars(range(min = 1, max = 86_400))]
    pub idle_timeout_seconds: u32,

    /// Packets a UDP flow sends before the node asks for its mark (the packet that makes
    /// the count included). TCP flows ask with the first packet after the SYN. Higher
    /// values keep short UDP exchanges (DNS) from taking marks and NIC rules.
    #[schemars(range(min = 1, max = 255))]
    pub udp_packets_before_mark: u32,
}

impl Default for FlowMarks {
    fn default() -> Self {
        Self {
            scope: MarkScope::PerFlow,
            capacity: MAX_MARK_CAPACITY,
            idle_timeout_seconds: 30,
            udp_packets_before_mark: DEFAULT_UDP_PACKETS_BEFORE_MARK,
        }
    }
}

/// What one NIC flow mark identifies. "No marks" is spelled `Disabled`, not `Off`: YAML 1.1
/// parsers, kubectl's among them, read a bare `Off` as the boolean false.
#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Hash,
)]
pub enum MarkScope {
    /// One mark per connection: exact, one mark-map entry per flow.
    #[default]
    PerFlow,
    /// One mark per (VIP, backend): few, cache-hot mark-map entries; the NIC rule still
    /// matches the flow's 5-tuple.
    PerReal,
    /// No marks: every packet takes the normal (LRU or Maglev) path.
    Disabled,
}

/// MTU settings.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Mtu {
    /// MTU of the path from this node to the backends, in bytes.
    #[schemars(range(min = 1280, max = 9216))]
    pub size: u32,

    /// What to do with a packet that exceeds `size` once encapsulated.
    pub too_big: TooBig,
}

impl Default for Mtu {
    fn default() -> Self {
        Self {
            size: 1500,
            too_big: TooBig::Icmp,
        }
    }
}

/// Handling of packets too big to encapsulate.
#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Hash,
)]
pub enum TooBig {
    /// Answer with ICMP "fragmentation needed" / ICMPv6 "packet too big" so the client lowers
    /// its path MTU.
    #[default]
    Icmp,
    /// Drop silently (and count).
    Drop,
}

/// Where encapsulated packets go: the L2 next hop of the load balancer node.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NextHop {
    /// Destination MAC address, `aa:bb:cc:dd:ee:ff`. Takes precedence over `address`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$"))]
    pub mac: Option<String>,

    /// Next-hop IP address whose MAC the agent resolves (neighbour table).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 45))]
    #[x_kube(validation = Rule::new("isIP(self)").message("must be an IPv4 or IPv6 address (IPv4-mapped IPv6 is not allowed)"))]
    pub address: Option<String>,
}

impl NextHop {
    /// The parsed MAC; `None` if unset (or invalid, which validation rejects).
    pub fn mac_bytes(&self) -> Option<[u8; 6]> {
        self.mac.as_deref().and_then(|m| parse_mac(m).ok())
    }

    /// The parsed next-hop address; `None` if unset (or invalid, which validation rejects).
    pub fn ip(&self) -> Option<IpAddr> {
        self.address.as_deref().and_then(|a| parse_ip(a).ok())
    }
}

/// Outer source addresses of encapsulated packets. Reals see these as the tunnel source; the
/// low bits vary per flow so that NIC receive-side scaling on the reals spreads the flows.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Encap {
    /// IPv4 prefix (exactly /16, no host bits) for IPIP outer source addresses.
    #[serde(default = "default_prefix_v4")]
    #[schemars(length(max = 18))]
    #[x_kube(validation = Rule::new(
        "isCIDR(self) && cidr(self).ip().family() == 4 && cidr(self).prefixLength() == 16 && cidr(self).masked() == cidr(self)"
    ).message("sourcePrefixV4 must be an IPv4 prefix of length 16 without host bits, e.g. 172.16.0.0/16"))]
    pub source_prefix_v4: String,

    /// IPv6 prefix (exactly /96, no host bits) for IP6IP6 outer source addresses.
    #[serde(default = "default_prefix_v6")]
    #[schemars(length(max = 43))]
    #[x_kube(validation = Rule::new(
        "isCIDR(self) && cidr(self).ip().family() == 6 && cidr(self).prefixLength() == 96 && cidr(self).masked() == cidr(self)"
    ).message("sourcePrefixV6 must be an IPv6 prefix of length 96 without host bits, e.g. fc00:6d6c:62::/96"))]
    pub source_prefix_v6: String,
}

impl Default for Encap {
    fn default() -> Self {
        Self {
            source_prefix_v4: default_prefix_v4(),
            source_prefix_v6: default_prefix_v6(),
        }
    }
}

impl Encap {
    /// The parsed IPv4 prefix; `None` only for a spec that fails validation.
    pub fn v4_prefix(&self) -> Option<IpPrefix> {
        parse_prefix(&self.source_prefix_v4).ok()
    }

    /// The parsed IPv6 prefix; `None` only for a spec that fails validation.
    pub fn v6_prefix(&self) -> Option<IpPrefix> {
        parse_prefix(&self.source_prefix_v6).ok()
    }
}

/// Observed state of a LoadBalancer, rolled up by the operator from its node states.
// Not `deny_unknown_fields`: an older operator must be able to read a newer status.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerStatus {
    /// `metadata.generation` of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Conditions of types Ready, Programmed, Offloaded, Degraded and Conflict.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// Nodes selected by `nodeSelector` (one LoadBalancerNodeState each).
    #[serde(default)]
    pub nodes_desired: u32,

    /// Selected nodes whose datapath is attached and programmed with the current generation.
    #[serde(default)]
    pub nodes_ready: u32,

    /// Ready nodes whose NIC accepted flow-mark rules.
    #[serde(default)]
    pub nodes_offloaded: u32,

    /// Flow marks in use, summed over nodes.
    #[serde(default)]
    pub marks_in_use: u64,

    /// `nodesReady/nodesDesired` as printed by `kubectl get mlb`, e.g. `3/3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<String>,

    /// Flow-mark offload as printed by `kubectl get mlb`: `nodesOffloaded/nodesReady` (e.g.
    /// `2/3`), or `Disabled` when the spec turns marks off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offload: Option<String>,
}

fn default_true() -> bool {
    true
}

fn default_weight() -> u32 {
    1
}

fn default_prefix_v4() -> String {
    DEFAULT_ENCAP_PREFIX_V4.to_string()
}

fn default_prefix_v6() -> String {
    DEFAULT_ENCAP_PREFIX_V6.to_string()
}
