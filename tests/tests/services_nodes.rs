//! Services of type LoadBalancer end to end on a real three-node cluster (kubelet 1.20 +
//! containerd per node, `marklb_tests::cluster`), installed the user's way
//! (`kubectl apply -k deploy/legacy-1.20/`, then the files of the README's Services path):
//!
//! - node 1 runs the balancer (the pool's node selector), nodes 2 and 3 a Deployment of the
//!   echo server (`marklb-echo`, an image the build makes: it answers with `<pod>@<node>`);
//! - a client namespace on the nodes' network routes the pool through node 1 and connects to
//!   the address the Service was given;
//! - `externalTrafficPolicy: Cluster`: connections spread over the pods of both nodes;
//!   `Local`: each connection is answered by a pod of the node the balancer sent it to, which
//!   sees the client's own address;
//! - captures on node 1's link (the host end of its veth: what the balancer receives and sends,
//!   also what it bounces with XDP_TX) and on the client's interface: the replies come from
//!   nodes 2 and 3 (their MACs) and never cross node 1's link;
//! - scaling the Deployment down to one pod moves new connections to that pod's node while the
//!   established connections to that pod keep answering; scaling up spreads them again;
//! - a second Service asking for the first one's address gets `AddressInUse` naming the holder,
//!   and an Event; the first keeps serving;
//! - both operator pods deleted: the new leader re-reads the allocations and writes nothing
//!   (pool, Services, LoadBalancer unchanged), traffic keeps flowing;
//! - deleting the Services releases the address: Service, LoadBalancer, node states and the
//!   pool's ledger entry gone, the address out of node 1's datapath.
//!
//! Figures are printed (times to ready, spread counts, capture counts). Every wait has a
//! generous deadline and prints the cluster's state when it runs out. Needs three nodes: the
//! shared cluster of this binary is started with three unless `MARKLB_CLUSTER_NODES` says
//! otherwise. SKIP with the reason when the machine cannot run the cluster.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    io::{self, BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Event, Pod, Service};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams},
};
use marklb_crds::{
    LoadBalancer, LoadBalancerIPPool, LoadBalancerNodeState, labels::LOADBALANCER_LABEL,
};
use marklb_operator::services::{
    ADDRESSES_ANNOTATION, CLASS_ANNOTATION, DEFAULT_CLASS, condition, reason,
};
use marklb_tests::{
    agent_proc::{http_get, xdp_prog_id},
    capture::{Capture, Frame, IPPROTO_IPIP, IPPROTO_TCP},
    cluster::{self, ClientInfo, Cluster, NODES_BRIDGE, NODES_ENV, NodeInfo, TEST_NODE_LABEL},
    cluster_or_skip,
    install::README_SERVICES_PATH,
    kube_harness::report,
    netns::{attach_trivial_xdp, in_netns, ip, tally},
    operator_install::{NS as SYSTEM_NS, import_operator_image, pod_ready, user, wait_operator},
};

/// The application's namespace.
const APP: &str = "echo";
const POOL: &str = "public";
const POOL_CIDR: &str = "10.97.0.0/28";
const PORT: u16 = 80;
const ECHO_PORT: u16 = 8080;
const T: Duration = Duration::from_secs(3);
/// Deadline of every wait (a loaded 2-core machine; the usual figures are a few seconds).
const WAIT: Duration = Duration::from_secs(150);
/// Connections per measurement.
const N: usize = 40;
const AGENT_METRICS_PORT: u16 = 9464;
const OPERATOR_SELECTOR: &str = "app.kubernetes.io/name=marklb-operator";

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// One TCP connection to the Service through the balancer, with who answered it.
struct Conn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    /// `<pod>@<node>` of the echo server that answered.
    who: String,
    /// The address the pod saw the connection come from.
    peer: IpAddr,
    /// The client's source port.
    port: u16,
}

impl Conn {
    fn open(client: &ClientInfo, vip: Ipv4Addr) -> io::Result<Conn> {
        let addr = SocketAddr::from((vip, PORT));
        let stream = in_netns(&client.netns, || TcpStream::connect_timeout(&addr, T))??;
        stream.set_read_timeout(Some(T))?;
        stream.set_write_timeout(Some(T))?;
        let port = stream.local_addr()?.port();
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let bad = || io::Error::other(format!("unexpected greeting {line:?}"));
        let (who, peer) = line.trim_end().split_once(' ').ok_or_else(bad)?;
        let peer: SocketAddr = peer.parse().map_err(|_| bad())?;
        Ok(Conn {
            who: who.to_string(),
            peer: peer.ip(),
            port,
            stream,
            reader,
        })
    }

    fn pod(&self) -> &str {
        self.who.split_once('@').map_or("", |w| w.0)
    }

    fn node(&self) -> &str {
        self.who.split_once('@').map_or("", |w| w.1)
    }

