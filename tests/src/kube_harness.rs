//! Real Kubernetes API servers for the tests, on loopback, built by `scripts/setup-k8s.sh`.
//!
//! Two flavors:
//! - [`Flavor::Kube120`]: etcd + the full kube-apiserver 1.20.2 (namespaces, apps, RBAC with the
//!   real authorizer, coordination, CRDs, server-side apply, status). Static token file with an
//!   administrator in `system:masters`, RBAC authorization, a service-account key pair. No
//!   controller manager, scheduler or kubelet: no garbage collection, no pods. No CEL in CRDs.
//! - [`Flavor::Current`]: etcd + apiextensions-apiserver 0.36 (today's CRD semantics: structural
//!   schemas, CEL `x-kubernetes-validations` with cost limits, server-side apply, status, watch).
//!   Only `apiextensions.k8s.io` and the CRD groups; every request is an administrator.
//!
//! [`KubeServer::start`] starts etcd and the server on free loopback ports in a temporary
//! directory, waits until `/readyz` is ok, writes a kubeconfig file (for `kubectl`/Helm) and hands
//! out a [`kube::Client`]. Dropping the [`KubeServer`] stops the processes by PID (their own process
//! groups; they also die with the test process through `PR_SET_PDEATHSIG`) and removes the
//! directory, also when the test panics.
//!
//! When `scripts/setup-k8s.sh` recorded a part as unavailable (a Debian suite could not be
//! reached), [`KubeServer::start_or_skip`] / [`kube_server_or_skip!`](crate::kube_server_or_skip)
//! print a `SKIP` line with the reason and the test returns; with `MARKLB_CLUSTER_REQUIRED=1`
//! (CI) they fail instead. When the binaries are simply missing (set-up never ran), starting
//! fails: the test fails. The processes are run by [`crate::supervise`].

use std::fmt;
use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams, TypeMeta};
use kube::config::KubeConfigOptions;
use kube::core::GroupVersionKind;
use kube::discovery::Scope;
use serde::Deserialize;

use crate::supervise::{
    SpawnOptions, Supervisor, client_from_kubeconfig, etcd_args, free_port_on, http_get,
    service_account_keys, token_kubeconfig,
};

/// Environment variable overriding the cache directory of `scripts/setup-k8s.sh`.
pub const CACHE_ENV: &str = "MARKLB_K8S_CACHE";
/// Default cache directory of `scripts/setup-k8s.sh`.
pub const DEFAULT_CACHE: &str = "/var/cache/marklb/k8s";
/// Set to 1 to keep the temporary directory (logs, etcd data) of a server whose test panicked.
pub const KEEP_ENV: &str = "MARKLB_K8S_KEEP";
/// Set to 1 (CI does) to turn every SKIP for a set-up part that is unavailable into a failure.
pub const REQUIRED_ENV: &str = "MARKLB_CLUSTER_REQUIRED";

const START_TIMEOUT: Duration = Duration::from_secs(90);

/// Which API server to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// kube-apiserver 1.20.2 (full API, RBAC; no CRD CEL rules).
    Kube120,
    /// apiextensions-apiserver 0.36 (current CRD validation incl. CEL; no core/apps groups).
    Current,
}

impl Flavor {
    /// The part of `scripts/setup-k8s.sh` that builds this server.
    pub fn part(self) -> &'static str {
        match self {
            Flavor::Kube120 => "kube-1.20",
            Flavor::Current => "apiextensions",
        }
    }

    fn binary(self) -> &'static str {
        match self {
            Flavor::Kube120 => "kube-apiserver",
            Flavor::Current => "apiextensions-apiserver",
        }
    }
}

impl fmt::Display for Flavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Flavor::Kube120 => "kube-apiserver 1.20",
            Flavor::Current => "apiextensions-apiserver 0.36",
        })
    }
}

/// The cache directory of `scripts/setup-k8s.sh`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os(CACHE_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE))
}

/// What the set-up left for a flavor.
#[derive(Clone, Debug)]
pub enum Availability {
    /// Both binaries exist.
    Available { server: PathBuf, etcd: PathBuf },
    /// The set-up recorded that it could not build them, and why.
    Unavailable(String),
}

