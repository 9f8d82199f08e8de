//! The Service controller (and the small pool controller beside it).
//!
//! Services: one reconcile per Service, triggered by the Service, its LoadBalancer (owned),
//! pools (any change may free or move addresses), Nodes, its EndpointSlices, namespace labels
//! and decapsulator pods. A reconcile reads caches, decides with the pure modules, and writes
//! only what differs:
//! 1. not served (type, class) or being deleted: delete its LoadBalancer, wait until it is gone
//!    (its agents remove the VIPs first), release its ledger entries, clear marklb's status
//!    fields (unless the Service is going), remove the finalizer;
//! 2. served: add the finalizer, allocate (ledger write with optimistic concurrency, re-read
//!    and re-decided on conflict), apply its LoadBalancer with the nodes as reals, write the
//!    Service's ingress and conditions, publish an event when the allocation condition changes.
//!
//! Pools: one reconcile per pool writes its `Valid` condition and counts, and drops ledger
//! entries whose Service is confirmed gone (by a GET, never from a cache alone).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, future};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DynamicObject};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use marklb_crds::conditions::{self, find_condition};
use marklb_crds::labels::OPERATOR_FIELD_MANAGER;
use marklb_crds::pool::{Family, PoolAllocation};
use marklb_crds::{LoadBalancer, LoadBalancerIPPool};
use tracing::{debug, info, warn};

use super::alloc::{self, Allocation, Ledger, Refusal};
use super::apply::{self, LedgerWrite};
use super::desired::{self, DECAP_NAME, ServiceCondition};
use super::reals::{self, LocalEndpoints, NodeFacts, RealInputs};
use super::request::{self, Request};
use super::{SERVICE_FINALIZER, SERVICE_LABEL, condition, pools, reason};
use crate::desired::{AGENT_APP_LABEL, selects};
use crate::metrics::Metrics;
use crate::settings::Settings;
use crate::{Error, Result};

/// Longest a reconcile waits for the caches after a start.
const CACHE_WAIT: Duration = Duration::from_secs(60);
/// How often a released Service checks that its LoadBalancer is gone.
const RELEASE_POLL: Duration = Duration::from_secs(1);
/// Ledger writes tried before a reconcile gives up (and backs off).
const LEDGER_ATTEMPTS: usize = 8;
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// The caches the Service controller reads.
#[derive(Clone)]
pub struct Caches {
    pub services: Store<Service>,
    pub pools: Store<LoadBalancerIPPool>,
    /// LoadBalancers made for Services (labelled [`SERVICE_LABEL`]).
    pub lbs: Store<LoadBalancer>,
    pub nodes: Store<Node>,
    pub namespaces: Store<Namespace>,
    pub endpoint_slices: Option<Store<DynamicObject>>,
    /// `None`: decapsulator pods not watched (every node may be a real).
    pub decap_pods: Option<Store<Pod>>,
}

/// What every Service reconcile shares.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    pub caches: Caches,
    recorder: Recorder,
    failures: Mutex<HashMap<String, u32>>,
    /// The decapsulator DaemonSet as last applied; held across the apply, so concurrent
    /// reconciles after a start apply it once.
    last_decap: tokio::sync::Mutex<Option<DaemonSet>>,
    /// The owner of the DaemonSet (the operator's ServiceAccount).
    install_owner: crate::install_owner::InstallOwner,
    caches_filled: tokio::sync::watch::Receiver<bool>,
}

fn now() -> Time {
    Time(Timestamp::now())
}

