//! The host as the cluster may change it: snapshots for the record (what to restore) and for
//! leftover checks ([`HostState`]: a test takes one before the cluster starts and one after it
//! stopped, and expects them equal), and the small readers they are made of (mounts, cgroups,
//! iptables chains, directory entries).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use super::binaries::{BPF_FS_MAGIC, CGROUP_SUPER_MAGIC, CGROUP2_SUPER_MAGIC, statfs_magic};
use super::record::{all_pids, base_dir, cmdline, exe_name};
use super::{BPFFS, CNI_BRIDGE};
use crate::netns::ip;

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

/// One line of /proc/self/mountinfo: the mount id and the (unescaped) mount point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Mount {
    pub id: u64,
    pub point: PathBuf,
}

/// The mounts of this process's mount namespace, in mount order (a later mount on the same
/// point is on top of an earlier one).
pub(crate) fn mounts() -> Vec<Mount> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut w = l.split(' ');
            let id = w.next()?.parse().ok()?;
            let point = PathBuf::from(unescape_mount(w.nth(3)?));
            Some(Mount { id, point })
        })
        .collect()
}

/// Mount points (from /proc/self/mountinfo, unescaped).
pub fn mount_points() -> Vec<PathBuf> {
    mounts().into_iter().map(|m| m.point).collect()
}

/// The mount on top at `path`, if something is mounted there.
pub(crate) fn top_mount(path: &Path) -> Option<Mount> {
    mounts().into_iter().rev().find(|m| m.point == path)
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

/// The chains of every table of both families: "ipv4 nat" -> chains.
pub(crate) fn ipt_all_chains() -> BTreeMap<String, Vec<String>> {
    let mut m = BTreeMap::new();
    for v6 in [false, true] {
        for t in IPT_TABLES {
            m.insert(
                format!("{} {t}", ipt_family(v6)),
                ipt_chains(&ipt_save(v6, t)),
            );
        }
    }
    m
}

/// Whether a chain is one kubelet, kube-proxy or the CNI plugins make.
pub(crate) fn kube_chain(name: &str) -> bool {
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
                iptables.insert(format!("{} {t}", ipt_family(v6)), lines);
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
    fn the_root_mount_is_listed_with_its_id() {
        let root = top_mount(Path::new("/")).expect("/ is mounted");
        assert!(mounts().iter().any(|m| m.id == root.id));
    }
}
