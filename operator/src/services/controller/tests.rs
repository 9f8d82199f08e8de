//! The Service and pool reconcilers against kube's mock API (tower-test): the exact requests
//! of each scenario.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use marklb_crds::LoadBalancerIPPool;
use marklb_crds::pool::PoolAllocation;
use serde_json::{Value, json};

use super::{reconcile, reconcile_pool};
use crate::fixtures::{OWNER_SA_PATH, Sent, owner_sa_reference};
use crate::services::fixtures::*;
use crate::settings::Settings;

const SVC: &str = "/api/v1/namespaces/shop/services/web";
const POOL: &str = "/apis/marklb.io/v1alpha1/loadbalancerippools/public";
const LB: &str = "/apis/marklb.io/v1alpha1/namespaces/shop/loadbalancers/svc-web";
const DECAP: &str = "/apis/apps/v1/namespaces/marklb-system/daemonsets/marklb-decap";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/shop/events";

const WEB: &str = "metadata: {annotations: {marklb.io/load-balancer-class: marklb.io/lb}}\nspec: {type: LoadBalancer, ports: [{port: 80}, {port: 53, protocol: UDP}]}";

fn finalized(mut svc: Service) -> Service {
    svc.metadata.finalizers = Some(vec![crate::services::SERVICE_FINALIZER.to_string()]);
    svc.metadata.resource_version = Some("5".into());
    svc
}

fn web() -> Service {
    finalized(service("shop", "web", WEB))
}

fn public(entries: &[(&str, &str)]) -> LoadBalancerIPPool {
    let mut p = pool(
        "public",
        "addresses: [10.0.0.1-10.0.0.2]\nnodeSelector: {role: lb}",
    );
    p.status = Some(marklb_crds::LoadBalancerIPPoolStatus {
        allocations: entries
            .iter()
            .map(|(address, svc)| PoolAllocation {
                address: address.to_string(),
                namespace: "shop".into(),
                service: svc.to_string(),
                uid: format!("uid-shop-{svc}"),
                sharing_key: None,
                ports: vec!["TCP/80".into(), "UDP/53".into()],
            })
            .collect(),
        ..Default::default()
    });
    p
}

fn nodes() -> Vec<k8s_openapi::api::core::v1::Node> {
    vec![
        node("n1", &[("role", "lb")], &["192.168.0.1"], READY),
        node("n2", &[], &["192.168.0.2"], READY),
        node("n3", &[], &["192.168.0.3"], READY),
    ]
}

fn lines(sent: &[Sent]) -> Vec<String> {
    sent.iter().map(Sent::line).collect()
}

async fn run(ctx: Arc<super::Context>, svc: &Service) -> crate::Result<Action> {
    let r = reconcile(Arc::new(svc.clone()), ctx).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    r
}

fn condition<'a>(status: &'a Value, type_: &str) -> (&'a str, &'a str, &'a str) {
    let c = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("no {type_} in {status}"));
    (
        c["status"].as_str().unwrap(),
        c["reason"].as_str().unwrap(),
        c["message"].as_str().unwrap(),
    )
}

fn body<'a>(sent: &'a [Sent], line: &str) -> &'a Value {
    &sent
        .iter()
        .rev()
        .find(|s| s.line() == line)
        .unwrap_or_else(|| panic!("no {line} in {:?}", lines(sent)))
        .body
}

#[tokio::test]
async fn a_served_service_gets_the_finalizer_first_and_others_are_left_alone() {
    let fresh = service("shop", "web", WEB);
    let other_class = service(
        "shop",
        "cloud",
        "spec: {type: LoadBalancer, loadBalancerClass: cloud.example/lb, ports: [{port: 80}]}",
    );
    let unclassed = service(
        "shop",
        "plain",
        "spec: {type: LoadBalancer, ports: [{port: 80}]}",
    );
    let (client, sent) = mock_api(echo_with_pools(vec![public(&[])]));
    let ctx = service_context(
        client,
        ServiceWorld {
            pools: vec![public(&[])],
            nodes: nodes(),
            ..Default::default()
        },
        Settings::default(),
    );
    assert_eq!(
        run(ctx.clone(), &fresh).await.unwrap(),
        Action::await_change()
    );
    assert_eq!(lines(&sent.lock().unwrap()), [format!("PATCH {SVC}")]);
    assert_eq!(
        sent.lock().unwrap()[0].body["metadata"]["finalizers"],
        json!(["marklb.io/service-cleanup"])
    );
    sent.lock().unwrap().clear();
    // On current clusters the field says it (no annotation needed).
    let by_field = service(
        "shop",
        "web",
        "spec: {type: LoadBalancer, loadBalancerClass: marklb.io/lb, ports: [{port: 80}]}",
    );
    assert_eq!(
        run(ctx.clone(), &by_field).await.unwrap(),
        Action::await_change()
    );
    assert_eq!(lines(&sent.lock().unwrap()), [format!("PATCH {SVC}")]);
    sent.lock().unwrap().clear();
    for svc in [other_class, unclassed] {
        assert_eq!(
            run(ctx.clone(), &svc).await.unwrap(),
            Action::await_change()
        );
    }
    assert!(
        sent.lock().unwrap().is_empty(),
        "{:?}",
        lines(&sent.lock().unwrap())
    );
}

