//! Reconciles against kube's mock API (tower-test): the exact requests for each scenario.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use marklb_crds::LoadBalancer;
use serde_json::json;

use super::{error_policy, reconcile};
use crate::fixtures::*;
use crate::settings::Settings;

const LB_PATH: &str = "/apis/marklb.io/v1alpha1/namespaces/prod/loadbalancers/web";
const STATES: &str = "/apis/marklb.io/v1alpha1/namespaces/prod/loadbalancernodestates";
const DS_PATH: &str = "/apis/apps/v1/namespaces/marklb-system/daemonsets/marklb-agent";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/prod/events";

fn web(spec: &str) -> LoadBalancer {
    finalized(lb("prod", "web", 100, spec))
}

const SPEC: &str = "nodeSelector: {zone: a}\nvips: [{address: 10.0.0.1, port: 80, backends: [{address: 10.1.0.1}]}]";

/// Settings of scenarios that are not about the DaemonSet (it is applied once per process).
fn without_daemonset() -> Settings {
    Settings {
        manage_daemonset: false,
        ..Settings::default()
    }
}

fn zone_nodes() -> Vec<k8s_openapi::api::core::v1::Node> {
    vec![
        node("n1", &[("zone", "a")]),
        node("n2", &[("zone", "a")]),
        node("n3", &[("zone", "b")]),
    ]
}

async fn run(ctx: Arc<crate::Context>, lb: &LoadBalancer) -> crate::Result<Action> {
    let result = reconcile(Arc::new(lb.clone()), ctx).await;
    // Let the recorder task store the last request.
    tokio::time::sleep(Duration::from_millis(20)).await;
    result
}

fn lines(sent: &[Sent]) -> Vec<String> {
    sent.iter().map(Sent::line).collect()
}

fn status_of(sent: &[Sent]) -> &serde_json::Value {
    &sent
        .iter()
        .rev()
        .find(|s| s.uri.contains("/web/status"))
        .expect("a status patch")
        .body["status"]
}

fn condition<'a>(status: &'a serde_json::Value, type_: &str) -> (&'a str, &'a str) {
    let c = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap();
    (c["status"].as_str().unwrap(), c["reason"].as_str().unwrap())
}

#[tokio::test]
async fn a_new_loadbalancer_gets_the_finalizer_first_and_nothing_else() {
    let lb = lb("prod", "web", 100, SPEC);
    let (client, sent) = mock_client(Some(lb.clone()), None);
    let ctx = context(
        client,
        World {
            lbs: vec![lb.clone()],
            nodes: zone_nodes(),
            ..World::default()
        },
        Settings::default(),
    );
    let action = run(ctx, &lb).await.unwrap();
    assert_eq!(action, Action::await_change());
    let sent = sent.lock().unwrap();
    assert_eq!(lines(&sent), [format!("PATCH {LB_PATH}")]);
    assert_eq!(
        sent[0].body["metadata"]["finalizers"],
        json!(["marklb.io/loadbalancer-cleanup"])
    );
}

#[tokio::test]
async fn create_applies_the_daemonset_one_state_per_selected_node_then_the_status() {
    let lb = web(SPEC);
    let (client, sent) = mock_client(Some(lb.clone()), None);
    let ctx = context(
        client,
        World {
            lbs: vec![lb.clone()],
            nodes: zone_nodes(),
            ..World::default()
        },
        Settings::default(),
    );
    run(ctx.clone(), &lb).await.unwrap();
    let sent = sent.lock().unwrap().clone();
    assert_eq!(
        lines(&sent),
        [
            format!("GET {OWNER_SA_PATH}"),
            format!("PATCH {DS_PATH}"),
            format!("PATCH {STATES}/web-n1"),
            format!("PATCH {STATES}/web-n2"),
            format!("PATCH {LB_PATH}/status"),
            format!("POST {EVENTS}"),
        ]
    );
    // The DaemonSet is owned by the operator's ServiceAccount (uninstalling collects it).
    assert_eq!(
        sent[1].body["metadata"]["ownerReferences"],
        owner_sa_reference()
    );
    let sent = &sent[1..];
    for s in &sent[..4] {
        // Status under its own manager: on Kubernetes < 1.22 a status apply under the spec's
        // manager made the next spec apply unable to remove a backend.
        let manager = if s.line().ends_with("/status") {
            "fieldManager=marklb-operator-status&"
        } else {
            "fieldManager=marklb-operator&"
        };
        assert!(
            format!("{}&", s.uri).contains(manager) && s.uri.contains("force=true"),
            "{}",
            s.uri
        );
    }
    assert_eq!(sent[1].body["spec"]["nodeName"], "n1");
    assert_eq!(sent[1].body["metadata"]["labels"]["marklb.io/node"], "n1");
    assert_eq!(
        sent[1].body["spec"]["lb"]["vips"][0]["backends"][0]["address"],
        "10.1.0.1"
    );
    assert!(sent[1].body.get("status").is_none());
    let status = status_of(sent);
    assert_eq!(condition(status, "Ready"), ("False", "Pending"));
    assert_eq!(
        condition(status, "Programmed"),
        ("True", "NodeStatesApplied")
    );
    assert_eq!(status["nodes"], "0/2");
    assert_eq!(sent[4].body["reason"], "Pending");
    // The DaemonSet affinity comes from the selector.
    assert_eq!(
        sent[0].body["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"][0]["matchExpressions"][0],
        json!({"key": "zone", "operator": "In", "values": ["a"]})
    );
}

