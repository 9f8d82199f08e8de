//! The real API servers of `kube_harness` (built by scripts/setup-k8s.sh): they start, serve what
//! they promise, and leave nothing behind. Each test prints SKIP with the reason (and returns)
//! only when the set-up recorded the server as unavailable on this machine.

use std::time::Duration;

use futures::TryStreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use marklb_tests::kube_harness::{self, Flavor, KubeServer, apply_yaml, install_crds, report};
use marklb_tests::kube_server_or_skip;
use serde_json::json;

/// A small CRD of our own: status subresource, defaults, a schema rule and a CEL rule.
const WIDGET_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.harness.marklb.io
spec:
  group: harness.marklb.io
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, listKind: WidgetList}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [min, max]
            x-kubernetes-validations:
            - rule: "self.min <= self.max"
              message: "min must not exceed max"
            properties:
              min: {type: integer, minimum: 0}
              max: {type: integer}
              mode: {type: string, default: Fast, enum: [Fast, Slow]}
          status:
            type: object
            properties:
              observed: {type: integer}
"#;

/// The widget CRD for `flavor`: 1.20 does not know `x-kubernetes-validations` (server-side apply
/// refuses the field), so its variant has no CEL block, as marklb's own legacy-1.20 CRDs.
fn widget_crd(flavor: Flavor) -> String {
    match flavor {
        Flavor::Current => WIDGET_CRD.to_string(),
        Flavor::Kube120 => WIDGET_CRD
            .lines()
            .filter(|l| {
                !l.contains("x-kubernetes-validations")
                    && !l.contains("rule: ")
                    && !l.contains("message: ")
            })
            .map(|l| format!("{l}\n"))
            .collect(),
    }
}

fn widget(name: &str, min: i64, max: i64) -> serde_json::Value {
    json!({
        "apiVersion": "harness.marklb.io/v1",
        "kind": "Widget",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"min": min, "max": max},
    })
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

async fn start_and_clean_up(flavor: Flavor, expect_version: &str) {
    let server = kube_server_or_skip!(flavor);
    let client = server.client().await.unwrap();
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(version.git_version, expect_version, "{flavor}: /version");
    report(&format!(
        "{flavor}: {} ready in {:.2} s, etcd + server RSS {} MiB, {}",
        version.git_version,
        server.startup().as_secs_f64(),
        server.rss_kib() / 1024,
        server.url()
    ));
    let pids = server.pids();
    let dir = server.dir().to_path_buf();
    assert_eq!(pids.len(), 2);
    assert!(pids.iter().all(|&p| pid_alive(p)));
    assert!(server.kubeconfig().is_file());
    server.stop();
    for pid in pids {
        assert!(!pid_alive(pid), "process {pid} still running after stop");
    }
    assert!(!dir.exists(), "{} not removed", dir.display());
}

#[tokio::test]
async fn kube120_starts_reports_version_and_cleans_up() {
    start_and_clean_up(Flavor::Kube120, "v1.20.2").await;
}

#[tokio::test]
async fn current_starts_reports_version_and_cleans_up() {
    let server = kube_server_or_skip!(Flavor::Current);
    let expect = server
        .client()
        .await
        .unwrap()
        .apiserver_version()
        .await
        .unwrap();
    assert!(
        expect.git_version.starts_with("v1.") && expect.minor.parse::<u32>().unwrap() >= 30,
        "current server version {expect:?}"
    );
    drop(server);
    start_and_clean_up(Flavor::Current, &expect.git_version).await;
}

/// A panicking test still stops the servers and removes the directory (Drop during unwinding).
#[tokio::test]
async fn cleanup_happens_when_a_test_panics() {
    let server = kube_server_or_skip!(Flavor::Current);
    let pids = server.pids();
    let dir = server.dir().to_path_buf();
    let result = tokio::spawn(async move {
        let _server = server;
        panic!("deliberate failure inside a test");
    })
    .await;
    assert!(result.unwrap_err().is_panic());
    for pid in pids {
        assert!(!pid_alive(pid), "process {pid} survived a panicking test");
    }
    assert!(!dir.exists());
}

/// Two servers at once get their own ports and directories.
#[tokio::test]
async fn servers_run_side_by_side() {
    let a = kube_server_or_skip!(Flavor::Current);
    let b = kube_server_or_skip!(Flavor::Current);
    assert_ne!(a.url(), b.url());
    assert_ne!(a.dir(), b.dir());
    for s in [&a, &b] {
        s.client().await.unwrap().apiserver_version().await.unwrap();
    }
}

