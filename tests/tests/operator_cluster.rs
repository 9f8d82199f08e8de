//! The operator end to end on the real two-node cluster (kubelet 1.20 + containerd per node,
//! `marklb_tests::cluster`), installed the user's way: `kubectl apply -k deploy/legacy-1.20/`
//! (legacy CRDs, RBAC, the operator Deployment with two replicas from its OCI image), then
//! LoadBalancers written with `kubectl apply -f`. The agents are the DaemonSet the operator
//! applies, in each node's network namespace, attaching to a veth of a test topology on that
//! node (client and router in namespaces, two reals decapsulating IP-in-IP and answering the
//! client directly). Both nodes' topologies name their veth alike and have the same addresses,
//! so one LoadBalancer spec serves both.
//!
//! One story, in steps that each check what a user relies on, with the figures printed:
//! 1. install; the two replicas: one holds the Lease;
//! 2. `web` selects node 1 by label: the agent runs there only, traffic from node 1's client
//!    reaches both reals, status Ready 1/1, the node state's status written by that agent (its
//!    program id is the one on the interface); `kubectl get mlb`, `describe mlb`, `get mlbns`;
//! 3. node 2 labelled into the selector: its agent starts, its node state appears, 2/2, node 2's
//!    client reaches the reals through node 2;
//! 4. a conflicting LoadBalancer (web's VIP, newer) shows `Conflict` naming `shop/web`; web
//!    keeps serving; a selector matching no node shows `NoNodesSelected`;
//! 5. the leading operator pod deleted: traffic flows throughout, another replica takes the
//!    Lease (the standby, or the replacement when it asks first);
//! 6. `api` takes its reals from a Service without selector and a hand-written v1beta1
//!    EndpointSlice (the new leader acts): traffic reaches both reals, then follows the slice
//!    down to one real;
//! 7. node 1's agent pod deleted: ten established connections keep their real, its node state
//!    stays Ready (same `lastTransitionTime`);
//! 8. `api` deleted: when it is gone its VIP no longer answers (and the agents count one VIP),
//!    web's still does;
//! 9. `kubectl delete` of everything.
//!
//! Every command run as the user is in `README_USER_PATH`, which the README's user's guide
//! shows (checked by `install_manifests`).
//!
//! SKIP with the reason when the machine cannot run the cluster; needs two nodes.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use k8s_openapi::api::{coordination::v1::Lease, core::v1::Pod};
use kube::{Api, Client};
use marklb_crds::{
    LoadBalancer, LoadBalancerNodeState,
    conditions::{self, find_condition},
    labels::node_state_name,
};
use marklb_operator::manifests::OPERATOR_NAME;
use marklb_tests::{
    cluster::Cluster,
    cluster_or_skip,
    install::{README_USER_PATH, agent_daemonset_owner},
    kube_harness::report,
    lb_side::{
        AGENT_SELECTOR, IFACE, NODE_LABEL, PORT, Side, T, WAIT, WEB_BACKENDS, WEB_VIP,
        loadbalancer_yaml,
    },
    netns::{TcpConn, tcp_connect_many},
    operator_install::{NS, import_operator_image, pod_ready, user, wait_operator},
};

/// The user's namespace.
const SHOP: &str = "shop";
const API_VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// The LoadBalancer `shop/name`, if it exists.
async fn lb(client: &Client, name: &str) -> Option<LoadBalancer> {
    Api::<LoadBalancer>::namespaced(client.clone(), SHOP)
        .get_opt(name)
        .await
        .expect("reading a LoadBalancer")
}

