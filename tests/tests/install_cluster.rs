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
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use marklb_operator::manifests::OPERATOR_NAME;
use marklb_tests::cluster::{self, Cluster, ImageRef};
use marklb_tests::cluster_or_skip;
use marklb_tests::install::{README_ON_CLUSTER, helm_bin, kubectl_bin, repo_root, success};
use marklb_tests::kube_harness::report;
use marklb_tests::prometheus::Prometheus;
use serde_json::{Value, json};

const NS: &str = "marklb-system";

/// One test at a time: both install the same cluster-wide objects.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The operator image of the build the cluster's images came from, imported into the node.
fn import_operator_image(cluster: &Cluster) -> ImageRef {
    let agent = cluster::images().expect("images").agent;
    let list = agent.archive.parent().unwrap().join("images.txt");
    let text = std::fs::read_to_string(&list).expect("images.txt of scripts/image/build.sh");
    let line = text
        .lines()
        .find(|l| l.contains("/marklb-operator:"))
        .expect("the build makes the operator image");
    let w: Vec<&str> = line.split_whitespace().collect();
    let image = ImageRef {
        name: w[1].to_string(),
        archive: PathBuf::from(w[2]),
    };
    assert_eq!(image.name, marklb_installgen::image("marklb-operator"));
    cluster
        .import_image(&image)
        .expect("importing the operator image");
    image
}

/// Runs a user's command line (kubectl 1.20 and helm on PATH, the cluster's kubeconfig) from the
/// repository root; its stdout.
fn user(cluster: &Cluster, command: &str) -> String {
    let bin = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(kubectl_bin().unwrap(), bin.path().join("kubectl")).unwrap();
    let path = format!(
        "{}:{}:{}",
        bin.path().display(),
        helm_bin().parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .args(["-c", command])
        .current_dir(repo_root())
        .env("PATH", path)
        .env("KUBECONFIG", cluster.kubeconfig())
        .output()
        .unwrap();
    success(command, out).unwrap_or_else(|e| panic!("{e:#}"))
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Waits until the operator Deployment has `replicas` updated, available pods, all Ready and
/// running `want_arg` (when given); returns them. Fails with their state and logs.
async fn wait_operator(cluster: &Cluster, replicas: i32, want_arg: Option<&str>) -> Vec<Pod> {
    let client = cluster.client().await.unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    let started = Instant::now();
    loop {
        let pods = cluster
            .pods(&client, NS, "app.kubernetes.io/name=marklb-operator")
            .await
            .unwrap_or_default();
        let d = deployments.get_opt(OPERATOR_NAME).await.ok().flatten();
        let status = d
            .as_ref()
            .and_then(|d| d.status.clone())
            .unwrap_or_default();
        let running: Vec<Pod> = pods
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .cloned()
            .collect();
        let args_ok = |p: &Pod| {
            want_arg.is_none_or(|a| {
                p.spec.as_ref().is_some_and(|s| {
                    s.containers[0]
                        .args
                        .as_ref()
                        .is_some_and(|args| args.iter().any(|x| x == a))
                })
            })
        };
        if status.updated_replicas == Some(replicas)
            && status.available_replicas == Some(replicas)
            && running.len() == replicas as usize
            && running.iter().all(|p| pod_ready(p) && args_ok(p))
        {
            report(&format!(
                "  operator {replicas}/{replicas} Ready after {:.1}s",
                started.elapsed().as_secs_f64()
            ));
            return running;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let logs = cluster
                .kubectl(&[
                    "logs",
                    "-n",
                    NS,
                    "-l",
                    "app.kubernetes.io/name=marklb-operator",
                    "--tail=30",
                ])
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let state: Vec<Value> = pods
                .iter()
                .map(|p| serde_json::to_value(&p.status).unwrap())
                .collect();
            panic!(
                "operator not {replicas}/{replicas} Ready after 120 s: {status:?}\npods: {}\nlogs:\n{logs}",
                serde_json::to_string_pretty(&state).unwrap()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

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