impl Context {
    /// A context over existing caches (tests build theirs; [`run`] the real ones).
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
            last_decap: tokio::sync::Mutex::default(),
            install_owner,
            caches_filled,
        }
    }

    async fn caches_ready(&self) {
        let mut filled = self.caches_filled.clone();
        if tokio::time::timeout(CACHE_WAIT, filled.wait_for(|f| *f))
            .await
            .is_err()
        {
            warn!("Service caches not filled after {CACHE_WAIT:?}; reconciling with what is there");
        }
    }

    /// Publishes an event about a Service; a failure is logged, never fatal.
    async fn event(&self, svc: &Service, type_: EventType, reason: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Allocate".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &svc.object_ref(&())).await {
            warn!(service = %svc.name_any(), error = %e, "could not publish event");
        }
    }

    fn pools(&self) -> Vec<Arc<LoadBalancerIPPool>> {
        self.caches.pools.state()
    }

    fn ledger_of(pools: &[Arc<LoadBalancerIPPool>]) -> Ledger {
        Ledger::from_pools(pools.iter().map(|p| {
            (
                p.metadata.name.as_deref().unwrap_or_default(),
                p.status
                    .as_ref()
                    .map(|s| s.allocations.as_slice())
                    .unwrap_or_default(),
            )
        }))
    }

    fn namespace_labels(&self, namespace: &str) -> BTreeMap<String, String> {
        self.caches
            .namespaces
            .get(&ObjectRef::new(namespace))
            .map(|n| n.labels().clone())
            .unwrap_or_default()
    }

    /// The LoadBalancer named for `svc`, if cached.
    fn lb_of(&self, svc: &Service) -> Option<Arc<LoadBalancer>> {
        let ns = svc.namespace().unwrap_or_default();
        self.caches
            .lbs
            .get(&ObjectRef::new(&desired::lb_name(&svc.name_any())).within(&ns))
    }

    fn node_facts(&self) -> Vec<NodeFacts> {
        let mut nodes: Vec<NodeFacts> = self
            .caches
            .nodes
            .state()
            .iter()
            .map(|n| NodeFacts::of(n))
            .collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        nodes
    }

    fn decap_ready(&self) -> Option<BTreeSet<String>> {
        let pods = self.caches.decap_pods.as_ref()?;
        Some(
            pods.state()
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .filter(|p| {
                    p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
                })
                .filter_map(|p| p.spec.as_ref().and_then(|s| s.node_name.clone()))
                .collect(),
        )
    }

    /// Applies the decapsulator DaemonSet once (and again when it changes).
    async fn apply_decap(&self) -> Result<()> {
        if !self.settings.services.manage_decap {
            return Ok(());
        }
        let mut ds = desired::decap_daemonset(&self.settings.namespace, &self.settings.agent);
        self.install_owner
            .own(&mut ds, &self.client, &self.metrics)
            .await;
        let mut last = self.last_decap.lock().await;
        if !crate::apply::daemonset_needs_write(&ds, last.as_ref())? {
            return Ok(());
        }
        let stored = apply::apply_daemonset(&self.client, &self.metrics, &ds).await?;
        info!(namespace = %self.settings.namespace, "applied the decapsulator DaemonSet");
        *last = Some(stored);
        Ok(())
    }
}

/// The ledger entries of pool `name` once `req` follows `outcome`, and whether that changes
/// them.
fn ledger_change(
    pool: &LoadBalancerIPPool,
    id: &request::ServiceId,
    outcome: Option<(&Request, &Allocation)>,
) -> Option<Vec<PoolAllocation>> {
    let current = pool
        .status
        .as_ref()
        .map(|s| s.allocations.clone())
        .unwrap_or_default();
    let next = alloc::record(&current, &pool.name_any(), id, outcome);
    (next != current).then_some(next)
}