/// The condition `type_` of `shop/name`: (status, reason, message).
async fn condition(client: &Client, name: &str, type_: &str) -> Option<(String, String, String)> {
    let lb = lb(client, name).await?;
    let st = lb.status?;
    find_condition(&st.conditions, type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Waits for `shop/name` to have condition `type_` = `status` with `reason`; returns the
/// message and how long it took.
async fn wait_condition(
    client: &Client,
    name: &str,
    type_: &str,
    status: &str,
    reason: &str,
) -> (String, Duration) {
    let t0 = Instant::now();
    loop {
        let got = condition(client, name, type_).await;
        if let Some((s, r, m)) = &got
            && s == status
            && r == reason
        {
            return (m.clone(), t0.elapsed());
        }
        assert!(
            t0.elapsed() < WAIT,
            "{name}: {type_} not {status}/{reason} after {WAIT:?}: {got:?}\nstatus: {:?}",
            lb(client, name).await.and_then(|l| l.status)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The last lines of the agents' and the operators' logs (for failure messages).
fn logs(cluster: &Cluster) -> String {
    let mut out = String::new();
    for (what, selector, previous) in [
        ("agents", AGENT_SELECTOR, "--previous=false"),
        (
            "agents, the containers before",
            AGENT_SELECTOR,
            "--previous=true",
        ),
        (
            "operators",
            "app.kubernetes.io/name=marklb-operator",
            "--previous=false",
        ),
    ] {
        let text = cluster
            .kubectl(&[
                "logs",
                "-n",
                NS,
                "-l",
                selector,
                "--tail=15",
                "--prefix",
                previous,
            ])
            .map(|o| {
                String::from_utf8_lossy(&o.stdout).into_owned()
                    + &String::from_utf8_lossy(&o.stderr)
            })
            .unwrap_or_default();
        out += &format!("--- {what}:\n{text}");
    }
    out
}

/// Waits for `shop/name` to be Ready with `nodes` ("1/1", "2/2").
async fn wait_ready(cluster: &Cluster, client: &Client, name: &str, nodes: &str) -> Duration {
    let t0 = Instant::now();
    loop {
        let st = lb(client, name).await.and_then(|l| l.status);
        if let Some(st) = &st
            && conditions::is_true(&st.conditions, conditions::READY)
            && st.nodes.as_deref() == Some(nodes)
        {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < WAIT,
            "{name}: not Ready {nodes} after {WAIT:?}: {st:#?}\n{}",
            logs(cluster)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn node_state(client: &Client, lb: &str, node: &str) -> Option<LoadBalancerNodeState> {
    Api::<LoadBalancerNodeState>::namespaced(client.clone(), SHOP)
        .get_opt(&node_state_name(lb, node))
        .await
        .expect("reading a node state")
}

/// The agent pods (not being deleted), by node name.
async fn agent_pods(cluster: &Cluster, client: &Client) -> BTreeMap<String, Pod> {
    cluster
        .pods(client, NS, AGENT_SELECTOR)
        .await
        .expect("listing the agent pods")
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| Some((p.spec.as_ref()?.node_name.clone()?, p)))
        .collect()
}

async fn lease_holder(client: &Client) -> Option<String> {
    Api::<Lease>::namespaced(client.clone(), NS)
        .get_opt(OPERATOR_NAME)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.holder_identity)
}

/// Opens connections to `vip` from `side`'s client, one after another, until stopped: counts
/// (successes, failures).
struct Prober {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<Vec<String>>,
}

impl Prober {
    fn start(side: &Side, vip: Ipv4Addr) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let ns = side.topo.client.ns.clone();
        let (s, o, f) = (stop.clone(), ok.clone(), failed.clone());
        let thread = std::thread::spawn(move || {
            let mut errors = Vec::new();
            let addr = SocketAddr::new(IpAddr::V4(vip), PORT);
            while !s.load(Ordering::Relaxed) {
                let r = tcp_connect_many(&ns, addr, 1, T).and_then(|mut c| {
                    let mut c = c.pop().expect("one connection");
                    c.request("probe")
                });
                match r {
                    Ok(_) => o.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        errors.push(e.to_string());
                        f.fetch_add(1, Ordering::Relaxed)
                    }
                };
                std::thread::sleep(Duration::from_millis(50));
            }
            errors
        });
        Prober {
            stop,
            ok,
            failed,
            thread,
        }
    }

    /// Stops; (successes, failures, the errors).
    fn stop(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let errors = self.thread.join().expect("the prober");
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            errors,
        )
    }
}

/// The Service without selector and its hand-written EndpointSlice (v1beta1: Kubernetes 1.20).
fn service_yaml(addresses: &[&str]) -> String {
    let endpoints: String = addresses
        .iter()
        .map(|a| format!("  - addresses: [{a}]\n    conditions: {{ready: true}}\n"))
        .collect();
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: api
  namespace: shop
spec:
  ports:
    - name: http
      port: 80
      protocol: TCP
---
apiVersion: discovery.k8s.io/v1beta1
kind: EndpointSlice
metadata:
  name: api-1
  namespace: shop
  labels:
    kubernetes.io/service-name: api
addressType: IPv4
endpoints:
{endpoints}ports:
  - name: http
    port: 80
    protocol: TCP
"
    )
}

/// Writes `text` to `dir/file` and runs `kubectl apply -f <file>` in `dir` (as the user does).
fn apply_file(cluster: &Cluster, dir: &std::path::Path, file: &str, text: &str) -> String {
    std::fs::write(dir.join(file), text).unwrap();
    let command = format!("kubectl apply -f {file}");
    assert_readme_shows(&command);
    user(cluster, &format!("cd {} && {command}", dir.display()))
}

/// Every command this story runs as the user is one of the README's user's path
/// (`install_manifests` checks the README shows exactly those).
fn assert_readme_shows(command: &str) {
    assert!(
        README_USER_PATH.contains(&command),
        "`{command}` is not in README_USER_PATH (the README's user's path)"
    );
}

/// Runs a command of the user's path (shown in the README).
fn step(cluster: &Cluster, command: &str) -> String {
    assert_readme_shows(command);
    user(cluster, command)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadbalancers_become_programmed_nodes_and_conditions() {
    let cluster = cluster_or_skip!();
    let nodes = cluster.nodes();
    if nodes.len() < 2 {
        eprintln!("SKIP operator_cluster: needs two nodes (MARKLB_CLUSTER_NODES=1)");
        return;
    }
    let story = Instant::now();
    let client = cluster.client().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let n1 = Side::build(nodes[0].clone(), vec![WEB_VIP, API_VIP]);
    let n2 = Side::build(nodes[1].clone(), vec![WEB_VIP, API_VIP]);

    report(
        "1. install: kubectl apply -k deploy/legacy-1.20/ (CRDs, RBAC, the operator from its image)",
    );
    import_operator_image(cluster);
    let t0 = Instant::now();
    step(cluster, "kubectl apply -k deploy/legacy-1.20/");
    let operators = wait_operator(cluster, 2, None).await;
    let names: Vec<String> = operators
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    let mut leader = None;
    while leader.is_none() && t0.elapsed() < WAIT {
        leader = lease_holder(&client).await.filter(|h| names.contains(h));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let leader = leader.expect("one of the two replicas holds the Lease");
    report(&format!(
        "  operator 2/2 Ready {} after the apply; Lease held by {leader}",
        secs(t0.elapsed())
    ));

    report(
        "2. web selects node 1: its agent only there, traffic, Ready 1/1, the node state filled",
    );
    step(
        cluster,
        &format!("kubectl label node {} {NODE_LABEL}=true", n1.node.name),
    );
    step(cluster, "kubectl create namespace shop");
    let web = loadbalancer_yaml(
        "web",
        WEB_VIP,
        &format!("{NODE_LABEL}: \"true\""),
        WEB_BACKENDS,
    );
    let t0 = Instant::now();
    apply_file(cluster, dir.path(), "web.yaml", &web);
    wait_ready(cluster, &client, "web", "1/1").await;
    let ready_1 = t0.elapsed();
    let pods = agent_pods(cluster, &client).await;
    assert_eq!(
        pods.keys().collect::<Vec<_>>(),
        vec![&n1.node.name],
        "the agent runs on node 1 only"
    );
    let moved = n1.wait_reals(WEB_VIP, &["real1", "real2"]).await;
    report(&format!(
        "  kubectl apply -f web.yaml -> Ready 1/1 in {}; traffic through node 1 reaches both reals {} later",
        secs(ready_1),
        secs(moved)
    ));
    let state = node_state(&client, "web", &n1.node.name)
        .await
        .expect("web's node state on node 1");
    let st = state.status.expect("the agent wrote its status");
    assert_eq!(st.interface.as_deref(), Some(IFACE));
    assert_eq!((st.vips, st.reals), (1, 2), "{st:?}");
    assert_eq!(
        st.program_id.map(u64::from),
        n1.topo.xdp_prog_id(),
        "the program on the interface is the one the status names"
    );
    assert!(conditions::is_true(&st.conditions, conditions::NODE_READY));
    assert!(node_state(&client, "web", &n2.node.name).await.is_none());
    let get_mlb = step(cluster, "kubectl get mlb -n shop");
    let describe = step(cluster, "kubectl describe mlb web -n shop");
    let get_mlbns = step(cluster, "kubectl get mlbns -n shop");
    report(&format!(
        "$ kubectl get mlb -n shop\n{get_mlb}$ kubectl get mlbns -n shop\n{get_mlbns}$ kubectl describe mlb web -n shop\n{describe}"
    ));
    assert!(
        get_mlb.contains("web") && get_mlb.contains("1/1"),
        "{get_mlb}"
    );
    assert!(describe.contains("AllNodesReady"), "{describe}");
    assert!(get_mlbns.contains(&node_state_name("web", &n1.node.name)));

    report("3. node 2 labelled into the selector: its agent, its node state, 2/2");
    let t0 = Instant::now();
    step(
        cluster,
        &format!("kubectl label node {} {NODE_LABEL}=true", n2.node.name),
    );
    wait_ready(cluster, &client, "web", "2/2").await;
    let ready_2 = t0.elapsed();
    let pods = agent_pods(cluster, &client).await;
    assert_eq!(
        pods.keys().cloned().collect::<Vec<_>>(),
        vec![n1.node.name.clone(), n2.node.name.clone()]
    );
    let st2 = node_state(&client, "web", &n2.node.name)
        .await
        .and_then(|s| s.status)
        .expect("node 2's agent wrote its state's status");
    assert_eq!(st2.program_id.map(u64::from), n2.topo.xdp_prog_id());
    let moved = n2.wait_reals(WEB_VIP, &["real1", "real2"]).await;
    report(&format!(
        "  kubectl label node -> Ready 2/2 in {}; traffic through node 2 {} later",
        secs(ready_2),
        secs(moved)
    ));

    report(
        "4. a newer LoadBalancer with web's VIP: Conflict naming shop/web; no node: NoNodesSelected",
    );
    tokio::time::sleep(Duration::from_millis(1100)).await; // creation times: 1 s resolution
    let copy = loadbalancer_yaml(
        "web-copy",
        WEB_VIP,
        "marklb.io/test-node: \"1\"",
        WEB_BACKENDS,
    );
    apply_file(cluster, dir.path(), "web-copy.yaml", &copy);
    let (m, t) = wait_condition(&client, "web-copy", "Conflict", "True", "VipConflict").await;
    assert!(m.contains("shop/web"), "{m}");
    report(&format!("  web-copy Conflict after {}: {m}", secs(t)));
    wait_condition(&client, "web", "Conflict", "False", "NoConflict").await;
    n1.wait_reals(WEB_VIP, &["real1", "real2"]).await;
    let nowhere = loadbalancer_yaml(
        "nowhere",
        Ipv4Addr::new(10, 99, 0, 9),
        &format!("{NODE_LABEL}: nowhere"),
        WEB_BACKENDS,
    );
    apply_file(cluster, dir.path(), "nowhere.yaml", &nowhere);
    let (m, _) = wait_condition(&client, "nowhere", "Ready", "False", "NoNodesSelected").await;
    report(&format!("  nowhere: {m}"));
    step(cluster, "kubectl delete mlb web-copy nowhere -n shop");

    report("5. the leading operator pod deleted: traffic flows, another replica takes the Lease");
    let probe = Prober::start(&n1, WEB_VIP);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    user(
        cluster,
        &format!("kubectl delete pod -n {NS} {leader} --grace-period=0 --force"),
    );
    let standby = names.iter().find(|n| **n != leader).unwrap().clone();
    // The standby, or the replica the Deployment starts meanwhile: whoever asks first once the
    // Lease expires.
    let new_leader = loop {
        let holder = lease_holder(&client).await;
        if let Some(h) = holder.as_ref()
            && *h != leader
        {
            break h.clone();
        }
        assert!(
            t0.elapsed() < WAIT,
            "nobody took the Lease from {leader} (holder {holder:?})\n{}",
            logs(cluster)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let takeover = t0.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (ok, failed, errors) = probe.stop();
    assert_eq!(
        failed, 0,
        "connections failed while the operator changed: {errors:?}"
    );
    report(&format!(
        "  {new_leader} ({}) holds the Lease {} after the delete; {ok} connections meanwhile, none failed",
        if new_leader == standby {
            "the standby"
        } else {
            "the replacement"
        },
        secs(takeover)
    ));

    report("6. api: reals from a Service's EndpointSlice (v1beta1), following a change");
    apply_file(
        cluster,
        dir.path(),
        "api-service.yaml",
        &service_yaml(&["10.201.1.2", "10.201.2.2"]),
    );
    let api = loadbalancer_yaml(
        "api",
        API_VIP,
        &format!("{NODE_LABEL}: \"true\""),
        "      backendService:\n        name: api\n",
    );
    let t0 = Instant::now();
    apply_file(cluster, dir.path(), "api.yaml", &api);
    wait_ready(cluster, &client, "api", "2/2").await;
    let api_ready = t0.elapsed();
    n1.wait_reals(API_VIP, &["real1", "real2"]).await;
    let t0 = Instant::now();
    apply_file(
        cluster,
        dir.path(),
        "api-service.yaml",
        &service_yaml(&["10.201.1.2"]),
    );
    let moved = n1.wait_reals(API_VIP, &["real1"]).await;
    n2.wait_reals(API_VIP, &["real1"]).await;
    let moved_both = t0.elapsed();
    report(&format!(
        "  api Ready 2/2 {} after its apply; EndpointSlice change -> new connections on real1 only in {} (node 1), {} (both nodes)",
        secs(api_ready),
        secs(moved),
        secs(moved_both)
    ));

    report(
        "7. node 1's agent pod deleted: established connections keep their real, state stays Ready",
    );
    // The LoadBalancers' node selectors above are the agents' node affinity: a change of
    // them rolls the DaemonSet, and node 1's agent may still be being replaced.
    let t_settle = Instant::now();
    let old = loop {
        if let Some(p) = agent_pods(cluster, &client).await.remove(&n1.node.name)
            && pod_ready(&p)
        {
            break p;
        }
        assert!(
            t_settle.elapsed() < WAIT,
            "no Ready agent pod on node 1 before deleting it"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let before = node_state(&client, "web", &n1.node.name)
        .await
        .and_then(|s| s.status)
        .unwrap();
    let ready_since = find_condition(&before.conditions, conditions::NODE_READY)
        .map(|c| c.last_transition_time.clone())
        .unwrap();
    let mut held: Vec<TcpConn> = tcp_connect_many(
        &n1.topo.client.ns,
        SocketAddr::new(IpAddr::V4(WEB_VIP), PORT),
        10,
        T,
    )
    .expect("ten connections");
    let old_uid = old.metadata.uid.clone().unwrap();
    let t0 = Instant::now();
    user(
        cluster,
        &format!(
            "kubectl delete pod -n {NS} {} --wait=false",
            old.metadata.name.clone().unwrap()
        ),
    );
    let mut requests = 0;
    loop {
        for c in &mut held {
            let r = c
                .request("still there")
                .expect("an established connection broke");
            assert_eq!(r, c.real, "an established connection changed real");
            requests += 1;
        }
        let pods = agent_pods(cluster, &client).await;
        if let Some(p) = pods.get(&n1.node.name)
            && p.metadata.uid.as_deref() != Some(old_uid.as_str())
            && pod_ready(p)
        {
            break;
        }
        assert!(t0.elapsed() < WAIT, "no new agent pod on node 1");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let replaced = t0.elapsed();
    for c in &mut held {
        let r = c
            .request("after")
            .expect("a connection broke after the new pod");
        assert_eq!(r, c.real);
        requests += 1;
    }
    let after = node_state(&client, "web", &n1.node.name)
        .await
        .and_then(|s| s.status)
        .unwrap();
    let cond = find_condition(&after.conditions, conditions::NODE_READY).unwrap();
    assert_eq!(cond.status, "True", "{after:?}");
    assert_eq!(
        cond.last_transition_time, ready_since,
        "Ready never flipped"
    );
    report(&format!(
        "  new agent pod Ready {} after the delete; 10 held connections answered {requests} requests, none failed; node state Ready since {:?}",
        secs(replaced),
        ready_since
    ));
    for c in held {
        c.close();
    }

    report("8. api deleted: its VIP leaves the datapath before it goes; web stays");
    let t0 = Instant::now();
    step(cluster, "kubectl delete mlb api -n shop");
    while lb(&client, "api").await.is_some() {
        assert!(t0.elapsed() < WAIT, "api not gone");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let gone = t0.elapsed();
    for side in [&n1, &n2] {
        assert!(
            side.reals(API_VIP, 1).is_err(),
            "api's VIP still answers through {} after the LoadBalancer went",
            side.node.name
        );
        assert_eq!(side.agent_scrape().sum("marklb_vips", &[]), 1.0);
        assert_eq!(
            side.reals(WEB_VIP, 4)
                .map(|t| t.values().sum::<usize>())
                .ok(),
            Some(4)
        );
    }
    report(&format!(
        "  api gone {} after kubectl delete; its VIP unanswered on both nodes, the agents count 1 VIP, web serves",
        secs(gone)
    ));

    report("9. kubectl delete everything");
    step(cluster, "kubectl delete mlb web -n shop");
    step(cluster, "kubectl delete namespace shop");
    // The kubectl install's operator owns the agent DaemonSet through its ServiceAccount (the
    // name from the downward API, read with the Role's one-object `get`).
    let (owner, operator_sa) = agent_daemonset_owner(cluster, "marklb-system");
    assert_eq!(owner, operator_sa, "the agent DaemonSet's owner");
    let t = Instant::now();
    step(cluster, "kubectl delete -k deploy/legacy-1.20/");
    // Nothing of ours left in the cluster: no DaemonSet (namespace and all), no agent pod.
    loop {
        let left = cluster
            .kubectl_ok(&[
                "get",
                "daemonsets,pods",
                "-A",
                "-l",
                "app.kubernetes.io/name=marklb-agent",
                "-o",
                "name",
            ])
            .unwrap_or_default();
        let namespace = cluster
            .kubectl_ok(&[
                "get",
                "namespace",
                "marklb-system",
                "--ignore-not-found",
                "-o",
                "name",
            ])
            .unwrap_or_default();
        if left.trim().is_empty() && namespace.trim().is_empty() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(180),
            "after kubectl delete -k: {left} {namespace}\n{}",
            cluster
                .kubectl_ok(&["get", "all", "-n", "marklb-system", "-o", "wide"])
                .unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    report(&format!(
        "  kubectl delete -k to no DaemonSet, agent pod or namespace left: {}",
        secs(t.elapsed())
    ));
    user(
        cluster,
        &format!(
            "kubectl label node {} {} {NODE_LABEL}-",
            n1.node.name, n2.node.name
        ),
    );
    report(&format!(
        "operator_cluster story: {}",
        secs(story.elapsed())
    ));
}
