//! The LoadBalancer controller: watches, caches, the finalizer and the deletion protocol.
//!
//! One watch per kind feeds both a cache (reflector store) and the triggers: LoadBalancers
//! (the controlled kind), their node states (owned), Nodes (every LoadBalancer may select a
//! changed node), EndpointSlices (mapped to the LoadBalancers whose VIPs name the slice's
//! Service; version chosen through discovery), agent pods (for `AgentNotScheduled`).
//! A reconcile reads only caches and writes only what differs, so an unchanged LoadBalancer
//! costs no request and a change costs requests proportional to what changed.
//!
//! Deletion (the `marklb.io/loadbalancer-cleanup` finalizer): the node states are rewritten
//! with no VIPs; once every agent reports that generation with 0 VIPs (or the bounded wait
//! ends, reported by an event), the node states are deleted and the finalizer removed. The
//! waiting spans reconciles, which is why the finalizer is handled here rather than by
//! `kube::runtime::finalizer` (that helper removes it as soon as cleanup returns).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt, future};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DynamicObject};
use kube::discovery::ApiResource;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use marklb_crds::conditions::{self, ConditionStatus, reason, set_condition};
use marklb_crds::labels::{
    LOADBALANCER_LABEL, MANAGED_BY_LABEL, OPERATOR_FIELD_MANAGER, OPERATOR_FINALIZER,
    loadbalancer_label_value,
};
use marklb_crds::node_state::OwnerRank;
use marklb_crds::{LoadBalancer, LoadBalancerNodeState, LoadBalancerStatus};
use tracing::{debug, info, warn};

use crate::conflicts::{self, Claim};
use crate::desired::{self, AGENT_APP_LABEL, AGENT_NAME};
use crate::endpoints::{self, ServiceEndpoints};
use crate::http::Shared;
use crate::metrics::Metrics;
use crate::rollup::{self, Inputs};
use crate::settings::Settings;
use crate::{Error, Result, apply};

/// Longest a reconcile waits for the caches to fill after a start.
const CACHE_WAIT: Duration = Duration::from_secs(60);
/// Node-state writes in flight at once within one reconcile.
const APPLY_CONCURRENCY: usize = 16;
/// How often a deletion checks on the agents' acknowledgements (watch events come sooner).
const CLEANUP_POLL: Duration = Duration::from_secs(1);
/// First and longest delay after a failed reconcile (doubling in between).
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// The caches a reconcile reads.
#[derive(Clone)]
pub struct Caches {
    pub loadbalancers: Store<LoadBalancer>,
    pub node_states: Store<LoadBalancerNodeState>,
    pub nodes: Store<Node>,
    /// `None`: the cluster serves no EndpointSlice (every backendService resolves to nothing).
    pub endpoint_slices: Option<Store<DynamicObject>>,
    /// `None`: agent pods are not watched.
    pub agent_pods: Option<Store<Pod>>,
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    pub caches: Caches,
    recorder: Recorder,
    /// Consecutive failures per LoadBalancer (for the backoff).
    failures: Mutex<HashMap<ObjectRef<LoadBalancer>, u32>>,
    /// The DaemonSet as last applied by this process (skips identical applies). An async
    /// mutex held from the comparison to the stored answer: reconciles run concurrently (all
    /// LoadBalancers at once after a restart), and checking then applying without holding it
    /// let each of them apply the same DaemonSet.
    last_daemonset: tokio::sync::Mutex<Option<DaemonSet>>,
    /// The owner of the DaemonSet (the operator's ServiceAccount).
    install_owner: crate::install_owner::InstallOwner,
    /// True once every cache was filled.
    caches_filled: tokio::sync::watch::Receiver<bool>,
}

