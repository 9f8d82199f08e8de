//! Helpers of the install tests (`install_*`, `prometheus_*`): the real renderers (kubectl
//! 1.20's kustomize, Helm 4's engine through `tests/helm/helm`), strict parsing of every
//! rendered object into its typed form, and the generator's expectations.
//!
//! Strict parsing: k8s-openapi's types ignore unknown fields, so [`strict`] deserializes,
//! serializes back and fails when anything of the input did not survive (a misspelt or
//! misplaced key, a field the type does not know). The Prometheus operator's kinds have no
//! k8s-openapi type; [`PodMonitor`] and [`PrometheusRule`] type the fields marklb uses after
//! the `monitoring.coreos.com/v1` API reference, and refuse anything else.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cluster::Cluster;
use crate::kube_harness::{cache_dir, yaml_documents};

/// The agent DaemonSet's owner references in `namespace` as `Kind/name/uid`, and what they
/// must be: the operator's ServiceAccount there, whose removal by an uninstall lets the
/// garbage collector delete the DaemonSet the operator applied.
pub fn agent_daemonset_owner(cluster: &Cluster, namespace: &str) -> (String, String) {
    let jsonpath = |kind: &str, name: &str, path: &str| {
        cluster
            .kubectl_ok(&[
                "get",
                kind,
                name,
                "-n",
                namespace,
                "-o",
                &format!("jsonpath={path}"),
            ])
            .unwrap()
            .trim()
            .to_string()
    };
    let owners = jsonpath(
        "daemonset",
        "marklb-agent",
        "{range .metadata.ownerReferences[*]}{.kind}/{.name}/{.uid}{end}",
    );
    let sa_uid = jsonpath("serviceaccount", "marklb-operator", "{.metadata.uid}");
    (owners, format!("ServiceAccount/marklb-operator/{sa_uid}"))
}

/// The README user's guide's commands that `install_manifests` runs, in this order, against
/// the 1.20 API server (no kubelet needed).
pub const README_ON_API_SERVER: &[&str] = &[
    "kubectl apply -k deploy/legacy-1.20/",
    "kubectl apply -k deploy/",
    "helm lint charts/marklb --strict --kube-version v1.20.2",
    "helm template marklb charts/marklb --namespace marklb-system --kube-version v1.20.2 --set agent.xdpMode=native",
    "kubectl apply -f deploy/examples/loadbalancer.yaml",
    "kubectl get mlb -A",
    "kubectl get mlbns -A",
    "promtool check rules monitoring/alerts.yaml",
    "cd monitoring && promtool test rules alerts.test.yaml",
];

/// The README user's guide's commands that `install_cluster` runs on the real cluster: the
/// kubectl install's removal, then the Helm story (install, a LoadBalancer on both nodes,
/// Prometheus' targets, an upgrade rolling the agents, uninstall).
pub const README_ON_CLUSTER: &[&str] = &[
    "kubectl delete -k deploy/legacy-1.20/",
    "helm install marklb charts/marklb --namespace marklb-system --create-namespace",
    "kubectl label node marklb-node-1 marklb.io/loadbalancer-node=true",
    "kubectl label node marklb-node-2 marklb.io/loadbalancer-node=true",
    "kubectl create namespace shop",
    "kubectl apply -f web.yaml",
    README_AGENT_TARGETS,
    README_OPERATOR_TARGETS,
    "helm upgrade marklb charts/marklb --namespace marklb-system --set agent.hwBackend=emulated",
    "kubectl delete mlb web -n shop",
    "helm uninstall marklb --namespace marklb-system",
    "kubectl delete namespace shop",
];

/// The agents' scrape targets as the README has a user list them: `<node> <address>` per
/// line (the agents run in the host network: the pod's address is the node's).
pub const README_AGENT_TARGETS: &str = r#"kubectl get pods -n marklb-system -l app.kubernetes.io/name=marklb-agent -o jsonpath='{range .items[*]}{.spec.nodeName} {.status.podIP}{"\n"}{end}'"#;

/// The operator replicas' scrape targets: `<pod> <address>` per line.
pub const README_OPERATOR_TARGETS: &str = r#"kubectl get pods -n marklb-system -l app.kubernetes.io/name=marklb-operator -o jsonpath='{range .items[*]}{.metadata.name} {.status.podIP}{"\n"}{end}'"#;

