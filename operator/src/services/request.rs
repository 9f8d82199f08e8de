//! What a Service asks of marklb, read from its spec and annotations, without I/O.
//!
//! Invariants of a [`Request`]: `families` is non-empty, without duplicates, in the Service's
//! order (`spec.ipFamilies`, IPv4 when absent), and says which families must be served
//! (`required`: every family for `SingleStack` (its first) and `RequireDualStack`; at least one
//! for `PreferDualStack`); `requested` holds at most one address per family, each of a
//! family in `families`, canonical; `ports` is non-empty and TCP/UDP only. A Service that
//! cannot be read this way is an [`InvalidRequest`] with a message naming the field.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use marklb_crds::Protocol;
use marklb_crds::parse::parse_ip;
use marklb_crds::pool::Family;

use super::{ADDRESSES_ANNOTATION, CLASS_ANNOTATION, POOL_ANNOTATION, SHARING_ANNOTATION};

/// Which Services this operator serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassPolicy {
    /// The `loadBalancerClass` (or [`CLASS_ANNOTATION`]) marklb serves.
    pub class: String,
    /// Also serve Services of type LoadBalancer without any class (MetalLB's default; leave
    /// it off when a cloud or another implementation serves those).
    pub serve_unclassed: bool,
}

impl Default for ClassPolicy {
    fn default() -> Self {
        Self {
            class: super::DEFAULT_CLASS.to_string(),
            serve_unclassed: false,
        }
    }
}

/// The class of a Service: `spec.loadBalancerClass`, else the annotation.
pub fn class_of(svc: &Service) -> Option<String> {
    svc.spec
        .as_ref()
        .and_then(|s| s.load_balancer_class.clone())
        .or_else(|| svc.annotations().get(CLASS_ANNOTATION).cloned())
}

/// Whether marklb serves `svc`: type LoadBalancer, and our class (or no class when
/// `serve_unclassed`). Deletion is not considered here.
pub fn is_served(svc: &Service, policy: &ClassPolicy) -> bool {
    let is_lb = svc.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("LoadBalancer");
    is_lb
        && match class_of(svc) {
            Some(class) => class == policy.class,
            None => policy.serve_unclassed,
        }
}

/// `spec.ipFamilyPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FamilyPolicy {
    SingleStack,
    PreferDualStack,
    RequireDualStack,
}

/// `spec.externalTrafficPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrafficPolicy {
    /// Any node takes traffic; kube-proxy forwards it to any pod (source NATed).
    Cluster,
    /// Only nodes with a ready endpoint take traffic; the pod sees the client's address.
    Local,
}

/// One port of the Service (a VIP of its LoadBalancer per address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    pub protocol: Protocol,
    pub port: u16,
}

impl PortKey {
    /// `TCP/80`, as pool ledgers record ports.
    pub fn label(&self) -> String {
        format!("{}/{}", self.protocol, self.port)
    }

    /// Parses [`label`](Self::label)'s form.
    pub fn parse(text: &str) -> Option<PortKey> {
        let (protocol, port) = text.split_once('/')?;
        let protocol = match protocol {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            _ => return None,
        };
        Some(PortKey {
            protocol,
            port: port.parse().ok()?,
        })
    }
}

/// Identity of a Service: a re-created Service of the same name has another uid.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceId {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl ServiceId {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What a served Service asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub id: ServiceId,
    /// The Service's families, in its order.
    pub families: Vec<Family>,
    pub policy: FamilyPolicy,
    /// Requested addresses (annotation or `spec.loadBalancerIP`).
    pub requested: Vec<IpAddr>,
    /// The pool named by annotation.
    pub pool: Option<String>,
    /// Sharing key (annotation), if the Service may share its addresses.
    pub sharing_key: Option<String>,
    pub ports: BTreeSet<PortKey>,
    pub traffic: TrafficPolicy,
    /// The Service's labels (pool `serviceSelector`).
    pub labels: BTreeMap<String, String>,
    pub created: Option<Time>,
}

impl Request {
    /// The families that must all get an address (the others are welcome).
    pub fn required(&self) -> Vec<Family> {
        match self.policy {
            FamilyPolicy::SingleStack => self.families[..1].to_vec(),
            FamilyPolicy::RequireDualStack => self.families.clone(),
            FamilyPolicy::PreferDualStack => Vec::new(),
        }
    }

    /// The families the Service may get an address of.
    pub fn wanted(&self) -> &[Family] {
        match self.policy {
            FamilyPolicy::SingleStack => &self.families[..1],
            _ => &self.families,
        }
    }

    /// The requested address of `family`, if any.
    pub fn requested_of(&self, family: Family) -> Option<IpAddr> {
        self.requested
            .iter()
            .copied()
            .find(|a| Family::of(*a) == family)
    }

    /// The ports as pool ledgers record them.
    pub fn port_labels(&self) -> Vec<String> {
        self.ports.iter().map(PortKey::label).collect()
    }
}

/// Why a Service's request cannot be read (the message names the field).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidRequest(pub String);

