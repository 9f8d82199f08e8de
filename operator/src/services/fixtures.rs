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

// ---- a mock API server for the Service controller ----

use std::sync::{Arc, Mutex};

use http::{Request, Response};
use k8s_openapi::api::core::v1::Namespace;
use kube::client::Body;
use kube::runtime::reflector::Store;
use kube::{Client, ResourceExt};
use marklb_crds::LoadBalancer;

use super::controller::{Caches, Context};
use crate::fixtures::{Sent, store_of};
use crate::metrics::Metrics;
use crate::settings::Settings;

/// Answers a request: status code and JSON body.
pub type Responder = Box<dyn FnMut(&Sent) -> (u16, serde_json::Value) + Send>;

/// A client whose every request is recorded and answered by `respond`.
pub fn mock_api(mut respond: Responder) -> (Client, Arc<Mutex<Vec<Sent>>>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let sent = Arc::new(Mutex::new(Vec::new()));
    let log = sent.clone();
    tokio::spawn(async move {
        while let Some((request, reply)) = handle.next_request().await {
            let method = request.method().to_string();
            let uri = request.uri().to_string();
            let bytes = request.into_body().collect_bytes().await.unwrap();
            let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
            let s = Sent { method, uri, body };
            log.lock().unwrap().push(s.clone());
            let (code, body) = respond(&s);
            reply.send_response(
                Response::builder()
                    .status(code)
                    .body(Body::from(serde_json::to_vec(&body).unwrap()))
                    .unwrap(),
            );
        }
    });
    (Client::new(service, "default"), sent)
}

/// An API error body.
pub fn api_error(code: u16) -> (u16, serde_json::Value) {
    let reason = match code {
        404 => "NotFound",
        409 => "Conflict",
        _ => "InternalError",
    };
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "injected", "reason": reason, "code": code}),
    )
}

/// A responder that echoes writes, answers pool GETs from `pools` (in turn: the first GET
/// of a pool gets its first version...; the last version repeats), the operator's
/// ServiceAccount, and 404 for other GETs.
pub fn echo_with_pools(pools: Vec<LoadBalancerIPPool>) -> Responder {
    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    Box::new(move |s: &Sent| {
        let path = s.uri.split('?').next().unwrap_or_default().to_string();
        if s.method == "GET" {
            if let Some(name) = path.strip_prefix("/apis/marklb.io/v1alpha1/loadbalancerippools/") {
                let versions: Vec<&LoadBalancerIPPool> =
                    pools.iter().filter(|p| p.name_any() == name).collect();
                if versions.is_empty() {
                    return api_error(404);
                }
                let n = served.entry(name.to_string()).or_default();
                let p = versions[(*n).min(versions.len() - 1)];
                *n += 1;
                return (200, serde_json::to_value(p).unwrap());
            }
            if path == crate::fixtures::OWNER_SA_PATH {
                return (200, crate::fixtures::owner_service_account());
            }
            return api_error(404);
        }
        if s.method == "DELETE" {
            return (
                200,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
            );
        }
        let mut reply = s.body.clone();
        if path.starts_with("/api/v1/namespaces/") && path.contains("/services/") {
            // A Service patch answers with a Service.
            reply = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x", "namespace": "x"}});
        }
        if path.contains("/loadbalancerippools/") {
            reply = json!({"apiVersion": "marklb.io/v1alpha1", "kind": "LoadBalancerIPPool", "metadata": {"name": "x"}, "spec": {"addresses": ["10.0.0.0/30"]}});
        }
        (200, reply)
    })
}

/// What the Service controller's caches hold in a test.
#[derive(Default)]
pub struct ServiceWorld {
    pub services: Vec<Service>,
    pub pools: Vec<LoadBalancerIPPool>,
    pub lbs: Vec<LoadBalancer>,
    pub nodes: Vec<Node>,
    pub namespaces: Vec<Namespace>,
    pub slices: Option<Vec<DynamicObject>>,
}

/// A Service controller context over `world` talking to `client` (decapsulator pods not
/// watched).
pub fn service_context(client: Client, world: ServiceWorld, settings: Settings) -> Arc<Context> {
    let slices: Option<Store<DynamicObject>> = world.slices.map(|s| {
        let ar = kube::discovery::ApiResource::from_gvk_with_plural(
            &kube::core::GroupVersionKind::gvk("discovery.k8s.io", "v1beta1", "EndpointSlice"),
            "endpointslices",
        );
        let mut writer = kube::runtime::reflector::store::Writer::new(ar);
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Init);
        for o in s {
            writer.apply_watcher_event(&kube::runtime::watcher::Event::InitApply(o));
        }
        writer.apply_watcher_event(&kube::runtime::watcher::Event::InitDone);
        writer.as_reader()
    });
    let caches = Caches {
        services: store_of(world.services),
        pools: store_of(world.pools),
        lbs: store_of(world.lbs),
        nodes: store_of(world.nodes),
        namespaces: store_of(world.namespaces),
        endpoint_slices: slices,
        decap_pods: None,
    };
    let (_tx, filled) = tokio::sync::watch::channel(true);
    let mut settings = settings;
    settings.services.watch_decap_pods = false;
    Arc::new(Context::new(
        client,
        settings,
        Arc::new(Metrics::new()),
        caches,
        filled,
        "test",
    ))
}
