//! A real Kubernetes 1.20 cluster of N nodes on this machine, for the end-to-end tests that
//! need kubelets: the control plane on the host (etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler), and per node, in the node's own network and mount namespaces, containerd,
//! kubelet and kube-proxy; all built or extracted by `scripts/setup-k8s.sh` +
//! `scripts/setup-cluster.sh` (the README's cluster section explains the settings).
//!
//! # Using it (the harness API)
//!
//! ```ignore
//! let cluster = marklb_tests::cluster_or_skip!();   // one cluster per test binary, 2 nodes
//! let client = cluster.client().await?;             // administrator (kube::Client)
//! cluster.kubectl_ok(&["get", "nodes"])?;           // kubectl 1.20.2, admin kubeconfig
//! for node in cluster.nodes() {                     // NodeInfo, by index
//!     node.name;        // "marklb-node-1": the Node object, kubelet's --hostname-override
//!     node.ip;          // 10.203.0.11: InternalIP, on `eth0` in the node's network namespace
//!     node.netns;       // named network namespace: netns::in_netns(&node.netns, ..),
//!                       // `ip -n <netns> ...`; host-network pods of the node live in it
//!     node.iface;       // "eth0": the node's own interface (an agent on it sees only it)
//!     node.bpffs;       // the node's private bpffs, from the host (an agent pins there)
//!     node.labels;      // given at start (kubelet --node-labels)
//! }
//! let n3 = cluster.add_node(NodeOptions::default()).await?;  // joins, Ready when it returns
//! cluster.stop_kubelet(&n3.name)?;                 // NotReady after NODE_GRACE
//! cluster.remove_node(&n3.name).await?;            // processes, namespaces, Node object gone
//! let topo = NodeTopology::build(&node, opts)?;     // client/router/reals around a veth on it
//! let me = cluster.add_client(1)?;                 // a client namespace on the node bridge
//! ```
//!
//! - [`shared`] / [`cluster_or_skip!`](crate::cluster_or_skip) start one cluster per test
//!   binary with [`DEFAULT_NODES`] nodes (`MARKLB_CLUSTER_NODES` overrides; 1 works), the
//!   first test that asks starts it, the others share it; it is stopped when the process
//!   exits (also after failed tests) or is interrupted (SIGINT, SIGTERM, SIGHUP). Tests that
//!   change the set of nodes must leave the nodes they did not add as they found them.
//! - [`Cluster::start`] starts one explicitly ([`ClusterOptions`]: nodes and their labels,
//!   images to import, detached for `make cluster-up`).
//! - [`Cluster::stop`] / `Drop` undo everything ([`teardown`]).
//!
//! # What a node is
//! See [`node`]: a named network namespace with one veth (`eth0`, the node's address) to the
//! host bridge [`NODES_BRIDGE`] (the host is [`BRIDGE_IP`] on it; the API server listens
//! there); a mount namespace with private propagation in which kubelet's, containerd's and
//! CNI's hard-coded directories and `/sys/fs/bpf` are the node's own; its own containerd
//! (root, state, socket), kubelet (`--root-dir`, `--cgroup-root=/<node>`, `--node-ip`,
//! `--hostname-override`, its own token as `system:node:<node>`, labels at start) and
//! kube-proxy (iptables in the node's namespace). Ports are the standard ones in every node.
//!
//! # What it changes on the host, and undoing it
//! Everything the cluster changes is written to a record ([`Record`], `<base>/current.json`)
//! before it is changed: the processes (PID and start time), the node bridge, the named
//! network namespaces, the nodes' cgroup roots, mount-point directories that did not exist,
//! the machine-wide sysctls kubelet sets (saved), the bridge's own IPv4 forwarding (on: a
//! balancer node's next hop to the other nodes; `ip_forward` and every other interface stay
//! as they were), client namespaces ([`client`]). Stop, SIGINT and SIGTERM undo it in process;
//! after a SIGKILL the next start, or `marklb-cluster down` (`make cluster-down`), undoes it
//! from the record. [`HostState`] captures the host, so a test can prove nothing is left.
//!
//! One cluster at a time per machine (a lock file); a second start waits for the first to
//! stop. When the machine cannot run the cluster (a set-up part recorded as unavailable, a
//! cgroup v2-only host, no overlayfs, ...), [`shared`] prints `SKIP <test>: <exact reason>`
//! and the test returns; with `MARKLB_CLUSTER_REQUIRED=1` that is a failure instead. Not being
//! root, or the set-up never having run, is always a failure.
//!
//! Pods of different nodes reach each other: every node routes the other nodes' pod ranges
//! to them over the bridge (in the nodes' namespaces; kube-proxy's `Cluster` policy needs it).
//!
//! Modules: [`binaries`] (what the set-up left, what the machine lacks), [`client`] (client
//! namespaces on the node network), [`record`] (the record,
//! the machine lock, process bookkeeping), [`host`] (host snapshots), [`teardown`], `pki`
//! (certificates and tokens), `config` (configuration files), [`images`], `start` (the control
//! plane), [`node`] (a node), [`shared`] (one cluster per test binary, exit and signal
//! handlers), [`node_topology`] (a test topology around a veth on a node).

