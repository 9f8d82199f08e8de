//! Undoing a [`Record`]: what [`super::Cluster::stop`], the exit and signal handlers, the next
//! start after a SIGKILL and `marklb-cluster down` all run; and undoing one node of it
//! ([`teardown_node`], also [`super::Cluster::remove_node`]).
//!
//! Order: the controllers, then node by node (kubelet and kube-proxy, so nothing restarts
//! containers; the pods, by the node's cgroups; containerd; whatever still runs in the node's
//! network or mount namespace, shims and host-network pods included; the namespace; the
//! cgroups), then the API server and etcd, the node bridge, the sysctls, the mount-point
//! directories the cluster made, the directory. Never touched: what was there before the
//! cluster started (the record says what that was).

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Result;

use super::KEEP_LOGS_ENV;
use super::host::{cgroup_dirs, dir_entries, link_exists, mount_points, tree};
use super::node::is_empty_dir;
use super::record::{
    NodeRecord, Record, all_pids, ns_inode, proc_alive, proc_stat, record_path, signal, stop_proc,
};
use super::shared::TEST_PANICKED;
use crate::kube_harness::report;
use crate::netns::{ip, netns_path};

/// Removes `path` recursively unless something is mounted below it.
pub(crate) fn remove_tree(path: &Path, problems: &mut Vec<String>) {
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
pub(crate) fn remove_cgroup_tree(cg: &Path, problems: &mut Vec<String>) {
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

/// Kills every process whose network or mount namespace is one of the node's (containerd's
/// shims, host-network pods, the holder, anything started in it), until none is left.
fn kill_node_namespaces(n: &NodeRecord, problems: &mut Vec<String>) {
    let me = std::process::id();
    let inside = |pid: u32| {
        (n.netns_inode.is_some() && ns_inode(pid, "net") == n.netns_inode)
            || (n.mntns_inode.is_some() && ns_inode(pid, "mnt") == n.mntns_inode)
    };
    for round in 0..100 {
        let left: Vec<u32> = all_pids()
            .into_iter()
            .filter(|pid| *pid != me && inside(*pid))
            .filter(|pid| matches!(proc_stat(*pid), Some((s, _)) if s != 'Z'))
            .collect();
        if left.is_empty() {
            return;
        }
        for pid in &left {
            signal(*pid, libc::SIGKILL);
        }
        if round == 99 {
            problems.push(format!(
                "processes left in {}'s namespaces: {left:?}",
                n.name
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Undoes node `n` of `rec`: its processes, pods, namespaces and cgroups (its directory stays:
/// it is part of the cluster's). Returns what could not be undone.
pub fn teardown_node(rec: &Record, n: &NodeRecord) -> Vec<String> {
    let mut problems = Vec::new();
    let node = Some(n.name.as_str());
    for name in ["kubelet", "kube-proxy"] {
        for p in rec.procs_of(node, name) {
            stop_proc(p, Duration::from_secs(5));
        }
    }
    // The pods (their cgroups are below the node's root), then containerd and the rest.
    for cg in &n.cgroups {
        remove_cgroup_tree(cg, &mut problems);
    }
    for p in rec.procs_of(node, "containerd") {
        stop_proc(p, Duration::from_secs(5));
    }
    kill_node_namespaces(n, &mut problems);
    for p in rec.procs.iter().filter(|p| p.node.as_deref() == node) {
        if proc_alive(p) {
            problems.push(format!("{} (pid {}) still runs", p.label(), p.pid));
        }
    }
    if let Some(ns) = &n.netns
        && netns_path(ns).exists()
        && let Err(e) = ip(None, &["netns", "del", ns])
    {
        problems.push(format!("deleting the network namespace {ns}: {e}"));
    }
    // The host end of the veth goes with the namespace; a half-made one may be left.
    if !n.host_veth.is_empty() && link_exists(&n.host_veth) {
        let _ = ip(None, &["link", "del", &n.host_veth]);
    }
    // The host's route to the node's pods (gone with the bridge too; not when one node goes).
    if let Some(ip4) = n.ip {
        let _ = ip(
            None,
            &[
                "route",
                "del",
                &super::node::pod_cidr(n.index),
                "via",
                &ip4.to_string(),
            ],
        );
    }
    // The other nodes' routes to its pods.
    for other in rec.nodes.iter().filter(|o| o.name != n.name) {
        if let Some(other_ns) = &other.netns
            && netns_path(other_ns).exists()
        {
            let cidr = super::node::pod_cidr(n.index);
            let _ = ip(Some(other_ns), &["route", "del", &cidr]);
        }
    }
    for cg in &n.cgroups {
        remove_cgroup_tree(cg, &mut problems);
    }
    problems
}

/// Removes the `kubepods*` top-level cgroups that were not there before (a kubelet started
/// without its `--cgroup-root` would make them; none should).
fn remove_stray_pod_cgroups(rec: &Record, problems: &mut Vec<String>) {
    for (h, entries) in cgroup_dirs() {
        let before = rec.cgroups_before.get(&h).cloned().unwrap_or_default();
        for e in entries {
            if e.starts_with("kubepods") && !before.contains(&e) {
                remove_cgroup_tree(&Path::new(&h).join(&e), problems);
            }
        }
    }
}

/// Undoes everything `rec` says a cluster changed. Returns what could not be undone.
pub fn teardown(rec: &Record) -> Vec<String> {
    let mut problems = Vec::new();
    let control = |name: &'static str| rec.procs_of(None, name);
    // 1. The controllers (nothing schedules or restarts pods any more), then node by node.
    for name in ["kube-scheduler", "kube-controller-manager"] {
        for p in control(name) {
            stop_proc(p, Duration::from_secs(5));
        }
    }
    for n in &rec.nodes {
        problems.extend(teardown_node(rec, n));
    }
    // 2. The API server and etcd.
    for name in ["kube-apiserver", "etcd"] {
        for p in control(name) {
            stop_proc(p, Duration::from_secs(5));
        }
    }
    for p in rec.procs.iter().filter(|p| p.node.is_none()) {
        if proc_alive(p) {
            problems.push(format!("{} (pid {}) still runs", p.label(), p.pid));
        }
    }
    // 3. The client namespaces, then the node bridge.
    for c in &rec.clients {
        problems.extend(super::client::remove_client(c));
    }
    if let Some(b) = &rec.bridge
        && link_exists(b)
        && let Err(e) = ip(None, &["link", "del", b])
    {
        problems.push(format!("deleting {b}: {e}"));
    }
    // 4. Sysctls (kubelet sets a few machine-wide ones).
    for (path, value) in &rec.sysctls {
        // A device's own setting (the bridge's forwarding) went with the device.
        if path.starts_with("/proc/sys/net/") && !Path::new(path).exists() {
            continue;
        }
        if fs::read_to_string(path).map(|v| v.trim().to_string()).ok() != Some(value.clone())
            && let Err(e) = fs::write(path, value)
        {
            problems.push(format!("restoring {path}={value}: {e}"));
        }
    }
    // 5. Host directories: what appeared in them (nothing should: each node has its own), and
    //    the mount points the cluster made, deepest first, when empty.
    for (path, before) in &rec.host_paths {
        let p = Path::new(path);
        if let Some(entries) = before {
            for e in dir_entries(p).unwrap_or_default() {
                if !entries.contains(&e) {
                    remove_tree(&p.join(&e), &mut problems);
                }
            }
        }
    }
    for d in rec.created_dirs.iter().rev() {
        if is_empty_dir(d)
            && let Err(e) = fs::remove_dir(d)
        {
            problems.push(format!("removing {}: {e}", d.display()));
        }
    }
    remove_stray_pod_cgroups(rec, &mut problems);
    // 6. The directory (logs copied out first when asked).
    if !rec.dir.as_os_str().is_empty() {
        if std::env::var(KEEP_LOGS_ENV).as_deref() == Ok("1")
            || TEST_PANICKED.load(std::sync::atomic::Ordering::SeqCst)
        {
            keep_logs(rec);
        }
        remove_tree(&rec.dir, &mut problems);
    }
    problems
}

fn keep_logs(rec: &Record) {
    let to = std::env::temp_dir().join(format!("marklb-cluster-logs-{}", std::process::id()));
    let mut files = Vec::new();
    tree(&rec.dir.join("logs"), 3, &mut files);
    for f in files.iter().map(PathBuf::from).filter(|f| f.is_file()) {
        if let Ok(rel) = f.strip_prefix(rec.dir.join("logs")) {
            let dst = to.join(rel);
            let _ = fs::create_dir_all(dst.parent().unwrap_or(&to));
            let _ = fs::copy(&f, dst);
        }
    }
    report(&format!("cluster logs kept in {}", to.display()));
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
