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
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcRecord {
    pub name: String,
    pub pid: u32,
    /// Start time (clock ticks since boot, /proc/<pid>/stat field 22): a PID reused by another
    /// process is never signalled.
    pub start: u64,
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
    pub containerd_socket: PathBuf,
    pub kubeconfig: PathBuf,
    pub api_url: String,
    pub node_ip_added: bool,
    /// The mount id (`/proc/self/mountinfo` field 1) of the bpffs the cluster mounted, if it did.
    pub bpffs_mount: Option<u64>,
    /// What a new bpffs holds before anyone pins (the kernel's preloaded `maps.debug`,
    /// `progs.debug` iterators).
    pub bpffs_initial: Vec<String>,
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
