//! The install paths, rendered by the real tools and checked object by object, without a
//! cluster (one 1.20 API server for the authorizer):
//!
//! - `deploy/` and `deploy/legacy-1.20/` render with kubectl 1.20's kustomize into exactly the
//!   generator's objects (`marklb-operator manifests`, the CRDs of `crdgen`) plus the metrics
//!   Services, every object parsed strictly; the example LoadBalancer is valid.
//! - The chart lints with `--strict` and renders for Kubernetes 1.20, 1.30, 1.31 and a current
//!   version, with default and other values, with and without the Prometheus operator's API:
//!   every object strict, CRDs byte-equal to the generated variant the version needs, RBAC equal
//!   to the generator's rules, the operator Deployment equal to the generator's (for the same
//!   settings), monitoring objects equal to `monitoring/`.
//! - Values that violate `values.schema.json` are refused with the offending key.
//! - RBAC is least privilege under the real authorizer of kube-apiserver 1.20 (`kubectl auth
//!   can-i --as=system:serviceaccount:...` after `kubectl apply -k deploy/legacy-1.20/`), and
//!   the chart's objects for 1.20 pass a server-side-apply dry run there.
//!
//! Costs about 10 s (one API server, ~30 helm renders); no kubelet.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use marklb_installgen::{IMAGE_REPO, VERSION, image};
use marklb_operator::desired::{AGENT_APP_LABEL, AGENT_NAME, agent_daemonset};
use marklb_operator::manifests::{
    OPERATOR_NAME, agent_cluster_rules, operator_args, operator_cluster_rules,
    operator_namespace_rules,
};
use marklb_operator::{AgentSettings, MetricsBind, Settings};
use marklb_tests::install::*;
use marklb_tests::kube_harness::{Flavor, KubeServer, yaml_documents};
use serde_json::{Value, json};

const CURRENT: &str = "v1.33.0";
const MONITORING_API: &str = "monitoring.coreos.com/v1";

/// Labels the chart adds to every object (Helm's conventions); the generator has none.
const CHART_LABELS: &[&str] = &[
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/version",
    "helm.sh/chart",
];

fn without_chart_labels(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(labels) = v["metadata"]["labels"].as_object_mut() {
        for l in CHART_LABELS {
            labels.remove(*l);
        }
        if labels.is_empty() {
            v["metadata"].as_object_mut().unwrap().remove("labels");
        }
    }
    v
}

fn key(v: &Value) -> (String, String) {
    (
        type_of(v),
        v["metadata"]["name"].as_str().unwrap_or("").to_string(),
    )
}

/// The Services of deploy/operator/metrics-services.yaml.
fn deploy_services() -> Vec<Value> {
    let text =
        std::fs::read_to_string(repo_root().join("deploy/operator/metrics-services.yaml")).unwrap();
    yaml_documents(&text).unwrap()
}

#[test]
fn deploy_renders_with_kubectl_1_20_into_the_generated_objects() {
    for (dir, legacy) in [("deploy", false), ("deploy/legacy-1.20", true)] {
        let docs = kustomize(&repo_root().join(dir)).unwrap();
        for d in &docs {
            parse_strictly(d).unwrap_or_else(|e| panic!("{dir}: {e:#}"));
        }
        let mut want = generator_documents(legacy).unwrap();
        want.extend(deploy_services());
        let got: BTreeSet<_> = docs.iter().map(key).collect();
        let expected: BTreeSet<_> = want.iter().map(key).collect();
        assert_eq!(got, expected, "{dir}: objects");
        for w in &want {
            let (t, n) = key(w);
            let g = find(&docs, w["kind"].as_str().unwrap(), &n).unwrap();
            assert!(
                normalized(g) == normalized(w),
                "{dir}: {t} {n} differs from the generator"
            );
        }
        // The CRD variant: CEL rules only in the current one.
        let crds = docs
            .iter()
            .filter(|d| d["kind"] == "CustomResourceDefinition");
        let cel = crds
            .map(|c| c.to_string().contains("x-kubernetes-validations"))
            .collect::<Vec<_>>();
        assert_eq!(cel, vec![!legacy; 3], "{dir}");
    }
    // The metrics Services select the operator's pods and the pods of the DaemonSet the
    // operator applies, on the ports they serve.
    let (settings, op) = marklb_installgen::release_settings();
    let services = deploy_services();
    let operator_svc = find(&services, "Service", "marklb-operator-metrics").unwrap();
    let deployment = find(
        &generator_documents(true).unwrap(),
        "Deployment",
        OPERATOR_NAME,
    )
    .unwrap()
    .clone();
    assert_eq!(
        operator_svc["spec"]["selector"],
        deployment["spec"]["template"]["metadata"]["labels"]
    );
    assert_eq!(operator_svc["spec"]["ports"][0]["port"], op.metrics_port);
    let ds = serde_json::to_value(agent_daemonset(
        &settings.namespace,
        &settings.agent,
        [None],
    ))
    .unwrap();
    let agent_svc = find(&services, "Service", "marklb-agent-metrics").unwrap();
    assert_eq!(
        agent_svc["spec"]["selector"],
        ds["spec"]["template"]["metadata"]["labels"]
    );
    assert_eq!(
        agent_svc["spec"]["selector"][AGENT_APP_LABEL], AGENT_NAME,
        "{agent_svc}"
    );
    assert_eq!(
        agent_svc["spec"]["ports"][0]["port"],
        settings.agent.metrics_port
    );
    for s in &services {
        assert_eq!(s["spec"]["clusterIP"], "None", "headless: no virtual IP");
        assert_eq!(s["metadata"]["namespace"], settings.namespace);
    }
}

