//! The operator against the real Kubernetes 1.20 API server (etcd + kube-apiserver, no
//! kubelets: Node objects only, simulated agents writing node-state statuses). One server for
//! the whole binary; each step is a user-visible behaviour:
//! selection and roll-up, relabel joins/leaves, invalid spec, no node selected, agent not
//! scheduled, conflicts, backendService following EndpointSlices (v1beta1 on 1.20), the agent
//! DaemonSet applied on 1.20, deletion with one agent gone, and leader election with two
//! replicas. `KUBECONFIG` set: runs against that cluster instead.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, ResourceExt};
use marklb_crds::labels::LOADBALANCER_LABEL;
use marklb_crds::{LoadBalancer, LoadBalancerNodeState};
use marklb_operator::manifests;
use marklb_tests::kube_harness::{Flavor, TestCluster, apply_value, apply_yaml, report};
use marklb_tests::operator_harness::*;

const NS: &str = "shop";
const SYSTEM: &str = "marklb-system";
const WAIT: Duration = Duration::from_secs(30);

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

async fn states_of(client: &Client, lb: &str) -> Vec<LoadBalancerNodeState> {
    Api::<LoadBalancerNodeState>::namespaced(client.clone(), NS)
        .list(&ListParams::default().labels(&format!("{LOADBALANCER_LABEL}={lb}")))
        .await
        .unwrap()
        .items
}

async fn nodes_of(client: &Client, lb: &str) -> Vec<String> {
    let mut nodes: Vec<String> = states_of(client, lb)
        .await
        .into_iter()
        .map(|s| s.spec.node_name)
        .collect();
    nodes.sort();
    nodes
}

/// Waits until LoadBalancer `name` has condition `type_` with `status` and `reason`; returns its
/// message.
async fn wait_condition(
    client: &Client,
    name: &str,
    type_: &str,
    status: &str,
    reason: &str,
) -> String {
    let started = Instant::now();
    let got = eventually(
        &format!("{name} {type_}={status} {reason}"),
        WAIT,
        || async {
            Ok(lb_condition(client, NS, name, type_)
                .await?
                .filter(|(s, r, _)| s == status && r == reason)
                .map(|(_, _, m)| m))
        },
    )
    .await;
    match got {
        Ok(m) => {
            report(&format!(
                "  {name}: {type_}={status} {reason} after {:?}: {m}",
                started.elapsed()
            ));
            m
        }
        Err(e) => panic!(
            "{e}; now: {:?}",
            lb_condition(client, NS, name, type_).await
        ),
    }
}

async fn wait_nodes(client: &Client, lb: &str, want: &[&str]) {
    let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    let got = eventually(
        &format!("node states of {lb} on {want:?}"),
        WAIT,
        || async {
            let nodes = nodes_of(client, lb).await;
            Ok((nodes == want).then_some(()))
        },
    )
    .await;
    if let Err(e) = got {
        panic!("{e}; now {:?}", nodes_of(client, lb).await);
    }
}