pub mod binaries;
pub mod client;
mod config;
pub mod host;
pub mod images;
pub mod node;
pub mod node_topology;
mod pki;
pub mod record;
pub mod shared;
mod start;
pub mod teardown;

use std::{
    collections::BTreeMap,
    fmt, fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc,
    },
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams},
};

pub use binaries::{Availability, Binaries, availability, machine_problem};
pub use client::{ClientInfo, client_ip};
pub use host::{HOST_PATHS, HostState, SYSCTLS, mount_points};
pub use images::{ImageRef, Images, images};
pub use node_topology::{NodeTopology, render, xdp_prog_id};
pub use record::{
    BASE_ENV, DEFAULT_BASE, MachineLock, NodeRecord, ProcRecord, Record, base_dir, proc_alive,
    proc_record,
};
pub use shared::shared;
pub use teardown::{recover_stale, teardown};

use crate::kube_harness::{random_hex, report, rss_kib};
use crate::supervise::{Supervisor, client_from_kubeconfig};
use host::{cgroup_dirs, dir_entries, read_sysctls};
use node::NodeHandle;
use record::{LIVE, all_pids, cmdline, exe_name, ns_inode};
use start::{Identities, import_image};

/// Service addresses.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// Pod addresses of all nodes (node `i` gives its pods `10.244.<i>.0/24`).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The CNI bridge inside each node's network namespace.
pub const CNI_BRIDGE: &str = "mlbcni0";
/// The host bridge every node's veth is attached to.
pub const NODES_BRIDGE: &str = "mlbnodes0";
/// The nodes' network: the host is [`BRIDGE_IP`], node `i` is `10.203.0.<10 + i>`.
pub const NODES_NET: &str = "10.203.0.0/24";
/// The host's address on [`NODES_BRIDGE`]: the API server's address.
pub const BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(10, 203, 0, 1);
/// The node's interface in its network namespace (its InternalIP is on it).
pub const NODE_IFACE: &str = "eth0";
/// Where an agent pins inside a node (each node has its own bpffs there).
pub const BPFFS: &str = "/sys/fs/bpf";
/// Node indexes run from 1 to this (the API server's token file is written at start).
pub const MAX_NODES: usize = 16;
/// How many nodes [`shared`] starts unless `MARKLB_CLUSTER_NODES` says otherwise.
pub const DEFAULT_NODES: usize = 2;
/// The label [`shared`] gives each node at start: its index (`"1"`, `"2"`, ...). Nodes a
/// test adds do not have it.
pub const TEST_NODE_LABEL: &str = "marklb.io/test-node";
/// Overrides [`DEFAULT_NODES`].
pub const NODES_ENV: &str = "MARKLB_CLUSTER_NODES";
/// A node whose kubelet stops reporting is NotReady (condition Unknown) after this long
/// (kube-controller-manager's `--node-monitor-grace-period`; it checks every 2 s).
pub const NODE_GRACE: Duration = Duration::from_secs(16);
/// Set to 1 to turn a SKIP into a failure (CI on a machine that must run the cluster).
pub const REQUIRED_ENV: &str = crate::kube_harness::REQUIRED_ENV;
/// Set to 1 to copy the cluster's logs to `<tmp>/marklb-cluster-logs-<pid>` when it stops (done
/// anyway when a test of the process panicked).
pub const KEEP_LOGS_ENV: &str = "MARKLB_CLUSTER_KEEP_LOGS";