/// The README's troubleshooting commands, as `agent_e2e` runs them on its network-namespace
/// node (`XXXX` stands for that test's temporary directory; `install_manifests` checks the
/// README shows exactly these).
pub const README_TROUBLESHOOTING: &[&str] = &[
    "marklb-agent status --interface lb0 --bpffs /run/marklb-e2e-XXXX/bpffs --json",
    "marklb-agent status --interface lb0 --bpffs /run/marklb-e2e-XXXX/bpffs",
];

/// `command` with the test's temporary directory (`/run/marklb-e2e-<random>`) written as the
/// README writes it (`/run/marklb-e2e-XXXX`).
pub fn readme_form(command: &str) -> String {
    let mut out = String::new();
    let mut rest = command;
    while let Some(at) = rest.find("/run/marklb-e2e-") {
        let (head, tail) = rest.split_at(at + "/run/marklb-e2e-".len());
        out.push_str(head);
        out.push_str("XXXX");
        rest = tail.trim_start_matches(|c: char| c != '/');
    }
    out.push_str(rest);
    out
}

/// The README user's guide's user's path that `operator_cluster` runs on the real two-node
/// cluster (every command it runs as the user is one of these; `install_manifests` checks the
/// README shows exactly the commands of these lists).
pub const README_USER_PATH: &[&str] = &[
    "kubectl apply -k deploy/legacy-1.20/",
    "kubectl label node marklb-node-1 marklb.io/loadbalancer-node=true",
    "kubectl create namespace shop",
    "kubectl apply -f web.yaml",
    "kubectl get mlb -n shop",
    "kubectl describe mlb web -n shop",
    "kubectl get mlbns -n shop",
    "kubectl label node marklb-node-2 marklb.io/loadbalancer-node=true",
    "kubectl apply -f web-copy.yaml",
    "kubectl apply -f nowhere.yaml",
    "kubectl delete mlb web-copy nowhere -n shop",
    "kubectl apply -f api-service.yaml",
    "kubectl apply -f api.yaml",
    "kubectl delete mlb api -n shop",
    "kubectl delete mlb web -n shop",
    "kubectl delete namespace shop",
    "kubectl delete -k deploy/legacy-1.20/",
];

/// The README's Services path ("Use marklb for Services of type LoadBalancer"), which
/// `services_nodes` runs on the real three-node cluster (every command it runs as the user is
/// one of these; `install_manifests` checks that section shows exactly these).
pub const README_SERVICES_PATH: &[&str] = &[
    "kubectl apply -k deploy/legacy-1.20/",
    "kubectl apply -f pool.yaml",
    "kubectl apply -f echo.yaml",
    "kubectl apply -f web.yaml",
    "kubectl get svc web -n echo",
    "kubectl get mlbpool",
    "kubectl get mlb -n echo",
    "kubectl apply -f web-local.yaml",
    "kubectl scale deployment echo -n echo --replicas=1",
    "kubectl scale deployment echo -n echo --replicas=4",
    "kubectl apply -f web2.yaml",
    "kubectl describe svc web2 -n echo",
    "kubectl delete service web2 -n echo",
    "kubectl delete service web -n echo",
];

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// kubectl 1.20.2, extracted by the set-up (`scripts/setup-cluster.sh`).
pub fn kubectl_bin() -> Result<PathBuf> {
    let bin = cache_dir().join("node/bin/kubectl");
    if !bin.is_file() {
        bail!(
            "{} is missing: run `make setup` (scripts/setup-cluster.sh extracts kubectl 1.20)",
            bin.display()
        );
    }
    Ok(bin)
}

/// Runs `cmd` with `stdin` as its input; the output, whatever the exit status.
pub fn run_with_input(cmd: &mut Command, stdin: &str) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let mut input = child.stdin.take().expect("piped");
    let text = stdin.to_string();
    let writer = std::thread::spawn(move || input.write_all(text.as_bytes()));
    let out = child.wait_with_output()?;
    let _ = writer.join();
    Ok(out)
}

