//! Services of type LoadBalancer against the real Kubernetes 1.20 API server (etcd +
//! kube-apiserver, Node objects without kubelets, EndpointSlices written by the test, the
//! operator in process, simulated agents): what a user sees on the Service, the pool and the
//! LoadBalancer. One server for the whole binary. `KUBECONFIG` set: runs against that cluster.
//!
//! Steps: pool status; allocation to ingress with conditions and events; the LoadBalancer with
//! the nodes as reals (balancer nodes excluded); Ready once the agents report; a requested
//! address held by another Service refused naming it; a full pool refused; Local with
//! endpoints on chosen nodes, weighted; nodes joining and cordoned; an operator restart that
//! writes nothing; a class change releasing the address; deletion (LoadBalancer, address,
//! finalizer); two operators at once never handing one address to two Services.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, ResourceExt};
use marklb_crds::{LoadBalancer, LoadBalancerIPPool, LoadBalancerNodeState};
use marklb_operator::Settings;
use marklb_operator::manifests;
use marklb_tests::kube_harness::{Flavor, TestCluster, apply_value, report};
use marklb_tests::operator_harness::*;
use serde_json::json;

const NS: &str = "shop";
const SYSTEM: &str = "marklb-system";
const WAIT: Duration = Duration::from_secs(30);
const CLASS: &str = "marklb.io/load-balancer-class: marklb.io/lb";

fn settings() -> Settings {
    let mut s = test_settings(SYSTEM);
    // No kubelets: no decapsulator pods will ever be Ready; every node may be a real.
    s.services.watch_decap_pods = false;
    s
}

/// Node `name` with `labels`, InternalIP `ip`, Ready (status written as a kubelet would).
async fn put_ready_node(client: &Client, name: &str, labels: &[(&str, &str)], ip: &str) {
    let mut labels = labels.to_vec();
    labels.push(("kubernetes.io/hostname", name));
    put_node(client, name, &labels).await.unwrap();
    let api: Api<Node> = Api::all(client.clone());
    let status = json!({"status": {
        "addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}],
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "simulated",
                        "lastHeartbeatTime": "2024-01-01T00:00:00Z", "lastTransitionTime": "2024-01-01T00:00:00Z"}],
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

/// A client of `cluster` acting as `user` (impersonation): the RBAC of the install manifests
/// is what it may do.
async fn client_as(cluster: &TestCluster, user: &str) -> Client {
    let kubeconfig = Kubeconfig::read_from(cluster.kubeconfig()).unwrap();
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .unwrap();
    config.auth_info.impersonate = Some(user.into());
    Client::try_from(config).unwrap()
}

async fn apply_pool(client: &Client, yaml: &str) {
    let pool: LoadBalancerIPPool = serde_yaml::from_str(yaml).unwrap();
    Api::<LoadBalancerIPPool>::all(client.clone())
        .patch(
            &pool.name_any(),
            &PatchParams::apply("marklb-tests").force(),
            &Patch::Apply(&pool),
        )
        .await
        .unwrap();
}

/// Creates (or replaces the spec and annotations of) Service `name` from YAML with `metadata`
/// and `spec` (server-side apply, as `kubectl apply`).
async fn apply_service(client: &Client, name: &str, yaml: &str) -> Service {
    let mut value: serde_json::Value = serde_yaml::from_str(yaml).unwrap();
    value["apiVersion"] = json!("v1");
    value["kind"] = json!("Service");
    value["metadata"]["name"] = json!(name);
    value["metadata"]["namespace"] = json!(NS);
    Api::<Service>::namespaced(client.clone(), NS)
        .patch(
            name,
            &PatchParams::apply("marklb-tests").force(),
            &Patch::Apply(&value),
        )
        .await
        .unwrap_or_else(|e| panic!("applying Service {name}: {e}"))
}

async fn get_service(client: &Client, name: &str) -> Option<Service> {
    Api::<Service>::namespaced(client.clone(), NS)
        .get_opt(name)
        .await
        .unwrap()
}

fn ingress(svc: &Service) -> Vec<String> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref())
        .map(|i| i.iter().filter_map(|i| i.ip.clone()).collect())
        .unwrap_or_default()
}

/// marklb's condition `type_` on Service `name`: (status, reason, message).
fn svc_condition(svc: &Service, type_: &str) -> Option<(String, String, String)> {
    svc.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == type_))
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