impl Context {
    /// A context over existing caches (tests build theirs; [`run`] builds the real ones).
    pub fn new(
        client: Client,
        settings: Settings,
        metrics: Arc<Metrics>,
        caches: Caches,
        caches_filled: tokio::sync::watch::Receiver<bool>,
        instance: &str,
    ) -> Self {
        let reporter = Reporter {
            controller: OPERATOR_FIELD_MANAGER.into(),
            instance: Some(instance.into()),
        };
        let install_owner = crate::install_owner::InstallOwner::new(
            &settings.namespace,
            settings.install_owner.as_deref(),
        );
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            metrics,
            caches,
            failures: Mutex::default(),
            last_daemonset: tokio::sync::Mutex::default(),
            install_owner,
            caches_filled,
        }
    }

    /// Publishes an event about a (namespaced) LoadBalancer; a failure is logged, never fatal.
    async fn event(&self, lb: &LoadBalancer, type_: EventType, reason: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &lb.object_ref(&())).await {
            warn!(lb = %lb.name_any(), error = %e, "could not publish event");
        }
    }

    /// Waits until every cache was filled once (a reconcile on an empty Node cache would
    /// prune every node state). One task waits on the stores (see [`run`]) and flips
    /// `caches_filled`: reconciles wait on that flag, never on the stores themselves (several
    /// concurrent waiters on one store were seen to hang).
    async fn caches_ready(&self) {
        let mut filled = self.caches_filled.clone();
        if tokio::time::timeout(CACHE_WAIT, filled.wait_for(|f| *f))
            .await
            .is_err()
        {
            warn!("caches not filled after {CACHE_WAIT:?}; reconciling with what is there");
        }
    }

    /// The node states of `lb` in the cache, by node name.
    fn states_of(
        &self,
        namespace: &str,
        name: &str,
    ) -> BTreeMap<String, Arc<LoadBalancerNodeState>> {
        let label = loadbalancer_label_value(name);
        self.caches
            .node_states
            .state()
            .into_iter()
            .filter(|s| {
                s.namespace().as_deref() == Some(namespace)
                    && s.spec.load_balancer == name
                    && s.labels().get(LOADBALANCER_LABEL) == Some(&label)
            })
            .map(|s| (s.spec.node_name.clone(), s))
            .collect()
    }

    /// Nodes `lb` selects, sorted.
    fn selected_nodes(&self, lb: &LoadBalancer) -> BTreeSet<String> {
        let empty = BTreeMap::new();
        self.caches
            .nodes
            .state()
            .iter()
            .filter(|n| {
                desired::selects(
                    lb.spec.node_selector.as_ref(),
                    n.metadata.labels.as_ref().unwrap_or(&empty),
                )
            })
            .map(|n| n.name_any())
            .collect()
    }

    fn endpoints_for(&self, lb: &LoadBalancer) -> BTreeMap<String, ServiceEndpoints> {
        let namespace = lb.namespace().unwrap_or_default();
        let services: BTreeSet<&str> = lb
            .spec
            .vips
            .iter()
            .filter_map(|v| v.backend_service.as_ref().map(|s| s.name.as_str()))
            .collect();
        let slices = self
            .caches
            .endpoint_slices
            .as_ref()
            .map(|s| s.state())
            .unwrap_or_default();
        services
            .into_iter()
            .map(|svc| {
                (
                    svc.to_string(),
                    endpoints::resolve(&namespace, svc, slices.iter().map(|s| &**s)),
                )
            })
            .collect()
    }

    fn agent_nodes(&self) -> Option<BTreeSet<String>> {
        let pods = self.caches.agent_pods.as_ref()?;
        Some(
            pods.state()
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .filter_map(|p| {
                    p.spec
                        .as_ref()
                        .and_then(|s| s.node_name.clone())
                        .or_else(|| pod_target_node(p))
                })
                .collect(),
        )
    }

    /// What `lb` loses to older LoadBalancers on shared nodes.
    fn lost_by(&self, lb: &LoadBalancer, selected: &BTreeSet<String>) -> Vec<conflicts::Lost> {
        let all = self.caches.loadbalancers.state();
        let me = owner_rank(lb);
        let others: Vec<(OwnerRank, Arc<LoadBalancer>, BTreeSet<String>)> = all
            .into_iter()
            .filter(|o| o.uid() != lb.uid() && o.spec.validate().is_ok())
            .map(|o| (owner_rank(&o), o.clone(), self.selected_nodes(&o)))
            .filter(|(rank, _, nodes)| *rank < me && !nodes.is_disjoint(selected))
            .collect();
        if others.is_empty() {
            return Vec::new();
        }
        let mut claims = vec![Claim {
            rank: &me,
            spec: &lb.spec,
            nodes: selected,
        }];
        claims.extend(others.iter().map(|(rank, o, nodes)| Claim {
            rank,
            spec: &o.spec,
            nodes,
        }));
        conflicts::lost_by(&claims, 0)
    }

    /// Applies the agent DaemonSet for the LoadBalancers in the cache except `leaving`.
    async fn apply_daemonset(&self, leaving: Option<&LoadBalancer>) -> Result<()> {
        if !self.settings.manage_daemonset {
            return Ok(());
        }
        let lbs = self.caches.loadbalancers.state();
        // An invalid LoadBalancer needs agents only where its last good spec still serves.
        let needs_agents = |lb: &LoadBalancer| {
            lb.spec.validate().is_ok()
                || !self
                    .states_of(&lb.namespace().unwrap_or_default(), &lb.name_any())
                    .is_empty()
        };
        let served: Vec<&LoadBalancer> = lbs
            .iter()
            .map(|lb| lb.as_ref())
            .filter(|lb| leaving.is_none_or(|l| l.uid() != lb.uid()) && needs_agents(lb))
            .collect();
        let interface =
            desired::agent_interface(served.iter().map(|lb| lb.spec.interface.as_deref()));
        let mut ds = desired::agent_daemonset_on(
            &self.settings.namespace,
            &self.settings.agent,
            served.iter().map(|lb| lb.spec.node_selector.as_ref()),
            interface.as_deref(),
        );
        self.install_owner
            .own(&mut ds, &self.client, &self.metrics)
            .await;
        let mut last = self.last_daemonset.lock().await;
        if !apply::daemonset_needs_write(&ds, last.as_ref())? {
            return Ok(());
        }
        let stored = apply::apply_daemonset(&self.client, &self.metrics, &ds).await?;
        info!(namespace = %self.settings.namespace, "applied the agent DaemonSet");
        *last = Some(stored);
        Ok(())
    }
}

