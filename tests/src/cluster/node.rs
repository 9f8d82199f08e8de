//! One node of the cluster: its own network namespace, mount namespace, cgroup root,
//! containerd, kubelet and kube-proxy, on the same machine as the others.
//!
//! - Network: a named network namespace (`/var/run/netns/<node>`, what tests enter) with one
//!   veth, `eth0` inside (the node's InternalIP, [`super::node_ip`]), `mlbh<index>` on the
//!   host's node bridge ([`super::NODES_BRIDGE`], where the API server listens); routes to the
//!   node network, the service range and the other nodes' pod ranges (through those nodes)
//!   only (no default route: nothing leaves the machine,
//!   and kubelet's cloud-metadata and DNS attempts fail at once instead of timing out). Everything a
//!   node's components do to the network (kube-proxy's and CNI's iptables, the CNI bridge,
//!   `route_localnet`, `ip_forward`, pod namespaces) stays in that namespace.
//! - Mounts: a mount namespace made by a holder process (`sleep infinity`, started inside the
//!   node's network namespace) with private propagation; in it, fresh sysfs (the node's
//!   interfaces under `/sys/class/net`) carrying the host's cgroup hierarchies and a bpffs of
//!   the node's own at `/sys/fs/bpf`, and the directories kubelet 1.20, containerd and CNI
//!   hard-code bound from the node's directory: `/var/lib/kubelet`, `/var/log/pods`,
//!   `/var/log/containers`, `/run/containerd`, `/var/lib/cni`, `/etc/cni/net.d`,
//!   `/var/run/netns`. Two kubelets sharing `/var/log/pods` delete each other's pod logs, and
//!   two on one containerd each other's sandboxes (their garbage collectors remove what their
//!   own pod manager does not know); two agents must never see each other's pins. Nothing of
//!   it is visible on the host; it goes away with the node's last process.
//! - Processes: every node process enters both namespaces between `fork` and `exec`
//!   ([`NodeHandle::enter`]), so host-network pods (children of containerd's shims) live in the
//!   node's namespaces too.
//! - cgroups: kubelet's `--cgroup-root` is `/<node>` in every hierarchy, so the pods of two
//!   nodes never share a cgroup parent.
//!
//! Invariant: every host change is in the record before it is made ([`super::Ctx::update`]).