/// The states of `lb` on `nodes` as the operator would have written them, reported Ready.
fn written(lb: &LoadBalancer, nodes: &[&str]) -> Vec<marklb_crds::LoadBalancerNodeState> {
    nodes
        .iter()
        .map(|n| {
            reported(
                crate::desired::node_state(lb, n, &lb.spec),
                Agent::Ready {
                    offloaded: true,
                    marks: 1,
                },
            )
        })
        .collect()
}

#[tokio::test]
async fn an_unchanged_loadbalancer_sends_no_request_after_the_daemonset() {
    let mut lb = web(SPEC);
    let states = written(&lb, &["n1", "n2"]);
    // The status as a first reconcile wrote it.
    let (client, sent) = mock_client(Some(lb.clone()), None);
    let ctx = context(
        client,
        World {
            lbs: vec![lb.clone()],
            nodes: zone_nodes(),
            states: states.clone(),
            ..World::default()
        },
        Settings::default(),
    );
    run(ctx.clone(), &lb).await.unwrap();
    lb.status = Some(serde_json::from_value(status_of(&sent.lock().unwrap()).clone()).unwrap());
    assert_eq!(
        condition(status_of(&sent.lock().unwrap()), "Ready"),
        ("True", "AllNodesReady")
    );
    sent.lock().unwrap().clear();
    // Same context (the DaemonSet is known), same world, status in place: nothing to write.
    run(ctx, &lb).await.unwrap();
    assert_eq!(lines(&sent.lock().unwrap()), Vec::<String>::new());
}

#[tokio::test]
async fn a_spec_update_rewrites_every_state() {
    let old = web(SPEC);
    let states = written(&old, &["n1", "n2"]);
    let new = web(&SPEC.replace("port: 80", "port: 8080"));
    let (client, sent) = mock_client(Some(new.clone()), None);
    let ctx = context(
        client,
        World {
            lbs: vec![new.clone()],
            nodes: zone_nodes(),
            states,
            ..World::default()
        },
        without_daemonset(),
    );
    run(ctx, &new).await.unwrap();
    let sent = sent.lock().unwrap();
    assert_eq!(
        lines(&sent),
        [
            format!("PATCH {STATES}/web-n1"),
            format!("PATCH {STATES}/web-n2"),
            format!("PATCH {LB_PATH}/status"),
            format!("POST {EVENTS}")
        ]
    );
    assert_eq!(sent[0].body["spec"]["lb"]["vips"][0]["port"], 8080);
    // The states hold the old spec: pending until the agents report the new one.
    assert_eq!(condition(status_of(&sent), "Ready"), ("False", "Pending"));
}

#[tokio::test]
async fn node_added_removed_and_relabelled() {
    let lb = web(SPEC);
    // n1 keeps its state, n2 was relabelled out of zone a, n4 is new in zone a.
    let states = written(&lb, &["n1", "n2"]);
    let nodes = vec![
        node("n1", &[("zone", "a")]),
        node("n2", &[("zone", "b")]),
        node("n4", &[("zone", "a")]),
    ];
    let (client, sent) = mock_client(Some(lb.clone()), None);
    let ctx = context(
        client,
        World {
            lbs: vec![lb.clone()],
            nodes,
            states,
            ..World::default()
        },
        without_daemonset(),
    );
    run(ctx, &lb).await.unwrap();
    let sent = sent.lock().unwrap();
    assert_eq!(
        lines(&sent),
        [
            format!("PATCH {STATES}/web-n4"),
            format!("DELETE {STATES}/web-n2"),
            format!("PATCH {LB_PATH}/status"),
            format!("POST {EVENTS}")
        ]
    );
    assert_eq!(status_of(&sent)["nodes"], "1/2");
}