/// The node a pending DaemonSet pod is meant for (its `metadata.name` node-affinity field).
fn pod_target_node(pod: &Pod) -> Option<String> {
    let terms = &pod
        .spec
        .as_ref()?
        .affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms;
    terms
        .iter()
        .flat_map(|t| t.match_fields.iter().flatten())
        .find(|f| f.key == "metadata.name")
        .and_then(|f| f.values.as_ref()?.first().cloned())
}

/// The rank of a LoadBalancer among the owners of a node (older first).
pub fn owner_rank(lb: &LoadBalancer) -> OwnerRank {
    OwnerRank {
        created: lb.metadata.creation_timestamp.clone(),
        namespace: lb.namespace().unwrap_or_default(),
        name: lb.name_any(),
    }
}

fn now() -> Time {
    Time(Timestamp::now())
}

fn describe_selector(lb: &LoadBalancer) -> String {
    match &lb.spec.node_selector {
        None => "every node".into(),
        Some(s) if s.is_empty() => "every node".into(),
        Some(s) => s
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(","),
    }
}

/// Reconciles one LoadBalancer: finalizer, then apply or cleanup.
pub async fn reconcile(lb: Arc<LoadBalancer>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let result = reconcile_inner(&lb, &ctx).await;
    ctx.metrics.observe(
        started.elapsed(),
        result.as_ref().err().map(Error::metric_label),
    );
    if result.is_ok() {
        ctx.failures
            .lock()
            .unwrap()
            .remove(&ObjectRef::from_obj(&*lb));
    }
    result
}

async fn reconcile_inner(lb: &LoadBalancer, ctx: &Context) -> Result<Action> {
    let namespace = lb
        .namespace()
        .ok_or_else(|| Error::NoNamespace(lb.name_any()))?;
    debug!(%namespace, name = %lb.name_any(), "reconcile");
    ctx.caches_ready().await;
    debug!(%namespace, name = %lb.name_any(), "caches ready");
    let finalizers = lb.finalizers().to_vec();
    let has_finalizer = finalizers.iter().any(|f| f == OPERATOR_FINALIZER);
    if lb.meta().deletion_timestamp.is_some() {
        if !has_finalizer {
            return Ok(Action::await_change());
        }
        return cleanup(lb, &namespace, ctx).await;
    }
    if !has_finalizer {
        let mut with = finalizers;
        with.push(OPERATOR_FINALIZER.to_string());
        apply::set_finalizers(&ctx.client, &ctx.metrics, lb, with).await?;
        debug!(%namespace, name = %lb.name_any(), "finalizer added");
        // The update comes back through the watch and reconciles with the finalizer.
        return Ok(Action::await_change());
    }
    apply_lb(lb, &namespace, ctx).await
}