/// Decides `req`'s allocation and records it in the pools' ledgers: decided from the cache;
/// when a ledger must change, decided again on pools read fresh and written only if they did
/// not change since (else read and decide again).
async fn allocate_and_record(
    ctx: &Context,
    req: Option<&Request>,
    id: &request::ServiceId,
    namespace_labels: &BTreeMap<String, String>,
) -> Result<Result<Allocation, Refusal>> {
    let decide = |pools: &[Arc<LoadBalancerIPPool>]| -> Option<Result<Allocation, Refusal>> {
        let req = req?;
        let refs: Vec<&LoadBalancerIPPool> = pools.iter().map(|p| &**p).collect();
        Some(alloc::allocate(
            req,
            &pools::views(&refs),
            &Context::ledger_of(pools),
            namespace_labels,
        ))
    };
    let released = || Refusal {
        reason: reason::RELEASED,
        message: "released".into(),
    };
    let mut pools = ctx.pools();
    // Whether `pools` holds the changing pools as just read from the API server.
    let mut read_fresh = false;
    for _attempt in 0..LEDGER_ATTEMPTS {
        let outcome = decide(&pools);
        let recorded = match (&outcome, req) {
            (Some(Ok(a)), Some(r)) => Some((r, a)),
            _ => None,
        };
        let changes: Vec<String> = pools
            .iter()
            .filter(|p| ledger_change(p, id, recorded).is_some())
            .map(|p| p.name_any())
            .collect();
        if changes.is_empty() {
            return Ok(outcome.unwrap_or_else(|| Err(released())));
        }
        // Read the pools that change afresh, decide again with them, write each against the
        // version read. Claims are written before releases (a Service moving between pools
        // never holds nothing in between).
        let mut fresh = pools.clone();
        if !read_fresh {
            for name in &changes {
                let stored = apply::get_pool(&ctx.client, name).await?;
                fresh.retain(|p| &p.name_any() != name);
                if let Some(p) = stored {
                    fresh.push(Arc::new(p));
                }
            }
        }
        let outcome = decide(&fresh);
        let recorded = match (&outcome, req) {
            (Some(Ok(a)), Some(r)) => Some((r, a)),
            _ => None,
        };
        let mut order: Vec<Arc<LoadBalancerIPPool>> = fresh
            .iter()
            .filter(|p| changes.contains(&p.name_any()))
            .cloned()
            .collect();
        order.sort_by_key(|p| recorded.is_none_or(|(_, a)| a.pool != p.name_any()));
        let mut stale = false;
        for pool in order {
            let Some(entries) = ledger_change(&pool, id, recorded) else {
                continue;
            };
            let views = pools::views(&fresh.iter().map(|p| &**p).collect::<Vec<_>>());
            let view = views
                .iter()
                .find(|v| v.name == pool.name_any())
                .expect("every pool has a view");
            let status = pools::status(&pool, view, entries, now());
            let rv = pool.resource_version().unwrap_or_default();
            match apply::write_pool_status(
                &ctx.client,
                &ctx.metrics,
                &pool.name_any(),
                &rv,
                &status,
            )
            .await?
            {
                LedgerWrite::Written => {
                    debug!(pool = %pool.name_any(), service = %id.key(), "ledger written");
                    let mut written = (*pool).clone();
                    written.status = Some(status);
                    // Later writes of this attempt see our own entry (rv moves on: read again
                    // next time).
                    fresh.retain(|p| p.name_any() != pool.name_any());
                    fresh.push(Arc::new(written));
                }
                LedgerWrite::Stale => {
                    stale = true;
                    break;
                }
            }
        }
        if !stale {
            return Ok(outcome.unwrap_or_else(|| Err(released())));
        }
        debug!(service = %id.key(), "a pool changed under us; reading it again");
        pools = fresh;
        for name in &changes {
            let stored = apply::get_pool(&ctx.client, name).await?;
            pools.retain(|p| &p.name_any() != name);
            if let Some(p) = stored {
                pools.push(Arc::new(p));
            }
        }
        read_fresh = true;
    }
    Err(Error::Kube(kube::Error::Api(
        kube::core::Status::failure(
            &format!(
                "pool ledgers kept changing for {} attempts",
                LEDGER_ATTEMPTS
            ),
            "Conflict",
        )
        .with_code(409)
        .boxed(),
    )))
}

/// Reconciles one Service.
pub async fn reconcile(svc: Arc<Service>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let result = reconcile_inner(&svc, &ctx).await;
    ctx.metrics.service_reconciliations.inc();
    if let Err(e) = &result {
        ctx.metrics
            .service_errors
            .with_label_values(&[e.metric_label()])
            .inc();
    }
    let key = format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any());
    if result.is_ok() {
        ctx.failures.lock().unwrap().remove(&key);
    }
    debug!(service = %key, took = ?started.elapsed(), ok = result.is_ok(), "service reconcile");
    result
}

async fn reconcile_inner(svc: &Service, ctx: &Context) -> Result<Action> {
    ctx.caches_ready().await;
    let policy = &ctx.settings.services.class;
    let served = request::is_served(svc, policy) && svc.meta().deletion_timestamp.is_none();
    let has_finalizer = svc.finalizers().iter().any(|f| f == SERVICE_FINALIZER);
    if !served {
        let uid = svc.uid().unwrap_or_default();
        let holds = Context::ledger_of(&ctx.pools())
            .held_by(&uid)
            .next()
            .is_some();
        let owns = ctx.lb_of(svc).is_some_and(|lb| desired::owned_by(&lb, svc));
        if has_finalizer || holds || owns {
            return release(svc, ctx).await;
        }
        return Ok(Action::await_change());
    }
    if !has_finalizer {
        let mut with = svc.finalizers().to_vec();
        with.push(SERVICE_FINALIZER.to_string());
        apply::set_service_finalizers(&ctx.client, &ctx.metrics, svc, with).await?;
        return Ok(Action::await_change());
    }
    serve(svc, ctx).await
}

