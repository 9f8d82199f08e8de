//! What should exist, computed without I/O: the node states of one LoadBalancer, and the one
//! agent DaemonSet of all LoadBalancers.
//!
//! Invariants:
//! - one node state per (LoadBalancer, selected node), named [`node_state_name`], labelled
//!   with the node and the LoadBalancer, owned by the LoadBalancer (controller reference), and
//!   carrying the LoadBalancer's creation time so agents rank owners alike;
//! - a node state's `spec.lb` is resolved: `backendService` replaced by the Service's ready
//!   addresses of the VIP's family (weight 1, sorted), and it passes the node-state validation
//!   (otherwise nothing is written and the caller reports why);
//! - the DaemonSet schedules exactly on the nodes some LoadBalancer selects (node affinity: one
//!   term per distinct selector; none when a LoadBalancer selects every node; a term no node
//!   matches when there is no LoadBalancer) and uses only fields Kubernetes 1.20 knows.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, RollingUpdateDaemonSet,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    HostPathVolumeSource, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    ObjectFieldSelector, PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SecurityContext,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use marklb_crds::labels::{
    LOADBALANCER_LABEL, MANAGED_BY_LABEL, NODE_LABEL, OPERATOR_FIELD_MANAGER,
    loadbalancer_label_value, node_label_value, node_state_name,
};
use marklb_crds::limits::MAX_BACKENDS_PER_VIP;
use marklb_crds::{
    Backend, LoadBalancer, LoadBalancerNodeState, LoadBalancerNodeStateSpec, LoadBalancerSpec,
    ValidationErrors,
};

use crate::endpoints::ServiceEndpoints;
use crate::settings::{AgentSettings, MetricsBind};

/// Name of the agent DaemonSet (and of its ServiceAccount).
pub const AGENT_NAME: &str = "marklb-agent";
/// Label selecting the agent's pods.
pub const AGENT_APP_LABEL: &str = "app.kubernetes.io/name";
/// A node label no node carries: the DaemonSet's affinity when no LoadBalancer exists, so the
/// object stays (stable, no create/delete churn) and schedules nowhere.
pub const NO_LOADBALANCER_LABEL: &str = "marklb.io/no-loadbalancer-selects-this";

/// Whether a node with `labels` is selected by `selector` (every pair must match; no selector
/// selects every node).
pub fn selects(
    selector: Option<&BTreeMap<String, String>>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.is_none_or(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// Why a spec could not be resolved for the nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolveError {
    /// A Service's endpoints do not fit the VIP (message names the VIP and the Service).
    Backends(String),
    /// The resolved spec fails validation (e.g. more backends than the Maglev table allows).
    Invalid(ValidationErrors),
}

impl std::fmt::Display for ResolveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResolveError::Backends(m) => f.write_str(m),
            ResolveError::Invalid(e) => write!(f, "{e}"),
        }
    }
}

/// The spec the nodes program: every `backendService` replaced by its Service's ready
/// addresses of the VIP's family (weight 1). `endpoints` maps Service names (in the
/// LoadBalancer's namespace) to their endpoints; a Service absent from it has none.
pub fn resolve_spec(
    spec: &LoadBalancerSpec,
    endpoints: &BTreeMap<String, ServiceEndpoints>,
) -> Result<LoadBalancerSpec, ResolveError> {
    let mut out = spec.clone();
    for (i, vip) in out.vips.iter_mut().enumerate() {
        let Some(service) = vip.backend_service.take() else {
            continue;
        };
        let Some(vip_ip) = vip.ip() else {
            return Err(ResolveError::Backends(format!(
                "spec.vips[{i}].address: {:?} is not an IP address",
                vip.address
            )));
        };
        let empty = ServiceEndpoints::default();
        let found = endpoints.get(&service.name).unwrap_or(&empty);
        let addresses = found.for_family(vip_ip);
        if addresses.len() > MAX_BACKENDS_PER_VIP {
            return Err(ResolveError::Backends(format!(
                "spec.vips[{i}].backendService: Service {:?} has {} ready endpoints, a VIP serves at most {MAX_BACKENDS_PER_VIP}",
                service.name,
                addresses.len()
            )));
        }
        vip.backends = addresses
            .iter()
            .map(|ip| Backend {
                address: ip.to_string(),
                weight: 1,
            })
            .collect();
    }
    let check = LoadBalancerNodeStateSpec {
        node_name: "-".into(),
        load_balancer: "-".into(),
        interface: None,
        lb: out,
        load_balancer_created: None,
    };
    check.validate().map_err(ResolveError::Invalid)?;
    Ok(check.lb)
}

/// The owner reference of everything derived from `lb` (controller: the LoadBalancer's
/// deletion collects them).
pub fn owner_reference(lb: &LoadBalancer) -> OwnerReference {
    OwnerReference {
        api_version: LoadBalancer::api_version(&()).into_owned(),
        kind: LoadBalancer::kind(&()).into_owned(),
        name: lb.name_any(),
        uid: lb.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: None,
    }
}

