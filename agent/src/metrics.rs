//! Prometheus metrics. Datapath counters live in per-CPU BPF maps and are summed at scrape
//! time (as Katran does): each scrape rewrites the datapath metric vectors from a fresh
//! snapshot, so removed VIPs and reals disappear and values equal the kernel's counters.
//!
//! A scrape reads only what the node engine publishes ([`NodeView`], [`MarkSnapshot`]) and
//! the statistics maps through its own [`StatsReader`]: it never takes the engine's lock,
//! so however many VIPs and reals it reports, the new-flow event consumer never waits for
//! it. Concurrent scrapes are serialised among themselves (they rewrite the same vectors).

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use std::sync::Mutex;

use marklb_common::Counter;

use crate::{
    datapath::StatsReader,
    desired::OwnerVerdict,
    node::{MarkSnapshot, NodeView},
};

pub struct Metrics {
    registry: Registry,
    vip_packets: IntCounterVec,
    vip_bytes: IntCounterVec,
    real_packets: IntCounterVec,
    real_bytes: IntCounterVec,
    path_packets: IntCounterVec,
    flow_events: IntCounterVec,
    nic_packets: IntCounterVec,
    conn_evictions: IntCounter,
    mark_installs: IntCounterVec,
    marks_removed: IntCounterVec,
    marks_in_use: IntGauge,
    marks_capacity: IntGauge,
    nic_rules: IntGauge,
    vips: IntGauge,
    reals: IntGauge,
    info: IntGaugeVec,
    loadbalancers: IntGaugeVec,
    /// One scrape at a time rewrites the vectors.
    scrape: Mutex<()>,
    /// New-flow event (packet seen) to NIC rule installed.
    pub event_to_mark: HistogramVec,
    pub reloads: IntCounterVec,
    pub config_valid: IntGauge,
    /// Kubernetes mode: node-state status writes by result (success, failure, gone).
    pub status_writes: IntCounterVec,
    /// Kubernetes mode: errors of the node-state watch (API server away, refused...).
    pub watch_errors: IntCounter,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric");
    r.register(Box::new(c.clone())).expect("register");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("metric");
    r.register(Box::new(g.clone())).expect("register");
    g
}

/// Path counters reported as events or emulated-NIC outcomes rather than packet paths.
fn event_result(c: Counter) -> Option<&'static str> {
    match c {
        Counter::EventSent => Some("sent"),
        Counter::EventLost => Some("lost"),
        Counter::EventRateLimited => Some("rate_limited"),
        _ => None,
    }
}

