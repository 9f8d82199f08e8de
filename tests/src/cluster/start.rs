//! Starting a cluster: the node bridge on the host, certificates and tokens, etcd,
//! kube-apiserver (on the bridge address, where every node reaches it), controller manager and
//! scheduler, then the nodes ([`super::node`]), and waiting until every node is Ready, the
//! `default` service account exists and every kube-proxy is healthy. Every process and every
//! host change goes into the record before (or as) it happens.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::{Api, Client};

use super::config::PROXY_HEALTHZ_PORT;
use super::images::ImageRef;
use super::pki::{Identity, token_file, write_pki};
use super::{
    BRIDGE_IP, Ctx, NODE_GRACE, NODES_BRIDGE, NODES_NET, NodeInfo, NodeOptions, SERVICE_CIDR,
    START_TIMEOUT, StartTimes, node_ready,
};
use crate::netns::{ip, ip_batch};
use crate::supervise::{
    client_from_kubeconfig, etcd_args, free_port_on, http_get, token_kubeconfig,
};

const POLL: Duration = Duration::from_millis(100);

/// Ports of the control plane, all picked free.
struct Ports {
    etcd: u16,
    etcd_peer: u16,
    api: u16,
    kcm: u16,
    scheduler: u16,
}

impl Ports {
    fn pick() -> Result<Self> {
        let lo = Ipv4Addr::LOCALHOST;
        Ok(Ports {
            etcd: free_port_on(lo)?,
            etcd_peer: free_port_on(lo)?,
            api: free_port_on(BRIDGE_IP)?,
            kcm: free_port_on(lo)?,
            scheduler: free_port_on(lo)?,
        })
    }
}

/// The static-token identities of a cluster: the administrator, the controllers, kube-proxy,
/// and one per node index up to [`super::MAX_NODES`].
pub(crate) struct Identities {
    pub admin: Identity,
    pub controller_manager: Identity,
    pub scheduler: Identity,
    pub proxy: Identity,
    pub nodes: Vec<Identity>,
}

impl Identities {
    pub fn new(admin_token: &str) -> Self {
        let mut admin = Identity::new("admin", "system:masters");
        admin.token = admin_token.to_string();
        Self {
            admin,
            controller_manager: Identity::new("system:kube-controller-manager", ""),
            scheduler: Identity::new("system:kube-scheduler", ""),
            proxy: Identity::new("system:kube-proxy", ""),
            nodes: (1..=super::MAX_NODES)
                .map(|i| {
                    Identity::new(
                        &format!("system:node:{}", super::node::node_name(i)),
                        "system:nodes",
                    )
                })
                .collect(),
        }
    }

    fn all(&self) -> Vec<Identity> {
        let mut v = vec![
            self.admin.clone(),
            self.controller_manager.clone(),
            self.scheduler.clone(),
            self.proxy.clone(),
        ];
        v.extend(self.nodes.iter().cloned());
        v
    }
}

/// Writes a kubeconfig for `id` to `<dir>/<file>.kubeconfig`.
pub(crate) fn write_kubeconfig(
    dir: &Path,
    file: &str,
    api: &str,
    ca: &Path,
    id: &Identity,
) -> Result<PathBuf> {
    let path = dir.join(format!("{file}.kubeconfig"));
    fs::write(&path, token_kubeconfig(api, ca, &id.user, &id.token))?;
    Ok(path)
}

impl Ctx {
    /// The node bridge and the host's address on it (where the API server listens).
    fn host_network(&self) -> Result<()> {
        let used = ip(None, &["-o", "addr", "show", "to", NODES_NET])?;
        if !used.trim().is_empty() {
            bail!(
                "{NODES_NET} is in use on this machine already ({}): the test cluster's nodes need it",
                used.trim()
            );
        }
        self.update(|r| r.bridge = Some(NODES_BRIDGE.to_string()))?;
        ip_batch(
            None,
            &[
                format!("link add {NODES_BRIDGE} type bridge"),
                format!("addr add {BRIDGE_IP}/24 dev {NODES_BRIDGE}"),
                format!("link set {NODES_BRIDGE} up"),
            ],
        )?;
        self.bridge_forwarding()
    }

