//! The host as the cluster may change it: snapshots for the record (what to restore) and for
//! leftover checks ([`HostState`]: a test takes one before the cluster starts and one after it
//! stopped, and expects them equal), and the small readers they are made of (mounts, cgroups,
//! directory entries).
//!
//! The nodes live in their own network and mount namespaces, so kube-proxy's and CNI's
//! iptables rules, the CNI bridge, pod namespaces, kubelet's and containerd's directories and
//! the agents' pins never reach the host. What does: the node bridge and veths, the named
//! network namespaces, the nodes' cgroup roots, mount-point directories that did not exist,
//! the machine-wide sysctls kubelet sets, processes. [`HostState`] still watches the rest, to
//! prove it stays untouched.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use super::binaries::{BPF_FS_MAGIC, CGROUP_SUPER_MAGIC, CGROUP2_SUPER_MAGIC, statfs_magic};
use super::record::{all_pids, base_dir, cmdline, exe_name};
use super::{BPFFS, CNI_BRIDGE, NODES_BRIDGE};
use crate::netns::{NETNS_DIR, ip};

/// Sysctls kubelet (`kernel.*`, `vm.*`), kube-proxy (`route_localnet`, conntrack) and the bridge
/// plugin (`ip_forward`) may change: saved at start, put back at stop. The `net.*` ones belong
/// to the nodes' network namespaces; they are here to show the host's stay as they were.
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

/// Host directories kubelet, containerd and the CNI plugins use outside the cluster's own
/// directory (hard-coded in these versions). Each node sees its own (bind mounts in its mount
/// namespace); on the host nothing may appear in them.
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

pub(crate) fn read_sysctls() -> BTreeMap<String, String> {
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

/// The sorted entry names of a directory; None when it cannot be read.
pub(crate) fn dir_entries(path: &Path) -> Option<Vec<String>> {
    let mut v: Vec<String> = fs::read_dir(path)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    Some(v)
}

/// Every path below `path` (depth-limited), for leftover comparisons.
pub(crate) fn tree(path: &Path, depth: usize, out: &mut Vec<String>) {
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

pub(crate) fn is_bpffs(path: &Path) -> bool {
    statfs_magic(path) == Some(BPF_FS_MAGIC)
}

/// Cgroup hierarchies (v1 controllers and the v2 unified one) under /sys/fs/cgroup.
pub(crate) fn cgroup_hierarchies() -> Vec<PathBuf> {
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

/// The top-level cgroups (directories) of every hierarchy.
pub(crate) fn cgroup_dirs() -> BTreeMap<String, Vec<String>> {
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

pub(crate) const IPT_TABLES: &[&str] = &["filter", "nat", "mangle", "raw"];

/// The iptables family name used as a key ("ipv4"/"ipv6").
pub(crate) fn ipt_family(v6: bool) -> &'static str {
    if v6 { "ipv6" } else { "ipv4" }
}

pub(crate) fn ipt_save(v6: bool, table: &str) -> String {
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

pub(crate) fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// What the cluster may change on the host, captured for comparison: a test takes one before
/// the cluster starts and one after it stopped, and expects them equal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostState {
    /// iptables-save per family and table, without counters and comments.
    pub iptables: BTreeMap<String, Vec<String>>,
    pub sysctls: BTreeMap<String, String>,
    /// Everything below the host directories kubelet and containerd use.
    pub paths: Vec<String>,
    /// Named network namespaces (`/var/run/netns`).
    pub netns: Vec<String>,
    /// Mount points the cluster could have made.
    pub mounts: Vec<String>,
    /// Directories at the top of every cgroup hierarchy.
    pub cgroups: BTreeMap<String, Vec<String>>,
    /// Processes of cluster executables or with a cluster directory on their command line.
    pub processes: Vec<String>,
    /// Network interfaces of the host the cluster or its tests could make (the node bridge and
    /// veths, a CNI bridge, pod veths, the tests' `mlbk*` veths).
    pub links: Vec<String>,
    /// Addresses on lo.
    pub lo_addrs: Vec<String>,
    pub bpffs_mounted: bool,
    /// What is pinned in the host's bpffs (the nodes have their own).
    pub pins: Vec<String>,
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
                iptables.insert(format!("{} {t}", ipt_family(v6)), lines);
            }
        }
        let mut paths = Vec::new();
        for p in HOST_PATHS {
            tree(Path::new(p), 4, &mut paths);
        }
        let mut pins = Vec::new();
        if is_bpffs(Path::new(BPFFS)) {
            tree(Path::new(BPFFS), 3, &mut pins);
        }
        let base = base_dir().display().to_string();
        let watched = |m: &str| {
            m.starts_with(&base)
                || HOST_PATHS.iter().any(|p| m.starts_with(p))
                || m.starts_with(NETNS_DIR)
                || m.starts_with("/run/netns")
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
                    || l == NODES_BRIDGE
                    || l.starts_with("mlbh")
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
            netns: dir_entries(Path::new(NETNS_DIR)).unwrap_or_default(),
            mounts,
            cgroups: cgroup_dirs(),
            processes,
            links,
            lo_addrs,
            bpffs_mounted: is_bpffs(Path::new(BPFFS)),
            pins,
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
        sets("netns", &before.netns, &self.netns, &mut d);
        sets("pin", &before.pins, &self.pins, &mut d);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mount("/a\\040b"), "/a b");
        assert_eq!(unescape_mount("/plain"), "/plain");
    }
}
