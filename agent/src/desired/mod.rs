//! What one node must program, resolved from the LoadBalancer specs that select it (pure: no
//! I/O).
//!
//! - [`OwnerDesired`] is one LoadBalancer's part: its VIPs and the node-wide settings it asks
//!   for, resolved from a spec that passed validation.
//! - [`merge`](merge::merge) combines every owner's part into the one [`Desired`] a datapath
//!   serves. Each VIP remembers its [`Owner`], so status and metrics name the right object; an
//!   owner that loses a conflict is left out whole (never half-applied) and reported.
//! - [`Desired::lb_config`] is the datapath's configuration for it.

mod merge;

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::IpAddr,
    time::Duration,
};

use marklb_common::{
    CFG_F_ENABLED, CFG_F_EVENTS, CFG_F_ICMP_ECHO, CFG_F_ICMP_TOO_BIG, LbConfig, addr_words,
};
use marklb_crds::loadbalancer::{LoadBalancerSpec, MarkScope, TooBig};

use crate::{maglev::Backend, vip::VipId};

pub use merge::{Merged, OwnerVerdict, merge};

/// The LoadBalancer a VIP belongs to: `namespace/name` (standalone manifests without a
/// namespace: `name`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner {
    pub namespace: String,
    pub name: String,
}

impl Owner {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// One VIP as the datapath will serve it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipPlan {
    /// Name for logs and metric labels (the spec's name, else `address:port/proto`).
    pub label: String,
    pub backends: Vec<Backend>,
    pub table_size: u32,
    /// The LoadBalancer that asked for it.
    pub owner: Owner,
}

/// Flow-mark policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MarkPolicy {
    pub scope: MarkScope,
    pub capacity: u32,
    pub idle_timeout: Duration,
}

/// Where encapsulated packets go: an explicit MAC, else the neighbour entry of `address`,
/// else of the interface's default gateway.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    pub mac: Option<[u8; 6]>,
    pub address: Option<IpAddr>,
}

/// Settings one datapath serves once for all its VIPs: two owners asking for different
/// values cannot both be served on one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSettings {
    /// Interface to attach to (None: whichever the agent serves).
    pub interface: Option<String>,
    pub next_hop: NextHop,
    /// The flow-mark policy is node-wide: one NIC, one mark space, one capacity (see README).
    pub marks: MarkPolicy,
    pub mtu: u32,
    pub icmp_too_big: bool,
    pub icmp_echo: bool,
    pub encap_src_v4_be: u32,
    pub encap_src_v6_be: [u32; 4],
    /// Packets a UDP flow sends before its new-flow event (`flowMarks.udpPacketsBeforeMark`).
    pub udp_packets_before_mark: u8,
}

impl Default for NodeSettings {
    /// The settings of an empty LoadBalancer spec (every field defaulted).
    fn default() -> Self {
        let spec = LoadBalancerSpec::default();
        settings_of(&spec).expect("the default spec resolves")
    }
}

impl NodeSettings {
    /// The first setting that differs from `other`, for conflict messages.
    pub fn first_difference(&self, other: &Self) -> Option<String> {
        let show = |f: &dyn Fn(&Self) -> String, what: &str| {
            let (a, b) = (f(self), f(other));
            (a != b).then(|| format!("{what} {a} (asked: {b})"))
        };
        let iface = |s: &Self| s.interface.clone().unwrap_or_else(|| "(agent's)".into());
        let hop = |s: &Self| match (s.next_hop.mac, s.next_hop.address) {
            (Some(m), _) => format!(
                "mac {}",
                m.iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":")
            ),
            (None, Some(a)) => format!("address {a}"),
            (None, None) => "default gateway".into(),
        };
        let marks = |s: &Self| {
            format!(
                "{:?}/{}/{}s/udp {}",
                s.marks.scope,
                s.marks.capacity,
                s.marks.idle_timeout.as_secs(),
                s.udp_packets_before_mark
            )
        };
        let mtu = |s: &Self| {
            let tb = if s.icmp_too_big { "Icmp" } else { "Drop" };
            format!("{}/{tb}", s.mtu)
        };
        let encap = |s: &Self| {
            let v6 = s.encap_src_v6_be.map(u32::from_be);
            format!(
                "{}/{:x}:{:x}:{:x}:{:x}",
                std::net::Ipv4Addr::from(u32::from_be(s.encap_src_v4_be)),
                v6[0],
                v6[1],
                v6[2],
                v6[3]
            )
        };
        let echo = |s: &Self| s.icmp_echo.to_string();
        show(&iface, "interface")
            .or_else(|| show(&hop, "nextHop"))
            .or_else(|| show(&encap, "encap source prefixes"))
            .or_else(|| show(&mtu, "mtu"))
            .or_else(|| show(&marks, "flowMarks"))
            .or_else(|| show(&echo, "icmpEcho"))
    }
}

/// Everything the node programs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub settings: NodeSettings,
    pub vips: BTreeMap<VipId, VipPlan>,
}

/// New-flow events a CPU may send per second (bounds a SYN flood's cost to user space).
pub const EVENTS_PER_SEC_PER_CPU: u32 = 200_000;
/// The limiter's spacing of those events (`LbConfig::event_interval_ns`).
pub const EVENT_INTERVAL_NS: u32 = 1_000_000_000 / EVENTS_PER_SEC_PER_CPU;
pub const EVENTS_BURST: u32 = 4_096;
// The API's default is the datapath's own (what a zero in `LbConfig` means).
const _: () = assert!(
    marklb_crds::limits::DEFAULT_UDP_PACKETS_BEFORE_MARK
        == marklb_common::DEFAULT_UDP_EVENT_PACKETS as u32
);

