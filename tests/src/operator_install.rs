//! The operator installed on the real cluster from its OCI image, as a user does it (shared by
//! `install_cluster` and `operator_cluster`): importing the image the build made, running a
//! user's command line with kubectl 1.20 and helm on PATH, waiting for the Deployment.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use marklb_operator::manifests::OPERATOR_NAME;
use serde_json::Value;

use crate::cluster::{self, Cluster, ImageRef};
use crate::install::{helm_bin, kubectl_bin, repo_root, success};
use crate::kube_harness::report;

/// The operator's namespace in the install manifests.
pub const NS: &str = "marklb-system";

/// The operator image of the build the cluster's images came from, imported into the node.
pub fn import_operator_image(cluster: &Cluster) -> ImageRef {
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
pub fn user(cluster: &Cluster, command: &str) -> String {
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

pub fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Waits until the operator Deployment has `replicas` updated, available pods, all Ready and
/// running `want_arg` (when given); returns them. Fails with their state and logs.
pub async fn wait_operator(cluster: &Cluster, replicas: i32, want_arg: Option<&str>) -> Vec<Pod> {
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
