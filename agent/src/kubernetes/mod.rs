//! Kubernetes mode (`marklb-agent run --kubernetes`): the second source of desired state for
//! the node engine.
//!
//! The agent watches the LoadBalancerNodeStates labelled with its node (`marklb.io/node`;
//! default list-watch, which Kubernetes 1.20 serves), programs the engine from all of them at
//! once ([`program`]), and writes each state's status ([`status`]) with server-side apply as
//! field manager `marklb-agent`, coalesced ([`book`]): nothing when unchanged, at most one
//! write per state per second under churn.
//!
//! Invariants:
//! - nothing is programmed before a complete list of the states has been seen: an agent
//!   started while the API server is away keeps serving what its pinned datapath serves;
//! - losing the API server changes nothing on the node: the watch retries (with a short
//!   back-off, [`retry`]), writes are retried, and a re-list replaces the agent's copy whole (a state
//!   deleted meanwhile is removed from the datapath then);
//! - the loop never waits on the API server: writes run as their own tasks;
//! - one state that cannot be served (invalid, in conflict, refused by the engine) is
//!   reported in its own status; the others keep serving.
//!
//! Deletion of a LoadBalancer: the operator empties the VIPs of its states first and waits
//! for each agent to report that generation with `vips: 0` (agents hold no finalizer); that
//! is an ordinary spec change here.

mod book;
mod leave;
mod program;
mod retry;
mod states;
mod status;
mod writer;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use kube::{Api, Client, ResourceExt, runtime::watcher};
use marklb_crds::{LoadBalancerNodeState, labels::node_selector};
use tokio::sync::mpsc;

use crate::{
    daemon::{RunArgs, Stop, Surfaces, open_node},
    metrics::Metrics,
    node::{self, Node},
};
use book::{Decision, StatusBook};
use program::Programmed;
use retry::WatchRetry;
use states::{NodeStates, Specs, StateKey, owner_of};
use status::{NodeFacts, Outcome, now_seconds, status_for};
use writer::{WriteResult, spawn_write};

/// How long a starting agent waits for the first list of its states before it attaches
/// anyway (serving what its pinned datapath serves, or nothing).
const FIRST_LIST_WAIT: Duration = Duration::from_secs(5);
/// How often programming is retried while some state failed in the engine.
const PROGRAM_RETRY: Duration = Duration::from_secs(5);
/// At most one log line per this interval about a failing watch.
const WATCH_ERROR_LOG: Duration = Duration::from_secs(30);

/// The Kubernetes source's state between loop turns.
struct KubeSource {
    client: Client,
    node_name: String,
    metrics: Arc<Metrics>,
    states: NodeStates,
    book: StatusBook,
    programmed: Programmed,
    /// The specs the engine was last programmed from (`None`: never).
    programmed_specs: Option<Specs>,
    retry_program_at: Option<Instant>,
    /// When a coalesced write falls due.
    wake_at: Option<Instant>,
    done: mpsc::UnboundedSender<(StateKey, WriteResult)>,
    watch_errors: u64,
    watch_error_logged: Option<Instant>,
}

impl KubeSource {
    fn on_event(&mut self, event: watcher::Event<LoadBalancerNodeState>) {
        let relisted = matches!(event, watcher::Event::InitDone);
        match &event {
            watcher::Event::Apply(obj) => self.book.observed(
                &StateKey::of(obj),
                obj.uid().as_deref(),
                obj.status.as_ref(),
            ),
            watcher::Event::Delete(obj) => {
                let key = StateKey::of(obj);
                self.book.retain(|k| *k != key);
            }
            _ => {}
        }
        self.states.on_event(event);
        if relisted {
            let states = &self.states;
            self.book.retain(|k| states.get(k).is_some());
            for (k, s) in states.iter() {
                self.book.observed(k, s.uid().as_deref(), s.status.as_ref());
            }
            if self.watch_errors > 0 {
                tracing::info!(
                    node_states = states.len(),
                    "the node-state watch is back; caught up with the API server"
                );
                self.watch_errors = 0;
                self.watch_error_logged = None;
            }
        }
    }

    fn on_watch_error(&mut self, e: watcher::Error) {
        self.watch_errors += 1;
        self.metrics.watch_errors.inc();
        let now = Instant::now();
        if self
            .watch_error_logged
            .is_none_or(|t| now.duration_since(t) >= WATCH_ERROR_LOG)
        {
            tracing::warn!(
                error = %e,
                errors = self.watch_errors,
                "watching node states failed; the datapath keeps serving what it has, retrying"
            );
            self.watch_error_logged = Some(now);
        }
    }

