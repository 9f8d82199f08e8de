//! The agent's Kubernetes mode end to end: `marklb-agent run --kubernetes` as a real process
//! in the load balancer's network namespace (emulated NIC, reals decapsulating and answering
//! the client directly, as in `agent_e2e`), against real API servers of the test harness:
//! Kubernetes 1.20.2 with the legacy CRDs (no CEL: the agent's own validation is what rejects a
//! bad state) and the agent's install RBAC (through impersonation of its ServiceAccount), and
//! the current apiextensions-apiserver with the current CRDs (CEL refuses that state first).
//! The API server listens on the host's loopback; a forwarder puts it at the same address
//! inside the namespace ([`NsForward`]), so the agent's kubeconfig is the harness's own.
//!
//! One server, one topology and one agent for the whole story, in steps that each check a
//! behaviour a user relies on, with the figures printed:
//! 1. states for this node are programmed (traffic reaches every real) and their status says
//!    Ready with the right counts, as the operator's roll-up reads it; another node's state is
//!    left alone;
//! 2. a conflicting, an invalid, a mislabelled and a too large state each get their own error
//!    status while the others keep serving;
//! 3. an emptied state is acknowledged with `vips: 0`; a deleted state's VIP leaves the
//!    datapath;
//! 4. status writes are coalesced under a churn of spec updates, and nothing is written when
//!    nothing changes;
//! 5. the API server stopped: traffic keeps flowing; restarted on the same port and data: the
//!    agent serves a state created right after;
//! 6. the agent cut off from the API server while states change: the datapath keeps what it
//!    had, and catches up when it reaches the server again;
//! 7. the agent killed and started again while the API server cannot be reached: the adopted
//!    datapath serves (new and established connections), and once the server is reachable the
//!    states stay Ready (their `lastTransitionTime` unchanged) and carry the new program id;
//! 8. SIGTERM while serving keeps the datapath (an upgrade); with every state of the node
//!    deleted (the LoadBalancers gone, as before `helm uninstall`) SIGTERM removes it.
//!
//! Needs root and the agent binary of the same profile (`cargo build -p marklb-agent`).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use marklb_crds::{
    LoadBalancerNodeState, LoadBalancerNodeStateSpec, LoadBalancerNodeStateStatus,
    LoadBalancerSpec,
    conditions::{self, find_condition},
    labels::{LOADBALANCER_LABEL, NODE_LABEL, node_label_value},
};
use marklb_tests::{
    agent_proc::{Agent, AgentOptions, Manifest, Workdir, attach_decaps, xdp_prog_id},
    kube_harness::{Flavor, KubeServer, apply_value, install_crds, report},
    netns::{
        Servers, TcpConn, Topology, TopologyOptions, in_netns, require_root, tally,
        tcp_connect_many,
    },
    ns_forward::NsForward,
    operator_harness::prepare,
};
use serde_json::json;

const NS: &str = "shop";
const NODE: &str = "node-a";
const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
const VIP_WEB: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const VIP_API: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const VIP_LATE: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 3);
/// The agent's ServiceAccount, impersonated with the install RBAC.
const AGENT_USER: &str = "system:serviceaccount:marklb-system:marklb-agent";
const WAIT: Duration = Duration::from_secs(30);
/// The agent's Maglev ring storage in this test.
const RING_CAPACITY: u32 = 20_000;
/// Timeout of one connection attempt.
const T: Duration = Duration::from_secs(3);

fn tcp(vip: Ipv4Addr) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(vip), TCP_PORT)
}

/// Grants the agent's ClusterRole (as the install manifests do) to its ServiceAccount, and
/// writes a kubeconfig that acts as that ServiceAccount.
async fn agent_kubeconfig(server: &KubeServer, client: &Client, dir: &std::path::Path) -> String {
    let role = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": "marklb-agent"},
        "rules": marklb_operator::manifests::agent_cluster_rules(),
    });
    let binding = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": "marklb-agent"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "marklb-agent"},
        "subjects": [{"kind": "ServiceAccount", "name": "marklb-agent", "namespace": "marklb-system"}],
    });
    for v in [role, binding] {
        apply_value(client, &v, "marklb-tests").await.unwrap();
    }
    let admin = std::fs::read_to_string(server.kubeconfig()).unwrap();
    let token_line = format!("    token: {}\n", server.token());
    assert!(admin.contains(&token_line), "kubeconfig format: {admin}");
    let agent = admin.replace(&token_line, &format!("{token_line}    as: {AGENT_USER}\n"));
    let path = dir.join("agent-kubeconfig");
    std::fs::write(&path, agent).unwrap();
    path.display().to_string()
}