/// Writes `status` unless it equals the current one; publishes an event when Ready flips.
async fn write_status(lb: &LoadBalancer, ctx: &Context, status: LoadBalancerStatus) -> Result<()> {
    let current = lb.status.as_ref();
    if current == Some(&status) {
        return Ok(());
    }
    let before = current
        .and_then(|s| conditions::find_condition(&s.conditions, conditions::READY))
        .map(|c| (c.status.clone(), c.reason.clone()));
    apply::patch_status(&ctx.client, &ctx.metrics, lb, &status).await?;
    if let Some(ready) = conditions::find_condition(&status.conditions, conditions::READY)
        && before
            .as_ref()
            .is_none_or(|(s, r)| *s != ready.status || *r != ready.reason)
    {
        let type_ = if ready.status == "True" {
            EventType::Normal
        } else {
            EventType::Warning
        };
        ctx.event(lb, type_, &ready.reason, ready.message.clone())
            .await;
    }
    Ok(())
}

/// The status of a LoadBalancer whose spec cannot be programmed (`reason`, `message`): Ready
/// and Programmed False; the node states already written are left alone, so the last good
/// spec keeps serving.
pub(crate) fn refused_status(lb: &LoadBalancer, reason: &str, message: &str) -> LoadBalancerStatus {
    let mut status = lb.status.clone().unwrap_or_default();
    let generation = lb.metadata.generation;
    status.observed_generation = generation;
    let now = now();
    for type_ in [conditions::READY, conditions::PROGRAMMED] {
        set_condition(
            &mut status.conditions,
            type_,
            ConditionStatus::False,
            reason,
            message,
            generation,
            now.clone(),
        );
    }
    status
}