#[tokio::test]
async fn endpoints_changing_rewrite_the_backends() {
    let lb = web(
        "nodeSelector: {zone: a}\nvips: [{address: 10.0.0.1, port: 80, backendService: {name: api}}]",
    );
    let slice = |addresses: &[&str]| -> kube::api::DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
            "metadata": {"name": "api-x", "namespace": "prod", "labels": {"kubernetes.io/service-name": "api"}},
            "addressType": "IPv4",
            "endpoints": addresses.iter().map(|a| json!({"addresses": [a], "conditions": {"ready": true}})).collect::<Vec<_>>(),
        }))
        .unwrap()
    };
    let mut resolved = lb.spec.clone();
    resolved.vips[0].backend_service = None;
    resolved.vips[0].backends = vec![marklb_crds::Backend {
        address: "10.2.0.1".into(),
        weight: 1,
    }];
    let states: Vec<_> = ["n1", "n2"]
        .iter()
        .map(|n| reported(crate::desired::node_state(&lb, n, &resolved), READY))
        .collect();
    let (client, sent) = mock_client(Some(lb.clone()), None);
    let world = World {
        lbs: vec![lb.clone()],
        nodes: zone_nodes(),
        states,
        slices: Some(vec![slice(&["10.2.0.1", "10.2.0.2"])]),
    };
    let ctx = context(client, world, without_daemonset());
    run(ctx, &lb).await.unwrap();
    let sent = sent.lock().unwrap();
    assert_eq!(
        &lines(&sent)[..2],
        [
            format!("PATCH {STATES}/web-n1"),
            format!("PATCH {STATES}/web-n2")
        ]
    );
    assert_eq!(
        sent[0].body["spec"]["lb"]["vips"][0]["backends"],
        json!([{"address": "10.2.0.1", "weight": 1}, {"address": "10.2.0.2", "weight": 1}])
    );
    assert!(
        sent[0].body["spec"]["lb"]["vips"][0]
            .get("backendService")
            .is_none()
    );
}

fn deleting(mut lb: LoadBalancer, seconds_ago: i64) -> LoadBalancer {
    lb.metadata.deletion_timestamp = Some(Time(
        Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(seconds_ago),
    ));
    lb
}

#[tokio::test]
async fn deletion_empties_states_then_waits_for_the_agents() {
    let lb = deleting(web(SPEC), 0);
    let states = written(&lb, &["n1", "n2"]);
    let (client, sent) = mock_client(Some(lb.clone()), None);
    let ctx = context(
        client,
        World {
            lbs: vec![lb.clone()],
            nodes: zone_nodes(),
            states,
            ..World::default()
        },
        Settings::default(),
    );
    let action = run(ctx, &lb).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(1)));
    let sent = sent.lock().unwrap();
    assert_eq!(
        lines(&sent),
        [
            format!("PATCH {STATES}/web-n1"),
            format!("PATCH {STATES}/web-n2")
        ]
    );
    assert_eq!(sent[0].body["spec"]["lb"]["vips"], json!([]));
}

#[tokio::test]
async fn deletion_finishes_once_acknowledged_or_after_the_bounded_wait() {
    let lb = deleting(web(SPEC), 0);
    let mut emptied = lb.spec.clone();
    emptied.vips.clear();
    // n1 acknowledged (its generation, no VIPs); n2's agent is gone (no status for gen 2).
    let mut acked = reported(crate::desired::node_state(&lb, "n1", &emptied), READY);
    acked.status.as_mut().unwrap().vips = 0;
    let gone = reported(
        crate::desired::node_state(&lb, "n2", &emptied),
        Agent::Lagging,
    );

    // Within the wait: nothing to write, poll again.
    let (client, sent) = mock_client(Some(lb.clone()), None);
    let world = || World {
        lbs: vec![lb.clone()],
        nodes: zone_nodes(),
        states: vec![acked.clone(), gone.clone()],
        ..World::default()
    };
    let action = run(context(client, world(), Settings::default()), &lb)
        .await
        .unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(1)));
    assert!(sent.lock().unwrap().is_empty());

    // After the wait: an event names n2, the states go, the DaemonSet drops the selector, the
    // finalizer goes.
    let late = deleting(web(SPEC), 31);
    let (client, sent) = mock_client(Some(late.clone()), None);
    let world = World {
        lbs: vec![late.clone()],
        nodes: zone_nodes(),
        states: vec![acked.clone(), gone.clone()],
        ..World::default()
    };
    let action = run(context(client, world, Settings::default()), &late)
        .await
        .unwrap();
    assert_eq!(action, Action::await_change());
    let sent = sent.lock().unwrap();
    assert_eq!(
        lines(&sent),
        [
            format!("POST {EVENTS}"),
            format!("DELETE {STATES}/web-n1"),
            format!("DELETE {STATES}/web-n2"),
            format!("GET {OWNER_SA_PATH}"),
            format!("PATCH {DS_PATH}"),
            format!("PATCH {LB_PATH}")
        ]
    );
    assert_eq!(sent[0].body["reason"], "CleanupTimedOut");
    assert!(
        sent[0].body["note"].as_str().unwrap().contains("n2")
            && !sent[0].body["note"].as_str().unwrap().contains("n1")
    );
    assert_eq!(sent[5].body["metadata"]["finalizers"], json!([]));
    assert_eq!(
        sent[4].body["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"][0]["matchExpressions"][0]["operator"],
        "Exists"
    );
}