/// Reads the request of a served Service.
pub fn read(svc: &Service) -> Result<Request, InvalidRequest> {
    let spec = svc.spec.clone().unwrap_or_default();
    let bad = |m: String| Err(InvalidRequest(m));
    let mut families = Vec::new();
    for (i, f) in spec.ip_families.iter().flatten().enumerate() {
        match Family::parse(f) {
            Some(f) if !families.contains(&f) => families.push(f),
            Some(_) => return bad(format!("spec.ipFamilies[{i}]: {f} is listed twice")),
            None => return bad(format!("spec.ipFamilies[{i}]: {f:?} is not IPv4 or IPv6")),
        }
    }
    if families.is_empty() {
        // Clusters without dual-stack fields serve IPv4 Services.
        families.push(Family::V4);
    }
    let policy = match spec.ip_family_policy.as_deref() {
        None | Some("SingleStack") => FamilyPolicy::SingleStack,
        Some("PreferDualStack") => FamilyPolicy::PreferDualStack,
        Some("RequireDualStack") if families.len() == 2 => FamilyPolicy::RequireDualStack,
        Some("RequireDualStack") => {
            return bad(
                "spec.ipFamilyPolicy: RequireDualStack, but spec.ipFamilies lists one family"
                    .into(),
            );
        }
        Some(other) => {
            return bad(format!(
                "spec.ipFamilyPolicy: {other:?} is not a known policy"
            ));
        }
    };
    let traffic = match spec.external_traffic_policy.as_deref() {
        None | Some("Cluster") => TrafficPolicy::Cluster,
        Some("Local") => TrafficPolicy::Local,
        Some(other) => {
            return bad(format!(
                "spec.externalTrafficPolicy: {other:?} is not Cluster or Local"
            ));
        }
    };

    let annotations = svc.annotations();
    let mut requested: Vec<IpAddr> = Vec::new();
    if let Some(list) = annotations.get(ADDRESSES_ANNOTATION) {
        for text in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let ip = parse_ip(text)
                .map_err(|e| InvalidRequest(format!("annotation {ADDRESSES_ANNOTATION}: {e}")))?;
            requested.push(ip);
        }
        if requested.is_empty() {
            return bad(format!(
                "annotation {ADDRESSES_ANNOTATION} is set but lists no address"
            ));
        }
    }
    if let Some(text) = spec.load_balancer_ip.as_deref().filter(|t| !t.is_empty()) {
        let ip = parse_ip(text).map_err(|e| InvalidRequest(format!("spec.loadBalancerIP: {e}")))?;
        if requested.is_empty() {
            requested.push(ip);
        } else if !requested.contains(&ip) {
            return bad(format!(
                "spec.loadBalancerIP {ip} is not among the addresses of annotation {ADDRESSES_ANNOTATION}"
            ));
        }
    }
    let mut seen = BTreeSet::new();
    for ip in &requested {
        let family = Family::of(*ip);
        if !seen.insert(family) {
            return bad(format!(
                "two {family} addresses requested; a Service gets one per family"
            ));
        }
    }
    let wanted: &[Family] = if policy == FamilyPolicy::SingleStack {
        &families[..1]
    } else {
        &families
    };
    if let Some(ip) = requested
        .iter()
        .find(|ip| !wanted.contains(&Family::of(**ip)))
    {
        return bad(format!(
            "requested address {ip} is {}, the Service is {}",
            Family::of(*ip),
            wanted
                .iter()
                .map(|f| f.as_str())
                .collect::<Vec<_>>()
                .join(" and ")
        ));
    }
    if policy == FamilyPolicy::RequireDualStack && !requested.is_empty() && requested.len() != 2 {
        return bad("RequireDualStack: request one address of each family, or none".into());
    }

    let mut ports = BTreeSet::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let protocol = match p.protocol.as_deref() {
            None | Some("TCP") => Protocol::Tcp,
            Some("UDP") => Protocol::Udp,
            Some(other) => {
                return bad(format!(
                    "spec.ports[{i}]: protocol {other} is not supported (TCP and UDP are)"
                ));
            }
        };
        let port = u16::try_from(p.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                InvalidRequest(format!("spec.ports[{i}].port: {} is not a port", p.port))
            })?;
        ports.insert(PortKey { protocol, port });
    }
    if ports.is_empty() {
        return bad("spec.ports: a Service of type LoadBalancer needs at least one port".into());
    }
    let sharing_key = match annotations.get(SHARING_ANNOTATION).map(|k| k.trim()) {
        Some("") => return bad(format!("annotation {SHARING_ANNOTATION} is empty")),
        Some(k) => Some(k.to_string()),
        None => None,
    };
    Ok(Request {
        id: ServiceId {
            namespace: svc.namespace().unwrap_or_default(),
            name: svc.name_any(),
            uid: svc.uid().unwrap_or_default(),
        },
        families,
        policy,
        requested,
        pool: annotations
            .get(POOL_ANNOTATION)
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty()),
        sharing_key,
        ports,
        traffic,
        labels: svc.labels().clone(),
        created: svc.metadata.creation_timestamp.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::fixtures::service;

    #[test]
    fn class_by_field_or_annotation_and_the_unclassed_flag() {
        let ours = ClassPolicy::default();
        let both = ClassPolicy {
            serve_unclassed: true,
            ..ClassPolicy::default()
        };
        let by_field = service(
            "shop",
            "a",
            "spec: {type: LoadBalancer, loadBalancerClass: marklb.io/lb, ports: [{port: 80}]}",
        );
        let by_annotation = service(
            "shop",
            "b",
            "metadata: {annotations: {marklb.io/load-balancer-class: marklb.io/lb}}\nspec: {type: LoadBalancer, ports: [{port: 80}]}",
        );
        let field_wins = service(
            "shop",
            "c",
            "metadata: {annotations: {marklb.io/load-balancer-class: marklb.io/lb}}\nspec: {type: LoadBalancer, loadBalancerClass: other.io/lb, ports: [{port: 80}]}",
        );
        let unclassed = service(
            "shop",
            "d",
            "spec: {type: LoadBalancer, ports: [{port: 80}]}",
        );
        let cluster_ip = service(
            "shop",
            "e",
            "spec: {type: ClusterIP, loadBalancerClass: marklb.io/lb, ports: [{port: 80}]}",
        );
        assert!(is_served(&by_field, &ours) && is_served(&by_annotation, &ours));
        assert!(!is_served(&field_wins, &ours) && !is_served(&field_wins, &both));
        assert!(!is_served(&unclassed, &ours) && is_served(&unclassed, &both));
        assert!(!is_served(&cluster_ip, &both));
    }

    #[test]
    fn families_ports_and_requests_are_read() {
        let svc = service(
            "shop",
            "web",
            "metadata:\n  annotations: {marklb.io/load-balancer-ips: '192.0.2.5, 2001:db8::5', marklb.io/allow-shared-ip: k, marklb.io/address-pool: public}\nspec:\n  type: LoadBalancer\n  ipFamilyPolicy: PreferDualStack\n  ipFamilies: [IPv6, IPv4]\n  externalTrafficPolicy: Local\n  ports: [{port: 80}, {port: 53, protocol: UDP}, {port: 53, protocol: TCP}]",
        );
        let r = read(&svc).unwrap();
        assert_eq!(r.families, [Family::V6, Family::V4]);
        assert_eq!(
            (r.policy, r.traffic),
            (FamilyPolicy::PreferDualStack, TrafficPolicy::Local)
        );
        assert_eq!(
            r.requested_of(Family::V4),
            Some("192.0.2.5".parse().unwrap())
        );
        assert_eq!(r.port_labels(), ["TCP/53", "TCP/80", "UDP/53"]);
        assert_eq!(
            (r.sharing_key.as_deref(), r.pool.as_deref()),
            (Some("k"), Some("public"))
        );
        assert!(r.required().is_empty());
        // Defaults: IPv4, SingleStack, Cluster.
        let plain = read(&service(
            "shop",
            "p",
            "spec: {type: LoadBalancer, ports: [{port: 443}]}",
        ))
        .unwrap();
        assert_eq!(
            (plain.families.clone(), plain.required()),
            (vec![Family::V4], vec![Family::V4])
        );
        assert_eq!(plain.traffic, TrafficPolicy::Cluster);
        assert_eq!(
            PortKey::parse("UDP/53"),
            Some(PortKey {
                protocol: Protocol::Udp,
                port: 53
            })
        );
        assert_eq!(PortKey::parse("SCTP/1"), None);
    }

    #[test]
    fn unreadable_requests_name_the_field() {
        let cases = [
            (
                "spec: {type: LoadBalancer, ports: [{port: 80, protocol: SCTP}]}",
                "spec.ports[0]: protocol SCTP",
            ),
            (
                "spec: {type: LoadBalancer, loadBalancerIP: 10.0.0.300, ports: [{port: 80}]}",
                "spec.loadBalancerIP",
            ),
            (
                "metadata: {annotations: {marklb.io/load-balancer-ips: '10.0.0.1,10.0.0.2'}}\nspec: {type: LoadBalancer, ports: [{port: 80}]}",
                "two IPv4 addresses",
            ),
            (
                "metadata: {annotations: {marklb.io/load-balancer-ips: '2001:db8::1'}}\nspec: {type: LoadBalancer, ports: [{port: 80}]}",
                "is IPv6, the Service is IPv4",
            ),
            (
                "metadata: {annotations: {marklb.io/load-balancer-ips: '10.0.0.1'}}\nspec: {type: LoadBalancer, loadBalancerIP: 10.0.0.2, ports: [{port: 80}]}",
                "not among the addresses",
            ),
            (
                "spec: {type: LoadBalancer, ipFamilyPolicy: RequireDualStack, ipFamilies: [IPv4], ports: [{port: 80}]}",
                "lists one family",
            ),
            (
                "metadata: {annotations: {marklb.io/allow-shared-ip: ' '}}\nspec: {type: LoadBalancer, ports: [{port: 80}]}",
                "is empty",
            ),
            ("spec: {type: LoadBalancer, ports: []}", "at least one port"),
        ];
        for (yaml, expect) in cases {
            let err = read(&service("shop", "x", yaml)).unwrap_err();
            assert!(err.0.contains(expect), "{yaml}: {err}");
        }
    }
}
