//! Builders for the unit tests: LoadBalancers, Nodes, node states with agent statuses.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use marklb_crds::conditions::{self, ConditionStatus, set_condition};
use marklb_crds::{
    LoadBalancer, LoadBalancerNodeState, LoadBalancerNodeStateStatus, LoadBalancerSpec,
};

/// A time `second`s after the epoch.
pub fn at(second: i64) -> Time {
    Time(Timestamp::from_second(second).unwrap())
}

/// A LoadBalancer `namespace/name` created at `created`, generation 1, with `spec_yaml`.
pub fn lb(namespace: &str, name: &str, created: i64, spec_yaml: &str) -> LoadBalancer {
    let spec: LoadBalancerSpec = serde_yaml::from_str(spec_yaml).unwrap();
    let mut lb = LoadBalancer::new(name, spec);
    lb.metadata.namespace = Some(namespace.into());
    lb.metadata.uid = Some(format!("uid-{namespace}-{name}"));
    lb.metadata.generation = Some(1);
    lb.metadata.creation_timestamp = Some(at(created));
    lb
}

/// A Node with `labels`.
pub fn node(name: &str, labels: &[(&str, &str)]) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// What a simulated agent reports for a node state.
#[derive(Clone, Copy, Debug)]
pub enum Agent {
    /// Nothing written yet.
    Silent,
    /// Ready for the state's generation, marks offloaded or not, `marks` in use.
    Ready { offloaded: bool, marks: u32 },
    /// Observed an older generation.
    Lagging,
    /// Ready=False with this reason.
    Failed(&'static str),
    /// Ready, but a VIP lost to `winner`.
    Conflict(&'static str),
}

/// A healthy agent: Ready, marks offloaded, none in use.
pub const READY: Agent = Agent::Ready {
    offloaded: true,
    marks: 0,
};

/// `state` (generation 2) with the status `agent` would write.
pub fn reported(mut state: LoadBalancerNodeState, agent: Agent) -> LoadBalancerNodeState {
    state.metadata.generation = Some(2);
    let mut status = LoadBalancerNodeStateStatus::default();
    let ready =
        |status: &mut LoadBalancerNodeStateStatus, ok: bool, reason: &str, message: &str| {
            set_condition(
                &mut status.conditions,
                conditions::NODE_READY,
                ConditionStatus::from(ok),
                reason,
                message,
                Some(2),
                at(50),
            );
        };
    match agent {
        Agent::Silent => return state,
        Agent::Ready { offloaded, marks } => {
            status.observed_generation = Some(2);
            status.offloaded = offloaded;
            status.marks_in_use = marks;
            status.hw_backend = Some(if offloaded { "emulated" } else { "none" }.into());
            status.hw_backend_reason = Some(
                if offloaded {
                    "--hw-backend emulated"
                } else {
                    "no capable NIC"
                }
                .into(),
            );
            ready(&mut status, true, conditions::reason::PROGRAMMED, "");
        }
        Agent::Lagging => {
            status.observed_generation = Some(1);
            ready(&mut status, true, conditions::reason::PROGRAMMED, "");
        }
        Agent::Failed(reason) => {
            status.observed_generation = Some(2);
            status.last_error = Some(format!("{reason} on this node"));
            ready(
                &mut status,
                false,
                reason,
                &format!("{reason} on this node"),
            );
        }
        Agent::Conflict(winner) => {
            status.observed_generation = Some(2);
            ready(&mut status, true, conditions::reason::PROGRAMMED, "");
            set_condition(
                &mut status.conditions,
                conditions::NODE_CONFLICT,
                ConditionStatus::True,
                conditions::reason::VIP_CONFLICT,
                &format!("VIP 10.0.0.1:80/TCP is served by {winner}"),
                Some(2),
                at(50),
            );
        }
    }
    state.status = Some(status);
    state
}

// ---- a mock API server (tower-test) that records every request ----

use std::sync::{Arc, Mutex};

use http::{Request, Response};
use kube::client::Body;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use kube::{Client, Resource};

use crate::controller::{Caches, Context};
use crate::metrics::Metrics;
use crate::settings::Settings;

/// One request the code under test sent: method, path and query, JSON body (Null if none).
#[derive(Clone, Debug, PartialEq)]
pub struct Sent {
    pub method: String,
    pub uri: String,
    pub body: serde_json::Value,
}

impl Sent {
    /// `PATCH /apis/...` without the query.
    pub fn line(&self) -> String {
        format!(
            "{} {}",
            self.method,
            self.uri.split('?').next().unwrap_or_default()
        )
    }
}

/// Answers `true` to fail a request with this status code.
pub type Fail = Box<dyn Fn(&Sent) -> Option<u16> + Send + Sync>;

/// Path of the operator's ServiceAccount, the owner of the DaemonSets it applies.
pub const OWNER_SA_PATH: &str = "/api/v1/namespaces/marklb-system/serviceaccounts/marklb-operator";
/// Its uid as the mock API answers it.
pub const OWNER_SA_UID: &str = "uid-sa-marklb-operator";

/// The operator's ServiceAccount as the API server answers a GET.
pub fn owner_service_account() -> serde_json::Value {
    serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "marklb-operator", "namespace": "marklb-system", "uid": OWNER_SA_UID}})
}