/// Fails with the command's stderr unless it succeeded; its stdout.
pub fn success(what: &str, out: Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// `kubectl kustomize <dir>` with kubectl 1.20 (kustomize v2.0.3): the documents.
pub fn kustomize(dir: &Path) -> Result<Vec<Value>> {
    let out = Command::new(kubectl_bin()?)
        .arg("kustomize")
        .arg(dir)
        .output()?;
    yaml_documents(&success(
        &format!("kubectl kustomize {}", dir.display()),
        out,
    )?)
}

/// The `helm` of the tests: `tests/helm/helm` (Helm 4's engine, PyPI `helm-python-sdk`).
pub fn helm_bin() -> PathBuf {
    repo_root().join("tests/helm/helm")
}

/// Runs `helm args...` (the kubeconfig, when given, through `KUBECONFIG`).
pub fn helm(args: &[&str], kubeconfig: Option<&Path>) -> Result<Output> {
    let mut cmd = Command::new(helm_bin());
    cmd.args(args).current_dir(repo_root());
    if let Some(k) = kubeconfig {
        cmd.env("KUBECONFIG", k);
    }
    cmd.output().with_context(
        || "running tests/helm/helm (python3 with helm-python-sdk: `bash scripts/setup.sh`)",
    )
}

/// One rendered document and the template it came from.
#[derive(Clone, Debug)]
pub struct Rendered {
    pub source: String,
    pub object: Value,
}

/// `helm template marklb charts/marklb -n marklb-system --kube-version <v> [--api-versions
/// ...] <extra>`: the documents with their templates.
pub fn helm_template(
    kube_version: &str,
    api_versions: &[&str],
    extra: &[&str],
) -> Result<Vec<Rendered>> {
    let mut args = vec![
        "template",
        "marklb",
        "charts/marklb",
        "--namespace",
        "marklb-system",
        "--kube-version",
        kube_version,
    ];
    for a in api_versions {
        args.extend(["--api-versions", a]);
    }
    args.extend_from_slice(extra);
    let text = success(&format!("helm {}", args.join(" ")), helm(&args, None)?)?;
    // `# Source: <template>` heads the output of each template (which may hold several
    // documents).
    let mut out = Vec::new();
    let mut sections: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if let Some(source) = line.strip_prefix("# Source: ") {
            sections.push((source.to_string(), String::new()));
        } else if let Some((_, body)) = sections.last_mut() {
            body.push_str(line);
            body.push('\n');
        } else if !line.trim().is_empty() && line != "---" {
            bail!("output before the first `# Source:`: {line}");
        }
    }
    for (source, body) in sections {
        for object in yaml_documents(&body)? {
            out.push(Rendered {
                source: source.clone(),
                object,
            });
        }
    }
    Ok(out)
}