#[test]
fn the_example_loadbalancer_is_valid() {
    let path = repo_root().join("deploy/examples/loadbalancer.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let docs = yaml_documents(&text).unwrap();
    assert_eq!(docs.len(), 1);
    parse_strictly(&docs[0]).unwrap();
    let lb = marklb_crds::manifest::from_yaml_manifest(&text).unwrap();
    lb.spec.validate().unwrap();
}

#[test]
fn images_are_the_release_images_everywhere() {
    // deploy/ and the chart's defaults name the images scripts/image/build.sh writes
    // (`$REGISTRY/<name>:<version>`, REGISTRY defaulting to IMAGE_REPO).
    let script = std::fs::read_to_string(repo_root().join("scripts/image/build.sh")).unwrap();
    assert!(
        script.contains(&format!("REGISTRY=${{MARKLB_IMAGE_REPO:-{IMAGE_REPO}}}")),
        "build.sh's default registry is not {IMAGE_REPO}"
    );
    let chart = std::fs::read_to_string(repo_root().join("charts/marklb/Chart.yaml")).unwrap();
    let chart: Value = serde_yaml::from_str(&chart).unwrap();
    assert_eq!(chart["appVersion"], VERSION, "Chart.yaml appVersion");
    assert_eq!(chart["version"], VERSION, "Chart.yaml version");
    let docs = kustomize(&repo_root().join("deploy")).unwrap();
    let rendered = helm_template(CURRENT, &[], &[]).unwrap();
    let chart_docs: Vec<Value> = rendered.into_iter().map(|r| r.object).collect();
    for docs in [&docs, &chart_docs] {
        let d = find(docs, "Deployment", OPERATOR_NAME).unwrap();
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["image"], image("marklb-operator"));
        let agent = format!("--agent-image={}", image("marklb-agent"));
        assert!(
            c["args"].as_array().unwrap().iter().any(|a| *a == agent),
            "{}",
            c["args"]
        );
    }
}

fn rules_of(docs: &[Value], kind: &str, name: &str) -> Value {
    find(docs, kind, name).unwrap()["rules"].clone()
}

fn assert_no_wildcards(docs: &[Value], what: &str) {
    for d in docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
    {
        for rule in d["rules"].as_array().unwrap() {
            assert!(
                rule.get("nonResourceURLs").is_none(),
                "{what}: {rule} of {}",
                key(d).1
            );
            for field in ["apiGroups", "resources", "verbs"] {
                for v in rule[field].as_array().unwrap() {
                    let v = v.as_str().unwrap();
                    assert!(
                        !v.contains('*'),
                        "{what}: wildcard {v:?} in {} of {}",
                        field,
                        key(d).1
                    );
                }
            }
        }
    }
}