/// Whether the binaries of `flavor` exist, or why the set-up could not build them.
/// An error means that the set-up has not run (or failed): tests must fail then, not skip.
pub fn availability(flavor: Flavor) -> Result<Availability> {
    let cache = cache_dir();
    if let Some(reason) = unavailable_reason(&["etcd", flavor.part()]) {
        return Ok(Availability::Unavailable(reason));
    }
    let server = cache.join(flavor.part()).join("bin").join(flavor.binary());
    let etcd = cache.join("etcd/bin/etcd");
    for bin in [&server, &etcd] {
        if !bin.is_file() {
            bail!(
                "{} is missing and no UNAVAILABLE-* reason was recorded in {}: run `bash scripts/setup-k8s.sh` first",
                bin.display(),
                cache.display()
            );
        }
    }
    Ok(Availability::Available { server, etcd })
}

/// Why the set-up could not make one of `parts` (its `UNAVAILABLE-<part>` file in the cache,
/// and where that file is), if it could not.
pub fn unavailable_reason(parts: &[&str]) -> Option<String> {
    parts.iter().find_map(|part| {
        let mark = cache_dir().join(format!("UNAVAILABLE-{part}"));
        let reason = fs::read_to_string(&mark).ok()?;
        Some(format!("{} ({})", reason.trim(), mark.display()))
    })
}

/// Prints a line on the test process's real stderr (not captured by the test harness).
pub fn report(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

/// A running etcd + API server. Dropping it stops both and removes its directory.
pub struct KubeServer {
    flavor: Flavor,
    url: String,
    token: String,
    kubeconfig: PathBuf,
    startup: Duration,
    procs: Supervisor,
    /// The API server's binary and arguments, to start it again ([`KubeServer::restart_server`]).
    server_cmd: (PathBuf, Vec<String>),
    // Last: removed after the processes are gone.
    dir: Option<tempfile::TempDir>,
}

impl fmt::Debug for KubeServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeServer")
            .field("flavor", &self.flavor)
            .field("url", &self.url)
            .field("dir", &self.dir().display())
            .finish()
    }
}

/// Starts a server of `flavor`, or prints `SKIP <test>: <reason>` and returns from the test when
/// the set-up recorded it as unavailable. Use inside an `async` test returning `()`.
#[macro_export]
macro_rules! kube_server_or_skip {
    ($flavor:expr) => {
        match $crate::kube_harness::KubeServer::start_or_skip($flavor, module_path!()).await {
            Some(server) => server,
            None => return,
        }
    };
}

/// Whether a set-up part that cannot be set up must fail the tests instead of skipping them
/// (`MARKLB_CLUSTER_REQUIRED=1`, set by CI).
pub fn setup_required() -> bool {
    std::env::var(REQUIRED_ENV).as_deref() == Ok("1")
}

/// Prints `SKIP <test>: <what> not available: <reason>`, or panics when [`setup_required`].
pub fn skip_or_fail(test: &str, what: &str, reason: &str) {
    let test = test_name(test);
    if setup_required() {
        panic!("{test}: {what} cannot run here and {REQUIRED_ENV}=1: {reason}");
    }
    report(&format!("SKIP {test}: {what} not available: {reason}"));
}

impl KubeServer {
    /// Starts etcd and the API server; fails if the binaries are missing or it does not start.
    pub async fn start(flavor: Flavor) -> Result<KubeServer> {
        match availability(flavor)? {
            Availability::Available { server, etcd } => {
                let mut last = None;
                for _attempt in 0..3 {
                    match Self::try_start(flavor, &server, &etcd).await {
                        Ok(s) => return Ok(s),
                        // Free ports are picked by binding and closing: another process can take one
                        // in between. Retry with new ports then.
                        Err(e) if format!("{e:#}").contains("address already in use") => {
                            last = Some(e)
                        }
                        Err(e) => return Err(e),
                    }
                }
                Err(last.unwrap())
            }
            Availability::Unavailable(reason) => {
                bail!("{flavor} is unavailable on this machine: {reason}")
            }
        }
    }

    /// Like [`start`](Self::start), but `None` (after printing `SKIP <test>: <reason>`) when the
    /// set-up recorded the server as unavailable. Panics when it should run but does not start,
    /// and when it is unavailable but [`setup_required`].
    pub async fn start_or_skip(flavor: Flavor, test: &str) -> Option<KubeServer> {
        match availability(flavor) {
            Ok(Availability::Unavailable(reason)) => {
                skip_or_fail(test, &flavor.to_string(), &reason);
                None
            }
            Ok(Availability::Available { .. }) => match Self::start(flavor).await {
                Ok(s) => Some(s),
                Err(e) => panic!("starting {flavor} failed: {e:#}"),
            },
            Err(e) => panic!("{flavor}: {e:#}"),
        }
    }