fn nic_result(c: Counter) -> Option<&'static str> {
    match c {
        Counter::NicMarked => Some("marked"),
        Counter::NicUnmarked => Some("unmarked"),
        Counter::NicTailCallFailed => Some("tail_call_failed"),
        _ => None,
    }
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let event_to_mark = HistogramVec::new(
            HistogramOpts::new(
                "marklb_event_to_mark_seconds",
                "Time from a new flow's first packet to its NIC rule being installed",
            )
            .buckets(vec![
                1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 0.1,
            ]),
            &["backend"],
        )
        .expect("metric");
        r.register(Box::new(event_to_mark.clone()))
            .expect("register");
        // The mellanox backend's rule requests (process-wide collectors it updates itself).
        let rules = &crate::marks::mellanox::counters::RULE_METRICS;
        r.register(Box::new(rules.installed.clone()))
            .expect("register");
        r.register(Box::new(rules.rejected.clone()))
            .expect("register");
        r.register(Box::new(rules.install_seconds.clone()))
            .expect("register");
        let info = IntGaugeVec::new(
            Opts::new("marklb_datapath_info", "The attached datapath (value 1)"),
            &["interface", "xdp_mode", "program_id", "hw_backend"],
        )
        .expect("metric");
        r.register(Box::new(info.clone())).expect("register");
        let loadbalancers = IntGaugeVec::new(
            Opts::new(
                "marklb_loadbalancers",
                "LoadBalancers this node was asked to serve, by state (serving, conflict, refused)",
            ),
            &["state"],
        )
        .expect("metric");
        r.register(Box::new(loadbalancers.clone()))
            .expect("register");
        Self {
            vip_packets: counter(
                &r,
                "marklb_vip_packets_total",
                "Packets forwarded for a VIP",
                &["vip", "loadbalancer"],
            ),
            vip_bytes: counter(
                &r,
                "marklb_vip_bytes_total",
                "Bytes (as received) forwarded for a VIP",
                &["vip", "loadbalancer"],
            ),
            real_packets: counter(
                &r,
                "marklb_real_packets_total",
                "Packets forwarded to a real",
                &["real"],
            ),
            real_bytes: counter(
                &r,
                "marklb_real_bytes_total",
                "Bytes (as received) forwarded to a real",
                &["real"],
            ),
            path_packets: counter(
                &r,
                "marklb_datapath_packets_total",
                "Packets by datapath path: mark_hit, established, new_flow, pass_*, drop_*, icmp_*, mark_miss/stale",
                &["path"],
            ),
            flow_events: counter(
                &r,
                "marklb_flow_events_total",
                "New-flow events from the datapath",
                &["result"],
            ),
            nic_packets: counter(
                &r,
                "marklb_emulated_nic_packets_total",
                "Packets seen by the emulated NIC",
                &["result"],
            ),
            conn_evictions: {
                let c = IntCounter::new(
                    "marklb_conn_table_evictions_total",
                    "Established flows the connection table let go to make room for a new \
                     flow (its set was full)",
                )
                .expect("metric");
                r.register(Box::new(c.clone())).expect("register");
                c
            },
            mark_installs: counter(
                &r,
                "marklb_mark_installs_total",
                "Flow-mark installs",
                &["result"],
            ),
            marks_removed: counter(
                &r,
                "marklb_marks_removed_total",
                "Flow rules removed",
                &["reason"],
            ),
            marks_in_use: gauge(&r, "marklb_marks_in_use", "Marks allocated"),
            marks_capacity: gauge(&r, "marklb_marks_capacity", "Marks available in total"),
            nic_rules: gauge(&r, "marklb_nic_rules", "Flow rules programmed in the NIC"),
            vips: gauge(&r, "marklb_vips", "VIPs programmed"),
            reals: gauge(&r, "marklb_reals", "Reals programmed"),
            reloads: counter(
                &r,
                "marklb_config_reloads_total",
                "Configuration applies",
                &["result"],
            ),
            config_valid: gauge(
                &r,
                "marklb_config_valid",
                "1 if the last configuration read was applied",
            ),
            status_writes: counter(
                &r,
                "marklb_node_state_status_writes_total",
                "Kubernetes mode: node-state status writes, by result",
                &["result"],
            ),
            watch_errors: {
                let c = IntCounter::new(
                    "marklb_node_state_watch_errors_total",
                    "Kubernetes mode: errors of the node-state watch (each is retried)",
                )
                .expect("metric");
                r.register(Box::new(c.clone())).expect("register");
                c
            },
            info,
            loadbalancers,
            scrape: Mutex::new(()),
            event_to_mark,
            registry: r,
        }
    }

    /// Rewrites the datapath metrics from the maps.
    fn refresh(&self, view: &NodeView, marks: &MarkSnapshot, stats: &StatsReader) {
        for v in [
            &self.vip_packets,
            &self.vip_bytes,
            &self.real_packets,
            &self.real_bytes,
        ] {
            v.reset();
        }
        for vip in &view.vips {
            if let Ok(st) = stats.vip_stats(vip.stats_id) {
                let owner = vip.owner.to_string();
                let labels = [vip.label.as_str(), owner.as_str()];
                self.vip_packets
                    .with_label_values(&labels)
                    .inc_by(st.packets);
                self.vip_bytes.with_label_values(&labels).inc_by(st.bytes);
            }
        }
        for (addr, id) in &view.reals {
            if let Ok(st) = stats.real_stats(*id) {
                let a = addr.to_string();
                self.real_packets
                    .with_label_values(&[a.as_str()])
                    .inc_by(st.packets);
                self.real_bytes
                    .with_label_values(&[a.as_str()])
                    .inc_by(st.bytes);
            }
        }
        if let Ok(snap) = stats.counters() {
            self.path_packets.reset();
            self.flow_events.reset();
            self.nic_packets.reset();
            for &c in Counter::ALL {
                let v = snap.get(c);
                if c == Counter::ConnEvicted {
                    self.conn_evictions.reset();
                    self.conn_evictions.inc_by(v);
                } else if let Some(r) = event_result(c) {
                    self.flow_events.with_label_values(&[r]).inc_by(v);
                } else if let Some(r) = nic_result(c) {
                    self.nic_packets.with_label_values(&[r]).inc_by(v);
                } else {
                    self.path_packets.with_label_values(&[c.label()]).inc_by(v);
                }
            }
        }
        let st = &marks.stats;
        self.mark_installs.reset();
        self.mark_installs
            .with_label_values(&["ok"])
            .inc_by(st.installed);
        self.mark_installs
            .with_label_values(&["failed"])
            .inc_by(st.install_failures);
        self.mark_installs
            .with_label_values(&["no_free_mark"])
            .inc_by(st.capacity_exhausted);
        self.mark_installs
            .with_label_values(&["stale_event"])
            .inc_by(st.stale_events);
        self.marks_removed.reset();
        self.marks_removed
            .with_label_values(&["idle"])
            .inc_by(st.aged_out);
        self.marks_removed
            .with_label_values(&["real_removed"])
            .inc_by(st.invalidated);
        self.marks_removed
            .with_label_values(&["evicted"])
            .inc_by(st.evicted);
        self.marks_in_use.set(marks.in_use as i64);
        self.marks_capacity.set(marks.capacity as i64);
        self.nic_rules.set(marks.rules as i64);
        self.vips.set(view.vips.len() as i64);
        self.reals.set(view.reals.len() as i64);
        self.info.reset();
        if let Some(a) = &view.attached {
            let id = a.prog_id.to_string();
            self.info
                .with_label_values(&[
                    view.interface.as_str(),
                    a.mode.as_str(),
                    id.as_str(),
                    view.hw_backend,
                ])
                .set(1);
        }
        self.loadbalancers.reset();
        for verdict in view.owners.values() {
            let state = match verdict {
                OwnerVerdict::Serving { .. } => "serving",
                OwnerVerdict::Conflict { .. } => "conflict",
                OwnerVerdict::Refused { .. } => "refused",
            };
            self.loadbalancers.with_label_values(&[state]).inc();
        }
    }

    /// The Prometheus text exposition of everything.
    pub fn render(&self, view: &NodeView, marks: &MarkSnapshot, stats: &StatsReader) -> String {
        let _one_at_a_time = self.scrape.lock().expect("scrape lock");
        self.refresh(view, marks, stats);
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