#[tokio::test]
async fn a_newer_loadbalancer_with_the_same_vip_reports_the_conflict() {
    let older = finalized(lb("prod", "old", 50, SPEC));
    let newer = web(SPEC);
    let (client, sent) = mock_client(Some(newer.clone()), None);
    let ctx = context(
        client,
        World {
            lbs: vec![older, newer.clone()],
            nodes: zone_nodes(),
            ..World::default()
        },
        without_daemonset(),
    );
    run(ctx, &newer).await.unwrap();
    let sent = sent.lock().unwrap();
    let status = status_of(&sent);
    assert_eq!(condition(status, "Conflict"), ("True", "VipConflict"));
    let message = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Conflict")
        .unwrap()["message"]
        .clone();
    assert_eq!(
        message,
        "VIP 10.0.0.1:80/TCP is kept by older prod/old on 2 nodes (n1, ...)"
    );
    // The loser's states are still written: its agents refuse the VIP and say so per node.
    assert_eq!(
        lines(&sent)[..2],
        [
            format!("PATCH {STATES}/web-n1"),
            format!("PATCH {STATES}/web-n2")
        ]
    );
}

#[tokio::test]
async fn an_invalid_spec_is_reported_and_writes_no_state() {
    let lb = web("nodeSelector: {zone: a}\nvips: [{address: nope, port: 80}]");
    let (client, sent) = mock_client(Some(lb.clone()), None);
    let ctx = context(
        client,
        World {
            lbs: vec![lb.clone()],
            nodes: zone_nodes(),
            ..World::default()
        },
        without_daemonset(),
    );
    run(ctx, &lb).await.unwrap();
    let sent = sent.lock().unwrap();
    assert_eq!(
        lines(&sent),
        [format!("PATCH {LB_PATH}/status"), format!("POST {EVENTS}")]
    );
    assert_eq!(
        condition(status_of(&sent), "Ready"),
        ("False", "InvalidSpec")
    );
    let message = &status_of(&sent)["conditions"][0]["message"];
    assert_eq!(
        message,
        "spec.vips[0].address: \"nope\" is not an IP address"
    );
}

#[tokio::test]
async fn api_errors_are_recorded_in_the_status_and_back_off() {
    let lb = web(SPEC);
    let fail: Fail =
        Box::new(|s: &Sent| (s.method == "PATCH" && s.uri.contains("/web-n2")).then_some(500));
    let (client, sent) = mock_client(Some(lb.clone()), Some(fail));
    let ctx = context(
        client,
        World {
            lbs: vec![lb.clone()],
            nodes: zone_nodes(),
            ..World::default()
        },
        without_daemonset(),
    );
    let err = run(ctx.clone(), &lb).await.unwrap_err();
    assert_eq!(err.metric_label(), "server_error");
    let sent = sent.lock().unwrap().clone();
    assert_eq!(
        lines(&sent)[..3],
        [
            format!("PATCH {STATES}/web-n1"),
            format!("PATCH {STATES}/web-n2"),
            format!("PATCH {LB_PATH}/status")
        ]
    );
    assert_eq!(
        condition(status_of(&sent), "Ready"),
        ("False", "ApplyFailed")
    );
    assert_eq!(
        condition(status_of(&sent), "Programmed"),
        ("False", "ApplyFailed")
    );
    let delays: Vec<Action> = (0..4)
        .map(|_| error_policy(Arc::new(lb.clone()), &err, ctx.clone()))
        .collect();
    assert_eq!(
        delays,
        [1, 2, 4, 8].map(|s| Action::requeue(Duration::from_secs(s)))
    );
    let text = ctx.metrics.render([], []);
    assert!(
        text.contains("marklb_operator_reconcile_errors_total{error=\"server_error\"} 1"),
        "{text}"
    );
}

