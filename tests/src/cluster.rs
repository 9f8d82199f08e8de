//! A real one-node Kubernetes 1.20 cluster on this machine, for the end-to-end tests that need a
//! kubelet: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd (own
//! configuration, socket and state), kubelet and kube-proxy, all built or extracted by
//! `scripts/setup-k8s.sh` + `scripts/setup-cluster.sh` (see `/work/shared/REALNODE.md` for the
//! facts behind every setting).
//!
//! - [`Cluster::start`] starts everything in a directory under [`base_dir`], imports the images
//!   (OCI archives built by `scripts/image/build.sh`, see [`images`]) into containerd, waits
//!   until the node is Ready, the `default` service account exists and kube-proxy is healthy,
//!   and hands out a [`kube::Client`] ([`Cluster::client`]) and a kubeconfig
//!   ([`Cluster::kubeconfig`]; [`Cluster::kubectl`] runs the matching kubectl 1.20).
//! - [`shared`] / [`cluster_or_skip!`](crate::cluster_or_skip) start one cluster per test
//!   binary (the first test that asks starts it, the others wait for it), stopped when the
//!   process exits (also after failed tests) or is interrupted (SIGINT, SIGTERM, SIGHUP).
//! - [`Cluster::stop`] / `Drop` undo everything: the processes by PID (checked against their
//!   start time), the pods' processes (by their `kubepods` cgroups) and containerd's shims, the
//!   mounts, the cgroups, the `KUBE-*`/`CNI-*` iptables chains and the rules jumping to them, the
//!   CNI bridge, the node address, the host directories kubelet and containerd create
//!   (`/var/log/pods`, `/var/log/containers`, `/var/lib/kubelet`, `/var/lib/cni`,
//!   `/run/containerd`), the bpffs the cluster mounted and what the agents pinned in it, and the
//!   sysctls kubelet, kube-proxy and the bridge plugin change (saved at start). [`HostState`]
//!   captures all of it, so a test can prove nothing is left.
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

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    fs::{self, File, OpenOptions},
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Mutex, Once, OnceLock, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use kube::{
    Api, Client,
    api::ListParams,
    config::{KubeConfigOptions, Kubeconfig},
};
use serde::{Deserialize, Serialize};

use crate::kube_harness::{cache_dir, random_hex, report, test_name};
use crate::netns::{Topology, TopologyOptions, ip, run_command};

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
/// Overrides [`DEFAULT_BASE`].
pub const BASE_ENV: &str = "MARKLB_CLUSTER_DIR";
/// Where cluster directories, the lock and the record live.
pub const DEFAULT_BASE: &str = "/var/lib/marklb/clusters";
/// Set to 1 to turn a SKIP into a failure (CI on a machine that must run the cluster).
pub const REQUIRED_ENV: &str = "MARKLB_CLUSTER_REQUIRED";
/// Set to 1 to copy the cluster's logs to `/tmp/marklb-cluster-logs-<pid>` when it stops (done
/// anyway when a test of the process panicked).
pub const KEEP_LOGS_ENV: &str = "MARKLB_CLUSTER_KEEP_LOGS";

const START_TIMEOUT: Duration = Duration::from_secs(120);
const LOCK_TIMEOUT: Duration = Duration::from_secs(900);

/// Sysctls kubelet (`kernel.*`, `vm.*`), kube-proxy (`route_localnet`, conntrack) and the bridge
/// plugin (`ip_forward`) may change: saved at start, put back at stop.
pub const SYSCTLS: &[&str] = &[
    "/proc/sys/kernel/panic",
    "/proc/sys/kernel/panic_on_oops",
    "/proc/sys/kernel/keys/root_maxkeys",
    "/proc/sys/kernel/keys/root_maxbytes",
    "/proc/sys/vm/overcommit_memory",
    "/proc/sys/vm/panic_on_oom",
    "/proc/sys/net/ipv4/ip_forward",
    "/proc/sys/net/ipv4/conf/all/route_localnet",
    "/proc/sys/net/ipv4/conf/all/forwarding",
    "/proc/sys/net/ipv4/conf/default/forwarding",
    "/proc/sys/net/ipv4/conf/all/rp_filter",
    "/proc/sys/net/ipv4/conf/default/rp_filter",
    "/proc/sys/net/ipv6/conf/all/forwarding",
    "/proc/sys/net/ipv6/conf/default/forwarding",
    "/proc/sys/net/bridge/bridge-nf-call-iptables",
    "/proc/sys/net/bridge/bridge-nf-call-ip6tables",
    "/proc/sys/net/bridge/bridge-nf-call-arptables",
    "/proc/sys/net/netfilter/nf_conntrack_max",
    "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established",
    "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close_wait",
    "/sys/module/nf_conntrack/parameters/hashsize",
];

/// Host directories kubelet, containerd and the CNI plugins create outside the cluster's own
/// directory (hard-coded in these versions): removed at stop when they did not exist before,
/// else only what appeared in them.
pub const HOST_PATHS: &[&str] = &[
    "/var/log/pods",
    "/var/log/containers",
    "/var/lib/kubelet",
    "/var/lib/cni",
    "/run/containerd",
    "/opt/containerd",
    "/var/lib/containerd",
    "/etc/containerd",
    "/run/kubernetes",
    "/etc/kubernetes",
    "/etc/cni",
    "/opt/cni",
];

/// Executables that only the cluster runs (for [`HostState`]).
const CLUSTER_EXES: &[&str] = &[
    "kubelet",
    "kube-proxy",
    "kube-controller-manager",
    "kube-scheduler",
    "containerd",
    "containerd-shim-runc-v2",
    "marklb-pause",
];

// ---------------------------------------------------------------------------------------
// What the set-up left, and whether this machine can run a node
// ---------------------------------------------------------------------------------------

/// The binaries the cluster runs.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub etcd: PathBuf,
    pub apiserver: PathBuf,
    pub controller_manager: PathBuf,
    pub scheduler: PathBuf,
    pub kubelet: PathBuf,
    pub proxy: PathBuf,
    pub containerd: PathBuf,
    pub ctr: PathBuf,
    pub runc: PathBuf,
    pub kubectl: PathBuf,
    /// containerd, its shim, runc, ctr, kubectl.
    pub node_bin: PathBuf,
    /// The CNI plugins.
    pub cni_bin: PathBuf,
}

impl Binaries {
    fn from_cache(cache: &Path) -> Self {
        let kube = cache.join("kube-1.20/bin");
        let node = cache.join("node/bin");
        Self {
            etcd: cache.join("etcd/bin/etcd"),
            apiserver: kube.join("kube-apiserver"),
            controller_manager: kube.join("kube-controller-manager"),
            scheduler: kube.join("kube-scheduler"),
            kubelet: kube.join("kubelet"),
            proxy: kube.join("kube-proxy"),
            containerd: node.join("containerd"),
            ctr: node.join("ctr"),
            runc: node.join("runc"),
            kubectl: node.join("kubectl"),
            cni_bin: cache.join("node/cni"),
            node_bin: node,
        }
    }

    fn all(&self) -> Vec<PathBuf> {
        let mut v = vec![
            self.etcd.clone(),
            self.apiserver.clone(),
            self.controller_manager.clone(),
            self.scheduler.clone(),
            self.kubelet.clone(),
            self.proxy.clone(),
            self.containerd.clone(),
            self.node_bin.join("containerd-shim-runc-v2"),
            self.ctr.clone(),
            self.runc.clone(),
            self.kubectl.clone(),
        ];
        for plugin in ["bridge", "host-local", "portmap", "loopback"] {
            v.push(self.cni_bin.join(plugin));
        }
        v
    }
}

/// Whether the cluster can run here.
#[derive(Clone, Debug)]
pub enum Availability {
    Available(Box<Binaries>),
    /// Why not (a set-up part recorded as unavailable, or the machine lacks something).
    Unavailable(String),
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP_SUPER_MAGIC: i64 = 0x27e0eb;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

fn statfs_magic(path: &Path) -> Option<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs fills the zeroed struct; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0).then_some(st.f_type as i64)
}