/// The spec of a LoadBalancer serving `vip` (TCP) over every real of the topology.
fn lb_spec(topo: &Topology, vip: Ipv4Addr) -> LoadBalancerSpec {
    let mut m = Manifest::for_topology(topo, TCP_PORT, UDP_PORT);
    m.vips
        .retain(|v| v.address == IpAddr::V4(vip) && v.protocol == "TCP");
    assert_eq!(m.vips.len(), 1, "{vip} is one of the topology's VIPs");
    m.to_loadbalancer().spec
}

fn node_state(
    name: &str,
    lb: &str,
    node: &str,
    created: i64,
    spec: LoadBalancerSpec,
) -> LoadBalancerNodeState {
    let mut s = LoadBalancerNodeState::new(
        name,
        LoadBalancerNodeStateSpec {
            node_name: node.into(),
            load_balancer: lb.into(),
            interface: None,
            lb: spec,
            load_balancer_created: Some(Time(Timestamp::from_second(created).unwrap())),
        },
    );
    s.metadata.labels = Some(BTreeMap::from([
        (NODE_LABEL.to_string(), node_label_value(node)),
        (LOADBALANCER_LABEL.to_string(), lb.to_string()),
    ]));
    s
}

/// One story's world; drop order: agent, forwarder, decapsulators, servers, bpffs, namespaces,
/// API server.
struct Env {
    agent: Agent,
    forward: NsForward,
    _decaps: Vec<marklb_agent::decap::Decap>,
    _servers: Servers,
    _work: Workdir,
    topo: Topology,
    states: Api<LoadBalancerNodeState>,
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- marklb-agent log, last lines ----\n{}\n----",
                self.agent.log_tail(60)
            );
        }
    }
}

impl Env {
    async fn create(&self, s: &LoadBalancerNodeState) -> Instant {
        let t0 = Instant::now();
        self.states.create(&PostParams::default(), s).await.unwrap();
        t0
    }

    async fn get(&self, name: &str) -> LoadBalancerNodeState {
        self.states.get(name).await.unwrap()
    }

