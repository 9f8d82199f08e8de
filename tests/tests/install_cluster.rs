//! The install paths on the real one-node cluster (kubelet 1.20 + containerd,
//! `marklb_tests::cluster`), from the images `make image` builds:
//!
//! - `kubectl_install_runs_the_operator_and_prometheus_scrapes_it`: `kubectl apply -k
//!   deploy/legacy-1.20/` brings the operator Deployment to 2/2 Ready from its OCI image, its
//!   processes run as user 65532; a real Prometheus (Debian's, file service discovery written
//!   by the test from the pods' addresses) scrapes both replicas and its HTTP API returns the
//!   operator's series with sane values (both targets up, exactly one leader, reconciliations
//!   counted); `kubectl delete -k deploy/legacy-1.20/` leaves nothing of ours.
//! - `helm_installs_upgrades_and_uninstalls`: `helm install` (namespace created), the operator
//!   Ready; `helm upgrade` with another agent XDP mode rolls the operator to the new flags;
//!   `helm uninstall` leaves nothing of ours (objects, CRDs, cluster-wide RBAC, the Lease).
//!
//! The agents' part (a LoadBalancer -> agents Ready -> traffic through the VIP, rolling the
//! agents on an upgrade without losing a connection, Prometheus scraping every agent, the
//! metrics port closed on the client-facing address) needs the agent's Kubernetes mode.
//!
//! One cluster for the binary, tests one at a time (they install the same cluster-wide
//! objects). Adds about 60-90 s to a warm run (cluster start ~15 s, the rest waiting for pods).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use marklb_tests::cluster::Cluster;
use marklb_tests::cluster_or_skip;
use marklb_tests::install::README_ON_CLUSTER;
use marklb_tests::kube_harness::report;
use marklb_tests::operator_install::{NS, import_operator_image, user, wait_operator};
use marklb_tests::prometheus::Prometheus;
use serde_json::{Value, json};

/// One test at a time: both install the same cluster-wide objects.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// UIDs (real, effective) of every `marklb-operator` process on the machine.
fn operator_uids() -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim() != "marklb-operator" {
            continue;
        }
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        if let Some(line) = status.lines().find(|l| l.starts_with("Uid:")) {
            let ids: Vec<u32> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|v| v.parse().ok())
                .collect();
            out.push((ids[0], ids[1]));
        }
    }
    out
}

/// Everything of ours still in the cluster: marklb CRDs, cluster-wide RBAC, and namespaced
/// objects in `marklb-system` other than what Kubernetes puts in every namespace.
fn ours_left(cluster: &Cluster) -> Vec<String> {
    let mut left = Vec::new();
    let names = |args: &[&str]| -> Vec<String> {
        cluster
            .kubectl_ok(args)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    };
    for n in names(&["get", "crd,clusterrole,clusterrolebinding", "-o", "name"]) {
        if n.contains("marklb") {
            left.push(n);
        }
    }
    let namespaced = "deployments,daemonsets,replicasets,pods,services,serviceaccounts,roles,rolebindings,leases.coordination.k8s.io,configmaps,secrets";
    for n in names(&["get", namespaced, "-n", NS, "-o", "name"]) {
        let kubernetes_own = n == "serviceaccount/default"
            || n == "configmap/kube-root-ca.crt"
            || n.starts_with("secret/default-token-");
        if !kubernetes_own {
            left.push(format!("{NS}/{n}"));
        }
    }
    left
}