async fn apply_lb(lb: &LoadBalancer, namespace: &str, ctx: &Context) -> Result<Action> {
    let name = lb.name_any();
    let resync = Action::requeue(ctx.settings.resync);
    ctx.apply_daemonset(None).await?;

    if let Err(errors) = lb.spec.validate() {
        info!(%namespace, %name, "invalid spec: {errors}");
        write_status(
            lb,
            ctx,
            refused_status(lb, reason::INVALID_SPEC, &errors.to_string()),
        )
        .await?;
        return Ok(resync);
    }
    let resolved = match desired::resolve_spec(&lb.spec, &ctx.endpoints_for(lb)) {
        Ok(spec) => spec,
        Err(e) => {
            write_status(
                lb,
                ctx,
                refused_status(lb, reason::BACKEND_SERVICE_UNRESOLVED, &e.to_string()),
            )
            .await?;
            return Ok(resync);
        }
    };

    let selected = ctx.selected_nodes(lb);
    let want: BTreeMap<String, LoadBalancerNodeState> =
        desired::node_states(lb, &selected, &resolved)
            .into_iter()
            .map(|s| (s.spec.node_name.clone(), s))
            .collect();
    let existing = ctx.states_of(namespace, &name);
    let by_name: BTreeMap<String, Arc<LoadBalancerNodeState>> = ctx
        .caches
        .node_states
        .state()
        .into_iter()
        .filter(|s| s.namespace().as_deref() == Some(namespace))
        .map(|s| (s.name_any(), s))
        .collect();

    let mut apply_error: Option<Error> = None;
    let mut to_write = Vec::new();
    for state in want.values() {
        let state_name = state.name_any();
        if let Some(other) = by_name
            .get(&state_name)
            .filter(|o| o.spec.load_balancer != name)
        {
            apply_error.get_or_insert(Error::NameTaken(format!(
                "node state {state_name} belongs to LoadBalancer {}",
                other.spec.load_balancer
            )));
            continue;
        }
        if apply::node_state_needs_write(state, existing.get(&state.spec.node_name).map(|s| &**s))?
        {
            to_write.push(state.clone());
        }
    }
    // A few writes in flight at once: a new LoadBalancer on 1,000 nodes is 1,000 applies.
    let results: Vec<(LoadBalancerNodeState, Result<LoadBalancerNodeState>)> =
        futures::stream::iter(to_write)
            .map(|state| {
                let (client, metrics) = (ctx.client.clone(), ctx.metrics.clone());
                async move {
                    let result = apply::apply_node_state(&client, &metrics, &state).await;
                    (state, result)
                }
            })
            .buffered(APPLY_CONCURRENCY)
            .collect()
            .boxed()
            .await;
    let mut written = Vec::new();
    for (state, result) in results {
        match result {
            Ok(_) => written.push(state),
            Err(e) => {
                warn!(%namespace, %name, state = %state.name_any(), error = %e, "could not apply node state");
                apply_error.get_or_insert(e);
            }
        }
    }
    let mut pruned = Vec::new();
    for (node, state) in &existing {
        if !want.contains_key(node) {
            let state_name = state.name_any();
            match apply::delete_node_state(&ctx.client, &ctx.metrics, namespace, &state_name).await
            {
                Ok(()) => pruned.push(state_name),
                Err(e) => {
                    apply_error.get_or_insert(e);
                }
            }
        }
    }
    if !written.is_empty() || !pruned.is_empty() {
        let (limit, cache) = (ctx.settings.cache_catch_up, &ctx.caches.node_states);
        let seen = apply::await_cached(cache, namespace, &written, &pruned, limit).await;
        debug!(%namespace, %name, written = written.len(), pruned = pruned.len(), seen, "node states");
    }

    let lost = ctx.lost_by(lb, &selected);
    let agents = if ctx.settings.watch_agent_pods {
        ctx.agent_nodes()
    } else {
        None
    };
    let existing_refs: BTreeMap<String, &LoadBalancerNodeState> =
        existing.iter().map(|(k, v)| (k.clone(), &**v)).collect();
    let stamp = now();
    let (agents, grace_left) = match agents {
        Some(a) => {
            let (widened, left) = rollup::agents_within_grace(
                &a,
                &want,
                &existing_refs,
                &stamp,
                ctx.settings.agent_pod_grace,
            );
            (Some(widened), left)
        }
        None => (None, None),
    };
    let error_text = apply_error.as_ref().map(ToString::to_string);
    let status = rollup::rollup(
        lb.status.as_ref(),
        &Inputs {
            generation: lb.metadata.generation,
            scope: lb.spec.flow_marks.scope,
            desired: &want,
            existing: &existing_refs,
            agents: agents.as_ref(),
            lost: &lost,
            apply_error: error_text.as_deref(),
            selector: &describe_selector(lb),
        },
        stamp,
    );
    write_status(lb, ctx, status).await?;
    match (apply_error, grace_left) {
        (Some(e), _) => Err(e),
        // A node still without its agent pod when the grace runs out is then reported.
        (None, Some(left)) => Ok(Action::requeue(left.min(ctx.settings.resync))),
        (None, None) => Ok(resync),
    }
}

/// Whether the agent of `state` reported its current (VIP-less) generation.
fn acknowledged(state: &LoadBalancerNodeState) -> bool {
    state.spec.lb.vips.is_empty()
        && state.status.as_ref().is_some_and(|s| {
            s.observed_generation.is_some()
                && s.observed_generation == state.metadata.generation
                && s.vips == 0
        })
}