    /// One request on the established connection, answered by the same pod.
    fn ask(&mut self, msg: &str) -> io::Result<()> {
        writeln!(self.stream, "{msg}")?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::Error::other("closed"));
        }
        let want = format!("{} {msg}", self.who);
        if line.trim_end() != want {
            return Err(io::Error::other(format!("answer {line:?}, not {want:?}")));
        }
        Ok(())
    }
}

/// `n` new connections (each asked once), stopping at the first that fails (a wait retries
/// sooner): the connections and the error.
fn open_many(client: &ClientInfo, vip: Ipv4Addr, n: usize) -> (Vec<Conn>, Vec<String>) {
    let mut conns = Vec::new();
    for i in 0..n {
        match Conn::open(client, vip).and_then(|mut c| c.ask(&format!("hello {i}")).map(|_| c)) {
            Ok(c) => conns.push(c),
            Err(e) => return (conns, vec![format!("connection {i}: {e}")]),
        }
    }
    (conns, Vec::new())
}

fn by_node(conns: &[Conn]) -> BTreeMap<String, usize> {
    tally(conns.iter().map(Conn::node))
}

fn by_pod(conns: &[Conn]) -> BTreeMap<String, usize> {
    tally(conns.iter().map(|c| c.who.as_str()))
}

/// What a CI log needs to tell why a wait ran out.
fn state(cluster: &Cluster) -> String {
    let mut out = String::new();
    for args in [
        &["get", "nodes", "-o", "wide", "--show-labels"][..],
        &["get", "pods", "-A", "-o", "wide"],
        &["get", "svc,endpoints", "-n", APP, "-o", "wide"],
        &["get", "svc", "-n", APP, "-o", "yaml"],
        &["get", "mlbpool", "-o", "yaml"],
        &["get", "mlb,mlbns", "-A", "-o", "yaml"],
        &["get", "events", "-A", "--sort-by=.lastTimestamp"],
        &[
            "logs",
            "-n",
            SYSTEM_NS,
            "-l",
            OPERATOR_SELECTOR,
            "--tail=30",
            "--prefix",
        ],
        &[
            "logs",
            "-n",
            SYSTEM_NS,
            "-l",
            "app.kubernetes.io/name=marklb-agent",
            "--tail=20",
            "--prefix",
        ],
        &[
            "logs",
            "-n",
            SYSTEM_NS,
            "-l",
            "app.kubernetes.io/name=marklb-decap",
            "--tail=10",
            "--prefix",
        ],
    ] {
        let text = cluster
            .kubectl(args)
            .map(|o| {
                String::from_utf8_lossy(&o.stdout).into_owned()
                    + &String::from_utf8_lossy(&o.stderr)
            })
            .unwrap_or_else(|e| e.to_string());
        out += &format!("--- kubectl {}:\n{text}\n", args.join(" "));
    }
    out
}

