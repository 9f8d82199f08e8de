//! What happened to the rule requests of the mellanox backend: rules installed, rejected by
//! reason, install latency. Each backend keeps its own counts (tests and the status read
//! them); the same events feed process-wide Prometheus collectors that `Metrics` registers,
//! so a scrape never takes the engine's lock to read them.

use std::{
    collections::BTreeMap,
    sync::LazyLock,
    time::{Duration, Instant},
};

use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts};

/// Why the device (or the backend on its behalf) refused a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rejection {
    /// ENOSPC / ENOMEM / E2BIG: the steering table (or the driver's memory) is full.
    TableFull,
    /// EOPNOTSUPP / EINVAL: the driver cannot offload this rule (switchdev mode, a key or
    /// action it does not take).
    Unsupported,
    /// Not sent: the backend is backing off after one of the above.
    Backoff,
    /// Any other errno, or an answer that never came (the rule was deleted to be sure).
    Other,
}

impl Rejection {
    pub fn of_errno(errno: i32) -> Self {
        match errno {
            libc::ENOSPC | libc::ENOMEM | libc::E2BIG => Rejection::TableFull,
            libc::EOPNOTSUPP | libc::EINVAL => Rejection::Unsupported,
            _ => Rejection::Other,
        }
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::TableFull => "table_full",
            Rejection::Unsupported => "unsupported",
            Rejection::Backoff => "backoff",
            Rejection::Other => "other",
        }
    }

    /// Whether the backend should stop asking for a while.
    pub fn backs_off(self) -> bool {
        matches!(self, Rejection::TableFull | Rejection::Unsupported)
    }
}

/// The process-wide collectors (registered by `Metrics::new`).
pub struct RuleMetrics {
    /// `marklb_nic_rules_installed_total`.
    pub installed: IntCounterVec,
    /// `marklb_nic_rules_rejected_total{reason}`.
    pub rejected: IntCounterVec,
    /// `marklb_nic_rule_install_seconds`: request sent to its ack (a batch's requests share
    /// one datagram, so each gets the batch's round trip).
    pub install_seconds: Histogram,
}

pub static RULE_METRICS: LazyLock<RuleMetrics> = LazyLock::new(|| {
    RuleMetrics {
    installed: IntCounterVec::new(
        Opts::new(
            "marklb_nic_rules_installed_total",
            "Flow rules the NIC accepted (tc flower, skip_sw), by backend",
        ),
        &["backend"],
    )
    .expect("metric"),
    rejected: IntCounterVec::new(
        Opts::new(
            "marklb_nic_rules_rejected_total",
            "Flow rules the NIC refused or the backend did not send, by reason (table_full, unsupported, backoff, other); the flow stays on the software path",
        ),
        &["backend", "reason"],
    )
    .expect("metric"),
    install_seconds: Histogram::with_opts(
        HistogramOpts::new(
            "marklb_nic_rule_install_seconds",
            "Time from sending a flow rule request to the kernel's ack (firmware steering included)",
        )
        .buckets(vec![
            5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 1.0,
        ]),
    )
    .expect("metric"),
}
});

/// One backend's counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleCounts {
    pub installed: u64,
    pub rejected: BTreeMap<Rejection, u64>,
    /// Datagrams sent with installs (several requests each when batching).
    pub batches: u64,
    /// Requests whose answer never came (the batch failed as a whole).
    pub unknown: u64,
}

impl RuleCounts {
    pub fn installed(&mut self, n: u64, round_trip: Duration) {
        self.installed += n;
        RULE_METRICS
            .installed
            .with_label_values(&["mellanox"])
            .inc_by(n);
        for _ in 0..n {
            RULE_METRICS
                .install_seconds
                .observe(round_trip.as_secs_f64());
        }
    }

    pub fn rejected(&mut self, why: Rejection) {
        *self.rejected.entry(why).or_default() += 1;
        RULE_METRICS
            .rejected
            .with_label_values(&["mellanox", why.label()])
            .inc();
    }

    pub fn rejected_for(&self, why: Rejection) -> u64 {
        self.rejected.get(&why).copied().unwrap_or(0)
    }
}

/// Exponential backoff after the device refuses rules for want of room or support: installs
/// are refused without a request until it ends (their flows stay on the software path and
/// may earn a mark again later); a success resets it.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
    until: Option<Instant>,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            next: initial,
            until: None,
        }
    }

    /// Whether installs wait at `now`.
    pub fn active(&self, now: Instant) -> bool {
        self.until.is_some_and(|u| now < u)
    }

    pub fn failed(&mut self, now: Instant) {
        self.until = Some(now + self.next);
        self.next = (self.next * 2).min(self.max);
    }

    pub fn succeeded(&mut self) {
        self.next = self.initial;
        self.until = None;
    }

    /// The delay the next failure starts.
    pub fn next_delay(&self) -> Duration {
        self.next
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(30))
    }
}
