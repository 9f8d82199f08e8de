//! A real Prometheus for the tests: Debian's `prometheus` (2.42, no Kubernetes service
//! discovery), on a free loopback port, with its configuration and file service discovery in a
//! temporary directory. [`Prometheus::query`] asks its HTTP API.
//!
//! The process is started in its own process group with `PR_SET_PDEATHSIG` (it dies with the
//! test process) and stopped by PID when the handle is dropped.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use crate::kube_harness::free_port;

/// A running Prometheus.
pub struct Prometheus {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

/// Percent-encodes `s` for a URL query value.
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// GET `path` on `127.0.0.1:port` (HTTP/1.0); (status, body).
pub fn http_get_local(port: u16, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no end of headers in {resp:.200}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("no status in {head:.200}"))?;
    Ok((status, body.to_string()))
}

impl Prometheus {
    /// Starts Prometheus with `config` (YAML; relative file paths are relative to its
    /// directory, see [`dir`](Self::dir)) and waits until it is ready.
    pub fn start(config: &str) -> Result<Prometheus> {
        let dir = tempfile::Builder::new().prefix("marklb-prom-").tempdir()?;
        std::fs::write(dir.path().join("prometheus.yml"), config)?;
        let port = free_port()?;
        let log = std::fs::File::create(dir.path().join("prometheus.log"))?;
        let mut cmd = Command::new("prometheus");
        cmd.arg("--config.file=prometheus.yml")
            .arg("--storage.tsdb.path=data")
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--web.enable-lifecycle")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .context("starting prometheus (Debian's package: scripts/setup.sh)")?;
        let mut p = Prometheus { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = p.child.try_wait()? {
                bail!("prometheus exited ({status}): {}", p.log_tail(20));
            }
            if matches!(http_get_local(port, "/-/ready"), Ok((200, _))) {
                return Ok(p);
            }
            if Instant::now() > deadline {
                bail!("prometheus not ready after 30 s: {}", p.log_tail(20));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its directory (configuration, file service discovery, data, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Its HTTP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Writes a file service discovery file `name` (relative to [`dir`](Self::dir)): one
    /// group per `(targets, labels)`. Prometheus re-reads it on change.
    pub fn write_file_sd(&self, name: &str, groups: &[(Vec<String>, Value)]) -> Result<PathBuf> {
        let body: Vec<Value> = groups
            .iter()
            .map(|(t, l)| serde_json::json!({"targets": t, "labels": l}))
            .collect();
        let path = self.dir.path().join(name);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&body)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }

    /// `GET /api/v1/<path>`: the `data` of a successful answer, else an error with Prometheus'
    /// message.
    pub fn api(&self, path: &str) -> Result<Value> {
        let (status, body) = http_get_local(self.port, &format!("/api/v1/{path}"))?;
        let v: Value =
            serde_json::from_str(&body).with_context(|| format!("HTTP {status}: {body:.300}"))?;
        if v["status"] != "success" {
            bail!("{path}: {} {}", v["errorType"], v["error"]);
        }
        Ok(v["data"].clone())
    }

    /// An instant query: the result vector (or scalar/string) as Prometheus returns it.
    pub fn query(&self, promql: &str) -> Result<Value> {
        Ok(self.api(&format!("query?query={}", url_encode(promql)))?["result"].clone())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: kill(2) of the process group we created for this child.
            unsafe { libc::kill(-pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            // SAFETY: as above.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
        let _ = self.child.wait();
    }
}

/// The PromQL of every panel of a Grafana dashboard (its `targets[].expr`), with the panel's
/// title, and the dashboard's variables replaced for a direct query: `$__rate_interval` by
/// `rate_interval`, `$node` by `.*` (all nodes).
pub fn dashboard_queries(dashboard: &Value, rate_interval: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        let title = panel["title"].as_str().unwrap_or("?").to_string();
        for t in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = t["expr"].as_str() {
                let q = expr
                    .replace("$__rate_interval", rate_interval)
                    .replace("$node", ".*");
                out.push((title.clone(), q));
            }
        }
    }
    out
}