/// The labels every node state of `lb` on `node` carries.
pub fn node_state_labels(lb_name: &str, node_name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (NODE_LABEL.to_string(), node_label_value(node_name)),
        (
            LOADBALANCER_LABEL.to_string(),
            loadbalancer_label_value(lb_name),
        ),
        (
            MANAGED_BY_LABEL.to_string(),
            OPERATOR_FIELD_MANAGER.to_string(),
        ),
    ])
}

/// The node state of `lb` on `node_name`, programming `resolved` (from [`resolve_spec`]).
pub fn node_state(
    lb: &LoadBalancer,
    node_name: &str,
    resolved: &LoadBalancerSpec,
) -> LoadBalancerNodeState {
    let lb_name = lb.name_any();
    let mut state = LoadBalancerNodeState::new(
        &node_state_name(&lb_name, node_name),
        LoadBalancerNodeStateSpec {
            node_name: node_name.to_string(),
            load_balancer: lb_name.clone(),
            interface: resolved.interface.clone(),
            lb: resolved.clone(),
            load_balancer_created: lb.metadata.creation_timestamp.clone(),
        },
    );
    state.metadata.namespace = lb.namespace();
    state.metadata.labels = Some(node_state_labels(&lb_name, node_name));
    state.metadata.owner_references = Some(vec![owner_reference(lb)]);
    state
}

/// The node states of `lb`: one per node of `selected_nodes` (sorted by node).
pub fn node_states(
    lb: &LoadBalancer,
    selected_nodes: &BTreeSet<String>,
    resolved: &LoadBalancerSpec,
) -> Vec<LoadBalancerNodeState> {
    selected_nodes
        .iter()
        .map(|node| node_state(lb, node, resolved))
        .collect()
}

/// The node affinity that places agents on exactly the nodes some selector selects: `None`
/// when one selects every node; a term matching no node when there is no selector at all.
pub fn agent_affinity<'a>(
    selectors: impl IntoIterator<Item = Option<&'a BTreeMap<String, String>>>,
) -> Option<Affinity> {
    let mut terms: BTreeSet<Vec<(String, String)>> = BTreeSet::new();
    let mut any = false;
    for selector in selectors {
        any = true;
        match selector {
            None => return None,
            Some(sel) if sel.is_empty() => return None,
            Some(sel) => {
                terms.insert(sel.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
            }
        }
    }
    let requirement =
        |key: &str, operator: &str, values: Option<Vec<String>>| NodeSelectorRequirement {
            key: key.to_string(),
            operator: operator.to_string(),
            values,
        };
    let node_selector_terms = if any {
        terms
            .into_iter()
            .map(|pairs| NodeSelectorTerm {
                match_expressions: Some(
                    pairs
                        .into_iter()
                        .map(|(k, v)| requirement(&k, "In", Some(vec![v])))
                        .collect(),
                ),
                match_fields: None,
            })
            .collect()
    } else {
        vec![NodeSelectorTerm {
            match_expressions: Some(vec![requirement(NO_LOADBALANCER_LABEL, "Exists", None)]),
            match_fields: None,
        }]
    };
    Some(Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms,
            }),
            preferred_during_scheduling_ignored_during_execution: None,
        }),
        pod_affinity: None,
        pod_anti_affinity: None,
    })
}

/// The agent's command line for LoadBalancers that name no interface (see [`agent_args_on`]).
pub fn agent_args(agent: &AgentSettings) -> Vec<String> {
    agent_args_on(agent, None)
}

/// The agent's command line: Kubernetes mode, node name from `NODE_NAME`, the interface to
/// attach to, hardware settings from the operator's flags, metrics on the host IP (or every
/// address, when asked).
///
/// The agent attaches to one interface when it starts (one XDP program per interface serves
/// every LoadBalancer of the node): `interface` when the LoadBalancers name one
/// ([`agent_interface`]), else the interface holding the node's address (`$(HOST_IP)`). A node
/// state naming another interface is reported by its agent (`Ready=False`), never served.
pub fn agent_args_on(agent: &AgentSettings, interface: Option<&str>) -> Vec<String> {
    let mut args = vec![
        "--log-format=json".to_string(),
        "run".to_string(),
        "--kubernetes".to_string(),
        match interface {
            Some(i) => format!("--interface={i}"),
            None => "--interface-of=$(HOST_IP)".to_string(),
        },
        format!("--hw-backend={}", agent.hw_backend),
    ];
    if let Some(delivery) = &agent.mark_delivery {
        args.push(format!("--mark-delivery={delivery}"));
    }
    if let Some(mode) = &agent.xdp_mode {
        args.push(format!("--xdp-mode={mode}"));
    }
    let host = match agent.metrics_bind {
        MetricsBind::HostIp => "$(HOST_IP)",
        MetricsBind::All => "0.0.0.0",
    };
    args.push(format!("--metrics-addr={host}:{}", agent.metrics_port));
    args.push(format!("--bpffs={}", agent.bpffs));
    args
}

