//! What one node must program, resolved from a LoadBalancer spec (pure: no I/O).

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use marklb_common::{
    CFG_F_ENABLED, CFG_F_EVENTS, CFG_F_ICMP_ECHO, CFG_F_ICMP_TOO_BIG, LbConfig, addr_words,
};
use marklb_crds::loadbalancer::{LoadBalancerSpec, MarkScope, TooBig};

use crate::{balancer::VipId, maglev::Backend};

/// One VIP as the datapath will serve it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipPlan {
    /// Name for logs and metric labels (the spec's name, else `address:port/proto`).
    pub label: String,
    pub backends: Vec<Backend>,
    pub table_size: u32,
}

/// Flow-mark policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MarkPolicy {
    pub scope: MarkScope,
    pub capacity: u32,
    pub idle_timeout: Duration,
}

/// Everything the node programs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub vips: BTreeMap<VipId, VipPlan>,
    pub marks: MarkPolicy,
    pub mtu: u32,
    pub icmp_too_big: bool,
    pub icmp_echo: bool,
    pub encap_src_v4_be: u32,
    pub encap_src_v6_be: [u32; 4],
}

/// New-flow events a CPU may send per second (bounds a SYN flood's cost to user space).
pub const EVENTS_PER_SEC_PER_CPU: u32 = 200_000;
pub const EVENTS_BURST: u32 = 4_096;

impl Desired {
    /// Resolves a spec that already passed validation (`LoadBalancerSpec::validate`).
    pub fn from_spec(spec: &LoadBalancerSpec) -> Result<Self, String> {
        let mut vips = BTreeMap::new();
        for (i, v) in spec.vips.iter().enumerate() {
            let addr = v
                .ip()
                .ok_or_else(|| format!("spec.vips[{i}].address: not an IP address"))?;
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
            };
            if vips.insert(id, plan).is_some() {
                return Err(format!("spec.vips[{i}]: duplicate VIP {}", v.endpoint()));
            }
        }
        let v4 = spec
            .encap
            .v4_prefix()
            .ok_or("spec.encap.sourcePrefixV4: invalid prefix")?;
        let v6 = spec
            .encap
            .v6_prefix()
            .ok_or("spec.encap.sourcePrefixV6: invalid prefix")?;
        Ok(Self {
            vips,
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
        })
    }

    /// The datapath configuration, given the resolved next-hop MAC.
    pub fn lb_config(&self, next_hop_mac: [u8; 6]) -> LbConfig {
        let mut flags = CFG_F_ENABLED;
        if self.icmp_too_big {
            flags |= CFG_F_ICMP_TOO_BIG;
        }
        if self.icmp_echo {
            flags |= CFG_F_ICMP_ECHO;
        }
        if self.marks.scope != MarkScope::Disabled {
            flags |= CFG_F_EVENTS;
        }
        LbConfig {
            flags,
            mtu: self.mtu,
            next_hop_mac,
            _pad0: [0; 2],
            encap_src_v4_be: self.encap_src_v4_be,
            encap_src_v6_be: self.encap_src_v6_be,
            event_interval_ns: 1_000_000_000 / EVENTS_PER_SEC_PER_CPU,
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

    /// Distinct real addresses.
    pub fn real_count(&self) -> usize {
        let mut reals: Vec<IpAddr> = self
            .vips
            .values()
            .flat_map(|v| v.backends.iter().map(|b| b.addr))
            .collect();
        reals.sort();
        reals.dedup();
        reals.len()
    }
}
