//! EndpointSlices of a Service to the ready addresses a VIP's `backendService` resolves to.
//!
//! Pure: the controller hands in the slices it watches as `DynamicObject`s, because the served
//! version is chosen through discovery (`discovery.k8s.io/v1beta1` on Kubernetes 1.20, `v1`
//! from 1.21; a typed v1 watch would retry a 404 forever on 1.20). The fields read here
//! (`addressType`, `endpoints[].addresses`, `endpoints[].conditions.ready`, the
//! `kubernetes.io/service-name` label) are the same in both versions, so each slice is parsed
//! as the v1 type. A missing `ready` counts as ready (the API's rule); every slice of a Service
//! is merged; FQDN slices and unparsable addresses are ignored (and counted).

use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::DynamicObject;
use kube::core::TypeMeta;

/// Label of an EndpointSlice naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The ready endpoint addresses of one Service, by family, sorted and without duplicates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceEndpoints {
    /// Ready IPv4 addresses.
    pub v4: BTreeSet<IpAddr>,
    /// Ready IPv6 addresses.
    pub v6: BTreeSet<IpAddr>,
    /// Slices of the Service that were seen (0: the Service has no EndpointSlice, e.g. it
    /// does not exist).
    pub slices: usize,
    /// Addresses skipped because they did not parse as an IP address.
    pub skipped: usize,
}

impl ServiceEndpoints {
    /// The ready addresses of the family of `vip`.
    pub fn for_family(&self, vip: IpAddr) -> &BTreeSet<IpAddr> {
        if vip.is_ipv4() { &self.v4 } else { &self.v6 }
    }
}

/// The Service an EndpointSlice belongs to (`namespace`, `name`), from its label.
pub fn service_of(slice: &DynamicObject) -> Option<(String, String)> {
    let namespace = slice.metadata.namespace.clone()?;
    let name = slice
        .metadata
        .labels
        .as_ref()?
        .get(SERVICE_NAME_LABEL)?
        .clone();
    Some((namespace, name))
}

/// Parses one slice served as v1 or v1beta1 into the v1 type (the fields we read agree).
pub fn parse_slice(slice: &DynamicObject) -> Option<EndpointSlice> {
    let mut obj = slice.clone();
    obj.types = Some(TypeMeta {
        api_version: "discovery.k8s.io/v1".into(),
        kind: "EndpointSlice".into(),
    });
    // v1beta1 has `topology` where v1 has `nodeName`/`zone`: unknown fields are ignored.
    obj.try_parse::<EndpointSlice>().ok()
}

/// Merges the slices of Service `namespace/name` out of `slices` (other Services' slices are
/// skipped).
pub fn resolve<'a>(
    namespace: &str,
    name: &str,
    slices: impl IntoIterator<Item = &'a DynamicObject>,
) -> ServiceEndpoints {
    let mut out = ServiceEndpoints::default();
    for raw in slices {
        if service_of(raw).is_none_or(|(ns, svc)| ns != namespace || svc != name) {
            continue;
        }
        out.slices += 1;
        let Some(slice) = parse_slice(raw) else {
            out.skipped += 1;
            continue;
        };
        if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
            continue;
        }
        for endpoint in &slice.endpoints {
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            if !ready {
                continue;
            }
            for address in &endpoint.addresses {
                match address.parse::<IpAddr>() {
                    Ok(ip @ IpAddr::V4(_)) => {
                        out.v4.insert(ip);
                    }
                    Ok(ip @ IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_none() => {
                        out.v6.insert(ip);
                    }
                    _ => out.skipped += 1,
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(
        version: &str,
        service: &str,
        address_type: &str,
        endpoints: serde_json::Value,
    ) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": format!("discovery.k8s.io/{version}"),
            "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{service}-{address_type}-{version}"),
                "namespace": "prod",
                "labels": {SERVICE_NAME_LABEL: service},
            },
            "addressType": address_type,
            "endpoints": endpoints,
        }))
        .unwrap()
    }

    fn ips(list: &[&str]) -> BTreeSet<IpAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn v1_and_v1beta1_slices_merge_ready_addresses_by_family() {
        let slices = [
            // v1beta1 as Kubernetes 1.20 serves it: `topology`, no `nodeName`.
            slice(
                "v1beta1",
                "web",
                "IPv4",
                json!([
                    {"addresses": ["10.1.0.2"], "conditions": {"ready": true}, "topology": {"kubernetes.io/hostname": "n1"}},
                    {"addresses": ["10.1.0.3"], "conditions": {"ready": false}},
                    {"addresses": ["10.1.0.1"]},
                ]),
            ),
            slice(
                "v1",
                "web",
                "IPv4",
                json!([{"addresses": ["10.1.0.2", "10.1.0.4"], "conditions": {"ready": true, "serving": true}, "nodeName": "n2"}]),
            ),
            slice(
                "v1",
                "web",
                "IPv6",
                json!([{"addresses": ["2001:db8::a"], "conditions": {}}, {"addresses": ["not-an-ip"]}]),
            ),
            slice(
                "v1",
                "web",
                "FQDN",
                json!([{"addresses": ["web.example.com"]}]),
            ),
            slice("v1", "other", "IPv4", json!([{"addresses": ["10.9.9.9"]}])),
        ];
        let web = resolve("prod", "web", &slices);
        assert_eq!(web.v4, ips(&["10.1.0.1", "10.1.0.2", "10.1.0.4"]));
        assert_eq!(web.v6, ips(&["2001:db8::a"]));
        assert_eq!((web.slices, web.skipped), (4, 1));
        assert_eq!(web.for_family("10.0.0.1".parse().unwrap()), &web.v4);
        assert_eq!(web.for_family("2001:db8::1".parse().unwrap()), &web.v6);
        // Same name in another namespace, or no slice at all.
        let missing = resolve("dev", "web", &slices);
        assert_eq!(missing, ServiceEndpoints::default());
        assert_eq!(
            service_of(&slices[4]),
            Some(("prod".into(), "other".into()))
        );
    }

    #[test]
    fn a_slice_with_no_endpoints_or_an_unknown_type_gives_nothing() {
        let empty = slice("v1beta1", "web", "IPv4", json!(null));
        let got = resolve("prod", "web", [&empty]);
        assert_eq!((got.v4.len(), got.slices), (0, 1));
        let mut unlabelled = slice("v1", "web", "IPv4", json!([{"addresses": ["10.0.0.1"]}]));
        unlabelled.metadata.labels = None;
        assert_eq!(service_of(&unlabelled), None);
        assert_eq!(resolve("prod", "web", [&unlabelled]).slices, 0);
    }
}
