//! The operator against a real API server, for the `operator_*` tests: the legacy-1.20 CRDs
//! installed, Node objects without kubelets, the operator in process, and simulated agents that
//! write node-state statuses the way a real agent does (server-side apply on the status, field
//! manager `marklb-agent`, `observedGeneration` of the spec they served).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use marklb_crds::conditions::{self, ConditionStatus, reason, set_condition};
use marklb_crds::labels::{AGENT_FIELD_MANAGER, NODE_LABEL};
use marklb_crds::node_state::{hw_backend, mark_delivery};
use marklb_crds::{LoadBalancer, LoadBalancerNodeState, LoadBalancerNodeStateStatus};
use marklb_operator::Settings;
use marklb_operator::http::Shared;
use serde_json::json;
use tokio::task::JoinHandle;

use crate::kube_harness::install_crds;

/// The legacy-1.20 CRDs of the repository.
pub fn legacy_crds() -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/yaml/legacy-1.20");
    let mut out = String::new();
    for name in [
        "loadbalancers.marklb.io.yaml",
        "loadbalancernodestates.marklb.io.yaml",
        "loadbalancerippools.marklb.io.yaml",
    ] {
        out.push_str("---\n");
        out.push_str(&std::fs::read_to_string(dir.join(name)).expect("legacy CRDs"));
    }
    out
}

/// Installs the CRDs and creates the namespaces.
pub async fn prepare(client: &Client, namespaces: &[&str]) -> Result<()> {
    install_crds(client, &legacy_crds()).await?;
    let api: Api<Namespace> = Api::all(client.clone());
    for ns in namespaces {
        let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}}))?;
        match api.create(&PostParams::default(), &obj).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Creates (or relabels) Node `name` with `labels`.
pub async fn put_node(client: &Client, name: &str, labels: &[(&str, &str)]) -> Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let body =
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}});
    api.patch(
        name,
        &PatchParams::apply("marklb-tests").force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

/// Applies a LoadBalancer from its YAML (server-side apply, as `kubectl apply` would).
pub async fn apply_lb(client: &Client, namespace: &str, yaml: &str) -> Result<LoadBalancer> {
    let lb: LoadBalancer = serde_yaml::from_str(yaml)?;
    let api: Api<LoadBalancer> = Api::namespaced(client.clone(), namespace);
    Ok(api
        .patch(
            &lb.name_any(),
            &PatchParams::apply("marklb-tests").force(),
            &Patch::Apply(&lb),
        )
        .await?)
}

/// Polls `check` every 100 ms until it returns `Some`, or fails after `timeout` with the last
/// `None`-state description from `describe`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if Instant::now() > deadline {
            bail!("{what}: not after {timeout:?} (last error: {last_error:?})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The status condition `type_` of LoadBalancer `namespace/name`: (status, reason, message).
pub async fn lb_condition(
    client: &Client,
    namespace: &str,
    name: &str,
    type_: &str,
) -> Result<Option<(String, String, String)>> {
    let lb = Api::<LoadBalancer>::namespaced(client.clone(), namespace)
        .get(name)
        .await?;
    Ok(lb
        .status
        .as_ref()
        .and_then(|s| conditions::find_condition(&s.conditions, type_))
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone())))
}