/// Stops serving `svc`: its LoadBalancer goes first (the agents remove its VIPs), then its
/// addresses, marklb's status fields and the finalizer.
async fn release(svc: &Service, ctx: &Context) -> Result<Action> {
    let namespace = svc.namespace().unwrap_or_default();
    if let Some(lb) = ctx.lb_of(svc).filter(|lb| desired::owned_by(lb, svc)) {
        if lb.meta().deletion_timestamp.is_none() {
            apply::delete_lb(&ctx.client, &ctx.metrics, &namespace, &lb.name_any()).await?;
            info!(service = %svc.name_any(), %namespace, "deleting its LoadBalancer");
        }
        return Ok(Action::requeue(RELEASE_POLL));
    }
    let id = service_id(svc);
    let released = allocate_and_record(ctx, None, &id, &BTreeMap::new()).await?;
    debug_assert!(released.is_err());
    let going = svc.meta().deletion_timestamp.is_some();
    if !going
        && (!desired::current_ingress(svc).is_empty()
            || !desired::current_conditions(svc).is_empty())
    {
        apply::apply_service_status(&ctx.client, &ctx.metrics, svc, &[], &[]).await?;
    }
    let rest: Vec<String> = svc
        .finalizers()
        .iter()
        .filter(|f| *f != SERVICE_FINALIZER)
        .cloned()
        .collect();
    if rest.len() != svc.finalizers().len() {
        apply::set_service_finalizers(&ctx.client, &ctx.metrics, svc, rest).await?;
    }
    if !going {
        ctx.event(
            svc,
            EventType::Normal,
            reason::RELEASED,
            "no longer served by marklb: address released".into(),
        )
        .await;
    }
    info!(service = %svc.name_any(), %namespace, "released");
    Ok(Action::await_change())
}

fn service_id(svc: &Service) -> request::ServiceId {
    request::ServiceId {
        namespace: svc.namespace().unwrap_or_default(),
        name: svc.name_any(),
        uid: svc.uid().unwrap_or_default(),
    }
}

async fn serve(svc: &Service, ctx: &Context) -> Result<Action> {
    let namespace = svc.namespace().unwrap_or_default();
    let id = service_id(svc);
    ctx.apply_decap().await?;
    let req = request::read(svc);
    let outcome = match &req {
        Ok(r) => allocate_and_record(ctx, Some(r), &id, &ctx.namespace_labels(&namespace)).await?,
        Err(e) => {
            // Nothing is served for a request that cannot be read; what it held is released.
            let _released = allocate_and_record(ctx, None, &id, &BTreeMap::new()).await?;
            Err(Refusal {
                reason: reason::INVALID_REQUEST,
                message: e.to_string(),
            })
        }
    };

    let mut conditions = Vec::new();
    let mut addresses: Vec<IpAddr> = Vec::new();
    match (&outcome, &req) {
        (Ok(a), Ok(r)) => {
            addresses = a.addresses.clone();
            let list = a
                .addresses
                .iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            conditions.push(ServiceCondition {
                type_: condition::ADDRESS_ALLOCATED,
                status: true,
                reason: reason::ALLOCATED.into(),
                message: format!("{list} from pool {}", a.pool),
            });
            conditions.push(serve_lb(svc, r, a, ctx).await?);
        }
        (Err(refusal), _) => {
            if let Some(lb) = ctx.lb_of(svc).filter(|lb| desired::owned_by(lb, svc))
                && lb.meta().deletion_timestamp.is_none()
            {
                apply::delete_lb(&ctx.client, &ctx.metrics, &namespace, &lb.name_any()).await?;
            }
            conditions.push(ServiceCondition {
                type_: condition::ADDRESS_ALLOCATED,
                status: false,
                reason: refusal.reason.into(),
                message: refusal.message.clone(),
            });
            conditions.push(ServiceCondition {
                type_: condition::READY,
                status: false,
                reason: refusal.reason.into(),
                message: "the Service has no address".into(),
            });
        }
        (Ok(_), Err(_)) => unreachable!("a request that cannot be read is refused above"),
    }

    // The Service's status; an event when the allocation condition changes.
    let before = desired::current_conditions(svc);
    let (ingress, wanted) = desired::service_status(svc, &addresses, &conditions, now());
    if ingress != desired::current_ingress(svc) || wanted != before {
        apply::apply_service_status(&ctx.client, &ctx.metrics, svc, &ingress, &wanted).await?;
    }
    let old = find_condition(&before, condition::ADDRESS_ALLOCATED)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()));
    let new = &conditions[0];
    let new_key = (
        conditions::ConditionStatus::from(new.status)
            .as_str()
            .to_string(),
        new.reason.clone(),
        new.message.clone(),
    );
    if old.as_ref() != Some(&new_key) {
        ctx.metrics
            .service_allocations
            .with_label_values(&[new.reason.as_str()])
            .inc();
        let type_ = if new.status {
            EventType::Normal
        } else {
            EventType::Warning
        };
        ctx.event(svc, type_, &new.reason, new.message.clone())
            .await;
    }
    Ok(Action::requeue(ctx.settings.resync))
}

