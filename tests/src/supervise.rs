//! Supervision of the long-running processes the Kubernetes harnesses start (etcd, API servers,
//! kubelet, containerd, ...): one helper for `kube_harness` and `cluster`.
//!
//! - [`Supervisor::spawn`] starts a process with its stdout and stderr in `<logs>/<name>.log`,
//!   stdin closed, in its own session (a Ctrl-C on the terminal reaches only the test, which
//!   stops its processes in order) and, unless detached, with `PR_SET_PDEATHSIG = SIGKILL`, so
//!   it dies with the thread that started it. [`SpawnOptions::enter`] runs a hook in the child
//!   before `exec` (the cluster enters a node's namespaces there).
//! - [`Supervisor::wait_until`] polls a readiness check, fails at once with the log tail of a
//!   process that exited, and after the timeout with every log tail and the last error.
//! - [`Supervisor::stop_all`] stops the children newest first: SIGTERM to their process group,
//!   SIGKILL after a grace period.
//! - [`etcd_args`], [`http_get`], [`free_port_on`], [`openssl`], [`token_kubeconfig`] and
//!   [`client_from_kubeconfig`]: what both harnesses need to run etcd and talk to an API server.
//!
//! Invariant: every child the supervisor started is either still in `children` (and reaped by
//! [`Supervisor::stop_all`]) or was handed back by [`Supervisor::detach_all`].