/// Polls `probe` until it gives `Ok`; how long that took. Past [`WAIT`], fails with the last
/// answer and the cluster's state.
async fn wait_for<T, F, Fut>(cluster: &Cluster, what: &str, mut probe: F) -> (T, Duration)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let t0 = Instant::now();
    loop {
        match probe().await {
            Ok(t) => return (t, t0.elapsed()),
            Err(last) if t0.elapsed() > WAIT => {
                panic!(
                    "{what}: not after {WAIT:?}; last: {last}\n{}",
                    state(cluster)
                )
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// New connections until they land on exactly the nodes `want` (and every one succeeds).
async fn wait_spread(
    cluster: &Cluster,
    client: &ClientInfo,
    vip: Ipv4Addr,
    want: &[&str],
    what: &str,
) -> (Vec<Conn>, Duration) {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    wait_for(cluster, what, || {
        let (conns, errors) = tokio::task::block_in_place(|| open_many(client, vip, N));
        let nodes: BTreeSet<String> = by_node(&conns).into_keys().collect();
        let r = if errors.is_empty() && nodes == want {
            Ok(conns)
        } else {
            Err(format!(
                "nodes {:?} (want {want:?}), pods {:?}, {} errors: {:?}",
                nodes,
                by_pod(&conns),
                errors.len(),
                errors.iter().take(3).collect::<Vec<_>>()
            ))
        };
        async move { r }
    })
    .await
}

/// Runs a command of the README's Services path as the user (files in `dir`).
fn run_user(cluster: &Cluster, dir: &Path, command: &str) -> String {
    assert!(
        README_SERVICES_PATH.contains(&command),
        "{command:?} is not in README_SERVICES_PATH (the README shows exactly those)"
    );
    if command.contains(" -f ") {
        user(cluster, &format!("cd {} && {command}", dir.display()))
    } else {
        user(cluster, command) // from the repository root (`deploy/`)
    }
}

fn pool_yaml(bridge_mac: &str) -> String {
    format!(
        "apiVersion: marklb.io/v1alpha1
kind: LoadBalancerIPPool
metadata:
  name: {POOL}
spec:
  addresses: [{POOL_CIDR}]
  avoidBuggyIPs: true
  nodeSelector:
    {TEST_NODE_LABEL}: \"1\"
  loadBalancer:
    interface: eth0
    nextHop:
      mac: \"{bridge_mac}\"
"
    )
}

fn echo_yaml(image: &str) -> String {
    format!(
        "apiVersion: v1
kind: Namespace
metadata:
  name: {APP}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: echo
  namespace: {APP}
spec:
  replicas: 4
  selector:
    matchLabels: {{app: echo}}
  template:
    metadata:
      labels: {{app: echo}}
    spec:
      terminationGracePeriodSeconds: 2
      affinity:
        nodeAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
            nodeSelectorTerms:
              - matchExpressions:
                  - {{key: {TEST_NODE_LABEL}, operator: In, values: [\"2\", \"3\"]}}
      topologySpreadConstraints:
        - maxSkew: 1
          topologyKey: kubernetes.io/hostname
          whenUnsatisfiable: DoNotSchedule
          labelSelector:
            matchLabels: {{app: echo}}
      containers:
        - name: echo
          image: {image}
          imagePullPolicy: Never
          args: [--port, \"{ECHO_PORT}\"]
          env:
            - name: POD_NAME
              valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}
            - name: NODE_NAME
              valueFrom: {{fieldRef: {{fieldPath: spec.nodeName}}}}
          ports:
            - containerPort: {ECHO_PORT}
          readinessProbe:
            tcpSocket: {{port: {ECHO_PORT}}}
            periodSeconds: 1
"
    )
}

fn service_yaml(name: &str, policy: &str, address: Option<Ipv4Addr>) -> String {
    let ask = address
        .map(|a| format!("\n    {ADDRESSES_ANNOTATION}: \"{a}\""))
        .unwrap_or_default();
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {APP}
  annotations:
    {CLASS_ANNOTATION}: {DEFAULT_CLASS}{ask}
spec:
  type: LoadBalancer
  externalTrafficPolicy: {policy}
  selector: {{app: echo}}
  ports:
    - name: tcp
      port: {PORT}
      targetPort: {ECHO_PORT}
      protocol: TCP
"
    )
}

/// The Service's ingress address.
fn ingress(svc: &Service) -> Option<Ipv4Addr> {
    svc.status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?
        .first()?
        .ip
        .as_ref()?
        .parse()
        .ok()
}

/// A marklb condition of the Service: (status, reason, message).
fn svc_condition(svc: &Service, type_: &str) -> Option<(String, String, String)> {
    svc.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// What the captures say about a set of connections to `vip`.
#[derive(Debug, Default)]
struct Paths {
    /// Client packets to the VIP on node 1's link (to the balancer).
    to_balancer: usize,
    /// Encapsulated packets from node 1, by the node they were sent to.
    encapsulated: BTreeMap<String, usize>,
    /// Packets from the VIP (replies) on node 1's link: must stay 0.
    replies_via_balancer: usize,
    /// Replies the client received, by the node whose MAC sent them.
    replies_by_node: BTreeMap<String, usize>,
    /// Client port -> the node the balancer encapsulated its first packet to.
    encap_node_of_port: BTreeMap<u16, String>,
}

fn paths(
    node1: &[Frame],
    client: &[Frame],
    vip: Ipv4Addr,
    nodes: &[NodeInfo],
    ports: &BTreeSet<u16>,
) -> Paths {
    let node_by_ip: BTreeMap<Ipv4Addr, String> =
        nodes.iter().map(|n| (n.ip, n.name.clone())).collect();
    let node_by_mac: BTreeMap<String, String> = nodes
        .iter()
        .map(|n| (format!("02:cb:00:00:00:{:02x}", n.index), n.name.clone()))
        .collect();
    let mut p = Paths::default();
    for f in node1 {
        if f.ip.proto == IPPROTO_TCP && f.ip.dst == vip && ports.contains(&f.ip.sport) {
            p.to_balancer += 1;
        }
        if f.ip.src == vip {
            p.replies_via_balancer += 1;
        }
        if let Some(inner) = f.inner
            && f.ip.proto == IPPROTO_IPIP
            && inner.dst == vip
            && ports.contains(&inner.sport)
        {
            let node = node_by_ip
                .get(&f.ip.dst)
                .cloned()
                .unwrap_or_else(|| f.ip.dst.to_string());
            *p.encapsulated.entry(node.clone()).or_default() += 1;
            p.encap_node_of_port.entry(inner.sport).or_insert(node);
        }
    }
    for f in client {
        if !f.outgoing && f.ip.src == vip && ports.contains(&f.ip.dport) {
            let mac = mac_string(&f.src_mac);
            let node = node_by_mac.get(&mac).cloned().unwrap_or(mac);
            *p.replies_by_node.entry(node).or_default() += 1;
        }
    }
    p
}

/// Waits until both captures have seen every connection of `ports` (the capture threads
/// drain their sockets every 100 ms), then reads what they say.
async fn captured(
    cluster: &Cluster,
    caps: (&Capture, &Capture),
    vip: Ipv4Addr,
    ports: &BTreeSet<u16>,
) -> Paths {
    let nodes = cluster.nodes();
    wait_for(cluster, "the captures to see every connection", || {
        let p = paths(&caps.0.frames(), &caps.1.frames(), vip, &nodes, ports);
        let r = if p.encap_node_of_port.len() == ports.len()
            && p.replies_by_node.values().sum::<usize>() >= ports.len()
        {
            Ok(p)
        } else {
            Err(format!("{p:?}"))
        };
        async move { r }
    })
    .await
    .0
}

async fn get_svc(client: &Client, name: &str) -> Option<Service> {
    Api::<Service>::namespaced(client.clone(), APP)
        .get_opt(name)
        .await
        .expect("reading a Service")
}

/// Waits until Service `web` says `marklb.io/Ready=True`; how long it took.
async fn wait_web_ready(cluster: &Cluster, client: &Client, what: &str) -> Duration {
    wait_for(cluster, what, || {
        let client = client.clone();
        async move {
            let svc = get_svc(&client, "web").await;
            let c = svc
                .as_ref()
                .and_then(|s| svc_condition(s, condition::READY));
            match &c {
                Some((s, _, _)) if s == "True" => Ok(()),
                _ => Err(format!("{c:?}")),
            }
        }
    })
    .await
    .1
}

/// Waits until every VIP of LoadBalancer `svc-web` has exactly the addresses of `nodes` as its
/// backends; how long it took. `Ready=True` on the Service means one real serves: a node whose
/// decapsulator is still starting joins later, and with `Cluster` its pods are reached through
/// the other node anyway, so spread over pods does not show it.
async fn wait_web_reals(cluster: &Cluster, client: &Client, nodes: &[&NodeInfo]) -> Duration {
    let want: BTreeSet<String> = nodes.iter().map(|n| n.ip.to_string()).collect();
    let what = format!("svc-web's backends are {want:?}");
    wait_for(cluster, &what, || {
        let client = client.clone();
        let want = want.clone();
        async move {
            let lb = Api::<LoadBalancer>::namespaced(client, APP)
                .get_opt("svc-web")
                .await
                .map_err(|e| e.to_string())?
                .ok_or("no LoadBalancer svc-web")?;
            let per_vip: Vec<BTreeSet<String>> = lb
                .spec
                .vips
                .iter()
                .map(|v| v.backends.iter().map(|b| b.address.clone()).collect())
                .collect();
            if !per_vip.is_empty() && per_vip.iter().all(|b| *b == want) {
                Ok(())
            } else {
                Err(format!("{per_vip:?}"))
            }
        }
    })
    .await
    .1
}

/// What the operator decides, by object: the pool's allocations, each Service's ingress and
/// marklb conditions (status and reason), each LoadBalancer's and node state's generation (their
/// specs). Not resource versions: the agents' status (marks in use aging out, counters) moves
/// the LoadBalancer's status and the Service's condition messages whatever the operator does.
async fn written(client: &Client) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let pool = Api::<LoadBalancerIPPool>::all(client.clone())
        .get(POOL)
        .await
        .unwrap();
    out.insert(
        "pool allocations".into(),
        format!(
            "{:?}",
            pool.status.map(|s| s
                .allocations
                .into_iter()
                .map(|a| (a.address, a.service))
                .collect::<Vec<_>>())
        ),
    );
    for s in Api::<Service>::namespaced(client.clone(), APP)
        .list(&ListParams::default())
        .await
        .unwrap()
    {
        let status = s.status.unwrap_or_default();
        let conditions: Vec<(String, String, String)> = status
            .conditions
            .unwrap_or_default()
            .into_iter()
            .filter(|c| c.type_.starts_with("marklb.io/"))
            .map(|c| (c.type_, c.status, c.reason))
            .collect();
        out.insert(
            format!("service {}", s.metadata.name.unwrap_or_default()),
            format!(
                "ingress {:?}; {conditions:?}",
                status.load_balancer.and_then(|l| l.ingress)
            ),
        );
    }
    for lb in Api::<LoadBalancer>::namespaced(client.clone(), APP)
        .list(&ListParams::default())
        .await
        .unwrap()
    {
        out.insert(
            format!(
                "loadbalancer {} generation",
                lb.metadata.name.unwrap_or_default()
            ),
            lb.metadata.generation.unwrap_or_default().to_string(),
        );
    }
    for ns in Api::<LoadBalancerNodeState>::namespaced(client.clone(), APP)
        .list(&ListParams::default())
        .await
        .unwrap()
    {
        out.insert(
            format!(
                "node state {} generation",
                ns.metadata.name.unwrap_or_default()
            ),
            ns.metadata.generation.unwrap_or_default().to_string(),
        );
    }
    out
}

/// The value of an unlabelled counter in a Prometheus text scrape.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_of_type_loadbalancer_on_three_nodes() {
    if std::env::var(NODES_ENV).is_err() {
        // SAFETY: set before the cluster (or any other thread of this test) reads it.
        unsafe { std::env::set_var(NODES_ENV, "3") };
    }
    let cluster = cluster_or_skip!();
    let nodes = cluster.nodes();
    assert!(
        nodes.len() >= 3,
        "this test needs three nodes, the cluster has {}",
        nodes.len()
    );
    let (n1, n2, n3) = (&nodes[0], &nodes[1], &nodes[2]);
    let client = cluster.client().await.unwrap();
    let t_all = Instant::now();

    // 1. Install, the images, the client.
    let images = cluster::images().expect("images");
    import_operator_image(cluster);
    cluster
        .import_image(&images.echo)
        .expect("importing the echo image");
    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    run_user(cluster, dir.path(), "kubectl apply -k deploy/legacy-1.20/");
    wait_operator(cluster, 2, None).await;
    let t_install = t0.elapsed();
    // Node 1's balancer bounces frames with XDP_TX on its eth0; the host end of that veth
    // takes them only while it runs XDP itself (a trivial program that passes everything).
    let _bounce = attach_trivial_xdp(&format!("mlbh{}", n1.index)).expect("XDP on node 1's link");
    let me = cluster.add_client(1).expect("a client on the node network");
    let client_ip = me.ip.unwrap();
    ip(
        Some(&me.netns),
        &["route", "add", POOL_CIDR, "via", &n1.ip.to_string()],
    )
    .unwrap();
    let bridge_mac = std::fs::read_to_string(format!("/sys/class/net/{NODES_BRIDGE}/address"))
        .unwrap()
        .trim()
        .to_string();

    // 2. The pool (node 1 balances), the Deployment on nodes 2 and 3, the Service (Cluster).
    std::fs::write(dir.path().join("pool.yaml"), pool_yaml(&bridge_mac)).unwrap();
    std::fs::write(dir.path().join("echo.yaml"), echo_yaml(&images.echo.name)).unwrap();
    std::fs::write(
        dir.path().join("web.yaml"),
        service_yaml("web", "Cluster", None),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("web-local.yaml"),
        service_yaml("web", "Local", None),
    )
    .unwrap();
    run_user(cluster, dir.path(), "kubectl apply -f pool.yaml");
    run_user(cluster, dir.path(), "kubectl apply -f echo.yaml");
    let (_, t_pods) = wait_for(cluster, "4 echo pods Ready on nodes 2 and 3", || {
        let client = client.clone();
        async move {
            let pods = Api::<Pod>::namespaced(client, APP)
                .list(&ListParams::default().labels("app=echo"))
                .await
                .map_err(|e| e.to_string())?;
            let ready: Vec<(String, bool)> = pods
                .iter()
                .map(|p| {
                    (
                        p.spec
                            .as_ref()
                            .and_then(|s| s.node_name.clone())
                            .unwrap_or_default(),
                        pod_ready(p),
                    )
                })
                .collect();
            let per_node = tally(ready.iter().filter(|r| r.1).map(|r| r.0.as_str()));
            if per_node.values().sum::<usize>() == 4 && per_node.len() == 2 {
                Ok(())
            } else {
                Err(format!("{ready:?}"))
            }
        }
    })
    .await;
    let t0 = Instant::now();
    run_user(cluster, dir.path(), "kubectl apply -f web.yaml");
    let (vip, t_ingress) = wait_for(cluster, "web's ingress address", || {
        let client = client.clone();
        async move {
            let svc = get_svc(&client, "web").await;
            svc.as_ref()
                .and_then(ingress)
                .ok_or_else(|| format!("{:?}", svc.and_then(|s| s.status)))
        }
    })
    .await;
    let t_serving = wait_web_ready(cluster, &client, "web marklb.io/Ready=True").await;
    let t_serving = t_ingress + t_serving;
    let t_reals = t_serving + wait_web_reals(cluster, &client, &[n2, n3]).await;
    report(&format!(
        "install {}; echo pods Ready {}; web: ingress {vip} after {}, Serving after {}, nodes 2 and 3 its reals after {}",
        secs(t_install),
        secs(t_pods),
        secs(t_ingress),
        secs(t_serving),
        secs(t_reals)
    ));

    // 3. Cluster: connections spread over the pods of both nodes; captures.
    let cap1 =
        Capture::start(None, &format!("mlbh{}", n1.index)).expect("capture on node 1's link");
    let capc = Capture::start(Some(&me.netns), &me.iface).expect("capture on the client");
    let (conns, t_traffic) = wait_spread(
        cluster,
        &me,
        vip,
        &[&n2.name, &n3.name],
        "Cluster: connections to pods of nodes 2 and 3",
    )
    .await;
    let t_first = t0.elapsed();
    report(&format!(
        "Cluster: first full spread {} after Serving ({} after the apply); {N} connections by node {:?}, by pod {:?}, peers seen by the pods {:?}",
        secs(t_traffic),
        secs(t_first),
        by_node(&conns),
        by_pod(&conns),
        tally(
            conns
                .iter()
                .map(|c| c.peer.to_string())
                .collect::<Vec<_>>()
                .iter()
                .map(String::as_str)
        )
    ));
    assert_eq!(
        by_pod(&conns).len(),
        4,
        "every pod answers: {:?}",
        by_pod(&conns)
    );
    for command in [
        "kubectl get svc web -n echo",
        "kubectl get mlbpool",
        "kubectl get mlb -n echo",
    ] {
        report(&format!(
            "$ {command}\n{}",
            run_user(cluster, dir.path(), command)
        ));
    }
    let ports: BTreeSet<u16> = conns.iter().map(|c| c.port).collect();
    drop(conns);
    let p = captured(cluster, (&cap1, &capc), vip, &ports).await;
    report(&format!(
        "Cluster captures: node 1's link: {} client packets to {vip}, encapsulated to {:?}, {} replies; the client got replies from {:?}",
        p.to_balancer, p.encapsulated, p.replies_via_balancer, p.replies_by_node
    ));
    assert!(p.to_balancer >= ports.len(), "{p:?}");
    assert_eq!(p.replies_via_balancer, 0, "replies crossed node 1: {p:?}");
    assert!(!p.replies_by_node.contains_key(&n1.name), "{p:?}");
    assert_eq!(
        p.replies_by_node.keys().collect::<BTreeSet<_>>(),
        BTreeSet::from([&n2.name, &n3.name]),
        "{p:?}"
    );
    assert!(!p.encapsulated.contains_key(&n1.name), "{p:?}");

    // 4. Local: a connection is answered by a pod of the node it was sent to, which sees the
    //    client's address.
    cap1.clear();
    capc.clear();
    run_user(cluster, dir.path(), "kubectl apply -f web-local.yaml");
    let (conns, t_local) = wait_for(cluster, "Local: pods see the client's address", || {
        let (conns, errors) = tokio::task::block_in_place(|| open_many(&me, vip, N));
        let peers: BTreeSet<IpAddr> = conns.iter().map(|c| c.peer).collect();
        let nodes: BTreeSet<String> = by_node(&conns).into_keys().collect();
        let r = if errors.is_empty()
            && peers == BTreeSet::from([IpAddr::V4(client_ip)])
            && nodes.len() == 2
        {
            Ok(conns)
        } else {
            Err(format!(
                "peers {peers:?}, nodes {nodes:?}, errors {errors:?}"
            ))
        };
        async move { r }
    })
    .await;
    let ports: BTreeSet<u16> = conns.iter().map(|c| c.port).collect();
    let answered: BTreeMap<u16, String> = conns
        .iter()
        .map(|c| (c.port, c.node().to_string()))
        .collect();
    drop(conns);
    let p = captured(cluster, (&cap1, &capc), vip, &ports).await;
    let mismatched: Vec<_> = answered
        .iter()
        .filter(|(port, node)| p.encap_node_of_port.get(port) != Some(node))
        .collect();
    report(&format!(
        "Local: applied to every connection showing the client's address in {}; {N} connections answered by {:?}; encapsulated to {:?}; {} answered by another node than the one they were sent to; replies via node 1: {}; the client got replies from {:?}",
        secs(t_local),
        tally(answered.values().map(String::as_str)),
        p.encapsulated,
        mismatched.len(),
        p.replies_via_balancer,
        p.replies_by_node
    ));
    assert!(
        mismatched.is_empty(),
        "Local answered elsewhere: {mismatched:?}"
    );
    assert_eq!(p.replies_via_balancer, 0, "replies crossed node 1: {p:?}");
    assert!(!p.replies_by_node.contains_key(&n1.name), "{p:?}");

    // 5. Scale down to one pod: new connections follow it; established ones to it keep
    //    answering. Then scale up again. (Failed until the operator's status applies got their
    //    own field manager: on 1.20 the emptied node stayed a real.)
    {
        let (mut held, _) = wait_spread(
            cluster,
            &me,
            vip,
            &[&n2.name, &n3.name],
            "Local: held connections on both nodes",
        )
        .await;
        let t0 = Instant::now();
        run_user(
            cluster,
            dir.path(),
            "kubectl scale deployment echo -n echo --replicas=1",
        );
        let (survivor, _) = wait_for(cluster, "one echo pod left", || {
            let client = client.clone();
            async move {
                let pods = Api::<Pod>::namespaced(client, APP)
                    .list(&ListParams::default().labels("app=echo"))
                    .await
                    .map_err(|e| e.to_string())?;
                let left: Vec<&Pod> = pods
                    .iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none())
                    .collect();
                match left[..] {
                    [p] if pod_ready(p) => Ok((
                        p.metadata.name.clone().unwrap_or_default(),
                        p.spec
                            .as_ref()
                            .and_then(|s| s.node_name.clone())
                            .unwrap_or_default(),
                    )),
                    _ => Err(format!("{} pods not being deleted", left.len())),
                }
            }
        })
        .await;
        let (pod, node) = survivor;
        let (conns, _) = wait_spread(
            cluster,
            &me,
            vip,
            &[&node],
            "Local: new connections only to the node with the pod left",
        )
        .await;
        let t_moved = t0.elapsed();
        assert!(conns.iter().all(|c| c.pod() == pod), "{:?}", by_pod(&conns));
        drop(conns);
        let mut kept = 0;
        let mut broken = Vec::new();
        let mut others = (0, 0);
        for (i, c) in held.iter_mut().enumerate() {
            let r = c.ask(&format!("still there {i}"));
            if c.pod() == pod {
                match r {
                    Ok(()) => kept += 1,
                    Err(e) => broken.push(format!("{} port {}: {e}", c.who, c.port)),
                }
            } else if r.is_ok() {
                others.0 += 1;
            } else {
                others.1 += 1;
            }
        }
        report(&format!(
            "scaled to 1 ({pod} on {node}): new connections only there {} after `kubectl scale`; of {} held connections, {kept} to {pod} still answer, {} failed; to the deleted pods: {} answered, {} closed",
            secs(t_moved),
            held.len(),
            broken.len(),
            others.0,
            others.1
        ));
        assert!(
            broken.is_empty(),
            "established connections to {pod} broke: {broken:?}"
        );
        drop(held);
        let t0 = Instant::now();
        run_user(
            cluster,
            dir.path(),
            "kubectl scale deployment echo -n echo --replicas=4",
        );
        let (conns, _) = wait_spread(
            cluster,
            &me,
            vip,
            &[&n2.name, &n3.name],
            "Local: scaled back to 4, connections to both nodes",
        )
        .await;
        report(&format!(
            "scaled to 4: new connections on both nodes {} after `kubectl scale` ({:?})",
            secs(t0.elapsed()),
            by_node(&conns)
        ));
        drop(conns);
    }

    // 6. A second Service asking for web's address: refused, naming the holder; web serves.
    std::fs::write(
        dir.path().join("web2.yaml"),
        service_yaml("web2", "Cluster", Some(vip)),
    )
    .unwrap();
    run_user(cluster, dir.path(), "kubectl apply -f web2.yaml");
    let (msg, t_refused) = wait_for(cluster, "web2 AddressInUse", || {
        let client = client.clone();
        async move {
            let svc = get_svc(&client, "web2").await;
            let c = svc
                .as_ref()
                .and_then(|s| svc_condition(s, condition::ADDRESS_ALLOCATED));
            match &c {
                Some((s, r, m)) if s == "False" && r == reason::ADDRESS_IN_USE => Ok(m.clone()),
                _ => Err(format!("{c:?}")),
            }
        }
    })
    .await;
    assert!(msg.contains("echo/web"), "the holder is named: {msg}");
    let (event, _) = wait_for(cluster, "an Event on web2", || {
        let client = client.clone();
        async move {
            let events = Api::<Event>::namespaced(client, APP)
                .list(&ListParams::default().fields("involvedObject.name=web2"))
                .await
                .map_err(|e| e.to_string())?;
            events
                .items
                .iter()
                .find(|e| e.reason.as_deref() == Some(reason::ADDRESS_IN_USE))
                .map(|e| {
                    format!(
                        "{} {}: {}",
                        e.type_.clone().unwrap_or_default(),
                        e.reason.clone().unwrap_or_default(),
                        e.message.clone().unwrap_or_default()
                    )
                })
                .ok_or_else(|| {
                    format!(
                        "{:?}",
                        events.items.iter().map(|e| &e.reason).collect::<Vec<_>>()
                    )
                })
        }
    })
    .await;
    report(&format!(
        "$ kubectl describe svc web2 -n echo\n{}",
        run_user(cluster, dir.path(), "kubectl describe svc web2 -n echo")
    ));
    let web2 = get_svc(&client, "web2").await.unwrap();
    assert_eq!(ingress(&web2), None, "web2 got an address");
    assert_eq!(
        get_svc(&client, "web").await.as_ref().and_then(ingress),
        Some(vip)
    );
    let (ok, errors) = tokio::task::block_in_place(|| open_many(&me, vip, 8));
    assert!(errors.is_empty(), "web stopped serving: {errors:?}");
    report(&format!(
        "web2 asking for {vip}: AddressInUse after {} ({msg}); event: {event}; web still serves ({} of 8)",
        secs(t_refused),
        ok.len()
    ));
    drop(ok);

    // 7. Both operator pods deleted: the new leader re-reads the allocations, writes nothing.
    //    From a settled point: after step 5's scale-up, web is Ready again once its agent
    //    reports the last spec (a snapshot taken before would see the old operator finish).
    wait_web_ready(cluster, &client, "web marklb.io/Ready=True again").await;
    let before = written(&client).await;
    let old: BTreeSet<String> = cluster
        .pods(&client, SYSTEM_NS, OPERATOR_SELECTOR)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    let t0 = Instant::now();
    let pods_api = Api::<Pod>::namespaced(client.clone(), SYSTEM_NS);
    for name in &old {
        pods_api
            .delete(name, &DeleteParams::default().grace_period(0))
            .await
            .unwrap();
    }
    let fresh: Vec<Pod> = wait_operator(cluster, 2, None)
        .await
        .into_iter()
        .filter(|p| !old.contains(p.metadata.name.as_deref().unwrap_or("")))
        .collect();
    assert_eq!(fresh.len(), 2, "two new operator pods");
    // The new leader has reconciled both Services (its metrics say so): compare then.
    let (leader, t_leader) = wait_for(cluster, "a new leader that reconciled the Services", || {
        let fresh = fresh.clone();
        let r = tokio::task::block_in_place(|| {
            let mut seen = Vec::new();
            for p in &fresh {
                let Some(ip) = p.status.as_ref().and_then(|s| s.pod_ip.clone()) else {
                    continue;
                };
                let addr = SocketAddr::new(ip.parse().unwrap(), 8080);
                let Ok(r) = http_get(addr, "/metrics") else {
                    seen.push(format!("{ip}: no answer"));
                    continue;
                };
                let leader = metric(&r.body, "marklb_operator_leader");
                let services = r
                    .body
                    .lines()
                    .filter(|l| l.starts_with("marklb_operator_service_reconciliations_total"))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum::<f64>();
                if leader == Some(1.0) && services >= 2.0 {
                    return Ok(p.metadata.name.clone().unwrap_or_default());
                }
                seen.push(format!(
                    "{ip}: leader {leader:?}, service reconciliations {services}"
                ));
            }
            Err(seen.join("; "))
        });
        async move { r }
    })
    .await;
    let after = written(&client).await;
    report(&format!(
        "operator pods deleted: {leader} leads and reconciled the Services {} later; what it writes {} ({} objects)",
        secs(t0.elapsed().max(t_leader)),
        if before == after {
            "unchanged"
        } else {
            "CHANGED"
        },
        before.len()
    ));
    assert_eq!(before, after, "the restarted operator wrote");
    let (ok, errors) = tokio::task::block_in_place(|| open_many(&me, vip, 8));
    assert!(errors.is_empty(), "web stopped serving: {errors:?}");
    drop(ok);

    // 8. Deleting the Services releases the address everywhere.
    run_user(cluster, dir.path(), "kubectl delete service web2 -n echo");
    let t0 = Instant::now();
    run_user(cluster, dir.path(), "kubectl delete service web -n echo");
    let t_command = t0.elapsed();
    let node1_status = SocketAddr::new(IpAddr::V4(n1.ip), AGENT_METRICS_PORT);
    let (_, t_gone) = wait_for(cluster, "web's address released everywhere", || {
        let client = client.clone();
        let vip_s = vip.to_string();
        let netns1 = n1.netns.clone();
        async move {
            let mut left = Vec::new();
            if get_svc(&client, "web").await.is_some() {
                left.push("the Service".to_string());
            }
            if Api::<LoadBalancer>::namespaced(client.clone(), APP)
                .get_opt("svc-web")
                .await
                .map_err(|e| e.to_string())?
                .is_some()
            {
                left.push("the LoadBalancer".into());
            }
            let states = Api::<LoadBalancerNodeState>::namespaced(client.clone(), APP)
                .list(&ListParams::default().labels(&format!("{LOADBALANCER_LABEL}=svc-web")))
                .await
                .map_err(|e| e.to_string())?;
            if !states.items.is_empty() {
                left.push(format!("{} node states", states.items.len()));
            }
            let pool = Api::<LoadBalancerIPPool>::all(client.clone())
                .get(POOL)
                .await
                .map_err(|e| e.to_string())?;
            if pool
                .status
                .iter()
                .flat_map(|s| &s.allocations)
                .any(|a| a.address == vip_s)
            {
                left.push("the pool's allocation".into());
            }
            // The agent's view of node 1's datapath; when no balancer is left the agent may
            // be gone too (its DaemonSet follows the selectors), and with it the datapath.
            match tokio::task::block_in_place(|| http_get(node1_status, "/status")) {
                Ok(r) if r.body.contains(&format!("\"{vip_s}")) => {
                    left.push("the VIP in node 1's datapath".into())
                }
                Ok(_) => {}
                Err(e) => {
                    if let Ok(Some(id)) = xdp_prog_id(&netns1, "eth0") {
                        left.push(format!(
                            "node 1's agent does not answer ({e}) but XDP program {id} is attached"
                        ));
                    }
                }
            }
            if left.is_empty() {
                Ok(())
            } else {
                Err(left.join(", "))
            }
        }
    })
    .await;
    let refused = tokio::task::block_in_place(|| Conn::open(&me, vip)).is_err();
    report(&format!(
        "`kubectl delete service web` returned after {} (it waits for the finalizer), everything released (Service, LoadBalancer, node states, ledger, node 1's datapath) {} later; a new connection fails: {refused}",
        secs(t_command),
        secs(t_gone)
    ));
    assert!(refused, "the released address still answers");
    drop((cap1, capc));
    cluster.remove_client(me.index).unwrap();
    report(&format!("whole story {}", secs(t_all.elapsed())));
}