/// One LoadBalancer's part of a node's desired state.
#[derive(Clone, Debug, PartialEq)]
pub struct OwnerDesired {
    pub owner: Owner,
    pub settings: NodeSettings,
    pub vips: BTreeMap<VipId, VipPlan>,
    /// The spec without its VIPs: node-wide settings are compared on it with
    /// `LoadBalancerSpec::node_setting_differences`, the function the operator uses too, so
    /// both name the same winner.
    pub spec_settings: LoadBalancerSpec,
}

fn settings_of(spec: &LoadBalancerSpec) -> Result<NodeSettings, String> {
    let v4 = spec
        .encap
        .v4_prefix()
        .ok_or("spec.encap.sourcePrefixV4: invalid prefix")?;
    let v6 = spec
        .encap
        .v6_prefix()
        .ok_or("spec.encap.sourcePrefixV6: invalid prefix")?;
    let next_hop = match &spec.next_hop {
        Some(h) => NextHop {
            mac: h.mac_bytes(),
            address: h.ip(),
        },
        None => NextHop::default(),
    };
    Ok(NodeSettings {
        interface: spec.interface.clone(),
        next_hop,
        marks: MarkPolicy {
            scope: spec.flow_marks.scope,
            capacity: spec.flow_marks.capacity,
            idle_timeout: Duration::from_secs(spec.flow_marks.idle_timeout_seconds as u64),
        },
        mtu: spec.mtu.size,
        icmp_too_big: spec.mtu.too_big == TooBig::Icmp,
        icmp_echo: spec.icmp_echo,
        encap_src_v4_be: addr_words(v4.addr)[0],
        encap_src_v6_be: addr_words(v6.addr),
        udp_packets_before_mark: u8::try_from(spec.flow_marks.udp_packets_before_mark)
            .ok()
            .filter(|&n| n > 0)
            .ok_or("spec.flowMarks.udpPacketsBeforeMark: must be between 1 and 255")?,
    })
}

impl OwnerDesired {
    /// Resolves a spec that already passed validation (`LoadBalancerSpec::validate`).
    pub fn from_spec(owner: Owner, spec: &LoadBalancerSpec) -> Result<Self, String> {
        let mut vips = BTreeMap::new();
        for (i, v) in spec.vips.iter().enumerate() {
            let addr = v
                .ip()
                .ok_or_else(|| format!("spec.vips[{i}].address: not an IP address"))?;
            if let Some(svc) = &v.backend_service {
                return Err(format!(
                    "spec.vips[{i}].backendService: Service {} is resolved to backends by the \
                     operator; an agent serving manifests directly needs `backends`",
                    svc.name
                ));
            }
            let id = VipId {
                addr,
                port: v.port,
                proto: v.protocol.ip_proto(),
            };
            let mut backends = Vec::with_capacity(v.backends.len());
            for (j, b) in v.backends.iter().enumerate() {
                let addr = b.ip().ok_or_else(|| {
                    format!("spec.vips[{i}].backends[{j}].address: not an IP address")
                })?;
                backends.push(Backend {
                    addr,
                    weight: b.weight,
                });
            }
            let plan = VipPlan {
                label: v.label(),
                backends,
                table_size: spec.hashing.maglev_table_size,
                owner: owner.clone(),
            };
            if vips.insert(id, plan).is_some() {
                return Err(format!("spec.vips[{i}]: duplicate VIP {}", v.endpoint()));
            }
        }
        Ok(Self {
            owner,
            settings: settings_of(spec)?,
            vips,
            spec_settings: LoadBalancerSpec {
                vips: Vec::new(),
                ..spec.clone()
            },
        })
    }
}

impl Desired {
    /// One owner's part alone (what a single manifest asks for).
    pub fn from_owner(o: OwnerDesired) -> Self {
        Self {
            settings: o.settings,
            vips: o.vips,
        }
    }

    /// The datapath configuration, given the resolved next-hop MAC.
    pub fn lb_config(&self, next_hop_mac: [u8; 6]) -> LbConfig {
        let s = &self.settings;
        let mut flags = CFG_F_ENABLED;
        if s.icmp_too_big {
            flags |= CFG_F_ICMP_TOO_BIG;
        }
        if s.icmp_echo {
            flags |= CFG_F_ICMP_ECHO;
        }
        if s.marks.scope != MarkScope::Disabled {
            flags |= CFG_F_EVENTS;
        }
        LbConfig {
            flags,
            mtu: s.mtu,
            next_hop_mac,
            udp_event_packets: s.udp_packets_before_mark,
            _pad0: 0,
            encap_src_v4_be: s.encap_src_v4_be,
            encap_src_v6_be: s.encap_src_v6_be,
            event_interval_ns: EVENT_INTERVAL_NS,
            events_burst: EVENTS_BURST,
        }
    }

    /// Ring slots the whole plan needs.
    pub fn ring_slots(&self) -> u64 {
        self.vips
            .values()
            .filter(|v| v.backends.iter().any(|b| b.weight > 0))
            .map(|v| v.table_size as u64)
            .sum()
    }

    /// Distinct real addresses (hashed: a state may list 100,000 backends).
    pub fn real_set(&self) -> HashSet<IpAddr> {
        let mut reals = HashSet::new();
        for v in self.vips.values() {
            reals.extend(v.backends.iter().map(|b| b.addr));
        }
        reals
    }

    /// Distinct real addresses.
    pub fn real_count(&self) -> usize {
        self.real_set().len()
    }
}

#[cfg(test)]
mod tests;