/// Own CRD on both servers: server-side apply, defaulting, status subresource, watch; the CEL
/// rule is enforced by the current server and (documented limit) ignored by 1.20.
async fn crd_round_trip(flavor: Flavor) {
    let server = kube_server_or_skip!(flavor);
    let client = server.client().await.unwrap();
    let names = install_crds(&client, &widget_crd(flavor)).await.unwrap();
    assert_eq!(names, ["widgets.harness.marklb.io"]);

    let applied = apply_yaml(
        &client,
        &serde_yaml::to_string(&widget("a", 1, 3)).unwrap(),
        "harness-test",
    )
    .await
    .unwrap();
    assert_eq!(applied[0].data["spec"]["mode"], "Fast", "default applied");
    let managers: Vec<_> = applied[0]
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .map(|m| (m.manager.clone(), m.operation.clone()))
        .collect();
    assert!(
        managers.contains(&(Some("harness-test".into()), Some("Apply".into()))),
        "server-side apply managed fields: {managers:?}"
    );

    let api = kube_harness::api_for(&client, &widget("a", 1, 3))
        .await
        .unwrap();
    // Status only through the subresource.
    let status =
        json!({"apiVersion": "harness.marklb.io/v1", "kind": "Widget", "status": {"observed": 7}});
    api.patch_status(
        "a",
        &PatchParams::apply("harness-status").force(),
        &Patch::Apply(&status),
    )
    .await
    .unwrap();
    let got = api.get("a").await.unwrap();
    assert_eq!(got.data["status"]["observed"], 7);
    // A status in the main resource is ignored.
    let mut with_status = widget("a", 1, 3);
    with_status["status"] = json!({"observed": 99});
    let got: DynamicObject = api
        .patch(
            "a",
            &PatchParams::apply("harness-test").force(),
            &Patch::Apply(&with_status),
        )
        .await
        .unwrap();
    assert_eq!(got.data["status"]["observed"], 7);

    // Watch sees a new object.
    let stream = watcher(
        api.clone(),
        watcher::Config::default().fields("metadata.name=b"),
    );
    let mut stream = Box::pin(stream);
    let created = tokio::spawn({
        let client = client.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            apply_yaml(
                &client,
                &serde_yaml::to_string(&widget("b", 2, 2)).unwrap(),
                "harness-test",
            )
            .await
            .unwrap();
        }
    });
    let seen = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(ev) = stream.try_next().await.unwrap() {
            if let watcher::Event::Apply(o) | watcher::Event::InitApply(o) = ev
                && o.metadata.name.as_deref() == Some("b")
            {
                return o;
            }
        }
        panic!("watch ended")
    })
    .await
    .expect("watch event for b");
    assert_eq!(seen.data["spec"]["min"], 2);
    created.await.unwrap();

    // Schema validation (minimum) on both servers.
    let err = api
        .create(
            &PostParams::default(),
            &serde_json::from_value(widget("neg", -1, 3)).unwrap(),
        )
        .await
        .expect_err("minimum: 0");
    assert!(format!("{err}").contains("spec.min"), "{err}");

    // CEL.
    let cel = api
        .create(
            &PostParams::default(),
            &serde_json::from_value(widget("inverted", 5, 1)).unwrap(),
        )
        .await;
    match flavor {
        Flavor::Current => {
            let err = cel.expect_err("CEL rule must reject min > max");
            assert!(
                format!("{err}").contains("min must not exceed max"),
                "{err}"
            );
        }
        Flavor::Kube120 => {
            cel.expect("1.20 has no CRD CEL rules: accepted");
        }
    }
    drop(stream);
}

#[tokio::test]
async fn kube120_crd_apply_status_watch() {
    crd_round_trip(Flavor::Kube120).await;
}

#[tokio::test]
async fn current_crd_apply_status_watch_and_cel() {
    crd_round_trip(Flavor::Current).await;
}

/// kube-apiserver 1.20 serves the built-in groups the operator and agent use, and evaluates RBAC
/// with the real authorizer.
#[tokio::test]
async fn kube120_core_apps_coordination_rbac() {
    let server = kube_server_or_skip!(Flavor::Kube120);
    let client = server.client().await.unwrap();

    let ns = "marklb-system";
    let docs = format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{name: {ns}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: marklb-agent, namespace: {ns}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: marklb-agent, namespace: {ns}}}
rules:
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  verbs: [get, list, watch, create, update]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: marklb-agent, namespace: {ns}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: marklb-agent}}
subjects:
- {{kind: ServiceAccount, name: marklb-agent, namespace: {ns}}}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {{name: marklb-agent, namespace: {ns}}}
spec:
  selector: {{matchLabels: {{app: marklb-agent}}}}
  template:
    metadata: {{labels: {{app: marklb-agent}}}}
    spec:
      serviceAccountName: marklb-agent
      hostNetwork: true
      containers:
      - name: agent
        image: marklb/agent:test
        securityContext: {{privileged: true}}