async fn lb_status(client: &Client, name: &str) -> marklb_crds::LoadBalancerStatus {
    Api::<LoadBalancer>::namespaced(client.clone(), NS)
        .get(name)
        .await
        .unwrap()
        .status
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_on_kube120() {
    let Some(cluster) = TestCluster::from_env_or_local(Flavor::Kube120, "operator_api").await
    else {
        return;
    };
    let client = cluster.client();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    prepare(&client, &[NS, SYSTEM]).await.unwrap();
    for (node, zone) in [("n1", "a"), ("n2", "a"), ("n3", "b")] {
        put_node(&client, node, &[("zone", zone)]).await.unwrap();
    }
    // The install manifests of `marklb-operator manifests` (RBAC, ServiceAccounts, Deployment)
    // apply on 1.20; the operator and the agents then act with exactly those permissions.
    let objects = manifests::manifests(
        &test_settings(SYSTEM),
        &manifests::OperatorDeployment {
            image: "marklb-operator:test".into(),
            image_pull_policy: "Never".into(),
            replicas: 2,
            metrics_port: 8080,
        },
    );
    for object in &objects {
        apply_value(&client, object, "marklb-tests")
            .await
            .unwrap_or_else(|e| panic!("{}: {e:#}", object["kind"]));
    }
    report(&format!(
        "install manifests applied on 1.20: {} objects",
        objects.len()
    ));
    let operator_client = client_as(
        &cluster,
        "system:serviceaccount:marklb-system:marklb-operator",
    )
    .await;
    let agent_client =
        client_as(&cluster, "system:serviceaccount:marklb-system:marklb-agent").await;
    // The agent's permissions stop at reading node states and writing their status.
    let forbidden = Api::<LoadBalancer>::namespaced(agent_client.clone(), NS)
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&forbidden, kube::Error::Api(s) if s.code == 403),
        "{forbidden}"
    );
    let forbidden = Api::<LoadBalancerNodeState>::namespaced(agent_client.clone(), NS)
        .delete("x", &DeleteParams::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&forbidden, kube::Error::Api(s) if s.code == 403),
        "{forbidden}"
    );
    let operator = Operator::start(operator_client.clone(), test_settings(SYSTEM));
    let agents = SimulatedAgents::start(agent_client.clone(), &[], 8);

    report("selection: a LoadBalancer selecting zone=a gets node states on n1 and n2 only");
    let web = "apiVersion: marklb.io/v1alpha1\nkind: LoadBalancer\nmetadata: {name: web, namespace: shop}\nspec:\n  nodeSelector: {zone: a}\n  vips: [{address: 10.0.0.1, port: 80, backends: [{address: 10.1.0.1}, {address: 10.1.0.2}]}]\n";
    apply_lb(&client, NS, web).await.unwrap();
    wait_nodes(&client, "web", &["n1", "n2"]).await;
    let state = &states_of(&client, "web").await[0];
    assert_eq!(state.spec.lb.vips[0].backends.len(), 2);
    assert!(state.spec.load_balancer_created.is_some());
    assert_eq!(state.owner_references()[0].name, "web");
    let lb = Api::<LoadBalancer>::namespaced(client.clone(), NS)
        .get("web")
        .await
        .unwrap();
    assert!(
        lb.finalizers()
            .contains(&"marklb.io/loadbalancer-cleanup".to_string()),
        "{:?}",
        lb.finalizers()
    );

    report("no agent pods (no kubelets): the nodes are named as AgentNotScheduled, not Pending");
    let m = wait_condition(&client, "web", "Ready", "False", "AgentNotScheduled").await;
    assert!(m.contains("0/2 nodes ready") && m.contains("n1, n2"), "{m}");

    report("roll-up: agents report Ready -> the LoadBalancer is Ready 2/2 and Offloaded");
    agents.add("n1");
    agents.add("n2");
    catch_up(&agent_client, "n1").await.unwrap();
    catch_up(&agent_client, "n2").await.unwrap();
    wait_condition(&client, "web", "Ready", "True", "AllNodesReady").await;
    wait_condition(&client, "web", "Offloaded", "True", "MarksOffloaded").await;
    let s = lb_status(&client, "web").await;
    assert_eq!(
        (
            s.nodes.as_deref(),
            s.offload.as_deref(),
            s.nodes_ready,
            s.marks_in_use
        ),
        (Some("2/2"), Some("2/2"), 2, 4)
    );
    if let Some(out) = cluster
        .local()
        .and_then(|l| l.kubectl(&["get", "mlb", "-n", NS, "web"]))
    {
        let text = String::from_utf8_lossy(&out.stdout);
        report(&format!("  kubectl get mlb:\n{text}"));
        let header: Vec<&str> = text
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        assert_eq!(
            header,
            ["NAME", "VIPS", "NODES", "OFFLOAD", "READY", "AGE"],
            "{text}"
        );
        assert!(
            text.contains("10.0.0.1") && text.contains("2/2") && text.contains("True"),
            "{text}"
        );
    }
    if let Some(out) = cluster
        .local()
        .and_then(|l| l.kubectl(&["get", "mlbns", "-n", NS]))
    {
        let text = String::from_utf8_lossy(&out.stdout);
        report(&format!("  kubectl get mlbns:\n{text}"));
        assert!(
            text.contains("XDP MODE") && text.contains("Native") && text.contains("n1"),
            "{text}"
        );
    }

    report("an unchanged LoadBalancer writes nothing (no reconcile storm)");
    let before = operator.writes();
    tokio::time::sleep(Duration::from_secs(2)).await;
    put_node(&client, "n3", &[("zone", "b"), ("unrelated", "x")])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(operator.writes(), before, "writes without a change");
    let ready_since = Api::<LoadBalancer>::namespaced(client.clone(), NS)
        .get("web")
        .await
        .unwrap()
        .status
        .unwrap()
        .conditions;

    report("relabel: n3 joins zone=a (its state appears, 2/3 until its agent reports), n1 leaves");
    put_node(&client, "n3", &[("zone", "a")]).await.unwrap();
    wait_nodes(&client, "web", &["n1", "n2", "n3"]).await;
    let m = wait_condition(&client, "web", "Ready", "False", "AgentNotScheduled").await;
    assert!(m.starts_with("2/3 nodes ready") && m.contains("n3"), "{m}");
    wait_condition(&client, "web", "Degraded", "True", "AgentNotScheduled").await;
    agents.add("n3");
    catch_up(&agent_client, "n3").await.unwrap();
    wait_condition(&client, "web", "Ready", "True", "AllNodesReady").await;
    put_node(&client, "n1", &[("zone", "c")]).await.unwrap();
    wait_nodes(&client, "web", &["n2", "n3"]).await;
    eventually("web 2/2", WAIT, || async {
        Ok((lb_status(&client, "web").await.nodes.as_deref() == Some("2/2")).then_some(()))
    })
    .await
    .unwrap();
    wait_condition(&client, "web", "Ready", "True", "AllNodesReady").await;
    // Programmed stayed True throughout: its transition time did not move.
    let programmed = |c: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]| {
        c.iter()
            .find(|c| c.type_ == "Programmed")
            .map(|c| c.last_transition_time.clone())
    };
    assert_eq!(
        programmed(&lb_status(&client, "web").await.conditions),
        programmed(&ready_since)
    );

    report("a deleted Node loses its node state, its agent being gone with it");
    put_node(&client, "n4", &[("zone", "a")]).await.unwrap();
    wait_nodes(&client, "web", &["n2", "n3", "n4"]).await;
    Api::<Node>::all(client.clone())
        .delete("n4", &DeleteParams::default())
        .await
        .unwrap();
    wait_nodes(&client, "web", &["n2", "n3"]).await;
    wait_condition(&client, "web", "Ready", "True", "AllNodesReady").await;

    report("invalid spec (1.20 has no CEL): Ready=False InvalidSpec with the field, no node state");
    let bad = "apiVersion: marklb.io/v1alpha1\nkind: LoadBalancer\nmetadata: {name: bad, namespace: shop}\nspec:\n  vips: [{address: not-an-ip, port: 80}]\n";
    apply_lb(&client, NS, bad).await.unwrap();
    let m = wait_condition(&client, "bad", "Ready", "False", "InvalidSpec").await;
    assert!(
        m.contains("spec.vips[0].address") && m.contains("not an IP address"),
        "{m}"
    );
    assert!(nodes_of(&client, "bad").await.is_empty());

    report("a selector matching no node: NoNodesSelected, never Ready 0/0");
    let lonely = "apiVersion: marklb.io/v1alpha1\nkind: LoadBalancer\nmetadata: {name: lonely, namespace: shop}\nspec:\n  nodeSelector: {zone: mars}\n  vips: [{address: 10.0.0.9, port: 80}]\n";
    apply_lb(&client, NS, lonely).await.unwrap();
    let m = wait_condition(&client, "lonely", "Ready", "False", "NoNodesSelected").await;
    assert!(m.contains("zone=mars"), "{m}");
    assert_eq!(
        lb_status(&client, "lonely").await.nodes.as_deref(),
        Some("0/0")
    );

    report("conflict: a newer LoadBalancer with web's VIP on shared nodes names web as the winner");
    tokio::time::sleep(Duration::from_millis(1100)).await; // creation times have 1 s resolution
    let copy = web.replace("name: web,", "name: web-copy,");
    apply_lb(&client, NS, &copy).await.unwrap();
    let m = wait_condition(&client, "web-copy", "Conflict", "True", "VipConflict").await;
    assert!(
        m.contains("VIP 10.0.0.1:80/TCP is kept by older shop/web on 2 nodes"),
        "{m}"
    );
    wait_condition(&client, "web", "Conflict", "False", "NoConflict").await;
    Api::<LoadBalancer>::namespaced(client.clone(), NS)
        .delete("web-copy", &DeleteParams::default())
        .await
        .unwrap();

    report("backendService: backends follow the Service's EndpointSlices (v1beta1 on 1.20)");
    let slice = |ready: bool| {
        format!(
            "apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {{name: api-1, namespace: shop, labels: {{kubernetes.io/service-name: api}}}}\naddressType: IPv4\nendpoints:\n- addresses: [10.2.0.1]\n  conditions: {{ready: true}}\n- addresses: [10.2.0.2]\n  conditions: {{ready: {ready}}}\nports: [{{name: http, port: 8080, protocol: TCP}}]\n"
        )
    };
    apply_yaml(&client, &slice(true), "marklb-tests")
        .await
        .unwrap();
    let api_lb = "apiVersion: marklb.io/v1alpha1\nkind: LoadBalancer\nmetadata: {name: api, namespace: shop}\nspec:\n  nodeSelector: {zone: a}\n  vips: [{address: 10.0.0.20, port: 8080, backendService: {name: api}}]\n";
    apply_lb(&client, NS, api_lb).await.unwrap();
    let backends = |client: Client| async move {
        let states = states_of(&client, "api").await;
        states.first().map(|s| {
            s.spec.lb.vips[0]
                .backends
                .iter()
                .map(|b| b.address.clone())
                .collect::<Vec<_>>()
        })
    };
    eventually("api backends from the slice", WAIT, || async {
        Ok(backends(client.clone())
            .await
            .filter(|b| b == &["10.2.0.1", "10.2.0.2"]))
    })
    .await
    .unwrap();
    apply_yaml(&client, &slice(false), "marklb-tests")
        .await
        .unwrap();
    eventually("api backends follow readiness", WAIT, || async {
        Ok(backends(client.clone())
            .await
            .filter(|b| b == &["10.2.0.1"]))
    })
    .await
    .unwrap();
    assert!(
        states_of(&client, "api")
            .await
            .iter()
            .all(|s| s.spec.lb.vips[0].backend_service.is_none())
    );
    wait_condition(&client, "api", "Ready", "True", "AllNodesReady").await;

    report("the agent DaemonSet, applied on 1.20, schedules by the LoadBalancers' selectors");
    let ds = eventually("agent DaemonSet", WAIT, || async {
        let ds = Api::<DaemonSet>::namespaced(client.clone(), SYSTEM)
            .get_opt("marklb-agent")
            .await?;
        Ok(ds.filter(|d| {
            let json = serde_json::to_string(d).unwrap();
            json.contains("\"mars\"") && json.contains("\"a\"")
        }))
    })
    .await
    .unwrap();
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.containers[0].args.as_ref().unwrap()[2], "--kubernetes");

    report(
        "deletion: VIPs emptied, n2's agent acknowledges, n3's agent is gone: released after the bounded wait",
    );
    agents.kill("n3");
    let started = Instant::now();
    Api::<LoadBalancer>::namespaced(client.clone(), NS)
        .delete("web", &DeleteParams::default())
        .await
        .unwrap();
    eventually("emptied node states", WAIT, || async {
        Ok(states_of(&client, "web")
            .await
            .iter()
            .all(|s| s.spec.lb.vips.is_empty())
            .then_some(()))
    })
    .await
    .unwrap();
    eventually("web gone", WAIT, || async {
        Ok(Api::<LoadBalancer>::namespaced(client.clone(), NS)
            .get_opt("web")
            .await?
            .is_none()
            .then_some(()))
    })
    .await
    .unwrap();
    let took = started.elapsed();
    report(&format!(
        "  web deleted after {took:?} (cleanup timeout 3 s)"
    ));
    assert!(
        took >= Duration::from_secs(2),
        "deleted before the wait for the gone agent: {took:?}"
    );
    assert!(states_of(&client, "web").await.is_empty());
    let events = Api::<Event>::namespaced(client.clone(), NS)
        .list(&ListParams::default())
        .await
        .unwrap();
    let timed_out = events
        .items
        .iter()
        .find(|e| e.reason.as_deref() == Some("CleanupTimedOut"))
        .expect("CleanupTimedOut event");
    let note = timed_out.note.clone().unwrap_or_default();
    assert!(note.contains("n3") && !note.contains("n2"), "{note}");
    report(&format!("  event: {note}"));

    let metrics = operator
        .shared
        .metrics
        .render(std::iter::empty(), std::iter::empty());
    assert!(
        metrics.contains("marklb_operator_reconciliations_total"),
        "{metrics}"
    );
    operator.stop();

    report("leader election: two replicas, one acts; the other takes over when it stops");
    // Each replica with its own client (as two processes would have), with the operator's RBAC.
    let own_client = || {
        client_as(
            &cluster,
            "system:serviceaccount:marklb-system:marklb-operator",
        )
    };
    let a =
        Operator::start_with_election(own_client().await, test_settings(SYSTEM), "replica-a", 3);
    eventually("replica-a leads", WAIT, || async {
        Ok((a.shared.metrics.leader.get() == 1).then_some(()))
    })
    .await
    .unwrap();
    let b =
        Operator::start_with_election(own_client().await, test_settings(SYSTEM), "replica-b", 3);
    eventually("replica-b waits", WAIT, || async {
        Ok(b.shared
            .standby
            .load(std::sync::atomic::Ordering::SeqCst)
            .then_some(()))
    })
    .await
    .unwrap();
    let late = "apiVersion: marklb.io/v1alpha1\nkind: LoadBalancer\nmetadata: {name: late, namespace: shop}\nspec:\n  nodeSelector: {zone: a}\n  vips: [{address: 10.0.0.30, port: 80}]\n";
    apply_lb(&client, NS, late).await.unwrap();
    wait_nodes(&client, "late", &["n2", "n3"]).await;
    assert_eq!(b.writes(), 0, "the standby wrote");
    assert_eq!(b.shared.metrics.leader.get(), 0);
    let stopped = Instant::now();
    a.stop();
    let late2 = late.replace("name: late,", "name: late2,");
    apply_lb(&client, NS, &late2).await.unwrap();
    eventually("replica-b takes over", Duration::from_secs(40), || async {
        Ok((b.shared.metrics.leader.get() == 1).then_some(()))
    })
    .await
    .unwrap();
    wait_nodes(&client, "late2", &["n2", "n3"]).await;
    report(&format!(
        "  replica-b took over and reconciled {:?} after replica-a stopped",
        stopped.elapsed()
    ));
    assert!(b.writes() > 0);
    b.stop();
    agents.stop();
}