async fn wait_ingress(client: &Client, name: &str, want: &[&str]) -> Duration {
    let started = Instant::now();
    let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    let got = eventually(&format!("{name} ingress {want:?}"), WAIT, || async {
        Ok(get_service(client, name)
            .await
            .filter(|s| ingress(s) == want)
            .map(|_| ()))
    })
    .await;
    if let Err(e) = got {
        panic!(
            "{e}; now {:?}",
            get_service(client, name).await.map(|s| s.status)
        );
    }
    started.elapsed()
}

/// The Warning/Normal events about Service `name` with `reason`: their notes.
async fn events_of(client: &Client, name: &str, reason: &str) -> Vec<String> {
    Api::<Event>::namespaced(client.clone(), NS)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .filter(|e| e.reason.as_deref() == Some(reason))
        .filter_map(|e| e.note)
        .collect()
}

async fn wait_event(client: &Client, name: &str, reason: &str) -> String {
    eventually(&format!("event {reason} about {name}"), WAIT, || async {
        Ok(events_of(client, name, reason).await.into_iter().next())
    })
    .await
    .unwrap()
}

async fn lb_of(client: &Client, service: &str) -> Option<LoadBalancer> {
    Api::<LoadBalancer>::namespaced(client.clone(), NS)
        .get_opt(&format!("svc-{service}"))
        .await
        .unwrap()
}

/// `(address, weight)` of the first VIP's backends of Service `service`'s LoadBalancer.
async fn reals_of(client: &Client, service: &str) -> Vec<(String, u32)> {
    lb_of(client, service)
        .await
        .and_then(|lb| lb.spec.vips.first().cloned())
        .map(|v| {
            v.backends
                .into_iter()
                .map(|b| (b.address, b.weight))
                .collect()
        })
        .unwrap_or_default()
}

async fn wait_reals(client: &Client, service: &str, want: &[(&str, u32)]) {
    let want: Vec<(String, u32)> = want.iter().map(|(a, w)| (a.to_string(), *w)).collect();
    let got = eventually(&format!("reals of {service}: {want:?}"), WAIT, || async {
        Ok((reals_of(client, service).await == want).then_some(()))
    })
    .await;
    if let Err(e) = got {
        panic!("{e}; now {:?}", reals_of(client, service).await);
    }
}

async fn ledger(client: &Client, pool: &str) -> Vec<(String, String)> {
    Api::<LoadBalancerIPPool>::all(client.clone())
        .get(pool)
        .await
        .unwrap()
        .status
        .map(|s| {
            s.allocations
                .into_iter()
                .map(|a| (a.address, a.service))
                .collect()
        })
        .unwrap_or_default()
}

/// Writes by kind from the operator's metrics (`marklb_operator_api_writes_total`).
/// Writes of an operator by `kind/verb` (`marklb_operator_api_writes_total`).
fn writes_by_kind(op: &Operator) -> BTreeMap<String, u64> {
    let text = op.shared.metrics.render([], []);
    let label = |line: &str, name: &str| {
        line.split(&format!("{name}=\""))
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("")
            .to_string()
    };
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("marklb_operator_api_writes_total{"))
    {
        let n = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
        *out.entry(format!("{}/{}", label(line, "kind"), label(line, "verb")))
            .or_default() += n;
    }
    out
}