---
apiVersion: coordination.k8s.io/v1
kind: Lease
metadata: {{name: marklb-operator, namespace: {ns}}}
spec: {{holderIdentity: test, leaseDurationSeconds: 15}}
"#
    );
    let applied = apply_yaml(&client, &docs, "marklb-tests").await.unwrap();
    assert_eq!(applied.len(), 6);

    let nss: Api<Namespace> = Api::all(client.clone());
    assert!(nss.get(ns).await.is_ok());
    let ds: Api<DaemonSet> = Api::namespaced(client.clone(), ns);
    let ds = ds.get("marklb-agent").await.unwrap();
    assert_eq!(
        ds.spec.unwrap().template.spec.unwrap().containers[0]
            .image
            .as_deref(),
        Some("marklb/agent:test")
    );
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    assert_eq!(
        leases
            .get("marklb-operator")
            .await
            .unwrap()
            .spec
            .unwrap()
            .holder_identity
            .as_deref(),
        Some("test")
    );

    // The real RBAC authorizer, through SubjectAccessReview.
    let sa_user = format!("system:serviceaccount:{ns}:marklb-agent");
    let review = |verb: &str, resource: &str, namespace: &str| SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(sa_user.clone()),
            groups: Some(vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{ns}"),
            ]),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                resource: Some(resource.into()),
                group: Some(if resource == "leases" {
                    "coordination.k8s.io".into()
                } else {
                    String::new()
                }),
                namespace: Some(namespace.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let sars: Api<SubjectAccessReview> = Api::all(client.clone());
    for (verb, resource, namespace, allowed) in [
        ("update", "leases", ns, true),
        ("delete", "leases", ns, false),
        ("get", "leases", "default", false),
        ("list", "secrets", ns, false),
    ] {
        let r = sars
            .create(&PostParams::default(), &review(verb, resource, namespace))
            .await
            .unwrap();
        assert_eq!(
            r.status.unwrap().allowed,
            allowed,
            "{sa_user} {verb} {resource} in {namespace}"
        );
    }

    // The same through kubectl with impersonation (the kubeconfig works for kubectl).
    match server.kubectl(&[
        "auth",
        "can-i",
        "update",
        "leases.coordination.k8s.io",
        "-n",
        ns,
        &format!("--as={sa_user}"),
    ]) {
        Some(out) => {
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                "yes",
                "kubectl auth can-i: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let out = server
                .kubectl(&[
                    "auth",
                    "can-i",
                    "delete",
                    "daemonsets.apps",
                    "-n",
                    ns,
                    &format!("--as={sa_user}"),
                ])
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "no");
        }
        None => {
            report("SKIP kubectl part of kube120_core_apps_coordination_rbac: no kubectl in PATH")
        }
    }
}

/// kubectl works with the kubeconfig file against both servers (discovery included).
#[tokio::test]
async fn kubectl_uses_the_kubeconfig() {
    for flavor in [Flavor::Kube120, Flavor::Current] {
        let server = kube_server_or_skip!(flavor);
        let client = server.client().await.unwrap();
        install_crds(&client, &widget_crd(flavor)).await.unwrap();
        let Some(out) = server.kubectl(&["api-resources", "-o", "name"]) else {
            report("SKIP kubectl_uses_the_kubeconfig: no kubectl in PATH");
            return;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{flavor}: kubectl api-resources: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("widgets.harness.marklb.io"),
            "{flavor}: {text}"
        );
        assert!(text.contains("customresourcedefinitions.apiextensions.k8s.io"));
        if flavor == Flavor::Kube120 {
            assert!(text.contains("daemonsets.apps"), "{text}");
        }
    }
}

/// Server objects can be listed through discovery-free typed APIs too (sanity for kube-rs).
#[tokio::test]
async fn kube120_lists_namespaces() {
    let server = kube_server_or_skip!(Flavor::Kube120);
    let nss: Api<Namespace> = Api::all(server.client().await.unwrap());
    let names: Vec<String> = nss
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    for want in ["default", "kube-system", "kube-public"] {
        assert!(names.iter().any(|n| n == want), "{names:?}");
    }
    assert_eq!(KubeServer::pids(&server).len(), 2);
}

/// The KUBECONFIG-gated end-to-end entry point falls back to a local 1.20 server.
#[tokio::test]
async fn e2e_cluster_falls_back_to_a_local_server() {
    use marklb_tests::kube_harness::TestCluster;
    let Some(cluster) = TestCluster::from_env_or_local(Flavor::Kube120, module_path!()).await
    else {
        return;
    };
    let client = cluster.client();
    let version = client.apiserver_version().await.unwrap();
    if let Some(local) = cluster.local() {
        assert_eq!(version.git_version, "v1.20.2");
        assert_eq!(cluster.kubeconfig(), local.kubeconfig());
    }
    assert!(cluster.kubeconfig().is_file());
}