fn env_from_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_string(),
                api_version: None,
            }),
            ..Default::default()
        }),
        value: None,
    }
}

fn http_probe(path: &str, period: i32, failures: i32, initial_delay: Option<i32>) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String("metrics".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        initial_delay_seconds: initial_delay,
        ..Default::default()
    }
}

/// The one agent DaemonSet serving every LoadBalancer (an interface carries one XDP program,
/// so one agent per node serves them all), in `namespace`, scheduled by
/// [`agent_affinity`] of the LoadBalancers' node selectors.
pub fn agent_daemonset<'a>(
    namespace: &str,
    agent: &AgentSettings,
    selectors: impl IntoIterator<Item = Option<&'a BTreeMap<String, String>>>,
) -> DaemonSet {
    agent_daemonset_on(namespace, agent, selectors, None)
}

/// The interface the agents attach to: the one the LoadBalancers name (`spec.interface`), when
/// exactly one distinct name is given; `None` (the interface of the node's address) when none
/// is, or when they name several (the agents then report the states they cannot serve).
pub fn agent_interface<'a>(
    interfaces: impl IntoIterator<Item = Option<&'a str>>,
) -> Option<String> {
    let named: std::collections::BTreeSet<&str> = interfaces
        .into_iter()
        .flatten()
        .filter(|i| !i.is_empty())
        .collect();
    match named.len() {
        1 => named.into_iter().next().map(str::to_string),
        _ => None,
    }
}

/// [`agent_daemonset`] with the agents attaching to `interface` ([`agent_args_on`]).
pub fn agent_daemonset_on<'a>(
    namespace: &str,
    agent: &AgentSettings,
    selectors: impl IntoIterator<Item = Option<&'a BTreeMap<String, String>>>,
    interface: Option<&str>,
) -> DaemonSet {
    let labels = BTreeMap::from([(AGENT_APP_LABEL.to_string(), AGENT_NAME.to_string())]);
    let mut meta_labels = labels.clone();
    meta_labels.insert(MANAGED_BY_LABEL.into(), OPERATOR_FIELD_MANAGER.into());
    let container = Container {
        name: "agent".into(),
        image: Some(agent.image.clone()),
        image_pull_policy: Some(agent.image_pull_policy.clone()),
        args: Some(agent_args_on(agent, interface)),
        env: Some(vec![
            env_from_field("NODE_NAME", "spec.nodeName"),
            env_from_field("HOST_IP", "status.hostIP"),
            EnvVar {
                name: "RUST_LOG".into(),
                value: Some(agent.log_level.clone()),
                value_from: None,
            },
            EnvVar {
                name: "NO_COLOR".into(),
                value: Some("1".into()),
                value_from: None,
            },
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("metrics".into()),
            container_port: i32::from(agent.metrics_port),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        readiness_probe: Some(http_probe("/readyz", 2, 2, None)),
        liveness_probe: Some(http_probe("/healthz", 10, 3, Some(5))),
        security_context: Some(SecurityContext {
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_user: Some(0),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: Some(vec!["BPF".into(), "NET_ADMIN".into(), "PERFMON".into()]),
            }),
            ..Default::default()
        }),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("10m".into())),
                ("memory".to_string(), Quantity("32Mi".into())),
            ])),
            limits: Some(BTreeMap::from([(
                "memory".to_string(),
                Quantity("256Mi".into()),
            )])),
            ..Default::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: "bpffs".into(),
            mount_path: agent.bpffs.clone(),
            ..Default::default()
        }]),
        ..Default::default()
    };
    DaemonSet {
        metadata: ObjectMeta {
            name: Some(AGENT_NAME.into()),
            namespace: Some(namespace.into()),
            labels: Some(meta_labels),
            ..Default::default()
        },
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                match_expressions: None,
            },
            // `maxSurge` is unknown to Kubernetes 1.20 (server-side apply refuses it).
            update_strategy: Some(DaemonSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDaemonSet {
                    max_unavailable: Some(IntOrString::Int(1)),
                    max_surge: None,
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(AGENT_NAME.into()),
                    host_network: Some(true),
                    dns_policy: Some("ClusterFirstWithHostNet".into()),
                    termination_grace_period_seconds: Some(10),
                    affinity: agent_affinity(selectors),
                    // By default agents go wherever a LoadBalancer selects, tainted nodes
                    // included: the selector is the user's statement of where to serve.
                    tolerations: Some(agent.tolerations.clone()),
                    containers: vec![container],
                    volumes: Some(vec![Volume {
                        name: "bpffs".into(),
                        host_path: Some(HostPathVolumeSource {
                            path: agent.bpffs.clone(),
                            type_: Some("Directory".into()),
                        }),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests;