    async fn try_start(flavor: Flavor, server_bin: &Path, etcd_bin: &Path) -> Result<KubeServer> {
        let t0 = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix(&format!("marklb-{}-", flavor.part()))
            .tempdir()
            .context("creating the temporary directory")?;
        let d = dir.path().to_path_buf();
        let mut me = KubeServer {
            flavor,
            url: String::new(),
            token: random_hex(24),
            kubeconfig: d.join("kubeconfig"),
            startup: Duration::ZERO,
            procs: Supervisor::new(&d)?,
            server_cmd: (server_bin.to_path_buf(), Vec::new()),
            dir: Some(dir),
        };
        let spawn = SpawnOptions {
            cwd: Some(d.clone()),
            ..Default::default()
        };

        let (etcd_port, peer_port, api_port) = (free_port()?, free_port()?, free_port()?);
        me.procs.spawn(
            "etcd",
            Command::new(etcd_bin).args(etcd_args(
                "default",
                &d.join("etcd"),
                etcd_port,
                peer_port,
                false,
            )),
            &spawn,
        )?;
        let etcd_addr = SocketAddr::from(([127, 0, 0, 1], etcd_port));
        me.wait_for("etcd", || async move {
            Ok(http_get(etcd_addr, "/health")
                .is_some_and(|(_, b)| b.contains("\"health\":\"true\"")))
        })
        .await?;

        let pki = d.join("pki");
        let mut args = vec![
            format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={api_port}"),
            format!("--cert-dir={}", pki.display()),
        ];
        if flavor == Flavor::Kube120 {
            fs::write(
                d.join("tokens.csv"),
                format!("{},admin,admin-uid,\"system:masters\"\n", me.token),
            )?;
            service_account_keys(&d)?;
            args.extend([
                "--insecure-port=0".into(),
                format!("--token-auth-file={}", d.join("tokens.csv").display()),
                "--authorization-mode=Node,RBAC".into(),
                format!("--service-account-key-file={}", d.join("sa.pub").display()),
                format!(
                    "--service-account-signing-key-file={}",
                    d.join("sa.key").display()
                ),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                "--service-cluster-ip-range=10.96.0.0/16".into(),
                "--allow-privileged=true".into(),
                "--enable-admission-plugins=NodeRestriction".into(),
                "--profiling=false".into(),
            ]);
        }
        me.procs.spawn(
            flavor.binary(),
            Command::new(server_bin).args(&args),
            &spawn,
        )?;
        me.server_cmd.1 = args;
        me.url = format!("https://127.0.0.1:{api_port}");

        // The self-signed serving certificate (server certificate, then its CA) is written before
        // the server listens. Wait for both blocks, not for the file: it exists (empty, or
        // with the first block only) while the server is still writing it (CI once read it
        // empty: "no certificate in .../apiserver.crt").
        let cert = pki.join("apiserver.crt");
        me.wait_for("the serving certificate and its CA", || {
            let complete = fs::read_to_string(&cert).is_ok_and(|pem| pem_blocks(&pem).len() >= 2);
            async move { Ok(complete) }
        })
        .await?;
        let pem = fs::read_to_string(&cert)?;
        let ca = pem_blocks(&pem)
            .last()
            .cloned()
            .ok_or_else(|| anyhow!("no certificate in {}", cert.display()))?;
        fs::write(d.join("ca.crt"), &ca)?;
        fs::write(
            &me.kubeconfig,
            token_kubeconfig(&me.url, &d.join("ca.crt"), "admin", &me.token),
        )?;

        let client = me.client().await?;
        me.wait_for("/readyz", || {
            let client = client.clone();
            async move {
                let req = http::Request::get("/readyz").body(Vec::new())?;
                Ok(client
                    .request_text(req)
                    .await
                    .is_ok_and(|t| t.trim() == "ok"))
            }
        })
        .await?;
        if flavor == Flavor::Kube120 {
            // Namespaces are created by a post-start loop; tests want them.
            for ns in ["default", "kube-system"] {
                let path = format!("/api/v1/namespaces/{ns}");
                me.wait_for(&format!("namespace {ns}"), || {
                    let client = client.clone();
                    let path = path.clone();
                    async move {
                        let req = http::Request::get(path).body(Vec::new())?;
                        Ok(client.request_text(req).await.is_ok())
                    }
                })
                .await?;
            }
        }
        me.startup = t0.elapsed();
        Ok(me)
    }