const LOCK_TIMEOUT: Duration = Duration::from_secs(900);
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(120);

/// The address of node `index` (1-based).
pub fn node_ip(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 203, 0, 10 + index as u8)
}

/// How to start a node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeOptions {
    /// Labels the kubelet registers the node with (`--node-labels`; NodeRestriction refuses
    /// kubelets labelling themselves below `kubernetes.io` / `k8s.io` except the well-known
    /// ones).
    pub labels: BTreeMap<String, String>,
}

impl NodeOptions {
    /// A node with these labels.
    pub fn labelled(labels: &[(&str, &str)]) -> Self {
        Self {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }
}

/// A node of a running cluster, as tests see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    /// The Node object's name (`marklb-node-<index>`).
    pub name: String,
    pub index: usize,
    /// InternalIP: the address of [`NodeInfo::iface`].
    pub ip: Ipv4Addr,
    /// The named network namespace to enter (`/var/run/netns/<netns>`).
    pub netns: String,
    /// The node's own interface in that namespace ([`NODE_IFACE`]).
    pub iface: String,
    /// The node's directory (its containerd, kubelet and log directories are below it).
    pub dir: PathBuf,
    /// The node's bpffs (its `/sys/fs/bpf`), reached from the host.
    pub bpffs: PathBuf,
    /// kubelet's `--cgroup-root`.
    pub cgroup_root: String,
    pub labels: BTreeMap<String, String>,
    pub containerd_socket: PathBuf,
}

impl NodeInfo {
    /// Where an agent on this node with `--bpffs=/sys/fs/bpf` pins the datapath of `iface`.
    pub fn pins(&self, iface: &str) -> PathBuf {
        self.bpffs.join("marklb").join(iface)
    }

    /// A TCP port free on the node's address (inside its network namespace).
    pub fn free_port(&self) -> Result<u16> {
        let ip = self.ip;
        crate::netns::in_netns(&self.netns, || crate::supervise::free_port_on(ip))?
    }

    /// The inode of the node's network namespace (a process is on this node iff its
    /// `/proc/<pid>/ns/net` has it, or it runs in a pod network namespace of the node).
    pub fn netns_inode(&self) -> Option<u64> {
        crate::netns::named_netns_inode(&self.netns)
    }
}

/// How to start a cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// The sandbox image (imported into every node before its kubelet starts).
    pub pause: ImageRef,
    /// More images to import into every node.
    pub images: Vec<ImageRef>,
    /// The nodes (at least one).
    pub nodes: Vec<NodeOptions>,
    /// Keep running after this process exits (`make cluster-up`): no parent-death signal, no
    /// owner in the record.
    pub detached: bool,
}

/// Start-up times, from the start.
#[derive(Clone, Debug, Default)]
pub struct StartTimes {
    pub etcd: Duration,
    pub apiserver: Duration,
    /// Every node's processes started (images imported).
    pub nodes_started: Duration,
    /// Every node Ready and its kube-proxy healthy.
    pub nodes_ready: Duration,
    /// Everything (also the default service account).
    pub total: Duration,
}

impl fmt::Display for StartTimes {
    /// `"Ready 19.0s after start (etcd 0.4s, API server 7.7s, nodes started 10.4s, all Ready
    /// 19.0s)"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = |d: Duration| d.as_secs_f64();
        write!(
            f,
            "Ready {:.1}s after start (etcd {:.1}s, API server {:.1}s, nodes started {:.1}s, all Ready {:.1}s)",
            s(self.total),
            s(self.etcd),
            s(self.apiserver),
            s(self.nodes_started),
            s(self.nodes_ready)
        )
    }
}