/// After a restart (a fresh process: no DaemonSet applied yet) every LoadBalancer is reconciled
/// at once; the agent DaemonSet is one object for all of them and must be applied once, not
/// once per LoadBalancer racing the others (seen on the real cluster).
#[tokio::test]
async fn concurrent_reconciles_after_a_restart_apply_the_daemonset_once() {
    let lbs: Vec<LoadBalancer> = (0..4)
        .map(|i| {
            let spec = format!(
                "nodeSelector: {{zone: a}}\nvips: [{{address: 10.0.0.{}, port: 80, backends: [{{address: 10.1.0.1}}]}}]",
                i + 1
            );
            finalized(lb("prod", &format!("web{i}"), 100 + i, &spec))
        })
        .collect();
    let (client, sent) = mock_client(Some(lbs[0].clone()), None);
    let ctx = context(
        client,
        World {
            lbs: lbs.clone(),
            nodes: zone_nodes(),
            ..World::default()
        },
        Settings::default(),
    );
    let runs = lbs
        .iter()
        .map(|lb| reconcile(Arc::new(lb.clone()), ctx.clone()));
    for r in futures::future::join_all(runs).await {
        r.unwrap();
    }
    let daemonset_applies = sent
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.line() == format!("PATCH {DS_PATH}"))
        .count();
    assert_eq!(daemonset_applies, 1);
    // Unchanged afterwards: a second round writes no DaemonSet.
    let before = sent.lock().unwrap().len();
    for lb in &lbs {
        reconcile(Arc::new(lb.clone()), ctx.clone()).await.unwrap();
    }
    let again = sent.lock().unwrap()[before..]
        .iter()
        .filter(|s| s.uri.contains("/daemonsets/"))
        .count();
    assert_eq!(again, 0);
}

/// The owner lookup failing (here: 403, as with RBAC missing the permission) never stops the
/// operator: the DaemonSet is applied without an owner, the LoadBalancer is served and the
/// failure counted; the next reconcile asks again and then applies the DaemonSet with it.
#[tokio::test]
async fn a_failed_owner_lookup_applies_the_daemonset_without_owner_and_retries() {
    let lb = web(SPEC);
    let refuse = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let refusing = refuse.clone();
    let fail: Fail = Box::new(move |s: &Sent| {
        (s.uri.starts_with(OWNER_SA_PATH) && refusing.load(std::sync::atomic::Ordering::SeqCst))
            .then_some(403)
    });
    let (client, sent) = mock_client(Some(lb.clone()), Some(fail));
    let ctx = context(
        client,
        World {
            lbs: vec![lb.clone()],
            nodes: zone_nodes(),
            ..World::default()
        },
        Settings::default(),
    );
    run(ctx.clone(), &lb).await.unwrap();
    let first = sent.lock().unwrap().clone();
    assert_eq!(
        lines(&first)[..4],
        [
            format!("GET {OWNER_SA_PATH}"),
            format!("PATCH {DS_PATH}"),
            format!("PATCH {STATES}/web-n1"),
            format!("PATCH {STATES}/web-n2"),
        ]
    );
    assert!(first[1].body["metadata"].get("ownerReferences").is_none());
    let counted = ctx
        .metrics
        .errors
        .with_label_values(&[crate::install_owner::LOOKUP_ERROR])
        .get();
    assert_eq!(counted, 1);
    // Allowed again: the next reconcile looks it up and applies the DaemonSet with the owner.
    refuse.store(false, std::sync::atomic::Ordering::SeqCst);
    sent.lock().unwrap().clear();
    run(ctx.clone(), &lb).await.unwrap();
    let second = sent.lock().unwrap().clone();
    assert_eq!(
        lines(&second)[..2],
        [format!("GET {OWNER_SA_PATH}"), format!("PATCH {DS_PATH}")]
    );
    assert_eq!(
        second[1].body["metadata"]["ownerReferences"],
        owner_sa_reference()
    );
    // Found once, asked no more.
    sent.lock().unwrap().clear();
    run(ctx, &lb).await.unwrap();
    assert!(
        !lines(&sent.lock().unwrap())
            .iter()
            .any(|l| l.contains("/serviceaccounts/")),
        "{:?}",
        lines(&sent.lock().unwrap())
    );
}