/// Applies the LoadBalancer of a Service that got `a`; returns its Ready condition.
async fn serve_lb(
    svc: &Service,
    req: &Request,
    a: &Allocation,
    ctx: &Context,
) -> Result<ServiceCondition> {
    let not_ready = |reason: &str, message: String| ServiceCondition {
        type_: condition::READY,
        status: false,
        reason: reason.into(),
        message,
    };
    let Some(pool) = ctx.pools().into_iter().find(|p| p.name_any() == a.pool) else {
        return Ok(not_ready(
            reason::POOL_NOT_FOUND,
            format!("pool {} is gone", a.pool),
        ));
    };
    let existing = ctx.lb_of(svc);
    if let Some(other) = existing.as_ref().filter(|lb| !desired::owned_by(lb, svc)) {
        return Ok(not_ready(
            reason::NAME_TAKEN,
            format!(
                "LoadBalancer {} exists and is not this Service's; rename it to let marklb serve the Service",
                other.name_any()
            ),
        ));
    }
    let nodes = ctx.node_facts();
    let balancers: BTreeSet<String> = ctx
        .caches
        .nodes
        .state()
        .iter()
        .filter(|n| {
            selects(
                pool.spec.node_selector.as_ref(),
                n.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()),
            )
        })
        .map(|n| n.name_any())
        .collect();
    let slices = ctx
        .caches
        .endpoint_slices
        .as_ref()
        .map(|s| s.state())
        .unwrap_or_default();
    let local: LocalEndpoints = reals::local_endpoints(
        &req.id.namespace,
        &req.id.name,
        slices.iter().map(|s| &**s),
        &nodes,
    );
    let decap = if ctx.settings.services.watch_decap_pods {
        ctx.decap_ready()
    } else {
        None
    };
    let inputs = RealInputs {
        traffic: req.traffic,
        balancers: &balancers,
        decap_ready: decap.as_ref(),
        local: &local,
    };
    let mut per_family = BTreeMap::new();
    let mut why_none = Vec::new();
    for family in a
        .addresses
        .iter()
        .map(|x| Family::of(*x))
        .collect::<BTreeSet<_>>()
    {
        let r = reals::reals(family, &nodes, &inputs);
        if r.backends.is_empty() {
            why_none.push(r.why_none.clone());
        }
        per_family.insert(family, r.backends);
    }
    let lb = desired::load_balancer(svc, req, &pool.spec, &a.addresses, &per_family);
    if apply::lb_needs_write(&lb, existing.as_deref())? {
        apply::apply_lb(&ctx.client, &ctx.metrics, &lb).await?;
        debug!(service = %svc.name_any(), lb = %lb.name_any(), "applied its LoadBalancer");
    }
    if !why_none.is_empty() {
        return Ok(not_ready(reason::NO_READY_NODES, why_none.join("; ")));
    }
    let ready = existing
        .as_ref()
        .and_then(|l| l.status.as_ref())
        .filter(|s| s.observed_generation == l_generation(existing.as_deref()))
        .and_then(|s| find_condition(&s.conditions, conditions::READY).cloned());
    Ok(match ready {
        Some(c) if c.status == "True" => ServiceCondition {
            type_: condition::READY,
            status: true,
            reason: reason::SERVING.into(),
            message: format!(
                "LoadBalancer {} is Ready on {} balancer node(s)",
                lb.name_any(),
                balancers.len()
            ),
        },
        Some(c) => not_ready(
            reason::LOADBALANCER_NOT_READY,
            format!(
                "LoadBalancer {}: {}: {}",
                lb.name_any(),
                c.reason,
                c.message
            ),
        ),
        None => not_ready(
            reason::LOADBALANCER_NOT_READY,
            format!(
                "LoadBalancer {} has no status for its spec yet",
                lb.name_any()
            ),
        ),
    })
}