/// What the cluster's owner thread and its users share.
pub(crate) struct Ctx {
    pub bins: Binaries,
    pub detached: bool,
    pub procs: Supervisor,
    pub ids: Identities,
    /// The sandbox image's name.
    pub pause: String,
    /// Imported into every node: the pause image first.
    pub images: Vec<ImageRef>,
    pub proxy_kubeconfig: PathBuf,
    rec: Mutex<Record>,
    nodes: Mutex<BTreeMap<String, NodeHandle>>,
}

impl Ctx {
    /// A copy of the record.
    pub fn record(&self) -> Record {
        self.rec.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Changes the record and writes it (before the change it describes is made).
    pub fn update(&self, f: impl FnOnce(&mut Record)) -> Result<()> {
        let mut rec = self.rec.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut rec);
        rec.save()
    }

    /// Changes node `name`'s record.
    pub fn update_node(&self, name: &str, f: impl FnOnce(&mut NodeRecord)) -> Result<()> {
        self.update(|r| {
            if let Some(n) = r.nodes.iter_mut().find(|n| n.name == name) {
                f(n)
            }
        })
    }

    pub fn nodes_mut(&self) -> MutexGuard<'_, BTreeMap<String, NodeHandle>> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A job for the owner thread (which starts every process: their parent-death signal fires
/// when the thread that forked them ends).
type Job = Box<dyn FnOnce(&tokio::runtime::Runtime) + Send>;

/// A running cluster. Dropping it stops it (see [`Cluster::stop`]).
pub struct Cluster {
    ctx: Arc<Ctx>,
    owner: Mutex<Option<mpsc::Sender<Job>>>,
    times: StartTimes,
    stopped: AtomicBool,
    lock: Mutex<Option<MachineLock>>,
    admin_token: String,
    next_index: AtomicUsize,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rec = self.ctx.record();
        f.debug_struct("Cluster")
            .field("dir", &rec.dir)
            .field("api", &rec.api_url)
            .field("nodes", &self.node_names())
            .finish()
    }
}

/// Whether a node's Ready condition is True.
pub fn node_ready(node: &Node) -> bool {
    node_condition(node, "Ready").as_deref() == Some("True")
}

/// The status of a node's condition `kind` (`True`, `False`, `Unknown`).
pub fn node_condition(node: &Node, kind: &str) -> Option<String> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| c.status.clone())
}