/// What the machine lacks to run a kubelet 1.20 node, if anything.
pub fn machine_problem() -> Option<String> {
    let cg = Path::new("/sys/fs/cgroup");
    if statfs_magic(cg) == Some(CGROUP2_SUPER_MAGIC) {
        return Some(
            "this host is cgroup v2-only (/sys/fs/cgroup is cgroup2); the one-node cluster \
             (kubelet 1.20, cgroupfs driver) is set up and checked on cgroup v1 (hybrid) hosts only"
                .into(),
        );
    }
    for ctrl in [
        "cpu", "cpuacct", "cpuset", "memory", "pids", "devices", "freezer",
    ] {
        if statfs_magic(&cg.join(ctrl)) != Some(CGROUP_SUPER_MAGIC) {
            return Some(format!(
                "the cgroup v1 controller {ctrl} is not mounted at /sys/fs/cgroup/{ctrl} (kubelet 1.20 with the cgroupfs driver needs it)"
            ));
        }
    }
    let filesystems = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    for (fs_name, why) in [
        ("overlay", "containerd's overlayfs snapshotter"),
        ("bpf", "the agent's pinned maps"),
    ] {
        if !filesystems
            .lines()
            .any(|l| l.split_whitespace().last() == Some(fs_name))
        {
            return Some(format!(
                "the kernel has no {fs_name} filesystem (needed for {why})"
            ));
        }
    }
    if !Path::new("/dev/kmsg").exists() {
        return Some("/dev/kmsg does not exist (kubelet 1.20's OOM watcher needs it)".into());
    }
    for tool in ["iptables", "iptables-save", "iptables-restore", "conntrack"] {
        if which(tool).is_none() {
            return Some(format!(
                "{tool} is not installed (kubelet and kube-proxy run it; `bash scripts/setup-cluster.sh` installs it)"
            ));
        }
    }
    None
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Whether the binaries exist, or why this machine cannot run the cluster. An error means the
/// set-up never ran (or failed), or the test is not root: the tests must fail then, not skip.
pub fn availability() -> Result<Availability> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the one-node cluster needs root (kubelet, containerd, iptables, XDP)");
    }
    let cache = cache_dir();
    for part in ["etcd", "kube-1.20", "node", "host-tools"] {
        let mark = cache.join(format!("UNAVAILABLE-{part}"));
        if let Ok(reason) = fs::read_to_string(&mark) {
            return Ok(Availability::Unavailable(format!(
                "{} ({})",
                reason.trim(),
                mark.display()
            )));
        }
    }
    let bins = Binaries::from_cache(&cache);
    for b in bins.all() {
        if !b.is_file() {
            bail!(
                "{} is missing and no UNAVAILABLE-* reason was recorded in {}: run `make setup` \
                 (scripts/setup-k8s.sh and scripts/setup-cluster.sh) first",
                b.display(),
                cache.display()
            );
        }
    }
    if let Some(problem) = machine_problem() {
        return Ok(Availability::Unavailable(problem));
    }
    Ok(Availability::Available(Box::new(bins)))
}

/// Where cluster directories, the lock and the record live.
pub fn base_dir() -> PathBuf {
    std::env::var_os(BASE_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BASE))
}

fn record_path() -> PathBuf {
    base_dir().join("current.json")
}

// ---------------------------------------------------------------------------------------
// One cluster per machine
// ---------------------------------------------------------------------------------------

/// The machine-wide cluster lock (`<base>/lock`, flock). Held by a running cluster's process.
#[derive(Debug)]
pub struct MachineLock {
    _file: File,
}