/// The settings a values file describes (what the operator would run with).
fn settings_for(values: &Value) -> (Settings, String, u16) {
    let a = &values["agent"];
    let s = |v: &Value| v.as_str().unwrap().to_string();
    let tag = |img: &Value| {
        format!(
            "{}:{}",
            s(&img["repository"]),
            if img["tag"] == "" {
                VERSION.to_string()
            } else {
                s(&img["tag"])
            }
        )
    };
    let optional = |v: &Value| Some(s(v)).filter(|v| !v.is_empty());
    let settings = Settings {
        namespace: "marklb-system".into(),
        agent: AgentSettings {
            image: tag(&a["image"]),
            image_pull_policy: s(&a["image"]["pullPolicy"]),
            hw_backend: s(&a["hwBackend"]),
            mark_delivery: optional(&a["markDelivery"]),
            xdp_mode: optional(&a["xdpMode"]),
            metrics_port: a["metricsPort"].as_u64().unwrap() as u16,
            metrics_bind: MetricsBind::parse(a["metricsBind"].as_str().unwrap()).unwrap(),
            log_level: s(&a["logLevel"]),
            tolerations: serde_json::from_value(a["tolerations"].clone()).unwrap(),
            ..AgentSettings::default()
        },
        cleanup_timeout: std::time::Duration::from_secs(
            values["operator"]["cleanupTimeoutSeconds"]
                .as_u64()
                .unwrap(),
        ),
        ..Settings::default()
    };
    let port = values["operator"]["metricsPort"].as_u64().unwrap() as u16;
    (settings, tag(&values["operator"]["image"]), port)
}

fn merge(base: &mut Value, extra: &Value) {
    match (base, extra) {
        (Value::Object(b), Value::Object(e)) => {
            for (k, v) in e {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, e) => *b = e.clone(),
    }
}

/// Values other than the defaults in every setting that reaches an object.
fn other_values() -> Value {
    json!({
        "crds": {"install": false},
        "operator": {
            "image": {"repository": "registry.example/team/marklb-operator", "tag": "1.2.3", "pullPolicy": "Always"},
            "replicas": 1,
            "metricsPort": 8181,
            "cleanupTimeoutSeconds": 90,
            "nodeSelector": {"node-role.kubernetes.io/control-plane": ""},
            "tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}],
        },
        "agent": {
            "image": {"repository": "registry.example/team/marklb-agent", "tag": "1.2.3", "pullPolicy": "Never"},
            "hwBackend": "emulated",
            "markDelivery": "skb-mark",
            "xdpMode": "native",
            "metricsPort": 9555,
            "metricsBind": "all",
            "logLevel": "marklb_agent=debug,info",
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "lb", "effect": "NoSchedule"}],
        },
        "metricsServices": {"enabled": true},
        "prometheus": {"podMonitors": true, "rules": false, "interval": "15s", "labels": {"release": "kube-prometheus"}},
        "grafana": {"dashboard": false, "label": "grafana_dashboard", "labelValue": "1"},
    })
}