use std::{
    fs::{self, File},
    io::{self, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use kube::{
    Client,
    config::{KubeConfigOptions, Kubeconfig},
};

/// A hook run in the child between `fork` and `exec` (async-signal-safe calls only).
pub type PreExec = Arc<dyn Fn() -> io::Result<()> + Send + Sync>;

/// How to start one process.
#[derive(Clone, Default)]
pub struct SpawnOptions {
    /// Outlive this process (no parent-death signal).
    pub detached: bool,
    /// Run in the child before `exec`, after `setsid` (e.g. `setns` into a node's namespaces).
    pub enter: Option<PreExec>,
    /// Working directory (default: the log directory's parent).
    pub cwd: Option<PathBuf>,
}

/// The processes of one harness and their logs.
pub struct Supervisor {
    logs: PathBuf,
    children: Vec<(String, Child)>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("logs", &self.logs)
            .field("children", &self.names())
            .finish()
    }
}

impl Supervisor {
    /// A supervisor writing logs to `logs` (created).
    pub fn new(logs: &Path) -> Result<Self> {
        fs::create_dir_all(logs).with_context(|| format!("creating {}", logs.display()))?;
        Ok(Self {
            logs: logs.to_path_buf(),
            children: Vec::new(),
        })
    }

    /// The log of process `name`.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.logs.join(format!("{name}.log"))
    }

    /// Starts `cmd` as process `name`; its PID.
    pub fn spawn(&mut self, name: &str, cmd: &mut Command, opts: &SpawnOptions) -> Result<u32> {
        let log = File::create(self.log_path(name))?;
        let cwd = opts
            .cwd
            .clone()
            .unwrap_or_else(|| self.logs.parent().unwrap_or(&self.logs).to_path_buf());
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .current_dir(cwd);
        let detached = opts.detached;
        let enter = opts.enter.clone();
        // SAFETY: setsid, prctl and the hook (which promises async-signal-safe calls only) run
        // between fork and exec; nothing else does.
        unsafe {
            cmd.pre_exec(move || {
                libc::setsid();
                if !detached && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if let Some(enter) = &enter {
                    enter()?;
                }
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let pid = child.id();
        self.children.push((name.to_string(), child));
        Ok(pid)
    }

    /// Names of the processes started, in order.
    pub fn names(&self) -> Vec<String> {
        self.children.iter().map(|(n, _)| n.clone()).collect()
    }

    /// PIDs of the processes started, in order.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|(_, c)| c.id()).collect()
    }

    /// Fails with its log tail if a process exited.
    pub fn check_alive(&mut self) -> Result<()> {
        let mut dead = None;
        for (name, child) in &mut self.children {
            if let Some(status) = child.try_wait()? {
                dead = Some((name.clone(), status));
                break;
            }
        }
        if let Some((name, status)) = dead {
            bail!(
                "{name} exited ({status}) while starting; log tail:\n{}",
                self.log_tail(&name, 30)
            );
        }
        Ok(())
    }

    /// Polls `ready` every `poll` until it says true; fails when a process exits, or after
    /// `timeout` with the last error `ready` returned and every log tail.
    pub async fn wait_until<F, Fut>(
        &mut self,
        what: &str,
        timeout: Duration,
        poll: Duration,
        mut ready: F,
    ) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<bool>>,
    {
        let deadline = Instant::now() + timeout;
        let mut last_err = None;
        loop {
            self.check_alive()?;
            match ready().await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => last_err = Some(format!("{e:#}")),
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out after {timeout:?} waiting for {what} (last error: {}); logs:\n{}",
                    last_err.as_deref().unwrap_or("none"),
                    self.all_log_tails(12)
                );
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// The last `n` lines of process `name`'s log.
    pub fn log_tail(&self, name: &str, n: usize) -> String {
        log_tail(&self.log_path(name), n)
    }

    /// The last `n` lines of every process's log, headed by its name.
    pub fn all_log_tails(&self, n: usize) -> String {
        self.children
            .iter()
            .map(|(name, _)| format!("--- {name}:\n{}", self.log_tail(name, n)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Stops the processes, newest first: SIGTERM to each one's process group, SIGKILL after
    /// `grace`; reaps them.
    pub fn stop_all(&mut self, grace: Duration) {
        while let Some((_, mut child)) = self.children.pop() {
            let pid = child.id() as libc::pid_t;
            if matches!(child.try_wait(), Ok(None)) {
                // SAFETY: kill(2) of the process group (session) we created for this child.
                unsafe { libc::kill(-pid, libc::SIGTERM) };
                let deadline = Instant::now() + grace;
                while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                if matches!(child.try_wait(), Ok(None)) {
                    // SAFETY: as above.
                    unsafe { libc::kill(-pid, libc::SIGKILL) };
                }
            }
            let _ = child.wait();
        }
    }

    /// Reaps children that are gone already (their processes were stopped by PID elsewhere)
    /// and forgets the rest: they keep running, nobody waits for them.
    pub fn detach_all(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.try_wait();
        }
        self.children.clear();
    }

    /// Kills and reaps every child still running (after they were stopped by PID elsewhere).
    pub fn reap_all(&mut self) {
        for (_, mut c) in self.children.drain(..) {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

/// The last `n` lines of a file (empty when it cannot be read).
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The arguments of a single-member etcd on loopback ports `client` and `peer`, data in `data`.
/// `no_fsync` trades durability for speed (a test cluster's etcd).
pub fn etcd_args(name: &str, data: &Path, client: u16, peer: u16, no_fsync: bool) -> Vec<String> {
    let client_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let mut args = vec![
        format!("--name={name}"),
        format!("--data-dir={}", data.display()),
        format!("--listen-client-urls={client_url}"),
        format!("--advertise-client-urls={client_url}"),
        format!("--listen-peer-urls={peer_url}"),
        format!("--initial-advertise-peer-urls={peer_url}"),
        format!("--initial-cluster={name}={peer_url}"),
        "--log-level=warn".into(),
        "--logger=zap".into(),
    ];
    if no_fsync {
        args.push("--unsafe-no-fsync".into());
    }
    args
}

/// `GET path` over plain HTTP/1.0: the status and the body; None when it cannot connect or
/// the answer is not HTTP.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// A TCP port on `ip` that was free a moment ago.
pub fn free_port_on(ip: impl Into<IpAddr>) -> Result<u16> {
    Ok(TcpListener::bind((ip.into(), 0))?.local_addr()?.port())
}

/// Runs `openssl args...` in `cwd` (Debian package openssl); fails with its stderr.
pub fn openssl(args: &[&str], cwd: &Path) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .context("running openssl (Debian package openssl)")?;
    if !out.status.success() {
        bail!(
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Writes a service-account signing key pair, `sa.key` and `sa.pub` (EC P-256), into `dir`.
pub fn service_account_keys(dir: &Path) -> Result<()> {
    openssl(
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "sa.key",
        ],
        dir,
    )?;
    openssl(&["ec", "-in", "sa.key", "-pubout", "-out", "sa.pub"], dir)
}

/// A kubeconfig for `user` authenticating with a bearer `token` at `server`, trusting `ca`.
pub fn token_kubeconfig(server: &str, ca: &Path, user: &str, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: marklb\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: marklb\n  context:\n    cluster: marklb\n    user: {user}\n    namespace: default\ncurrent-context: marklb\n",
        ca = ca.display(),
    )
}

/// A client from a kubeconfig file.
pub async fn client_from_kubeconfig(kubeconfig: &Path) -> Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_arguments_name_one_member_on_the_given_ports() {
        let a = etcd_args("node", Path::new("/d"), 1, 2, true);
        assert!(a.contains(&"--initial-cluster=node=http://127.0.0.1:2".to_string()));
        assert!(a.contains(&"--listen-client-urls=http://127.0.0.1:1".to_string()));
        assert!(a.contains(&"--unsafe-no-fsync".to_string()));
        assert!(
            !etcd_args("x", Path::new("/d"), 1, 2, false)
                .contains(&"--unsafe-no-fsync".to_string())
        );
    }

    #[test]
    fn log_tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.log");
        fs::write(&p, "a\nb\nc\n").unwrap();
        assert_eq!(log_tail(&p, 2), "b\nc");
        assert_eq!(log_tail(&p, 10), "a\nb\nc");
        assert_eq!(log_tail(&dir.path().join("missing"), 3), "");
    }

    #[tokio::test]
    async fn a_process_that_exits_fails_the_wait_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Supervisor::new(&dir.path().join("logs")).unwrap();
        s.spawn(
            "quitter",
            Command::new("sh").args(["-c", "echo bye; exit 3"]),
            &SpawnOptions::default(),
        )
        .unwrap();
        let e = s
            .wait_until(
                "never",
                Duration::from_secs(10),
                Duration::from_millis(20),
                || async { Ok(false) },
            )
            .await
            .unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("quitter exited") && msg.contains("bye"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn stop_all_ends_and_reaps_a_running_process() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Supervisor::new(&dir.path().join("logs")).unwrap();
        let pid = s
            .spawn(
                "sleeper",
                Command::new("sleep").arg("60"),
                &SpawnOptions::default(),
            )
            .unwrap();
        s.wait_until(
            "running",
            Duration::from_secs(5),
            Duration::from_millis(10),
            || async { Ok(Path::new(&format!("/proc/{pid}")).exists()) },
        )
        .await
        .unwrap();
        s.stop_all(Duration::from_secs(5));
        assert!(s.pids().is_empty());
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "reaped");
    }
}
