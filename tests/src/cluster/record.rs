//! The record of everything a cluster changed on the host, written as it happens
//! (`<base>/current.json`), so the changes can be undone without the process that made them
//! (after SIGKILL: by the next start, or `marklb-cluster down`); the machine-wide lock; and the
//! process bookkeeping (PID plus start time, so a reused PID is never signalled).

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io,
    os::fd::AsRawFd,
    path::PathBuf,
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::kube_harness::report;

/// Overrides [`DEFAULT_BASE`].
pub const BASE_ENV: &str = "MARKLB_CLUSTER_DIR";
/// Where cluster directories, the lock and the record live.
pub const DEFAULT_BASE: &str = "/var/lib/marklb/clusters";

/// Where cluster directories, the lock and the record live.
pub fn base_dir() -> PathBuf {
    std::env::var_os(BASE_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BASE))
}

pub(crate) fn record_path() -> PathBuf {
    base_dir().join("current.json")
}

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

/// A process of the cluster.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ProcRecord {
    /// The component (`etcd`, `kubelet`, ...), and for a node's process the node's name.
    pub name: String,
    pub node: Option<String>,
    pub pid: u32,
    /// Start time (clock ticks since boot, /proc/<pid>/stat field 22): a PID reused by another
    /// process is never signalled.
    pub start: u64,
}

impl ProcRecord {
    /// The name its log and the supervisor know it by: `kubelet`, `marklb-node-2/kubelet`.
    pub fn label(&self) -> String {
        match &self.node {
            Some(n) => format!("{n}/{}", self.name),
            None => self.name.clone(),
        }
    }
}

/// What one node changed on the host.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct NodeRecord {
    pub name: String,
    /// 1-based; the node's address and pod range follow from it.
    pub index: usize,
    pub ip: Option<std::net::Ipv4Addr>,
    /// The named network namespace (`/var/run/netns/<netns>`), once created.
    pub netns: Option<String>,
    /// Its inode (processes inside it are the node's, whatever they are).
    pub netns_inode: Option<u64>,
    /// The inode of the node's mount namespace, once made.
    pub mntns_inode: Option<u64>,
    /// The host end of the node's veth.
    pub host_veth: String,
    /// The node's directory (below the cluster's).
    pub dir: PathBuf,
    pub containerd_socket: PathBuf,
    /// The cgroups made as the node's `--cgroup-root`, one per hierarchy.
    pub cgroups: Vec<PathBuf>,
}

/// Everything a cluster changed on the host, written as it happens. Fields missing in a record
/// written by an older version read as their defaults.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Record {
    /// The cluster's directory.
    pub dir: PathBuf,
    /// The process that owns the cluster (None: detached, `make cluster-up`).
    pub owner: Option<ProcRecord>,
    pub procs: Vec<ProcRecord>,
    pub kubeconfig: PathBuf,
    pub api_url: String,
    /// The host bridge the nodes' veths are attached to, when the cluster made it.
    pub bridge: Option<String>,
    pub nodes: Vec<NodeRecord>,
    /// Client namespaces on the node bridge ([`super::client`]).
    pub clients: Vec<super::client::ClientInfo>,
    /// Host directories made as mount points of the nodes' private directories, in the order
    /// they were made (removed in reverse, when empty).
    pub created_dirs: Vec<PathBuf>,
    /// Saved sysctl values (path -> value): kubelet changes a few machine-wide ones.
    pub sysctls: BTreeMap<String, String>,
    /// Host directories: None = absent before, else their entries before.
    pub host_paths: BTreeMap<String, Option<Vec<String>>>,
    /// Top-level entries of each cgroup hierarchy before.
    pub cgroups_before: BTreeMap<String, Vec<String>>,
}

/// Records of clusters this process started and has not stopped: what the exit and signal
/// handlers undo ([`super::shared`]).
pub(crate) static LIVE: Mutex<Vec<Record>> = Mutex::new(Vec::new());

impl Record {
    /// Writes the record (and updates this process's copy the exit handlers undo).
    pub(crate) fn save(&self) -> Result<()> {
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

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<&NodeRecord> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The recorded processes of node `node` (None: of the control plane) named `name`.
    pub fn procs_of<'a>(
        &'a self,
        node: Option<&'a str>,
        name: &'a str,
    ) -> impl Iterator<Item = &'a ProcRecord> + 'a {
        self.procs
            .iter()
            .filter(move |p| p.node.as_deref() == node && p.name == name)
    }

    /// Removes the record file if it is this record's.
    pub(crate) fn remove_file_if_mine(&self) {
        if let Ok(Some(r)) = Record::load()
            && r.dir == self.dir
        {
            let _ = fs::remove_file(record_path());
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
pub(crate) fn proc_stat(pid: u32) -> Option<(char, u64)> {
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
        node: None,
        pid,
        start,
    })
}

/// Whether the recorded process still runs (same PID and start time, not a zombie).
pub fn proc_alive(p: &ProcRecord) -> bool {
    matches!(proc_stat(p.pid), Some((state, start)) if start == p.start && state != 'Z' && state != 'X')
}

pub(crate) fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a PID we checked.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

/// SIGTERM, then SIGKILL after `grace`; waits until it is gone.
pub(crate) fn stop_proc(p: &ProcRecord, grace: Duration) {
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

/// The inode of namespace `kind` (`net`, `mnt`) of process `pid`.
pub(crate) fn ns_inode(pid: u32, kind: &str) -> Option<u64> {
    fs::metadata(format!("/proc/{pid}/ns/{kind}"))
        .ok()
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
}

/// Every PID on the machine.
pub(crate) fn all_pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A process's command line, arguments separated by spaces.
pub(crate) fn cmdline(pid: u32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// The file name of a process's executable.
pub(crate) fn exe_name(pid: u32) -> Option<String> {
    fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