#[tokio::test]
async fn allocation_writes_the_ledger_then_the_loadbalancer_then_the_status() {
    let svc = web();
    let (client, sent) = mock_api(echo_with_pools(vec![public(&[])]));
    let ctx = service_context(
        client,
        ServiceWorld {
            services: vec![svc.clone()],
            pools: vec![public(&[])],
            nodes: nodes(),
            ..Default::default()
        },
        Settings::default(),
    );
    run(ctx, &svc).await.unwrap();
    let sent = sent.lock().unwrap().clone();
    assert_eq!(
        lines(&sent),
        [
            format!("GET {OWNER_SA_PATH}"),
            format!("PATCH {DECAP}"),
            format!("GET {POOL}"),
            format!("PATCH {POOL}/status"),
            format!("PATCH {LB}"),
            format!("PATCH {SVC}/status"),
            format!("POST {EVENTS}"),
        ]
    );
    // The decapsulator DaemonSet is owned by the operator's ServiceAccount.
    assert_eq!(
        body(&sent, &format!("PATCH {DECAP}"))["metadata"]["ownerReferences"],
        owner_sa_reference()
    );
    // The ledger: written against the version read, one entry with the Service's ports.
    let ledger = body(&sent, &format!("PATCH {POOL}/status"));
    assert_eq!(ledger["metadata"]["resourceVersion"], "1");
    assert_eq!(
        ledger["status"]["allocations"],
        json!([{"address": "10.0.0.1", "namespace": "shop", "service": "web", "uid": "uid-shop-web", "ports": ["TCP/80", "UDP/53"]}])
    );
    assert_eq!(ledger["status"]["inUse"], 1);
    assert_eq!(ledger["status"]["available"], "IPv4 1");
    // The LoadBalancer: one VIP per port, the non-balancer nodes as reals, the pool's selector.
    let lb = body(&sent, &format!("PATCH {LB}"));
    assert_eq!(lb["metadata"]["ownerReferences"][0]["kind"], "Service");
    assert_eq!(lb["metadata"]["labels"]["marklb.io/service"], "web");
    assert_eq!(lb["spec"]["nodeSelector"], json!({"role": "lb"}));
    let vips = lb["spec"]["vips"].as_array().unwrap();
    assert_eq!(vips.len(), 2);
    let keys: Vec<(&str, u64, &str)> = vips
        .iter()
        .map(|v| {
            (
                v["address"].as_str().unwrap(),
                v["port"].as_u64().unwrap(),
                v["protocol"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(keys, [("10.0.0.1", 80, "TCP"), ("10.0.0.1", 53, "UDP")]);
    assert_eq!(
        vips[1]["backends"],
        json!([{"address": "192.168.0.2", "weight": 1}, {"address": "192.168.0.3", "weight": 1}])
    );
    // The Service: ingress and conditions, by server-side apply of our fields only.
    let status_write = sent
        .iter()
        .find(|s| s.line() == format!("PATCH {SVC}/status"))
        .unwrap();
    assert!(
        status_write.uri.contains("fieldManager=marklb-operator"),
        "{}",
        status_write.uri
    );
    let status = &status_write.body["status"];
    assert_eq!(
        status["loadBalancer"]["ingress"],
        json!([{"ip": "10.0.0.1"}])
    );
    assert_eq!(
        condition(status, "marklb.io/AddressAllocated"),
        ("True", "Allocated", "10.0.0.1 from pool public")
    );
    assert_eq!(
        condition(status, "marklb.io/Ready").1,
        "LoadBalancerNotReady"
    );
    let event = body(&sent, &format!("POST {EVENTS}"));
    assert_eq!(
        (event["reason"].as_str(), event["type"].as_str()),
        (Some("Allocated"), Some("Normal"))
    );
}

#[tokio::test]
async fn a_restarted_operator_rereads_the_allocation_and_writes_nothing() {
    // What the first operator wrote: the ledger, the LoadBalancer, the status.
    let mut svc = web();
    let (client, sent) = mock_api(echo_with_pools(vec![public(&[])]));
    let first = service_context(
        client,
        ServiceWorld {
            services: vec![svc.clone()],
            pools: vec![public(&[])],
            nodes: nodes(),
            ..Default::default()
        },
        Settings::default(),
    );
    run(first, &svc).await.unwrap();
    let sent = sent.lock().unwrap().clone();
    let lb: marklb_crds::LoadBalancer =
        serde_json::from_value(body(&sent, &format!("PATCH {LB}")).clone()).unwrap();
    svc.status = Some(
        serde_json::from_value(body(&sent, &format!("PATCH {SVC}/status"))["status"].clone())
            .unwrap(),
    );
    // A new process (nothing in memory), the API as the first one left it.
    let (client, sent) = mock_api(echo_with_pools(vec![public(&[("10.0.0.1", "web")])]));
    let second = service_context(
        client,
        ServiceWorld {
            services: vec![svc.clone()],
            pools: vec![public(&[("10.0.0.1", "web")])],
            lbs: vec![lb],
            nodes: nodes(),
            ..Default::default()
        },
        Settings {
            services: crate::ServiceSettings {
                manage_decap: false,
                ..Default::default()
            },
            ..Settings::default()
        },
    );
    run(second, &svc).await.unwrap();
    assert_eq!(lines(&sent.lock().unwrap()), Vec::<String>::new());
}

#[tokio::test]
async fn a_full_pool_is_a_condition_and_a_warning_not_a_silent_pending() {
    let svc = web();
    let full = public(&[("10.0.0.1", "a"), ("10.0.0.2", "b")]);
    let (client, sent) = mock_api(echo_with_pools(vec![full.clone()]));
    let ctx = service_context(
        client,
        ServiceWorld {
            services: vec![svc.clone()],
            pools: vec![full],
            nodes: nodes(),
            ..Default::default()
        },
        Settings::default(),
    );
    run(ctx.clone(), &svc).await.unwrap();
    let sent = sent.lock().unwrap().clone();
    assert_eq!(
        lines(&sent),
        [
            format!("GET {OWNER_SA_PATH}"),
            format!("PATCH {DECAP}"),
            format!("PATCH {SVC}/status"),
            format!("POST {EVENTS}")
        ]
    );
    let status = &body(&sent, &format!("PATCH {SVC}/status"))["status"];
    assert!(status.get("loadBalancer").is_none(), "{status}");
    assert_eq!(
        condition(status, "marklb.io/AddressAllocated"),
        (
            "False",
            "PoolExhausted",
            "pool public has no free IPv4 address"
        )
    );
    let event = body(&sent, &format!("POST {EVENTS}"));
    assert_eq!(
        (event["reason"].as_str(), event["type"].as_str()),
        (Some("PoolExhausted"), Some("Warning"))
    );
    let metrics = ctx.metrics.render([], []);
    assert!(
        metrics.contains("marklb_operator_service_allocations_total{result=\"PoolExhausted\"} 1")
            && metrics.contains("marklb_operator_service_reconciliations_total 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_requested_address_held_by_another_service_is_refused_naming_it() {
    let svc = finalized(service(
        "shop",
        "web",
        "metadata: {annotations: {marklb.io/load-balancer-class: marklb.io/lb, marklb.io/load-balancer-ips: 10.0.0.1}}\nspec: {type: LoadBalancer, ports: [{port: 80}]}",
    ));
    let held = public(&[("10.0.0.1", "api")]);
    let (client, sent) = mock_api(echo_with_pools(vec![held.clone()]));
    let ctx = service_context(
        client,
        ServiceWorld {
            services: vec![svc.clone()],
            pools: vec![held],
            nodes: nodes(),
            ..Default::default()
        },
        Settings::default(),
    );
    run(ctx, &svc).await.unwrap();
    let sent = sent.lock().unwrap().clone();
    let status = &body(&sent, &format!("PATCH {SVC}/status"))["status"];
    assert_eq!(
        condition(status, "marklb.io/AddressAllocated"),
        ("False", "AddressInUse", "10.0.0.1 is held by shop/api")
    );
    assert!(!lines(&sent).contains(&format!("PATCH {POOL}/status")));
}

#[tokio::test]
async fn a_ledger_that_changed_since_it_was_read_is_read_again_and_decided_again() {
    let svc = web();
    // The cache says the pool is empty; meanwhile another operator gave 10.0.0.1 to `api`:
    // the first write is refused (409), the second read shows it, the Service gets .2.
    let moved = public(&[("10.0.0.1", "api")]);
    let mut pools = vec![public(&[]), moved.clone()];
    pools[1].metadata.resource_version = Some("2".into());
    let mut writes = 0;
    let mut echo = echo_with_pools(pools);
    let responder: Responder = Box::new(move |s: &Sent| {
        if s.method == "PATCH" && s.uri.contains("/loadbalancerippools/public/status") {
            writes += 1;
            if writes == 1 {
                return api_error(409);
            }
        }
        echo(s)
    });
    let (client, sent) = mock_api(responder);
    let ctx = service_context(
        client,
        ServiceWorld {
            services: vec![svc.clone()],
            pools: vec![public(&[])],
            nodes: nodes(),
            ..Default::default()
        },
        Settings::default(),
    );
    run(ctx, &svc).await.unwrap();
    let sent = sent.lock().unwrap().clone();
    assert_eq!(
        lines(&sent)[..6],
        [
            format!("GET {OWNER_SA_PATH}"),
            format!("PATCH {DECAP}"),
            format!("GET {POOL}"),
            format!("PATCH {POOL}/status"),
            format!("GET {POOL}"),
            format!("PATCH {POOL}/status"),
        ]
    );
    let second = &sent[5].body;
    assert_eq!(second["metadata"]["resourceVersion"], "2");
    let addresses: Vec<&str> = second["status"]["allocations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["address"].as_str().unwrap())
        .collect();
    assert_eq!(addresses, ["10.0.0.1", "10.0.0.2"]);
    let status = &body(&sent, &format!("PATCH {SVC}/status"))["status"];
    assert_eq!(
        status["loadBalancer"]["ingress"],
        json!([{"ip": "10.0.0.2"}])
    );
}

fn deleting(mut svc: Service) -> Service {
    svc.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    svc
}

#[tokio::test]
async fn deletion_removes_the_loadbalancer_first_then_releases_the_address() {
    let svc = deleting(web());
    let held = public(&[("10.0.0.1", "web"), ("10.0.0.2", "api")]);
    let req = crate::services::request::read(&svc).unwrap();
    let lb = crate::services::desired::load_balancer(
        &svc,
        &req,
        &held.spec,
        &["10.0.0.1".parse().unwrap()],
        &Default::default(),
    );
    // 1. The LoadBalancer still exists: delete it, come back.
    let (client, sent) = mock_api(echo_with_pools(vec![held.clone()]));
    let ctx = service_context(
        client,
        ServiceWorld {
            services: vec![svc.clone()],
            pools: vec![held.clone()],
            lbs: vec![lb],
            nodes: nodes(),
            ..Default::default()
        },
        Settings::default(),
    );
    assert_eq!(
        run(ctx, &svc).await.unwrap(),
        Action::requeue(Duration::from_secs(1))
    );
    assert_eq!(lines(&sent.lock().unwrap()), [format!("DELETE {LB}")]);
    // 2. It is gone: the address goes back to the pool, then the finalizer.
    let (client, sent) = mock_api(echo_with_pools(vec![held.clone()]));
    let ctx = service_context(
        client,
        ServiceWorld {
            services: vec![svc.clone()],
            pools: vec![held],
            nodes: nodes(),
            ..Default::default()
        },
        Settings::default(),
    );
    assert_eq!(run(ctx, &svc).await.unwrap(), Action::await_change());
    let sent = sent.lock().unwrap().clone();
    assert_eq!(
        lines(&sent),
        [
            format!("GET {POOL}"),
            format!("PATCH {POOL}/status"),
            format!("PATCH {SVC}")
        ]
    );
    let ledger = &sent[1].body["status"]["allocations"];
    assert_eq!(ledger.as_array().unwrap().len(), 1);
    assert_eq!(ledger[0]["service"], "api");
    assert_eq!(sent[2].body["metadata"]["finalizers"], json!([]));
}

#[tokio::test]
async fn a_class_change_releases_the_address_and_clears_the_status() {
    let mut svc = finalized(service(
        "shop",
        "web",
        "metadata: {annotations: {marklb.io/load-balancer-class: other.io/lb}}\nspec: {type: LoadBalancer, ports: [{port: 80}, {port: 53, protocol: UDP}]}",
    ));
    svc.status = Some(
        serde_json::from_value(json!({"loadBalancer": {"ingress": [{"ip": "10.0.0.1"}]}})).unwrap(),
    );
    let held = public(&[("10.0.0.1", "web")]);
    let (client, sent) = mock_api(echo_with_pools(vec![held.clone()]));
    let ctx = service_context(
        client,
        ServiceWorld {
            services: vec![svc.clone()],
            pools: vec![held],
            nodes: nodes(),
            ..Default::default()
        },
        Settings::default(),
    );
    run(ctx, &svc).await.unwrap();
    let sent = sent.lock().unwrap().clone();
    assert_eq!(
        lines(&sent),
        [
            format!("GET {POOL}"),
            format!("PATCH {POOL}/status"),
            format!("PATCH {SVC}/status"),
            format!("PATCH {SVC}"),
            format!("POST {EVENTS}")
        ]
    );
    assert_eq!(sent[1].body["status"]["allocations"], json!([]));
    assert_eq!(sent[2].body["status"], json!({}), "our fields are dropped");
    assert_eq!(sent[4].body["reason"], "Released");
}

#[tokio::test]
async fn local_traffic_goes_to_nodes_with_ready_endpoints_weighted() {
    let svc = finalized(service(
        "shop",
        "web",
        "metadata: {annotations: {marklb.io/load-balancer-class: marklb.io/lb}}\nspec: {type: LoadBalancer, externalTrafficPolicy: Local, ports: [{port: 80}]}",
    ));
    let held = public(&[("10.0.0.1", "web")]);
    let slices = vec![slice_v1beta1(
        "shop",
        "web",
        &[
            ("10.1.0.1", "n3", true),
            ("10.1.0.2", "n3", true),
            ("10.1.0.3", "n2", false),
            ("10.1.0.4", "n1", true),
        ],
    )];
    let (client, sent) = mock_api(echo_with_pools(vec![held.clone()]));
    let ctx = service_context(
        client,
        ServiceWorld {
            services: vec![svc.clone()],
            pools: vec![held],
            nodes: nodes(),
            slices: Some(slices),
            ..Default::default()
        },
        Settings::default(),
    );
    run(ctx, &svc).await.unwrap();
    let sent = sent.lock().unwrap().clone();
    let lb = body(&sent, &format!("PATCH {LB}"));
    // n2's endpoint is not ready, n1 runs the balancer: n3 alone, weight 2.
    assert_eq!(
        lb["spec"]["vips"][0]["backends"],
        json!([{"address": "192.168.0.3", "weight": 2}])
    );
}

#[tokio::test]
async fn the_pool_reconciler_reports_validity_and_releases_services_confirmed_gone() {
    // `ghost` is not in the cache and the API server says it is gone; `new` is not in the
    // cache yet but exists: only ghost's entry goes.
    let mut p = public(&[("10.0.0.1", "ghost"), ("10.0.0.2", "new")]);
    p.status.as_mut().unwrap().in_use = 2;
    let responder: Responder = Box::new(|s: &Sent| {
        if s.method == "GET" && s.uri.contains("/services/new") {
            let svc = service("shop", "new", WEB);
            return (200, serde_json::to_value(svc).unwrap());
        }
        if s.method == "GET" {
            return api_error(404);
        }
        (
            200,
            json!({"apiVersion": "marklb.io/v1alpha1", "kind": "LoadBalancerIPPool", "metadata": {"name": "public"}, "spec": {"addresses": ["10.0.0.1"]}}),
        )
    });
    let (client, sent) = mock_api(responder);
    let ctx = service_context(
        client,
        ServiceWorld {
            pools: vec![p.clone()],
            ..Default::default()
        },
        Settings::default(),
    );
    reconcile_pool(Arc::new(p), ctx).await.unwrap();
    let sent = sent.lock().unwrap().clone();
    assert_eq!(
        lines(&sent),
        [
            "GET /api/v1/namespaces/shop/services/ghost".to_string(),
            "GET /api/v1/namespaces/shop/services/new".to_string(),
            format!("PATCH {POOL}/status"),
        ]
    );
    let status = &sent[2].body["status"];
    assert_eq!(status["allocations"].as_array().unwrap().len(), 1);
    assert_eq!(status["allocations"][0]["service"], "new");
    assert_eq!(status["conditions"][0]["reason"], "Valid");
    assert_eq!(
        (status["inUse"].as_u64(), status["available"].as_str()),
        (Some(1), Some("IPv4 1"))
    );
}