impl MachineLock {
    /// Waits up to `timeout` for the lock.
    pub fn acquire(timeout: Duration) -> Result<Self> {
        fs::create_dir_all(base_dir())?;
        let path = base_dir().join("lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let deadline = Instant::now() + timeout;
        let mut told = false;
        loop {
            // SAFETY: flock on an open file descriptor.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(MachineLock { _file: f });
            }
            if !told {
                report(&format!(
                    "waiting for another marklb cluster on this machine to stop ({})",
                    path.display()
                ));
                told = true;
            }
            if Instant::now() > deadline {
                bail!(
                    "another marklb cluster held {} for {timeout:?}",
                    path.display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

// ---------------------------------------------------------------------------------------
// The record: everything the cluster changed, enough to undo it without the process
// ---------------------------------------------------------------------------------------

/// A process of the cluster.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcRecord {
    pub name: String,
    pub pid: u32,
    /// Start time (clock ticks since boot, /proc/<pid>/stat field 22): a PID reused by another
    /// process is never signalled.
    pub start: u64,
}

/// Everything a cluster changed on the host, written as it happens.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Record {
    /// The cluster's directory.
    pub dir: PathBuf,
    /// The process that owns the cluster (None: detached, `make cluster-up`).
    pub owner: Option<ProcRecord>,
    pub procs: Vec<ProcRecord>,
    pub containerd_socket: PathBuf,
    pub kubeconfig: PathBuf,
    pub api_url: String,
    pub node_ip_added: bool,
    pub bpffs_mounted: bool,
    /// Saved sysctl values (path -> value).
    pub sysctls: BTreeMap<String, String>,
    /// Host directories: None = absent before, else their entries before.
    pub host_paths: BTreeMap<String, Option<Vec<String>>>,
    /// Entries of /var/run/netns before (CNI puts pod namespaces there), None: no directory.
    pub netns_before: Option<Vec<String>>,
    /// Top-level entries of each cgroup hierarchy before.
    pub cgroups_before: BTreeMap<String, Vec<String>>,
    /// iptables chains before: "ipv4 nat" -> chains.
    pub chains_before: BTreeMap<String, Vec<String>>,
    /// Entries of <bpffs>/marklb before (None: absent).
    pub pins_before: Option<Vec<String>>,
    pub bridge_existed: bool,
}

impl Record {
    /// Writes the record (and updates this process's copy the exit handlers undo).
    fn save(&self) -> Result<()> {
        let path = record_path();
        let tmp = path.with_extension("json.tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        fs::rename(&tmp, &path)?;
        if let Ok(mut live) = LIVE.lock() {
            for r in live.iter_mut().filter(|r| r.dir == self.dir) {
                *r = self.clone();
            }
        }
        Ok(())
    }

    /// The record left on this machine, if any.
    pub fn load() -> Result<Option<Record>> {
        match fs::read(record_path()) {
            Ok(b) => {
                Ok(Some(serde_json::from_slice(&b).with_context(|| {
                    format!("parsing {}", record_path().display())
                })?))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether the owning process is gone (a detached cluster has no owner: never).
    pub fn owner_gone(&self) -> bool {
        match &self.owner {
            Some(o) => !proc_alive(o),
            None => false,
        }
    }
}

/// /proc/<pid>/stat: (state, start time).
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields follow the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// A record of process `pid` as it runs now.
pub fn proc_record(name: &str, pid: u32) -> Option<ProcRecord> {
    proc_stat(pid).map(|(_, start)| ProcRecord {
        name: name.to_string(),
        pid,
        start,
    })
}

/// Whether the recorded process still runs (same PID and start time, not a zombie).
pub fn proc_alive(p: &ProcRecord) -> bool {
    matches!(proc_stat(p.pid), Some((state, start)) if start == p.start && state != 'Z' && state != 'X')
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a PID we checked.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

/// SIGTERM, then SIGKILL after `grace`; waits until it is gone.
fn stop_proc(p: &ProcRecord, grace: Duration) {
    if !proc_alive(p) {
        return;
    }
    signal(p.pid, libc::SIGTERM);
    let deadline = Instant::now() + grace;
    while proc_alive(p) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if proc_alive(p) {
        signal(p.pid, libc::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(5);
        while proc_alive(p) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn all_pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn cmdline(pid: u32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

fn exe_name(pid: u32) -> Option<String> {
    fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

// ---------------------------------------------------------------------------------------
// Host state: snapshots for the record and for leftover checks
// ---------------------------------------------------------------------------------------

fn read_sysctls() -> BTreeMap<String, String> {
    SYSCTLS
        .iter()
        .filter_map(|p| {
            Some((
                p.to_string(),
                fs::read_to_string(p).ok()?.trim().to_string(),
            ))
        })
        .collect()
}

fn dir_entries(path: &Path) -> Option<Vec<String>> {
    let mut v: Vec<String> = fs::read_dir(path)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    Some(v)
}

/// Every path below `path` (depth-limited), for leftover comparisons.
fn tree(path: &Path, depth: usize, out: &mut Vec<String>) {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return;
    };
    out.push(path.display().to_string());
    if depth == 0 || !meta.is_dir() {
        return;
    }
    for e in dir_entries(path).unwrap_or_default() {
        tree(&path.join(e), depth - 1, out);
    }
}

/// Mount points (from /proc/self/mountinfo, unescaped).
pub fn mount_points() -> Vec<PathBuf> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mount(m)))
        .collect()
}

fn unescape_mount(s: &str) -> String {
    let mut out = String::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v as char);
            i += 4;
            continue;
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

fn is_bpffs(path: &Path) -> bool {
    statfs_magic(path) == Some(BPF_FS_MAGIC)
}

/// Cgroup hierarchies (v1 controllers and the v2 unified one) under /sys/fs/cgroup.
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = dir_entries(Path::new("/sys/fs/cgroup"))
        .unwrap_or_default()
        .into_iter()
        .map(|e| Path::new("/sys/fs/cgroup").join(e))
        .filter(|p| {
            matches!(
                statfs_magic(p),
                Some(CGROUP_SUPER_MAGIC | CGROUP2_SUPER_MAGIC)
            )
        })
        .collect();
    // Symlinks like cpu,cpuacct -> cpu would name a hierarchy twice.
    v.retain(|p| {
        fs::symlink_metadata(p)
            .map(|m| !m.file_type().is_symlink())
            .unwrap_or(false)
    });
    v
}

fn cgroup_dirs() -> BTreeMap<String, Vec<String>> {
    cgroup_hierarchies()
        .into_iter()
        .map(|h| {
            let entries = fs::read_dir(&h)
                .map(|d| {
                    let mut v: Vec<String> = d
                        .flatten()
                        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect();
                    v.sort();
                    v
                })
                .unwrap_or_default();
            (h.display().to_string(), entries)
        })
        .collect()
}

const IPT_TABLES: &[&str] = &["filter", "nat", "mangle", "raw"];

fn ipt_save(v6: bool, table: &str) -> String {
    let tool = if v6 {
        "ip6tables-save"
    } else {
        "iptables-save"
    };
    Command::new(tool)
        .args(["-t", table])
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Chains declared in an iptables-save text.
fn ipt_chains(save: &str) -> Vec<String> {
    let mut v: Vec<String> = save
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

fn ipt_all_chains() -> BTreeMap<String, Vec<String>> {
    let mut m = BTreeMap::new();
    for v6 in [false, true] {
        for t in IPT_TABLES {
            m.insert(
                format!("{} {t}", if v6 { "ipv6" } else { "ipv4" }),
                ipt_chains(&ipt_save(v6, t)),
            );
        }
    }
    m
}

fn kube_chain(name: &str) -> bool {
    name.starts_with("KUBE-") || name.starts_with("CNI-")
}

/// The `iptables-restore --noflush` input that removes the chains of `save` named `KUBE-*` or
/// `CNI-*` that are not in `before`, and every rule elsewhere that jumps to them. None: nothing
/// to remove.
pub fn ipt_cleanup_script(table: &str, save: &str, before: &[String]) -> Option<String> {
    let ours: BTreeSet<String> = ipt_chains(save)
        .into_iter()
        .filter(|c| kube_chain(c) && !before.contains(c))
        .collect();
    if ours.is_empty() {
        return None;
    }
    let mut script = format!("*{table}\n");
    for line in save.lines() {
        let Some(rule) = line.strip_prefix("-A ") else {
            continue;
        };
        let chain = rule.split_whitespace().next().unwrap_or("");
        if ours.contains(chain) {
            continue; // flushed below
        }
        let words: Vec<&str> = rule.split_whitespace().collect();
        let jumps = words
            .windows(2)
            .any(|w| (w[0] == "-j" || w[0] == "-g") && ours.contains(w[1]));
        if jumps {
            script.push_str(&format!("-D {rule}\n"));
        }
    }
    for c in &ours {
        script.push_str(&format!("-F {c}\n"));
    }
    for c in &ours {
        script.push_str(&format!("-X {c}\n"));
    }
    script.push_str("COMMIT\n");
    Some(script)
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// What the cluster may change on the host, captured for comparison: a test takes one before
/// the cluster starts and one after it stopped, and expects them equal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostState {
    /// iptables-save per family and table, without counters and comments.
    pub iptables: BTreeMap<String, Vec<String>>,
    pub sysctls: BTreeMap<String, String>,
    /// Everything below the host directories (and CNI's pod namespaces, the pins).
    pub paths: Vec<String>,
    /// Mount points the cluster could have made.
    pub mounts: Vec<String>,
    /// Directories at the top of every cgroup hierarchy.
    pub cgroups: BTreeMap<String, Vec<String>>,
    /// Processes of cluster executables or with a cluster directory on their command line.
    pub processes: Vec<String>,
    /// Network interfaces of the host the cluster or its tests could make (CNI bridge and
    /// pod veths, the tests' `mlbk*` veths).
    pub links: Vec<String>,
    /// Addresses on lo.
    pub lo_addrs: Vec<String>,
    pub bpffs_mounted: bool,
}

impl HostState {
    pub fn capture() -> Self {
        let mut iptables = BTreeMap::new();
        for v6 in [false, true] {
            for t in IPT_TABLES {
                let lines = ipt_save(v6, t)
                    .lines()
                    .filter(|l| !l.starts_with('#'))
                    .map(|l| match l.find(" [") {
                        Some(i) if l.starts_with(':') => l[..i].to_string(),
                        _ => l.to_string(),
                    })
                    .collect();
                iptables.insert(format!("{} {t}", if v6 { "ipv6" } else { "ipv4" }), lines);
            }
        }
        let mut paths = Vec::new();
        for p in HOST_PATHS {
            tree(Path::new(p), 4, &mut paths);
        }
        for e in dir_entries(Path::new("/var/run/netns")).unwrap_or_default() {
            if e.starts_with("cni-") {
                paths.push(format!("/var/run/netns/{e}"));
            }
        }
        tree(&Path::new(BPFFS).join("marklb"), 2, &mut paths);
        let base = base_dir().display().to_string();
        let watched = |m: &str| {
            m.starts_with(&base)
                || m.starts_with("/run/containerd")
                || m.starts_with("/var/lib/kubelet")
                || m.starts_with("/var/run/netns/cni-")
                || m.starts_with("/run/netns/cni-")
                || m.starts_with(BPFFS)
        };
        let mut mounts: Vec<String> = mount_points()
            .into_iter()
            .map(|m| m.display().to_string())
            .filter(|m| watched(m))
            .collect();
        mounts.sort();
        let mut processes: Vec<String> = all_pids()
            .into_iter()
            .filter(|pid| *pid != std::process::id())
            .filter_map(|pid| {
                let exe = exe_name(pid)?;
                let cmd = cmdline(pid);
                (CLUSTER_EXES.contains(&exe.as_str()) || cmd.contains(&base))
                    .then(|| format!("{pid} {exe}: {}", cmd.trim()))
            })
            .collect();
        processes.sort();
        let links = dir_entries(Path::new("/sys/class/net"))
            .unwrap_or_default()
            .into_iter()
            .filter(|l| {
                l == CNI_BRIDGE
                    || l.starts_with("veth")
                    || l.starts_with("mlbk")
                    || l.starts_with("cni")
            })
            .collect();
        let lo_addrs = ip(None, &["-o", "addr", "show", "dev", "lo"])
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.iter()
                    .position(|x| *x == "inet" || *x == "inet6")
                    .and_then(|i| w.get(i + 1))
                    .map(|s| s.to_string())
            })
            .collect();
        HostState {
            iptables,
            sysctls: read_sysctls(),
            paths,
            mounts,
            cgroups: cgroup_dirs(),
            processes,
            links,
            lo_addrs,
            bpffs_mounted: is_bpffs(Path::new(BPFFS)),
        }
    }

    /// What differs from `before`, one line per difference (empty: the same).
    pub fn diff(&self, before: &HostState) -> Vec<String> {
        let mut d = Vec::new();
        fn sets<T: Ord + Clone + fmt::Debug>(what: &str, a: &[T], b: &[T], d: &mut Vec<String>) {
            let (a, b): (BTreeSet<_>, BTreeSet<_>) =
                (a.iter().cloned().collect(), b.iter().cloned().collect());
            for x in b.difference(&a) {
                d.push(format!("{what}: new {x:?}"));
            }
            for x in a.difference(&b) {
                d.push(format!("{what}: gone {x:?}"));
            }
        }
        for (k, v) in &self.iptables {
            sets(
                &format!("iptables {k}"),
                before.iptables.get(k).map(Vec::as_slice).unwrap_or(&[]),
                v,
                &mut d,
            );
        }
        for (k, v) in &self.sysctls {
            if before.sysctls.get(k) != Some(v) {
                d.push(format!(
                    "sysctl {k}: {:?} before, {v:?} now",
                    before.sysctls.get(k)
                ));
            }
        }
        sets("path", &before.paths, &self.paths, &mut d);
        sets("mount", &before.mounts, &self.mounts, &mut d);
        for (k, v) in &self.cgroups {
            sets(
                &format!("cgroup {k}"),
                before.cgroups.get(k).map(Vec::as_slice).unwrap_or(&[]),
                v,
                &mut d,
            );
        }
        sets("process", &before.processes, &self.processes, &mut d);
        sets("link", &before.links, &self.links, &mut d);
        sets("address on lo", &before.lo_addrs, &self.lo_addrs, &mut d);
        if self.bpffs_mounted != before.bpffs_mounted {
            d.push(format!(
                "bpffs at {BPFFS}: mounted {} before, {} now",
                before.bpffs_mounted, self.bpffs_mounted
            ));
        }
        d
    }
}

// ---------------------------------------------------------------------------------------
// Teardown: undo a record
// ---------------------------------------------------------------------------------------

fn unmount_under(prefixes: &[PathBuf], problems: &mut Vec<String>) {
    for _round in 0..5 {
        let mut mine: Vec<PathBuf> = mount_points()
            .into_iter()
            .filter(|m| prefixes.iter().any(|p| m.starts_with(p)))
            .collect();
        if mine.is_empty() {
            return;
        }
        // Deepest first; a path mounted several times is unmounted as often.
        mine.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        for m in &mine {
            let Ok(c) = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()) else {
                continue;
            };
            // SAFETY: umount2 with a NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
    let left: Vec<PathBuf> = mount_points()
        .into_iter()
        .filter(|m| prefixes.iter().any(|p| m.starts_with(p)))
        .collect();
    if !left.is_empty() {
        problems.push(format!("mounts left: {left:?}"));
    }
}

/// Removes `path` recursively unless something is mounted below it.
fn remove_tree(path: &Path, problems: &mut Vec<String>) {
    if fs::symlink_metadata(path).is_err() {
        return;
    }
    if let Some(m) = mount_points()
        .into_iter()
        .find(|m| m.starts_with(path) && m != Path::new("/"))
    {
        problems.push(format!(
            "not removing {}: {} is mounted below it",
            path.display(),
            m.display()
        ));
        return;
    }
    let r = if fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    if let Err(e) = r {
        problems.push(format!("removing {}: {e}", path.display()));
    }
}

/// Kills every process in `cg` and below, then removes the cgroups, deepest first.
fn remove_cgroup_tree(cg: &Path, problems: &mut Vec<String>) {
    let mut dirs = Vec::new();
    tree(cg, 16, &mut dirs);
    let mut dirs: Vec<PathBuf> = dirs
        .into_iter()
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut any = false;
        for d in &dirs {
            for pid in fs::read_to_string(d.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse::<u32>().ok())
            {
                any = true;
                signal(pid, libc::SIGKILL);
            }
        }
        if !any || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for d in &dirs {
        let mut tries = 0;
        while let Err(e) = fs::remove_dir(d) {
            if e.kind() == io::ErrorKind::NotFound {
                break;
            }
            tries += 1;
            if tries > 100 {
                problems.push(format!("rmdir {}: {e}", d.display()));
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Undoes everything `rec` says a cluster changed. Returns what could not be undone.
pub fn teardown(rec: &Record) -> Vec<String> {
    let mut problems = Vec::new();
    let by_name = |n: &'static str| rec.procs.iter().filter(move |p| p.name == n);
    // 1. The node agents first (so nothing restarts containers), then the pods' processes.
    for name in [
        "kubelet",
        "kube-proxy",
        "kube-scheduler",
        "kube-controller-manager",
    ] {
        for p in by_name(name) {
            stop_proc(p, Duration::from_secs(5));
        }
    }
    let cgroups_now = cgroup_dirs();
    for (h, entries) in &cgroups_now {
        let before = rec.cgroups_before.get(h).cloned().unwrap_or_default();
        for e in entries {
            if e.starts_with("kubepods") && !before.contains(e) {
                remove_cgroup_tree(&Path::new(h).join(e), &mut problems);
            }
        }
    }
    // 2. containerd, then its shims (found by containerd's address on their command line).
    for p in by_name("containerd") {
        stop_proc(p, Duration::from_secs(5));
    }
    let sock = rec.containerd_socket.display().to_string();
    let dir = rec.dir.display().to_string();
    let me = std::process::id();
    for round in 0..50 {
        let strays: Vec<u32> = all_pids()
            .into_iter()
            .filter(|pid| *pid != me)
            .filter(|pid| {
                let c = cmdline(*pid);
                (!sock.is_empty() && c.contains(&sock)) || (!dir.is_empty() && c.contains(&dir))
            })
            .filter(|pid| matches!(proc_stat(*pid), Some((s, _)) if s != 'Z'))
            .filter(|pid| !rec.procs.iter().any(|p| p.pid == *pid && p.name == "etcd"))
            .filter(|pid| {
                !rec.procs
                    .iter()
                    .any(|p| p.pid == *pid && p.name == "kube-apiserver")
            })
            .collect();
        if strays.is_empty() {
            break;
        }
        for pid in &strays {
            signal(*pid, libc::SIGKILL);
        }
        if round == 49 {
            problems.push(format!("processes left: {strays:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // 3. The control plane.
    for name in ["kube-apiserver", "etcd"] {
        for p in by_name(name) {
            stop_proc(p, Duration::from_secs(5));
        }
    }
    for p in &rec.procs {
        if proc_alive(p) {
            problems.push(format!("{} (pid {}) still runs", p.name, p.pid));
        }
    }
    // 4. Mounts: the cluster directory (kubelet's root dir, pod volumes, containerd's rootfs
    //    and shm mounts), containerd's and kubelet's host directories, CNI's pod namespaces.
    let mut prefixes: Vec<PathBuf> = vec![
        PathBuf::from("/run/containerd"),
        PathBuf::from("/var/lib/kubelet"),
    ];
    if !rec.dir.as_os_str().is_empty() {
        prefixes.push(rec.dir.clone());
    }
    let new_netns: Vec<String> = dir_entries(Path::new("/var/run/netns"))
        .unwrap_or_default()
        .into_iter()
        .filter(|e| {
            e.starts_with("cni-") && !rec.netns_before.as_ref().is_some_and(|b| b.contains(e))
        })
        .collect();
    for e in &new_netns {
        prefixes.push(Path::new("/var/run/netns").join(e));
        prefixes.push(Path::new("/run/netns").join(e));
    }
    unmount_under(&prefixes, &mut problems);
    for e in &new_netns {
        remove_tree(&Path::new("/var/run/netns").join(e), &mut problems);
    }
    if rec.netns_before.is_none() {
        // Made for the pods' namespaces; removed only when empty (others may use it now).
        let _ = fs::remove_dir("/var/run/netns");
    }
    // 5. iptables.
    for v6 in [false, true] {
        let fam = if v6 { "ipv6" } else { "ipv4" };
        for t in IPT_TABLES {
            let before = rec
                .chains_before
                .get(&format!("{fam} {t}"))
                .cloned()
                .unwrap_or_default();
            if let Some(script) = ipt_cleanup_script(t, &ipt_save(v6, t), &before) {
                let tool = if v6 {
                    "ip6tables-restore"
                } else {
                    "iptables-restore"
                };
                let mut cmd = Command::new(tool);
                cmd.args(["--noflush", "--wait"]);
                if let Err(e) = run_command(&mut cmd, Some(&script), Duration::from_secs(30)) {
                    problems.push(format!("{tool}: {e}\n{script}"));
                }
            }
        }
    }
    // 6. The CNI bridge and the node address.
    if !rec.bridge_existed
        && link_exists(CNI_BRIDGE)
        && let Err(e) = ip(None, &["link", "del", CNI_BRIDGE])
    {
        problems.push(format!("deleting {CNI_BRIDGE}: {e}"));
    }
    if rec.node_ip_added {
        let _ = ip(
            None,
            &["addr", "del", &format!("{NODE_IP}/32"), "dev", "lo"],
        );
    }
    // 7. Sysctls.
    for (path, value) in &rec.sysctls {
        if fs::read_to_string(path).map(|v| v.trim().to_string()).ok() != Some(value.clone())
            && let Err(e) = fs::write(path, value)
        {
            problems.push(format!("restoring {path}={value}: {e}"));
        }
    }
    // 8. Host directories.
    for (path, before) in &rec.host_paths {
        let p = Path::new(path);
        match before {
            None => remove_tree(p, &mut problems),
            Some(entries) => {
                for e in dir_entries(p).unwrap_or_default() {
                    if !entries.contains(&e) {
                        remove_tree(&p.join(&e), &mut problems);
                    }
                }
            }
        }
    }
    // 9. What the agents pinned, and the bpffs if the cluster mounted it.
    let pins = Path::new(BPFFS).join("marklb");
    if is_bpffs(Path::new(BPFFS)) {
        match &rec.pins_before {
            None => remove_tree(&pins, &mut problems),
            Some(before) => {
                for e in dir_entries(&pins).unwrap_or_default() {
                    if !before.contains(&e) {
                        remove_tree(&pins.join(&e), &mut problems);
                    }
                }
            }
        }
    }
    if rec.bpffs_mounted {
        unmount_under(&[PathBuf::from(BPFFS)], &mut problems);
    }
    // 10. Leftover cgroups (a pod that started while we stopped), once more.
    for (h, entries) in cgroup_dirs() {
        let before = rec.cgroups_before.get(&h).cloned().unwrap_or_default();
        for e in entries {
            if e.starts_with("kubepods") && !before.contains(&e) {
                remove_cgroup_tree(&Path::new(&h).join(&e), &mut problems);
            }
        }
    }
    // 11. The directory (logs copied out first when asked).
    if !rec.dir.as_os_str().is_empty() {
        if std::env::var(KEEP_LOGS_ENV).as_deref() == Ok("1")
            || TEST_PANICKED.load(std::sync::atomic::Ordering::SeqCst)
        {
            let to = PathBuf::from(format!("/tmp/marklb-cluster-logs-{}", std::process::id()));
            let _ = fs::create_dir_all(&to);
            for e in dir_entries(&rec.dir.join("logs")).unwrap_or_default() {
                let _ = fs::copy(rec.dir.join("logs").join(&e), to.join(&e));
            }
            report(&format!("cluster logs kept in {}", to.display()));
        }
        remove_tree(&rec.dir, &mut problems);
    }
    problems
}

/// Undoes a cluster left by a process that is gone (killed), if there is one. Returns the
/// record that was undone and what could not be undone.
pub fn recover_stale() -> Result<Option<(Record, Vec<String>)>> {
    let Some(rec) = Record::load()? else {
        return Ok(None);
    };
    if !rec.owner_gone() {
        return Ok(None);
    }
    report(&format!(
        "undoing a marklb cluster left by a process that is gone ({})",
        rec.dir.display()
    ));
    let problems = teardown(&rec);
    let _ = fs::remove_file(record_path());
    Ok(Some((rec, problems)))
}

// ---------------------------------------------------------------------------------------
// Starting
// ---------------------------------------------------------------------------------------

/// Images to import into the node's containerd.
#[derive(Clone, Debug)]
pub struct ImageRef {
    /// Full reference, e.g. `docker.io/marklb/marklb-agent:0.1.0`.
    pub name: String,
    /// The OCI archive.
    pub archive: PathBuf,
}

/// The project's images, built by `scripts/image/build.sh`.
#[derive(Clone, Debug)]
pub struct Images {
    pub agent: ImageRef,
    pub pause: ImageRef,
    /// How long the build (usually a no-op) took.
    pub build_time: Duration,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Builds (or finds up to date) the images with `scripts/image/build.sh`: release binaries for
/// x86_64-unknown-linux-musl packed as OCI archives. Cached per process.
pub fn images() -> Result<Images> {
    static IMAGES: OnceLock<std::result::Result<Images, String>> = OnceLock::new();
    IMAGES
        .get_or_init(|| build_images().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn build_images() -> Result<Images> {
    let t0 = Instant::now();
    let script = repo_root().join("scripts/image/build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(30).collect();
        bail!(
            "{} failed ({}):\n{}",
            script.display(),
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let mut found = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        if let ["IMAGE", name, archive] = w[..] {
            let short = name
                .rsplit('/')
                .next()
                .and_then(|n| n.split(':').next())
                .unwrap_or("")
                .to_string();
            found.insert(
                short,
                ImageRef {
                    name: name.to_string(),
                    archive: PathBuf::from(archive),
                },
            );
        }
    }
    let take = |n: &str| {
        found
            .get(n)
            .cloned()
            .ok_or_else(|| anyhow!("{} did not report the image {n}", script.display()))
    };
    Ok(Images {
        agent: take("marklb-agent")?,
        pause: take("marklb-pause")?,
        build_time: t0.elapsed(),
    })
}

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

struct Ports {
    etcd: u16,
    etcd_peer: u16,
    api: u16,
    kcm: u16,
    scheduler: u16,
    kubelet: u16,
    kubelet_healthz: u16,
    proxy_healthz: u16,
    proxy_metrics: u16,
}

/// A running cluster. Dropping it stops it (see [`Cluster::stop`]).
pub struct Cluster {
    rec: Record,
    bins: Binaries,
    children: Vec<(String, Child)>,
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

struct Starter {
    rec: Record,
    bins: Binaries,
    children: Vec<(String, Child)>,
    detached: bool,
    admin_token: String,
    times: StartTimes,
}

fn free_port_on(ip: Ipv4Addr) -> Result<u16> {
    Ok(TcpListener::bind((ip, 0))?.local_addr()?.port())
}

fn openssl(args: &[&str], cwd: &Path) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .context("running openssl")?;
    if !out.status.success() {
        bail!(
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    buf.split_whitespace().nth(1)?.parse().ok()
}

impl Starter {
    fn dir(&self) -> &Path {
        &self.rec.dir
    }

    fn spawn(&mut self, name: &str, cmd: &mut Command) -> Result<()> {
        let log = File::create(self.dir().join("logs").join(format!("{name}.log")))?;
        let detached = self.detached;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .current_dir(self.dir());
        // SAFETY: setsid and prctl are async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Own session: a Ctrl-C on the terminal reaches only the test, which stops
                // the cluster in order.
                libc::setsid();
                if !detached && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let pid = child.id();
        let rec = proc_record(name, pid).unwrap_or(ProcRecord {
            name: name.to_string(),
            pid,
            start: 0,
        });
        self.rec.procs.push(rec);
        self.rec.save()?;
        self.children.push((name.to_string(), child));
        Ok(())
    }

    fn log_tail(&self, name: &str, n: usize) -> String {
        log_tail(&self.rec.dir, name, n)
    }

    fn check_alive(&mut self) -> Result<()> {
        for (name, child) in &mut self.children {
            if let Some(st) = child.try_wait()? {
                let name = name.clone();
                bail!(
                    "{name} exited ({st}) while the cluster started; log tail:\n{}",
                    self.log_tail(&name, 30)
                );
            }
        }
        Ok(())
    }

    async fn wait<F, Fut>(&mut self, what: &str, mut ready: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<bool>>,
    {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last_err = None;
        loop {
            self.check_alive()?;
            match ready().await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => last_err = Some(format!("{e:#}")),
            }
            if Instant::now() > deadline {
                let tails: Vec<String> = self
                    .children
                    .iter()
                    .map(|(n, _)| format!("--- {n}:\n{}", log_tail(&self.rec.dir, n, 12)))
                    .collect();
                bail!(
                    "timed out after {START_TIMEOUT:?} waiting for {what} (last error: {}); logs:\n{}",
                    last_err.unwrap_or_else(|| "none".into()),
                    tails.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn kubeconfig_for(&self, user: &str, token: &str, api: &str) -> Result<PathBuf> {
        let path = self.dir().join(format!("{user}.kubeconfig"));
        fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: marklb\n  cluster:\n    server: {api}\n    certificate-authority: {ca}\nusers:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: marklb\n  context:\n    cluster: marklb\n    user: {user}\n    namespace: default\ncurrent-context: marklb\n",
                ca = self.dir().join("pki/ca.crt").display(),
            ),
        )?;
        Ok(path)
    }

    fn pki(&self) -> Result<()> {
        let pki = self.dir().join("pki");
        fs::create_dir_all(&pki)?;
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "30",
                "-subj",
                "/CN=marklb-test-cluster-ca",
            ],
            &pki,
        )?;
        openssl(
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "apiserver.key",
                "-out",
                "apiserver.csr",
                "-subj",
                "/CN=kube-apiserver",
            ],
            &pki,
        )?;
        fs::write(
            pki.join("apiserver.ext"),
            format!(
                "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,IP:{NODE_IP},DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature\n"
            ),
        )?;
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                "apiserver.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "apiserver.crt",
                "-days",
                "30",
                "-extfile",
                "apiserver.ext",
            ],
            &pki,
        )?;
        openssl(
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                "sa.key",
            ],
            &pki,
        )?;
        openssl(&["ec", "-in", "sa.key", "-pubout", "-out", "sa.pub"], &pki)?;
        Ok(())
    }

    fn containerd_config(&self, pause: &str) -> String {
        let d = self.dir();
        format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/containerd/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  max_container_log_line_size = 16384
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        Root = "{d}/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{d}/cni/net.d"
"#,
            root = d.join("containerd/root").display(),
            state = d.join("containerd/state").display(),
            sock = self.rec.containerd_socket.display(),
            d = d.display(),
            runc = self.bins.runc.display(),
            cni_bin = self.bins.cni_bin.display(),
        )
    }

    fn cni_config(&self) -> String {
        format!(
            r#"{{
  "cniVersion": "0.4.0",
  "name": "marklb-test",
  "plugins": [
    {{
      "type": "bridge",
      "bridge": "{CNI_BRIDGE}",
      "isGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": {{
        "type": "host-local",
        "dataDir": "{data}",
        "ranges": [[{{"subnet": "{POD_CIDR}"}}]],
        "routes": [{{"dst": "0.0.0.0/0"}}]
      }}
    }},
    {{"type": "portmap", "capabilities": {{"portMappings": true}}}}
  ]
}}
"#,
            data = self.dir().join("cni/ipam").display()
        )
    }

    fn ctr(&self) -> Command {
        let mut c = Command::new(&self.bins.ctr);
        c.arg("--address")
            .arg(&self.rec.containerd_socket)
            .args(["-n", "k8s.io"]);
        c
    }

    fn import(&self, image: &ImageRef) -> Result<()> {
        let out = self
            .ctr()
            .args(["images", "import", "--snapshotter", "overlayfs"])
            .arg(&image.archive)
            .output()
            .context("running ctr")?;
        if !out.status.success() {
            bail!(
                "ctr images import {}: {}",
                image.archive.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let list = self.ctr().args(["images", "ls", "-q"]).output()?;
        if !String::from_utf8_lossy(&list.stdout)
            .lines()
            .any(|l| l.trim() == image.name)
        {
            bail!(
                "{} is not in containerd after importing {}",
                image.name,
                image.archive.display()
            );
        }
        Ok(())
    }

    async fn run(&mut self, opts: &ClusterOptions) -> Result<()> {
        let t0 = Instant::now();
        let d = self.dir().to_path_buf();
        for sub in [
            "logs",
            "pki",
            "etcd",
            "containerd",
            "cni/net.d",
            "cni/ipam",
            "kubelet",
            "kubelet-pki",
            "runc",
            "kcm",
            "scheduler",
        ] {
            fs::create_dir_all(d.join(sub))?;
        }

        // The node address, and a bpffs for the agents.
        let present = ip(None, &["-o", "addr", "show", "dev", "lo"])?;
        if !present.contains(&format!("{NODE_IP}/32")) {
            self.rec.node_ip_added = true;
            self.rec.save()?;
            ip(
                None,
                &["addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"],
            )?;
        }
        if !is_bpffs(Path::new(BPFFS)) {
            fs::create_dir_all(BPFFS)?;
            self.rec.bpffs_mounted = true;
            self.rec.save()?;
            let c = std::ffi::CString::new(BPFFS)?;
            // SAFETY: mount(2) with NUL-terminated strings.
            if unsafe {
                libc::mount(
                    c"bpf".as_ptr(),
                    c.as_ptr(),
                    c"bpf".as_ptr(),
                    0,
                    std::ptr::null(),
                )
            } != 0
            {
                self.rec.bpffs_mounted = false;
                self.rec.save()?;
                bail!(
                    "mounting a bpffs at {BPFFS}: {}",
                    io::Error::last_os_error()
                );
            }
        }

        self.pki()?;
        let ports = Ports {
            etcd: free_port_on(Ipv4Addr::LOCALHOST)?,
            etcd_peer: free_port_on(Ipv4Addr::LOCALHOST)?,
            api: free_port_on(NODE_IP)?,
            kcm: free_port_on(Ipv4Addr::LOCALHOST)?,
            scheduler: free_port_on(Ipv4Addr::LOCALHOST)?,
            kubelet: free_port_on(NODE_IP)?,
            kubelet_healthz: free_port_on(Ipv4Addr::LOCALHOST)?,
            proxy_healthz: free_port_on(Ipv4Addr::LOCALHOST)?,
            proxy_metrics: free_port_on(Ipv4Addr::LOCALHOST)?,
        };
        let api = format!("https://{NODE_IP}:{}", ports.api);
        self.rec.api_url = api.clone();

        // Identities: a static token each.
        let tokens: Vec<(&str, &str, String)> = vec![
            ("admin", "system:masters", self.admin_token.clone()),
            ("system:node:marklb-node", "system:nodes", random_hex(16)),
            ("system:kube-controller-manager", "", random_hex(16)),
            ("system:kube-scheduler", "", random_hex(16)),
            ("system:kube-proxy", "", random_hex(16)),
        ];
        let csv: String = tokens
            .iter()
            .enumerate()
            .map(|(i, (user, group, tok))| format!("{tok},{user},uid-{i},\"{group}\"\n"))
            .collect();
        fs::write(d.join("pki/tokens.csv"), csv)?;
        let kc = |s: &Starter, i: usize, file: &str| {
            let path = s.kubeconfig_for(file, &tokens[i].2, &api)?;
            anyhow::Ok(path)
        };
        self.rec.kubeconfig = kc(self, 0, "admin")?;
        let kubelet_kc = kc(self, 1, "kubelet")?;
        let kcm_kc = kc(self, 2, "kube-controller-manager")?;
        let sched_kc = kc(self, 3, "kube-scheduler")?;
        let proxy_kc = kc(self, 4, "kube-proxy")?;
        self.rec.save()?;

        // etcd.
        let etcd_url = format!("http://127.0.0.1:{}", ports.etcd);
        let peer_url = format!("http://127.0.0.1:{}", ports.etcd_peer);
        let etcd_bin = self.bins.etcd.clone();
        self.spawn(
            "etcd",
            Command::new(etcd_bin).args([
                "--name=node",
                &format!("--data-dir={}", d.join("etcd").display()),
                &format!("--listen-client-urls={etcd_url}"),
                &format!("--advertise-client-urls={etcd_url}"),
                &format!("--listen-peer-urls={peer_url}"),
                &format!("--initial-advertise-peer-urls={peer_url}"),
                &format!("--initial-cluster=node={peer_url}"),
                "--log-level=warn",
                "--logger=zap",
                "--unsafe-no-fsync",
            ]),
        )?;
        let etcd_addr: SocketAddr = ([127, 0, 0, 1], ports.etcd).into();
        self.wait("etcd", || async move {
            Ok(http_status(etcd_addr, "/health") == Some(200))
        })
        .await?;
        self.times.etcd = t0.elapsed();

        // kube-apiserver.
        let pki = d.join("pki");
        let p = |f: &str| pki.join(f).display().to_string();
        let apiserver = self.bins.apiserver.clone();
        self.spawn(
            "kube-apiserver",
            Command::new(apiserver).args([
                format!("--etcd-servers={etcd_url}"),
                format!("--bind-address={NODE_IP}"),
                format!("--advertise-address={NODE_IP}"),
                format!("--secure-port={}", ports.api),
                "--insecure-port=0".into(),
                format!("--tls-cert-file={}", p("apiserver.crt")),
                format!("--tls-private-key-file={}", p("apiserver.key")),
                format!("--client-ca-file={}", p("ca.crt")),
                format!("--token-auth-file={}", p("tokens.csv")),
                "--authorization-mode=Node,RBAC".into(),
                "--enable-admission-plugins=NodeRestriction".into(),
                "--allow-privileged=true".into(),
                format!("--service-account-key-file={}", p("sa.pub")),
                format!("--service-account-signing-key-file={}", p("sa.key")),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                "--kubelet-preferred-address-types=InternalIP".into(),
                "--profiling=false".into(),
                format!("--cert-dir={}", pki.display()),
            ]),
        )?;
        let client = self.client().await?;
        {
            let c = client.clone();
            self.wait("kube-apiserver /readyz", move || {
                let c = c.clone();
                async move {
                    let req = http::Request::get("/readyz").body(Vec::new())?;
                    Ok(c.request_text(req).await?.trim() == "ok")
                }
            })
            .await?;
        }
        self.times.apiserver = t0.elapsed();

        // containerd (CNI configuration first: it is read when the CRI plugin starts).
        fs::write(d.join("cni/net.d/10-marklb.conflist"), self.cni_config())?;
        fs::write(
            d.join("containerd.toml"),
            self.containerd_config(&opts.pause.name),
        )?;
        let path_env = format!(
            "{}:{}",
            self.bins.node_bin.display(),
            std::env::var("PATH").unwrap_or_else(|_| {
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()
            })
        );
        let path_env = if path_env.contains("/usr/sbin") {
            path_env
        } else {
            format!("{path_env}:/usr/sbin:/sbin")
        };
        let containerd = self.bins.containerd.clone();
        self.spawn(
            "containerd",
            Command::new(containerd)
                .arg("--config")
                .arg(d.join("containerd.toml"))
                .env("PATH", &path_env),
        )?;
        let sock = self.rec.containerd_socket.clone();
        let ctr_bin = self.bins.ctr.clone();
        self.wait("containerd", move || {
            let ok = sock.exists()
                && Command::new(&ctr_bin)
                    .arg("--address")
                    .arg(&sock)
                    .arg("version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
            async move { Ok(ok) }
        })
        .await?;
        self.times.containerd = t0.elapsed();
        self.import(&opts.pause)?;
        for image in &opts.images {
            self.import(image)?;
        }
        self.times.images = t0.elapsed();

        // Controller manager and scheduler.
        let kcm = self.bins.controller_manager.clone();
        let kcm_kc = kcm_kc.display().to_string();
        self.spawn(
            "kube-controller-manager",
            Command::new(kcm).args([
                format!("--kubeconfig={kcm_kc}"),
                format!("--authentication-kubeconfig={kcm_kc}"),
                format!("--authorization-kubeconfig={kcm_kc}"),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={}", ports.kcm),
                "--port=0".into(),
                "--leader-elect=false".into(),
                "--use-service-account-credentials=true".into(),
                format!("--service-account-private-key-file={}", p("sa.key")),
                format!("--root-ca-file={}", p("ca.crt")),
                format!("--cert-dir={}", d.join("kcm").display()),
                "--allocate-node-cidrs=false".into(),
                "--profiling=false".into(),
            ]),
        )?;
        let sched = self.bins.scheduler.clone();
        let sched_kc = sched_kc.display().to_string();
        self.spawn(
            "kube-scheduler",
            Command::new(sched).args([
                format!("--kubeconfig={sched_kc}"),
                format!("--authentication-kubeconfig={sched_kc}"),
                format!("--authorization-kubeconfig={sched_kc}"),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={}", ports.scheduler),
                "--port=0".into(),
                "--leader-elect=false".into(),
                format!("--cert-dir={}", d.join("scheduler").display()),
                "--profiling=false".into(),
            ]),
        )?;

        // kubelet.
        fs::write(
            d.join("kubelet.yaml"),
            format!(
                r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: "{NODE_IP}"
port: {port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {healthz}
cgroupDriver: cgroupfs
failSwapOn: false
nodeStatusUpdateFrequency: 2s
nodeStatusReportFrequency: 10s
syncFrequency: 3s
fileCheckFrequency: 20s
configMapAndSecretChangeDetectionStrategy: Watch
serializeImagePulls: false
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "1%"
  nodefs.inodesFree: "1%"
  imagefs.available: "1%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
resolvConf: ""
clusterDomain: cluster.local
clusterDNS: ["10.96.0.10"]
"#,
                port = ports.kubelet,
                healthz = ports.kubelet_healthz,
            ),
        )?;
        let kubelet = self.bins.kubelet.clone();
        self.spawn(
            "kubelet",
            Command::new(kubelet)
                .args([
                    format!("--config={}", d.join("kubelet.yaml").display()),
                    format!("--kubeconfig={}", kubelet_kc.display()),
                    "--container-runtime=remote".into(),
                    format!(
                        "--container-runtime-endpoint=unix://{}",
                        self.rec.containerd_socket.display()
                    ),
                    format!("--root-dir={}", d.join("kubelet").display()),
                    format!("--cert-dir={}", d.join("kubelet-pki").display()),
                    format!("--node-ip={NODE_IP}"),
                    format!("--hostname-override={NODE_NAME}"),
                    format!("--pod-infra-container-image={}", opts.pause.name),
                    "--v=2".into(),
                ])
                .env("PATH", &path_env),
        )?;

        // kube-proxy.
        fs::write(
            d.join("kube-proxy.yaml"),
            format!(
                r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: "{kc}"
mode: iptables
hostnameOverride: {NODE_NAME}
bindAddress: "{NODE_IP}"
healthzBindAddress: "127.0.0.1:{healthz}"
metricsBindAddress: "127.0.0.1:{metrics}"
clusterCIDR: "{POD_CIDR}"
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
"#,
                kc = proxy_kc.display(),
                healthz = ports.proxy_healthz,
                metrics = ports.proxy_metrics,
            ),
        )?;
        let proxy = self.bins.proxy.clone();
        self.spawn(
            "kube-proxy",
            Command::new(proxy)
                .arg(format!("--config={}", d.join("kube-proxy.yaml").display()))
                .env("PATH", &path_env),
        )?;

        // Ready: node registered and Ready, a default service account, kube-proxy healthy.
        let nodes: Api<Node> = Api::all(client.clone());
        {
            let nodes = nodes.clone();
            self.wait("the node to register", move || {
                let nodes = nodes.clone();
                async move { Ok(nodes.get_opt(NODE_NAME).await?.is_some()) }
            })
            .await?;
        }
        self.times.node_registered = t0.elapsed();
        self.wait("the node to be Ready", move || {
            let nodes = nodes.clone();
            async move { Ok(node_ready(&nodes.get(NODE_NAME).await?)) }
        })
        .await?;
        self.times.node_ready = t0.elapsed();
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
        self.wait("the default service account", move || {
            let sas = sas.clone();
            async move { Ok(sas.get_opt("default").await?.is_some()) }
        })
        .await?;
        let proxy_addr: SocketAddr = ([127, 0, 0, 1], ports.proxy_healthz).into();
        self.wait("kube-proxy /healthz", move || async move {
            Ok(http_status(proxy_addr, "/healthz") == Some(200))
        })
        .await?;
        self.times.total = t0.elapsed();
        Ok(())
    }

    async fn client(&self) -> Result<Client> {
        client_from(&self.rec.kubeconfig).await
    }
}

async fn client_from(kubeconfig: &Path) -> Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// Whether a node's Ready condition is True.
pub fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn log_tail(dir: &Path, name: &str, n: usize) -> String {
    let text = fs::read_to_string(dir.join("logs").join(format!("{name}.log"))).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Set when a test of this process panicked: the cluster's logs are kept then.
static TEST_PANICKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Records of clusters this process started and has not stopped: what the exit and signal
/// handlers undo.
static LIVE: Mutex<Vec<Record>> = Mutex::new(Vec::new());
static SIGNAL_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_exit() {
    let records: Vec<Record> = match LIVE.lock() {
        Ok(mut l) => l.drain(..).collect(),
        Err(p) => p.into_inner().drain(..).collect(),
    };
    for rec in records {
        let problems = teardown(&rec);
        if record_path().exists() {
            let _ = fs::remove_file(record_path());
        }
        if !problems.is_empty() {
            report(&format!("stopping the cluster left: {problems:?}"));
        }
    }
}

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_FD.load(std::sync::atomic::Ordering::SeqCst);
    let b = sig as u8;
    // SAFETY: write(2) is async-signal-safe.
    unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
}

/// Installs (once) the exit handler and the SIGINT/SIGTERM/SIGHUP handlers that stop every
/// cluster this process started before it goes.
fn install_handlers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: registering a plain extern "C" function.
        unsafe { libc::atexit(on_exit) };
        // A failing test keeps the cluster's logs (copied out when the cluster stops).
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            TEST_PANICKED.store(true, std::sync::atomic::Ordering::SeqCst);
            previous(info)
        }));
        let mut fds = [0i32; 2];
        // SAFETY: pipe2 fills two descriptors.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return;
        }
        SIGNAL_FD.store(fds[1], std::sync::atomic::Ordering::SeqCst);
        let read_fd = fds[0];
        std::thread::Builder::new()
            .name("marklb-cluster-signals".into())
            .spawn(move || {
                let mut b = 0u8;
                // SAFETY: reading one byte into a local.
                let n = unsafe { libc::read(read_fd, (&mut b as *mut u8).cast(), 1) };
                if n == 1 {
                    let sig = b as libc::c_int;
                    report(&format!(
                        "signal {sig}: stopping the marklb cluster before exiting"
                    ));
                    on_exit();
                    // SAFETY: back to the default action, then die of the same signal.
                    unsafe {
                        libc::signal(sig, libc::SIG_DFL);
                        libc::raise(sig);
                        libc::_exit(128 + sig);
                    }
                }
            })
            .expect("signal thread");
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: a zeroed sigaction with a plain handler.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as *const () as usize;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(sig, &sa, std::ptr::null_mut());
            }
        }
    });
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
            install_handlers();
        }
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
        let rec = Record {
            containerd_socket: dir.join("containerd/containerd.sock"),
            dir,
            owner: if opts.detached {
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
        };
        if !opts.detached {
            LIVE.lock().expect("live clusters").push(rec.clone());
        }
        rec.save()?;
        let admin_token = random_hex(24);
        let starter = Starter {
            rec,
            bins: bins.clone(),
            children: Vec::new(),
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
            rec,
            children,
            times,
            ..
        } = starter;
        let mut cluster = Cluster {
            rec,
            bins,
            children,
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
            cluster.children.clear();
            cluster.stopped = true;
            cluster.lock = None;
        }
        Ok(cluster)
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
        client_from(&self.rec.kubeconfig).await
    }

    /// Runs the cluster's kubectl (1.20.2) with the administrator's kubeconfig.
    pub fn kubectl(&self, args: &[&str]) -> Result<Output> {
        Command::new(&self.bins.kubectl)
            .arg("--kubeconfig")
            .arg(&self.rec.kubeconfig)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running kubectl")
    }

    /// [`kubectl`](Self::kubectl), failing unless it succeeds; its stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl(args)?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ctr -n k8s.io` against the node's containerd.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.bins.ctr)
            .arg("--address")
            .arg(&self.rec.containerd_socket)
            .args(["-n", "k8s.io"])
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "ctr {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Imports an image archive into the node's containerd.
    pub fn import_image(&self, image: &ImageRef) -> Result<()> {
        self.ctr(&[
            "images",
            "import",
            "--snapshotter",
            "overlayfs",
            &image.archive.display().to_string(),
        ])?;
        if !self
            .ctr(&["images", "ls", "-q"])?
            .lines()
            .any(|l| l.trim() == image.name)
        {
            bail!("{} not in containerd after the import", image.name);
        }
        Ok(())
    }

    /// The last `n` lines of a process's log (`kubelet`, `containerd`, ...).
    pub fn log_tail(&self, name: &str, n: usize) -> String {
        log_tail(&self.rec.dir, name, n)
    }

    /// Resident memory (KiB) of the cluster's own processes and of containerd's shims.
    pub fn rss_kib(&self) -> BTreeMap<String, u64> {
        let rss = |pid: u32| {
            fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()?
                .lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        };
        let mut m = BTreeMap::new();
        for p in &self.rec.procs {
            if proc_alive(p) {
                *m.entry(p.name.clone()).or_default() += rss(p.pid).unwrap_or(0);
            }
        }
        let sock = self.rec.containerd_socket.display().to_string();
        for pid in all_pids() {
            if cmdline(pid).contains(&sock)
                && exe_name(pid).as_deref() == Some("containerd-shim-runc-v2")
            {
                *m.entry("containerd-shims".to_string()).or_default() += rss(pid).unwrap_or(0);
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
        for (_, c) in &mut self.children {
            let _ = c.try_wait();
        }
        for (_, mut c) in self.children.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.keeper = None;
        LIVE.lock()
            .map(|mut l| l.retain(|r| r.dir != self.rec.dir))
            .ok();
        if let Ok(Some(r)) = Record::load()
            && r.dir == self.rec.dir
        {
            let _ = fs::remove_file(record_path());
        }
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

// ---------------------------------------------------------------------------------------
// One cluster per test binary
// ---------------------------------------------------------------------------------------

static SHARED: OnceLock<std::result::Result<&'static Cluster, Skip>> = OnceLock::new();

#[derive(Clone, Debug)]
enum Skip {
    Unavailable(String),
    Failed(String),
}

/// The cluster of this test binary, started by the first caller; `None` after printing
/// `SKIP <test>: <reason>` when the machine cannot run it. Panics when it should run but does
/// not start (and when `MARKLB_CLUSTER_REQUIRED=1` and it cannot run).
pub fn shared(test: &str) -> Option<&'static Cluster> {
    let r = SHARED.get_or_init(|| {
        let avail = match availability() {
            Ok(a) => a,
            Err(e) => return Err(Skip::Failed(format!("{e:#}"))),
        };
        if let Availability::Unavailable(why) = avail {
            return Err(Skip::Unavailable(why));
        }
        let images = match images() {
            Ok(i) => i,
            Err(e) => return Err(Skip::Failed(format!("building the images: {e:#}"))),
        };
        match Cluster::start(ClusterOptions {
            pause: images.pause.clone(),
            images: vec![images.agent.clone()],
            detached: false,
        }) {
            Ok(c) => {
                let t = c.times();
                report(&format!(
                    "cluster: node {NODE_NAME} Ready {:.1}s after start (etcd {:.1}s, apiserver {:.1}s, containerd {:.1}s, images {:.1}s, registered {:.1}s, Ready {:.1}s); images built/checked in {:.1}s; {}",
                    t.total.as_secs_f64(),
                    t.etcd.as_secs_f64(),
                    t.apiserver.as_secs_f64(),
                    t.containerd.as_secs_f64(),
                    t.images.as_secs_f64(),
                    t.node_registered.as_secs_f64(),
                    t.node_ready.as_secs_f64(),
                    images.build_time.as_secs_f64(),
                    c.api_url()
                ));
                // The exit handler stops it: the cluster lives as long as the process.
                let leaked: &'static Cluster = Box::leak(Box::new(c));
                Ok(leaked)
            }
            Err(e) => Err(Skip::Failed(format!("{e:#}"))),
        }
    });
    match r {
        Ok(c) => Some(c),
        Err(Skip::Unavailable(why)) => {
            let name = test_name(test);
            if std::env::var(REQUIRED_ENV).as_deref() == Ok("1") {
                panic!("{name}: the cluster cannot run here and {REQUIRED_ENV}=1: {why}");
            }
            report(&format!(
                "SKIP {name}: one-node cluster not available: {why}"
            ));
            None
        }
        Err(Skip::Failed(e)) => panic!("starting the one-node cluster failed: {e}"),
    }
}

/// The shared cluster, or `return` from the test after a SKIP line.
#[macro_export]
macro_rules! cluster_or_skip {
    () => {
        match $crate::cluster::shared(module_path!()) {
            Some(c) => c,
            None => return,
        }
    };
}

// ---------------------------------------------------------------------------------------
// A topology around a veth on the node
// ---------------------------------------------------------------------------------------

static NODE_TOPO_SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A [`Topology`] whose load-balancer end sits on the node (the host's network namespace),
/// where a host-network pod can attach to it: client and reals in namespaces, the router
/// routing the VIPs to the node's veth. The veth has no address on the node (the router knows
/// its MAC statically), so the node's routing is unchanged. Dropping it removes the
/// namespaces, which destroys the veth too.
pub struct NodeTopology {
    /// The node's end of the load balancer's link (the interface the agent attaches to).
    pub iface: String,
    pub mac: [u8; 6],
    pub topo: Topology,
}

impl NodeTopology {
    pub fn build(opts: TopologyOptions) -> io::Result<Self> {
        let topo = Topology::build(opts)?;
        let iface = format!(
            "mlbk{}x{}",
            std::process::id() % 100_000,
            NODE_TOPO_SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        );
        let lb_ns = topo.lb.ns.clone();
        let old = topo.lb.port.iface.clone();
        ip(Some(&lb_ns), &["link", "set", &old, "down"])?;
        ip(Some(&lb_ns), &["link", "set", &old, "name", &iface])?;
        ip(
            Some(&lb_ns),
            &[
                "link",
                "set",
                &iface,
                "netns",
                &std::process::id().to_string(),
            ],
        )?;
        let me = NodeTopology {
            mac: topo.lb.port.mac,
            iface,
            topo,
        };
        // No addresses of our own on the node's side (not even IPv6 link-local).
        let _ = fs::write(
            format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", me.iface),
            "1",
        );
        ip(None, &["link", "set", &me.iface, "up"])?;
        let mac = me.topo.lb.port.mac_string();
        let gw = me.topo.lb.gateway.iface.clone();
        let router = me.topo.router_ns.clone();
        for addr in [
            me.topo.lb.port.v4.to_string(),
            me.topo.lb.port.v6.to_string(),
        ] {
            ip(
                Some(&router),
                &[
                    "neigh",
                    "replace",
                    &addr,
                    "lladdr",
                    &mac,
                    "dev",
                    &gw,
                    "nud",
                    "permanent",
                ],
            )?;
        }
        Ok(me)
    }

    /// The XDP program id on the node's interface, if one is attached.
    pub fn xdp_prog_id(&self) -> Option<u64> {
        xdp_prog_id(&self.iface)
    }
}

/// The XDP program id on a node interface (`ip -d -j link`), if one is attached.
pub fn xdp_prog_id(iface: &str) -> Option<u64> {
    let out = ip(None, &["-d", "-j", "link", "show", "dev", iface]).ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    v[0]["xdp"]["prog"]["id"].as_u64()
}

impl std::ops::Deref for NodeTopology {
    type Target = Topology;
    fn deref(&self) -> &Topology {
        &self.topo
    }
}

/// Substitutes `${NAME}` placeholders in a manifest template; fails on any left over.
pub fn render(template: &str, vars: &[(&str, String)]) -> Result<String> {
    let mut s = template.to_string();
    for (k, v) in vars {
        s = s.replace(&format!("${{{k}}}"), v);
    }
    if let Some(i) = s.find("${") {
        bail!(
            "unsubstituted placeholder at {:?}",
            &s[i..(i + 30).min(s.len())]
        );
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleanup_script_removes_new_kube_chains_and_the_jumps_to_them() {
        let save = "*nat\n:PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:CNI-abc - [0:0]\n:MINE - [0:0]\n-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n-A POSTROUTING -s 10.244.0.2/32 -m comment --comment \"name: x\" -j CNI-abc\n-A POSTROUTING -j MINE\n-A KUBE-SERVICES -j KUBE-POSTROUTING\n-A CNI-abc -j MASQUERADE\nCOMMIT\n";
        let script = ipt_cleanup_script("nat", save, &["KUBE-POSTROUTING".to_string()]).unwrap();
        assert_eq!(
            script,
            "*nat\n-D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n-D POSTROUTING -s 10.244.0.2/32 -m comment --comment \"name: x\" -j CNI-abc\n-F CNI-abc\n-F KUBE-SERVICES\n-X CNI-abc\n-X KUBE-SERVICES\nCOMMIT\n"
        );
        assert!(ipt_cleanup_script("nat", ":MINE - [0:0]\n", &[]).is_none());
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mount("/a\\040b"), "/a b");
        assert_eq!(unescape_mount("/plain"), "/plain");
    }

    #[test]
    fn placeholders() {
        assert_eq!(
            render("a: ${X}\nb: ${Y}", &[("X", "1".into()), ("Y", "2".into())]).unwrap(),
            "a: 1\nb: 2"
        );
        assert!(render("a: ${X}", &[]).is_err());
    }

    #[test]
    fn proc_records_see_this_process() {
        let me = proc_record("me", std::process::id()).unwrap();
        assert!(proc_alive(&me));
        let other = ProcRecord {
            start: me.start + 1,
            ..me.clone()
        };
        assert!(
            !proc_alive(&other),
            "a different start time is another process"
        );
    }
}