async fn cleanup(lb: &LoadBalancer, namespace: &str, ctx: &Context) -> Result<Action> {
    let name = lb.name_any();
    let states = ctx.states_of(namespace, &name);
    // 1. Empty every node state (the agents remove the VIPs, their marks and NIC rules).
    for state in states.values() {
        if state.spec.lb.vips.is_empty() {
            continue;
        }
        let mut emptied = state.spec.lb.clone();
        emptied.vips.clear();
        let body = desired::node_state(lb, &state.spec.node_name, &emptied);
        apply::apply_node_state(&ctx.client, &ctx.metrics, &body).await?;
    }
    // 2. Wait (bounded) for every agent to acknowledge.
    let waiting: Vec<String> = states
        .values()
        .filter(|s| !acknowledged(s))
        .map(|s| s.spec.node_name.clone())
        .collect();
    let since = lb
        .meta()
        .deletion_timestamp
        .as_ref()
        .map(|t| t.0)
        .unwrap_or_else(Timestamp::now);
    let waited = Timestamp::now().duration_since(since).unsigned_abs();
    if !waiting.is_empty() && waited < ctx.settings.cleanup_timeout {
        debug!(%namespace, %name, waiting = waiting.len(), "waiting for agents to remove the VIPs");
        return Ok(Action::requeue(CLEANUP_POLL));
    }
    if !waiting.is_empty() {
        let note = format!(
            "released after {}s without acknowledgement from the agents of {} node(s): {} (agent gone or not running?)",
            ctx.settings.cleanup_timeout.as_secs(),
            waiting.len(),
            waiting
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
        warn!(%namespace, %name, "{note}");
        ctx.event(lb, EventType::Warning, "CleanupTimedOut", note)
            .await;
    }
    // 3. Delete the node states, then let the LoadBalancer go.
    for state in states.values() {
        apply::delete_node_state(&ctx.client, &ctx.metrics, namespace, &state.name_any()).await?;
    }
    ctx.apply_daemonset(Some(lb)).await?;
    let rest: Vec<String> = lb
        .finalizers()
        .iter()
        .filter(|f| *f != OPERATOR_FINALIZER)
        .cloned()
        .collect();
    apply::set_finalizers(&ctx.client, &ctx.metrics, lb, rest).await?;
    info!(%namespace, %name, nodes = states.len(), "LoadBalancer cleaned up");
    Ok(Action::await_change())
}

/// Backoff after a failure: 1 s doubling to 5 min per LoadBalancer, reset by a success.
pub fn error_policy(lb: Arc<LoadBalancer>, error: &Error, ctx: Arc<Context>) -> Action {
    let mut failures = ctx.failures.lock().unwrap();
    let n = failures.entry(ObjectRef::from_obj(&*lb)).or_default();
    *n = n.saturating_add(1);
    let delay = BACKOFF_MIN
        .saturating_mul(1u32 << (*n - 1).min(16))
        .min(BACKOFF_MAX);
    warn!(lb = %lb.name_any(), namespace = ?lb.namespace(), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Waits until `store` received its first list. `Store::wait_until_ready` wakes only the last
/// of several concurrent waiters (kube-runtime 5 keeps one waker; the controller waits on its
/// own store too), so the wait is re-polled rather than trusted to wake.
async fn filled<K>(store: &Store<K>)
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    while tokio::time::timeout(Duration::from_millis(100), store.wait_until_ready())
        .await
        .is_err()
    {}
}

/// The EndpointSlice resource the cluster serves (`v1`, else `v1beta1`), if any.
pub async fn endpoint_slice_resource(client: &Client) -> Option<ApiResource> {
    match kube::discovery::oneshot::group(client, "discovery.k8s.io").await {
        Ok(group) => group.recommended_kind("EndpointSlice").map(|(ar, _)| ar),
        Err(e) => {
            warn!(error = %e, "the cluster serves no discovery.k8s.io: backendService resolves to no backends");
            None
        }
    }
}

/// Runs the controller until `shutdown` resolves; publishes its caches and readiness in
/// `shared` (for `/metrics` and `/readyz`).
pub async fn run(
    client: Client,
    settings: Settings,
    shared: Arc<Shared>,
    instance: String,
    shutdown: impl future::Future<Output = ()> + Send + Sync + 'static,
) {
    let wc = watcher::Config::default();
    let lbs: Api<LoadBalancer> = Api::all(client.clone());
    let controller = Controller::new(lbs, wc.clone());
    let lb_store = controller.store();

    let (states, states_writer) = reflector::store();
    let state_stream = watcher(
        Api::<LoadBalancerNodeState>::all(client.clone()),
        wc.clone()
            .labels(&format!("{MANAGED_BY_LABEL}={OPERATOR_FIELD_MANAGER}")),
    )
    .default_backoff()
    .reflect(states_writer)
    .touched_objects();

    let (nodes, nodes_writer) = reflector::store();
    let node_stream = watcher(Api::<Node>::all(client.clone()), wc.clone())
        .default_backoff()
        .reflect(nodes_writer)
        .touched_objects();

    let mut controller = controller
        .owns_stream(state_stream)
        .watches_stream(node_stream, {
            let lbs = lb_store.clone();
            move |_node: Node| {
                lbs.state()
                    .iter()
                    .map(|lb| ObjectRef::from_obj(&**lb))
                    .collect::<Vec<_>>()
            }
        });

    let mut endpoint_slices = None;
    if let Some(ar) = endpoint_slice_resource(&client).await {
        info!(version = %ar.api_version, "watching EndpointSlices");
        let writer = reflector::store::Writer::new(ar.clone());
        let store = writer.as_reader();
        let stream = watcher(
            Api::<DynamicObject>::all_with(client.clone(), &ar),
            wc.clone(),
        )
        .default_backoff()
        .reflect(writer)
        .touched_objects();
        let lbs = lb_store.clone();
        controller = controller.watches_stream_with(
            stream,
            move |slice: DynamicObject| {
                let Some((namespace, service)) = endpoints::service_of(&slice) else {
                    return Vec::new();
                };
                lbs.state()
                    .iter()
                    .filter(|lb| {
                        lb.namespace().as_deref() == Some(&namespace)
                            && lb.spec.vips.iter().any(|v| {
                                v.backend_service
                                    .as_ref()
                                    .is_some_and(|s| s.name == service)
                            })
                    })
                    .map(|lb| ObjectRef::from_obj(&**lb))
                    .collect::<Vec<_>>()
            },
            ar,
        );
        endpoint_slices = Some(store);
    }

    let mut agent_pods = None;
    if settings.watch_agent_pods {
        let (store, writer) = reflector::store();
        let api: Api<Pod> = Api::namespaced(client.clone(), &settings.namespace);
        let stream = watcher(
            api,
            wc.clone()
                .labels(&format!("{AGENT_APP_LABEL}={AGENT_NAME}")),
        )
        .default_backoff()
        .reflect(writer)
        .touched_objects();
        let lbs = lb_store.clone();
        controller = controller.watches_stream(stream, move |_pod: Pod| {
            lbs.state()
                .iter()
                .map(|lb| ObjectRef::from_obj(&**lb))
                .collect::<Vec<_>>()
        });
        agent_pods = Some(store);
    }

    let caches = Caches {
        loadbalancers: lb_store,
        node_states: states,
        nodes,
        endpoint_slices,
        agent_pods,
    };
    let (filled_tx, filled_rx) = tokio::sync::watch::channel(false);
    // The Service controller runs beside this one, on its own watches, until the same
    // shutdown (see `crate::services`).
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    let services = {
        let (client, settings, metrics) =
            (client.clone(), settings.clone(), shared.metrics.clone());
        let (instance, shutdown) = (instance.clone(), shutdown.clone());
        async move {
            if settings.services.enabled {
                crate::services::controller::run(client, settings, metrics, instance, shutdown)
                    .await;
            }
        }
    };
    let ctx = Arc::new(Context::new(
        client,
        settings,
        shared.metrics.clone(),
        caches.clone(),
        filled_rx,
        &instance,
    ));
    let _ = shared.caches.set(caches.clone());
    tokio::spawn(async move {
        filled(&caches.loadbalancers).await;
        filled(&caches.nodes).await;
        filled(&caches.node_states).await;
        if let Some(s) = &caches.endpoint_slices {
            filled(s).await;
        }
        if let Some(p) = &caches.agent_pods {
            filled(p).await;
        }
        let _ = filled_tx.send(true);
        shared
            .ready
            .store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let loadbalancers = controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| {
            if let Err(e) = result {
                debug!(error = %e, "controller");
            }
            future::ready(())
        });
    tokio::join!(loadbalancers, services);
}

#[cfg(test)]
mod tests;