/// The operator, in process (no leader election unless asked).
pub struct Operator {
    pub shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Operator {
    /// Starts the controller with `settings`.
    pub fn start(client: Client, settings: Settings) -> Operator {
        let shared = Arc::new(Shared::default());
        shared.metrics.leader.set(1);
        let s = shared.clone();
        let task = tokio::spawn(async move {
            marklb_operator::controller::run(
                client,
                settings,
                s,
                "test".into(),
                std::future::pending(),
            )
            .await;
        });
        Operator { shared, task }
    }

    /// Starts a replica that runs the controller only while it holds the Lease.
    pub fn start_with_election(
        client: Client,
        settings: Settings,
        identity: &str,
        lease_seconds: u64,
    ) -> Operator {
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let lease = marklb_operator::leader::LeaseSettings {
            name: "marklb-operator".into(),
            identity: identity.into(),
            duration_seconds: lease_seconds,
            grace_seconds: 1,
        };
        let task = tokio::spawn(async move {
            let _ = marklb_operator::leader::run_when_leader(client, settings, lease, s).await;
        });
        Operator { shared, task }
    }

    /// Writes sent so far.
    pub fn writes(&self) -> u64 {
        self.shared.metrics.total_writes()
    }

    /// Stops it (the task is aborted, as a killed process stops).
    pub fn stop(self) {
        self.task.abort();
    }
}

/// A simulated agent per node: watches the node states of the cluster and, for those on nodes
/// it runs on, writes a Ready status for the generation it sees (no VIPs once emptied), as the
/// real agent does. Nodes can be added and removed (an agent that dies stops acknowledging).
pub struct SimulatedAgents {
    pub nodes: Arc<Mutex<BTreeSet<String>>>,
    /// Status writes sent.
    pub writes: Arc<Mutex<u64>>,
    task: JoinHandle<()>,
}

/// The status a healthy agent reports for `state`.
pub fn ready_status(state: &LoadBalancerNodeState) -> LoadBalancerNodeStateStatus {
    let generation = state.metadata.generation;
    let mut status = state.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    status.interface = Some("eth0".into());
    status.xdp_mode = Some("Native".into());
    status.program_id = Some(42);
    status.vips = state.spec.lb.vips.len() as u32;
    status.reals = state
        .spec
        .lb
        .vips
        .iter()
        .map(|v| v.backends.len() as u32)
        .sum();
    status.marks_in_use = 2;
    status.hw_backend = Some(hw_backend::EMULATED.into());
    status.hw_backend_reason = Some("--hw-backend emulated".into());
    status.mark_delivery = Some(mark_delivery::XDP_METADATA.into());
    status.offloaded = true;
    status.last_error = None;
    let now = Time(Timestamp::now());
    set_condition(
        &mut status.conditions,
        conditions::NODE_READY,
        ConditionStatus::True,
        reason::PROGRAMMED,
        "",
        generation,
        now.clone(),
    );
    set_condition(
        &mut status.conditions,
        conditions::DATAPATH_ATTACHED,
        ConditionStatus::True,
        reason::ATTACHED,
        "",
        generation,
        now,
    );
    status
}

/// Writes `status` on `state` as its agent (server-side apply on the status subresource).
pub async fn write_agent_status(
    client: &Client,
    state: &LoadBalancerNodeState,
    status: &LoadBalancerNodeStateStatus,
) -> Result<()> {
    let api: Api<LoadBalancerNodeState> =
        Api::namespaced(client.clone(), &state.namespace().unwrap_or_default());
    let body = json!({"apiVersion": marklb_crds::API_VERSION, "kind": "LoadBalancerNodeState", "status": status});
    api.patch_status(
        &state.name_any(),
        &PatchParams::apply(AGENT_FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

impl SimulatedAgents {
    /// Agents on `nodes`, with at most `parallel` status writes in flight.
    pub fn start(client: Client, nodes: &[&str], parallel: usize) -> SimulatedAgents {
        let alive = Arc::new(Mutex::new(
            nodes.iter().map(|n| n.to_string()).collect::<BTreeSet<_>>(),
        ));
        let writes = Arc::new(Mutex::new(0u64));
        let (a, w) = (alive.clone(), writes.clone());
        let task = tokio::spawn(async move {
            let api: Api<LoadBalancerNodeState> = Api::all(client.clone());
            watcher(api, watcher::Config::default())
                .default_backoff()
                .applied_objects()
                .for_each_concurrent(parallel, |state| {
                    let (client, alive, writes) = (client.clone(), a.clone(), w.clone());
                    async move {
                        let Ok(state) = state else { return };
                        let node = state.labels().get(NODE_LABEL).cloned().unwrap_or_default();
                        if !alive.lock().unwrap().contains(&node) {
                            return;
                        }
                        let observed = state.status.as_ref().and_then(|s| s.observed_generation);
                        if observed.is_some() && observed == state.metadata.generation {
                            return;
                        }
                        if write_agent_status(&client, &state, &ready_status(&state))
                            .await
                            .is_ok()
                        {
                            *writes.lock().unwrap() += 1;
                        }
                    }
                })
                .await;
        });
        SimulatedAgents {
            nodes: alive,
            writes,
            task,
        }
    }

    /// The agent of `node` dies (writes nothing more).
    pub fn kill(&self, node: &str) {
        self.nodes.lock().unwrap().remove(node);
    }

    /// An agent starts on `node` (it serves the states it is told about from now on; states it
    /// missed are picked up at their next change or by [`catch_up`](Self::catch_up)).
    pub fn add(&self, node: &str) {
        self.nodes.lock().unwrap().insert(node.to_string());
    }

    /// Status writes so far.
    pub fn writes(&self) -> u64 {
        *self.writes.lock().unwrap()
    }

    pub fn stop(self) {
        self.task.abort();
    }
}

/// Writes a Ready status for every node state of `node` that lacks one (an agent starting up).
pub async fn catch_up(client: &Client, node: &str) -> Result<usize> {
    let api: Api<LoadBalancerNodeState> = Api::all(client.clone());
    let mut n = 0;
    for state in api
        .list(&ListParams::default().labels(&format!("{NODE_LABEL}={node}")))
        .await?
    {
        if state.status.as_ref().and_then(|s| s.observed_generation) != state.metadata.generation {
            write_agent_status(client, &state, &ready_status(&state)).await?;
            n += 1;
        }
    }
    Ok(n)
}

/// Settings for tests: short cleanup wait, agent pods watched, DaemonSet applied.
pub fn test_settings(namespace: &str) -> Settings {
    Settings {
        namespace: namespace.into(),
        cleanup_timeout: Duration::from_secs(3),
        // operator_api waits for AgentNotScheduled where no kubelet runs.
        agent_pod_grace: Duration::from_secs(1),
        ..Settings::default()
    }
}
