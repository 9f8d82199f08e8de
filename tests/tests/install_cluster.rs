//! The install paths on the real two-node cluster (kubelet 1.20 + containerd per node,
//! `marklb_tests::cluster`), from the images `make image` builds:
//!
//! - `kubectl_install_runs_the_operator_and_prometheus_scrapes_it`: `kubectl apply -k
//!   deploy/legacy-1.20/` brings the operator Deployment to 2/2 Ready from its OCI image, its
//!   processes run as user 65532; a real Prometheus (Debian's, file service discovery written
//!   by the test from the pods' addresses) scrapes both replicas and its HTTP API returns the
//!   operator's series with sane values (both targets up, exactly one leader, reconciliations
//!   counted); `kubectl delete -k deploy/legacy-1.20/` leaves nothing of ours.
//! - `helm_installs_scrapes_upgrades_and_uninstalls`: the Helm path as one story with a
//!   LoadBalancer served by both nodes: Prometheus scraping the operator and every agent (file
//!   service discovery from the README's kubectl listings) with the series' labels and values
//!   checked, `helm upgrade` of an agent setting rolling the agents under held connections,
//!   every dashboard panel's query returning data, `helm uninstall` leaving nothing in the
//!   cluster and no datapath on the nodes (steps on the test function).
//!
//! Every command run as the user is in `README_ON_CLUSTER`, which the README's user's guide
//! shows (checked by `install_manifests`).
//!
//! One cluster for the binary, tests one at a time (they install the same cluster-wide
//! objects). The kubectl test takes ~30-60 s, the Helm story ~2-4 min (mostly waiting for pods
//! to roll), plus ~15 s cluster start.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use marklb_crds::{LoadBalancer, conditions};
use marklb_tests::cluster::Cluster;
use marklb_tests::cluster_or_skip;
use marklb_tests::install::{
    README_AGENT_TARGETS, README_ON_CLUSTER, README_OPERATOR_TARGETS, agent_daemonset_owner,
    repo_root,
};
use marklb_tests::kube_harness::report;
use marklb_tests::lb_side::{
    AGENT_METRICS_PORT, AGENT_SELECTOR, IFACE, NODE_LABEL, Side, WAIT, WEB_BACKENDS, WEB_VIP,
    loadbalancer_yaml,
};
use marklb_tests::netns::TcpConn;
use marklb_tests::operator_install::{NS, import_operator_image, pod_ready, user, wait_operator};
use marklb_tests::prometheus::{Prometheus, dashboard_queries};
use serde_json::{Value, json};

/// One test at a time: both install the same cluster-wide objects.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// UIDs (real, effective) of every `marklb-operator` process on the machine.
fn operator_uids() -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim() != "marklb-operator" {
            continue;
        }
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        if let Some(line) = status.lines().find(|l| l.starts_with("Uid:")) {
            let ids: Vec<u32> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|v| v.parse().ok())
                .collect();
            out.push((ids[0], ids[1]));
        }
    }
    out
}

/// Everything of ours still in the cluster: marklb CRDs, cluster-wide RBAC, and namespaced
/// objects in `marklb-system` other than what Kubernetes puts in every namespace.
fn ours_left(cluster: &Cluster) -> Vec<String> {
    let mut left = Vec::new();
    let names = |args: &[&str]| -> Vec<String> {
        cluster
            .kubectl_ok(args)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    };
    for n in names(&["get", "crd,clusterrole,clusterrolebinding", "-o", "name"]) {
        if n.contains("marklb") {
            left.push(n);
        }
    }
    let namespaced = "deployments,daemonsets,replicasets,pods,services,serviceaccounts,roles,rolebindings,leases.coordination.k8s.io,configmaps,secrets";
    for n in names(&["get", namespaced, "-n", NS, "-o", "name"]) {
        let kubernetes_own = n == "serviceaccount/default"
            || n == "configmap/kube-root-ca.crt"
            || n.starts_with("secret/default-token-");
        if !kubernetes_own {
            left.push(format!("{NS}/{n}"));
        }
    }
    left
}

