//! Undoing a [`Record`]: what [`super::Cluster::stop`], the exit and signal handlers, the next
//! start after a SIGKILL and `marklb-cluster down` all run.
//!
//! Order: the node agents (so nothing restarts containers), the pods' processes (by their
//! `kubepods` cgroups), containerd and its shims, the control plane; then mounts, iptables, the
//! CNI bridge and node address, sysctls, host directories, pins and the bpffs, the directory.
//! Never touched: what was there before the cluster started (the record says what that was),
//! and a bpffs that something else pinned into while the cluster ran.

use std::{
    fs, io,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Result;

use super::host::{
    IPT_TABLES, cgroup_dirs, dir_entries, ipt_cleanup_script, ipt_family, ipt_save, is_bpffs,
    link_exists, mount_points, top_mount, tree,
};
use super::record::{
    Record, all_pids, cmdline, proc_alive, proc_stat, record_path, signal, stop_proc,
};
use super::shared::TEST_PANICKED;
use super::{BPFFS, CNI_BRIDGE, KEEP_LOGS_ENV, NODE_IP};
use crate::kube_harness::report;
use crate::netns::{ip, run_command};

/// Unmounts everything mounted at or below `prefixes`, deepest first (a point mounted several
/// times as often as needed).
pub(crate) fn unmount_under(prefixes: &[PathBuf], problems: &mut Vec<String>) {
    let under = |m: &PathBuf| prefixes.iter().any(|p| m.starts_with(p));
    for _round in 0..5 {
        let mut mine: Vec<PathBuf> = mount_points().into_iter().filter(under).collect();
        if mine.is_empty() {
            return;
        }
        mine.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        for m in &mine {
            umount(m);
        }
    }
    let left: Vec<PathBuf> = mount_points().into_iter().filter(under).collect();
    if !left.is_empty() {
        problems.push(format!("mounts left: {left:?}"));
    }
}

fn umount(path: &Path) {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: umount2 with a NUL-terminated path.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}

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

/// Removes the `kubepods*` cgroups that were not there before.
fn remove_pod_cgroups(rec: &Record, problems: &mut Vec<String>) {
    for (h, entries) in cgroup_dirs() {
        let before = rec.cgroups_before.get(&h).cloned().unwrap_or_default();
        for e in entries {
            if e.starts_with("kubepods") && !before.contains(&e) {
                remove_cgroup_tree(&Path::new(&h).join(&e), problems);
            }
        }
    }
}

/// Kills what is left of containerd's world: processes naming its socket or the cluster's
/// directory on their command line (the shims), except the control plane.
fn kill_strays(rec: &Record, problems: &mut Vec<String>) {
    let sock = rec.containerd_socket.display().to_string();
    let dir = rec.dir.display().to_string();
    let me = std::process::id();
    let control_plane = |pid: u32| {
        rec.procs
            .iter()
            .any(|p| p.pid == pid && (p.name == "etcd" || p.name == "kube-apiserver"))
    };
    for round in 0..50 {
        let strays: Vec<u32> = all_pids()
            .into_iter()
            .filter(|pid| *pid != me && !control_plane(*pid))
            .filter(|pid| {
                let c = cmdline(*pid);
                (!sock.is_empty() && c.contains(&sock)) || (!dir.is_empty() && c.contains(&dir))
            })
            .filter(|pid| matches!(proc_stat(*pid), Some((s, _)) if s != 'Z'))
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
}

/// Removes the `KUBE-*`/`CNI-*` chains that were not there before, and the jumps to them.
fn remove_kube_chains(rec: &Record, problems: &mut Vec<String>) {
    for v6 in [false, true] {
        for t in IPT_TABLES {
            let before = rec
                .chains_before
                .get(&format!("{} {t}", ipt_family(v6)))
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
}

/// The agents' pins of interfaces that are gone, and the bpffs if the cluster mounted it and
/// nothing else pinned into it while it ran (an agent outside the cluster pins there too: its
/// XDP program would vanish with the mount).
fn remove_pins_and_bpffs(rec: &Record, problems: &mut Vec<String>) {
    let root = Path::new(BPFFS);
    if !is_bpffs(root) {
        return;
    }
    let pins = root.join("marklb");
    let before = rec.pins_before.clone().unwrap_or_default();
    for e in dir_entries(&pins).unwrap_or_default() {
        // Pins of an interface that still exists belong to a datapath that still runs.
        if !before.contains(&e) && !link_exists(&e) {
            remove_tree(&pins.join(&e), problems);
        }
    }
    let Some(ours) = rec.bpffs_mount else {
        return;
    };
    if rec.pins_before.is_none() && dir_entries(&pins).is_some_and(|e| e.is_empty()) {
        let _ = fs::remove_dir(&pins);
    }
    let foreign: Vec<String> = dir_entries(root)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| !rec.bpffs_initial.contains(e))
        .collect();
    match top_mount(root) {
        Some(m) if m.id == ours && foreign.is_empty() => umount(root),
        Some(m) if m.id == ours => report(&format!(
            "left the bpffs the cluster mounted at {BPFFS}: something else pinned into it ({})",
            foreign.join(", ")
        )),
        _ => report(&format!(
            "left {BPFFS} alone: the bpffs on top is not the one the cluster mounted"
        )),
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
    remove_pod_cgroups(rec, &mut problems);
    // 2. containerd, then its shims (found by containerd's address on their command line).
    for p in by_name("containerd") {
        stop_proc(p, Duration::from_secs(5));
    }
    kill_strays(rec, &mut problems);
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
    remove_kube_chains(rec, &mut problems);
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
    remove_pins_and_bpffs(rec, &mut problems);
    // 10. Leftover cgroups (a pod that started while we stopped), once more.
    remove_pod_cgroups(rec, &mut problems);
    // 11. The directory (logs copied out first when asked).
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
    let _ = fs::create_dir_all(&to);
    for e in dir_entries(&rec.dir.join("logs")).unwrap_or_default() {
        let _ = fs::copy(rec.dir.join("logs").join(&e), to.join(&e));
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