    /// Forwarding on the node bridge only: a balancer node encapsulates to another node through
    /// its next hop, the host's address on the bridge, which routes the packet back out of the
    /// bridge (one L2 network, one next-hop MAC for every real). `ip_forward` and every other
    /// interface stay as they were; the setting is the bridge's own and goes with it. Recorded
    /// (its value before: 0 on a new device unless `conf/default` says otherwise) before it is
    /// written.
    fn bridge_forwarding(&self) -> Result<()> {
        let path = bridge_forwarding_path();
        let before = fs::read_to_string(&path)
            .with_context(|| format!("reading {path}"))?
            .trim()
            .to_string();
        self.update(|r| {
            r.sysctls.entry(path.clone()).or_insert(before);
        })?;
        fs::write(&path, "1").with_context(|| format!("writing 1 to {path}"))
    }

    /// The kubeconfig of node `name` (its own identity), written into its directory.
    pub(crate) fn node_kubeconfig(&self, name: &str, dir: &Path) -> Result<PathBuf> {
        let id = self
            .ids
            .nodes
            .iter()
            .find(|id| id.user == format!("system:node:{name}"))
            .with_context(|| {
                format!(
                    "no identity for {name} (at most {} nodes)",
                    super::MAX_NODES
                )
            })?;
        let rec = self.record();
        write_kubeconfig(
            dir,
            "kubelet",
            &rec.api_url,
            &rec.dir.join("pki/ca.crt"),
            id,
        )
    }

    /// Starts the control plane and `nodes` nodes and waits until they are Ready.
    pub(crate) fn start_cluster(
        self: &Arc<Self>,
        rt: &tokio::runtime::Runtime,
        nodes: &[NodeOptions],
    ) -> Result<(StartTimes, Vec<NodeInfo>)> {
        let t0 = Instant::now();
        let mut times = StartTimes::default();
        let d = self.record().dir.clone();
        for sub in ["pki", "etcd", "kcm", "scheduler"] {
            fs::create_dir_all(d.join(sub))?;
        }
        self.host_network()?;
        write_pki(&d)?;
        fs::write(d.join("pki/tokens.csv"), token_file(&self.ids.all()))?;
        let ports = Ports::pick()?;
        let api = format!("https://{BRIDGE_IP}:{}", ports.api);
        let ca = d.join("pki/ca.crt");
        let kubeconfig = write_kubeconfig(&d, "admin", &api, &ca, &self.ids.admin)?;
        let proxy = write_kubeconfig(&d, "kube-proxy", &api, &ca, &self.ids.proxy)?;
        debug_assert_eq!(proxy, self.proxy_kubeconfig);
        self.update(|r| {
            r.api_url = api.clone();
            r.kubeconfig = kubeconfig.clone();
        })?;

        self.start_etcd(rt, &ports)?;
        times.etcd = t0.elapsed();
        let client = rt.block_on(client_from_kubeconfig(&kubeconfig))?;
        self.start_apiserver(rt, &ports, &client)?;
        times.apiserver = t0.elapsed();
        self.start_controllers(&ports)?;
        let mut infos = Vec::new();
        for (i, o) in nodes.iter().enumerate() {
            infos.push(self.start_node(rt, i + 1, o)?);
        }
        times.nodes_started = t0.elapsed();
        rt.block_on(async {
            for n in &infos {
                self.wait_node_ready(&client, n).await?;
            }
            times.nodes_ready = t0.elapsed();
            let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
            self.procs
                .wait_until("the default service account", START_TIMEOUT, POLL, || {
                    let sas = sas.clone();
                    async move { Ok(sas.get_opt("default").await?.is_some()) }
                })
                .await
        })?;
        times.total = t0.elapsed();
        Ok((times, infos))
    }

    /// Waits until node `n` is registered and Ready and its kube-proxy is healthy.
    pub(crate) async fn wait_node_ready(&self, client: &Client, n: &NodeInfo) -> Result<()> {
        let nodes: Api<Node> = Api::all(client.clone());
        let name = n.name.clone();
        self.procs
            .wait_until(&format!("{name} to be Ready"), START_TIMEOUT, POLL, || {
                let (nodes, name) = (nodes.clone(), name.clone());
                async move { Ok(nodes.get_opt(&name).await?.as_ref().is_some_and(node_ready)) }
            })
            .await?;
        let proxy: SocketAddr = (n.ip, PROXY_HEALTHZ_PORT).into();
        self.procs
            .wait_until(
                &format!("kube-proxy of {name} /healthz"),
                START_TIMEOUT,
                POLL,
                || async move { Ok(http_get(proxy, "/healthz").is_some_and(|(s, _)| s == 200)) },
            )
            .await
    }

