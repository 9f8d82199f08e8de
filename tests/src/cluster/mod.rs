//! A real one-node Kubernetes 1.20 cluster on this machine, for the end-to-end tests that need a
//! kubelet: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd (own
//! configuration, socket and state), kubelet and kube-proxy, all built or extracted by
//! `scripts/setup-k8s.sh` + `scripts/setup-cluster.sh` (the README's cluster section explains
//! the settings).
//!
//! - [`Cluster::start`] starts everything in a directory under [`base_dir`], imports the images
//!   (OCI archives built by `scripts/image/build.sh`, see [`images`]) into containerd, waits
//!   until the node is Ready, the `default` service account exists and kube-proxy is healthy,
//!   and hands out a [`kube::Client`] ([`Cluster::client`]) and a kubeconfig
//!   ([`Cluster::kubeconfig`]; [`Cluster::kubectl`] runs the matching kubectl 1.20).
//! - [`shared`] / [`cluster_or_skip!`](crate::cluster_or_skip) start one cluster per test
//!   binary (the first test that asks starts it, the others wait for it), stopped when the
//!   process exits (also after failed tests) or is interrupted (SIGINT, SIGTERM, SIGHUP).
//! - [`Cluster::stop`] / `Drop` undo everything ([`teardown`]): the processes by PID (checked
//!   against their start time), the pods' processes (by their `kubepods` cgroups) and
//!   containerd's shims, the mounts, the cgroups, the `KUBE-*`/`CNI-*` iptables chains and the
//!   rules jumping to them, the CNI bridge, the node address, the host directories kubelet and
//!   containerd create (`/var/log/pods`, `/var/log/containers`, `/var/lib/kubelet`,
//!   `/var/lib/cni`, `/run/containerd`), the pins of the agents whose interfaces are gone, the
//!   bpffs the cluster mounted (unless something else pinned into it), and the sysctls kubelet,
//!   kube-proxy and the bridge plugin change (saved at start). [`HostState`] captures all of
//!   it, so a test can prove nothing is left.
//! - Everything the cluster changes is written to a record ([`Record`], `<base>/current.json`)
//!   as it is changed. A run that was killed (SIGKILL) leaves the record; the next start, or
//!   `marklb-cluster down` (`make cluster-down`), undoes it from there.
//!
//! One cluster at a time per machine (a lock file; the node uses the host's cgroups,
//! iptables and `/var/log/pods`); a second start waits for the first to stop. All ports are
//! picked free; the API server, kubelet and the pods' host network use the node address
//! [`NODE_IP`] on `lo`, so nothing is exposed on the machine's real interfaces.
//!
//! When the machine cannot run the cluster (a set-up part recorded as unavailable, a cgroup
//! v2-only host, no overlayfs, ...), [`shared`] prints `SKIP <test>: <exact reason>` and the
//! test returns; with `MARKLB_CLUSTER_REQUIRED=1` that is a failure instead. Not being root,
//! or the set-up never having run, is always a failure.
//!
//! Modules: [`binaries`] (what the set-up left, what the machine lacks), [`record`] (the record,
//! the machine lock, process bookkeeping), [`host`] (host snapshots), [`teardown`], `pki`
//! (certificates and tokens), `config` (configuration files), [`images`], `start` (each
//! component), [`shared`] (one cluster per test binary, exit and signal handlers),
//! [`node_topology`] (a test topology around a veth on the node).

