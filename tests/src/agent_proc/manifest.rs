//! LoadBalancer manifests for the agent under test, built from the `marklb-crds` types (so a
//! field renamed or added there is renamed or added here) and written as block YAML.
//!
//! The text is stable on purpose, since tests edit it to make bad files: two-space indents
//! with list items indented under their key, list-map keys (`address`) first in each item,
//! strings quoted only when YAML could read them as something else (so addresses and
//! prefixes are always `"quoted"`, names and enum values never).

use std::{fmt::Write as _, net::IpAddr};

use marklb_crds::{
    Backend, LoadBalancer, LoadBalancerSpec, NextHop, Protocol, Vip,
    limits::DEFAULT_MAGLEV_TABLE_SIZE,
};
use serde_yaml::Value;

use crate::netns::{ENCAP_SRC_V4, ENCAP_SRC_V6, Topology};

/// One VIP of a [`Manifest`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipSpec {
    pub name: Option<String>,
    pub address: IpAddr,
    pub port: u16,
    /// `TCP` or `UDP`.
    pub protocol: &'static str,
    /// Backends and weights.
    pub backends: Vec<(IpAddr, u32)>,
}

/// A LoadBalancer manifest (`marklb.io/v1alpha1`): [`Manifest::to_loadbalancer`] is the
/// object, [`Manifest::to_yaml`] its text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub name: String,
    pub vips: Vec<VipSpec>,
    /// `spec.hashing.maglevTableSize` (`None`: the default).
    pub table_size: Option<u32>,
    /// `spec.nextHop.mac` (`None`: the agent resolves the default gateway).
    pub next_hop_mac: Option<String>,
    pub encap_v4: Option<String>,
    pub encap_v6: Option<String>,
    /// `spec.flowMarks.idleTimeoutSeconds`.
    pub mark_idle_timeout: Option<u32>,
    /// Extra lines appended to `spec:` verbatim (indented by two spaces already).
    pub extra_spec: Vec<String>,
}

impl Manifest {
    /// Every VIP of the topology, TCP on `tcp_port` and UDP on `udp_port`, balanced over
    /// every real (IPv4 VIPs to the reals' IPv4 addresses, IPv6 VIPs to their IPv6 ones) with
    /// weight 1; next hop the router, outer sources from the topology's prefixes.
    pub fn for_topology(topo: &Topology, tcp_port: u16, udp_port: u16) -> Self {
        let mut vips = Vec::new();
        for vip in topo.vips() {
            let backends: Vec<(IpAddr, u32)> = topo
                .reals
                .iter()
                .map(|r| (r.addr(vip.is_ipv6()), 1))
                .collect();
            let fam = if vip.is_ipv6() { "v6" } else { "v4" };
            let n = vips.len() / 2;
            vips.push(VipSpec {
                name: Some(format!("tcp-{fam}-{n}")),
                address: vip,
                port: tcp_port,
                protocol: "TCP",
                backends: backends.clone(),
            });
            vips.push(VipSpec {
                name: Some(format!("udp-{fam}-{n}")),
                address: vip,
                port: udp_port,
                protocol: "UDP",
                backends,
            });
        }
        Manifest {
            name: format!("e2e-{}", topo.id),
            vips,
            table_size: Some(4099),
            next_hop_mac: Some(topo.lb.gateway.mac_string()),
            encap_v4: Some(format!("{ENCAP_SRC_V4}/16")),
            encap_v6: Some(format!("{ENCAP_SRC_V6}/96")),
            mark_idle_timeout: None,
            extra_spec: Vec::new(),
        }
    }

    /// The VIP named `name`.
    pub fn vip_mut(&mut self, name: &str) -> &mut VipSpec {
        self.vips
            .iter_mut()
            .find(|v| v.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no VIP named {name}"))
    }

    /// Removes backend `addr` from every VIP.
    pub fn without_backend(mut self, addr: IpAddr) -> Self {
        for v in &mut self.vips {
            v.backends.retain(|(a, _)| *a != addr);
        }
        self
    }

    /// The LoadBalancer object (every field the manifest leaves out at its default).
    pub fn to_loadbalancer(&self) -> LoadBalancer {
        let mut spec = LoadBalancerSpec {
            vips: self.vips.iter().map(VipSpec::to_vip).collect(),
            ..LoadBalancerSpec::default()
        };
        spec.hashing.maglev_table_size = self.table_size.unwrap_or(DEFAULT_MAGLEV_TABLE_SIZE);
        if let Some(t) = self.mark_idle_timeout {
            spec.flow_marks.idle_timeout_seconds = t;
        }
        if let Some(mac) = &self.next_hop_mac {
            spec.next_hop = Some(NextHop {
                mac: Some(mac.clone()),
                address: None,
            });
        }
        if let Some(p) = &self.encap_v4 {
            spec.encap.source_prefix_v4 = p.clone();
        }
        if let Some(p) = &self.encap_v6 {
            spec.encap.source_prefix_v6 = p.clone();
        }
        LoadBalancer::new(&self.name, spec)
    }

    pub fn to_yaml(&self) -> String {
        let value = serde_yaml::to_value(self.to_loadbalancer()).expect("a LoadBalancer is YAML");
        let mut y = String::new();
        block(&mut y, &value, 0);
        for l in &self.extra_spec {
            let _ = writeln!(y, "{l}");
        }
        y
    }
}

impl VipSpec {
    fn to_vip(&self) -> Vip {
        Vip {
            name: self.name.clone(),
            address: self.address.to_string(),
            port: self.port,
            protocol: match self.protocol {
                "UDP" => Protocol::Udp,
                "TCP" => Protocol::Tcp,
                other => panic!("protocol {other:?}: TCP or UDP"),
            },
            backends: self
                .backends
                .iter()
                .map(|(a, w)| Backend {
                    address: a.to_string(),
                    weight: *w,
                })
                .collect(),
            backend_service: None,
        }
    }
}

/// Several LoadBalancers as one multi-document file.
pub fn multi_document(manifests: &[&Manifest]) -> String {
    manifests
        .iter()
        .map(|m| m.to_yaml())
        .collect::<Vec<_>>()
        .join("---\n")
}

/// A scalar as YAML reads it back: plain when unambiguous, else double-quoted.
fn scalar(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            let plain = s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
                && !matches!(
                    s.to_ascii_lowercase().as_str(),
                    "true" | "false" | "yes" | "no" | "on" | "off" | "y" | "n" | "null"
                );
            if plain {
                s.clone()
            } else {
                serde_json::to_string(s).expect("a string is JSON")
            }
        }
        other => panic!("not a scalar: {other:?}"),
    }
}

