//! Prometheus metrics of the operator (`/metrics`).
//!
//! Counters and the duration histogram are updated by the controller; the per-condition gauges
//! of LoadBalancers and node states are computed at scrape time from the watch caches, so they
//! are always consistent with what the operator sees and cost nothing between scrapes.
//! Labels are low-cardinality: error kinds, condition types and statuses, object kinds and
//! verbs; never object names.

use std::collections::BTreeMap;
use std::time::Duration;

use marklb_crds::{LoadBalancer, LoadBalancerNodeState};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// The operator's metrics and their registry.
pub struct Metrics {
    registry: Registry,
    /// Reconciliations run (apply and cleanup).
    pub reconciliations: IntCounter,
    /// Failed reconciliations by error kind ([`crate::Error::metric_label`]).
    pub errors: IntCounterVec,
    /// Duration of reconciliations.
    pub duration: Histogram,
    /// Writes sent to the API server, by object kind and verb (apply, delete, status...).
    pub writes: IntCounterVec,
    /// 1 while this replica holds the leader Lease (or runs without election).
    pub leader: IntGauge,
    loadbalancers: IntGaugeVec,
    node_states: IntGaugeVec,
    /// Service reconciliations run (`crate::services`).
    pub service_reconciliations: IntCounter,
    /// Failed Service reconciliations, by error kind.
    pub service_errors: IntCounterVec,
    /// Changes of a Service's allocation, by outcome (`Allocated`, `PoolExhausted`,
    /// `AddressInUse`...): a rising `PoolExhausted` is a pool to grow.
    pub service_allocations: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Fresh metrics in their own registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        let reconciliations = IntCounter::new(
            "marklb_operator_reconciliations_total",
            "LoadBalancer reconciliations run",
        )
        .unwrap();
        let errors = IntCounterVec::new(
            Opts::new(
                "marklb_operator_reconcile_errors_total",
                "Failed LoadBalancer reconciliations, by error kind",
            ),
            &["error"],
        )
        .unwrap();
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "marklb_operator_reconcile_duration_seconds",
                "Duration of LoadBalancer reconciliations",
            )
            .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0]),
        )
        .unwrap();
        let writes = IntCounterVec::new(
            Opts::new(
                "marklb_operator_api_writes_total",
                "Writes the operator sent to the API server, by kind and verb",
            ),
            &["kind", "verb"],
        )
        .unwrap();
        let leader = IntGauge::new(
            "marklb_operator_leader",
            "1 while this replica leads (holds the Lease)",
        )
        .unwrap();
        let loadbalancers = IntGaugeVec::new(
            Opts::new(
                "marklb_operator_loadbalancers",
                "LoadBalancers by condition type and status",
            ),
            &["condition", "status"],
        )
        .unwrap();
        let node_states = IntGaugeVec::new(
            Opts::new(
                "marklb_operator_node_states",
                "LoadBalancerNodeStates by condition type and status (Unknown: no status yet)",
            ),
            &["condition", "status"],
        )
        .unwrap();
        let service_reconciliations = IntCounter::new(
            "marklb_operator_service_reconciliations_total",
            "Reconciliations of Services of type LoadBalancer",
        )
        .unwrap();
        let service_errors = IntCounterVec::new(
            Opts::new(
                "marklb_operator_service_reconcile_errors_total",
                "Failed reconciliations of Services of type LoadBalancer, by error kind",
            ),
            &["error"],
        )
        .unwrap();
        let service_allocations = IntCounterVec::new(
            Opts::new(
                "marklb_operator_service_allocations_total",
                "Changes of a Service's address allocation, by outcome (reason)",
            ),
            &["result"],
        )
        .unwrap();
        for c in [
            Box::new(service_reconciliations.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(service_errors.clone()),
            Box::new(service_allocations.clone()),
            Box::new(reconciliations.clone()),
            Box::new(errors.clone()),
            Box::new(duration.clone()),
            Box::new(writes.clone()),
            Box::new(leader.clone()),
            Box::new(loadbalancers.clone()),
            Box::new(node_states.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Self {
            registry,
            reconciliations,
            errors,
            duration,
            writes,
            leader,
            loadbalancers,
            node_states,
            service_reconciliations,
            service_errors,
            service_allocations,
        }
    }

    /// Counts one finished reconciliation.
    pub fn observe(&self, took: Duration, error: Option<&'static str>) {
        self.reconciliations.inc();
        self.duration.observe(took.as_secs_f64());
        if let Some(kind) = error {
            self.errors.with_label_values(&[kind]).inc();
        }
    }

    /// Counts one write to the API server.
    pub fn wrote(&self, kind: &str, verb: &str) {
        self.writes.with_label_values(&[kind, verb]).inc();
    }

    /// Total writes so far, over all kinds and verbs.
    pub fn total_writes(&self) -> u64 {
        let mut total = 0;
        for family in prometheus::core::Collector::collect(&self.writes) {
            for m in family.get_metric() {
                total += m.get_counter().get_value() as u64;
            }
        }
        total
    }

    /// The text exposition, with the condition gauges computed from `lbs` and `states`.
    pub fn render<'a>(
        &self,
        lbs: impl IntoIterator<Item = &'a LoadBalancer>,
        states: impl IntoIterator<Item = &'a LoadBalancerNodeState>,
    ) -> String {
        fn count<'b>(
            gauge: &IntGaugeVec,
            conditions: impl Iterator<
                Item = Option<&'b [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]>,
            >,
            types: &[&str],
        ) {
            let mut counts: BTreeMap<(String, String), i64> = BTreeMap::new();
            for t in types {
                for s in ["True", "False", "Unknown"] {
                    counts.insert((t.to_string(), s.to_string()), 0);
                }
            }
            for conds in conditions {
                for t in types {
                    let status = conds
                        .and_then(|c| c.iter().find(|c| c.type_ == *t))
                        .map(|c| c.status.clone())
                        .unwrap_or_else(|| "Unknown".into());
                    *counts.entry((t.to_string(), status)).or_default() += 1;
                }
            }
            gauge.reset();
            for ((t, s), n) in counts {
                gauge.with_label_values(&[&t, &s]).set(n);
            }
        }
        use marklb_crds::conditions as c;
        count(
            &self.loadbalancers,
            lbs.into_iter()
                .map(|lb| lb.status.as_ref().map(|s| s.conditions.as_slice())),
            &[
                c::READY,
                c::PROGRAMMED,
                c::OFFLOADED,
                c::DEGRADED,
                c::CONFLICT,
            ],
        );
        count(
            &self.node_states,
            states
                .into_iter()
                .map(|s| s.status.as_ref().map(|s| s.conditions.as_slice())),
            &[
                c::NODE_READY,
                c::DATAPATH_ATTACHED,
                c::MARKS_PROGRAMMED,
                c::NODE_CONFLICT,
            ],
        );
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{Agent, lb, reported};

    #[test]
    fn condition_gauges_count_objects_and_unknown_for_no_status() {
        let m = Metrics::new();
        let web = lb("prod", "web", 1, "{}");
        let state = crate::desired::node_state(&web, "a", &web.spec);
        let ready = reported(
            state.clone(),
            Agent::Ready {
                offloaded: true,
                marks: 1,
            },
        );
        let failed = reported(state.clone(), Agent::Failed("AttachFailed"));
        m.observe(Duration::from_millis(3), None);
        m.observe(Duration::from_millis(3), Some("conflict"));
        m.wrote("LoadBalancerNodeState", "apply");
        let text = m.render([&web], [&ready, &failed, &state]);
        for line in [
            "marklb_operator_reconciliations_total 2",
            "marklb_operator_reconcile_errors_total{error=\"conflict\"} 1",
            "marklb_operator_api_writes_total{kind=\"LoadBalancerNodeState\",verb=\"apply\"} 1",
            "marklb_operator_loadbalancers{condition=\"Ready\",status=\"Unknown\"} 1",
            "marklb_operator_loadbalancers{condition=\"Ready\",status=\"True\"} 0",
            "marklb_operator_node_states{condition=\"Ready\",status=\"True\"} 1",
            "marklb_operator_node_states{condition=\"Ready\",status=\"False\"} 1",
            "marklb_operator_node_states{condition=\"Ready\",status=\"Unknown\"} 1",
            "marklb_operator_reconcile_duration_seconds_count 2",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert_eq!(m.total_writes(), 1);
        // Gauges are recomputed, not accumulated.
        let text = m.render([], []);
        assert!(
            text.contains("marklb_operator_node_states{condition=\"Ready\",status=\"True\"} 0"),
            "{text}"
        );
    }
}