    fn start_etcd(&self, rt: &tokio::runtime::Runtime, ports: &Ports) -> Result<()> {
        let d = self.record().dir;
        let mut cmd = Command::new(&self.bins.etcd);
        cmd.args(etcd_args(
            "node",
            &d.join("etcd"),
            ports.etcd,
            ports.etcd_peer,
            true,
        ));
        self.spawn("", "etcd", &mut cmd, None)?;
        let addr: SocketAddr = ([127, 0, 0, 1], ports.etcd).into();
        rt.block_on(
            self.procs
                .wait_until("etcd", START_TIMEOUT, POLL, || async move {
                    Ok(http_get(addr, "/health").is_some_and(|(s, _)| s == 200))
                }),
        )
    }

    fn start_apiserver(
        &self,
        rt: &tokio::runtime::Runtime,
        ports: &Ports,
        client: &Client,
    ) -> Result<()> {
        let pki = self.record().dir.join("pki");
        let p = |f: &str| pki.join(f).display().to_string();
        let mut cmd = Command::new(&self.bins.apiserver);
        cmd.args([
            format!("--etcd-servers=http://127.0.0.1:{}", ports.etcd),
            format!("--bind-address={BRIDGE_IP}"),
            format!("--advertise-address={BRIDGE_IP}"),
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
        ]);
        self.spawn("", "kube-apiserver", &mut cmd, None)?;
        rt.block_on(
            self.procs
                .wait_until("kube-apiserver /readyz", START_TIMEOUT, POLL, || {
                    let c = client.clone();
                    async move {
                        let req = http::Request::get("/readyz").body(Vec::new())?;
                        Ok(c.request_text(req).await?.trim() == "ok")
                    }
                }),
        )
    }

    /// Controller manager (a node that stops reporting is NotReady after [`NODE_GRACE`]) and
    /// scheduler.
    fn start_controllers(&self, ports: &Ports) -> Result<()> {
        let rec = self.record();
        let (d, api, ca) = (&rec.dir, &rec.api_url, rec.dir.join("pki/ca.crt"));
        let pki = d.join("pki");
        let kc = write_kubeconfig(
            d,
            "kube-controller-manager",
            api,
            &ca,
            &self.ids.controller_manager,
        )?
        .display()
        .to_string();
        let mut cmd = Command::new(&self.bins.controller_manager);
        cmd.args([
            format!("--kubeconfig={kc}"),
            format!("--authentication-kubeconfig={kc}"),
            format!("--authorization-kubeconfig={kc}"),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={}", ports.kcm),
            "--port=0".into(),
            "--leader-elect=false".into(),
            "--use-service-account-credentials=true".into(),
            format!(
                "--service-account-private-key-file={}",
                pki.join("sa.key").display()
            ),
            format!("--root-ca-file={}", pki.join("ca.crt").display()),
            format!("--cert-dir={}", d.join("kcm").display()),
            "--allocate-node-cidrs=false".into(),
            "--node-monitor-period=2s".into(),
            format!("--node-monitor-grace-period={}s", NODE_GRACE.as_secs()),
            "--profiling=false".into(),
        ]);
        self.spawn("", "kube-controller-manager", &mut cmd, None)?;
        let kc = write_kubeconfig(d, "kube-scheduler", api, &ca, &self.ids.scheduler)?
            .display()
            .to_string();
        let mut cmd = Command::new(&self.bins.scheduler);
        cmd.args([
            format!("--kubeconfig={kc}"),
            format!("--authentication-kubeconfig={kc}"),
            format!("--authorization-kubeconfig={kc}"),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={}", ports.scheduler),
            "--port=0".into(),
            "--leader-elect=false".into(),
            format!("--cert-dir={}", d.join("scheduler").display()),
            "--profiling=false".into(),
        ]);
        self.spawn("", "kube-scheduler", &mut cmd, None)?;
        Ok(())
    }
}

/// `ctr -n k8s.io images import` of `image` into the containerd at `socket`, checked.
pub(crate) fn import_image(ctr: &Path, socket: &Path, image: &ImageRef) -> Result<()> {
    let ctr_cmd = || {
        let mut c = Command::new(ctr);
        c.arg("--address").arg(socket).args(["-n", "k8s.io"]);
        c
    };
    let out = ctr_cmd()
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
    let list = ctr_cmd().args(["images", "ls", "-q"]).output()?;
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

/// The node bridge's own IPv4 forwarding switch (`ip_forward` is every interface's).
pub(crate) fn bridge_forwarding_path() -> String {
    format!("/proc/sys/net/ipv4/conf/{NODES_BRIDGE}/forwarding")
}