use std::{
    ffi::{CStr, CString},
    fs::{self, File},
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use super::host::{cgroup_hierarchies, dir_entries};
use super::record::{NodeRecord, ProcRecord, ns_inode, proc_record};
use super::{
    BRIDGE_IP, Ctx, NODE_IFACE, NODES_BRIDGE, NodeInfo, NodeOptions, SERVICE_CIDR, config, node_ip,
    start::import_image,
};
use crate::netns::{NETNS_DIR, ip, ip_batch, netns_path};
use crate::supervise::{PreExec, SpawnOptions};

/// Directories the node's components hard-code, bound from the node's directory in its mount
/// namespace: (path in the node, below the node's directory). Their mount points are made on
/// the host when missing (empty; recorded and removed with the cluster).
pub const PRIVATE_DIRS: &[(&str, &str)] = &[
    ("/var/lib/kubelet", "kubelet"),
    ("/var/log/pods", "log/pods"),
    ("/var/log/containers", "log/containers"),
    ("/run/containerd", "run/containerd"),
    ("/var/lib/cni", "cni/lib"),
    ("/etc/cni/net.d", "cni/net.d"),
    (NETNS_DIR, "netns"),
];

/// A running node: what the harness keeps to start more processes in it.
pub(crate) struct NodeHandle {
    pub info: NodeInfo,
    /// The node's network namespace (open: setns into it).
    netns: File,
    /// The node's mount namespace (open: setns into it, and it lives as long as this does).
    mntns: File,
}

impl NodeHandle {
    /// The hook that moves a new process into the node's namespaces.
    pub fn enter(&self) -> PreExec {
        let (net, mnt) = (self.netns.as_raw_fd(), self.mntns.as_raw_fd());
        Arc::new(move || {
            // SAFETY: setns(2) on descriptors this process keeps open; async-signal-safe.
            step(
                unsafe { libc::setns(net, libc::CLONE_NEWNET) } == 0,
                c"setns net",
            )?;
            step(
                unsafe { libc::setns(mnt, libc::CLONE_NEWNS) } == 0,
                c"setns mnt",
            )?;
            step(unsafe { libc::chdir(c"/".as_ptr()) } == 0, c"chdir /")
        })
    }
}

/// Fails with the OS error (read first) after writing `what` to the child's stderr (its log).
/// Only async-signal-safe calls: this runs between `fork` and `exec`.
fn step(ok: bool, what: &CStr) -> io::Result<()> {
    if ok {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    let prefix = b"node namespace set-up failed at: ";
    let what = what.to_bytes();
    // SAFETY: write(2) of static and borrowed buffers to stderr.
    unsafe {
        libc::write(2, prefix.as_ptr().cast(), prefix.len());
        libc::write(2, what.as_ptr().cast(), what.len());
        libc::write(2, b"\n".as_ptr().cast(), 1);
    }
    Err(err)
}

fn cstring(p: &Path) -> Result<CString> {
    Ok(CString::new(p.as_os_str().as_encoded_bytes())?)
}

/// What the holder does in the node's new mount namespace, prepared before `fork` (no
/// allocation after it).
struct MountPlan {
    netns: i32,
    /// `<node>/sys`: the fresh sysfs, then bound over `/sys`.
    sys: CString,
    cgroup: CString,
    bpf: CString,
    binds: Vec<(CString, CString)>,
}

impl MountPlan {
    fn new(netns: &File, dir: &Path) -> Result<Self> {
        let sys = dir.join("sys");
        let binds = PRIVATE_DIRS
            .iter()
            .map(|(target, src)| Ok((cstring(&dir.join(src))?, cstring(Path::new(target))?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            netns: netns.as_raw_fd(),
            cgroup: cstring(&sys.join("fs/cgroup"))?,
            bpf: cstring(&sys.join("fs/bpf"))?,
            sys: cstring(&sys)?,
            binds,
        })
    }

    /// Runs in the holder between `fork` and `exec`.
    fn apply(&self) -> io::Result<()> {
        // SAFETY: setns/unshare(2) on a descriptor the parent keeps open.
        step(
            unsafe { libc::setns(self.netns, libc::CLONE_NEWNET) } == 0,
            c"setns net",
        )?;
        step(
            unsafe { libc::unshare(libc::CLONE_NEWNS) } == 0,
            c"unshare mount namespace",
        )?;
        step(
            mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE),
            c"make / private",
        )?;
        // sysfs mounted here belongs to the node's network namespace.
        let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        step(
            mount(Some(c"sysfs"), &self.sys, Some(c"sysfs"), flags),
            c"mount sysfs",
        )?;
        step(
            mount(
                Some(c"/sys/fs/cgroup"),
                &self.cgroup,
                None,
                libc::MS_BIND | libc::MS_REC,
            ),
            c"bind the cgroup hierarchies",
        )?;
        step(
            mount(Some(c"bpf"), &self.bpf, Some(c"bpf"), 0),
            c"mount bpffs",
        )?;
        step(
            mount(Some(&self.sys), c"/sys", None, libc::MS_BIND | libc::MS_REC),
            c"bind sysfs over /sys",
        )?;
        for (src, dst) in &self.binds {
            step(
                mount(Some(src), dst, None, libc::MS_BIND),
                c"bind a private directory",
            )?;
        }
        Ok(())
    }
}

/// mount(2) without data; whether it succeeded. Async-signal-safe.
fn mount(src: Option<&CStr>, dst: &CStr, fstype: Option<&CStr>, flags: libc::c_ulong) -> bool {
    let ptr = |c: Option<&CStr>| c.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: NUL-terminated strings (or null) that outlive the call.
    unsafe { libc::mount(ptr(src), dst.as_ptr(), ptr(fstype), flags, std::ptr::null()) == 0 }
}

/// The node's name for index `i` (1-based).
pub(crate) fn node_name(i: usize) -> String {
    format!("marklb-node-{i}")
}

/// The pod range of node `i`.
pub(crate) fn pod_cidr(i: usize) -> String {
    format!("10.244.{i}.0/24")
}

/// Labels as kubelet's `--node-labels` value.
fn labels_arg(o: &NodeOptions) -> String {
    o.labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

impl Ctx {
    /// Makes `path` and any missing parent, recording each made directory first.
    fn make_dir_recorded(&self, path: &Path) -> Result<()> {
        let mut missing = Vec::new();
        let mut p = path;
        while !p.exists() {
            missing.push(p.to_path_buf());
            p = p.parent().context("a path without an existing ancestor")?;
        }
        for d in missing.into_iter().rev() {
            self.update(|r| r.created_dirs.push(d.clone()))?;
            fs::create_dir(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        Ok(())
    }

    /// The node's network namespace, veth and addresses.
    fn node_network(&self, n: &NodeRecord) -> Result<()> {
        let ns = n.netns.clone().expect("netns name");
        ip(None, &["netns", "add", &ns])?;
        let inode = fs::metadata(netns_path(&ns))
            .ok()
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m));
        self.update_node(&n.name, |r| r.netns_inode = inode)?;
        let ip4 = n.ip.expect("node address");
        let mac = format!("02:cb:00:00:00:{:02x}", n.index);
        ip_batch(
            None,
            &[
                format!(
                    "link add {} type veth peer name {NODE_IFACE} address {mac} netns {ns}",
                    n.host_veth
                ),
                format!("link set {} master {NODES_BRIDGE} up", n.host_veth),
            ],
        )?;
        ip_batch(
            Some(&ns),
            &[
                "link set lo up".into(),
                format!("addr add {ip4}/24 dev {NODE_IFACE}"),
                format!("link set {NODE_IFACE} up"),
                // Service addresses need a route for the local routing decision before
                // kube-proxy's DNAT. No default route: nothing a node does (cloud metadata
                // probes, DNS) leaves the machine, and such attempts fail at once instead of
                // timing out.
                format!("route add {SERVICE_CIDR} via {BRIDGE_IP}"),
            ],
        )?;
        // The host reaches the node's pods (Prometheus scraping pod addresses, tests talking
        // to pods) through the node.
        ip(
            None,
            &[
                "route",
                "replace",
                &pod_cidr(n.index),
                "via",
                &ip4.to_string(),
                "dev",
                NODES_BRIDGE,
            ],
        )?;
        self.pod_routes(n)
    }

    /// Pods of different nodes reach each other as on a flat network with a route per node
    /// (what a cloud's route table or kindnet does): each node routes every other node's pod
    /// range to that node's address, straight over the bridge (the host forwards nothing for
    /// it). kube-proxy needs it for `externalTrafficPolicy: Cluster`, which sends a Service's
    /// traffic to pods of other nodes. Only the nodes' own namespaces change.
    fn pod_routes(&self, n: &NodeRecord) -> Result<()> {
        let ns = n.netns.as_deref().expect("netns name");
        let me = n.ip.expect("node address");
        for other in self.record().nodes.iter().filter(|o| o.name != n.name) {
            let (Some(other_ns), Some(other_ip)) = (other.netns.as_deref(), other.ip) else {
                continue;
            };
            if !netns_path(other_ns).exists() {
                continue;
            }
            ip_batch(
                Some(ns),
                &[format!(
                    "route replace {} via {other_ip}",
                    pod_cidr(other.index)
                )],
            )?;
            ip_batch(
                Some(other_ns),
                &[format!("route replace {} via {me}", pod_cidr(n.index))],
            )?;
        }
        Ok(())
    }

    /// The node's `--cgroup-root` in every hierarchy (recorded first). cpuset needs its CPUs
    /// and memory nodes before a task can join below it: copied from the parent.
    fn node_cgroups(&self, n: &NodeRecord) -> Result<()> {
        for h in cgroup_hierarchies() {
            let cg = h.join(&n.name);
            if cg.exists() {
                bail!(
                    "{} exists already: a node of another cluster? (`make cluster-down`)",
                    cg.display()
                );
            }
            self.update_node(&n.name, |r| r.cgroups.push(cg.clone()))?;
            fs::create_dir(&cg).with_context(|| format!("creating {}", cg.display()))?;
            for f in ["cpuset.cpus", "cpuset.mems"] {
                if let Ok(v) = fs::read_to_string(h.join(f)) {
                    fs::write(cg.join(f), v.trim())
                        .with_context(|| format!("writing {}", cg.join(f).display()))?;
                }
            }
        }
        Ok(())
    }

    /// Starts node `index` (on the cluster's owner thread: its processes die with that
    /// thread): namespaces, cgroups, containerd with the images, kubelet, kube-proxy. Does not
    /// wait for the node to be Ready.
    pub(crate) fn start_node(
        self: &Arc<Self>,
        rt: &tokio::runtime::Runtime,
        index: usize,
        opts: &NodeOptions,
    ) -> Result<NodeInfo> {
        let name = node_name(index);
        let dir = self.record().dir.join("nodes").join(&name);
        let n = NodeRecord {
            name: name.clone(),
            index,
            ip: Some(node_ip(index)),
            netns: Some(name.clone()),
            host_veth: format!("mlbh{index}"),
            containerd_socket: dir.join("containerd/containerd.sock"),
            dir: dir.clone(),
            ..Default::default()
        };
        if netns_path(&name).exists() {
            bail!(
                "the network namespace {name} exists already: a node of another cluster? (`make cluster-down`)"
            );
        }
        self.update(|r| r.nodes.push(n.clone()))?;
        for sub in [
            "sys",
            "containerd",
            "runc",
            "kubelet",
            "kubelet-pki",
            "log/pods",
            "log/containers",
            "run/containerd",
            "cni/lib",
            "cni/net.d",
            "cni/ipam",
            "netns",
        ] {
            fs::create_dir_all(dir.join(sub))?;
        }
        for (target, _) in PRIVATE_DIRS {
            self.make_dir_recorded(Path::new(target))?;
        }
        self.node_network(&n)?;
        self.node_cgroups(&n)?;

        // The holder makes the mount namespace; its descriptors are the node's handles.
        let netns = File::open(netns_path(&name))
            .with_context(|| format!("opening {}", netns_path(&name).display()))?;
        let plan = Arc::new(MountPlan::new(&netns, &dir)?);
        let holder = self
            .spawn(
                &name,
                "holder",
                Command::new("sleep").arg("infinity"),
                Some(Arc::new(move || plan.apply())),
            )
            .with_context(|| {
                format!(
                    "making the mount namespace of {name}: {}",
                    self.procs.log_tail(&format!("{name}/holder"), 5)
                )
            })?;
        let mntns = File::open(format!("/proc/{}/ns/mnt", holder.pid))?;
        let mnt_inode = ns_inode(holder.pid, "mnt");
        self.update_node(&name, |r| r.mntns_inode = mnt_inode)?;
        let info = NodeInfo {
            name: name.clone(),
            index,
            ip: node_ip(index),
            netns: name.clone(),
            iface: NODE_IFACE.to_string(),
            dir: dir.clone(),
            bpffs: PathBuf::from(format!("/proc/{}/root/sys/fs/bpf", holder.pid)),
            cgroup_root: format!("/{name}"),
            labels: opts.labels.clone(),
            containerd_socket: n.containerd_socket.clone(),
        };
        let handle = NodeHandle {
            info: info.clone(),
            netns,
            mntns,
        };
        let enter = handle.enter();
        self.nodes_mut().insert(name.clone(), handle);

        self.start_containerd(rt, &n, &enter)?;
        for image in &self.images {
            import_image(&self.bins.ctr, &n.containerd_socket, image)
                .with_context(|| format!("importing into {name}"))?;
        }
        self.start_kubelet(&n, opts, &enter)?;
        self.start_proxy(&n, &enter)?;
        Ok(info)
    }

    fn start_containerd(
        &self,
        rt: &tokio::runtime::Runtime,
        n: &NodeRecord,
        enter: &PreExec,
    ) -> Result<()> {
        let d = &n.dir;
        fs::write(
            d.join("cni/net.d/10-marklb.conflist"),
            config::cni(&d.join("cni/ipam"), &pod_cidr(n.index)),
        )?;
        let paths = config::ContainerdPaths {
            dir: d,
            socket: &n.containerd_socket,
            runc: &self.bins.runc,
            cni_bin: &self.bins.cni_bin,
        };
        fs::write(
            d.join("containerd.toml"),
            config::containerd(&paths, &self.pause),
        )?;
        let mut cmd = Command::new(&self.bins.containerd);
        cmd.arg("--config")
            .arg(d.join("containerd.toml"))
            .env("PATH", self.bins.node_path_env());
        self.spawn(&n.name, "containerd", &mut cmd, Some(enter.clone()))?;
        let sock = n.containerd_socket.clone();
        let ctr = self.bins.ctr.clone();
        rt.block_on(self.procs.wait_until(
            &format!("containerd of {}", n.name),
            super::START_TIMEOUT,
            Duration::from_millis(50),
            || {
                let ok = sock.exists()
                    && Command::new(&ctr)
                        .arg("--address")
                        .arg(&sock)
                        .arg("version")
                        .output()
                        .is_ok_and(|o| o.status.success());
                async move { Ok(ok) }
            },
        ))
    }

    fn start_kubelet(&self, n: &NodeRecord, opts: &NodeOptions, enter: &PreExec) -> Result<()> {
        let d = &n.dir;
        let ip4 = n.ip.expect("node address");
        fs::write(d.join("kubelet.yaml"), config::kubelet(ip4))?;
        let kubeconfig = self.node_kubeconfig(&n.name, d)?;
        let mut cmd = Command::new(&self.bins.kubelet);
        cmd.args([
            format!("--config={}", d.join("kubelet.yaml").display()),
            format!("--kubeconfig={}", kubeconfig.display()),
            "--container-runtime=remote".into(),
            format!(
                "--container-runtime-endpoint=unix://{}",
                n.containerd_socket.display()
            ),
            "--root-dir=/var/lib/kubelet".into(),
            format!("--cert-dir={}", d.join("kubelet-pki").display()),
            format!("--cgroup-root=/{}", n.name),
            format!("--node-ip={ip4}"),
            format!("--hostname-override={}", n.name),
            format!("--pod-infra-container-image={}", self.pause),
            "--v=2".into(),
        ])
        .env("PATH", self.bins.node_path_env());
        if !opts.labels.is_empty() {
            cmd.arg(format!("--node-labels={}", labels_arg(opts)));
        }
        self.spawn(&n.name, "kubelet", &mut cmd, Some(enter.clone()))?;
        Ok(())
    }

    fn start_proxy(&self, n: &NodeRecord, enter: &PreExec) -> Result<()> {
        let d = &n.dir;
        fs::write(
            d.join("kube-proxy.yaml"),
            config::kube_proxy(&self.proxy_kubeconfig, &n.name, n.ip.expect("address")),
        )?;
        let mut cmd = Command::new(&self.bins.proxy);
        cmd.arg(format!("--config={}", d.join("kube-proxy.yaml").display()))
            .env("PATH", self.bins.node_path_env());
        self.spawn(&n.name, "kube-proxy", &mut cmd, Some(enter.clone()))?;
        Ok(())
    }

    /// Starts a process of `node` (or of the control plane when `node` is empty) and records
    /// it. Must run on the owner thread.
    pub(crate) fn spawn(
        &self,
        node: &str,
        name: &str,
        cmd: &mut Command,
        enter: Option<PreExec>,
    ) -> Result<ProcRecord> {
        let label = if node.is_empty() {
            name.to_string()
        } else {
            format!("{node}/{name}")
        };
        let opts = SpawnOptions {
            detached: self.detached,
            enter,
            cwd: Some(self.record().dir.clone()),
        };
        let pid = self.procs.spawn(&label, cmd, &opts)?;
        let mut rec = proc_record(name, pid).unwrap_or(ProcRecord {
            name: name.to_string(),
            pid,
            ..Default::default()
        });
        rec.node = (!node.is_empty()).then(|| node.to_string());
        self.update(|r| r.procs.push(rec.clone()))?;
        Ok(rec)
    }
}

/// Whether a directory exists and is empty.
pub(crate) fn is_empty_dir(p: &Path) -> bool {
    dir_entries(p).is_some_and(|e| e.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_and_ranges_follow_the_index() {
        assert_eq!(node_name(2), "marklb-node-2");
        assert_eq!(pod_cidr(3), "10.244.3.0/24");
        let o = NodeOptions {
            labels: [
                ("a".to_string(), "1".to_string()),
                ("b/c".into(), "x".into()),
            ]
            .into(),
        };
        assert_eq!(labels_arg(&o), "a=1,b/c=x");
    }

    #[test]
    fn private_directories_live_below_the_node() {
        for (target, src) in PRIVATE_DIRS {
            assert!(
                target.starts_with('/') && !src.starts_with('/'),
                "{target} {src}"
            );
        }
    }
}