async fn put_slice(client: &Client, service: &str, endpoints: &[(&str, &str)]) {
    let body = json!({
        "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-test"), "namespace": NS,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"port": 8080, "protocol": "TCP", "name": ""}],
        "endpoints": endpoints.iter().map(|(ip, node)| json!({
            "addresses": [ip], "conditions": {"ready": true},
            "topology": {"kubernetes.io/hostname": node}})).collect::<Vec<_>>(),
    });
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(
        client.clone(),
        NS,
        &kube::discovery::ApiResource::from_gvk_with_plural(
            &kube::core::GroupVersionKind::gvk("discovery.k8s.io", "v1beta1", "EndpointSlice"),
            "endpointslices",
        ),
    );
    api.patch(
        &format!("{service}-test"),
        &PatchParams::apply("marklb-tests").force(),
        &Patch::Apply(&body),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_on_kube120() {
    let Some(cluster) = TestCluster::from_env_or_local(Flavor::Kube120, "services_api").await
    else {
        return;
    };
    let client = cluster.client();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    prepare(&client, &[NS, SYSTEM]).await.unwrap();
    put_ready_node(&client, "n1", &[("role", "lb")], "192.168.50.1").await;
    put_ready_node(&client, "n2", &[], "192.168.50.2").await;
    put_ready_node(&client, "n3", &[], "192.168.50.3").await;
    // The operator acts with exactly the RBAC of its install manifests (impersonation).
    for object in &manifests::manifests(
        &settings(),
        &manifests::OperatorDeployment {
            image: "marklb-operator:test".into(),
            image_pull_policy: "Never".into(),
            replicas: 1,
            metrics_port: 8080,
        },
    ) {
        apply_value(&client, object, "marklb-tests")
            .await
            .unwrap_or_else(|e| panic!("{}: {e:#}", object["kind"]));
    }
    let operator_client = client_as(
        &cluster,
        "system:serviceaccount:marklb-system:marklb-operator",
    )
    .await;
    let operator = Operator::start(operator_client.clone(), settings());
    let agents = SimulatedAgents::start(client.clone(), &["n1"], 4);

    report("a pool: Valid, its addresses counted");
    apply_pool(
        &client,
        "apiVersion: marklb.io/v1alpha1\nkind: LoadBalancerIPPool\nmetadata: {name: public}\nspec:\n  addresses: [10.0.0.1-10.0.0.3]\n  nodeSelector: {role: lb}\n",
    )
    .await;
    let available = eventually("pool public Valid", WAIT, || async {
        let p = Api::<LoadBalancerIPPool>::all(client.clone())
            .get("public")
            .await?;
        Ok(p.status
            .filter(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Valid" && c.status == "True")
            })
            .and_then(|s| s.available))
    })
    .await
    .unwrap();
    assert_eq!(available, "IPv4 3");

    report(
        "a Service with marklb's class (annotation on 1.20) gets an address, a LoadBalancer and conditions",
    );
    let started = Instant::now();
    let web = apply_service(
        &client,
        "web",
        &format!("metadata: {{annotations: {{{CLASS}}}}}\nspec: {{type: LoadBalancer, ports: [{{name: http, port: 80, protocol: TCP}}, {{name: https, port: 443, protocol: TCP}}]}}"),
    )
    .await;
    report(&format!(
        "  1.20 filled ipFamilies={:?} ipFamilyPolicy={:?}",
        web.spec.as_ref().and_then(|s| s.ip_families.clone()),
        web.spec.as_ref().and_then(|s| s.ip_family_policy.clone())
    ));
    wait_ingress(&client, "web", &["10.0.0.1"]).await;
    report(&format!(
        "  ingress 10.0.0.1 {:?} after the Service was applied",
        started.elapsed()
    ));
    let svc = get_service(&client, "web").await.unwrap();
    assert!(
        svc.finalizers()
            .contains(&"marklb.io/service-cleanup".to_string()),
        "{:?}",
        svc.finalizers()
    );
    let allocated = svc_condition(&svc, "marklb.io/AddressAllocated");
    report(&format!(
        "  condition AddressAllocated as stored by 1.20: {allocated:?}"
    ));
    let note = wait_event(&client, "web", "Allocated").await;
    assert_eq!(note, "10.0.0.1 from pool public");
    let lb = lb_of(&client, "web").await.expect("its LoadBalancer");
    assert_eq!(lb.owner_references()[0].uid, svc.uid().unwrap());
    let vips: Vec<String> = lb.spec.vips.iter().map(|v| v.endpoint()).collect();
    assert_eq!(vips, ["10.0.0.1:80/TCP", "10.0.0.1:443/TCP"]);
    wait_reals(&client, "web", &[("192.168.50.2", 1), ("192.168.50.3", 1)]).await;
    // The LoadBalancer controller gives the balancer node its node state.
    eventually("web's node state on n1", WAIT, || async {
        let states = Api::<LoadBalancerNodeState>::namespaced(client.clone(), NS)
            .list(&ListParams::default().labels("marklb.io/loadbalancer=svc-web"))
            .await?;
        Ok((states.items.len() == 1 && states.items[0].spec.node_name == "n1").then_some(()))
    })
    .await
    .unwrap();

    // The decapsulator DaemonSet, applied on 1.20 (server-side apply knows every field).
    let decap = Api::<k8s_openapi::api::apps::v1::DaemonSet>::namespaced(client.clone(), SYSTEM)
        .get("marklb-decap")
        .await
        .expect("the decapsulator DaemonSet");
    let pod = decap.spec.unwrap().template.spec.unwrap();
    let args = pod.containers[0].args.clone().unwrap_or_default();
    assert!(
        args.contains(&"--interface-of=$(HOST_IP)".to_string())
            && args.contains(&"decap".to_string()),
        "{args:?}"
    );
    assert_eq!(pod.host_network, Some(true));

    report("the agent reports: the LoadBalancer is Ready, and so is the Service");
    catch_up(&client, "n1").await.unwrap();
    let ready = wait_condition(&client, "web", "marklb.io/Ready", "True").await;
    report(&format!("  Ready: {}", ready.2));

    report("a requested address held by another Service: refused, naming the holder");
    apply_service(
        &client,
        "api",
        &format!("metadata: {{annotations: {{{CLASS}}}}}\nspec: {{type: LoadBalancer, loadBalancerIP: 10.0.0.1, ports: [{{port: 8443, protocol: TCP}}]}}"),
    )
    .await;
    let refused = wait_condition(&client, "api", "marklb.io/AddressAllocated", "False").await;
    assert_eq!(refused.1, "AddressInUse");
    assert_eq!(refused.2, "10.0.0.1 is held by shop/web");
    assert_eq!(
        wait_event(&client, "api", "AddressInUse").await,
        "10.0.0.1 is held by shop/web"
    );
    assert!(lb_of(&client, "api").await.is_none());

    report(
        "a sharing key: a UDP and a TCP Service on one address (1.20 refuses both protocols in one Service)",
    );
    let shared = |port: u16, protocol: &str| {
        format!(
            "metadata: {{annotations: {{{CLASS}, marklb.io/allow-shared-ip: dns}}}}\nspec: {{type: LoadBalancer, ports: [{{port: {port}, protocol: {protocol}}}]}}"
        )
    };
    apply_service(&client, "dns-udp", &shared(53, "UDP")).await;
    wait_ingress(&client, "dns-udp", &["10.0.0.2"]).await;
    apply_service(&client, "dns-tcp", &shared(53, "TCP")).await;
    wait_ingress(&client, "dns-tcp", &["10.0.0.2"]).await;

    report("the last address, then a full pool: a condition and a warning, not a silent pending");
    let plain = format!(
        "metadata: {{annotations: {{{CLASS}}}}}\nspec: {{type: LoadBalancer, ports: [{{port: 80, protocol: TCP}}]}}"
    );
    apply_service(&client, "extra", &plain).await;
    wait_ingress(&client, "extra", &["10.0.0.3"]).await;
    apply_service(&client, "more", &plain).await;
    let full = wait_condition(&client, "more", "marklb.io/AddressAllocated", "False").await;
    assert_eq!(
        (full.1.as_str(), full.2.as_str()),
        ("PoolExhausted", "pool public has no free IPv4 address")
    );
    wait_event(&client, "more", "PoolExhausted").await;
    let pool = Api::<LoadBalancerIPPool>::all(client.clone())
        .get("public")
        .await
        .unwrap();
    let st = pool.status.unwrap();
    assert_eq!((st.in_use, st.available.as_deref()), (3, Some("IPv4 0")));

    report("Local: only nodes with ready endpoints, weighted by their number (v1beta1 slices)");
    apply_pool(
        &client,
        "apiVersion: marklb.io/v1alpha1\nkind: LoadBalancerIPPool\nmetadata: {name: local-pool}\nspec:\n  addresses: [10.0.1.0/30]\n  autoAssign: false\n  avoidBuggyIPs: true\n  nodeSelector: {role: lb}\n",
    )
    .await;
    apply_service(
        &client,
        "local",
        &format!("metadata: {{annotations: {{{CLASS}, marklb.io/address-pool: local-pool}}}}\nspec: {{type: LoadBalancer, externalTrafficPolicy: Local, ports: [{{port: 80, protocol: TCP}}]}}"),
    )
    .await;
    wait_ingress(&client, "local", &["10.0.1.1"]).await;
    let none = wait_condition(&client, "local", "marklb.io/Ready", "False").await;
    assert_eq!(none.1, "NoReadyNodes");
    report(&format!("  no endpoint yet: {}", none.2));
    put_slice(
        &client,
        "local",
        &[("10.9.0.1", "n2"), ("10.9.0.2", "n2"), ("10.9.0.3", "n1")],
    )
    .await;
    wait_reals(&client, "local", &[("192.168.50.2", 2)]).await;
    put_slice(
        &client,
        "local",
        &[("10.9.0.1", "n2"), ("10.9.0.2", "n2"), ("10.9.0.4", "n3")],
    )
    .await;
    wait_reals(
        &client,
        "local",
        &[("192.168.50.2", 2), ("192.168.50.3", 1)],
    )
    .await;
    // Scaled down: n3's last endpoint goes, and n3 with it (a real whose kube-proxy would drop
    // new flows under Local).
    put_slice(&client, "local", &[("10.9.0.1", "n2"), ("10.9.0.2", "n2")]).await;
    wait_reals(&client, "local", &[("192.168.50.2", 2)]).await;

    report("Cluster: a node joins, a node is cordoned (drained: weight 0)");
    put_ready_node(&client, "n4", &[], "192.168.50.4").await;
    wait_reals(
        &client,
        "extra",
        &[
            ("192.168.50.2", 1),
            ("192.168.50.3", 1),
            ("192.168.50.4", 1),
        ],
    )
    .await;
    Api::<Node>::all(client.clone())
        .patch(
            "n3",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"unschedulable": true}})),
        )
        .await
        .unwrap();
    wait_reals(
        &client,
        "extra",
        &[
            ("192.168.50.2", 1),
            ("192.168.50.3", 0),
            ("192.168.50.4", 1),
        ],
    )
    .await;

    report("an operator restart re-reads every allocation and writes nothing of them");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = ledger(&client, "public").await;
    operator.stop();
    let restarted = Operator::start(operator_client.clone(), settings());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let writes = writes_by_kind(&restarted);
    report(&format!("  writes of the restarted operator: {writes:?}"));
    for key in [
        "Service/status",
        "Service/finalizer",
        "LoadBalancerIPPool/status",
        "LoadBalancer/apply",
        "LoadBalancer/delete",
    ] {
        assert_eq!(
            writes.get(key).copied().unwrap_or(0),
            0,
            "{key}: {writes:?}"
        );
    }
    assert_eq!(ledger(&client, "public").await, before);

    report("a class change: the address is released, the LoadBalancer goes, the status is cleared");
    apply_service(
        &client,
        "web",
        "metadata: {annotations: {marklb.io/load-balancer-class: other.io/lb}}\nspec: {type: LoadBalancer, ports: [{name: http, port: 80, protocol: TCP}, {name: https, port: 443, protocol: TCP}]}",
    )
    .await;
    wait_ingress(&client, "web", &[]).await;
    let svc = eventually("web's finalizer removed", WAIT, || async {
        Ok(get_service(&client, "web").await.filter(|s| {
            !s.finalizers()
                .contains(&"marklb.io/service-cleanup".to_string())
        }))
    })
    .await
    .unwrap();
    assert!(svc_condition(&svc, "marklb.io/AddressAllocated").is_none());
    assert!(lb_of(&client, "web").await.is_none());
    assert!(
        !ledger(&client, "public")
            .await
            .iter()
            .any(|(_, s)| s == "web")
    );
    wait_event(&client, "web", "Released").await;
    // The freed address goes to one of the two Services waiting: `api` asked for exactly it,
    // `more` for any; whichever is reconciled first gets it, the other stays refused.
    let winner = eventually("10.0.0.1 handed to api or more", WAIT, || async {
        let api = ingress(&get_service(&client, "api").await.unwrap());
        let more = ingress(&get_service(&client, "more").await.unwrap());
        Ok(match (api.as_slice(), more.as_slice()) {
            ([a], []) if a == "10.0.0.1" => Some("api"),
            ([], [m]) if m == "10.0.0.1" => Some("more"),
            _ => None,
        })
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let loser = if winner == "api" { "more" } else { "api" };
    let refused = svc_condition(
        &get_service(&client, loser).await.unwrap(),
        "marklb.io/AddressAllocated",
    )
    .unwrap();
    report(&format!(
        "  10.0.0.1 went to {winner}; {loser}: {} {}",
        refused.1, refused.2
    ));
    assert_eq!(refused.0, "False");
    assert!(ingress(&get_service(&client, loser).await.unwrap()).is_empty());

    report(
        "deletion: the LoadBalancer (and its node state) go first, then the address, then the Service",
    );
    let started = Instant::now();
    Api::<Service>::namespaced(client.clone(), NS)
        .delete("extra", &DeleteParams::default())
        .await
        .unwrap();
    eventually("extra gone", WAIT, || async {
        Ok(get_service(&client, "extra").await.is_none().then_some(()))
    })
    .await
    .unwrap();
    report(&format!(
        "  Service gone {:?} after the delete",
        started.elapsed()
    ));
    assert!(lb_of(&client, "extra").await.is_none());
    assert!(
        !ledger(&client, "public")
            .await
            .iter()
            .any(|(_, s)| s == "extra")
    );
    let states = Api::<LoadBalancerNodeState>::namespaced(client.clone(), NS)
        .list(&ListParams::default().labels("marklb.io/loadbalancer=svc-extra"))
        .await
        .unwrap();
    assert!(states.items.is_empty());
    restarted.stop();
    agents.stop();

    report("two operators at once (no leader election): one address never goes to two Services");
    let own_client = || {
        client_as(
            &cluster,
            "system:serviceaccount:marklb-system:marklb-operator",
        )
    };
    apply_pool(
        &client,
        "apiVersion: marklb.io/v1alpha1\nkind: LoadBalancerIPPool\nmetadata: {name: race}\nspec:\n  addresses: [10.0.2.1-10.0.2.3]\n  autoAssign: false\n",
    )
    .await;
    let a = Operator::start(own_client().await, settings());
    let b = Operator::start(own_client().await, settings());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let racers: Vec<String> = (0..6).map(|i| format!("race-{i}")).collect();
    let spec = format!(
        "metadata: {{annotations: {{{CLASS}, marklb.io/address-pool: race}}}}\nspec: {{type: LoadBalancer, ports: [{{port: 80, protocol: TCP}}]}}"
    );
    futures::future::join_all(racers.iter().map(|n| apply_service(&client, n, &spec))).await;
    let outcome = eventually("every racer decided", Duration::from_secs(60), || async {
        let mut got = Vec::new();
        for n in &racers {
            let s = get_service(&client, n).await.unwrap();
            match (
                ingress(&s).first().cloned(),
                svc_condition(&s, "marklb.io/AddressAllocated"),
            ) {
                (Some(ip), _) => got.push(Ok(ip)),
                (None, Some(c)) if c.1 == "PoolExhausted" => got.push(Err(c.1)),
                _ => return Ok(None),
            }
        }
        let ledger = ledger(&client, "race").await;
        Ok((ledger.len() == 3).then_some((got, ledger)))
    })
    .await
    .unwrap();
    let (got, race_ledger) = outcome;
    let mut addresses: Vec<String> = got.iter().filter_map(|r| r.clone().ok()).collect();
    addresses.sort();
    report(&format!("  outcomes: {got:?}"));
    assert_eq!(addresses, ["10.0.2.1", "10.0.2.2", "10.0.2.3"], "{got:?}");
    assert_eq!(got.iter().filter(|r| r.is_err()).count(), 3);
    let mut ledger_addresses: Vec<String> = race_ledger.iter().map(|(a, _)| a.clone()).collect();
    ledger_addresses.sort();
    assert_eq!(ledger_addresses, addresses);
    report(&format!(
        "  ledger writes: {:?} by one operator, {:?} by the other",
        writes_by_kind(&a).get("LoadBalancerIPPool/status"),
        writes_by_kind(&b).get("LoadBalancerIPPool/status")
    ));
    a.stop();
    b.stop();
}

/// Waits until Service `name` has marklb condition `type_` with `status`; returns it.
async fn wait_condition(
    client: &Client,
    name: &str,
    type_: &str,
    status: &str,
) -> (String, String, String) {
    let got = eventually(&format!("{name} {type_}={status}"), WAIT, || async {
        Ok(get_service(client, name)
            .await
            .and_then(|s| svc_condition(&s, type_))
            .filter(|c| c.0 == status))
    })
    .await;
    match got {
        Ok(c) => c,
        Err(e) => panic!(
            "{e}; now {:?}",
            get_service(client, name).await.map(|s| s.status)
        ),
    }
}