fn l_generation(lb: Option<&LoadBalancer>) -> Option<i64> {
    lb.and_then(|l| l.metadata.generation)
}

/// Backoff after a failure: 1 s doubling to 5 min per Service, reset by a success.
pub fn error_policy(svc: Arc<Service>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any());
    let mut failures = ctx.failures.lock().unwrap();
    let n = failures.entry(key.clone()).or_default();
    *n = n.saturating_add(1);
    let delay = BACKOFF_MIN
        .saturating_mul(1u32 << (*n - 1).min(16))
        .min(BACKOFF_MAX);
    warn!(service = %key, error = %error, retry_in = ?delay, "service reconcile failed");
    Action::requeue(delay)
}

// ---- the pool controller ----

/// Writes a pool's `Valid` condition and counts; drops ledger entries of Services confirmed
/// gone.
pub async fn reconcile_pool(pool: Arc<LoadBalancerIPPool>, ctx: Arc<Context>) -> Result<Action> {
    ctx.caches_ready().await;
    let all = ctx.pools();
    let refs: Vec<&LoadBalancerIPPool> = all.iter().map(|p| &**p).collect();
    let views = pools::views(&refs);
    let Some(view) = views.iter().find(|v| v.name == pool.name_any()) else {
        return Ok(Action::await_change());
    };
    let mut entries = pool
        .status
        .as_ref()
        .map(|s| s.allocations.clone())
        .unwrap_or_default();
    let live: BTreeSet<String> = ctx
        .caches
        .services
        .state()
        .iter()
        .filter_map(|s| s.uid())
        .collect();
    let mut gone = BTreeSet::new();
    for e in entries.iter().filter(|e| !live.contains(&e.uid)) {
        // The cache may lag behind a Service just created: ask the API server.
        let stored = apply::get_service(&ctx.client, &e.namespace, &e.service).await?;
        if stored.is_none_or(|s| s.uid().as_deref() != Some(&e.uid)) {
            gone.insert(e.uid.clone());
        }
    }
    if !gone.is_empty() {
        warn!(pool = %pool.name_any(), services = gone.len(), "releasing addresses of Services that are gone");
        entries.retain(|e| !gone.contains(&e.uid));
    }
    let status = pools::status(&pool, view, entries, now());
    if pool.status.as_ref() != Some(&status) {
        let rv = pool.resource_version().unwrap_or_default();
        if apply::write_pool_status(&ctx.client, &ctx.metrics, &pool.name_any(), &rv, &status)
            .await?
            == LedgerWrite::Stale
        {
            // Written by a Service reconcile meanwhile: the watch brings the new version.
            return Ok(Action::requeue(BACKOFF_MIN));
        }
    }
    Ok(Action::requeue(ctx.settings.resync))
}

fn pool_error_policy(pool: Arc<LoadBalancerIPPool>, error: &Error, _ctx: Arc<Context>) -> Action {
    warn!(pool = %pool.name_any(), error = %error, "pool reconcile failed");
    Action::requeue(BACKOFF_MIN * 5)
}

// ---- wiring ----

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

/// Every served Service (to re-reconcile on a cluster-wide change).
fn served(services: &Store<Service>, policy: &request::ClassPolicy) -> Vec<ObjectRef<Service>> {
    services
        .state()
        .iter()
        .filter(|s| {
            request::is_served(s, policy) || s.finalizers().iter().any(|f| f == SERVICE_FINALIZER)
        })
        .map(|s| ObjectRef::from_obj(&**s))
        .collect()
}