/// Runs `cmd`; its stdout, or an error naming `what` with its stderr.
fn stdout_of(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The owner thread: runs jobs until the cluster drops its sender.
fn owner_thread(jobs: mpsc::Receiver<Job>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    while let Ok(job) = jobs.recv() {
        job(&rt);
    }
}

impl Cluster {
    /// Starts a cluster (waiting for the machine lock; undoing a stale one first).
    pub fn start(opts: ClusterOptions) -> Result<Cluster> {
        Self::start_with_lock(opts, MachineLock::acquire(LOCK_TIMEOUT)?)
    }

    /// [`start`](Self::start) with the machine lock already held (a test that compares the
    /// host before and after keeps it across both).
    pub fn start_with_lock(opts: ClusterOptions, lock: MachineLock) -> Result<Cluster> {
        if opts.nodes.is_empty() || opts.nodes.len() > MAX_NODES {
            bail!(
                "a cluster has 1 to {MAX_NODES} nodes, not {}",
                opts.nodes.len()
            );
        }
        let bins = match availability()? {
            Availability::Available(b) => *b,
            Availability::Unavailable(why) => bail!("the cluster cannot run here: {why}"),
        };
        if let Some((_, problems)) = recover_stale()?
            && !problems.is_empty()
        {
            bail!("undoing a stale cluster left: {problems:?}");
        }
        if let Some(rec) = Record::load()? {
            bail!(
                "a marklb cluster is already running on this machine ({}, {}): stop it with \
                 `make cluster-down`",
                rec.dir.display(),
                match &rec.owner {
                    Some(o) => format!("owned by pid {}", o.pid),
                    None => "started by `make cluster-up`".into(),
                }
            );
        }
        if !opts.detached {
            shared::install_handlers();
        }
        let rec = Self::initial_record(opts.detached)?;
        if !opts.detached {
            LIVE.lock().expect("live clusters").push(rec.clone());
        }
        rec.save()?;
        let admin_token = random_hex(24);
        let ids = Identities::new(&admin_token);
        let proxy_kubeconfig = rec.dir.join("kube-proxy.kubeconfig");
        let mut images = vec![opts.pause.clone()];
        images.extend(opts.images.iter().cloned());
        let ctx = Arc::new(Ctx {
            procs: Supervisor::new(&rec.dir.join("logs"))?,
            bins,
            detached: opts.detached,
            ids,
            pause: opts.pause.name.clone(),
            images,
            proxy_kubeconfig,
            rec: Mutex::new(rec),
            nodes: Mutex::new(BTreeMap::new()),
        });
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("marklb-cluster".into())
            .spawn(move || owner_thread(rx))?;
        let mut cluster = Cluster {
            ctx: ctx.clone(),
            owner: Mutex::new(Some(jobs)),
            times: StartTimes::default(),
            stopped: AtomicBool::new(false),
            lock: Mutex::new(Some(lock)),
            admin_token,
            next_index: AtomicUsize::new(opts.nodes.len() + 1),
        };
        let nodes = opts.nodes.clone();
        let result = cluster.run_on_owner(move |rt| ctx.start_cluster(rt, &nodes));
        match result.and_then(|r| r) {
            Ok((times, _)) => cluster.times = times,
            Err(e) => {
                let problems = cluster.stop_inner();
                if !problems.is_empty() {
                    return Err(e.context(format!("and stopping left: {problems:?}")));
                }
                return Err(e);
            }
        }
        if opts.detached {
            // Nobody waits for these processes: leave them to init.
            cluster.ctx.procs.detach_all();
            cluster.stopped.store(true, Ordering::SeqCst);
            *cluster.lock.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        Ok(cluster)
    }

    /// Runs `f` on the owner thread and waits for it (blocking).
    fn run_on_owner<R: Send + 'static>(
        &self,
        f: impl FnOnce(&tokio::runtime::Runtime) -> R + Send + 'static,
    ) -> Result<R> {
        let (tx, rx) = mpsc::channel();
        self.send_job(Box::new(move |rt| {
            let _ = tx.send(f(rt));
        }))?;
        rx.recv()
            .map_err(|_| anyhow!("the cluster's owner thread died"))
    }

    /// Runs `f` on the owner thread and awaits it.
    async fn on_owner<R: Send + 'static>(
        &self,
        f: impl FnOnce(&tokio::runtime::Runtime) -> R + Send + 'static,
    ) -> Result<R> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send_job(Box::new(move |rt| {
            let _ = tx.send(f(rt));
        }))?;
        rx.await
            .map_err(|_| anyhow!("the cluster's owner thread died"))
    }

    fn send_job(&self, job: Job) -> Result<()> {
        self.owner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .ok_or_else(|| anyhow!("the cluster is stopped"))?
            .send(job)
            .map_err(|_| anyhow!("the cluster's owner thread is gone"))
    }

    /// The record of a new cluster: its directory and what the host looks like before it.
    fn initial_record(detached: bool) -> Result<Record> {
        fs::create_dir_all(base_dir())?;
        let dir = tempfile::Builder::new()
            .prefix("c-")
            .tempdir_in(base_dir())?
            .keep();
        Ok(Record {
            dir,
            owner: if detached {
                None
            } else {
                proc_record("owner", std::process::id())
            },
            sysctls: read_sysctls(),
            host_paths: HOST_PATHS
                .iter()
                .map(|p| (p.to_string(), dir_entries(Path::new(p))))
                .collect(),
            cgroups_before: cgroup_dirs(),
            ..Default::default()
        })
    }

    /// The record (what the cluster changed on the host), as it is now.
    pub fn record(&self) -> Record {
        self.ctx.record()
    }

    /// The cluster's directory (logs in `logs/<process>.log`, a node's in
    /// `logs/<node>/<process>.log`).
    pub fn dir(&self) -> PathBuf {
        self.ctx.record().dir
    }

    /// The administrator's kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        self.ctx.record().kubeconfig
    }

    pub fn api_url(&self) -> String {
        self.ctx.record().api_url
    }

    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    pub fn times(&self) -> &StartTimes {
        &self.times
    }

    pub fn binaries(&self) -> &Binaries {
        &self.ctx.bins
    }

    /// The nodes, by index.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        let mut v: Vec<NodeInfo> = self
            .ctx
            .nodes_mut()
            .values()
            .map(|h| h.info.clone())
            .collect();
        v.sort_by_key(|n| n.index);
        v
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<NodeInfo> {
        self.ctx.nodes_mut().get(name).map(|h| h.info.clone())
    }

    /// The `i`-th node (1-based index of [`nodes`](Self::nodes)); panics when there is none.
    pub fn nth_node(&self, i: usize) -> NodeInfo {
        self.nodes()
            .get(i - 1)
            .cloned()
            .unwrap_or_else(|| panic!("the cluster has no node {i}: {:?}", self.node_names()))
    }

    fn node_names(&self) -> Vec<String> {
        self.nodes().into_iter().map(|n| n.name).collect()
    }

    /// Adds a node to the running cluster; returns once it is Ready (and its kube-proxy
    /// healthy). Its processes belong to the cluster (they stop with it).
    pub async fn add_node(&self, opts: NodeOptions) -> Result<NodeInfo> {
        let index = self.next_index.fetch_add(1, Ordering::SeqCst);
        if index > MAX_NODES {
            bail!("at most {MAX_NODES} nodes per cluster (node tokens are made at start)");
        }
        let ctx = self.ctx.clone();
        let info = self
            .on_owner(move |rt| ctx.start_node(rt, index, &opts))
            .await??;
        let client = self.client().await?;
        self.ctx.wait_node_ready(&client, &info).await?;
        Ok(info)
    }

    /// Stops node `name`'s kubelet (SIGTERM, SIGKILL after 5 s); the node goes NotReady within
    /// [`NODE_GRACE`]. Its pods, containerd and kube-proxy keep running.
    pub fn stop_kubelet(&self, name: &str) -> Result<()> {
        if self.node(name).is_none() {
            bail!("no node {name}");
        }
        let label = format!("{name}/kubelet");
        if !self.ctx.procs.stop_one(&label, Duration::from_secs(5)) {
            bail!("{label} is not running");
        }
        self.ctx.update(|r| {
            r.procs
                .retain(|p| !(p.node.as_deref() == Some(name) && p.name == "kubelet"))
        })
    }

    /// Removes node `name`: stops its processes and pods, removes its namespaces and cgroups,
    /// then deletes its Node object (the controllers delete its pods' objects later).
    pub async fn remove_node(&self, name: &str) -> Result<()> {
        let rec = self.ctx.record();
        let node = rec
            .node(name)
            .cloned()
            .with_context(|| format!("no node {name}"))?;
        let ctx = self.ctx.clone();
        let problems = tokio::task::spawn_blocking(move || {
            // Out of supervision first: a wait for another node must not fail when these stop.
            let prefix = format!("{}/", node.name);
            let children = ctx.procs.take_matching(|l| l.starts_with(&prefix));
            let problems = teardown::teardown_node(&rec, &node);
            crate::supervise::reap(children);
            ctx.nodes_mut().remove(&node.name);
            let _ = ctx.update(|r| {
                r.nodes.retain(|n| n.name != node.name);
                r.procs
                    .retain(|p| p.node.as_deref() != Some(node.name.as_str()));
            });
            problems
        })
        .await?;
        if !problems.is_empty() {
            bail!("removing {name} left: {problems:?}");
        }
        let nodes: Api<Node> = Api::all(self.client().await?);
        nodes.delete(name, &DeleteParams::default()).await?;
        Ok(())
    }

    /// A new client for the administrator (one per runtime: make one in each test).
    pub async fn client(&self) -> Result<Client> {
        client_from_kubeconfig(&self.kubeconfig()).await
    }

    fn kubectl_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.ctx.bins.kubectl);
        c.arg("--kubeconfig").arg(self.kubeconfig()).args(args);
        c
    }

    /// Runs the cluster's kubectl (1.20.2) with the administrator's kubeconfig.
    pub fn kubectl(&self, args: &[&str]) -> Result<Output> {
        self.kubectl_cmd(args)
            .stdin(Stdio::null())
            .output()
            .context("running kubectl")
    }

    /// [`kubectl`](Self::kubectl), failing unless it succeeds; its stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        stdout_of(
            &mut self.kubectl_cmd(args),
            &format!("kubectl {}", args.join(" ")),
        )
    }

    /// `ctr -n k8s.io` against node `node`'s containerd.
    pub fn ctr(&self, node: &str, args: &[&str]) -> Result<String> {
        let n = self.node(node).with_context(|| format!("no node {node}"))?;
        let mut c = Command::new(&self.ctx.bins.ctr);
        c.arg("--address")
            .arg(&n.containerd_socket)
            .args(["-n", "k8s.io"])
            .args(args);
        stdout_of(&mut c, &format!("ctr {}", args.join(" ")))
    }

    /// Imports an image archive into every node's containerd.
    pub fn import_image(&self, image: &ImageRef) -> Result<()> {
        for n in self.nodes() {
            import_image(&self.ctx.bins.ctr, &n.containerd_socket, image)?;
        }
        Ok(())
    }

    /// The last `n` lines of a process's log: `kube-apiserver`, `etcd`, ... or a node's
    /// `marklb-node-2/kubelet`, `marklb-node-2/containerd`, ...
    pub fn log_tail(&self, name: &str, n: usize) -> String {
        self.ctx.procs.log_tail(name, n)
    }

    /// Resident memory (KiB) of the cluster's processes by name (a node's as
    /// `<node>/<process>`), and of each node's containerd shims (`<node>/containerd-shims`).
    pub fn rss_kib(&self) -> BTreeMap<String, u64> {
        let rec = self.ctx.record();
        let mut m = BTreeMap::new();
        for p in &rec.procs {
            if proc_alive(p) {
                *m.entry(p.label()).or_default() += rss_kib(p.pid).unwrap_or(0);
            }
        }
        for n in &rec.nodes {
            for pid in all_pids() {
                if exe_name(pid).as_deref() == Some("containerd-shim-runc-v2")
                    && (cmdline(pid).contains(&n.containerd_socket.display().to_string())
                        || (n.netns_inode.is_some() && ns_inode(pid, "net") == n.netns_inode))
                {
                    *m.entry(format!("{}/containerd-shims", n.name)).or_default() +=
                        rss_kib(pid).unwrap_or(0);
                }
            }
        }
        m
    }

    /// Pods of `namespace` matching `selector`.
    pub async fn pods(&self, client: &Client, namespace: &str, selector: &str) -> Result<Vec<Pod>> {
        let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
        Ok(api
            .list(&ListParams::default().labels(selector))
            .await?
            .items)
    }

    /// Stops everything and undoes every change on the host; returns what could not be undone.
    pub fn stop(self) -> Vec<String> {
        self.stop_inner()
    }

    /// [`stop`](Self::stop), handing back the machine lock.
    pub fn stop_keep_lock(self) -> (Vec<String>, Option<MachineLock>) {
        let lock = self.lock.lock().unwrap_or_else(|e| e.into_inner()).take();
        (self.stop_inner(), lock)
    }

    fn stop_inner(&self) -> Vec<String> {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return Vec::new();
        }
        let rec = self.ctx.record();
        let problems = teardown(&rec);
        self.ctx.procs.reap_all();
        self.ctx.nodes_mut().clear();
        // The owner thread ends (nothing is left for its parent-death signal to kill).
        *self.owner.lock().unwrap_or_else(|e| e.into_inner()) = None;
        LIVE.lock().map(|mut l| l.retain(|r| r.dir != rec.dir)).ok();
        rec.remove_file_if_mine();
        *self.lock.lock().unwrap_or_else(|e| e.into_inner()) = None;
        problems
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let problems = self.stop_inner();
        if !problems.is_empty() {
            report(&format!("stopping the cluster left: {problems:?}"));
        }
    }
}
