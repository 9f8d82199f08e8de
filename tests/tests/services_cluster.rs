//! The decapsulator DaemonSet the operator applies for Services of type LoadBalancer, exactly
//! as `marklb_operator::services::desired::decap_daemonset` builds it, on a real kubelet (the
//! one-node test cluster, `marklb_tests::cluster`) with the agent image `scripts/image/build.sh`
//! builds: its pod runs unprivileged with the agent's three capabilities and no API token,
//! `$(HOST_IP)` becomes the node's address, `--interface-of` finds the interface holding it, the
//! program attaches at TC, the pod stays Running; deleting the DaemonSet ends it.
//!
//! The end-to-end test of Services (balancer node, Deployment on two other nodes, traffic,
//! captures) needs several nodes and the agent's Kubernetes mode; this binary grows into it.
//! One cluster serves the binary; SKIP with the reason when the machine cannot run it.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams};
use marklb_operator::AgentSettings;
use marklb_operator::services::desired::{DECAP_NAME, decap_daemonset};
use marklb_tests::cluster;
use marklb_tests::cluster_or_skip;
use marklb_tests::kube_harness::{apply_value, report};
use serde_json::json;

const NS: &str = "services-decap";

fn running(p: &Pod) -> bool {
    p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_decapsulator_daemonset_runs_on_a_real_node() {
    let cluster = cluster_or_skip!();
    let client = cluster.client().await.unwrap();
    let images = cluster::images().expect("images");
    apply_value(
        &client,
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
        "services-tests",
    )
    .await
    .unwrap();
    let agent = AgentSettings {
        image: images.agent.name.clone(),
        image_pull_policy: "Never".into(),
        log_level: "info".into(),
        ..AgentSettings::default()
    };
    let ds = decap_daemonset(NS, &agent);
    let started = Instant::now();
    apply_value(
        &client,
        &serde_json::to_value(&ds).unwrap(),
        "services-tests",
    )
    .await
    .expect("the DaemonSet applies on 1.20");
    let selector = format!("app.kubernetes.io/name={DECAP_NAME}");
    let pod = loop {
        let pods = cluster.pods(&client, NS, &selector).await.unwrap();
        if let Some(p) = pods.iter().find(|p| running(p)) {
            break p.clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no Running decapsulator pod after 60 s: {:#?}",
            pods.iter().map(|p| p.status.clone()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let name = pod.metadata.name.clone().unwrap();
    // Attached: the log says so, naming the interface of the node's address.
    let logs = loop {
        let logs = cluster
            .kubectl_ok(&["logs", "-n", NS, &name])
            .unwrap_or_default();
        if logs.contains("decapsulating") || started.elapsed() > Duration::from_secs(60) {
            break logs;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    report(&format!(
        "decapsulator pod {name} Running {:?} after the apply; log: {}",
        started.elapsed(),
        logs.lines().next().unwrap_or("")
    ));
    assert!(logs.contains("decapsulating"), "{logs}");
    let host_ip = pod
        .status
        .as_ref()
        .and_then(|s| s.host_ip.clone())
        .expect("a Running pod has a hostIP");
    assert!(
        logs.contains(&host_ip),
        "the node's address among the local ones: {logs}"
    );
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(spec.host_network, Some(true));
    assert_eq!(spec.automount_service_account_token, Some(false));
    assert!(
        spec.volumes
            .iter()
            .flatten()
            .all(|v| v.projected.is_none() && v.secret.is_none()),
        "no API token mounted: {:?}",
        spec.volumes
    );
    // Still running a moment later (no crash loop).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let again = Api::<Pod>::namespaced(client.clone(), NS)
        .get(&name)
        .await
        .unwrap();
    assert!(running(&again), "{:?}", again.status);
    let restarts: i32 = again
        .status
        .and_then(|s| s.container_statuses)
        .map(|c| c.iter().map(|c| c.restart_count).sum())
        .unwrap_or(0);
    assert_eq!(restarts, 0);

    // Deleting the DaemonSet ends the pod (the decapsulator detaches on SIGTERM).
    Api::<DaemonSet>::namespaced(client.clone(), NS)
        .delete(DECAP_NAME, &DeleteParams::foreground())
        .await
        .unwrap();
    let gone = Instant::now();
    while !Api::<Pod>::namespaced(client.clone(), NS)
        .list(&ListParams::default().labels(&selector))
        .await
        .unwrap()
        .items
        .is_empty()
    {
        assert!(
            gone.elapsed() < Duration::from_secs(60),
            "decapsulator pod still there"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    report(&format!(
        "decapsulator pod gone {:?} after the DaemonSet's deletion",
        gone.elapsed()
    ));
}
