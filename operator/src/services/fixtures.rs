//! Builders for the Service-side unit tests: Services, pools, Nodes with addresses and
//! conditions, EndpointSlices as Kubernetes 1.20 serves them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Service};
use kube::api::DynamicObject;
use marklb_crds::{LoadBalancerIPPool, LoadBalancerIPPoolSpec};
use serde_json::json;

use crate::fixtures::at;

/// Service `namespace/name` from YAML holding `metadata` (annotations, labels) and `spec`;
/// uid `uid-<namespace>-<name>`, created at second 100.
pub fn service(namespace: &str, name: &str, yaml: &str) -> Service {
    let mut value: serde_json::Value = serde_yaml::from_str(yaml).unwrap();
    let meta = value
        .as_object_mut()
        .unwrap()
        .entry("metadata")
        .or_insert(json!({}));
    meta["name"] = json!(name);
    meta["namespace"] = json!(namespace);
    meta["uid"] = json!(format!("uid-{namespace}-{name}"));
    if meta.get("creationTimestamp").is_none() {
        meta["creationTimestamp"] = serde_json::to_value(at(100)).unwrap();
    }
    serde_json::from_value(value).unwrap()
}

/// Pool `name` with `spec_yaml`.
pub fn pool(name: &str, spec_yaml: &str) -> LoadBalancerIPPool {
    let spec: LoadBalancerIPPoolSpec = serde_yaml::from_str(spec_yaml).unwrap();
    let mut p = LoadBalancerIPPool::new(name, spec);
    p.metadata.uid = Some(format!("uid-pool-{name}"));
    p.metadata.generation = Some(1);
    p.metadata.creation_timestamp = Some(at(10));
    p.metadata.resource_version = Some("1".into());
    p
}

/// How a test node is.
#[derive(Clone, Copy, Debug)]
pub struct NodeState {
    pub ready: bool,
    pub unschedulable: bool,
}

/// A Ready, schedulable state.
pub const READY: NodeState = NodeState {
    ready: true,
    unschedulable: false,
};

/// Node `name` with `labels`, InternalIPs `addresses`, in `state`.
pub fn node(name: &str, labels: &[(&str, &str)], addresses: &[&str], state: NodeState) -> Node {
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .chain([("kubernetes.io/hostname".to_string(), name.to_string())])
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"unschedulable": state.unschedulable},
        "status": {
            "addresses": addresses.iter().map(|a| json!({"type": "InternalIP", "address": a}))
                .chain([json!({"type": "Hostname", "address": name})]).collect::<Vec<_>>(),
            "conditions": [{"type": "Ready", "status": if state.ready { "True" } else { "False" }}],
        }
    }))
    .unwrap()
}

/// An EndpointSlice of Service `namespace/service` as 1.20 serves it (v1beta1, the node in
/// `topology`), with one endpoint per `(address, node, ready)`.
pub fn slice_v1beta1(
    namespace: &str,
    service: &str,
    endpoints: &[(&str, &str, bool)],
) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-abc"), "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": endpoints.iter().map(|(a, n, r)| json!({
            "addresses": [a], "conditions": {"ready": r},
            "topology": {"kubernetes.io/hostname": n},
        })).collect::<Vec<_>>(),
    }))
    .unwrap()
}

/// The same in v1 (`nodeName`).
pub fn slice_v1(namespace: &str, service: &str, endpoints: &[(&str, &str, bool)]) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-v1"), "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": endpoints.iter().map(|(a, n, r)| json!({
            "addresses": [a], "conditions": {"ready": r}, "nodeName": n,
        })).collect::<Vec<_>>(),
    }))
    .unwrap()
}