    async fn wait_for<F, Fut>(&mut self, what: &str, ready: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<bool>>,
    {
        self.procs
            .wait_until(what, START_TIMEOUT, Duration::from_millis(50), ready)
            .await
    }

    /// A new client for the server's administrator (built from the kubeconfig file).
    pub async fn client(&self) -> Result<Client> {
        client_from_kubeconfig(&self.kubeconfig).await
    }

    /// The kubeconfig file (for `kubectl --kubeconfig` / `KUBECONFIG`, Helm).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The administrator's bearer token (in `system:masters` on 1.20).
    pub fn token(&self) -> &str {
        &self.token
    }

    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    /// Time from the start of etcd to the server being ready.
    pub fn startup(&self) -> Duration {
        self.startup
    }

    /// The temporary directory (logs `<process>.log`, etcd data, kubeconfig, certificates).
    pub fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .expect("directory present until drop")
            .path()
    }

    /// PIDs of etcd and the server.
    pub fn pids(&self) -> Vec<u32> {
        self.procs.pids()
    }

    /// Resident memory of etcd + server in KiB (from /proc).
    pub fn rss_kib(&self) -> u64 {
        self.pids().into_iter().filter_map(rss_kib).sum()
    }

    /// The last `lines` lines of a process's log (`etcd`, `kube-apiserver`, `apiextensions-apiserver`).
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        self.procs.log_tail(name, lines)
    }

    /// Runs `kubectl` (from PATH) against this server; `None` when there is no kubectl.
    pub fn kubectl(&self, args: &[&str]) -> Option<std::process::Output> {
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .ok()
    }

    /// Stops the API server only (etcd keeps the data): clients see connections refused.
    pub fn stop_server(&self) {
        self.procs
            .stop_one(self.flavor.binary(), Duration::from_secs(5));
    }

    /// Starts the API server again after [`stop_server`](Self::stop_server): same port, same
    /// certificates, same etcd; returns once `/readyz` is ok.
    pub async fn restart_server(&mut self) -> Result<()> {
        let (bin, args) = self.server_cmd.clone();
        let spawn = SpawnOptions {
            cwd: Some(self.dir().to_path_buf()),
            ..Default::default()
        };
        self.procs
            .spawn(self.flavor.binary(), Command::new(bin).args(&args), &spawn)?;
        let client = self.client().await?;
        self.wait_for("/readyz after a restart", || {
            let client = client.clone();
            async move {
                let req = http::Request::get("/readyz").body(Vec::new())?;
                Ok(client
                    .request_text(req)
                    .await
                    .is_ok_and(|t| t.trim() == "ok"))
            }
        })
        .await
    }

    /// Stops the processes (SIGTERM to their groups, SIGKILL after 5 s) and removes the directory.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        // The server first, then etcd.
        self.procs.stop_all(Duration::from_secs(5));
        if let Some(dir) = self.dir.take()
            && std::thread::panicking()
            && std::env::var(KEEP_ENV).as_deref() == Ok("1")
        {
            report(&format!("kept {}", dir.keep().display()));
        }
    }
}

impl Drop for KubeServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Resident memory (VmRSS, KiB) of a process, from /proc.
pub fn rss_kib(pid: u32) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The cluster an end-to-end test runs against: the one `KUBECONFIG` names when it is set
/// (a real cluster), else a local server of the given flavor started here.
pub enum TestCluster {
    /// `KUBECONFIG` was set: its cluster, as it is.
    External { kubeconfig: PathBuf, client: Client },
    /// No cluster given: a local server (stopped when this is dropped).
    Local { server: KubeServer, client: Client },
}

impl TestCluster {
    /// `KUBECONFIG`'s cluster, or a local `flavor` server; `None` (after a SKIP line) when there
    /// is no `KUBECONFIG` and the set-up recorded the local server as unavailable.
    pub async fn from_env_or_local(flavor: Flavor, test: &str) -> Option<TestCluster> {
        if let Some(path) = std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) {
            let kubeconfig = std::env::split_paths(&path).next().unwrap_or_default();
            let config = kube::Config::from_kubeconfig(&KubeConfigOptions::default())
                .await
                .unwrap_or_else(|e| panic!("KUBECONFIG={}: {e}", kubeconfig.display()));
            let client = Client::try_from(config).expect("client from KUBECONFIG");
            return Some(TestCluster::External { kubeconfig, client });
        }
        let server = KubeServer::start_or_skip(flavor, test).await?;
        let client = server.client().await.expect("client of the local server");
        report(&format!(
            "{}: no KUBECONFIG, running against a local {flavor} at {}",
            test_name(test),
            server.url()
        ));
        Some(TestCluster::Local { server, client })
    }

    pub fn client(&self) -> Client {
        match self {
            TestCluster::External { client, .. } | TestCluster::Local { client, .. } => {
                client.clone()
            }
        }
    }

    /// A kubeconfig file for `kubectl`/Helm.
    pub fn kubeconfig(&self) -> &Path {
        match self {
            TestCluster::External { kubeconfig, .. } => kubeconfig,
            TestCluster::Local { server, .. } => server.kubeconfig(),
        }
    }

    /// The local server, when there is one.
    pub fn local(&self) -> Option<&KubeServer> {
        match self {
            TestCluster::Local { server, .. } => Some(server),
            TestCluster::External { .. } => None,
        }
    }
}