async fn wait_nothing_left(cluster: &Cluster, what: &str) {
    let started = Instant::now();
    loop {
        let left = ours_left(cluster);
        if left.is_empty() {
            report(&format!(
                "  {what}: nothing of ours left after {:.1}s",
                started.elapsed().as_secs_f64()
            ));
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "{what}: still there after 90 s: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A Prometheus scraping the operator pods (file service discovery from their addresses).
async fn prometheus_for(pods: &[Pod], port: u16) -> Prometheus {
    let prom = Prometheus::start(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  \
         - job_name: marklb-operator\n    scrape_interval: 1s\n    file_sd_configs:\n      \
         - files: [operator.json]\n        refresh_interval: 1s\n",
    )
    .unwrap();
    let groups: Vec<(Vec<String>, Value)> = pods
        .iter()
        .map(|p| {
            let ip = p.status.as_ref().unwrap().pod_ip.clone().unwrap();
            (
                vec![format!("{ip}:{port}")],
                json!({"pod": p.metadata.name.clone().unwrap()}),
            )
        })
        .collect();
    prom.write_file_sd("operator.json", &groups).unwrap();
    prom
}

/// Polls `promql` until `check` accepts its result vector.
async fn eventually_query(
    prom: &Prometheus,
    promql: &str,
    check: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let started = Instant::now();
    loop {
        let got = prom
            .query(promql)
            .unwrap_or_else(|e| panic!("{promql}: {e:#}"));
        let v = got.as_array().cloned().unwrap_or_default();
        if check(&v) {
            return v;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{promql}: {v:?} after 60 s; targets: {:?}; log: {}",
            prom.api("targets").ok(),
            prom.log_tail(10)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn value(sample: &Value) -> f64 {
    sample["value"][1].as_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_install_runs_the_operator_and_prometheus_scrapes_it() {
    let cluster = cluster_or_skip!();
    let _serial = SERIAL.lock().await;
    import_operator_image(cluster);
    user(cluster, "kubectl apply -k deploy/legacy-1.20/");
    let pods = wait_operator(cluster, 2, None).await;
    // Not root: the kubelet ran the image's user (65532), as the Deployment demands.
    let uids = operator_uids();
    assert_eq!(uids.len(), 2, "two operator processes: {uids:?}");
    assert!(
        uids.iter().all(|&(r, e)| r == 65532 && e == 65532),
        "{uids:?}"
    );
    // A real Prometheus scrapes both replicas.
    let prom = prometheus_for(&pods, 8080).await;
    let up = eventually_query(&prom, "up{job=\"marklb-operator\"}", |v| {
        v.len() == 2 && v.iter().all(|s| value(s) == 1.0)
    })
    .await;
    let scraped: BTreeSet<String> = up
        .iter()
        .map(|s| s["metric"]["pod"].as_str().unwrap().to_string())
        .collect();
    let pod_names: BTreeSet<String> = pods
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(scraped, pod_names, "every replica, labelled with its pod");
    // Exactly one leader; the standby says 0.
    let leaders = eventually_query(&prom, "marklb_operator_leader", |v| {
        v.len() == 2 && v.iter().map(value).sum::<f64>() == 1.0
    })
    .await;
    report(&format!(
        "  leader gauge per replica: {:?}",
        leaders.iter().map(value).collect::<Vec<_>>()
    ));
    // The leader's condition gauges: no LoadBalancer yet, so every count is 0.
    let gauges = eventually_query(
        &prom,
        "marklb_operator_loadbalancers{condition=\"Ready\"}",
        |v| !v.is_empty(),
    )
    .await;
    assert!(gauges.iter().all(|s| value(s) == 0.0), "{gauges:?}");
    drop(prom);
    user(cluster, README_ON_CLUSTER[0]);
    wait_nothing_left(cluster, "kubectl delete -k").await;
    assert!(operator_uids().is_empty(), "operator processes left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_installs_upgrades_and_uninstalls() {
    let cluster = cluster_or_skip!();
    let _serial = SERIAL.lock().await;
    import_operator_image(cluster);
    let out = user(cluster, README_ON_CLUSTER[1]);
    assert!(out.contains("STATUS: deployed"), "{out}");
    wait_operator(cluster, 2, None).await;
    // The CRDs of the cluster's version (1.20: the legacy ones, without CEL).
    let crd = cluster
        .kubectl_ok(&["get", "crd", "loadbalancers.marklb.io", "-o", "json"])
        .unwrap();
    assert!(
        !crd.contains("x-kubernetes-validations"),
        "1.20 got the CEL CRDs"
    );
    // An agent setting changes the operator's flags: the Deployment rolls to them.
    let out = user(cluster, README_ON_CLUSTER[2]);
    assert!(out.contains("REVISION: 2"), "{out}");
    wait_operator(cluster, 2, Some("--agent-xdp-mode=generic")).await;
    let out = user(cluster, README_ON_CLUSTER[3]);
    assert!(out.contains("uninstalled"), "{out}");
    wait_nothing_left(cluster, "helm uninstall").await;
    // Helm leaves the namespace it created; the next install path starts without it.
    cluster
        .kubectl_ok(&["delete", "namespace", NS, "--timeout=90s"])
        .expect("deleting the namespace");
}