/// Mapping entries in output order: the list-map key `address` first.
fn entries(m: &serde_yaml::Mapping) -> Vec<(&Value, &Value)> {
    let mut e: Vec<(&Value, &Value)> = m.iter().collect();
    e.sort_by_key(|(k, _)| k.as_str() != Some("address"));
    e
}

/// Writes `v` as block YAML at `indent` spaces.
fn block(out: &mut String, v: &Value, indent: usize) {
    let pad = " ".repeat(indent);
    match v {
        Value::Mapping(m) => {
            for (k, v) in entries(m) {
                let k = scalar(k);
                match v {
                    Value::Mapping(x) if x.is_empty() => {
                        let _ = writeln!(out, "{pad}{k}: {{}}");
                    }
                    Value::Sequence(x) if x.is_empty() => {
                        let _ = writeln!(out, "{pad}{k}: []");
                    }
                    Value::Mapping(_) | Value::Sequence(_) => {
                        let _ = writeln!(out, "{pad}{k}:");
                        block(out, v, indent + 2);
                    }
                    _ => {
                        let _ = writeln!(out, "{pad}{k}: {}", scalar(v));
                    }
                }
            }
        }
        Value::Sequence(items) => {
            for item in items {
                match item {
                    Value::Mapping(m) if !m.is_empty() => {
                        // The item's first entry goes on the dash line.
                        let mut inner = String::new();
                        block(&mut inner, item, indent + 2);
                        let _ = write!(out, "{pad}- {}", &inner[indent + 2..]);
                    }
                    _ => {
                        let _ = writeln!(out, "{pad}- {}", scalar(item));
                    }
                }
            }
        }
        Value::Tagged(t) => block(out, &t.value, indent),
        _ => {
            let _ = writeln!(out, "{pad}{}", scalar(v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_renders() {
        let m = Manifest {
            name: "t".into(),
            vips: vec![VipSpec {
                name: Some("web".into()),
                address: "10.0.0.1".parse().unwrap(),
                port: 80,
                protocol: "TCP",
                backends: vec![("10.1.0.1".parse().unwrap(), 1)],
            }],
            table_size: Some(7),
            next_hop_mac: Some("02:00:00:01:00:01".into()),
            encap_v4: Some("10.202.0.0/16".into()),
            encap_v6: None,
            mark_idle_timeout: Some(5),
            extra_spec: vec![],
        };
        let y = m.to_yaml();
        assert!(y.contains("    - address: \"10.0.0.1\"\n      name: web\n      port: 80\n"));
        assert!(y.contains("maglevTableSize: 7"));
        assert!(y.contains("idleTimeoutSeconds: 5"));
    }

    #[test]
    fn the_text_reads_back_as_the_same_loadbalancer() {
        let m = Manifest {
            name: "rt".into(),
            vips: vec![
                VipSpec {
                    name: None,
                    address: "2001:db8::1".parse().unwrap(),
                    port: 0,
                    protocol: "UDP",
                    backends: vec![("2001:db8::10".parse().unwrap(), 3)],
                },
                VipSpec {
                    name: Some("empty".into()),
                    address: "10.0.0.2".parse().unwrap(),
                    port: 443,
                    protocol: "TCP",
                    backends: vec![],
                },
            ],
            table_size: None,
            next_hop_mac: None,
            encap_v4: None,
            encap_v6: Some("fc00:1::/96".into()),
            mark_idle_timeout: None,
            extra_spec: vec!["  interface: lb9".into()],
        };
        let text = m.to_yaml();
        let read = marklb_crds::from_yaml_manifest(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let mut want = m.to_loadbalancer();
        want.spec.interface = Some("lb9".into());
        assert_eq!(read.spec, want.spec, "{text}");
        assert!(text.contains("address: \"2001:db8::1\""), "{text}");
        assert!(text.contains("      backends: []\n"), "{text}");
        let two = multi_document(&[
            &m,
            &Manifest {
                name: "b".into(),
                ..m.clone()
            },
        ]);
        assert_eq!(marklb_crds::from_yaml_manifests(&two).unwrap().len(), 2);
    }
}