/// The owner reference every DaemonSet the operator applies carries.
pub fn owner_sa_reference() -> serde_json::Value {
    serde_json::json!([{"apiVersion": "v1", "kind": "ServiceAccount", "name": "marklb-operator", "uid": OWNER_SA_UID}])
}

/// A client whose requests are answered by a recorder: writes echo their body back as the
/// stored object (status and finalizer patches answer with `lb`), deletes answer 200, and
/// `fail` may turn any request into an API error.
pub fn mock_client(
    lb: Option<LoadBalancer>,
    fail: Option<Fail>,
) -> (Client, Arc<Mutex<Vec<Sent>>>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let sent = Arc::new(Mutex::new(Vec::new()));
    let log = sent.clone();
    tokio::spawn(async move {
        while let Some((request, respond)) = handle.next_request().await {
            let method = request.method().to_string();
            let uri = request.uri().to_string();
            let bytes = request.into_body().collect_bytes().await.unwrap();
            let body: serde_json::Value =
                serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
            let s = Sent { method, uri, body };
            log.lock().unwrap().push(s.clone());
            if let Some(code) = fail.as_ref().and_then(|f| f(&s)) {
                let status = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "injected", "reason": "InternalError", "code": code});
                respond.send_response(
                    Response::builder()
                        .status(code)
                        .body(Body::from(serde_json::to_vec(&status).unwrap()))
                        .unwrap(),
                );
                continue;
            }
            let path = s.uri.split('?').next().unwrap_or_default().to_string();
            let mut reply = s.body.clone();
            if path.contains("/loadbalancers/") {
                reply = serde_json::to_value(lb.as_ref().expect("a LoadBalancer to answer with"))
                    .unwrap();
            } else if path == OWNER_SA_PATH {
                reply = owner_service_account();
            } else if s.method == "DELETE" {
                reply =
                    serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Success"});
            }
            if let Some(meta) = reply.get_mut("metadata").and_then(|m| m.as_object_mut()) {
                meta.entry("generation").or_insert(serde_json::json!(3));
            }
            respond.send_response(
                Response::builder()
                    .status(200)
                    .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                    .unwrap(),
            );
        }
    });
    (Client::new(service, "default"), sent)
}

/// A filled store holding `objects`.
pub fn store_of<K>(objects: impl IntoIterator<Item = K>) -> Store<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    store_with_writer(objects).0
}

/// [`store_of`] with its writer, for a test that delivers watch events later.
pub fn store_with_writer<K>(
    objects: impl IntoIterator<Item = K>,
) -> (Store<K>, reflector::store::Writer<K>)
where
    K: Resource + Clone + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, mut writer) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Init);
    for o in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(o));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    (reader, writer)
}

/// What a test cluster holds.
#[derive(Default)]
pub struct World {
    pub lbs: Vec<LoadBalancer>,
    pub nodes: Vec<Node>,
    pub states: Vec<LoadBalancerNodeState>,
    pub slices: Option<Vec<kube::api::DynamicObject>>,
}

/// A Context over `world` talking to `client`; agent pods not watched.
pub fn context(client: Client, world: World, settings: Settings) -> Arc<Context> {
    let slices = world.slices.map(|s| {
        let ar = kube::discovery::ApiResource::from_gvk_with_plural(
            &kube::core::GroupVersionKind::gvk("discovery.k8s.io", "v1beta1", "EndpointSlice"),
            "endpointslices",
        );
        let mut writer = reflector::store::Writer::new(ar);
        writer.apply_watcher_event(&watcher::Event::Init);
        for o in s {
            writer.apply_watcher_event(&watcher::Event::InitApply(o));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
        writer.as_reader()
    });
    let caches = Caches {
        loadbalancers: store_of(world.lbs),
        node_states: store_of(world.states),
        nodes: store_of(world.nodes),
        endpoint_slices: slices,
        agent_pods: None,
    };
    let (_tx, filled) = tokio::sync::watch::channel(true);
    Arc::new(Context::new(
        client,
        Settings {
            watch_agent_pods: false,
            // These stores never see the writes: waiting for them would only slow the tests.
            cache_catch_up: std::time::Duration::ZERO,
            ..settings
        },
        Arc::new(Metrics::new()),
        caches,
        filled,
        "test",
    ))
}

/// `lb` with the operator's finalizer.
pub fn finalized(mut lb: LoadBalancer) -> LoadBalancer {
    lb.metadata.finalizers = Some(vec![marklb_crds::labels::OPERATOR_FINALIZER.to_string()]);
    lb
}