/// Runs the Service and pool controllers until `shutdown` resolves.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    instance: String,
    shutdown: impl future::Future<Output = ()> + Send + Sync + 'static,
) {
    let wc = watcher::Config::default();
    let policy = settings.services.class.clone();
    let controller = Controller::new(Api::<Service>::all(client.clone()), wc.clone());
    let services = controller.store();

    let (lbs, writer) = reflector::store();
    let lb_stream = watcher(
        Api::<LoadBalancer>::all(client.clone()),
        wc.clone().labels(SERVICE_LABEL),
    )
    .default_backoff()
    .reflect(writer)
    .touched_objects();

    let (pools_store, writer) = reflector::store();
    let pool_stream = watcher(Api::<LoadBalancerIPPool>::all(client.clone()), wc.clone())
        .default_backoff()
        .reflect(writer)
        .touched_objects();

    let (nodes, writer) = reflector::store();
    let node_stream = watcher(Api::<Node>::all(client.clone()), wc.clone())
        .default_backoff()
        // Images and managed fields are most of a Node's size and none of our business.
        .modify(|n: &mut Node| {
            n.metadata.managed_fields = None;
            if let Some(s) = n.status.as_mut() {
                s.images = None;
            }
        })
        .reflect(writer)
        .touched_objects();

    let (namespaces, writer) = reflector::store();
    let ns_stream = watcher(Api::<Namespace>::all(client.clone()), wc.clone())
        .default_backoff()
        .reflect(writer)
        .touched_objects();

    let all =
        |services: Store<Service>, policy: request::ClassPolicy| move || served(&services, &policy);
    let every_pool = all(services.clone(), policy.clone());
    let every_node = all(services.clone(), policy.clone());
    let mut controller = controller
        .owns_stream(lb_stream)
        .watches_stream(pool_stream, move |_p: LoadBalancerIPPool| every_pool())
        .watches_stream(node_stream, move |_n: Node| every_node())
        .watches_stream(ns_stream, {
            let (services, policy) = (services.clone(), policy.clone());
            move |ns: Namespace| {
                let name = ns.name_any();
                served(&services, &policy)
                    .into_iter()
                    .filter(|r| r.namespace.as_deref() == Some(&name))
                    .collect::<Vec<_>>()
            }
        });

    let mut endpoint_slices = None;
    if let Some(ar) = crate::controller::endpoint_slice_resource(&client).await {
        let writer = reflector::store::Writer::new(ar.clone());
        let store = writer.as_reader();
        let stream = watcher(
            Api::<DynamicObject>::all_with(client.clone(), &ar),
            wc.clone(),
        )
        .default_backoff()
        .reflect(writer)
        .touched_objects();
        controller = controller.watches_stream_with(
            stream,
            |slice: DynamicObject| {
                crate::endpoints::service_of(&slice)
                    .map(|(ns, name)| ObjectRef::new(&name).within(&ns))
                    .into_iter()
                    .collect::<Vec<_>>()
            },
            ar,
        );
        endpoint_slices = Some(store);
    }

    let mut decap_pods = None;
    if settings.services.watch_decap_pods {
        let (store, writer) = reflector::store();
        let stream = watcher(
            Api::<Pod>::namespaced(client.clone(), &settings.namespace),
            wc.clone()
                .labels(&format!("{AGENT_APP_LABEL}={DECAP_NAME}")),
        )
        .default_backoff()
        .reflect(writer)
        .touched_objects();
        let every = all(services.clone(), policy.clone());
        controller = controller.watches_stream(stream, move |_p: Pod| every());
        decap_pods = Some(store);
    }

    let caches = Caches {
        services,
        pools: pools_store,
        lbs,
        nodes,
        namespaces,
        endpoint_slices,
        decap_pods,
    };
    let (filled_tx, filled_rx) = tokio::sync::watch::channel(false);
    let ctx = Arc::new(Context::new(
        client.clone(),
        settings,
        metrics,
        caches.clone(),
        filled_rx,
        &instance,
    ));
    tokio::spawn(async move {
        filled(&caches.services).await;
        filled(&caches.pools).await;
        filled(&caches.lbs).await;
        filled(&caches.nodes).await;
        filled(&caches.namespaces).await;
        if let Some(s) = &caches.endpoint_slices {
            filled(s).await;
        }
        if let Some(p) = &caches.decap_pods {
            filled(p).await;
        }
        let _ = filled_tx.send(true);
        info!("Service controller caches filled");
    });

    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    let pool_controller = Controller::new(Api::<LoadBalancerIPPool>::all(client), wc)
        .graceful_shutdown_on(shutdown.clone())
        .run(reconcile_pool, pool_error_policy, ctx.clone())
        .for_each(|_| future::ready(()));
    let service_controller = controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| {
            if let Err(e) = r {
                debug!(error = %e, "service controller");
            }
            future::ready(())
        });
    tokio::join!(pool_controller, service_controller);
}

#[cfg(test)]
mod tests;