/// Waits until nothing of ours is left ([`ours_left`]); prints how long that took. Deletion
/// is asynchronous (the garbage collector deletes what the removed objects owned, the kubelet
/// finishes their pods), so the deadline is generous, and a failure prints what is left with
/// its owners.
async fn wait_nothing_left(cluster: &Cluster, what: &str) {
    let started = Instant::now();
    let mut last: Vec<String> = Vec::new();
    loop {
        let left = ours_left(cluster);
        if left.is_empty() {
            report(&format!(
                "  {what}: nothing of ours left after {:.1}s",
                started.elapsed().as_secs_f64()
            ));
            return;
        }
        // What is still there whenever that changes: in a CI log, where the time went.
        if left != last {
            report(&format!(
                "  {what}: {:.1}s: {left:?}",
                started.elapsed().as_secs_f64()
            ));
            last = left.clone();
        }
        // Generous: kubelet 1.20 on a loaded machine can take minutes to finish a pod.
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "{what}: still there after 300 s: {left:?}\n{}\nowners:\n{}",
            cluster
                .kubectl_ok(&["get", "daemonsets,pods", "-n", NS, "-o", "wide"])
                .unwrap_or_default(),
            cluster
                .kubectl_ok(&[
                    "get",
                    "daemonsets,pods",
                    "-n",
                    NS,
                    "-o",
                    r#"jsonpath={range .items[*]}{.kind}/{.metadata.name} deleting={.metadata.deletionTimestamp} owners={.metadata.ownerReferences}{"\n"}{end}"#,
                ])
                .unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A Prometheus scraping the operator pods (file service discovery from their addresses).
async fn prometheus_for(pods: &[Pod], port: u16) -> Prometheus {
    let prom = Prometheus::start(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  \
         - job_name: marklb-operator\n    scrape_interval: 1s\n    file_sd_configs:\n      \
         - files: [operator.json]\n        refresh_interval: 1s\n",
    )
    .unwrap();
    let groups: Vec<(Vec<String>, Value)> = pods
        .iter()
        .map(|p| {
            let ip = p.status.as_ref().unwrap().pod_ip.clone().unwrap();
            (
                vec![format!("{ip}:{port}")],
                json!({"pod": p.metadata.name.clone().unwrap()}),
            )
        })
        .collect();
    prom.write_file_sd("operator.json", &groups).unwrap();
    prom
}

/// Polls `promql` until `check` accepts its result vector.
async fn eventually_query(
    prom: &Prometheus,
    promql: &str,
    check: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let started = Instant::now();
    loop {
        let got = prom
            .query(promql)
            .unwrap_or_else(|e| panic!("{promql}: {e:#}"));
        let v = got.as_array().cloned().unwrap_or_default();
        if check(&v) {
            return v;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{promql}: {v:?} after 60 s; targets: {:?}; log: {}",
            prom.api("targets").ok(),
            prom.log_tail(10)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A sample's value ("NaN" and "+Inf" included: Rust parses Prometheus' spellings).
fn value(sample: &Value) -> f64 {
    sample["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_install_runs_the_operator_and_prometheus_scrapes_it() {
    let cluster = cluster_or_skip!();
    let _serial = SERIAL.lock().await;
    import_operator_image(cluster);
    user(cluster, "kubectl apply -k deploy/legacy-1.20/");
    let pods = wait_operator(cluster, 2, None).await;
    // Not root: the kubelet ran the image's user (65532), as the Deployment demands.
    let uids = operator_uids();
    assert_eq!(uids.len(), 2, "two operator processes: {uids:?}");
    assert!(
        uids.iter().all(|&(r, e)| r == 65532 && e == 65532),
        "{uids:?}"
    );
    // A real Prometheus scrapes both replicas.
    let prom = prometheus_for(&pods, 8080).await;
    let up = eventually_query(&prom, "up{job=\"marklb-operator\"}", |v| {
        v.len() == 2 && v.iter().all(|s| value(s) == 1.0)
    })
    .await;
    let scraped: BTreeSet<String> = up
        .iter()
        .map(|s| s["metric"]["pod"].as_str().unwrap().to_string())
        .collect();
    let pod_names: BTreeSet<String> = pods
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(scraped, pod_names, "every replica, labelled with its pod");
    // Exactly one leader; the standby says 0.
    let leaders = eventually_query(&prom, "marklb_operator_leader", |v| {
        v.len() == 2 && v.iter().map(value).sum::<f64>() == 1.0
    })
    .await;
    report(&format!(
        "  leader gauge per replica: {:?}",
        leaders.iter().map(value).collect::<Vec<_>>()
    ));
    // The leader's condition gauges: no LoadBalancer yet, so every count is 0.
    let gauges = eventually_query(
        &prom,
        "marklb_operator_loadbalancers{condition=\"Ready\"}",
        |v| !v.is_empty(),
    )
    .await;
    assert!(gauges.iter().all(|s| value(s) == 0.0), "{gauges:?}");
    drop(prom);
    user(cluster, README_ON_CLUSTER[0]);
    wait_nothing_left(cluster, "kubectl delete -k").await;
    assert!(operator_uids().is_empty(), "operator processes left");
}

/// Runs a command of the README's cluster list as the user (`install_manifests` checks the
/// README shows exactly those lists), in `dir` when given.
fn step(cluster: &Cluster, command: &str, dir: Option<&std::path::Path>) -> String {
    assert!(
        README_ON_CLUSTER.contains(&command),
        "`{command}` is not in README_ON_CLUSTER (the README's user's guide)"
    );
    match dir {
        Some(d) => user(cluster, &format!("cd {} && {command}", d.display())),
        None => user(cluster, command),
    }
}

/// `<name> <address>` lines of a README target listing, as file service discovery groups:
/// `port` on each address, `label` = name; only names `keep` accepts (a replica still
/// terminating is listed too).
fn file_sd_groups(
    listing: &str,
    port: u16,
    label: &str,
    keep: impl Fn(&str) -> bool,
) -> Vec<(Vec<String>, Value)> {
    listing
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(name, addr)| keep(name) && !addr.is_empty())
        .map(|(name, addr)| (vec![format!("{addr}:{port}")], json!({ label: name })))
        .collect()
}

/// The operator replicas (`pods`, Ready) as the `marklb-operator` job's targets, from the
/// README's listing.
fn write_operator_targets(cluster: &Cluster, prom: &Prometheus, pods: &[Pod]) {
    let names: BTreeSet<String> = pods
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    let listing = step(cluster, README_OPERATOR_TARGETS, None);
    let groups = file_sd_groups(&listing, 8080, "pod", |n| names.contains(n));
    assert_eq!(groups.len(), names.len(), "{listing}");
    prom.write_file_sd("operator.json", &groups).unwrap();
}

/// The samples of `v` by their `node` label.
fn by_node(v: &[Value]) -> BTreeMap<String, f64> {
    v.iter()
        .map(|s| {
            (
                s["metric"]["node"].as_str().unwrap_or("").to_string(),
                value(s),
            )
        })
        .collect()
}

async fn agent_pods(cluster: &Cluster, client: &kube::Client) -> BTreeMap<String, Pod> {
    cluster
        .pods(client, NS, AGENT_SELECTOR)
        .await
        .expect("listing the agent pods")
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| Some((p.spec.as_ref()?.node_name.clone()?, p)))
        .collect()
}

/// Waits for `shop/web` Ready on `nodes` ("2/2"); how long it took.
async fn wait_web_ready(cluster: &Cluster, client: &kube::Client, nodes: &str) -> Duration {
    let api: Api<LoadBalancer> = Api::namespaced(client.clone(), "shop");
    let t0 = Instant::now();
    loop {
        let st = api
            .get_opt("web")
            .await
            .ok()
            .flatten()
            .and_then(|l| l.status);
        if let Some(st) = &st
            && conditions::is_true(&st.conditions, conditions::READY)
            && st.nodes.as_deref() == Some(nodes)
        {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < WAIT,
            "web not Ready {nodes} after {WAIT:?}: {st:#?}\n{}",
            pod_logs(cluster)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The last lines of the agents' and the operators' logs (for failure messages).
fn pod_logs(cluster: &Cluster) -> String {
    let mut out = String::new();
    for selector in [AGENT_SELECTOR, "app.kubernetes.io/name=marklb-operator"] {
        let text = cluster
            .kubectl(&["logs", "-n", NS, "-l", selector, "--tail=15", "--prefix"])
            .map(|o| {
                String::from_utf8_lossy(&o.stdout).into_owned()
                    + &String::from_utf8_lossy(&o.stderr)
            })
            .unwrap_or_default();
        out += &format!("--- {selector}:\n{text}");
    }
    out
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// The Prometheus of the story: the operator and the agents through file service discovery
/// (as the README configures it), the alert rules loaded.
fn start_prometheus() -> Prometheus {
    let rules = repo_root().join("monitoring/alerts.yaml");
    Prometheus::start(&format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files: [{}]\n\
         scrape_configs:\n  \
         - job_name: marklb-agent\n    file_sd_configs:\n      \
         - files: [agents.json]\n        refresh_interval: 1s\n  \
         - job_name: marklb-operator\n    file_sd_configs:\n      \
         - files: [operator.json]\n        refresh_interval: 1s\n",
        rules.display()
    ))
    .unwrap()
}

/// Queries of the dashboard that returned no sample, or none that is a number, with what
/// they returned.
fn panels_without_data(prom: &Prometheus, queries: &[(String, String)]) -> Vec<String> {
    let mut missing = Vec::new();
    for (panel, q) in queries {
        let got = prom
            .query(q)
            .unwrap_or_else(|e| panic!("panel {panel:?}: {q}: refused: {e:#}"));
        let samples = got.as_array().cloned().unwrap_or_default();
        if !samples.iter().any(|s| value(s).is_finite()) {
            missing.push(format!("{panel:?}: {q} -> {samples:?}"));
        }
    }
    missing
}

/// The Helm path on the two-node cluster, as one story:
/// 1. `helm install`: the operator Ready, the CRDs of 1.20;
/// 2. `web` on both nodes: an agent per node, traffic through each;
/// 3. a real Prometheus scrapes the operator replicas and both agents (file service discovery
///    from the README's target listings): every target up, the agents' series labelled with
///    their node, the VIP, the reals and the paths, with the values the agents serve;
/// 4. `helm upgrade` changing an agent setting (hardware backend -> emulated NIC) rolls the
///    operator and then the agents, one node at a time, while ten held connections per node
///    keep answering from the same real; the new agents mark flows;
/// 5. every dashboard panel's query returns data from that Prometheus;
/// 6. `kubectl delete mlb web`: no XDP program and no pins on either node; `helm uninstall`:
///    nothing of ours left, the agent DaemonSet the operator applied included (owned by the
///    operator's ServiceAccount, the garbage collector deletes it after Helm removed that).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_installs_scrapes_upgrades_and_uninstalls() {
    let cluster = cluster_or_skip!();
    let nodes = cluster.nodes();
    if nodes.len() < 2 {
        eprintln!("SKIP helm_installs_scrapes_upgrades_and_uninstalls: needs two nodes");
        return;
    }
    let _serial = SERIAL.lock().await;
    let story = Instant::now();
    let client = cluster.client().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sides = [
        Side::build(nodes[0].clone(), vec![WEB_VIP]),
        Side::build(nodes[1].clone(), vec![WEB_VIP]),
    ];
    let node_names: BTreeSet<String> = nodes[..2].iter().map(|n| n.name.clone()).collect();

    report("1. helm install");
    import_operator_image(cluster);
    let out = step(
        cluster,
        "helm install marklb charts/marklb --namespace marklb-system --create-namespace",
        None,
    );
    assert!(out.contains("STATUS: deployed"), "{out}");
    let operators = wait_operator(cluster, 2, None).await;
    // The CRDs of the cluster's version (1.20: the legacy ones, without CEL).
    let crd = cluster
        .kubectl_ok(&["get", "crd", "loadbalancers.marklb.io", "-o", "json"])
        .unwrap();
    assert!(
        !crd.contains("x-kubernetes-validations"),
        "1.20 got the CEL CRDs"
    );

    report("2. web on both nodes: an agent per node, traffic through each");
    for side in &sides {
        step(
            cluster,
            &format!("kubectl label node {} {NODE_LABEL}=true", side.node.name),
            None,
        );
    }
    step(cluster, "kubectl create namespace shop", None);
    let web = loadbalancer_yaml(
        "web",
        WEB_VIP,
        &format!("{NODE_LABEL}: \"true\""),
        WEB_BACKENDS,
    );
    std::fs::write(dir.path().join("web.yaml"), web).unwrap();
    step(cluster, "kubectl apply -f web.yaml", Some(dir.path()));
    let ready = wait_web_ready(cluster, &client, "2/2").await;
    for side in &sides {
        side.wait_reals(WEB_VIP, &["real1", "real2"]).await;
    }
    report(&format!(
        "  web Ready 2/2 {} after its apply; both nodes reach both reals",
        secs(ready)
    ));

    report("3. Prometheus scrapes the operator and every agent (file service discovery)");
    let prom = start_prometheus();
    let t0 = Instant::now();
    let listing = step(cluster, README_AGENT_TARGETS, None);
    let agents = file_sd_groups(&listing, AGENT_METRICS_PORT, "node", |_| true);
    assert_eq!(agents.len(), 2, "an agent per node: {listing}");
    prom.write_file_sd("agents.json", &agents).unwrap();
    write_operator_targets(cluster, &prom, &operators);
    let up = eventually_query(&prom, "up", |v| {
        v.len() == 4 && v.iter().all(|s| value(s) == 1.0)
    })
    .await;
    let agent_nodes: BTreeSet<String> = up
        .iter()
        .filter(|s| s["metric"]["job"] == "marklb-agent")
        .map(|s| s["metric"]["node"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(agent_nodes, node_names, "one agent target per node: {up:?}");
    report(&format!(
        "  4 targets up (2 agents, 2 operator replicas) {} after the target files",
        secs(t0.elapsed())
    ));
    // Traffic now, so the counters rise while Prometheus watches.
    for side in &sides {
        side.reals(WEB_VIP, 20).expect("traffic through the node");
    }
    let at_least = |name: &str, min: f64| {
        let prom = &prom;
        let q = name.to_string();
        async move {
            by_node(
                &eventually_query(prom, &q, |v| {
                    by_node(v).len() == 2 && by_node(v).values().all(|x| *x >= min)
                })
                .await,
            )
        }
    };
    // Per VIP, with its LoadBalancer: every packet of the 32+ connections through each node.
    let vip = at_least(
        "marklb_vip_packets_total{job=\"marklb-agent\",vip=\"http\",loadbalancer=\"shop/web\"}",
        100.0,
    )
    .await;
    // Per real: both reals of each node got new flows.
    let mut reals = BTreeMap::new();
    for real in ["10.201.1.2", "10.201.2.2"] {
        reals.insert(
            real,
            at_least(
                &format!("marklb_real_packets_total{{job=\"marklb-agent\",real=\"{real}\"}}"),
                1.0,
            )
            .await,
        );
    }
    // Per path: new flows and established packets, and no drop.
    let new_flows = at_least(
        "marklb_datapath_packets_total{job=\"marklb-agent\",path=\"new_flow\"}",
        32.0,
    )
    .await;
    let established = at_least(
        "marklb_datapath_packets_total{job=\"marklb-agent\",path=\"established\"}",
        32.0,
    )
    .await;
    let drops = prom
        .query("sum by (node) (marklb_datapath_packets_total{path=~\"drop_.*\"})")
        .unwrap();
    let drops = by_node(drops.as_array().unwrap());
    assert_eq!(drops.len(), 2, "every agent exports its drop counters");
    assert!(drops.values().all(|d| *d == 0.0), "drops: {drops:?}");
    // Prometheus has what the agents serve: the packets of a VIP never exceed the agent's
    // own count read after the query.
    for side in &sides {
        let own = side.agent_scrape().sum(
            "marklb_vip_packets_total",
            &[("vip", "http"), ("loadbalancer", "shop/web")],
        );
        let seen = vip[&side.node.name];
        assert!(
            seen <= own && seen >= 100.0,
            "{}: Prometheus {seen}, the agent {own}",
            side.node.name
        );
    }
    // The attached datapath of each node: its interface and the program on it.
    let info = eventually_query(&prom, "marklb_datapath_info{job=\"marklb-agent\"}", |v| {
        v.len() == 2
    })
    .await;
    for side in &sides {
        let s = info
            .iter()
            .find(|s| s["metric"]["node"] == side.node.name.as_str())
            .expect("the node's datapath");
        assert_eq!(s["metric"]["interface"], IFACE, "{s}");
        assert_eq!(
            s["metric"]["program_id"]
                .as_str()
                .and_then(|p| p.parse().ok()),
            side.topo.xdp_prog_id(),
            "the program on the interface is the one the agent reports: {s}"
        );
    }
    let configured = prom
        .query("sum by (node) (marklb_vips) + sum by (node) (marklb_reals)")
        .unwrap();
    assert_eq!(
        by_node(configured.as_array().unwrap())
            .values()
            .collect::<Vec<_>>(),
        vec![&3.0, &3.0],
        "1 VIP + 2 reals per node"
    );
    let leaders = prom.query("sum(marklb_operator_leader)").unwrap();
    assert_eq!(value(&leaders[0]), 1.0, "one leader");
    report(&format!(
        "  per node: VIP http (shop/web) packets {vip:?}; reals {reals:?}; new_flow {new_flows:?}; established {established:?}; drops 0"
    ));

    report("4. helm upgrade (agent.hwBackend=emulated): the agents roll, held connections live");
    let old: BTreeMap<String, String> = agent_pods(cluster, &client)
        .await
        .into_iter()
        .map(|(n, p)| (n, p.metadata.uid.unwrap()))
        .collect();
    assert_eq!(old.len(), 2, "{old:?}");
    let mut held: Vec<(&Side, TcpConn)> = Vec::new();
    for side in &sides {
        for c in side.connect(WEB_VIP, 10).expect("ten connections") {
            held.push((side, c));
        }
    }
    let t0 = Instant::now();
    let out = step(
        cluster,
        "helm upgrade marklb charts/marklb --namespace marklb-system --set agent.hwBackend=emulated",
        None,
    );
    assert!(out.contains("REVISION: 2"), "{out}");
    let mut requests = 0;
    let mut replaced_at = BTreeMap::new();
    while replaced_at.len() < 2 {
        for (side, c) in &mut held {
            let r = c.request("still there").unwrap_or_else(|e| {
                panic!(
                    "a held connection through {} broke during the roll after {}: {e}\n{}",
                    side.node.name,
                    secs(t0.elapsed()),
                    pod_logs(cluster)
                )
            });
            assert_eq!(r, c.real, "a held connection changed real");
            requests += 1;
        }
        for (node, p) in agent_pods(cluster, &client).await {
            if p.metadata.uid.as_deref() != old.get(&node).map(String::as_str) && pod_ready(&p) {
                replaced_at.entry(node).or_insert(t0.elapsed());
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(240),
            "agents not rolled after 240 s (rolled: {replaced_at:?})\n{}",
            pod_logs(cluster)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let operators = wait_operator(cluster, 2, Some("--agent-hw-backend=emulated")).await;
    for (side, c) in &mut held {
        let r = c
            .request("after")
            .expect("a held connection after the roll");
        assert_eq!(r, c.real, "{}", side.node.name);
        requests += 1;
    }
    for (_, c) in held {
        c.close();
    }
    report(&format!(
        "  new agent pods Ready at {replaced_at:?} after the upgrade; 20 held connections answered {requests} requests, none failed"
    ));
    write_operator_targets(cluster, &prom, &operators);
    let t1 = Instant::now();
    eventually_query(
        &prom,
        "marklb_datapath_info{job=\"marklb-agent\",hw_backend=\"emulated\"}",
        |v| by_node(v).len() == 2,
    )
    .await;
    for side in &sides {
        side.reals(WEB_VIP, 12).expect("traffic after the roll");
    }
    let marks = eventually_query(
        &prom,
        "marklb_mark_installs_total{job=\"marklb-agent\",result=\"ok\"}",
        |v| by_node(v).len() == 2 && by_node(v).values().all(|x| *x > 0.0),
    )
    .await;
    report(&format!(
        "  both agents report the emulated NIC {} later; marks installed per node {:?}",
        secs(t1.elapsed()),
        by_node(&marks)
    ));

    report("5. every dashboard panel's query returns data");
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("charts/marklb/files/dashboard.json")).unwrap(),
    )
    .unwrap();
    let queries = dashboard_queries(&dashboard, "1m");
    let t0 = Instant::now();
    loop {
        // New flows each round: the rates and the event-to-mark quantiles need them.
        for side in &sides {
            side.reals(WEB_VIP, 6).expect("traffic for the dashboard");
        }
        let missing = panels_without_data(&prom, &queries);
        if missing.is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < WAIT,
            "dashboard panels without data after {WAIT:?}:\n{}",
            missing.join("\n")
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let rules = prom.api("rules").unwrap();
    let loaded: Vec<&Value> = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    assert!(
        loaded.len() >= 11 && loaded.iter().all(|r| r["health"] == "ok"),
        "alert rules: {loaded:?}"
    );
    let firing = prom.query("ALERTS{alertstate=\"firing\"}").unwrap();
    assert_eq!(firing, json!([]), "alerts firing on a healthy cluster");
    report(&format!(
        "  {} queries of {} panels return data ({} after the roll); {} alert rules evaluate, none firing",
        queries.len(),
        dashboard["panels"].as_array().unwrap().len(),
        secs(t0.elapsed()),
        loaded.len()
    ));
    drop(prom);

    report("6. kubectl delete mlb web, helm uninstall: nothing left, no datapath on any node");
    let t0 = Instant::now();
    step(cluster, "kubectl delete mlb web -n shop", None);
    // The agents leave with the last LoadBalancer: each removes its datapath on the way out.
    for side in &sides {
        let pins = side.node.pins(IFACE);
        loop {
            let prog = side.topo.xdp_prog_id();
            if prog.is_none() && !pins.exists() {
                break;
            }
            assert!(
                t0.elapsed() < WAIT,
                "{}: datapath left after the delete: XDP program {prog:?}, pins {} exist: {}\n{}",
                side.node.name,
                pins.display(),
                pins.exists(),
                pod_logs(cluster)
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert!(side.reals(WEB_VIP, 1).is_err(), "the VIP still answers");
    }
    report(&format!(
        "  no XDP program and no pins on either node {} after the delete",
        secs(t0.elapsed())
    ));
    // The agent DaemonSet is the operator's (applied at run time, unknown to Helm); it is
    // owned by the operator's ServiceAccount, which Helm does delete.
    let (owners, operator_sa) = agent_daemonset_owner(cluster, NS);
    assert_eq!(owners, operator_sa, "the agent DaemonSet's owner");
    let t0 = Instant::now();
    let out = step(
        cluster,
        "helm uninstall marklb --namespace marklb-system",
        None,
    );
    assert!(out.contains("uninstalled"), "{out}");
    report(&format!(
        "  helm uninstall returned after {}",
        secs(t0.elapsed())
    ));
    // Nothing left, the DaemonSet included: the garbage collector deletes it (asynchronously)
    // once its owner is gone.
    wait_nothing_left(cluster, "helm uninstall").await;
    report(&format!(
        "  helm uninstall to nothing of ours left (DaemonSet collected): {}",
        secs(t0.elapsed())
    ));
    step(cluster, "kubectl delete namespace shop", None);
    // The namespace `helm install --create-namespace` made is not the release's: empty now,
    // removed so the next test starts from a clean cluster.
    cluster
        .kubectl_ok(&["delete", "namespace", NS])
        .expect("deleting the empty namespace");
    let remove_label = format!("{NODE_LABEL}-");
    let unlabel: Vec<&str> = ["label", "node"]
        .into_iter()
        .chain(node_names.iter().map(String::as_str))
        .chain([remove_label.as_str()])
        .collect();
    cluster.kubectl_ok(&unlabel).expect("unlabelling the nodes");
    report(&format!("helm story: {}", secs(story.elapsed())));
}
