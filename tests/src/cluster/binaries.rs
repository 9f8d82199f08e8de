//! What the set-up left (`scripts/setup-k8s.sh`, `scripts/setup-cluster.sh`) and whether this
//! machine can run a kubelet 1.20 node at all.
//!
//! [`availability`] is an error when the tests must fail (not root, set-up never ran), and
//! [`Availability::Unavailable`] with the exact reason when they may skip (a part recorded as
//! unavailable, a cgroup v2-only host, no overlayfs, ...).

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Result, bail};

use crate::kube_harness::{cache_dir, unavailable_reason};

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
    pub(crate) fn from_cache(cache: &Path) -> Self {
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

    /// PATH for the node's processes: the node binaries first (containerd finds its shim and
    /// runc there), then the machine's, with the sbin directories iptables lives in.
    pub(crate) fn node_path_env(&self) -> String {
        let path = format!(
            "{}:{}",
            self.node_bin.display(),
            std::env::var("PATH").unwrap_or_else(|_| {
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()
            })
        );
        if path.contains("/usr/sbin") {
            path
        } else {
            format!("{path}:/usr/sbin:/sbin")
        }
    }
}

/// Whether the cluster can run here.
#[derive(Clone, Debug)]
pub enum Availability {
    Available(Box<Binaries>),
    /// Why not (a set-up part recorded as unavailable, or the machine lacks something).
    Unavailable(String),
}

pub(crate) const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
pub(crate) const CGROUP_SUPER_MAGIC: i64 = 0x27e0eb;
pub(crate) const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The file system type (`statfs` magic) at `path`.
pub(crate) fn statfs_magic(path: &Path) -> Option<i64> {
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
            "this host is cgroup v2-only (/sys/fs/cgroup is cgroup2); the test cluster \
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
        bail!("the test cluster needs root (kubelet, containerd, iptables, XDP)");
    }
    let cache = cache_dir();
    if let Some(reason) = unavailable_reason(&["etcd", "kube-1.20", "node", "host-tools"]) {
        return Ok(Availability::Unavailable(reason));
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