    /// Polls (every 25 ms) until the state's status satisfies `ok`; returns it and the time
    /// since `since`.
    async fn wait_status(
        &self,
        name: &str,
        since: Instant,
        what: &str,
        ok: impl Fn(&LoadBalancerNodeState, &LoadBalancerNodeStateStatus) -> bool,
    ) -> (LoadBalancerNodeStateStatus, Duration) {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = self.get(name).await;
            if let Some(st) = &s.status
                && ok(&s, st)
            {
                return (st.clone(), since.elapsed());
            }
            assert!(
                Instant::now() < deadline,
                "{name}: {what} not within {WAIT:?}; status now: {:#?}",
                s.status
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits for Ready=`ready` with `reason` at the state's current generation.
    async fn wait_ready(
        &self,
        name: &str,
        since: Instant,
        ready: bool,
        reason: &str,
    ) -> (LoadBalancerNodeStateStatus, Duration) {
        let want = if ready { "True" } else { "False" };
        self.wait_status(name, since, &format!("Ready={want} {reason}"), |s, st| {
            st.observed_generation == s.metadata.generation
                && find_condition(&st.conditions, conditions::NODE_READY)
                    .is_some_and(|c| c.status == want && c.reason == reason)
        })
        .await
    }

    /// `n` connections to `vip` from the client; panics if one fails.
    fn connect(&self, vip: Ipv4Addr, n: usize) -> Vec<TcpConn> {
        tcp_connect_many(&self.topo.client.ns, tcp(vip), n, T)
            .unwrap_or_else(|e| panic!("TCP to {vip}: {e}"))
    }

    fn reachable(&self, vip: Ipv4Addr, timeout: Duration) -> bool {
        in_netns(&self.topo.client.ns, || TcpConn::connect(tcp(vip), timeout))
            .unwrap()
            .is_ok()
    }

    /// Waits until `vip` is (or is no longer) reachable; the time it took (a probe that fails
    /// takes its 300 ms timeout: "no longer reachable" figures include up to that).
    fn wait_reachable(&self, vip: Ipv4Addr, want: bool, since: Instant) -> Duration {
        let deadline = Instant::now() + WAIT;
        loop {
            if self.reachable(vip, Duration::from_millis(300)) == want {
                let at = since.elapsed();
                // "Unreachable" must hold twice: one probe can time out on a loaded machine.
                if want || !self.reachable(vip, Duration::from_millis(300)) {
                    return at;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{vip} reachable={} not within {WAIT:?}",
                !want
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The agent's `/status` owners, by owner.
    fn owners(&self) -> BTreeMap<String, serde_json::Value> {
        let r = self.agent.get("/status").expect("GET /status");
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        v["owners"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| (o["owner"].as_str().unwrap().to_string(), o.clone()))
            .collect()
    }

    fn status_writes(&self) -> f64 {
        self.agent.scrape().get(
            "marklb_node_state_status_writes_total",
            &[("result", "success")],
        )
    }
}

/// Counts the status changes of one state seen by a watch (each is one write by the agent:
/// it writes only when the status differs).
struct StatusChanges {
    changes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl StatusChanges {
    fn start(states: &Api<LoadBalancerNodeState>, name: &str) -> Self {
        let changes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (changes.clone(), stop.clone());
        let stream = watcher(
            states.clone(),
            watcher::Config::default().fields(&format!("metadata.name={name}")),
        )
        .applied_objects();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            let mut last: Option<Option<LoadBalancerNodeStateStatus>> = None;
            while let Some(Ok(obj)) = stream.next().await {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                if let Some(prev) = &last
                    && *prev != obj.status
                {
                    c.fetch_add(1, Ordering::Relaxed);
                }
                last = Some(obj.status);
            }
        });
        Self { changes, stop }
    }

    fn count(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }
}

impl Drop for StatusChanges {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Kubernetes 1.20.2: legacy CRDs (no CEL), namespaces, the agent's RBAC by impersonation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_kubernetes_mode_on_kube120() {
    story(Flavor::Kube120).await;
}

/// The current apiextensions-apiserver: current CRDs with CEL (every request is an
/// administrator there, so no RBAC).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_kubernetes_mode_on_current_crds() {
    story(Flavor::Current).await;
}

fn current_crds() -> String {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/yaml");
    [
        "loadbalancers.marklb.io.yaml",
        "loadbalancernodestates.marklb.io.yaml",
    ]
    .iter()
    .map(|f| format!("---\n{}", std::fs::read_to_string(dir.join(f)).unwrap()))
    .collect()
}

/// A line of the report, tagged with the server (the two stories run in parallel).
fn say(flavor: Flavor, line: &str) {
    let tag = match flavor {
        Flavor::Kube120 => "1.20",
        Flavor::Current => "current",
    };
    report(&format!("[{tag}] {line}"));
}

async fn story(flavor: Flavor) {
    require_root("the agent's Kubernetes-mode test");
    let Some(mut server) = KubeServer::start_or_skip(flavor, "agent_kube").await else {
        return;
    };
    say(
        flavor,
        &format!("{flavor}, {} s to start", server.startup().as_secs()),
    );
    let legacy = flavor == Flavor::Kube120;
    let client = server.client().await.unwrap();
    if legacy {
        prepare(&client, &[NS]).await.unwrap();
    } else {
        install_crds(&client, &current_crds()).await.unwrap();
    }
    let port: u16 = server.url().rsplit(':').next().unwrap().parse().unwrap();

    let topo = Topology::build(TopologyOptions {
        reals: 2,
        vips_v4: vec![VIP_WEB, VIP_API, VIP_LATE],
        vips_v6: vec![],
        client_mtu: 1400,
        ..Default::default()
    })
    .expect("building the topology");
    let decaps = attach_decaps(&topo).expect("decapsulation on the reals");
    let servers = Servers::start(&topo, TCP_PORT, UDP_PORT).expect("servers on the reals");
    let work = Workdir::new("marklb-kube-").expect("working directory");
    let kubeconfig = if legacy {
        agent_kubeconfig(&server, &client, work.path()).await
    } else {
        server.kubeconfig().display().to_string()
    };
    let forward = NsForward::start(&topo.lb.ns, port).expect("forwarding the API server");

    let mut opts = AgentOptions::for_topology(&topo, &work);
    opts.kubernetes = true;
    // No --interface: the agent finds the interface holding the node's address (HOST_IP),
    // as it does in the DaemonSet.
    opts.interface = String::new();
    // Room for three VIPs of 4,099 slots and a spare ring, not for one of 65,537 (step 2).
    opts.extra_args = vec!["--ring-capacity".into(), RING_CAPACITY.to_string()];
    opts.env = vec![
        ("KUBECONFIG".into(), kubeconfig),
        ("NODE_NAME".into(), NODE.into()),
        ("HOST_IP".into(), topo.lb.port.v4.to_string()),
        (
            "RUST_LOG".into(),
            std::env::var("MARKLB_AGENT_LOG").unwrap_or_else(|_| "info".into()),
        ),
    ];
    let agent = Agent::spawn(opts).expect("starting marklb-agent");
    let mut env = Env {
        agent,
        forward,
        _decaps: decaps,
        _servers: servers,
        _work: work,
        states: Api::namespaced(client.clone(), NS),
        topo,
    };
    env.agent.wait_log("datapath attached", 1, WAIT);
    let names: Vec<String> = env.topo.reals.iter().map(|r| r.name.clone()).collect();

    // ---- 1. programmed, Ready, counts; another node's state left alone ----
    say(
        flavor,
        "1. a node state for this node: programmed and Ready",
    );
    let t0 = env
        .create(&node_state(
            "web-node-a",
            "web",
            NODE,
            100,
            lb_spec(&env.topo, VIP_WEB),
        ))
        .await;
    env.create(&node_state(
        "web-node-b",
        "web",
        "node-b",
        100,
        lb_spec(&env.topo, VIP_WEB),
    ))
    .await;
    let (st, ready_after) = env.wait_ready("web-node-a", t0, true, "Programmed").await;
    let reach_after = env.wait_reachable(VIP_WEB, true, t0);
    say(
        flavor,
        &format!(
            "   created -> status Ready: {ready_after:?}; created -> VIP reachable: {reach_after:?}"
        ),
    );
    let conns = env.connect(VIP_WEB, 30);
    let t = tally(conns.iter().map(|c| c.real.as_str()));
    say(flavor, &format!("   30 connections to {VIP_WEB}: {t:?}"));
    assert_eq!(
        t.keys().cloned().collect::<Vec<_>>(),
        names,
        "every real serves"
    );
    let prog_id = xdp_prog_id(&env.topo.lb.ns, &env.topo.lb.port.iface).unwrap();
    assert_eq!(st.program_id, prog_id, "the program on the interface");
    assert_eq!(
        st.interface.as_deref(),
        Some(env.topo.lb.port.iface.as_str())
    );
    assert!(
        matches!(st.xdp_mode.as_deref(), Some("Native" | "Generic")),
        "{:?}",
        st.xdp_mode
    );
    assert_eq!((st.vips, st.reals), (1, 2));
    assert_eq!(st.hw_backend.as_deref(), Some("emulated"));
    assert_eq!(st.mark_delivery.as_deref(), Some("xdp-metadata"));
    assert!(st.offloaded);
    assert_eq!(st.last_error, None);
    for (t, s) in [
        (conditions::DATAPATH_ATTACHED, "True"),
        (conditions::MARKS_PROGRAMMED, "True"),
        (conditions::NODE_CONFLICT, "False"),
    ] {
        assert_eq!(
            find_condition(&st.conditions, t).map(|c| c.status.as_str()),
            Some(s),
            "{t}"
        );
    }
    // Marks reach the status (at most every 10 s when only they change).
    let (st, _) = env
        .wait_status("web-node-a", Instant::now(), "marksInUse > 0", |_, st| {
            st.marks_in_use > 0
        })
        .await;
    say(
        flavor,
        &format!("   marksInUse {} after 30 connections", st.marks_in_use),
    );
    drop(conns);
    // The operator's roll-up counts this node as ready and offloaded.
    let web = env.get("web-node-a").await;
    let desired = BTreeMap::from([(NODE.to_string(), web.clone())]);
    let existing = BTreeMap::from([(NODE.to_string(), &web)]);
    let rolled = marklb_operator::rollup::rollup(
        None,
        &marklb_operator::rollup::Inputs {
            generation: Some(1),
            scope: web.spec.lb.flow_marks.scope,
            desired: &desired,
            existing: &existing,
            agents: None,
            lost: &[],
            apply_error: None,
            selector: "test",
        },
        Time(Timestamp::now()),
    );
    assert_eq!(
        (
            rolled.nodes_ready,
            rolled.nodes_offloaded,
            rolled.nodes.as_deref()
        ),
        (1, 1, Some("1/1")),
        "{rolled:#?}"
    );
    // Another node's state: never touched by this agent.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        env.get("web-node-b").await.status,
        None,
        "node-b's state is not ours"
    );

    // ---- 2. a conflicting and an invalid state, each in its own status ----
    say(
        flavor,
        "2. conflicting and invalid states are reported alone; the others serve",
    );
    let t0 = env
        .create(&node_state(
            "api-node-a",
            "api",
            NODE,
            200,
            lb_spec(&env.topo, VIP_API),
        ))
        .await;
    env.create(&node_state(
        "thief-node-a",
        "thief",
        NODE,
        300,
        lb_spec(&env.topo, VIP_WEB),
    ))
    .await;
    let mut bad_spec = lb_spec(&env.topo, VIP_LATE);
    bad_spec.vips[0].address = "10.99.0.300".into();
    let bad = node_state("bad-node-a", "bad", NODE, 400, bad_spec);
    if legacy {
        env.create(&bad).await;
    } else {
        // The CEL rules of the current CRD refuse it before any agent sees it.
        let e = env.states.create(&PostParams::default(), &bad).await;
        assert!(
            matches!(&e, Err(kube::Error::Api(s)) if s.code == 422),
            "{e:?}"
        );
    }
    // Labelled for this node, written for another: refused by the agent on any server.
    let mut stray = node_state(
        "stray-node-a",
        "stray",
        "node-z",
        450,
        lb_spec(&env.topo, VIP_LATE),
    );
    stray.metadata.labels = node_state("-", "stray", NODE, 0, LoadBalancerSpec::default())
        .metadata
        .labels;
    env.create(&stray).await;
    // Valid, but more than the ring storage holds: the engine refuses it, it alone.
    let mut huge_spec = lb_spec(&env.topo, VIP_LATE);
    huge_spec.hashing.maglev_table_size = 65_537;
    env.create(&node_state("huge-node-a", "huge", NODE, 460, huge_spec))
        .await;
    let (thief, _) = env
        .wait_ready("thief-node-a", t0, false, "VipConflict")
        .await;
    let c = find_condition(&thief.conditions, conditions::NODE_CONFLICT).unwrap();
    assert_eq!(c.status, "True");
    assert!(
        c.message
            .contains("conflicts with shop/web, which holds VIP 10.99.0.1:80/TCP"),
        "{}",
        c.message
    );
    assert_eq!(thief.vips, 0);
    if legacy {
        let (bad, _) = env.wait_ready("bad-node-a", t0, false, "InvalidSpec").await;
        assert!(
            bad.last_error
                .as_deref()
                .is_some_and(|e| e.contains("spec.lb.vips[0].address")),
            "{:?}",
            bad.last_error
        );
    }
    let (stray, _) = env
        .wait_ready("stray-node-a", t0, false, "InvalidSpec")
        .await;
    assert!(
        stray.last_error.as_deref().is_some_and(
            |e| e.contains("spec.nodeName is node-z but this agent serves node node-a")
        ),
        "{:?}",
        stray.last_error
    );
    let (huge, _) = env
        .wait_ready("huge-node-a", t0, false, "MapUpdateFailed")
        .await;
    assert!(
        huge.last_error
            .as_deref()
            .is_some_and(|e| e.contains(&format!("but the ring storage has {RING_CAPACITY}"))),
        "{:?}",
        huge.last_error
    );
    assert_eq!(huge.vips, 0);
    let (_, api_ready) = env.wait_ready("api-node-a", t0, true, "Programmed").await;
    say(
        flavor,
        &format!("   api Ready after {api_ready:?}; thief: {}", c.message),
    );
    let web = env.get("web-node-a").await;
    assert!(
        find_condition(&web.status.unwrap().conditions, "Ready")
            .is_some_and(|c| c.status == "True"),
        "web keeps serving"
    );
    for vip in [VIP_WEB, VIP_API] {
        assert_eq!(env.connect(vip, 6).len(), 6, "{vip} serves");
    }

    // ---- 3. emptied (the operator's deletion protocol), then deleted ----
    say(
        flavor,
        "3. a state emptied is acknowledged with vips 0; a deleted state's VIP goes",
    );
    env.states
        .delete("huge-node-a", &DeleteParams::default())
        .await
        .unwrap();
    let t0 = Instant::now();
    let body = json!({"spec": {"lb": {"vips": []}}});
    env.states
        .patch("api-node-a", &PatchParams::default(), &Patch::Merge(&body))
        .await
        .unwrap();
    let emptied = env.wait_reachable(VIP_API, false, t0);
    // What the operator waits for before it deletes the states of a LoadBalancer.
    let (_, acked) = env
        .wait_status(
            "api-node-a",
            t0,
            "vips 0 at the emptied generation",
            |s, st| st.observed_generation == s.metadata.generation && st.vips == 0,
        )
        .await;
    say(
        flavor,
        &format!(
            "   emptied -> acknowledged (vips 0): {acked:?}; emptied -> VIP unreachable: {emptied:?}"
        ),
    );
    let t0 = env
        .create(&node_state(
            "late-node-a",
            "late",
            NODE,
            250,
            lb_spec(&env.topo, VIP_LATE),
        ))
        .await;
    env.wait_reachable(VIP_LATE, true, t0);
    let t0 = Instant::now();
    env.states
        .delete("late-node-a", &DeleteParams::default())
        .await
        .unwrap();
    let gone = env.wait_reachable(VIP_LATE, false, t0);
    assert!(!env.owners().contains_key("shop/late"));
    say(flavor, &format!("   deleted -> VIP unreachable: {gone:?}"));
    env.states
        .delete("api-node-a", &DeleteParams::default())
        .await
        .unwrap();
    assert!(env.reachable(VIP_WEB, T), "the others keep serving");

    // ---- 4. coalesced status writes ----
    say(
        flavor,
        "4. a churn of spec updates: status writes coalesced",
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let quiet0 = env.status_writes();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let quiet = env.status_writes() - quiet0;
    assert_eq!(quiet, 0.0, "nothing changes, nothing is written");
    let changes = StatusChanges::start(&env.states, "web-node-a");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let writes0 = env.status_writes();
    let churn_start = Instant::now();
    const UPDATES: u32 = 40;
    for i in 0..UPDATES {
        let body = json!({"spec": {"lb": {"hashing": {"maglevTableSize": if i % 2 == 0 { 4093 } else { 4099 }}}}});
        env.states
            .patch("web-node-a", &PatchParams::default(), &Patch::Merge(&body))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let churn = churn_start.elapsed();
    let last_gen = env.get("web-node-a").await.metadata.generation;
    let t_end = Instant::now();
    let (_, caught) = env
        .wait_status("web-node-a", t_end, "the last generation", |_, st| {
            st.observed_generation == last_gen
        })
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writes = env.status_writes() - writes0;
    let seen = changes.count();
    say(
        flavor,
        &format!(
            "   {UPDATES} spec updates in {churn:?}: {seen} status changes of that state seen by a watch, \
         {writes} status writes in all; last generation reported {caught:?} after the churn"
        ),
    );
    let bound = churn.as_secs_f64().ceil() as u64 + 2;
    assert!(
        seen >= 2 && seen <= bound,
        "{seen} writes for {UPDATES} updates in {churn:?}"
    );
    assert!(env.reachable(VIP_WEB, T));

    // ---- 5. the API server stops and comes back ----
    say(
        flavor,
        "5. the API server stopped: traffic flows; restarted: the agent catches up",
    );
    let mut held = env.connect(VIP_WEB, 10);
    let writes_before = env.status_writes();
    let lines_before = env.agent.log().lines().count();
    server.stop_server();
    let down = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = env.connect(VIP_WEB, 10);
    for (i, c) in held.iter_mut().enumerate() {
        assert_eq!(
            c.request(&format!("held {i}")).unwrap(),
            c.real,
            "established flows keep their real"
        );
    }
    assert!(env.agent.is_running(), "the agent survives the outage");
    assert_eq!(
        env.agent.get("/readyz").unwrap().status,
        200,
        "still ready: the datapath serves"
    );
    say(
        flavor,
        &format!(
            "   {} new and {} held connections served with the API server down",
            during.len(),
            held.len()
        ),
    );
    server
        .restart_server()
        .await
        .expect("restarting the API server");
    let restarted = down.elapsed();
    let t0 = env
        .create(&node_state(
            "late-node-a",
            "late",
            NODE,
            500,
            lb_spec(&env.topo, VIP_LATE),
        ))
        .await;
    let (_, late_ready) = env.wait_ready("late-node-a", t0, true, "Programmed").await;
    env.wait_reachable(VIP_LATE, true, t0);
    say(
        flavor,
        &format!(
            "   down for {restarted:?}; a state created right after the restart Ready after {late_ready:?}; \
         {} status writes failed meanwhile",
            env.agent.scrape().get(
                "marklb_node_state_status_writes_total",
                &[("result", "failure")]
            )
        ),
    );
    // The agent counts a write once it has the answer, which can be after the test saw it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while env.status_writes() <= writes_before {
        assert!(
            Instant::now() < deadline,
            "no successful status write counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if late_ready > Duration::from_secs(5) {
        say(
            flavor,
            "   slow catch-up; the agent's log since the API server stopped:",
        );
        for l in env.agent.log().lines().skip(lines_before) {
            say(flavor, &format!("   | {l}"));
        }
    }

    // ---- 6. cut off while states change: the datapath keeps what it had, then catches up ----
    say(
        flavor,
        "6. the agent cut off while states change; it catches up when it reaches the API",
    );
    env.forward.cut();
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.states
        .delete("late-node-a", &DeleteParams::default())
        .await
        .unwrap();
    let thief = env.get("thief-node-a").await;
    let mut moved = thief.spec.lb.clone();
    moved.vips[0].address = VIP_API.to_string();
    let body = json!({"spec": {"lb": moved}});
    env.states
        .patch(
            "thief-node-a",
            &PatchParams::default(),
            &Patch::Merge(&body),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        env.reachable(VIP_LATE, T),
        "cut off, the last programmed state keeps serving"
    );
    assert!(!env.reachable(VIP_API, Duration::from_millis(500)));
    let t0 = Instant::now();
    env.forward.restore();
    let (_, thief_ready) = env.wait_ready("thief-node-a", t0, true, "Programmed").await;
    let late_gone = env.wait_reachable(VIP_LATE, false, t0);
    env.wait_reachable(VIP_API, true, t0);
    say(
        flavor,
        &format!(
            "   reconnected: the moved state Ready after {thief_ready:?}, the deleted one's VIP gone after {late_gone:?}"
        ),
    );
    assert!(env.reachable(VIP_WEB, T));
    let stray = env.get("stray-node-a").await.status.unwrap();
    assert!(find_condition(&stray.conditions, "Ready").is_some_and(|c| c.reason == "InvalidSpec"));
    let errors = env
        .agent
        .scrape()
        .get("marklb_node_state_watch_errors_total", &[]);
    say(
        flavor,
        &format!(
            "   watch errors over the whole run: {errors}; forwarded API connections: {}",
            env.forward.accepted()
        ),
    );
    assert!(errors > 0.0);
    assert!(env.agent.is_running());
    let warnings = env.agent.log_lines(" WARN ");
    say(flavor, &format!("   agent warnings: {}", warnings.len()));
    for w in warnings.iter().take(12) {
        say(
            flavor,
            &format!("   | {}", w.chars().take(220).collect::<String>()),
        );
    }
    let took: Vec<u64> = env
        .agent
        .log_lines("node states programmed")
        .iter()
        .filter_map(|l| {
            l.split("took_ms=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    say(
        flavor,
        &format!(
            "   {} programming runs, each {}-{} ms (debug build)",
            took.len(),
            took.iter().min().unwrap_or(&0),
            took.iter().max().unwrap_or(&0)
        ),
    );
    say(
        flavor,
        &format!(
            "   agent RSS {} KiB (peak {} KiB)",
            env.agent.rss_kib().unwrap_or(0),
            env.agent.peak_rss_kib().unwrap_or(0)
        ),
    );

    // ---- 7. the agent killed and started again: nothing lost, states stay Ready ----
    say(flavor, "7. the agent killed (-9) and started again");
    let web_before = env.get("web-node-a").await.status.unwrap();
    let ready_since = find_condition(&web_before.conditions, "Ready")
        .unwrap()
        .last_transition_time
        .clone();
    let mut held = env.connect(VIP_WEB, 10);
    let opts = env.agent.opts.clone();
    env.agent.kill9();
    // And it starts while the API server cannot be reached: it must serve what the pinned
    // datapath serves, not an empty list.
    env.forward.cut();
    env.agent = Agent::spawn(opts).expect("starting marklb-agent again");
    env.agent.wait_log("datapath attached", 1, WAIT);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        env.connect(VIP_WEB, 5).len(),
        5,
        "started without the API server, the adopted datapath serves"
    );
    assert!(env.reachable(VIP_API, T), "every VIP it served");
    let t0 = Instant::now();
    env.forward.restore();
    let prog_id = xdp_prog_id(&env.topo.lb.ns, &env.topo.lb.port.iface).unwrap();
    let (after, rewritten) = env
        .wait_status("web-node-a", t0, "the new program id", |_, st| {
            st.program_id == prog_id
        })
        .await;
    for (i, c) in held.iter_mut().enumerate() {
        assert_eq!(
            c.request(&format!("after restart {i}")).unwrap(),
            c.real,
            "established flows keep their real across an agent restart"
        );
    }
    let ready = find_condition(&after.conditions, "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), &ready.last_transition_time),
        ("True", &ready_since),
        "Ready never flipped"
    );
    say(
        flavor,
        &format!(
            "   restarted cut off, served; reconnected: status carries the new program id after {rewritten:?}; {} held connections kept their real; Ready since {:?} unchanged",
            held.len(),
            ready_since.0
        ),
    );
    drop(held);

    // ---- 8. leaving: SIGTERM keeps a serving datapath, removes an empty one ----
    say(
        flavor,
        "8. SIGTERM keeps a serving datapath; with this node's states gone it removes it",
    );
    let (ns, iface) = (env.topo.lb.ns.clone(), env.topo.lb.port.iface.clone());
    let pins = env._work.bpffs().join("marklb").join(&iface);
    let prog = xdp_prog_id(&ns, &iface).unwrap().expect("XDP attached");
    let opts = env.agent.opts.clone();
    let st = env.agent.terminate(WAIT).expect("exit on SIGTERM");
    assert!(st.success(), "{st}");
    env.agent.wait_log("the datapath keeps serving", 1, WAIT);
    assert_eq!(xdp_prog_id(&ns, &iface).unwrap(), Some(prog), "kept");
    assert!(env.reachable(VIP_WEB, T), "serving without the agent");
    env.agent = Agent::spawn(opts).expect("starting marklb-agent again");
    env.agent.wait_log("datapath attached", 1, WAIT);
    let mine = node_label_value(NODE);
    let t0 = Instant::now();
    for s in env.states.list(&Default::default()).await.unwrap() {
        if s.labels().get(NODE_LABEL) == Some(&mine) {
            env.states
                .delete(&s.name_any(), &DeleteParams::default())
                .await
                .unwrap();
        }
    }
    env.agent.wait_log("node_states=0", 1, WAIT);
    let gone = env.wait_reachable(VIP_WEB, false, t0);
    let st = env.agent.terminate(WAIT).expect("exit on SIGTERM");
    assert!(st.success(), "{st}");
    env.agent.wait_log("datapath removed", 1, WAIT);
    assert_eq!(
        xdp_prog_id(&ns, &iface).unwrap(),
        None,
        "XDP left on {iface}"
    );
    assert!(!pins.exists(), "{} left", pins.display());
    say(
        flavor,
        &format!(
            "   kept program {prog} on SIGTERM while serving; states deleted, VIP gone after {gone:?}; SIGTERM removed the XDP program and {}",
            pins.display()
        ),
    );
}

/// The agent accepts exactly the command line the operator's DaemonSet gives it (every
/// optional flag set): it gets past parsing to its first check, the node name.
#[test]
fn the_agent_accepts_the_daemonsets_command_line() {
    let settings = marklb_operator::AgentSettings {
        mark_delivery: Some("xdp-metadata".into()),
        xdp_mode: Some("generic".into()),
        ..Default::default()
    };
    let args: Vec<String> = marklb_operator::desired::agent_args(&settings)
        .into_iter()
        // The kubelet expands the downward-API variable.
        .map(|a| a.replace("$(HOST_IP)", "127.0.0.1"))
        .collect();
    let out = std::process::Command::new(marklb_tests::agent_proc::agent_binary())
        .args(&args)
        .env_remove("NODE_NAME")
        .env_remove("HOST_IP")
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("running marklb-agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(
        stderr.contains("--kubernetes needs this node's name"),
        "{args:?}: {stderr}"
    );
}