pub mod binaries;
mod config;
pub mod host;
pub mod images;
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
    path::Path,
    process::{Command, Output, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{Api, Client, api::ListParams};

pub use binaries::{Availability, Binaries, availability, machine_problem};
pub use host::{HOST_PATHS, HostState, SYSCTLS, ipt_cleanup_script, mount_points};
pub use images::{ImageRef, Images, images};
pub use node_topology::{NodeTopology, render, xdp_prog_id};
pub use record::{
    BASE_ENV, DEFAULT_BASE, MachineLock, ProcRecord, Record, base_dir, proc_alive, proc_record,
};
pub use shared::shared;
pub use teardown::{recover_stale, teardown};

use crate::kube_harness::{random_hex, report, rss_kib};
use crate::supervise::{Supervisor, client_from_kubeconfig};
use host::{cgroup_dirs, dir_entries, ipt_all_chains, kube_chain, link_exists, read_sysctls};
use record::{LIVE, all_pids, cmdline, exe_name};
use start::{Starter, import_image};

/// The node's name.
pub const NODE_NAME: &str = "marklb-node";
/// The node's address (InternalIP), added to `lo` while the cluster runs.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 203, 255, 1);
/// Pod addresses of the CNI bridge (pods without host network).
pub const POD_CIDR: &str = "10.244.0.0/24";
/// Service addresses.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The CNI bridge.
pub const CNI_BRIDGE: &str = "mlbcni0";
/// Where the agents pin (a bpffs; mounted by the cluster when the host has none there).
pub const BPFFS: &str = "/sys/fs/bpf";
/// Set to 1 to turn a SKIP into a failure (CI on a machine that must run the cluster).
pub const REQUIRED_ENV: &str = crate::kube_harness::REQUIRED_ENV;
/// Set to 1 to copy the cluster's logs to `<tmp>/marklb-cluster-logs-<pid>` when it stops (done
/// anyway when a test of the process panicked).
pub const KEEP_LOGS_ENV: &str = "MARKLB_CLUSTER_KEEP_LOGS";

const LOCK_TIMEOUT: Duration = Duration::from_secs(900);

/// How to start a cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// The sandbox image (imported before kubelet starts).
    pub pause: ImageRef,
    /// More images to import.
    pub images: Vec<ImageRef>,
    /// Keep running after this process exits (`make cluster-up`): no parent-death signal, no
    /// owner in the record.
    pub detached: bool,
}

/// Start-up times.
#[derive(Clone, Debug, Default)]
pub struct StartTimes {
    pub etcd: Duration,
    pub apiserver: Duration,
    pub containerd: Duration,
    pub images: Duration,
    pub node_registered: Duration,
    pub node_ready: Duration,
    /// Everything (node Ready, default service account, kube-proxy healthy).
    pub total: Duration,
}

/// A running cluster. Dropping it stops it (see [`Cluster::stop`]).
pub struct Cluster {
    rec: Record,
    bins: Binaries,
    procs: Supervisor,
    times: StartTimes,
    stopped: bool,
    lock: Option<MachineLock>,
    keeper: Option<mpsc::Sender<()>>,
    admin_token: String,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("dir", &self.rec.dir)
            .field("api", &self.rec.api_url)
            .finish()
    }
}

/// Whether a node's Ready condition is True.
pub fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
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

impl Cluster {
    /// Starts a cluster (waiting for the machine lock; undoing a stale one first).
    pub fn start(opts: ClusterOptions) -> Result<Cluster> {
        Self::start_with_lock(opts, MachineLock::acquire(LOCK_TIMEOUT)?)
    }