fn default_values() -> Value {
    let text = std::fs::read_to_string(repo_root().join("charts/marklb/values.yaml")).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

fn write_values(dir: &Path, name: &str, values: &Value) -> String {
    let path = dir.join(name);
    std::fs::write(&path, serde_yaml::to_string(values).unwrap()).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn chart_lints_strictly_for_1_20_and_current() {
    let dir = tempfile::tempdir().unwrap();
    let mut other = default_values();
    merge(&mut other, &other_values());
    let file = write_values(dir.path(), "other.yaml", &other);
    for kube in ["v1.20.2", CURRENT] {
        for extra in [vec![], vec!["-f", file.as_str()]] {
            let mut args = vec!["lint", "charts/marklb", "--strict", "--kube-version", kube];
            args.extend(extra.iter().copied());
            let out = helm(&args, None).unwrap();
            let text = success(&format!("helm {}", args.join(" ")), out).unwrap();
            assert!(text.contains("0 chart(s) failed"), "{text}");
            assert!(
                !text.contains("[WARNING]") && !text.contains("[ERROR]"),
                "{text}"
            );
        }
    }
}

#[test]
fn chart_renders_the_generated_objects_for_every_version_and_values() {
    let dir = tempfile::tempdir().unwrap();
    let mut other = default_values();
    merge(&mut other, &other_values());
    let other_file = write_values(dir.path(), "other.yaml", &other);
    let alerts: Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo_root().join("monitoring/alerts.yaml")).unwrap(),
    )
    .unwrap();
    let dashboard = std::fs::read_to_string(repo_root().join("monitoring/dashboard.json")).unwrap();
    let mut cases = Vec::new();
    for kube in ["v1.20.2", "v1.30.4", "v1.31.0", CURRENT] {
        for apis in [vec![], vec![MONITORING_API]] {
            for (values, extra) in [
                (default_values(), vec![]),
                (other.clone(), vec!["-f", other_file.as_str()]),
            ] {
                cases.push((kube, apis.clone(), values, extra));
            }
        }
    }
    assert_eq!(cases.len(), 16);
    // Helm runs in two processes at a time (each loads the engine: ~0.7 s).
    let rendered: Vec<Vec<Value>> = std::thread::scope(|scope| {
        let workers: Vec<_> = cases
            .chunks(cases.len() / 2)
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .iter()
                        .map(|(kube, apis, _, extra)| {
                            helm_template(kube, apis, extra)
                                .unwrap_or_else(|e| panic!("{kube} {apis:?} {extra:?}: {e:#}"))
                                .into_iter()
                                .map(|r| r.object)
                                .collect()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    for ((kube, apis, values, extra), docs) in cases.iter().zip(rendered) {
        let legacy = *kube < "v1.31";
        {
            {
                let what = format!("{kube} apis={apis:?} values={extra:?}");
                for d in &docs {
                    parse_strictly(d).unwrap_or_else(|e| panic!("{what}: {e:#}"));
                    if d["kind"] != "ClusterRole"
                        && d["kind"] != "ClusterRoleBinding"
                        && d["kind"] != "CustomResourceDefinition"
                    {
                        assert_eq!(d["metadata"]["namespace"], "marklb-system", "{what}");
                    }
                    for l in CHART_LABELS {
                        if d["kind"] != "CustomResourceDefinition" {
                            assert!(
                                d["metadata"]["labels"].get(*l).is_some(),
                                "{what}: {l} on {:?}",
                                key(d)
                            );
                        }
                    }
                }
                // CRDs: the generated variant this version needs, byte for byte as objects.
                let crds: Vec<&Value> = docs
                    .iter()
                    .filter(|d| d["kind"] == "CustomResourceDefinition")
                    .collect();
                if values["crds"]["install"] == true {
                    let want: Vec<Value> = generator_documents(legacy)
                        .unwrap()
                        .into_iter()
                        .filter(|d| d["kind"] == "CustomResourceDefinition")
                        .collect();
                    let mut got: Vec<Value> = crds.into_iter().map(normalized).collect();
                    got.sort_by_key(key);
                    let mut want: Vec<Value> = want.iter().map(normalized).collect();
                    want.sort_by_key(key);
                    assert!(
                        got == want,
                        "{what}: the CRDs differ from the generated ones"
                    );
                } else {
                    assert!(crds.is_empty(), "{what}: crds.install=false");
                }
                // RBAC: the generator's rules, no wildcards, bound to the right accounts.
                assert_no_wildcards(&docs, &what);
                assert_eq!(
                    rules_of(&docs, "ClusterRole", OPERATOR_NAME),
                    operator_cluster_rules(),
                    "{what}"
                );
                assert_eq!(
                    rules_of(&docs, "Role", OPERATOR_NAME),
                    operator_namespace_rules(),
                    "{what}"
                );
                assert_eq!(
                    rules_of(&docs, "ClusterRole", AGENT_NAME),
                    agent_cluster_rules(),
                    "{what}"
                );
                let generated = generator_documents(legacy).unwrap();
                for (kind, name) in [
                    ("ClusterRoleBinding", OPERATOR_NAME),
                    ("ClusterRoleBinding", AGENT_NAME),
                    ("RoleBinding", OPERATOR_NAME),
                    ("ServiceAccount", OPERATOR_NAME),
                    ("ServiceAccount", AGENT_NAME),
                ] {
                    assert_eq!(
                        without_chart_labels(find(&docs, kind, name).unwrap()),
                        *find(&generated, kind, name).unwrap(),
                        "{what}: {kind} {name}"
                    );
                }
                // The operator Deployment: the generator's for the same settings.
                let (settings, operator_image, port) = settings_for(values);
                let d = find(&docs, "Deployment", OPERATOR_NAME).unwrap();
                let pod = &d["spec"]["template"]["spec"];
                let c = &pod["containers"][0];
                assert_eq!(c["image"], operator_image, "{what}");
                assert_eq!(
                    c["args"],
                    json!(operator_args(&settings, port)),
                    "{what}: operator args"
                );
                assert_eq!(d["spec"]["replicas"], values["operator"]["replicas"]);
                assert_eq!(c["ports"][0]["containerPort"], port);
                if extra.is_empty() {
                    assert_eq!(
                        without_chart_labels(d),
                        *find(&generated, "Deployment", OPERATOR_NAME).unwrap(),
                        "{what}: the Deployment of `marklb-operator manifests`"
                    );
                } else {
                    assert_eq!(pod["nodeSelector"], values["operator"]["nodeSelector"]);
                    assert_eq!(pod["tolerations"], values["operator"]["tolerations"]);
                    assert_eq!(c["imagePullPolicy"], "Always");
                }
                // Metrics Services: deploy/'s, on the configured ports.
                for s in deploy_services() {
                    let mut want = s.clone();
                    let name = key(&s).1;
                    want["spec"]["ports"][0]["port"] = if name.contains("agent") {
                        values["agent"]["metricsPort"].clone()
                    } else {
                        json!(port)
                    };
                    assert_eq!(
                        without_chart_labels(find(&docs, "Service", &name).unwrap()),
                        want,
                        "{what}"
                    );
                }
                // Monitoring objects only where the API is served, as configured.
                let monitors: Vec<&Value> =
                    docs.iter().filter(|d| d["kind"] == "PodMonitor").collect();
                let rules: Vec<&Value> = docs
                    .iter()
                    .filter(|d| d["kind"] == "PrometheusRule")
                    .collect();
                let served = !apis.is_empty();
                assert_eq!(monitors.len(), if served { 2 } else { 0 }, "{what}");
                let want_rules = served && values["prometheus"]["rules"] == true;
                assert_eq!(rules.len(), usize::from(want_rules), "{what}");
                for m in &monitors {
                    assert_eq!(
                        m["spec"]["podMetricsEndpoints"][0]["interval"],
                        values["prometheus"]["interval"]
                    );
                    for (k, v) in values["prometheus"]["labels"].as_object().unwrap() {
                        assert_eq!(m["metadata"]["labels"][k], *v, "{what}");
                    }
                    assert_eq!(m["spec"]["jobLabel"], "app.kubernetes.io/name");
                }
                if let Some(r) = rules.first() {
                    assert_eq!(r["spec"]["groups"], alerts["groups"], "{what}: alert rules");
                }
                let dash: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "ConfigMap").collect();
                if values["grafana"]["dashboard"] == true {
                    assert_eq!(dash.len(), 1, "{what}");
                    assert_eq!(
                        dash[0]["data"]["marklb.json"],
                        dashboard.trim_end(),
                        "{what}"
                    );
                    assert_eq!(dash[0]["metadata"]["labels"]["grafana_dashboard"], "1");
                } else {
                    assert!(dash.is_empty(), "{what}");
                }
            }
        }
    }
}

#[test]
fn values_violating_the_schema_are_refused() {
    let cases = [
        ("agent.hwBackend=fpga", "/agent/hwBackend"),
        ("agent.xdpMode=turbo", "/agent/xdpMode"),
        ("agent.markDelivery=carrier-pigeon", "/agent/markDelivery"),
        ("agent.metricsBind=localhost", "/agent/metricsBind"),
        ("agent.metricsPort=70000", "/agent/metricsPort"),
        ("agent.metricsPort=http", "/agent/metricsPort"),
        ("operator.replicas=0", "/operator/replicas"),
        (
            "operator.image.pullPolicy=Sometimes",
            "/operator/image/pullPolicy",
        ),
        ("operator.image.repository=", "/operator/image/repository"),
        (
            "agent.tolerations[0].operator=Maybe",
            "/agent/tolerations/0/operator",
        ),
        (
            "agent.tolerations[0].tolerationSecond=5",
            "/agent/tolerations/0",
        ),
        ("agent.hwbackend=emulated", "/agent"),
        ("crds.install=yes-please", "/crds/install"),
        ("prometheus.interval=often", "/prometheus/interval"),
        ("unknownTopLevel=1", "unknownTopLevel"),
    ];
    let outputs: Vec<_> = std::thread::scope(|scope| {
        let workers: Vec<_> = cases
            .chunks(cases.len().div_ceil(2))
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .iter()
                        .map(|(set, _)| {
                            helm(&["template", "marklb", "charts/marklb", "--set", set], None)
                                .unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    for ((set, key), out) in cases.iter().zip(outputs) {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--set {set} was accepted");
        assert!(out.stdout.is_empty(), "--set {set}: rendered something");
        assert!(
            err.contains(key),
            "--set {set}: the error does not name {key}: {err}"
        );
    }
    // And the defaults pass.
    success(
        "helm template",
        helm(&["template", "marklb", "charts/marklb"], None).unwrap(),
    )
    .unwrap();
}

/// Whether ServiceAccount `marklb-system/<who>` may do `verb` on `resource` (`resource.group`,
/// `resource/subresource`) in `namespace` (None: cluster-wide), by the API server's authorizer
/// (a SubjectAccessReview: what `kubectl auth can-i --as=system:serviceaccount:...` asks).
async fn can_i(
    client: &kube::Client,
    who: &str,
    verb: &str,
    resource: &str,
    namespace: Option<&str>,
) -> bool {
    can_i_named(client, who, verb, resource, namespace, None).await
}

/// [`can_i`] on the one object `name` (None: any, as for list or create).
async fn can_i_named(
    client: &kube::Client,
    who: &str,
    verb: &str,
    resource: &str,
    namespace: Option<&str>,
    name: Option<&str>,
) -> bool {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
    };
    let (resource, subresource) = match resource.split_once('/') {
        Some((r, s)) => (r, Some(s.to_string())),
        None => (resource, None),
    };
    let (resource, group) = match resource.split_once('.') {
        Some((r, g)) => (r, g),
        None => (resource, ""),
    };
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(format!("system:serviceaccount:marklb-system:{who}")),
            groups: Some(vec![
                "system:serviceaccounts".into(),
                "system:serviceaccounts:marklb-system".into(),
                "system:authenticated".into(),
            ]),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                subresource,
                namespace: namespace.map(str::to_string),
                name: name.map(str::to_string),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let api: kube::Api<SubjectAccessReview> = kube::Api::all(client.clone());
    let answer = api
        .create(&kube::api::PostParams::default(), &review)
        .await
        .expect("SubjectAccessReview");
    answer.status.expect("status").allowed
}

fn kubectl(server: &KubeServer, args: &[&str], stdin: Option<&str>) -> String {
    let mut cmd = Command::new(kubectl_bin().unwrap());
    cmd.arg("--kubeconfig")
        .arg(server.kubeconfig())
        .args(args)
        .current_dir(repo_root());
    let out = match stdin {
        Some(s) => run_with_input(&mut cmd, s).unwrap(),
        None => cmd.output().unwrap(),
    };
    success(&format!("kubectl {}", args.join(" ")), out).unwrap()
}

#[tokio::test]
async fn rbac_is_least_privilege_under_the_real_1_20_authorizer() {
    let server = marklb_tests::kube_server_or_skip!(Flavor::Kube120);
    // The user's guide, command by command, as a user types them (kubectl 1.20 and `helm` on
    // PATH, KUBECONFIG set); the rest runs on the real cluster (install_cluster).
    // `kubectl apply -k deploy/` is for 1.31+: kubectl 1.20 refuses it, naming the CEL rules
    // its schema does not know (a user on 1.20 is told, not served CRDs without their rules).
    let commands = readme_commands();
    let tested: BTreeSet<String> = README_ON_API_SERVER
        .iter()
        .chain(README_ON_CLUSTER)
        .chain(README_USER_PATH)
        .chain(marklb_tests::install::README_TROUBLESHOOTING)
        .map(|c| c.to_string())
        .collect();
    let documented: BTreeSet<String> = commands.iter().cloned().collect();
    assert_eq!(
        documented, tested,
        "the README's commands are exactly those the install tests run"
    );
    let services: BTreeSet<String> =
        readme_section_commands("Use marklb for Services of type LoadBalancer")
            .into_iter()
            .collect();
    assert_eq!(
        services,
        README_SERVICES_PATH.iter().map(|c| c.to_string()).collect(),
        "the README's Services commands are exactly those services_nodes runs"
    );
    let bin = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(kubectl_bin().unwrap(), bin.path().join("kubectl")).unwrap();
    let path = format!(
        "{}:{}:{}",
        bin.path().display(),
        helm_bin().parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for command in README_ON_API_SERVER {
        let out = Command::new("bash")
            .args(["-c", command])
            .current_dir(repo_root())
            .env("PATH", &path)
            .env("KUBECONFIG", server.kubeconfig())
            .output()
            .unwrap();
        if *command == "kubectl apply -k deploy/" {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success() && err.contains("unknown field \"x-kubernetes-validations\""),
                "kubectl 1.20 accepted the CEL CRDs: {err}"
            );
            continue;
        }
        let text = success(command, out).unwrap_or_else(|e| panic!("README: {e:#}"));
        eprintln!(
            "README: {command}: {} lines of output",
            text.lines().count()
        );
    }
    let client = server.client().await.unwrap();
    // One `kubectl auth can-i` as the real command line, then SubjectAccessReviews (the same
    // question, without a process per check).
    let out = Command::new(kubectl_bin().unwrap())
        .arg("--kubeconfig")
        .arg(server.kubeconfig())
        .args([
            "auth",
            "can-i",
            "patch",
            "loadbalancernodestates.marklb.io",
            "--subresource=status",
            "-n",
            "shop",
            "--as=system:serviceaccount:marklb-system:marklb-agent",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "yes");
    // Every rule the generator gives is granted, verb by verb.
    for (who, rules, ns) in [
        (OPERATOR_NAME, operator_cluster_rules(), "shop"),
        (OPERATOR_NAME, operator_namespace_rules(), "marklb-system"),
        (AGENT_NAME, agent_cluster_rules(), "shop"),
    ] {
        for rule in rules.as_array().unwrap() {
            let group = rule["apiGroups"][0].as_str().unwrap();
            for resource in rule["resources"].as_array().unwrap() {
                let resource = resource.as_str().unwrap();
                let target = match (group, resource.split_once('/')) {
                    ("", _) => resource.to_string(),
                    (g, Some((r, sub))) => format!("{r}.{g}/{sub}"),
                    (g, None) => format!("{resource}.{g}"),
                };
                for verb in rule["verbs"].as_array().unwrap() {
                    let verb = verb.as_str().unwrap();
                    if let Some(names) = rule["resourceNames"].as_array() {
                        // Granted on those objects of its namespace only: not on another
                        // object, not on any (list), not elsewhere.
                        for name in names {
                            let name = name.as_str().unwrap();
                            assert!(
                                can_i_named(&client, who, verb, &target, Some(ns), Some(name))
                                    .await,
                                "{who} {verb} {target} {name} in {ns}"
                            );
                            assert!(
                                !can_i_named(&client, who, verb, &target, Some("shop"), Some(name))
                                    .await,
                                "{who} {verb} {target} {name} in shop"
                            );
                        }
                        for other in [Some(AGENT_NAME), Some("default"), None] {
                            assert!(
                                !can_i_named(&client, who, verb, &target, Some(ns), other).await,
                                "{who} {verb} {target} {other:?} in {ns}"
                            );
                        }
                        continue;
                    }
                    for scope in [Some(ns), None] {
                        let cluster_rule = ns == "shop";
                        assert_eq!(
                            can_i(&client, who, verb, &target, scope).await,
                            cluster_rule || scope.is_some(),
                            "{who} {verb} {target} in {scope:?}"
                        );
                    }
                }
            }
        }
    }
    // The agents: read node states, write their status; nothing else.
    let agent_denied: &[(&str, &str, Option<&str>)] = &[
        ("patch", "loadbalancernodestates.marklb.io", Some("shop")),
        ("update", "loadbalancernodestates.marklb.io", Some("shop")),
        ("create", "loadbalancernodestates.marklb.io", Some("shop")),
        ("delete", "loadbalancernodestates.marklb.io", Some("shop")),
        (
            "update",
            "loadbalancernodestates.marklb.io/status",
            Some("shop"),
        ),
        ("get", "loadbalancers.marklb.io", Some("shop")),
        ("list", "loadbalancers.marklb.io", None),
        ("patch", "loadbalancers.marklb.io/status", Some("shop")),
        ("get", "secrets", Some("marklb-system")),
        ("list", "secrets", None),
        ("get", "configmaps", Some("marklb-system")),
        ("get", "nodes", None),
        ("patch", "nodes", None),
        ("list", "pods", None),
        ("list", "endpointslices.discovery.k8s.io", None),
        ("create", "events.events.k8s.io", Some("shop")),
        ("create", "events", Some("shop")),
        ("get", "leases.coordination.k8s.io", Some("marklb-system")),
        ("patch", "daemonsets.apps", Some("marklb-system")),
        ("create", "serviceaccounts/token", Some("marklb-system")),
        ("*", "*", None),
    ];
    for (verb, resource, ns) in agent_denied {
        assert!(
            !can_i(&client, AGENT_NAME, verb, resource, *ns).await,
            "the agent can {verb} {resource} in {ns:?}"
        );
    }
    // The operator: what it needs (above) and no more.
    // It creates and deletes the LoadBalancers it owns for Services of type LoadBalancer; it
    // writes a Service's status and never the Service itself, and only reads pools.
    let operator_denied: &[(&str, &str, Option<&str>)] = &[
        ("update", "services", Some("shop")),
        ("delete", "services", Some("shop")),
        ("create", "services", Some("shop")),
        ("create", "loadbalancerippools.marklb.io", None),
        ("patch", "loadbalancerippools.marklb.io", None),
        ("delete", "namespaces", None),
        ("update", "loadbalancers.marklb.io", Some("shop")),
        ("update", "loadbalancernodestates.marklb.io", Some("shop")),
        (
            "patch",
            "loadbalancernodestates.marklb.io/status",
            Some("shop"),
        ),
        ("get", "secrets", Some("marklb-system")),
        ("list", "secrets", None),
        ("get", "configmaps", Some("marklb-system")),
        ("patch", "nodes", None),
        ("delete", "nodes", None),
        ("patch", "daemonsets.apps", Some("kube-system")),
        ("create", "daemonsets.apps", Some("shop")),
        ("delete", "daemonsets.apps", Some("marklb-system")),
        ("list", "pods", Some("shop")),
        ("delete", "pods", Some("marklb-system")),
        ("create", "pods", Some("marklb-system")),
        ("patch", "leases.coordination.k8s.io", Some("kube-system")),
        ("delete", "events.events.k8s.io", Some("shop")),
        ("create", "endpointslices.discovery.k8s.io", Some("shop")),
        ("create", "serviceaccounts/token", Some("marklb-system")),
        // Its own ServiceAccount, the DaemonSets' owner, it may only read (above), never
        // change, list or delete; blockOwnerDeletion is not set, so no finalizers right.
        ("list", "serviceaccounts", Some("marklb-system")),
        ("watch", "serviceaccounts", Some("marklb-system")),
        ("update", "serviceaccounts", Some("marklb-system")),
        ("patch", "serviceaccounts", Some("marklb-system")),
        ("delete", "serviceaccounts", Some("marklb-system")),
        ("create", "serviceaccounts", Some("marklb-system")),
        ("get", "serviceaccounts", None),
        ("escalate", "clusterroles.rbac.authorization.k8s.io", None),
        ("bind", "clusterroles.rbac.authorization.k8s.io", None),
        ("patch", "clusterroles.rbac.authorization.k8s.io", None),
        ("*", "*", None),
    ];
    for (verb, resource, ns) in operator_denied {
        assert!(
            !can_i(&client, OPERATOR_NAME, verb, resource, *ns).await,
            "the operator can {verb} {resource} in {ns:?}"
        );
    }
    // Named: the operator reads its ServiceAccount and changes nothing of it; the agent not
    // even that.
    let sa = Some(OPERATOR_NAME);
    for verb in ["update", "patch", "delete"] {
        assert!(
            !can_i_named(
                &client,
                OPERATOR_NAME,
                verb,
                "serviceaccounts",
                Some("marklb-system"),
                sa
            )
            .await,
            "the operator can {verb} its ServiceAccount"
        );
    }
    assert!(
        !can_i_named(
            &client,
            AGENT_NAME,
            "get",
            "serviceaccounts",
            Some("marklb-system"),
            sa
        )
        .await,
        "the agent can read the operator's ServiceAccount"
    );
    // Everything the chart renders for 1.20 is accepted there by server-side apply (which
    // refuses fields 1.20 does not know), and the example LoadBalancer is created.
    let chart: String = helm_template("v1.20.2", &[], &[])
        .unwrap()
        .into_iter()
        .map(|r| format!("---\n{}\n", serde_json::to_string(&r.object).unwrap()))
        .collect();
    let out = kubectl(
        &server,
        &[
            "apply",
            "--server-side",
            "--dry-run=server",
            "--field-manager=helm",
            "-f",
            "-",
        ],
        Some(&chart),
    );
    assert!(
        out.contains("deployment.apps/marklb-operator serverside-applied"),
        "{out}"
    );
    let lb = kubectl(
        &server,
        &["get", "mlb", "web", "-n", "default", "-o", "name"],
        None,
    );
    assert_eq!(
        lb.trim(),
        "loadbalancer.marklb.io/web",
        "the README's example is created"
    );
}

/// The shell commands of the README's user's guide (```sh blocks; comments stripped).
fn readme_commands() -> Vec<String> {
    readme_section_commands("User's guide")
}

/// The commands of the `sh` blocks of the README section whose title starts with `title`.
fn readme_section_commands(title: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let start = readme
        .find(&format!("\n## {title}"))
        .unwrap_or_else(|| panic!("a README section {title:?}"));
    let section = &readme[start + 1..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let mut out = Vec::new();
    let mut in_block = false;
    for line in section.lines() {
        if line.starts_with("```") {
            in_block = line == "```sh";
            continue;
        }
        if in_block {
            let command = line.split(" #").next().unwrap().trim();
            if !command.is_empty() {
                out.push(command.to_string());
            }
        }
    }
    out
}
