//! Starting a cluster, one component after the other: node address and bpffs, certificates,
//! etcd, kube-apiserver, containerd (and the images), controller manager and scheduler,
//! kubelet, kube-proxy; then waiting until the node is Ready, the `default` service account
//! exists and kube-proxy is healthy. Every process and every host change goes into the record
//! before (or as) it happens.

use std::{
    fs, io,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::{Api, Client};

use super::binaries::Binaries;
use super::config;
use super::host::{dir_entries, is_bpffs, top_mount};
use super::images::ImageRef;
use super::pki::{Identity, token_file, write_pki};
use super::record::{ProcRecord, Record, proc_record};
use super::{BPFFS, ClusterOptions, NODE_IP, NODE_NAME, SERVICE_CIDR, StartTimes, node_ready};
use crate::netns::ip;
use crate::supervise::{
    SpawnOptions, Supervisor, client_from_kubeconfig, etcd_args, free_port_on, http_get,
    token_kubeconfig,
};

const START_TIMEOUT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(100);

/// Ports, all picked free.
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

impl Ports {
    fn pick() -> Result<Self> {
        let lo = Ipv4Addr::LOCALHOST;
        Ok(Ports {
            etcd: free_port_on(lo)?,
            etcd_peer: free_port_on(lo)?,
            api: free_port_on(NODE_IP)?,
            kcm: free_port_on(lo)?,
            scheduler: free_port_on(lo)?,
            kubelet: free_port_on(NODE_IP)?,
            kubelet_healthz: free_port_on(lo)?,
            proxy_healthz: free_port_on(lo)?,
            proxy_metrics: free_port_on(lo)?,
        })
    }
}

/// The kubeconfigs of the components.
struct Kubeconfigs {
    kubelet: PathBuf,
    controller_manager: PathBuf,
    scheduler: PathBuf,
    proxy: PathBuf,
}

/// The cluster while it starts (run on the thread that lives as long as the cluster).
pub(crate) struct Starter {
    pub rec: Record,
    pub bins: Binaries,
    pub procs: Supervisor,
    pub detached: bool,
    pub admin_token: String,
    pub times: StartTimes,
}

impl Starter {
    fn dir(&self) -> &Path {
        &self.rec.dir
    }

    /// Starts a process and records it.
    fn spawn(&mut self, name: &str, cmd: &mut Command) -> Result<()> {
        let opts = SpawnOptions {
            detached: self.detached,
            ..Default::default()
        };
        let pid = self.procs.spawn(name, cmd, &opts)?;
        let rec = proc_record(name, pid).unwrap_or(ProcRecord {
            name: name.to_string(),
            pid,
            start: 0,
        });
        self.rec.procs.push(rec);
        self.rec.save()
    }

    async fn wait<F, Fut>(&mut self, what: &str, ready: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<bool>>,
    {
        self.procs
            .wait_until(what, START_TIMEOUT, POLL, ready)
            .await
    }

    pub(crate) async fn client(&self) -> Result<Client> {
        client_from_kubeconfig(&self.rec.kubeconfig).await
    }

    pub(crate) async fn run(&mut self, opts: &ClusterOptions) -> Result<()> {
        let t0 = Instant::now();
        let d = self.dir().to_path_buf();
        for sub in [
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
        self.add_node_address()?;
        self.mount_bpffs()?;
        write_pki(&d)?;
        let ports = Ports::pick()?;
        let api = format!("https://{NODE_IP}:{}", ports.api);
        self.rec.api_url = api.clone();
        let kcs = self.identities(&api)?;

        self.start_etcd(&ports).await?;
        self.times.etcd = t0.elapsed();
        let client = self.start_apiserver(&ports).await?;
        self.times.apiserver = t0.elapsed();
        self.start_containerd(&opts.pause.name).await?;
        self.times.containerd = t0.elapsed();
        self.import(&opts.pause)?;
        for image in &opts.images {
            self.import(image)?;
        }
        self.times.images = t0.elapsed();
        self.start_controllers(&ports, &kcs)?;
        self.start_kubelet(&ports, &kcs, &opts.pause.name)?;
        self.start_proxy(&ports, &kcs)?;

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
            Ok(http_get(proxy_addr, "/healthz").is_some_and(|(s, _)| s == 200))
        })
        .await?;
        self.times.total = t0.elapsed();
        Ok(())
    }

    /// The node address on `lo` (recorded before it is added).
    fn add_node_address(&mut self) -> Result<()> {
        let present = ip(None, &["-o", "addr", "show", "dev", "lo"])?;
        if !present.contains(&format!("{NODE_IP}/32")) {
            self.rec.node_ip_added = true;
            self.rec.save()?;
            ip(
                None,
                &["addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"],
            )?;
        }
        Ok(())
    }

    /// A bpffs for the agents when the host has none at [`BPFFS`]; its mount id is recorded,
    /// so teardown unmounts that mount and nothing else.
    fn mount_bpffs(&mut self) -> Result<()> {
        if is_bpffs(Path::new(BPFFS)) {
            return Ok(());
        }
        fs::create_dir_all(BPFFS)?;
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
            bail!(
                "mounting a bpffs at {BPFFS}: {}",
                io::Error::last_os_error()
            );
        }
        self.rec.bpffs_mount = top_mount(Path::new(BPFFS)).map(|m| m.id);
        self.rec.bpffs_initial = dir_entries(Path::new(BPFFS)).unwrap_or_default();
        self.rec.save()
    }

    /// One static token per component, their kubeconfigs and the API server's token file.
    fn identities(&mut self, api: &str) -> Result<Kubeconfigs> {
        let d = self.dir().to_path_buf();
        let mut admin = Identity::new("admin", "system:masters");
        admin.token = self.admin_token.clone();
        let ids = [
            admin,
            Identity::new(&format!("system:node:{NODE_NAME}"), "system:nodes"),
            Identity::new("system:kube-controller-manager", ""),
            Identity::new("system:kube-scheduler", ""),
            Identity::new("system:kube-proxy", ""),
        ];
        fs::write(d.join("pki/tokens.csv"), token_file(&ids))?;
        let ca = d.join("pki/ca.crt");
        let kc = |file: &str, id: &Identity| -> Result<PathBuf> {
            let path = d.join(format!("{file}.kubeconfig"));
            fs::write(&path, token_kubeconfig(api, &ca, &id.user, &id.token))?;
            Ok(path)
        };
        self.rec.kubeconfig = kc("admin", &ids[0])?;
        let kcs = Kubeconfigs {
            kubelet: kc("kubelet", &ids[1])?,
            controller_manager: kc("kube-controller-manager", &ids[2])?,
            scheduler: kc("kube-scheduler", &ids[3])?,
            proxy: kc("kube-proxy", &ids[4])?,
        };
        self.rec.save()?;
        Ok(kcs)
    }

    async fn start_etcd(&mut self, ports: &Ports) -> Result<()> {
        let d = self.dir().to_path_buf();
        let etcd = self.bins.etcd.clone();
        self.spawn(
            "etcd",
            Command::new(etcd).args(etcd_args(
                "node",
                &d.join("etcd"),
                ports.etcd,
                ports.etcd_peer,
                true,
            )),
        )?;
        let addr: SocketAddr = ([127, 0, 0, 1], ports.etcd).into();
        self.wait("etcd", || async move {
            Ok(http_get(addr, "/health").is_some_and(|(s, _)| s == 200))
        })
        .await
    }

    async fn start_apiserver(&mut self, ports: &Ports) -> Result<Client> {
        let pki = self.dir().join("pki");
        let p = |f: &str| pki.join(f).display().to_string();
        let apiserver = self.bins.apiserver.clone();
        self.spawn(
            "kube-apiserver",
            Command::new(apiserver).args([
                format!("--etcd-servers=http://127.0.0.1:{}", ports.etcd),
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
        let c = client.clone();
        self.wait("kube-apiserver /readyz", move || {
            let c = c.clone();
            async move {
                let req = http::Request::get("/readyz").body(Vec::new())?;
                Ok(c.request_text(req).await?.trim() == "ok")
            }
        })
        .await?;
        Ok(client)
    }

    /// containerd, with the CNI configuration written first (it is read when the CRI plugin
    /// starts; a file moved in later was not picked up).
    async fn start_containerd(&mut self, pause: &str) -> Result<()> {
        let d = self.dir().to_path_buf();
        fs::write(
            d.join("cni/net.d/10-marklb.conflist"),
            config::cni(&d.join("cni/ipam")),
        )?;
        let paths = config::ContainerdPaths {
            dir: &d,
            socket: &self.rec.containerd_socket,
            runc: &self.bins.runc,
            cni_bin: &self.bins.cni_bin,
        };
        fs::write(d.join("containerd.toml"), config::containerd(&paths, pause))?;
        let containerd = self.bins.containerd.clone();
        let path_env = self.bins.node_path_env();
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
        .await
    }

    fn import(&self, image: &ImageRef) -> Result<()> {
        import_image(&self.bins.ctr, &self.rec.containerd_socket, image)
    }

    fn start_controllers(&mut self, ports: &Ports, kcs: &Kubeconfigs) -> Result<()> {
        let d = self.dir().to_path_buf();
        let pki = d.join("pki");
        let kcm = self.bins.controller_manager.clone();
        let kc = kcs.controller_manager.display().to_string();
        self.spawn(
            "kube-controller-manager",
            Command::new(kcm).args([
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
                "--profiling=false".into(),
            ]),
        )?;
        let sched = self.bins.scheduler.clone();
        let kc = kcs.scheduler.display().to_string();
        self.spawn(
            "kube-scheduler",
            Command::new(sched).args([
                format!("--kubeconfig={kc}"),
                format!("--authentication-kubeconfig={kc}"),
                format!("--authorization-kubeconfig={kc}"),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={}", ports.scheduler),
                "--port=0".into(),
                "--leader-elect=false".into(),
                format!("--cert-dir={}", d.join("scheduler").display()),
                "--profiling=false".into(),
            ]),
        )
    }

    fn start_kubelet(&mut self, ports: &Ports, kcs: &Kubeconfigs, pause: &str) -> Result<()> {
        let d = self.dir().to_path_buf();
        fs::write(
            d.join("kubelet.yaml"),
            config::kubelet(ports.kubelet, ports.kubelet_healthz),
        )?;
        let kubelet = self.bins.kubelet.clone();
        let path_env = self.bins.node_path_env();
        let sock = self.rec.containerd_socket.clone();
        self.spawn(
            "kubelet",
            Command::new(kubelet)
                .args([
                    format!("--config={}", d.join("kubelet.yaml").display()),
                    format!("--kubeconfig={}", kcs.kubelet.display()),
                    "--container-runtime=remote".into(),
                    format!("--container-runtime-endpoint=unix://{}", sock.display()),
                    format!("--root-dir={}", d.join("kubelet").display()),
                    format!("--cert-dir={}", d.join("kubelet-pki").display()),
                    format!("--node-ip={NODE_IP}"),
                    format!("--hostname-override={NODE_NAME}"),
                    format!("--pod-infra-container-image={pause}"),
                    "--v=2".into(),
                ])
                .env("PATH", &path_env),
        )
    }

    fn start_proxy(&mut self, ports: &Ports, kcs: &Kubeconfigs) -> Result<()> {
        let d = self.dir().to_path_buf();
        fs::write(
            d.join("kube-proxy.yaml"),
            config::kube_proxy(&kcs.proxy, ports.proxy_healthz, ports.proxy_metrics),
        )?;
        let proxy = self.bins.proxy.clone();
        let path_env = self.bins.node_path_env();
        self.spawn(
            "kube-proxy",
            Command::new(proxy)
                .arg(format!("--config={}", d.join("kube-proxy.yaml").display()))
                .env("PATH", &path_env),
        )
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