/// Server-side applies every document of a (multi-document) YAML text, in order, with
/// `field_manager` (forced); returns the objects as the server stored them. Kinds are resolved
/// through discovery (retried for a few seconds: a CRD just established may not be served yet).
pub async fn apply_yaml(
    client: &Client,
    yaml: &str,
    field_manager: &str,
) -> Result<Vec<DynamicObject>> {
    let mut out = Vec::new();
    for value in yaml_documents(yaml)? {
        out.push(apply_value(client, &value, field_manager).await?);
    }
    Ok(out)
}

/// The non-empty documents of a YAML text, as JSON values.
pub fn yaml_documents(yaml: &str) -> Result<Vec<serde_json::Value>> {
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_json::Value::deserialize(doc).context("parsing YAML")?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// The API (and whether it is namespaced) for an object's apiVersion/kind, through discovery.
pub async fn api_for(client: &Client, value: &serde_json::Value) -> Result<Api<DynamicObject>> {
    let types: TypeMeta = serde_json::from_value(value.clone()).context("apiVersion/kind")?;
    let gvk = GroupVersionKind::try_from(&types)?;
    let namespace = value["metadata"]["namespace"].as_str().unwrap_or("default");
    let deadline = Instant::now() + Duration::from_secs(10);
    let (resource, caps) = loop {
        match kube::discovery::pinned_kind(client, &gvk).await {
            Ok(found) => break found,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("discovering {gvk:?}")),
        }
    };
    Ok(match caps.scope {
        Scope::Namespaced => Api::namespaced_with(client.clone(), namespace, &resource),
        Scope::Cluster => Api::all_with(client.clone(), &resource),
    })
}

/// Server-side applies one object (forced).
pub async fn apply_value(
    client: &Client,
    value: &serde_json::Value,
    field_manager: &str,
) -> Result<DynamicObject> {
    let api = api_for(client, value).await?;
    let name = value["metadata"]["name"]
        .as_str()
        .ok_or_else(|| anyhow!("object without metadata.name"))?;
    let params = PatchParams::apply(field_manager).force();
    Ok(api.patch(name, &params, &Patch::Apply(value)).await?)
}

/// Creates one object (POST, as `kubectl create` does).
pub async fn create_value(client: &Client, value: &serde_json::Value) -> Result<DynamicObject> {
    let api = api_for(client, value).await?;
    let obj: DynamicObject = serde_json::from_value(value.clone()).context("object")?;
    Ok(api.create(&PostParams::default(), &obj).await?)
}

/// Waits until the CustomResourceDefinition `name` has condition Established=True.
pub async fn wait_crd_established(client: &Client, name: &str, timeout: Duration) -> Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let deadline = Instant::now() + timeout;
    loop {
        let crd = api.get(name).await?;
        let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
        if conditions
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("CRD {name} not Established after {timeout:?}: {conditions:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Applies CRD manifests and waits until each is Established; returns the CRD names.
pub async fn install_crds(client: &Client, yaml: &str) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for obj in apply_yaml(client, yaml, "marklb-tests").await? {
        let name = obj.metadata.name.clone().unwrap_or_default();
        wait_crd_established(client, &name, Duration::from_secs(30)).await?;
        names.push(name);
    }
    Ok(names)
}

/// The running test's name (libtest names its thread after it), else `fallback`.
pub fn test_name(fallback: &str) -> String {
    std::thread::current()
        .name()
        .filter(|n| *n != "main")
        .map(|n| format!("{fallback}::{n}"))
        .unwrap_or_else(|| fallback.to_string())
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> Result<u16> {
    free_port_on(std::net::Ipv4Addr::LOCALHOST)
}

/// `bytes` random bytes as hex (tokens, names).
pub(crate) fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

fn pem_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut cur: Option<String> = None;
    for line in text.lines() {
        if line.starts_with("-----BEGIN CERTIFICATE-----") {
            cur = Some(String::new());
        }
        if let Some(c) = cur.as_mut() {
            c.push_str(line);
            c.push('\n');
        }
        if line.starts_with("-----END CERTIFICATE-----") {
            blocks.extend(cur.take());
        }
    }
    blocks
}