    fn needs_programming(&self) -> bool {
        self.states.synced()
            && (self.programmed_specs.as_ref() != Some(&self.states.specs())
                || self.retry_program_at.is_some_and(|t| t <= Instant::now()))
    }

    async fn program(&mut self, node: &mut Node) {
        let specs = self.states.specs();
        let specs_changed = self.programmed_specs.as_ref() != Some(&specs);
        let started = Instant::now();
        let (programmed, summary) =
            program::program(node, &self.states, &self.node_name, &self.programmed).await;
        let took_ms = started.elapsed().as_millis() as u64;
        let count = |f: fn(&Outcome) -> bool| programmed.outcomes.values().filter(|o| f(o)).count();
        let failed = count(|o| matches!(o, Outcome::Failed(_)));
        let rejected = count(|o| matches!(o, Outcome::Rejected(_)));
        let conflicts = count(|o| matches!(o, Outcome::Merged(v) if !v.is_serving()));
        if failed == 0 {
            self.metrics.reloads.with_label_values(&["success"]).inc();
            self.metrics.config_valid.set(1);
            self.retry_program_at = None;
        } else {
            self.metrics.reloads.with_label_values(&["failure"]).inc();
            self.metrics.config_valid.set(0);
            self.retry_program_at = Some(Instant::now() + PROGRAM_RETRY);
        }
        let mut news = 0;
        for (key, outcome) in &programmed.outcomes {
            if self.programmed.outcomes.get(key) == Some(outcome) {
                continue;
            }
            news += 1;
            let problem = match outcome {
                Outcome::Rejected(e) | Outcome::Failed(e) => Some(e.clone()),
                Outcome::Merged(v) => v.problem(),
            };
            if let Some(p) = problem {
                tracing::warn!(node_state = %key, "not served: {p}");
            }
        }
        let states = self.states.len();
        // A retry that changes nothing (a state the engine keeps refusing) is not news.
        if news > 0 || specs_changed {
            tracing::info!(
                node_states = states,
                rejected,
                conflicts,
                failed,
                took_ms,
                %summary,
                "node states programmed"
            );
        } else {
            tracing::debug!(node_states = states, failed, took_ms, %summary, "node states programmed again");
        }
        self.programmed = programmed;
        self.programmed_specs = Some(specs);
    }

    /// Computes every state's status and starts the writes that are due.
    fn write_statuses(&mut self, node: &Node) {
        let handle = node.handle();
        let marks = handle.published().marks();
        let facts = NodeFacts {
            report: handle.report(),
            marks_exhausted: marks.capacity > 0 && marks.in_use as u64 >= u64::from(marks.capacity),
        };
        let now = Instant::now();
        let stamp = now_seconds();
        let mut wake: Option<Instant> = None;
        for (key, state) in self.states.iter() {
            let Some(outcome) = self.programmed.outcomes.get(key) else {
                continue; // not programmed yet
            };
            // A rejected duplicate shares its owner with the state that is served.
            let owner = match outcome {
                Outcome::Rejected(_) => None,
                _ => {
                    let name = owner_of(state).to_string();
                    facts.report.owners.iter().find(|o| o.owner == name)
                }
            };
            let observed = state.status.as_ref();
            let wanted = status_for(
                self.book.baseline(key, observed),
                state.metadata.generation,
                state.spec.lb.flow_marks.scope,
                outcome,
                owner,
                &facts,
                stamp.clone(),
            );
            match self.book.decide(key, &wanted, observed, now) {
                Decision::Write => {
                    self.book.started(key, now);
                    spawn_write(self.client.clone(), key.clone(), wanted, self.done.clone());
                }
                Decision::WaitUntil(at) => wake = Some(wake.map_or(at, |w| w.min(at))),
                Decision::Nothing => {}
            }
        }
        self.wake_at = wake;
    }

    fn on_write_done(&mut self, key: StateKey, result: WriteResult) {
        let writes = &self.metrics.status_writes;
        match result {
            WriteResult::Written(obj) => {
                writes.with_label_values(&["success"]).inc();
                self.book.succeeded(
                    &key,
                    obj.uid().as_deref(),
                    obj.status.clone().unwrap_or_default(),
                );
                self.states.observe_written(*obj);
            }
            WriteResult::Gone => {
                writes.with_label_values(&["gone"]).inc();
                self.book.retain(|k| *k != key);
            }
            WriteResult::Failed(e) => {
                writes.with_label_values(&["failure"]).inc();
                let (retry, failures) = self.book.failed(&key, Instant::now());
                // Once per streak: an API server away for an hour must not fill the log.
                if failures == 1 {
                    tracing::warn!(node_state = %key, error = %e, ?retry, "writing the status failed; retrying");
                } else {
                    tracing::debug!(node_state = %key, error = %e, failures, ?retry, "writing the status failed again");
                }
            }
        }
    }
}