/// Paths present in `given` whose value is absent or different in `back` (what a typed round
/// trip lost or changed).
pub fn lost_fields(given: &Value, back: &Value, path: &str, out: &mut Vec<String>) {
    match (given, back) {
        (Value::Object(g), Value::Object(b)) => {
            for (k, v) in g {
                match b.get(k) {
                    Some(bv) => lost_fields(v, bv, &format!("{path}.{k}"), out),
                    None if v.is_null() => {}
                    None => out.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(g), Value::Array(b)) if g.len() == b.len() => {
            for (i, (gv, bv)) in g.iter().zip(b).enumerate() {
                lost_fields(gv, bv, &format!("{path}[{i}]"), out);
            }
        }
        (Value::Number(g), Value::Number(b)) if g.as_f64() == b.as_f64() => {}
        (g, b) if g == b => {}
        _ => out.push(format!("{path}: {given} became {back}")),
    }
}

/// `value` as a `T`, refusing any field `T` does not know (see the module docs).
pub fn strict<T: DeserializeOwned + Serialize>(value: &Value) -> Result<T> {
    let typed: T = serde_json::from_value(value.clone())?;
    let back = serde_json::to_value(&typed)?;
    let mut lost = Vec::new();
    lost_fields(value, &back, "", &mut lost);
    if !lost.is_empty() {
        bail!("unknown or misplaced fields: {}", lost.join(", "));
    }
    Ok(typed)
}

/// `monitoring.coreos.com/v1` PodMonitor: the fields marklb renders (API reference of the
/// Prometheus operator); anything else is refused.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodMonitor {
    pub api_version: String,
    pub kind: String,
    pub metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    pub spec: PodMonitorSpec,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodMonitorSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_label: Option<String>,
    pub selector: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    pub pod_metrics_endpoints: Vec<PodMetricsEndpoint>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodMetricsEndpoint {
    pub port: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relabelings: Vec<RelabelConfig>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RelabelConfig {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_labels: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_label: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replacement: Option<String>,
}

/// `monitoring.coreos.com/v1` PrometheusRule (the rule groups are Prometheus' own format).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrometheusRule {
    pub api_version: String,
    pub kind: String,
    pub metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    pub spec: PrometheusRuleSpec,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrometheusRuleSpec {
    pub groups: Vec<RuleGroup>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleGroup {
    pub name: String,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub alert: String,
    pub expr: String,
    #[serde(rename = "for", skip_serializing_if = "Option::is_none")]
    pub for_: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// `v` with every number as a float: YAML writers differ in `1280` vs `1280.0`, which the API
/// server reads alike.
pub fn normalized(v: &Value) -> Value {
    match v {
        Value::Number(n) => n
            .as_f64()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .unwrap_or_else(|| v.clone()),
        Value::Array(a) => Value::Array(a.iter().map(normalized).collect()),
        Value::Object(o) => {
            Value::Object(o.iter().map(|(k, v)| (k.clone(), normalized(v))).collect())
        }
        other => other.clone(),
    }
}

/// The kind of a document, `apiVersion/kind`.
pub fn type_of(v: &Value) -> String {
    format!(
        "{}/{}",
        v["apiVersion"].as_str().unwrap_or("?"),
        v["kind"].as_str().unwrap_or("?")
    )
}

/// Parses `v` strictly as the typed object of its kind; fails on a kind marklb does not ship.
pub fn parse_strictly(v: &Value) -> Result<()> {
    let t = type_of(v);
    let r = match t.as_str() {
        "v1/Namespace" => strict::<Namespace>(v).map(drop),
        "v1/ServiceAccount" => strict::<ServiceAccount>(v).map(drop),
        "v1/Service" => strict::<Service>(v).map(drop),
        "v1/ConfigMap" => strict::<ConfigMap>(v).map(drop),
        "apps/v1/Deployment" => strict::<Deployment>(v).map(drop),
        "coordination.k8s.io/v1/Lease" => {
            strict::<k8s_openapi::api::coordination::v1::Lease>(v).map(drop)
        }
        "rbac.authorization.k8s.io/v1/ClusterRole" => strict::<ClusterRole>(v).map(drop),
        "rbac.authorization.k8s.io/v1/ClusterRoleBinding" => {
            strict::<ClusterRoleBinding>(v).map(drop)
        }
        "rbac.authorization.k8s.io/v1/Role" => strict::<Role>(v).map(drop),
        "rbac.authorization.k8s.io/v1/RoleBinding" => strict::<RoleBinding>(v).map(drop),
        "apiextensions.k8s.io/v1/CustomResourceDefinition" => {
            strict::<CustomResourceDefinition>(v).map(drop)
        }
        "marklb.io/v1alpha1/LoadBalancer" => strict::<marklb_crds::LoadBalancer>(v).map(drop),
        "monitoring.coreos.com/v1/PodMonitor" => strict::<PodMonitor>(v).map(drop),
        "monitoring.coreos.com/v1/PrometheusRule" => strict::<PrometheusRule>(v).map(drop),
        other => Err(anyhow!("a kind marklb does not ship: {other}")),
    };
    r.with_context(|| format!("{t} {}", v["metadata"]["name"].as_str().unwrap_or("?")))
}

/// The object of `kind` named `name` among `docs`.
pub fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Result<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .ok_or_else(|| anyhow!("no {kind} {name}"))
}

/// The documents of the generated operator manifests and CRDs (what `deploy/` must render).
pub fn generator_documents(legacy: bool) -> Result<Vec<Value>> {
    let mut docs = yaml_documents(&marklb_installgen::operator_manifests())?;
    for file in marklb_crds::crd::generated_files() {
        if file.path.starts_with(marklb_crds::crd::LEGACY_DIR) == legacy {
            docs.extend(yaml_documents(&file.contents)?);
        }
    }
    Ok(docs)
}

/// `promtool args...` with `dir` as working directory: the combined output, or an error.
pub fn promtool(dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .context("running promtool (Debian's prometheus package: scripts/setup.sh)")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("promtool {} failed: {text}", args.join(" "));
    }
    Ok(text)
}