    /// [`start`](Self::start) with the machine lock already held (a test that compares the
    /// host before and after keeps it across both).
    pub fn start_with_lock(opts: ClusterOptions, lock: MachineLock) -> Result<Cluster> {
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
        let starter = Starter {
            procs: Supervisor::new(&rec.dir.join("logs"))?,
            rec,
            bins: bins.clone(),
            detached: opts.detached,
            admin_token: admin_token.clone(),
            times: StartTimes::default(),
        };
        // The processes are started by a thread that lives as long as the cluster: their
        // parent-death signal fires when the thread that forked them ends.
        let (tx, rx) = mpsc::channel();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let detached = opts.detached;
        std::thread::Builder::new()
            .name("marklb-cluster".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                let mut starter = starter;
                let r = rt.block_on(starter.run(&opts));
                drop(rt);
                let ok = r.is_ok();
                let _ = tx.send((r, starter));
                if ok && !detached {
                    let _ = stop_rx.recv();
                }
            })?;
        let (result, starter) = rx.recv().context("the cluster thread died")?;
        let Starter {
            rec, procs, times, ..
        } = starter;
        let mut cluster = Cluster {
            rec,
            bins,
            procs,
            times,
            stopped: false,
            lock: Some(lock),
            keeper: Some(stop_tx),
            admin_token,
        };
        if let Err(e) = result {
            let problems = cluster.stop_inner();
            if !problems.is_empty() {
                return Err(e.context(format!("and stopping left: {problems:?}")));
            }
            return Err(e);
        }
        if detached {
            // Nobody waits for these processes: leave them to init.
            cluster.procs.detach_all();
            cluster.stopped = true;
            cluster.lock = None;
        }
        Ok(cluster)
    }

    /// The record of a new cluster: its directory and what the host looks like before it.
    fn initial_record(detached: bool) -> Result<Record> {
        let chains_before = ipt_all_chains();
        for (k, v) in &chains_before {
            if let Some(c) = v.iter().find(|c| kube_chain(c)) {
                bail!(
                    "iptables ({k}) already has the chain {c}: another Kubernetes node (kube-proxy, \
                     kubelet) runs on this machine; the test cluster cannot share it"
                );
            }
        }
        fs::create_dir_all(base_dir())?;
        let dir = tempfile::Builder::new()
            .prefix("c-")
            .tempdir_in(base_dir())?
            .keep();
        Ok(Record {
            containerd_socket: dir.join("containerd/containerd.sock"),
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
            netns_before: dir_entries(Path::new("/var/run/netns")),
            cgroups_before: cgroup_dirs(),
            chains_before,
            pins_before: dir_entries(&Path::new(BPFFS).join("marklb")),
            bridge_existed: link_exists(CNI_BRIDGE),
            ..Default::default()
        })
    }

    /// The record (what the cluster changed on the host).
    pub fn record(&self) -> &Record {
        &self.rec
    }

    /// The cluster's directory (logs in `logs/<process>.log`).
    pub fn dir(&self) -> &Path {
        &self.rec.dir
    }

    /// The administrator's kubeconfig.
    pub fn kubeconfig(&self) -> &Path {
        &self.rec.kubeconfig
    }

    pub fn api_url(&self) -> &str {
        &self.rec.api_url
    }

    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    pub fn times(&self) -> &StartTimes {
        &self.times
    }

    pub fn binaries(&self) -> &Binaries {
        &self.bins
    }

    /// A new client for the administrator (one per runtime: make one in each test).
    pub async fn client(&self) -> Result<Client> {
        client_from_kubeconfig(&self.rec.kubeconfig).await
    }

    fn kubectl_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bins.kubectl);
        c.arg("--kubeconfig").arg(&self.rec.kubeconfig).args(args);
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

    /// `ctr -n k8s.io` against the node's containerd.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        let mut c = Command::new(&self.bins.ctr);
        c.arg("--address")
            .arg(&self.rec.containerd_socket)
            .args(["-n", "k8s.io"])
            .args(args);
        stdout_of(&mut c, &format!("ctr {}", args.join(" ")))
    }

    /// Imports an image archive into the node's containerd.
    pub fn import_image(&self, image: &ImageRef) -> Result<()> {
        import_image(&self.bins.ctr, &self.rec.containerd_socket, image)
    }

    /// The last `n` lines of a process's log (`kubelet`, `containerd`, ...).
    pub fn log_tail(&self, name: &str, n: usize) -> String {
        crate::supervise::log_tail(&self.rec.dir.join("logs").join(format!("{name}.log")), n)
    }

    /// Resident memory (KiB) of the cluster's own processes and of containerd's shims.
    pub fn rss_kib(&self) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for p in &self.rec.procs {
            if proc_alive(p) {
                *m.entry(p.name.clone()).or_default() += rss_kib(p.pid).unwrap_or(0);
            }
        }
        let sock = self.rec.containerd_socket.display().to_string();
        for pid in all_pids() {
            if cmdline(pid).contains(&sock)
                && exe_name(pid).as_deref() == Some("containerd-shim-runc-v2")
            {
                *m.entry("containerd-shims".to_string()).or_default() += rss_kib(pid).unwrap_or(0);
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
    pub fn stop(mut self) -> Vec<String> {
        self.stop_inner()
    }

    /// [`stop`](Self::stop), handing back the machine lock.
    pub fn stop_keep_lock(mut self) -> (Vec<String>, Option<MachineLock>) {
        let lock = self.lock.take();
        (self.stop_inner(), lock)
    }

    fn stop_inner(&mut self) -> Vec<String> {
        if self.stopped {
            return Vec::new();
        }
        self.stopped = true;
        let problems = teardown(&self.rec);
        self.procs.reap_all();
        self.keeper = None;
        LIVE.lock()
            .map(|mut l| l.retain(|r| r.dir != self.rec.dir))
            .ok();
        self.rec.remove_file_if_mine();
        self.lock = None;
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