/// Kubernetes mode: runs until SIGTERM/SIGINT.
pub async fn run(args: RunArgs) -> Result<()> {
    let node_name = args
        .node_name
        .clone()
        .context("--kubernetes needs this node's name: --node-name or NODE_NAME")?;
    let interface = match (&args.interface, args.interface_of) {
        (Some(i), _) => i.clone(),
        (None, Some(addr)) => crate::decap::interface_holding(addr).with_context(|| {
            format!("finding the interface that holds {addr} (--interface-of, HOST_IP)")
        })?,
        (None, None) => bail!(
            "no interface: pass --interface, or --interface-of ADDR (the DaemonSet sets HOST_IP)"
        ),
    };
    let client = Client::try_default()
        .await
        .context("Kubernetes client (in-cluster service account, or KUBECONFIG)")?;
    let mut node = open_node(&args, interface, node::default_mark_policy()).await?;
    let metrics = Arc::new(Metrics::new());
    let surfaces = Surfaces::start(&mut node, &metrics, args.metrics_addr);
    let selector = node_selector(&node_name);
    tracing::info!(node = node_name, %selector, "watching this node's node states");

    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let mut source = KubeSource {
        client: client.clone(),
        node_name,
        metrics: metrics.clone(),
        states: NodeStates::default(),
        book: StatusBook::default(),
        programmed: Programmed::default(),
        programmed_specs: None,
        retry_program_at: None,
        wake_at: None,
        done: done_tx,
        watch_errors: 0,
        watch_error_logged: None,
    };
    let api: Api<LoadBalancerNodeState> = Api::all(client);
    let mut watch = watcher(api, watcher::Config::default().labels(&selector)).boxed();
    let mut retry = WatchRetry::default();
    // After an error the watch is not polled until then (polling it retries at once).
    let mut watch_paused_until: Option<tokio::time::Instant> = None;

    let mut stop = Stop::new()?;
    let mut upkeep = tokio::time::interval(Duration::from_secs(1));
    let attach_by = tokio::time::Instant::now() + FIRST_LIST_WAIT;
    let mut attached = false;
    loop {
        let wake = source
            .wake_at
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        let resume = watch_paused_until.unwrap_or_else(tokio::time::Instant::now);
        tokio::select! {
            event = watch.next(), if watch_paused_until.is_none() => match event {
                Some(Ok(e)) => {
                    retry.reset();
                    source.on_event(e)
                }
                Some(Err(e)) => {
                    let delay = retry.after(&e, retry::jitter());
                    source.on_watch_error(e);
                    watch_paused_until = Some(tokio::time::Instant::now() + delay);
                }
                None => bail!("the node-state watch ended"),
            },
            _ = tokio::time::sleep_until(resume), if watch_paused_until.is_some() => {
                watch_paused_until = None;
            }
            Some((key, result)) = done_rx.recv() => source.on_write_done(key, result),
            _ = upkeep.tick() => node.tick(),
            _ = tokio::time::sleep_until(wake) => {}
            _ = tokio::time::sleep_until(attach_by), if !attached => {}
            _ = stop.requested() => break,
        }
        if source.needs_programming() {
            source.program(&mut node).await;
        }
        // Attach once the states are programmed (the first packet meets them), or after
        // waiting for them long enough.
        if !attached
            && (source.programmed_specs.is_some() || tokio::time::Instant::now() >= attach_by)
        {
            if source.programmed_specs.is_none() {
                tracing::warn!(
                    "no list of node states within {FIRST_LIST_WAIT:?}; attaching with what the \
                     datapath has (the states are programmed once the API server answers)"
                );
            }
            node.attach().await?;
            attached = true;
        }
        if attached && source.programmed_specs.is_some() {
            source.write_statuses(&node);
        }
        surfaces.check()?;
    }
    surfaces.stop();
    let leaving = leave::Leaving {
        remove_on_exit: args.remove_on_exit,
        synced: source.states.synced(),
        node_states: source.states.len(),
        vips: node.handle().lock().model.vip_count(),
    };
    let remove = match leave::on_exit(leaving) {
        leave::OnExit::Remove(why) => {
            tracing::info!(reason = why, "removing the datapath on exit");
            true
        }
        leave::OnExit::Keep => false,
    };
    node.finish(remove)
}
