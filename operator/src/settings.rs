//! Settings of the operator and of the agent DaemonSet it applies.
//!
//! The agent's settings (image, hardware backend, mark delivery, ports) come from operator
//! flags, which the chart or the manifests set: the LoadBalancer spec says what to serve, the
//! node's hardware is the cluster administrator's business (per node, not per LoadBalancer).

use std::time::Duration;

use k8s_openapi::api::core::v1::Toleration;

/// Which address the agents bind `/metrics`, `/healthz` and `/readyz` to (they run in the
/// host network, so "every address" includes the client-facing interface of the node).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricsBind {
    /// The node's InternalIP (`status.hostIP` from the downward API): reachable by Prometheus
    /// and the kubelet's probes, not on other interfaces. The default.
    HostIp,
    /// `0.0.0.0`: every address of the node.
    All,
}

impl MetricsBind {
    /// The flag value (`host-ip`, `all`).
    pub fn as_str(self) -> &'static str {
        match self {
            MetricsBind::HostIp => "host-ip",
            MetricsBind::All => "all",
        }
    }

    /// Parses a flag value.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "host-ip" => Some(MetricsBind::HostIp),
            "all" => Some(MetricsBind::All),
            _ => None,
        }
    }
}

/// How the agent DaemonSet is built.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentSettings {
    /// Container image of the agent.
    pub image: String,
    /// `imagePullPolicy` of the agent container (`IfNotPresent`, `Always`, `Never`).
    pub image_pull_policy: String,
    /// `--hw-backend` of the agent: `auto`, `mellanox`, `emulated` or `none`.
    pub hw_backend: String,
    /// `--mark-delivery` of the agent: `xdp-metadata` or `skb-mark`; `None` leaves the
    /// agent's default.
    pub mark_delivery: Option<String>,
    /// `--xdp-mode` of the agent: `auto`, `native` or `generic`; `None` leaves the agent's
    /// default.
    pub xdp_mode: Option<String>,
    /// Port of the agent's `/metrics`, `/healthz` and `/readyz` (host network).
    pub metrics_port: u16,
    /// Address the agent binds those endpoints to.
    pub metrics_bind: MetricsBind,
    /// Tolerations of the agent pods (default: every taint, since a LoadBalancer's node
    /// selector is the user's statement of where to serve).
    pub tolerations: Vec<Toleration>,
    /// `RUST_LOG` of the agent.
    pub log_level: String,
    /// Host directory of the BPF filesystem (pins survive agent restarts there).
    pub bpffs: String,
}

impl Default for AgentSettings {
    fn default() -> Self {
        Self {
            image: "marklb-agent:dev".into(),
            image_pull_policy: "IfNotPresent".into(),
            hw_backend: "auto".into(),
            mark_delivery: None,
            xdp_mode: None,
            metrics_port: 9464,
            metrics_bind: MetricsBind::HostIp,
            tolerations: vec![Toleration {
                operator: Some("Exists".into()),
                ..Default::default()
            }],
            log_level: "info".into(),
            bpffs: "/sys/fs/bpf".into(),
        }
    }
}

/// How the operator runs.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Namespace of the operator, its Lease and the agent DaemonSet.
    pub namespace: String,
    /// The agent DaemonSet.
    pub agent: AgentSettings,
    /// Whether the operator applies the agent DaemonSet (off in tests that simulate agents).
    pub manage_daemonset: bool,
    /// The ServiceAccount (in [`namespace`](Self::namespace)) that owns the DaemonSets the
    /// operator applies, so uninstalling deletes them ([`crate::install_owner`]); `None`: no
    /// owner.
    pub install_owner: Option<String>,
    /// Whether agent pods are watched to report `AgentNotScheduled` (needs list/watch on pods
    /// in [`namespace`](Self::namespace)).
    pub watch_agent_pods: bool,
    /// How long a newly selected node may go without an agent pod before it counts as
    /// `AgentNotScheduled`: the DaemonSet controller creates the pod a moment after the
    /// operator writes the node state, and a warning in that moment is noise.
    pub agent_pod_grace: Duration,
    /// How long a deleted LoadBalancer waits for its agents to remove its VIPs before its
    /// node states go anyway (an agent that is gone must not block deletion forever).
    pub cleanup_timeout: Duration,
    /// Requeue interval of a healthy LoadBalancer (a safety net; watches drive the rest).
    pub resync: Duration,
    /// How long a reconcile waits for the watch cache to show the node states it wrote
    /// ([`crate::apply::await_cached`]); usually milliseconds.
    pub cache_catch_up: Duration,
    /// Services of type LoadBalancer (`crate::services`).
    pub services: ServiceSettings,
}

/// How the operator serves Services of type LoadBalancer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSettings {
    /// Whether the Service controller runs at all.
    pub enabled: bool,
    /// Which Services it serves (class, and whether Services without a class too).
    pub class: crate::services::request::ClassPolicy,
    /// Whether the operator applies the decapsulator DaemonSet (once a Service is served).
    pub manage_decap: bool,
    /// Whether only nodes with a Ready decapsulator pod become reals (needs list/watch on
    /// pods in [`Settings::namespace`]).
    pub watch_decap_pods: bool,
}

impl Default for ServiceSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            class: crate::services::request::ClassPolicy::default(),
            manage_decap: true,
            watch_decap_pods: true,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            namespace: "marklb-system".into(),
            agent: AgentSettings::default(),
            manage_daemonset: true,
            install_owner: Some(crate::manifests::OPERATOR_NAME.into()),
            watch_agent_pods: true,
            agent_pod_grace: Duration::from_secs(15),
            cleanup_timeout: Duration::from_secs(30),
            resync: Duration::from_secs(300),
            cache_catch_up: Duration::from_secs(2),
            services: ServiceSettings::default(),
        }
    }
}
