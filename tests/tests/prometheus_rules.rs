//! The monitoring files against the real Prometheus tools, without a cluster:
//!
//! - `monitoring/alerts.yaml` passes `promtool check rules`, and `promtool test rules
//!   monitoring/alerts.test.yaml` passes (every alert fires on its failure after its `for`,
//!   and stays quiet on a healthy cluster).
//! - Every query of the Grafana dashboard and every alert expression is PromQL a real
//!   Prometheus (Debian's 2.42) accepts; every dashboard panel has a query and the data source
//!   variable. (That they return data is proven on the real cluster, `install_cluster`.)
//! - The operator's `/metrics`, served by its own HTTP router, passes `promtool check metrics`
//!   without a finding; it serves only `/metrics`, `/healthz` and `/readyz`.
//!
//! About 3 s (one Prometheus).

use std::sync::Arc;
use std::time::Duration;

use marklb_operator::http::Shared;
use marklb_tests::install::{promtool, repo_root};
use marklb_tests::kube_harness::free_port;
use marklb_tests::prometheus::{Prometheus, dashboard_queries, http_get_local};
use serde_json::Value;

fn monitoring_dir() -> std::path::PathBuf {
    repo_root().join("monitoring")
}

fn dashboard() -> Value {
    serde_json::from_str(&std::fs::read_to_string(monitoring_dir().join("dashboard.json")).unwrap())
        .unwrap()
}

fn alert_exprs() -> Vec<(String, String)> {
    let alerts: Value = serde_yaml::from_str(
        &std::fs::read_to_string(monitoring_dir().join("alerts.yaml")).unwrap(),
    )
    .unwrap();
    alerts["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .map(|r| {
            (
                r["alert"].as_str().unwrap().to_string(),
                r["expr"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let dir = monitoring_dir();
    let out = promtool(&dir, &["check", "rules", "alerts.yaml"]).unwrap();
    assert!(out.contains("SUCCESS: 11 rules found"), "{out}");
    let out = promtool(&dir, &["test", "rules", "alerts.test.yaml"]).unwrap();
    assert!(out.contains("SUCCESS"), "{out}");
    // Every alert has a unit test that expects it to fire.
    let tests = std::fs::read_to_string(dir.join("alerts.test.yaml")).unwrap();
    for (alert, _) in alert_exprs() {
        let firing = tests
            .split("alertname: ")
            .skip(1)
            .any(|t| t.starts_with(&alert) && t.contains("exp_labels"));
        assert!(firing, "no unit test expects {alert} to fire");
    }
    // The names the issue asks for are there.
    let names: Vec<String> = alert_exprs().into_iter().map(|(a, _)| a).collect();
    for want in [
        "MarklbAgentDown",
        "MarklbDatapathNotProgrammed",
        "MarklbMarksNearCapacity",
        "MarklbNewFlowEventsLost",
        "MarklbReloadFailures",
        "MarklbNodeStateNotReady",
        "MarklbOperatorReconcileErrors",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
    }
}

#[test]
fn every_dashboard_and_alert_query_is_valid_promql() {
    let d = dashboard();
    let panels = d["panels"].as_array().unwrap();
    assert!(panels.len() >= 8, "{} panels", panels.len());
    for p in panels {
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        assert!(
            !p["targets"].as_array().unwrap().is_empty(),
            "{} has no query",
            p["title"]
        );
    }
    let titles: Vec<&str> = panels
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for want in [
        "Packets per datapath path",
        "Packets per VIP",
        "Packets per real",
        "Marks in use vs capacity",
        "Event-to-mark latency",
        "Drops by reason",
    ] {
        assert!(titles.contains(&want), "{want} missing: {titles:?}");
    }
    let prom = Prometheus::start("global:\n  scrape_interval: 1s\nscrape_configs: []\n").unwrap();
    let mut queries = dashboard_queries(&d, "1m");
    queries.extend(alert_exprs());
    queries.push((
        "node variable".into(),
        "group by (node) (marklb_datapath_info)".into(),
    ));
    for (what, q) in &queries {
        prom.query(q)
            .unwrap_or_else(|e| panic!("{what}: {q}: refused: {e:#}"));
    }
    // And a broken one is refused (the check can fail).
    assert!(prom.query("sum by (path (rate(x[1m]))").is_err());
}

#[tokio::test]
async fn operator_metrics_pass_promtool_and_only_its_endpoints_answer() {
    let shared = Arc::new(Shared::default());
    shared.metrics.observe(Duration::from_millis(4), None);
    shared
        .metrics
        .observe(Duration::from_millis(9), Some("conflict"));
    shared.metrics.wrote("LoadBalancerNodeState", "apply");
    let port = free_port().unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let server = tokio::spawn(marklb_operator::http::serve(addr, shared.clone()));
    let body = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match http_get_local(port, "/metrics") {
                Ok((200, body)) => return body,
                _ if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                other => panic!("operator /metrics: {other:?}"),
            }
        }
    })
    .await
    .unwrap();
    for family in [
        "marklb_operator_reconciliations_total 2",
        "marklb_operator_reconcile_errors_total{error=\"conflict\"} 1",
        "marklb_operator_leader 0",
    ] {
        assert!(
            body.lines().any(|l| l == family),
            "{family} missing:\n{body}"
        );
    }
    let report = marklb_tests::agent_proc::promtool_check(&body)
        .unwrap_or_else(|e| panic!("promtool check metrics: {e}\n{body}"));
    assert!(report.trim().is_empty(), "promtool findings: {report}");
    let answers = tokio::task::spawn_blocking(move || {
        ["/healthz", "/readyz", "/", "/debug/pprof", "/metrics/extra"]
            .map(|p| (p, http_get_local(port, p).unwrap().0))
    })
    .await
    .unwrap();
    assert_eq!(
        answers,
        [
            ("/healthz", 200),
            ("/readyz", 503),
            ("/", 404),
            ("/debug/pprof", 404),
            ("/metrics/extra", 404)
        ],
        "not ready before its caches fill; nothing else served"
    );
    server.abort();
}
